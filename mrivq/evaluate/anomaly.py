"""``mrivq eval --anomaly``: how well a run trained on healthy scans finds lesions it never saw.

Every subject of a dataset with ground-truth lesion masks (a ``mask`` column, as written by
``mrivq fetch phantom --lesions``) is healed (:func:`mrivq.inference.files.heal_image`) and three maps are
measured against its mask, in the input's own geometry, in the same pass:

- ``healed``: the healed residual (Pinaya et al. 2022), the method;
- ``residual``: the VQ-VAE's reconstruction residual ``|x - D(E(x))|`` alone (the classic baseline);
- ``nll``: the prior's per-code NLL, upsampled;
- ``normative`` (with ``normalize``, the default where possible): the reconstruction residual as a
  per-voxel z-score against healthy scans' (:func:`mrivq.inference.heal.residual_reference`).

Metrics (:mod:`mrivq.metrics.anomaly`) are voxel-wise within the brain (the phantom's tissue labels
when the dataset has them, else the head mask), pooled over subjects, per subject, per lesion kind and
per lesion size. The Dice at a fixed threshold uses the threshold that maximises pooled Dice on the
*other* half of the dataset's subjects (``:val`` is measured with a threshold chosen on ``:train``
and the other way round; ``:all`` has no calibrated Dice).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.metrics.anomaly import anomaly_metrics
from mrivq.utils.errors import MrivqError

METHODS = ("healed", "residual", "nll", "normative")
_MAP_KEY = {"healed": "anomaly", "residual": "recon_residual", "nll": "nll", "normative": "normative_residual"}
#: lesion size bins by diameter (mm): the last two are "1 cm and more", the sizes the detection targets are set for
SIZE_BINS = ((0, 5, "<5 mm"), (5, 10, "5-10 mm"), (10, 20, "10-20 mm"), (20, math.inf, ">=20 mm"))
_BRAIN_TISSUES = ("csf", "grey_matter", "white_matter", "ventricles")
SPLITS = ("val", "train", "all")


def size_bin(diameter_mm: float) -> str:
    return next(name for lo, hi, name in SIZE_BINS if lo <= diameter_mm < hi)


def subject_lesions(ddir: Path) -> dict[str, dict]:
    """What the phantom inserted per subject (``phantom.json``), if the dataset says."""
    try:
        meta = json.loads((ddir / "phantom.json").read_text())
        return {s["subject"]: s["lesion"] for s in meta.get("subjects", []) if isinstance(s.get("lesion"), dict)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def brain_values_of(ddir: Path) -> list[int] | None:
    try:
        labels = json.loads((ddir / "phantom.json").read_text()).get("labels", {})
        return [int(k) for k, v in labels.items() if v in _BRAIN_TISSUES] or None
    except (OSError, ValueError, AttributeError):
        return None


def lesion_items(ddir: Path, modalities: list[str]) -> list[dict]:
    """The dataset's subjects that have every modality and a lesion mask."""
    from mrivq.data.manifest import load_manifest, select_rows

    rows = load_manifest(ddir)
    if not any(r.get("mask") for r in rows):
        raise MrivqError(f"dataset {ddir.name} has no lesion masks (no 'mask' column); fetch lesion phantoms "
                         "with `mrivq fetch phantom --lesions`")
    masks = {r["subject"]: r["mask"] for r in rows if r.get("mask")}
    labels = {r["subject"]: r["label"] for r in rows if r.get("label")}
    items = [{**it, "mask": masks[it["subject"]], "labels": labels.get(it["subject"], "")}
             for it in select_rows(rows, modalities) if it["subject"] in masks]
    if not items:
        raise MrivqError(f"no subject of {ddir.name} has both a lesion mask and {', '.join(modalities)}")
    return items


def split_items(items: list[dict], split: str) -> tuple[list[dict], list[dict]]:
    """(measured, calibration) subjects: a seeded half/half split by subject (``all``: all, none)."""
    from mrivq.data.manifest import split_subjects

    if split not in SPLITS:
        raise MrivqError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if split == "all" or len(items) < 2:
        return items, []
    train, val = split_subjects(items, val_fraction=0.5, seed=0, split_column=False)
    return (val, train) if split == "val" else (train, val)


