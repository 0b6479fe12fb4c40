"""The training data of a run: manifest rows -> the run's subject split -> cached MONAI datasets, and
step batches of them.

A run records its split (``run.json`` ``split``: the training and validation subjects) when it is
created; later calls pass it back, so that fetching more subjects never moves a subject from training
to validation in an existing run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mrivq.config.defaults import train_settings
from mrivq.data.covariates import fit_covariates, standardise, subject_covariates
from mrivq.data.datasets import make_dataset
from mrivq.data.intensity import dataset_intensity_stats
from mrivq.data.manifest import condition_items, load_manifest, pool_rows, select_rows, split_subjects
from mrivq.data.preprocess import Preprocess
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress


class LazyDataset(torch.utils.data.Dataset):
    """A dataset built (its cache filled) on first use: ``--stage prior`` with a valid code cache, or
    ``eval`` of the validation half, never preprocess the part they do not read."""

    def __init__(self, build: Any) -> None:
        self._build, self._ds = build, None

    @property
    def dataset(self) -> Any:
        if self._ds is None:
            self._ds, self._build = self._build(), None  # picklable once built (DataLoader workers)
        return self._ds

    @property
    def built(self) -> bool:
        return self._ds is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]


@dataclass
class Split:
    train: Any  # torch Dataset of {"image", "subject", ["label"]} (a LazyDataset)
    val: Any
    pre: Preprocess
    _stats: Any  # a callable until first read, then the dict (see ``stats``)
    classes: dict | None = None  # {"column": "site", "names": [...]}: class id i means names[i]
    covariates: dict | None = None  # {"columns", "mean", "std", "missing"} (data.covariates)
    covariate_values: dict | None = None  # subject -> z-scores, one per column
    subjects: dict | None = None  # {"train": [...], "val": [...]} in item order: what run.json records

    @property
    def stats(self) -> dict:
        """The training subjects' intensity ranges (read from up to 16 subjects on first use)."""
        if callable(self._stats):
            self._stats = self._stats()
        return self._stats


def load_split(cfg: dict, data_dir: Path, progress: Progress | None = None,
               subjects: dict | None = None) -> Split:
    """Manifest -> rows of the chosen modalities -> seeded subject split -> cached datasets, each built
    (preprocessed into its cache) when first used.

    ``subjects`` (a run's recorded split, :attr:`Split.subjects`) fixes which subjects are training and
    validation, in that order: subjects fetched later stay out, and a recorded subject that the
    manifest lost is an error, not a silently smaller set."""
    pre = Preprocess.from_dict(cfg["data"])
    levels = len(cfg.get("model", {}).get("channels") or ())
    if levels:  # pad to the model's downsampling factor even when a --set changed the levels
        pre.divisible_by = math.lcm(int(pre.divisible_by), 2 ** levels)
    pre.validate()
    if pre.register and pre.template == "auto":  # the run records the template it used
        from mrivq.data.align import resolve_template

        pre.template = resolve_template("auto", Path(data_dir) / "manifest.csv")
    tcfg = train_settings(cfg)
    rows = load_manifest(data_dir)
    rows = pool_rows(rows, pre.modalities) if pre.pool_modalities else select_rows(rows, pre.modalities)
    classes = None
    column = cfg["data"].get("condition_on")
    if column:
        if column == "modality" and not pre.pool_modalities and len(pre.modalities) > 1:
            raise MrivqError("data.condition_on=modality needs data.pool_modalities=true (each modality its "
                             "own image); add --set data.pool_modalities=true")
        rows, names = condition_items(rows, str(column), order=pre.modalities if column == "modality" else None)
        classes = {"column": str(column), "names": names}
    if cfg["data"].get("max_subjects"):
        keep = sorted({r["subject"] for r in rows})[: int(cfg["data"]["max_subjects"])]
        rows = [r for r in rows if r["subject"] in set(keep)]
    if subjects:
        tr_rows, va_rows = (_recorded(rows, subjects[k], k, data_dir) for k in ("train", "val"))
    else:
        tr_rows, va_rows = split_subjects(rows, tcfg["val_fraction"], tcfg["seed"])
        if cfg["data"].get("max_val_subjects"):
            keep = sorted({r["subject"] for r in va_rows})[: int(cfg["data"]["max_val_subjects"])]
            va_rows = [r for r in va_rows if r["subject"] in set(keep)]
    if not tr_rows or not va_rows:
        raise MrivqError(f"{data_dir} has too few subjects to split into train and validation "
                         f"({len({r['subject'] for r in rows})}); fetch more (e.g. --count 8 for the phantom)")
    covariates, cov_values = _covariates(cfg["data"].get("covariates"), rows, tr_rows)
    cache = tcfg["cache"]
    cache_dir = data_dir / ".mrivq" / "cache" if cache == "disk" else None
    kw = {"cache": cache, "cache_dir": cache_dir, "progress": progress, "cache_dtype": tcfg["cache_dtype"],
          "num_workers": fill_workers(tcfg["cache_workers"])}
    train = LazyDataset(partial(make_dataset, tr_rows, data_dir, pre, **kw))
    val = LazyDataset(partial(make_dataset, va_rows, data_dir, pre, **kw))

    def stats() -> dict:
        out = dataset_intensity_stats(tr_rows, data_dir, pre)
        if pre.pool_modalities:  # each modality's own range, so synthesized T2s come out in T2 units
            by_mod: dict[str, list] = {}
            for r in tr_rows:
                by_mod.setdefault(r["modality"], []).append(r)
            out["by_modality"] = {m: dataset_intensity_stats(rs, data_dir, pre) for m, rs in by_mod.items()}
        return out

    recorded = {k: list(dict.fromkeys(r["subject"] for r in rs)) for k, rs in (("train", tr_rows), ("val", va_rows))}
    return Split(train, val, pre, stats, classes, covariates, cov_values, recorded)


