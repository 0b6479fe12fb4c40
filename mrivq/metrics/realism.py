"""Realism metrics for sets of volumes on one grid: each takes arrays ``[N, C, *spatial]`` in [0, 1]
(the run's preprocessed space) and returns plain numbers, so they can be tested on cases whose
answer is known and reused by benchmarks.

- :func:`downsample`: block means, the features of the anatomy-scale two-sample statistics
  (:mod:`mrivq.metrics.twosample`: C2ST and MMD relative to the real scans).
- :func:`mmd_linear`: MONAI's ``MMDMetric`` (unbiased, linear kernel: the distance of the means).
- :func:`pairwise_ms_ssim`: diversity as mean pairwise MS-SSIM (Wang et al. 2003) with MONAI's
  ``MultiScaleSSIMMetric``, kernel and scales chosen for the grid by :func:`ms_ssim_params`.
- :func:`nearest`: nearest-neighbour distances (memorization: Webster et al. 2019 use the same
  nearest-training-image test for GANs).
- :func:`head_masks`, :func:`dice`, :func:`tissue_model`: anatomy (head mask, tissue fractions
  from a 3-class Gaussian mixture inside it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: MS-SSIM weights of Wang et al. 2003 (MONAI's defaults), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def downsample(x: np.ndarray | torch.Tensor, factor: int = 4) -> torch.Tensor:
    """``[N, C, *spatial]`` -> ``[N, F]``: block means over ``factor`` voxels per axis (flattened).

    At the CPU preset's 48x56x48 grid this gives 12x14x12 = 2016 features: the scale of anatomy, not
    of voxel noise, and few enough for a classifier trained on a few dozen volumes."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    dims = t.ndim - 2
    size = [max(1, math.ceil(s / factor)) for s in t.shape[2:]]
    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dims]
    return pool(t, size).flatten(1)


def half_splits(real: torch.Tensor, stat: Callable[[torch.Tensor, torch.Tensor], float], *, splits: int = 20,
                seed: int = 0) -> float:
    """Noise floor of a two-sample statistic: its mean absolute value between random halves of ``real``.

    The halves are half the size of the real set, so this floor is, if anything, generous."""
    g = torch.Generator().manual_seed(seed)
    h = len(real) // 2
    if h < 2:
        raise ValueError("a noise floor needs at least 4 real items")
    vals = []
    for _ in range(splits):
        perm = torch.randperm(len(real), generator=g)
        vals.append(abs(stat(real[perm[:h]], real[perm[h:2 * h]])))
    return float(np.mean(vals))


def mmd_linear(a: torch.Tensor, b: torch.Tensor, *, seed: int = 0) -> float:
    """MONAI's ``MMDMetric`` (unbiased, linear kernel) on equal-size random subsets (it needs equal sizes)."""
    from monai.metrics import MMDMetric

    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a = a[torch.randperm(len(a), generator=g)[:n]]
    b = b[torch.randperm(len(b), generator=g)[:n]]
    return float(MMDMetric()(a.double(), b.double()))


