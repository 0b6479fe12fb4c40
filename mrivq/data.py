"""Manifest -> MONAI transforms -> datasets, and the way back to an input's own geometry.

This is the one place preprocessing lives. A :class:`Preprocess` (stored with every trained model)
fully describes it; the same transforms serve training (:func:`make_dataset`), single files
(:func:`preprocess_file`) and the inverse mapping (:func:`restore`).

Volumes (NIfTI, Analyze, DICOM series) go through::

    LoadSourcesd            mrivq.io.load_volume -> MetaTensor [C, *spatial] (affine set); later
                            modalities resampled onto the first one's grid
    Orientationd            to ``pre.orientation`` (RAS)
    Spacingd                to ``pre.spacing`` mm, bilinear (skipped when None)
    ScalePercentilesd       per channel [p_lo, p_hi] percentiles -> [0, 1], lo/hi recorded (invertible)
    ResizeWithPadOrCropd    to ``pre.shape`` (centred)  |  DivisiblePadd(k=divisible_by)
    EnsureTyped, SelectItemsd

2D arrays (MNIST IDX, CIFAR pickles; rows with an ``index``) take a vectorised path: the arrays are
read once per file, scaled by 1/255 and padded/cropped with the same index mapping MONAI would use.
With ``pre.dims == 2`` on volumetric data every subject gives ``slices_per_volume`` central slices
along ``slice_axis`` (after orientation, so axis 2 = axial for RAS).

:func:`restore` inverts everything with MONAI's invertible-transform machinery (the applied
operations are kept, JSON-encoded, in the ``ctx`` dict), falling back to one direct resampling from
the preprocessed grid onto the original one when the recorded operations can't be replayed.
"""

from __future__ import annotations

import copy
import csv
import gzip
import inspect
import json
import random
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, MetaTensor, PersistentDataset
from monai.transforms import (
    Compose,
    DivisiblePadd,
    EnsureTyped,
    InvertibleTransform,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    SelectItemsd,
    Spacingd,
    SpatialResample,
)
from monai.utils import TraceKeys

from mrivq.errors import ImageReadError, MrivqError