def truth_and_region(ddir: Path, item: dict, head: np.ndarray, brain_values: list[int] | None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A subject's lesion mask (its values: the kinds) and the voxels measured: the brain (from the
    phantom's labels) where known, else the head, always with the lesion itself."""
    from mrivq.inference.files import read_mask

    damaged = "the dataset is damaged, fetch it again"
    mask = read_mask(ddir / item["mask"], head.shape, "lesion mask", damaged)
    region = head
    if brain_values and item.get("labels"):
        region = np.isin(read_mask(ddir / item["labels"], head.shape, "label map", damaged), brain_values)
    return mask, region | (mask > 0)


def _picture(path: Path, image: np.ndarray, mask: np.ndarray, amap: np.ndarray) -> None:
    """Input, ground truth and map, on the axial slice through the lesion's centre."""
    from mrivq.io.images import save_png
    from mrivq.io.preview import grid

    z = int(round(np.argwhere(mask).mean(0)[2])) if mask.any() else image.shape[2] // 2
    sl = [image[..., z], mask[..., z].astype(np.float32), amap[..., z]]
    sl = [(s - s.min()) / (s.max() - s.min()) if s.max() > s.min() else s * 0 for s in sl]
    save_png(grid([s[None] for s in sl], ncols=3), path)


def _analyse(r: Any, dev: Any, ddir: Path, items: list[dict], opts: Any, lesions: dict, brain_values: Any,
             progress: Any, pictures: Path | None, what: str) -> dict[str, Any]:
    from mrivq.datasets.lesions import KINDS
    from mrivq.inference.files import heal_image
    from mrivq.io.images import load_volume
    from mrivq.utils.progress import silent

    maps: dict[str, list] = {m: [] for m in methods_of(opts)}
    truths, regions, info = [], [], []
    with (progress or silent()).task(f"heal {what}", total=len(items), unit="subject") as bar:
        for it in items:
            srcs = [ddir / s["path"] for s in it["sources"]]
            res = heal_image(r, dev, srcs if len(srcs) > 1 else srcs[0], opts)
            shape = res["anomaly"].shape[:3]
            mask, region = truth_and_region(ddir, it, res["head"].reshape(shape), brain_values)
            for m in maps:
                maps[m].append(res[_MAP_KEY[m]].reshape(shape))
            truths.append(mask > 0)
            regions.append(region)
            vals = [int(v) for v in np.unique(mask) if v > 0]
            kind = KINDS[vals[0] - 1] if len(vals) == 1 and 0 < vals[0] <= len(KINDS) else "mixed"
            les = lesions.get(it["subject"], {})
            vox = float(np.prod(np.abs(np.linalg.eigvals(res["affine"][:3, :3]))))
            diameter = 2 * float(les["radius_mm"]) if les.get("radius_mm") else \
                2 * (3 * (mask > 0).sum() * vox / (4 * math.pi)) ** (1 / 3)
            info.append({"subject": it["subject"], "kind": les.get("kind", kind), "diameter_mm": round(diameter, 1),
                         "size": size_bin(diameter), "resampled": res["resampled"]})
            if pictures is not None:
                img = np.asarray(load_volume(srcs[0])[0], np.float32).reshape(shape)
                _picture(pictures / f"{it['subject']}.png", img, mask > 0, maps["healed"][-1])
            bar.advance(1)
    return {"maps": maps, "truths": truths, "regions": regions, "info": info}


def methods_of(opts: Any) -> tuple[str, ...]:
    """The maps measured with resolved healing options ``opts`` (``normative`` only when normalizing)."""
    return METHODS if opts.normalize else METHODS[:3]


def calibrated_threshold(maps: list, truths: list, regions: list) -> float | None:
    """The threshold of the best pooled Dice on calibration subjects (None without lesion voxels)."""
    thr = anomaly_metrics(maps, truths, regions)["pooled"]["best_threshold"]
    return None if thr != thr else thr


def _table(a: dict, method: str, idx: list[int], threshold: float | None) -> dict:
    sub = anomaly_metrics([a["maps"][method][i] for i in idx], [a["truths"][i] for i in idx],
                          [a["regions"][i] for i in idx], threshold=threshold)
    return sub["pooled"]


def _phantom_index(ddir: Path) -> tuple[tuple[int, int] | None, dict[str, int]]:
    """A generated phantom dataset's ``(seed, cohort)`` and subject -> index (None, {} for other data)."""
    try:
        meta = json.loads((Path(ddir) / "phantom.json").read_text())
        key = (int(meta["seed"]), int(meta.get("cohort", 0)))  # phantoms from before cohorts: the healthy one
        return key, {str(s["subject"]): int(s["index"]) for s in meta["subjects"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}


def overlapping_subjects(r: Any, ddir: Path, subjects: list[str]) -> list[str]:
    """The ``subjects`` of dataset folder ``ddir`` that run ``r`` trained or validated on: the same
    subject id, or (generated phantoms) the same healthy anatomy, i.e. the same seed, cohort and index
    as a subject of the run's split. Healing those measures the model on its own data."""
    split = r.info.get("split") or {}
    used = {str(s) for part in split.values() for s in part} if isinstance(split, dict) else set()
    key, index = _phantom_index(ddir)
    run_key, run_index = _phantom_index(Path(r.info.get("data_dir", "")))
    same_anatomy = set()
    if key is not None and key == run_key:
        used_index = {i for s, i in run_index.items() if s in used}
        same_anatomy = {s for s, i in index.items() if i in used_index}
    return [s for s in subjects if s in used or s in same_anatomy]


def evaluate_anomaly(run: Path | None, dataset: str, *, root: Path | None = None, opts: Any = None,
                     json_out: Path | None = None, device: str = "auto", progress: Any = None,
                     overwrite: bool = False, allow_overlap: bool = False) -> dict:
    """Heal every lesion subject of ``dataset`` (``NAME[:val|train|all]``) and measure the maps.

    Subjects the run trained or validated on (:func:`overlapping_subjects`) are refused unless
    ``allow_overlap``; the JSON lists them under ``overlap`` either way.

    Returns ``{"metrics": ..., "path": json, "pictures": folder}``; the JSON has, per method,
    ``pooled`` (``auprc``, ``auroc``, ``best_dice``, ``dice`` at the calibrated threshold), ``subjects``,
    ``kinds`` and ``sizes``, and the top level repeats the healed method's pooled figures."""
    from mrivq.inference.files import resolve_heal
    from mrivq.inference.heal import HealOptions
    from mrivq.runs.run import load_run_on
    from mrivq.utils.atomic import atomic_write_bytes
    from mrivq.utils.paths import resolve_root

    opts = (opts or HealOptions()).validate()
    name, _, split = dataset.partition(":")
    split = split or "val"
    if not name or "/" in name or "\\" in name:
        raise MrivqError(f"--dataset {dataset} is not NAME[:val|train|all] of a fetched dataset")
    if split not in SPLITS:
        raise MrivqError(f"split {split!r} of {name} is not one of {', '.join(SPLITS)}")
    ddir = resolve_root(root) / name
    if not (ddir / "manifest.csv").is_file():
        raise MrivqError(f"dataset {name!r} is not fetched under {ddir.parent}; fetch lesion phantoms with "
                         f"`mrivq fetch phantom --lesions` or pass --root")
    r, dev = load_run_on(run, device, need_prior=True)
    if r.preprocess.dims != 3:
        raise MrivqError(f"run {r.path.name} is 2D; eval --anomaly measures 3D runs")
    opts = resolve_heal(r, opts)  # recorded as used
    out = Path(json_out) if json_out else r.path / f"anomaly_{name}_{split}.json"
    pictures = out.with_name(out.name.removesuffix(".json") + "_pictures")
    if json_out and not overwrite and out.exists():
        raise MrivqError(f"{out} already exists; pass --overwrite or choose another --json")
    if not out.parent.is_dir():
        raise MrivqError(f"folder {out.parent} does not exist; create it first")
    items = lesion_items(ddir, list(r.preprocess.modalities))
    measured, calib = split_items(items, split)
    if not measured:
        raise MrivqError(f"split {split} of {name} has no subjects; use :all")
    overlap = overlapping_subjects(r, ddir, [str(it["subject"]) for it in measured + calib])
    if overlap and not allow_overlap:
        shown = ", ".join(overlap[:3]) + (", ..." if len(overlap) > 3 else "")
        raise MrivqError(f"{len(overlap)} subject(s) of {name} ({shown}) are, by id or healthy anatomy, in run "
                         f"{r.path.name}'s training or validation split; generate lesion phantoms of their own "
                         "(`mrivq fetch phantom --lesions --name NEW`) or pass --allow-overlap")
    lesions, brain_values = subject_lesions(ddir), brain_values_of(ddir)
    pictures.mkdir(exist_ok=True)
    a = _analyse(r, dev, ddir, measured, opts, lesions, brain_values, progress, pictures, split)
    methods = methods_of(opts)
    thresholds: dict[str, float | None] = {m: None for m in methods}
    if calib:
        c = _analyse(r, dev, ddir, calib, opts, lesions, brain_values, progress, None, "calibration")
        for m in methods:
            thresholds[m] = calibrated_threshold(c["maps"][m], c["truths"], c["regions"])
    names = [i["subject"] for i in a["info"]]
    result: dict[str, Any] = {"dataset": name, "split": split, "run": str(r.path), "heal": opts.to_dict(),
                              "n_subjects": len(measured), "n_calibration": len(calib),
                              "overlap": {"subjects": overlap, "allowed": bool(allow_overlap)}, "methods": {}}
    for m in methods:
        full = anomaly_metrics(a["maps"][m], a["truths"], a["regions"], threshold=thresholds[m], names=names)
        for n, i in zip(names, a["info"], strict=True):
            full["subjects"][n].update({k: i[k] for k in ("kind", "diameter_mm", "size", "resampled")})
        groups: dict[str, dict[str, list[int]]] = {"kinds": {}, "sizes": {}}
        for j, i in enumerate(a["info"]):
            groups["kinds"].setdefault(i["kind"], []).append(j)
            groups["sizes"].setdefault(i["size"], []).append(j)
        for g, by in groups.items():
            full[g] = {k: {**_table(a, m, idx, thresholds[m]), "n_subjects": len(idx)} for k, idx in sorted(by.items())}
        full["threshold"] = thresholds[m]
        result["methods"][m] = full
    pooled = result["methods"]["healed"]["pooled"]
    result.update({k: pooled.get(k) for k in ("auprc", "auroc", "best_dice", "dice")})
    big = [j for j, i in enumerate(a["info"]) if i["diameter_mm"] >= 10]
    result["best_dice_1cm"] = _table(a, "healed", big, None)["best_dice"] if big else None
    atomic_write_bytes(out, (json.dumps(_finite(result), indent=2) + "\n").encode())
    return {"metrics": result, "path": str(out), "pictures": str(pictures)}


def _finite(o: Any) -> Any:
    """NaN (no lesion or no healthy voxel) as null in the JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o
