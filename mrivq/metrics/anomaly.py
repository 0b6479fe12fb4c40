"""Voxel-wise metrics of an anomaly map against a ground-truth lesion mask: AUROC, AUPRC (average
precision), the best Dice over all thresholds and the Dice at a fixed threshold, per subject and pooled
over subjects, as in Pinaya et al. 2022 (Medical Image Analysis 79, "Unsupervised brain imaging 3D
anomaly detection and segmentation with transformers"), whose headline figures are the pooled AUPRC and
the best achievable Dice.

Every function takes plain arrays (a map of scores, higher = more anomalous, and a boolean mask of the
same shape), optionally restricted to a region (e.g. the brain), so the metrics can be tested on maps
whose values are known by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrivq.utils.errors import MrivqError


def _flat(scores: Any, truth: Any, region: Any = None) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth).astype(bool)
    if s.shape != t.shape:
        raise MrivqError(f"an anomaly map of shape {s.shape} cannot be compared with a mask of shape {t.shape}")
    if region is not None:
        r = np.asarray(region).astype(bool)
        if r.shape != s.shape:
            raise MrivqError(f"a region of shape {r.shape} does not match the map's {s.shape}")
        s, t = s[r], t[r]
    s, t = s.ravel(), t.ravel()
    if not np.isfinite(s).all():
        raise MrivqError(f"the anomaly map holds {int((~np.isfinite(s)).sum())} NaN/Inf values")
    return s, t


def _curve(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (distinct scores, descending) with the true and false positives at ``score >= thr``."""
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last voxel of each group of equal scores
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    return s[last], tp.astype(np.float64), fp.astype(np.float64)


def auroc(scores: Any, truth: Any, region: Any = None) -> float:
    """Area under the ROC curve (ties count half); NaN without both lesion and healthy voxels."""
    s, t = _flat(scores, truth, region)
    pos, neg = int(t.sum()), int((~t).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    _, tp, fp = _curve(s, t)
    tpr, fpr = np.r_[0.0, tp / pos], np.r_[0.0, fp / neg]
    return float((np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2).sum())  # trapezoids: ties count half


def auprc(scores: Any, truth: Any, region: Any = None) -> float:
    """Average precision: the mean over lesion voxels of the precision at their score (step-wise area
    under the precision-recall curve, as scikit-learn's ``average_precision_score``); NaN without
    lesion voxels. A random map scores about the lesion fraction."""
    s, t = _flat(scores, truth, region)
    pos = int(t.sum())
    if pos == 0:
        return float("nan")
    _, tp, fp = _curve(s, t)
    precision = tp / (tp + fp)
    recall_steps = np.diff(np.r_[0.0, tp]) / pos
    return float((precision * recall_steps).sum())


def best_dice(scores: Any, truth: Any, region: Any = None) -> tuple[float, float]:
    """(the highest Dice of ``score >= threshold`` with the mask over all thresholds, that threshold):
    the ceiling of any thresholding of the map (Pinaya et al. 2022 report it as [Dice])."""
    s, t = _flat(scores, truth, region)
    pos = int(t.sum())
    if pos == 0:
        return float("nan"), float("nan")
    thr, tp, fp = _curve(s, t)
    dice = 2 * tp / ((tp + fp) + pos)
    k = int(np.argmax(dice))
    return float(dice[k]), float(thr[k])


def dice_at(scores: Any, truth: Any, threshold: float, region: Any = None) -> float:
    """Dice of ``score >= threshold`` with the mask (1 when both are empty)."""
    s, t = _flat(scores, truth, region)
    pred = s >= threshold
    denom = int(pred.sum()) + int(t.sum())
    return 1.0 if denom == 0 else float(2 * int((pred & t).sum()) / denom)


def anomaly_metrics(maps: Sequence[Any], masks: Sequence[Any], regions: Sequence[Any] | None = None, *,
                    threshold: float | None = None, names: Sequence[str] | None = None) -> dict:
    """Pooled (all subjects' voxels together) and per-subject AUROC, AUPRC and best Dice; with
    ``threshold`` (chosen on another split) also the Dice there."""
    if len(maps) != len(masks) or not maps:
        raise MrivqError(f"need one mask per anomaly map (got {len(maps)} maps and {len(masks)} masks)")
    regions = list(regions) if regions is not None else [None] * len(maps)
    names = list(names) if names is not None else [str(i) for i in range(len(maps))]
    flat = [_flat(m, k, r) for m, k, r in zip(maps, masks, regions, strict=True)]
    s = np.concatenate([f[0] for f in flat])
    t = np.concatenate([f[1] for f in flat])

    def row(sc: np.ndarray, tr: np.ndarray) -> dict:
        d, thr = best_dice(sc, tr)
        out = {"auroc": auroc(sc, tr), "auprc": auprc(sc, tr), "best_dice": d, "best_threshold": thr,
               "lesion_voxels": int(tr.sum()), "voxels": int(tr.size)}
        if threshold is not None:
            out["dice"] = dice_at(sc, tr, threshold)
        return out

    return {"pooled": row(s, t), "subjects": {n: row(*f) for n, f in zip(names, flat, strict=True)}}