#: Bump when the pipeline changes in a way that makes disk caches stale (it is part of the cache key).
DATA_VERSION = 1
#: ctx format written by :func:`preprocess_file`.
CTX_VERSION = 1

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_SPLIT_TRAIN = {"train", "training"}
_SPLIT_VAL = {"test", "val", "valid", "validation"}
_EXTRAS = ("label", "split", "site", "sex", "age", "series_uid")


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class Preprocess:
    """Preprocessing of one model's inputs: plain, JSON-able, stored with the trained model."""

    dims: int = 3  # 2 or 3
    modalities: list[str] = field(default_factory=lambda: ["t1"])  # channels, in order
    spacing: list[float] | None = field(default_factory=lambda: [2.0, 2.0, 2.0])  # mm; None = keep
    orientation: str = "RAS"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # -> [0, 1]
    clip: bool = True
    shape: list[int] | None = None  # crop/pad (centred) to this; None = pad up to a multiple
    divisible_by: int = 4  # the model's downsampling factor (2**levels)
    slice_axis: int = 2  # dims=2 on volumes: which axis to slice (after orientation)
    slices_per_volume: int = 1  # dims=2 on volumes: central slices per subject
    pool_modalities: bool = False  # each modality its own 1-channel image (not channels of one)

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict | None) -> Preprocess:
        """Build from a config's ``data`` section; keys that are not preprocessing are ignored."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        kw = {k: copy.deepcopy(v) for k, v in d.items() if k in known}
        if isinstance(kw.get("modalities"), str):
            kw["modalities"] = [kw["modalities"]]
        for k in ("modalities", "spacing", "percentiles", "shape"):
            if isinstance(kw.get(k), tuple):
                kw[k] = list(kw[k])
        return cls(**kw)

    def validate(self) -> None:
        """Raise :class:`MrivqError` naming the first bad value."""
        def bad(msg: str) -> MrivqError:
            return MrivqError(f"data config: {msg}")

        if self.dims not in (2, 3):
            raise bad(f"dims must be 2 or 3, not {self.dims!r}")
        if not self.modalities or not all(isinstance(m, str) and m for m in self.modalities):
            raise bad(f"modalities must be a non-empty list of names, not {self.modalities!r}")
        if len(set(self.modalities)) != len(self.modalities):
            raise bad(f"modalities {self.modalities} repeat a name")
        if not isinstance(self.divisible_by, int) or self.divisible_by < 1:
            raise bad(f"divisible_by must be a positive integer, not {self.divisible_by!r}")
        if self.spacing is not None:
            ok_len = (2, 3) if self.dims == 2 else (3,)
            if (not isinstance(self.spacing, (list, tuple)) or len(self.spacing) not in ok_len
                    or not all(_is_num(s) and s > 0 for s in self.spacing)):
                raise bad(f"spacing must be {' or '.join(map(str, ok_len))} positive numbers (mm) or null, "
                          f"not {self.spacing!r}")
        o = str(self.orientation).upper()
        if len(o) != 3 or sorted({_axis_of(c) for c in o}) != [0, 1, 2]:
            raise bad(f"orientation must be three axis codes like RAS or LPS, not {self.orientation!r}")
        p = self.percentiles
        if (not isinstance(p, (list, tuple)) or len(p) != 2 or not all(_is_num(v) for v in p)
                or not 0 <= p[0] < p[1] <= 100):
            raise bad(f"percentiles must be [lower, upper] with 0 <= lower < upper <= 100, not {p!r}")
        if self.shape is not None:
            if (not isinstance(self.shape, (list, tuple)) or len(self.shape) != self.dims
                    or not all(isinstance(s, int) and s > 0 for s in self.shape)):
                raise bad(f"shape must be {self.dims} positive integers or null, not {self.shape!r}")
            if any(s % self.divisible_by for s in self.shape):
                raise bad(f"shape {list(self.shape)} must be divisible by {self.divisible_by} "
                          f"(the model downsamples by that factor); e.g. "
                          f"{[_round_up(s, self.divisible_by) for s in self.shape]}")
        if self.slice_axis not in (0, 1, 2):
            raise bad(f"slice_axis must be 0, 1 or 2, not {self.slice_axis!r}")
        if not isinstance(self.slices_per_volume, int) or self.slices_per_volume < 1:
            raise bad(f"slices_per_volume must be a positive integer, not {self.slices_per_volume!r}")
        if not isinstance(self.pool_modalities, bool):
            raise bad(f"pool_modalities must be true or false, not {self.pool_modalities!r}")

    @property
    def channels(self) -> int:
        """Input channels of a model trained with this preprocessing."""
        return 1 if self.pool_modalities else len(self.modalities)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _axis_of(code: str) -> int:
    return {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(code, -1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


# ----------------------------------------------------------------------------------------------------
# manifest, selection, split
# ----------------------------------------------------------------------------------------------------


def load_manifest(dataset_dir: Path) -> list[dict]:
    """Rows of ``<dataset_dir>/manifest.csv`` as dicts of strings."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "manifest.csv"
    if not path.is_file():
        raise MrivqError(f"{dataset_dir} has no manifest.csv; run `mrivq fetch {dataset_dir.name}` first")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
            cols = [c.strip() for c in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MrivqError(f"{path} cannot be read ({e}); run `mrivq fetch {dataset_dir.name}` again") from None
    missing = [c for c in ("subject", "modality", "path") if c not in cols]
    if missing:
        raise MrivqError(f"{path} lacks column(s) {', '.join(missing)}; run `mrivq fetch {dataset_dir.name}` again")
    if not rows:
        raise MrivqError(f"{path} lists no images; run `mrivq fetch {dataset_dir.name}` again")
    return rows


def _is_grouped(r: dict) -> bool:
    return "sources" in r


def select_rows(rows: list[dict], modalities: Sequence[str]) -> list[dict]:
    """Group rows into items (one per subject, or per subject and index for 2D arrays) that have
    every modality; each item has ``subject``, ``sources`` (one per modality, in order) and the
    extras of its first modality (``label``, ``split``, ``site``, ...)."""
    modalities = [modalities] if isinstance(modalities, str) else list(modalities)
    if rows and all(_is_grouped(r) for r in rows):
        return rows  # already selected
    present = sorted({r.get("modality", "") for r in rows})
    absent = [m for m in modalities if m not in present]
    if absent:
        raise MrivqError(f"no images of modality {', '.join(absent)} in the manifest; it has: "
                         f"{', '.join(p for p in present if p) or 'nothing'}")
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        m = r.get("modality", "")
        if m not in modalities:
            continue
        key = (r["subject"], str(r.get("index", "") or ""))
        groups.setdefault(key, {}).setdefault(m, r)
    out = []
    for (subject, _), by_mod in groups.items():
        if any(m not in by_mod for m in modalities):
            continue
        first = by_mod[modalities[0]]
        item: dict[str, Any] = {"subject": subject, "modalities": list(modalities),
                                "sources": [_source_of(by_mod[m]) for m in modalities]}
        for k in _EXTRAS:
            if first.get(k, "") != "":
                item[k] = first[k]
        out.append(item)
    if not out:
        raise MrivqError(f"no subject has all of {', '.join(modalities)}; choose fewer modalities")
    return out


def pool_rows(rows: list[dict], modalities: Sequence[str]) -> list[dict]:
    """One single-channel item per subject and modality (``data.pool_modalities``): a model that
    sees T1, T2 and PD as separate images, so a prior conditioned on ``modality`` can pick one.
    Each item carries its ``modality``."""
    out = []
    for m in modalities:
        out += [{**it, "modality": m} for it in select_rows(rows, [m])]
    return out


def condition_items(items: list[dict], column: str, order: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Class ids for a class-conditional prior from a manifest column (``site``, ``sex``,
    ``modality``, ``label``...). Returns the items with ``label`` set to the class id and the class
    names (sorted, or ``order`` first), so id ``i`` means ``names[i]``. Every item needs a value."""
    values = [str(it.get(column, "") or "") for it in items]
    missing = sum(1 for v in values if not v)
    if missing:
        have = sorted({k for it in items for k in it if k in _EXTRAS or k == "modality"})
        raise MrivqError(f"data.condition_on={column}: {missing} of {len(items)} images have no {column!r} "
                         f"value; condition on one of: {', '.join(have) or 'nothing (no columns)'}")
    names = [str(v) for v in (order or []) if str(v) in set(values)]
    names += sorted(set(values) - set(names), key=_natural)
    ids = {n: i for i, n in enumerate(names)}
    return [{**it, "label": str(ids[v])} for it, v in zip(items, values, strict=True)], names


def _natural(v: str) -> tuple:
    """Numbers by value (digits 2 before 10), other names alphabetically."""
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def _source_of(r: dict) -> dict:
    s: dict[str, Any] = {"path": r["path"], "modality": r.get("modality", "")}
    if r.get("series_uid"):
        s["series_uid"] = str(r["series_uid"])
    for k in ("index", "channel"):
        if str(r.get(k, "")) != "":
            try:
                s[k] = int(r[k])
            except ValueError:
                raise MrivqError(f"manifest row of {r['subject']} has a bad {k} {r[k]!r}; re-fetch") from None
    return s


def split_subjects(rows: list[dict], val_fraction: float = 0.1, seed: int = 0, *,
                   split_column: bool = True) -> tuple[list, list]:
    """(train, val) by subject: all rows of a subject land on one side; seeded and independent of
    row order. Rows that all carry a ``split`` (MNIST/CIFAR train/test) use it (test -> val)."""
    if not rows:
        return [], []
    if split_column and all(str(r.get("split", "")).lower() in _SPLIT_TRAIN | _SPLIT_VAL for r in rows):
        train = [r for r in rows if str(r["split"]).lower() in _SPLIT_TRAIN]
        val = [r for r in rows if str(r["split"]).lower() in _SPLIT_VAL]
        return train, val
    if not 0 <= val_fraction < 1:
        raise MrivqError(f"val_fraction must be in [0, 1), not {val_fraction}")
    subjects = sorted({r["subject"] for r in rows})
    random.Random(seed).shuffle(subjects)
    n = len(subjects)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    val_set = set(subjects[:n_val])
    return [r for r in rows if r["subject"] not in val_set], [r for r in rows if r["subject"] in val_set]


# ----------------------------------------------------------------------------------------------------
# reading sources
# ----------------------------------------------------------------------------------------------------

_ARRAYS: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # resolved path -> (size, mtime), array
_ARRAYS_LOCK = threading.Lock()


def _array_kind(path: Path) -> str:
    """'idx' or 'cifar', by the file's first bytes (gzip is looked through)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(4)
    except OSError as e:
        raise ImageReadError(f"{path} cannot be read ({e.strerror or e}); re-fetch the dataset") from None
    if len(head) == 4 and head[0] == 0 and head[1] == 0 and head[3] in (1, 2, 3, 4):
        return "idx"
    if head[:1] == b"\x80":
        return "cifar"
    name = path.name.lower()
    if "ubyte" in name or name.endswith((".idx", ".idx.gz")):
        return "idx"
    raise ImageReadError(f"{path} is neither an IDX nor a CIFAR batch file; re-fetch the dataset")


def read_array_file(path: Path) -> np.ndarray:
    """All images of an IDX or CIFAR batch file as uint8 [N, H, W(, 3)]; read once per file."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ImageReadError(f"{path} does not exist; re-fetch the dataset") from None
    key, stamp = str(path.resolve()), (st.st_size, st.st_mtime_ns)
    with _ARRAYS_LOCK:
        if key in _ARRAYS and _ARRAYS[key][0] == stamp:
            return _ARRAYS[key][1]
        kind = _array_kind(path)
        try:
            if kind == "idx":
                from mrivq.layouts.idx import read_idx

                arr = np.asarray(read_idx(path))
            else:
                from mrivq.layouts.cifar import read_cifar_batch

                arr = np.asarray(read_cifar_batch(path)[0])
        except MrivqError:
            raise
        except Exception as e:
            raise ImageReadError(f"{path} is corrupt or truncated ({type(e).__name__}); re-fetch the dataset") \
                from None
        if arr.ndim not in (3, 4):
            raise ImageReadError(f"{path} holds an array of shape {arr.shape}, not a stack of 2D images")
        _ARRAYS[key] = (stamp, arr)
        return arr


def _read_image2d(path: Path) -> np.ndarray:
    """A PNG/JPEG as [H, W] or [H, W, 3] (alpha dropped, palette expanded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA"):
                im = im.convert(im.mode[:-1])
            if im.mode not in ("L", "RGB", "I;16", "I", "F"):
                im = im.convert("RGB")
            arr = np.array(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path} does not exist; check the path") from None
    except Exception as e:
        raise ImageReadError(f"{path} is not a readable image ({type(e).__name__}); check the file") from None
    return arr


def _is_image2d(path: Path) -> bool:
    return Path(path).suffix.lower() in _IMAGE_SUFFIXES


def _input_dtype(path: Path) -> str:
    """The stored data type of an input file (for writing outputs back alike)."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".img.gz")):
        try:
            import nibabel as nib

            return np.dtype(nib.load(str(path)).get_data_dtype()).name
        except Exception:
            return "float32"
    return "float32"


def _load_source(src: dict, base: Path | None) -> tuple[np.ndarray, np.ndarray, bool, tuple | None]:
    """One source -> (array channel-first [C, *spatial], affine 4x4, had_channel_axis, fixed_range)."""
    path = Path(src["path"])
    if base is not None and not path.is_absolute():
        path = base / path
    if "index" in src:
        arr = read_array_file(path)
        i = int(src["index"])
        if not 0 <= i < arr.shape[0]:
            raise ImageReadError(f"{path} has {arr.shape[0]} images; index {i} is out of range; re-fetch")
        img = arr[i]
        chans = img.ndim == 3
        img = np.moveaxis(img, -1, 0) if chans else img[None]
        fixed = (0.0, 255.0) if arr.dtype == np.uint8 else None
        return img.astype(np.float32), np.eye(4), chans, fixed
    if _is_image2d(path):
        img = _read_image2d(path)
        fixed = (0.0, 255.0) if img.dtype == np.uint8 else None
        chans = img.ndim == 3
        img = np.moveaxis(img, -1, 0) if chans else img[None]
        return img.astype(np.float32), np.eye(4), chans, fixed
    from mrivq.io import load_volume

    try:
        arr, affine = load_volume(path, series_uid=src.get("series_uid") or None)
    except MrivqError:
        raise
    except Exception as e:  # the reader should raise ImageReadError itself; name the file regardless
        raise ImageReadError(f"{path} cannot be read ({type(e).__name__}: {e}); check or re-fetch it") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        chans, arr = False, arr[None]
    elif arr.ndim == 4:
        chans, arr = True, np.moveaxis(arr, -1, 0)
    else:
        raise ImageReadError(f"{path} has {arr.ndim} dimensions; expected a 3D volume (or 4D with channels)")
    if "channel" in src:
        c = int(src["channel"])
        if not 0 <= c < arr.shape[0]:
            raise ImageReadError(f"{path} has {arr.shape[0]} channels; channel {c} is out of range")
        arr, chans = arr[c:c + 1], False
    return np.ascontiguousarray(arr), np.asarray(affine, dtype=np.float64), chans, None


# ----------------------------------------------------------------------------------------------------
# MONAI transforms
# ----------------------------------------------------------------------------------------------------


class LoadSourcesd(MapTransform):
    """``d[key]`` (a list of sources) -> MetaTensor [C, *spatial] with its affine; sources after
    the first are resampled (bilinear) onto the first one's grid when their grids differ."""

    def __init__(self, keys: str = "image", base: str | None = None) -> None:
        super().__init__(keys)
        self.base = Path(base) if base else None

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            sources = d[key]
            chans, fixed, ref_aff, ref_shape, had_ch = [], None, None, None, False
            for i, src in enumerate(sources):
                arr, aff, ch, fx = _load_source(src, self.base)
                if i == 0:
                    ref_aff, ref_shape, had_ch, fixed = aff, arr.shape[1:], ch, fx
                    chans.append(torch.from_numpy(arr))
                    continue
                fixed = fixed if fx == fixed else None
                if arr.shape[1:] == ref_shape and np.allclose(aff, ref_aff, atol=1e-4):
                    chans.append(torch.from_numpy(arr))
                    continue
                if "index" in src or _is_image2d(Path(src["path"])):
                    raise ImageReadError(f"{src['path']} is {arr.shape[1:]} but {sources[0]['path']} is "
                                         f"{ref_shape}; 2D channels must have the same size")
                mt = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(aff))
                res = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
                    mt, dst_affine=torch.as_tensor(ref_aff), spatial_size=tuple(ref_shape))
                chans.append(torch.as_tensor(res.as_tensor() if hasattr(res, "as_tensor") else res).float())
            img = torch.cat(chans, 0).float()
            d[key] = MetaTensor(img, affine=torch.as_tensor(ref_aff, dtype=torch.float64))
            d["fixed_range"] = list(fixed) if fixed else None
            d["channels_last"] = bool(had_ch)
            d["orig_shape"] = [int(s) for s in ref_shape]
            d["orig_affine"] = np.asarray(ref_aff, dtype=np.float64).tolist()
        return d


class ScalePercentilesd(MapTransform, InvertibleTransform):
    """Per channel: [percentile lo, percentile hi] -> [0, 1] (optionally clipped). The lo/hi used
    are recorded in the applied operation (for the inverse) and in ``d["lo"]``/``d["hi"]``.
    Data with a fixed range (8-bit images) is scaled by that range instead."""

    def __init__(self, keys: str = "image", lower: float = 0.5, upper: float = 99.5, clip: bool = True):
        super().__init__(keys)
        self.lower, self.upper, self.clip = float(lower), float(upper), bool(clip)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            fixed = d.get("fixed_range")
            if fixed:
                lo = [float(fixed[0])] * x.shape[0]
                hi = [float(fixed[1])] * x.shape[0]
            else:
                lo, hi = [], []
                for c in range(x.shape[0]):
                    a, b = np.percentile(x[c].numpy().ravel(), [self.lower, self.upper])
                    lo.append(float(a))
                    hi.append(float(b) if b > a else float(a) + 1.0)  # constant image: shift only
            shape = (-1,) + (1,) * (x.ndim - 1)
            lo_t = torch.tensor(lo, dtype=x.dtype).reshape(shape)
            hi_t = torch.tensor(hi, dtype=x.dtype).reshape(shape)
            y = (x - lo_t) / (hi_t - lo_t)
            if self.clip:
                y = y.clamp(0.0, 1.0)
            if isinstance(img, MetaTensor):
                y = MetaTensor(y, meta=img.meta, applied_operations=list(img.applied_operations))
            self.push_transform(y, extra_info={"lo": lo, "hi": hi})
            d[key], d["lo"], d["hi"] = y, lo, hi
        return d

    def inverse(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            op = self.pop_transform(d[key])
            info = op["extra_info"]
            img = d[key]
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            shape = (-1,) + (1,) * (x.ndim - 1)
            lo = torch.tensor(info["lo"], dtype=x.dtype).reshape(shape)
            hi = torch.tensor(info["hi"], dtype=x.dtype).reshape(shape)
            y = x * (hi - lo) + lo
            if isinstance(img, MetaTensor):
                y = MetaTensor(y, meta=img.meta, applied_operations=list(img.applied_operations))
            d[key] = y
        return d


class CentralSlicesd(MapTransform):
    """[C, X, Y, Z] -> [n, C, H, W]: the ``n`` central slices along spatial ``axis``."""

    def __init__(self, keys: str = "image", axis: int = 2, n: int = 1) -> None:
        super().__init__(keys)
        self.axis, self.n = int(axis), int(n)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            depth = x.shape[1 + self.axis]
            idx = central_slices(depth, self.n)
            d[key] = x.movedim(1 + self.axis, 0)[idx].contiguous()
        return d


def central_slices(depth: int, n: int) -> list[int]:
    """Indices of the ``n`` central slices of ``depth`` (edge slices repeat when n > depth)."""
    start = depth // 2 - n // 2
    return [min(max(start + i, 0), depth - 1) for i in range(n)]


def _volumetric_pixdim(pre: Preprocess) -> list[float] | None:
    if pre.spacing is None:
        return None
    if len(pre.spacing) == 3:
        return [float(s) for s in pre.spacing]
    inplane = iter(float(s) for s in pre.spacing)  # dims=2: in-plane spacing, slice spacing kept
    return [-1.0 if a == pre.slice_axis else next(inplane) for a in range(3)]


def _pad_crop(pre: Preprocess, nd: int, volumetric_2d: bool) -> tuple[str, Any]:
    """('shape', spatial_size) or ('k', k) for ``nd`` spatial dims."""
    if volumetric_2d:  # 2D model on volumes: pad/crop in-plane only
        if pre.shape is not None:
            it = iter(pre.shape)
            return "shape", [-1 if a == pre.slice_axis else next(it) for a in range(3)]
        return "k", [1 if a == pre.slice_axis else pre.divisible_by for a in range(3)]
    if pre.shape is not None:
        return "shape", list(pre.shape)
    return "k", [pre.divisible_by] * nd


def build_transforms(pre: Preprocess, *, volumetric: bool, for_dataset: bool, base: Path | None = None):
    """The MONAI Compose for volumes (``volumetric``) or 2D images; ``for_dataset`` adds typing,
    key selection and (2D model on volumes) central-slice extraction."""
    ts: list = [LoadSourcesd("image", base=str(base) if base else None)]
    if volumetric:
        ts.append(Orientationd("image", axcodes=pre.orientation.upper(), labels=_RAS_LABELS))
        pixdim = _volumetric_pixdim(pre)
        if pixdim is not None:
            ts.append(Spacingd("image", pixdim=pixdim, mode="bilinear", padding_mode="border",
                                    dtype=torch.float32))
    ts.append(ScalePercentilesd("image", *pre.percentiles, clip=pre.clip))
    volumetric_2d = volumetric and pre.dims == 2
    how, arg = _pad_crop(pre, 3 if volumetric else 2, volumetric_2d)
    if how == "shape":
        ts.append(ResizeWithPadOrCropd("image", spatial_size=arg))
    else:
        ts.append(DivisiblePadd("image", k=arg))
    if for_dataset:
        ts.append(EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False))
        if volumetric_2d:
            ts.append(CentralSlicesd("image", axis=pre.slice_axis, n=pre.slices_per_volume))
        ts.append(SelectItemsd(["image", "lo", "hi", "subject", "label"], allow_missing_keys=True))
    return Compose(ts)


def _unwrap_error(e: BaseException) -> MrivqError | None:
    """MONAI wraps transform errors in RuntimeError('applying transform ...'); find ours inside."""
    seen, cur = set(), e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MrivqError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _run(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        ours = _unwrap_error(e)
        if ours is not None:
            raise ours from None
        raise


# ----------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------


def _item_kind(item: dict) -> str:
    src = item["sources"][0]
    if "index" in src:
        return "array"
    if _is_image2d(Path(src["path"])):
        return "image2d"
    return "volume"


def _stamp(path: Path) -> list:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _data_items(items: list[dict], dataset_dir: Path, pre: Preprocess, has_label: bool) -> list[dict]:
    pre_json = pre.to_json()
    out = []
    for it in items:
        sources = []
        for s in it["sources"]:
            p = Path(s["path"])
            p = p if p.is_absolute() else Path(dataset_dir) / p
            sources.append({**{k: v for k, v in s.items() if k != "modality"}, "path": str(p)})
        d = {"image": sources, "subject": str(it["subject"]), "_pre": pre_json, "_v": DATA_VERSION,
             "_stamp": [_stamp(Path(s["path"])) for s in sources]}
        if has_label:
            d["label"] = _label(it)
        out.append(d)
    return out


def _label(item: dict) -> int:
    """The item's class label, -1 when it has none (or a non-class one, e.g. MSD's segmentation path)."""
    v = str(item.get("label", "") or "")
    try:
        f = float(v)
    except ValueError:
        return -1
    return int(f) if f.is_integer() else -1


class VolumeDataset(torch.utils.data.Dataset):
    """Items ``{"image": FloatTensor[C, *spatial], "subject": str, ["label": int]}``.

    Wraps a MONAI dataset of per-subject items; with a 2D model on volumes each subject holds
    ``slices`` slices and index ``i`` is slice ``i % slices`` of subject ``i // slices``.
    ``stats`` gives the median intensity range of the subjects (see :func:`dataset_intensity_stats`).
    """

    def __init__(self, base: Any, items: list[dict], pre: Preprocess, dataset_dir: Path, *, slices: int = 1,
                 has_label: bool = False, lohi: list | None = None) -> None:
        self.base, self.items, self.pre, self.dataset_dir = base, items, pre, Path(dataset_dir)
        self.slices, self.has_label = int(slices), has_label
        self._lohi = lohi
        self._stats: dict | None = None

    def __len__(self) -> int:
        return len(self.base) * self.slices

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j, s = divmod(i, self.slices)
        d = _run(self.base.__getitem__, j)
        img = d["image"]
        if self.pre.dims == 2 and img.ndim == 4:  # [n, C, H, W] slices of a volume
            img = img[s]
        out = {"image": img, "subject": d["subject"]}
        if self.has_label:
            out["label"] = int(d["label"])
        return out

    @property
    def subjects(self) -> list[str]:
        return [str(it["subject"]) for it in self.items]

    @property
    def stats(self) -> dict:
        if self._stats is None:
            if self._lohi:
                self._stats = _stats_of(self._lohi, self.pre)
            else:
                self._stats = dataset_intensity_stats(self.items, self.dataset_dir, self.pre)
        return self._stats


class ArrayDataset(torch.utils.data.Dataset):
    """2D arrays (MNIST, CIFAR): uint8 kept in memory, scaled by 1/255 and padded/cropped per item
    with the index mapping MONAI's pad/crop would produce (so it matches :func:`preprocess_file`)."""

    def __init__(self, items: list[dict], dataset_dir: Path, pre: Preprocess, has_label: bool,
                 progress: Any = None) -> None:
        self.items, self.pre, self.dataset_dir, self.has_label = items, pre, Path(dataset_dir), has_label
        per_channel: list[list[tuple[np.ndarray, int]]] = []
        files: dict[str, np.ndarray] = {}
        with _progress_task(progress, "reading images", len(items)) as task:
            for it in items:
                chans = []
                for s in it["sources"]:
                    p = Path(s["path"])
                    if s["path"] not in files:
                        files[s["path"]] = read_array_file(p if p.is_absolute() else self.dataset_dir / p)
                    arr = files[s["path"]]
                    i = int(s["index"])
                    if not 0 <= i < arr.shape[0]:
                        raise ImageReadError(f"{p} has {arr.shape[0]} images; index {i} is out of range; re-fetch")
                    chans.append((arr, i))
                per_channel.append(chans)
                task.advance()
        self._refs = per_channel
        first = self._raw(0) if items else np.zeros((1, 1, 1), np.uint8)
        self._fixed = 255.0 if first.dtype == np.uint8 else None
        self.in_shape = tuple(first.shape[1:])
        self._map, self.out_shape = _pad_crop_map(self.in_shape, pre)
        self.labels = [_label(it) for it in items] if has_label else None

    def _raw(self, j: int) -> np.ndarray:
        parts = []
        for arr, i in self._refs[j]:
            img = arr[i]
            parts.append(np.moveaxis(img, -1, 0) if img.ndim == 3 else img[None])
        return np.concatenate(parts, 0) if len(parts) > 1 else parts[0]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict:
        raw = self._raw(j)
        if raw.shape[1:] != self.in_shape:
            raise ImageReadError(f"image {self.items[j]['subject']} is {raw.shape[1:]}, not {self.in_shape} "
                                 "like the others; re-fetch")
        x = torch.from_numpy(np.ascontiguousarray(raw)).float()
        x = x / self._fixed if self._fixed else _scale_np(x, self.pre)
        flat = x.reshape(x.shape[0], -1)
        valid = self._map >= 0
        out = torch.zeros((x.shape[0], int(valid.numel())), dtype=torch.float32)
        out[:, valid] = flat[:, self._map[valid]]
        d = {"image": out.reshape(x.shape[0], *self.out_shape), "subject": str(self.items[j]["subject"])}
        if self.has_label:
            d["label"] = self.labels[j]
        return d

    @property
    def subjects(self) -> list[str]:
        return [str(it["subject"]) for it in self.items]

    @property
    def stats(self) -> dict:
        return dataset_intensity_stats(self.items, self.dataset_dir, self.pre)


def _scale_np(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    lo = torch.quantile(x.reshape(x.shape[0], -1), pre.percentiles[0] / 100, dim=1).reshape(-1, 1, 1)
    hi = torch.quantile(x.reshape(x.shape[0], -1), pre.percentiles[1] / 100, dim=1).reshape(-1, 1, 1)
    y = (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return y.clamp(0, 1) if pre.clip else y


def _pad_crop_map(in_shape: tuple[int, ...], pre: Preprocess) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flat source index per output pixel (-1 = padding), from MONAI's own pad/crop on an index grid."""
    grid = torch.arange(1, int(np.prod(in_shape)) + 1, dtype=torch.float64).reshape(1, *in_shape)
    how, arg = _pad_crop(pre, len(in_shape), False)
    d = {"image": grid}
    t = ResizeWithPadOrCropd("image", spatial_size=arg) if how == "shape" else DivisiblePadd("image", k=arg)
    out = torch.as_tensor(t(d)["image"])[0]
    return (out.round().long() - 1).reshape(-1), tuple(out.shape)


class _CacheDataset(CacheDataset):
    """MONAI's CacheDataset, advancing a progress task for each item it caches."""

    def __init__(self, data: list, transform: Any, num_workers: int, task: Any) -> None:
        self._task = task
        super().__init__(data, transform, num_workers=max(1, num_workers), progress=False, copy_cache=False)
        self._task = None  # filled; keep the dataset picklable for spawned DataLoader workers

    def _load_cache_item(self, idx: int):
        item = super()._load_cache_item(idx)
        if self._task is not None:
            with _ADV_LOCK:
                self._task.advance()
        return item


_ADV_LOCK = threading.Lock()


class _NullTask:
    def advance(self, n: float = 1) -> None:
        pass


class _progress_task:
    """``with _progress_task(progress, desc, total) as t`` -> a progress task, or a no-op one."""

    def __init__(self, progress: Any, desc: str, total: int) -> None:
        self.progress, self.desc, self.total, self._cm = progress, desc, total, None

    def __enter__(self):
        if self.progress is None or not hasattr(self.progress, "task"):
            return _NullTask()
        self._cm = self.progress.task(self.desc, total=self.total)
        return self._cm.__enter__()

    def __exit__(self, *exc):
        if self._cm is not None:
            return self._cm.__exit__(*exc)
        return False


_LOHI_MEMO: dict[str, tuple[list, list]] = {}


def _memo_key(d: dict) -> str:
    return json.dumps([d["image"], d["_pre"], d["_stamp"]], sort_keys=True, default=str)


def make_dataset(rows: list[dict], dataset_dir: Path, pre: Preprocess, *, cache: str = "memory",
                 cache_dir: Path | None = None, num_workers: int = 0, progress: Any = None) -> torch.utils.data.Dataset:
    """A dataset of preprocessed items (see :class:`VolumeDataset`).

    ``cache``: "memory" (MONAI CacheDataset, filled now), "disk" (MONAI PersistentDataset under
    ``cache_dir``, filled now; keyed by file, file stamp and preprocessing) or "none" (load per access).
    ``num_workers`` threads fill the cache; ``progress`` (a :class:`mrivq.progress.Progress`) shows it.
    ``rows`` are manifest rows or :func:`select_rows` items. Errors name the file (ImageReadError /
    MrivqError one-liners). With the memory cache, items share the cached tensors: don't modify
    them in place.
    """
    pre.validate()
    dataset_dir = Path(dataset_dir)
    if cache not in ("memory", "disk", "none"):
        raise MrivqError(f"cache must be memory, disk or none, not {cache!r}")
    items = select_rows(rows, pre.modalities) if rows else []
    has_label = any(_label(it) >= 0 for it in items)
    kinds = {_item_kind(it) for it in items}
    if len(kinds) > 1:
        raise MrivqError(f"the selected rows mix {', '.join(sorted(kinds))} images; select one kind")
    kind = kinds.pop() if kinds else "volume"
    if kind == "array":
        if pre.dims != 2:
            raise MrivqError("this dataset holds 2D images; use dims=2 (a 2D preset)")
        return ArrayDataset(items, dataset_dir, pre, has_label, progress)
    if kind == "image2d" and pre.dims != 2:
        raise MrivqError("this dataset holds 2D images; use dims=2 (a 2D preset)")
    volumetric = kind == "volume"
    transform = build_transforms(pre, volumetric=volumetric, for_dataset=True, base=None)
    data = _data_items(items, dataset_dir, pre, has_label)
    slices = pre.slices_per_volume if (volumetric and pre.dims == 2) else 1
    lohi: list | None = None
    desc = f"preprocessing {dataset_dir.name}"
    if cache == "memory":
        with _progress_task(progress, desc, len(data)) as task:
            base = _run(_CacheDataset, data, transform, num_workers, task)
        lohi = [(c["lo"], c["hi"]) for c in base._cache]
    elif cache == "disk":
        if cache_dir is None:
            raise MrivqError("cache='disk' needs a cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kw = {"weights_only": True} if "weights_only" in inspect.signature(PersistentDataset).parameters else {}
        base = PersistentDataset(data, transform, cache_dir=Path(cache_dir), **kw)
        with _progress_task(progress, desc, len(data)) as task:
            def warm(i: int):
                c = _run(base._cachecheck, base.data[i])
                with _ADV_LOCK:
                    task.advance()
                return c["lo"], c["hi"]

            with ThreadPool(max(1, num_workers)) as pool:
                lohi = list(pool.imap(warm, range(len(data))))
    else:
        base = Dataset(data, transform)
    if lohi:
        for d, lh in zip(data, lohi, strict=True):
            _LOHI_MEMO[_memo_key(d)] = ([float(v) for v in lh[0]], [float(v) for v in lh[1]])
    return VolumeDataset(base, items, pre, dataset_dir, slices=slices, has_label=has_label, lohi=lohi)


# ----------------------------------------------------------------------------------------------------
# intensity statistics
# ----------------------------------------------------------------------------------------------------


def _stats_of(lohi: list, pre: Preprocess) -> dict:
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
    if _item_kind(items[0]) == "array":
        arr = read_array_file(_abs(items[0]["sources"][0]["path"], dataset_dir))
        c = sum((arr.shape[-1] if arr.ndim == 4 else 1) for _ in items[0]["sources"])
        if arr.dtype == np.uint8:
            return {"lo": [0.0] * c, "hi": [255.0] * c, "n": len(items), "percentiles": list(pre.percentiles)}
    pick = sorted({int(round(v)) for v in np.linspace(0, len(items) - 1, min(n, len(items)))})
    chosen = [items[i] for i in pick]
    data = _data_items(chosen, dataset_dir, pre, False)
    volumetric = _item_kind(items[0]) == "volume"
    lohi = []
    todo = []
    for d in data:
        key = _memo_key(d)
        if key in _LOHI_MEMO:
            lohi.append(_LOHI_MEMO[key])
        else:
            todo.append(d)
    if todo:
        full = build_transforms(pre, volumetric=volumetric, for_dataset=False).transforms
        ts = [t for t in full if not isinstance(t, (DivisiblePadd, ResizeWithPadOrCropd))]
        t = Compose(ts)
        for d in todo:
            out = _run(t, copy.deepcopy(d))
            lohi.append((out["lo"], out["hi"]))
            _LOHI_MEMO[_memo_key(d)] = (out["lo"], out["hi"])
    return _stats_of(lohi, pre)


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
    """RAS affine for generated images: diag(spacing) with the grid centred at 0 mm."""
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
    aff = np.diag(sp[:3] + [1.0])
    aff[:3, 3] = -(np.asarray(shape[:3], dtype=np.float64) - 1) / 2 * np.asarray(sp[:3])
    return aff


# ----------------------------------------------------------------------------------------------------
# single files and the way back
# ----------------------------------------------------------------------------------------------------


def _abs(p: str | Path, base: Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else Path(base) / p


def _to_json(obj: Any) -> Any:
    """Applied operations -> JSON-able (tensors/arrays/tuples tagged; transform ids dropped)."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.detach().cpu().tolist(), "dtype": str(obj.dtype).replace("torch.", "")}
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": obj.dtype.name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        out = {str(k): _to_json(v) for k, v in obj.items()}
        if TraceKeys.CLASS_NAME in obj and TraceKeys.ID in obj:
            out[TraceKeys.ID] = TraceKeys.NONE  # another process/instance will invert it
        return out
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return {"__torch_dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, np.dtype):
        return obj.name
    return str(obj)


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        if "__array__" in obj:
            return np.asarray(obj["__array__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        if "__torch_dtype__" in obj:
            return getattr(torch, obj["__torch_dtype__"])
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def preprocess_file(path: Path | str | Sequence[Path | str], pre: Preprocess) -> tuple[torch.Tensor, dict]:
    """One input (NIfTI/Analyze file, DICOM series folder, PNG/JPEG for dims=2; a list of files, one
    per modality, for multi-contrast models) -> (tensor [C, *spatial], ctx).

    ``ctx`` is a JSON-able dict with what :func:`restore` needs: the input's shape, affine, dtype, the
    per-channel intensity lo/hi and MONAI's applied operations. With ``pre.dims == 2`` and a volume
    the tensor is the whole volume [C, X, Y, Z] (in-plane padded); :func:`volume_to_slices` turns it
    into a batch of slices for the model and :func:`slices_to_volume` back.
    """
    pre.validate()
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    if not paths:
        raise MrivqError("no input file given")
    for p in paths:
        if not p.exists():
            raise ImageReadError(f"{p} does not exist; check the path")
    image2d = _is_image2d(paths[0])
    if image2d and pre.dims != 2:
        raise MrivqError(f"{paths[0]} is a 2D image but the model is 3D; give a NIfTI volume or DICOM folder")
    t = build_transforms(pre, volumetric=not image2d, for_dataset=False)
    d = _run(t, {"image": [{"path": str(p)} for p in paths], "subject": paths[0].name})
    img = d["image"]
    n_ch, want = int(img.shape[0]), pre.channels
    if not image2d and want > 1 and n_ch != want:
        raise MrivqError(f"{', '.join(map(str, paths))}: {n_ch} channel(s), but the model takes {want} "
                         f"({', '.join(pre.modalities)}); pass one file per modality in that order")
    x = img.as_tensor().float().contiguous() if isinstance(img, MetaTensor) else torch.as_tensor(img).float()
    ctx = {
        "version": CTX_VERSION,
        "path": [str(p) for p in paths],
        "kind": "image2d" if image2d else "volume",
        "pre": pre.to_dict(),
        "shape": d["orig_shape"],
        "channels": n_ch,
        "channels_last": bool(d["channels_last"] or len(paths) > 1),
        "affine": d["orig_affine"],
        "dtype": _input_dtype(paths[0]),
        "lo": [float(v) for v in d["lo"]],
        "hi": [float(v) for v in d["hi"]],
        "fixed_range": d.get("fixed_range"),
        "preprocessed_shape": [int(s) for s in x.shape[1:]],
        "preprocessed_affine": np.asarray(img.affine, dtype=np.float64).tolist(),
        "ops": _to_json(list(img.applied_operations)),
    }
    if not image2d and pre.dims == 2:
        ctx["slice_axis"] = pre.slice_axis
    return x, ctx


def volume_to_slices(x: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """[C, X, Y, Z] -> [S, C, H, W] along spatial ``slice_axis`` (a batch for a 2D model)."""
    return x.movedim(1 + slice_axis, 0).contiguous()


def slices_to_volume(y: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """[S, C, H, W] -> [C, X, Y, Z], inverse of :func:`volume_to_slices`."""
    return y.movedim(0, 1 + slice_axis).contiguous()


def restore(x: torch.Tensor | np.ndarray, ctx: dict | str, *, intensity: bool = True,
            method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Model output [C, *spatial] on the preprocessed grid -> (array, affine) in the input's own
    shape, affine and intensity units (crop/pad, resampling, orientation and scaling undone).

    The array is float32, spatial axes first, channels last when there are several (multi-contrast
    or 4D inputs); :func:`to_input_dtype` casts it like the input. ``intensity=False`` maps the
    geometry only (for maps that are not images, e.g. per-voxel NLL; any channel count then).
    ``method``: "monai" replays MONAI's inverse of the recorded operations, "resample" maps the grid
    through the affines in one resampling, "auto" tries the first and falls back to the second.
    """
    if isinstance(ctx, str):
        ctx = json.loads(ctx)
    if not isinstance(ctx, dict) or "preprocessed_shape" not in ctx:
        raise MrivqError("restore needs the ctx returned by preprocess_file")
    x = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)).float()
    pshape = [int(s) for s in ctx["preprocessed_shape"]]
    if list(x.shape) == pshape:
        x = x[None]
    if list(x.shape[1:]) != pshape:
        raise MrivqError(f"restore got an image of shape {list(x.shape)}; expected [C, {', '.join(map(str, pshape))}]")
    if intensity and x.shape[0] != len(ctx["lo"]):
        raise MrivqError(f"restore got {x.shape[0]} channel(s) for an input with {len(ctx['lo'])}")
    if method not in ("auto", "monai", "resample"):
        raise MrivqError(f"restore method must be auto, monai or resample, not {method!r}")
    if not intensity:  # identity intensity mapping with the output's channel count
        ctx = {**ctx, "lo": [0.0] * x.shape[0], "hi": [1.0] * x.shape[0],
               "ops": _with_identity_scaling(ctx["ops"], x.shape[0])}
    out = None
    if method in ("auto", "monai"):
        try:
            out = _restore_monai(x, ctx)
        except Exception as e:
            if method == "monai":
                raise
            warnings.warn(f"MONAI's inverse could not replay the recorded operations ({type(e).__name__}: {e}); "
                          "restoring by resampling through the affines instead", stacklevel=2)
    if out is None:
        out = _restore_resample(x, ctx)
    arr = out.numpy().astype(np.float32)
    if list(arr.shape[1:]) != list(ctx["shape"]):  # never hand back a wrong grid silently
        raise MrivqError(f"restored shape {list(arr.shape[1:])} differs from the input's {ctx['shape']}")
    arr = np.moveaxis(arr, 0, -1) if arr.shape[0] > 1 else arr[0]
    return np.ascontiguousarray(arr), np.asarray(ctx["affine"], dtype=np.float64)


def _with_identity_scaling(ops: list, channels: int) -> list:
    ops = copy.deepcopy(ops)
    for op in ops:
        if isinstance(op, dict) and op.get("class") == "ScalePercentilesd":
            op["extra_info"] = {**op.get("extra_info", {}), "lo": [0.0] * channels, "hi": [1.0] * channels}
    return ops


def _restore_monai(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    pre = Preprocess.from_dict(ctx["pre"])
    t = build_transforms(pre, volumetric=ctx["kind"] == "volume", for_dataset=False)
    mt = MetaTensor(x, affine=torch.tensor(ctx["preprocessed_affine"], dtype=torch.float64),
                         applied_operations=_from_json(ctx["ops"]))
    out = t.inverse({"image": mt})["image"]
    if out.applied_operations:
        raise RuntimeError("operations left after the inverse")
    return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out).float()


def _restore_resample(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """One bilinear resampling from the preprocessed grid onto the original one, then intensity."""
    shape = list(ctx["shape"])
    if ctx["kind"] == "volume":
        mt = MetaTensor(x, affine=torch.tensor(ctx["preprocessed_affine"], dtype=torch.float64))
        res = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
            mt, dst_affine=torch.tensor(ctx["affine"], dtype=torch.float64), spatial_size=tuple(shape))
        y = torch.as_tensor(res.as_tensor() if hasattr(res, "as_tensor") else res).float()
    else:  # 2D images: only a centred pad/crop happened; invert it with the forward index map
        pre = Preprocess.from_dict(ctx["pre"])
        mapping, _ = _pad_crop_map(tuple(shape), pre)
        flat = x.reshape(x.shape[0], -1)
        y = torch.zeros((x.shape[0], int(np.prod(shape))))
        valid = mapping >= 0
        y[:, mapping[valid]] = flat[:, valid]
        y = y.reshape(x.shape[0], *shape)
    view = (-1,) + (1,) * (y.ndim - 1)
    lo = torch.tensor(ctx["lo"]).reshape(view)
    hi = torch.tensor(ctx["hi"]).reshape(view)
    return y * (hi - lo) + lo


def to_input_dtype(arr: np.ndarray, ctx: dict) -> np.ndarray:
    """Cast a restored array to the input's stored dtype (rounded and clipped for integers)."""
    dt = np.dtype(ctx.get("dtype") or "float32")
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.rint(arr), info.min, info.max).astype(dt)
    return arr.astype(dt)
