"""Datasets of preprocessed items: :class:`VolumeDataset` (a MONAI memory/disk/plain dataset of
volumes or 2D images, sliced for 2D models on volumes), :class:`ArrayDataset` (MNIST/CIFAR arrays
kept in memory), :func:`make_dataset` which picks and fills one, and the progress helpers that show
the cache filling.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset

from mrivq.data.intensity import dataset_intensity_stats, stats_of
from mrivq.data.items import LOHI_MEMO, data_items, item_kind, item_label, memo_key
from mrivq.data.manifest import select_rows
from mrivq.data.preprocess import Preprocess
from mrivq.data.readers import read_array_file
from mrivq.data.transforms import build_transforms, pad_crop_map, run_transforms
from mrivq.utils.errors import ImageReadError, MrivqError


class _Items(torch.utils.data.Dataset):
    """What both datasets share: their items' subjects and their median intensity range."""

    items: list[dict]
    pre: Preprocess
    dataset_dir: Path
    _lohi: list | None = None  # per-item (lo, hi) already measured while caching, if any
    _stats: dict | None = None

    @property
    def subjects(self) -> list[str]:
        return [str(it["subject"]) for it in self.items]

    @property
    def stats(self) -> dict:
        if self._stats is None:
            if self._lohi:
                self._stats = stats_of(self._lohi, self.pre)
            else:
                self._stats = dataset_intensity_stats(self.items, self.dataset_dir, self.pre)
        return self._stats


class VolumeDataset(_Items):
    """Items ``{"image": FloatTensor[C, *spatial], "subject": str, ["label": int]}``.

    Wraps a MONAI dataset of per-subject items; with a 2D model on volumes each subject holds
    ``slices`` slices and index ``i`` is slice ``i % slices`` of subject ``i // slices``.
    ``stats`` gives the median intensity range of the subjects (see :func:`dataset_intensity_stats`).
    """

    def __init__(self, base: Any, items: list[dict], pre: Preprocess, dataset_dir: Path, *, slices: int = 1,
                 has_label: bool = False, lohi: list | None = None, keep: list[int] | None = None) -> None:
        self.base, self.pre, self.dataset_dir = base, pre, Path(dataset_dir)
        self.keep = list(range(len(items))) if keep is None else list(keep)  # base indices in use (data.qc=skip)
        self.items = [items[k] for k in self.keep]
        self.slices, self.has_label = int(slices), has_label
        self._lohi = [lohi[k] for k in self.keep] if lohi else lohi
        self._stats: dict | None = None

    def __len__(self) -> int:
        return len(self.keep) * self.slices

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        j, s = divmod(i, self.slices)
        d = run_transforms(self.base.__getitem__, self.keep[j])
        img = d["image"]
        if self.pre.dims == 2 and img.ndim == 4:  # [n, C, H, W] slices of a volume
            img = img[s]
        if img.dtype == torch.float16:  # a compact cache: float32 out
            img = img.float()
        out = {"image": img, "subject": d["subject"]}
        if self.has_label:
            out["label"] = int(d["label"])
        return out

class ArrayDataset(_Items):
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
        self._map, self.out_shape = pad_crop_map(self.in_shape, pre)
        self.labels = [item_label(it) for it in items] if has_label else None

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


