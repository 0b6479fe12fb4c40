"""Manifest rows and their selection: reading ``manifest.csv`` (:func:`load_manifest`), grouping rows
into items that have every modality (:func:`select_rows`) or one item per modality
(:func:`pool_rows`), class ids from a manifest column (:func:`condition_items`) and the seeded
train/validation split by subject (:func:`split_subjects`).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrivq.utils.errors import MrivqError

_SPLIT_TRAIN = {"train", "training"}
_SPLIT_VAL = {"test", "val", "valid", "validation"}
_EXTRAS = ("label", "split", "site", "sex", "age", "series_uid")


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
