"""Intensity statistics and generated outputs: the median per-channel intensity range of a dataset
(:func:`dataset_intensity_stats`), mapping model outputs in [0, 1] back to input units
(:func:`intensity_range`, :func:`to_intensity`) and the affine of generated images
(:func:`synth_geometry`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, DivisiblePadd, ResizeWithPadOrCropd

from mrivq.data.items import LOHI_MEMO, data_items, item_kind, memo_key
from mrivq.data.manifest import select_rows
from mrivq.data.preprocess import Preprocess
from mrivq.data.readers import read_array_file
from mrivq.data.transforms import build_transforms, run_transforms
from mrivq.utils.errors import MrivqError


def stats_of(lohi: list, pre: Preprocess) -> dict:
    lo = np.median(np.asarray([np.asarray(a, dtype=np.float64) for a, _ in lohi]), axis=0)
    hi = np.median(np.asarray([np.asarray(b, dtype=np.float64) for _, b in lohi]), axis=0)
    return {"lo": [float(v) for v in np.atleast_1d(lo)], "hi": [float(v) for v in np.atleast_1d(hi)],
            "n": len(lohi), "percentiles": list(pre.percentiles)}


def dataset_intensity_stats(rows: list[dict], dataset_dir: Path, pre: Preprocess, n: int = 16) -> dict:
    """Median per-channel intensity range (``lo``/``hi``, in input units) over up to ``n`` subjects
    spread evenly through ``rows``; synthesized [0, 1] outputs map back through it (:func:`intensity_range`).
    Subjects already preprocessed by :func:`make_dataset` are not read again."""
    items = select_rows(rows, pre.modalities) if rows else []
    if not items:
        raise MrivqError("no subjects to compute intensity statistics from")
    if item_kind(items[0]) == "array":
        arr = read_array_file(_abs(items[0]["sources"][0]["path"], dataset_dir))
        c = sum((arr.shape[-1] if arr.ndim == 4 else 1) for _ in items[0]["sources"])
        if arr.dtype == np.uint8:
            return {"lo": [0.0] * c, "hi": [255.0] * c, "n": len(items), "percentiles": list(pre.percentiles)}
    pick = sorted({int(round(v)) for v in np.linspace(0, len(items) - 1, min(n, len(items)))})
    chosen = [items[i] for i in pick]
    data = data_items(chosen, dataset_dir, pre, False)
    volumetric = item_kind(items[0]) == "volume"
    lohi = []
    todo = []
    for d in data:
        key = memo_key(d)
        if key in LOHI_MEMO:
            lohi.append(LOHI_MEMO[key])
        else:
            todo.append(d)
    if todo:
        full = build_transforms(pre, volumetric=volumetric, for_dataset=False).transforms
        ts = [t for t in full if not isinstance(t, (DivisiblePadd, ResizeWithPadOrCropd))]
        t = Compose(ts)
        for d in todo:
            out = run_transforms(t, copy.deepcopy(d))
            lohi.append((out["lo"], out["hi"]))
            LOHI_MEMO[memo_key(d)] = (out["lo"], out["hi"])
    return stats_of(lohi, pre)


def intensity_range(stats: dict | Any) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per channel from a stats dict (or a dataset's ``.stats``)."""
    if not isinstance(stats, dict):
        stats = stats.stats
    try:
        return np.asarray(stats["lo"], dtype=np.float64), np.asarray(stats["hi"], dtype=np.float64)
    except (KeyError, TypeError):
        raise MrivqError("the run has no intensity statistics (lo/hi); retrain or re-run training") from None


def to_intensity(x: torch.Tensor | np.ndarray, stats: dict) -> np.ndarray:
    """Model output [C, *spatial] in [0, 1] -> input units with the training median range."""
    lo, hi = intensity_range(stats)
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x * (hi - lo).reshape(shape) + lo.reshape(shape)).astype(np.float32)


def synth_geometry(pre: Preprocess, spatial_shape: Sequence[int]) -> np.ndarray:
    """Affine for generated images: the run's spacing and ``pre.orientation`` (array axis i points to its
    i-th axis code, as ``Orientationd`` left the training volumes), the grid centred at 0 mm. A run trained
    in LPS thus writes LPS arrays with an LPS affine, not a left-right flipped RAS one. A run aligned with
    a template (``data.register``) writes in template space: the template grid's affine."""
    if pre.register and pre.dims == 3 and len(spatial_shape) == 3:
        from mrivq.data.align import load_template, resolve_template, template_grid

        return template_grid(load_template(resolve_template(pre.template)), pre.spacing,
                             [int(s) for s in spatial_shape])[0]
    shape = [int(s) for s in spatial_shape]
    if pre.spacing is None:
        sp = [1.0] * len(shape)
    elif len(pre.spacing) >= len(shape):
        sp = [float(s) for s in pre.spacing[: len(shape)]]
        if pre.dims == 2 and len(pre.spacing) == 3 and len(shape) == 2:
            sp = [float(s) for a, s in enumerate(pre.spacing) if a != pre.slice_axis]
    else:
        sp = [float(s) for s in pre.spacing] + [1.0] * (len(shape) - len(pre.spacing))
    while len(sp) < 3:
        sp.append(1.0)
        shape.append(1)
    aff = np.eye(4)
    codes = str(pre.orientation).upper() if pre.dims == 3 else "RAS"  # 2D slices are written RAS
    for axis, code in enumerate(codes[:3]):  # array axis -> the world (RAS+) direction it points to
        world, sign = _WORLD[code]
        aff[:3, axis] = 0.0
        aff[world, axis] = sign * sp[axis]
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape[:3], dtype=np.float64) - 1) / 2)
    return aff


def sample_space(pre: Preprocess) -> dict:
    """What a generated sample's sidecar says of its space: ``{"space": "template", "template": NAME}``
    for a run aligned with a template, ``{"space": "model grid"}`` otherwise."""
    if pre.register and pre.dims == 3:
        from mrivq.data.align import resolve_template

        return {"space": "template", "template": resolve_template(pre.template)}
    return {"space": "model grid"}


_WORLD = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _abs(p: str | Path, base: Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else Path(base) / p