def fill_workers(value: Any) -> int:
    """``train.cache_workers``: threads that preprocess into the cache (``auto``: every core)."""
    import os

    if value in (None, "auto"):
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MrivqError(f"train.cache_workers={value!r} must be auto or a number of threads >= 1")
    return value


def _recorded(rows: list[dict], names: list[str], which: str, data_dir: Path) -> list[dict]:
    """The rows of the recorded subjects ``names``, in their recorded order."""
    by_subject: dict[str, list[dict]] = {}
    for r in rows:
        by_subject.setdefault(r["subject"], []).append(r)
    missing = [s for s in names if s not in by_subject]
    if missing:
        raise MrivqError(f"{data_dir}/manifest.csv no longer lists {len(missing)} of the run's {which} subjects "
                         f"(e.g. {missing[0]}); restore the dataset, or train a new run")
    return [r for s in names for r in by_subject[s]]


def _covariates(columns: Any, rows: list[dict], tr_rows: list[dict]) -> tuple[dict | None, dict | None]:
    """``data.covariates`` -> (standardisation fitted on the training subjects, subject -> z-scores)."""
    if not columns:
        return None, None
    columns = [columns] if isinstance(columns, str) else list(columns)
    raw = subject_covariates(rows, columns)
    train_subjects = {r["subject"] for r in tr_rows}
    spec = fit_covariates({s: v for s, v in raw.items() if s in train_subjects}, columns)
    return spec, {s: standardise(spec, v) for s, v in raw.items()}


def collate(ds: Any, idx: list[int], device: torch.device) -> dict:
    return to_device(collate_items([ds[i] for i in idx]), device)


def collate_items(items: list[dict]) -> dict:
    """Dataset items -> one batch on the CPU: ``image`` float32 ``[B, C, *spatial]``, ``label``, ``subject``."""
    out = {"image": torch.stack([torch.as_tensor(it["image"]).float() for it in items])}
    if "label" in items[0]:
        out["label"] = torch.tensor([int(it["label"]) for it in items])
    out["subject"] = [str(it.get("subject", "")) for it in items]
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Steps(torch.utils.data.Sampler):
    """The index lists of steps ``start, start + 1, ...``: this rank's share of each step's batch."""

    def __init__(self, start: int, total: int, n: int, batch_size: int, seed: int) -> None:
        self.start, self.total, self.n, self.bs, self.seed = start, total, n, batch_size, seed

    def __iter__(self):
        from mrivq.utils import distributed as ddp

        for step in range(self.start, self.total):
            yield ddp.shard(batch_indices(step, self.n, self.bs, self.seed, ddp.world()))

    def __len__(self) -> int:
        return self.total - self.start


class StepBatches:
    """Training batches by step from a ``torch.utils.data.DataLoader`` with ``workers`` processes and
    pinned memory on GPUs, so the GPU does not wait on one Python thread. Which items make up step ``s``
    stays a pure function of ``s`` (:func:`batch_indices`), so ``--resume`` is exact: a
    loader is (re)started at the step asked for, and workers only prefetch what comes next."""

    def __init__(self, ds: Any, batch_size: int, seed: int, total: int, device: torch.device,
                 workers: int = 0) -> None:
        self.ds, self.bs, self.seed, self.total, self.device = ds, batch_size, seed, total, device
        self.workers = int(workers)
        self._it: Any = None
        self._next = -1

    def get(self, step: int) -> dict:
        if self._it is None or step != self._next:
            loader = torch.utils.data.DataLoader(
                self.ds, batch_sampler=_Steps(step, self.total, len(self.ds), self.bs, self.seed),
                num_workers=self.workers, collate_fn=collate_items, pin_memory=self.device.type == "cuda",
                persistent_workers=False, prefetch_factor=2 if self.workers else None,
                # its own generator: a loader started at the resumed step must not draw from the global
                # RNG, which the codebook's restarts use (the worker seeds do not matter: no randomness)
                generator=torch.Generator().manual_seed(self.seed))
            self._it = iter(loader)
        self._next = step + 1
        return to_device(next(self._it), self.device)


def iterate(ds: Any, batch_size: int, device: torch.device):
    for s in range(0, len(ds), batch_size):
        yield collate(ds, list(range(s, min(len(ds), s + batch_size))), device)


def global_batch(batch_size: int, n: int, world: int = 1) -> int:
    """The batch a step takes over all processes: ``batch_size``, capped at the ``n`` training items and
    then rounded down to a multiple of the ``world`` processes (each takes an equal share). Refuses a
    ``batch_size`` that does not split over the processes, and a set smaller than their number."""
    if world > 1 and batch_size % world:
        raise MrivqError(f"the batch of {batch_size} does not split over {world} processes; set "
                         f"train.batch_size (and prior.train.batch_size) to a multiple of {world}")
    bs = min(batch_size, n)
    bs -= bs % world
    if bs < 1:
        raise MrivqError(f"the training set holds {n} item(s), fewer than the {world} processes that share "
                         "each batch; use more data or fewer processes (--nproc_per_node)")
    return bs


def batch_indices(step: int, n: int, batch_size: int, seed: int, world: int = 1) -> list[int]:
    """Indices of the training items in batch ``step``: a seeded permutation per epoch (the global batch
    of :func:`global_batch`, which ``world`` processes then share)."""
    bs = global_batch(batch_size, n, world)
    per_epoch = max(1, n // bs)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * bs:(k + 1) * bs].tolist()