def _scale_np(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    lo = torch.quantile(x.reshape(x.shape[0], -1), pre.percentiles[0] / 100, dim=1).reshape(-1, 1, 1)
    hi = torch.quantile(x.reshape(x.shape[0], -1), pre.percentiles[1] / 100, dim=1).reshape(-1, 1, 1)
    y = (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return y.clamp(0, 1) if pre.clip else y


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


def make_dataset(rows: list[dict], dataset_dir: Path, pre: Preprocess, *, cache: str = "memory",
                 cache_dir: Path | None = None, num_workers: int = 0, progress: Any = None,
                 cache_dtype: str = "float32") -> torch.utils.data.Dataset:
    """A dataset of preprocessed items (see :class:`VolumeDataset`).

    ``cache``: "memory" (MONAI CacheDataset, filled now), "disk" (MONAI PersistentDataset under
    ``cache_dir``, filled now; keyed by file, file stamp and preprocessing) or "none" (load per access).
    ``num_workers`` threads fill the cache; ``progress`` (a :class:`mrivq.utils.progress.Progress`) shows it.
    ``cache_dtype="float16"`` stores the cached volumes (in memory and on disk) at half the size; items
    come out as float32 (intensities are in [0, 1], where float16 keeps 3 significant digits: an error
    below 2.5e-4, far below MRI noise).
    ``rows`` are manifest rows or :func:`select_rows` items. Errors name the file (ImageReadError /
    MrivqError one-liners). With the memory cache, items share the cached tensors: don't modify
    them in place.
    """
    pre.validate()
    dataset_dir = Path(dataset_dir)
    if cache not in ("memory", "disk", "none"):
        raise MrivqError(f"cache must be memory, disk or none, not {cache!r}")
    items = select_rows(rows, pre.modalities) if rows else []
    has_label = any(item_label(it) >= 0 for it in items)
    kinds = {item_kind(it) for it in items}
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
    if cache_dtype not in ("float32", "float16"):
        raise MrivqError(f"train.cache_dtype={cache_dtype!r} is not one of float32, float16")
    transform = build_transforms(pre, volumetric=volumetric, for_dataset=True, base=None,
                                 dtype=getattr(torch, cache_dtype))
    if cache_dtype == "float16" and cache_dir is not None:
        cache_dir = Path(cache_dir) / "float16"
    data = data_items(items, dataset_dir, pre, has_label)
    slices = pre.slices_per_volume if (volumetric and pre.dims == 2) else 1
    lohi: list | None = None
    regs: list | None = None
    desc = f"{'registering and ' if pre.register else ''}preprocessing {dataset_dir.name}"
    if cache == "memory":
        with _progress_task(progress, desc, len(data)) as task:
            base = run_transforms(_CacheDataset, data, transform, num_workers, task)
        lohi = [(c["lo"], c["hi"]) for c in base._cache]
        regs = [c.get("registration") for c in base._cache]
    elif cache == "disk":
        if cache_dir is None:
            raise MrivqError("cache='disk' needs a cache_dir")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kw = {"weights_only": True} if "weights_only" in inspect.signature(PersistentDataset).parameters else {}
        base = PersistentDataset(data, transform, cache_dir=Path(cache_dir), **kw)
        with _progress_task(progress, desc, len(data)) as task:
            def warm(i: int):
                c = run_transforms(base._cachecheck, base.data[i])
                with _ADV_LOCK:
                    task.advance()
                return c["lo"], c["hi"], c.get("registration")

            with ThreadPool(max(1, num_workers)) as pool:
                got = list(pool.imap(warm, range(len(data))))
            lohi = [(a, b) for a, b, _ in got]
            regs = [r for _, _, r in got]
    else:
        base = Dataset(data, transform)
        if pre.register:  # no cache to fill, but every registration is checked (and kept) before use
            with _progress_task(progress, desc, len(data)) as task:
                def check(i: int):
                    r = run_transforms(base.__getitem__, i).get("registration")
                    with _ADV_LOCK:
                        task.advance()
                    return r

                with ThreadPool(max(1, num_workers)) as pool:
                    regs = list(pool.imap(check, range(len(data))))
    if lohi:
        for d, lh in zip(data, lohi, strict=True):
            LOHI_MEMO[memo_key(d)] = ([float(v) for v in lh[0]], [float(v) for v in lh[1]])
    keep = None
    if pre.register and regs is not None:
        failed = [(str(d["subject"]), (r or {}).get("why", "no registration")) for d, r in zip(data, regs, strict=True)
                  if not (r or {}).get("passed", False)]
        if failed and pre.qc == "stop":
            raise MrivqError(qc_message(failed))
        if failed:
            warnings.warn(qc_message(failed, pre.qc), stacklevel=2)
        if failed and pre.qc == "skip":
            bad = {s for s, _ in failed}
            keep = [k for k, d in enumerate(data) if str(d["subject"]) not in bad]
            if not keep:
                raise MrivqError(f"every subject of {dataset_dir} fails the registration check; "
                                 f"{qc_message(failed)}")
    return VolumeDataset(base, items, pre, dataset_dir, slices=slices, has_label=has_label, lohi=lohi, keep=keep)


def qc_message(failed: list[tuple[str, str]], policy: str = "stop") -> str:
    """One line naming the subjects whose registration failed the quality check, and what to do."""
    shown = ", ".join(f"{s} ({why})" for s, why in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5
                                                                    else "")
    n = len(failed)
    head = f"{n} subject{'s' if n != 1 else ''} fail{'s' if n == 1 else ''} the registration check: {shown}"
    if policy == "skip":
        return f"{head}; left out (data.qc=skip)"
    if policy == "keep":
        return f"{head}; kept as they are (data.qc=keep)"
    return (f"{head}; look at them with `mrivq preprocess`, then set data.qc=skip to leave them out or "
            "data.qc=keep to use them")