def ms_ssim_params(shape: Sequence[int], kernel_size: int = 5, max_scales: int = 5) -> dict:
    """Kernel and scales that MONAI's ``MultiScaleSSIMMetric`` accepts on grid ``shape``.

    MONAI's defaults (kernel 11, 5 scales) need 176 voxels per axis. Here the kernel is shrunk to
    fit (at most ``kernel_size``) and the number of scales is the largest that (a) passes MONAI's
    size check and (b) keeps the coarsest scale at least one kernel wide; the first weights of Wang
    et al. are kept and renormalised to sum to 1."""
    small = int(min(shape))
    k = max(3, min(kernel_size, small // 2 * 2 - 1))
    if k % 2 == 0:
        k -= 1
    scales = 1
    for s in range(max_scales, 0, -1):
        div = max(1, s - 1) ** 2  # MONAI's own check
        if small // div > k - 1 and small / 2 ** (s - 1) >= k:
            scales = s
            break
    w = np.asarray(MS_SSIM_WEIGHTS[:scales], np.float64)
    w = w / w.sum()
    return {"kernel_size": int(k), "kernel_sigma": 1.5 * k / 11, "weights": [round(float(v), 6) for v in w],
            "data_range": 1.0, "kernel_type": "gaussian"}


def pairwise_ms_ssim(x: np.ndarray | torch.Tensor, params: dict, *, max_pairs: int = 300, seed: int = 0,
                     batch: int = 16) -> float:
    """Mean MS-SSIM over pairs of distinct volumes of ``x [N, C, *spatial]`` (all pairs, or
    ``max_pairs`` random ones). Lower means more diverse; identical volumes give 1."""
    from monai.metrics import MultiScaleSSIMMetric

    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    n = len(t)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        raise ValueError("diversity needs at least 2 volumes")
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    metric = MultiScaleSSIMMetric(spatial_dims=t.ndim - 2, data_range=params["data_range"],
                                  kernel_type=params["kernel_type"], kernel_size=params["kernel_size"],
                                  kernel_sigma=params["kernel_sigma"], weights=params["weights"])
    vals = []
    for s in range(0, len(pairs), batch):
        i, j = zip(*pairs[s:s + batch], strict=True)
        vals.append(metric(t[list(i)], t[list(j)]).flatten())
    return float(torch.cat(vals).nan_to_num(0.0).mean())


def nearest(a: torch.Tensor, ref: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each row of ``a`` to its nearest row of ``ref``, and that row's index."""
    d = torch.cdist(a.double(), ref.double())
    v, i = d.min(1)
    return v.numpy(), i.numpy()


def head_threshold(x: np.ndarray) -> float:
    """One head/background threshold for a set of volumes: half the Otsu (1979) threshold of their
    pooled voxels. Otsu alone splits background+dark tissue from bright tissue, and T1's dark skull
    and CSF fall below it, which opens the head's outline wherever the field of view cuts the neck."""
    from skimage.filters import threshold_otsu

    v = np.asarray(x, np.float32).ravel()
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000 + 1]
    return 0.5 * float(threshold_otsu(v))


def head_masks(x: np.ndarray, threshold: float) -> np.ndarray:
    """``[N, *spatial]`` bool: voxels above ``threshold``, holes filled (in 3D, then in each slice
    along the last axis, for heads left open where the field of view ends), largest part kept."""
    from scipy import ndimage

    out = np.zeros(x.shape, bool)
    for i, v in enumerate(np.asarray(x)):
        m = ndimage.binary_fill_holes(v > threshold)
        if m.ndim == 3:
            m = np.stack([ndimage.binary_fill_holes(m[..., k]) for k in range(m.shape[-1])], -1)
        lab, n = ndimage.label(m)
        if n > 1:
            sizes = ndimage.sum_labels(m, lab, range(1, n + 1))
            m = lab == (int(np.argmax(sizes)) + 1)
        out[i] = m
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1 when both are empty)."""
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * float(np.logical_and(a, b).sum()) / s


def mask_dice(masks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Dice of each mask with ``reference``."""
    return np.array([dice(m, reference) for m in masks])


def mean_mask(masks: np.ndarray) -> np.ndarray:
    """The voxels inside at least half of ``masks``."""
    return masks.mean(0) >= 0.5


def loo_mask_dice(masks: np.ndarray) -> np.ndarray:
    """Each real mask's Dice with the mean mask of the *other* real masks (leave-one-out, so a real
    scan is not compared with a mean that contains it)."""
    n = len(masks)
    total = masks.sum(0, dtype=np.int64)
    return np.array([dice(m, (total - m) >= (n - 1) / 2) for m in masks])


def tissue_model(x: np.ndarray, masks: np.ndarray, classes: int = 3, seed: int = 0,
                 max_voxels: int = 200_000):
    """A ``classes``-component Gaussian mixture of the intensities inside ``masks`` (real scans);
    returns it with its components ordered by mean intensity (dark to bright)."""
    from sklearn.mixture import GaussianMixture

    v = np.asarray(x)[masks].astype(np.float64)
    if v.size > max_voxels:
        v = np.random.default_rng(seed).choice(v, max_voxels, replace=False)
    gmm = GaussianMixture(classes, random_state=seed).fit(v[:, None])
    order = np.argsort(gmm.means_.ravel())
    return gmm, order


def tissue_fractions(x: np.ndarray, masks: np.ndarray, gmm, order: np.ndarray) -> np.ndarray:
    """``[N, classes]``: the share of each volume's mask given to each mixture component (dark first)."""
    k = len(order)
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    out = np.zeros((len(x), k))
    for i, (v, m) in enumerate(zip(np.asarray(x), masks, strict=True)):
        if m.any():
            lab = rank[gmm.predict(v[m].astype(np.float64)[:, None])]
            out[i] = np.bincount(lab, minlength=k) / m.sum()
    return out


#: the names of the three mixture classes inside the brain, dark to bright (T1: CSF < grey < white matter)
TISSUE_CLASSES = ("csf", "gm", "wm")


def brain_roi(masks: np.ndarray, depth_vox: float) -> np.ndarray:
    """Where the brain is when no template mask is given: the real scans' mean head mask, eroded by
    ``depth_vox`` voxels (scalp and skull) — coarse, so a template's brain mask is preferred."""
    from scipy import ndimage

    mean = mean_mask(masks)
    dist = ndimage.distance_transform_edt(mean)
    return dist > depth_vox


def tissue_labels(x: np.ndarray, roi: np.ndarray, gmm, order: np.ndarray) -> np.ndarray:
    """``[N, *spatial]`` int8: each voxel of ``roi`` labelled 0, 1, 2 by the mixture (dark to bright), -1
    outside: a 3-class tissue map per volume, all on the one aligned grid."""
    k = len(order)
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    out = np.full((len(x), *roi.shape), -1, np.int8)
    for i, v in enumerate(np.asarray(x)):
        out[i][roi] = rank[gmm.predict(v[roi].astype(np.float64)[:, None])]
    return out


def mean_tissue_map(labels: np.ndarray, classes: int = 3) -> np.ndarray:
    """The most frequent class at each voxel over ``labels`` (-1 where the voxel is outside the ROI)."""
    counts = np.stack([(labels == c).sum(0) for c in range(classes)])
    out = counts.argmax(0).astype(np.int8)
    out[(labels < 0).all(0)] = -1
    return out


def tissue_dice(labels: np.ndarray, reference: np.ndarray, classes: int = 3) -> np.ndarray:
    """``[N, classes]``: Dice of each volume's class masks with the reference map's."""
    return np.array([[dice(lab == c, reference == c) for c in range(classes)] for lab in labels])


def loo_tissue_dice(labels: np.ndarray, classes: int = 3) -> np.ndarray:
    """Each real scan's per-class Dice with the mean map of the *other* real scans."""
    counts = np.stack([(labels == c).sum(0) for c in range(classes)])  # [classes, *spatial]
    out = []
    for lab in labels:
        own = np.stack([(lab == c) for c in range(classes)]).astype(counts.dtype)
        ref = (counts - own).argmax(0)
        ref[(labels < 0).all(0)] = -1
        out.append([dice(lab == c, ref == c) for c in range(classes)])
    return np.array(out)


def ventricle_region(mean_map: np.ndarray, roi: np.ndarray, depth_vox: float) -> np.ndarray:
    """The lateral ventricles' region: the real mean map's CSF (class 0) at least ``depth_vox`` voxels
    inside the brain (deep CSF, away from the sulci and the brain's surface), grown by one voxel."""
    from scipy import ndimage

    deep = ndimage.distance_transform_edt(roi) >= depth_vox
    return ndimage.binary_dilation((mean_map == 0) & deep)


def ventricle_volumes(labels: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Voxels of CSF (class 0) inside the ventricles' region, per volume."""
    return np.array([int(((lab == 0) & region).sum()) for lab in labels])
