"""Walking folders of images: file listing in natural order and the rows every dataset layout writes."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def iter_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every file under ``root``, in sorted order, skipping hidden files and folders.

    Hidden means a name starting with ``.``: the dataset's own ``.mrivq`` bookkeeping, ``.staging-*``
    folders of an unfinished fetch, and macOS ``._*`` resource forks that some archives carry.
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f



def relposix(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, with forward slashes (manifest paths)."""
    return Path(os.path.relpath(path, root)).as_posix()



def strip_suffix(name: str) -> str:
    """File name without its image suffix: ``a.nii.gz`` -> ``a``, ``b.hdr`` -> ``b``."""
    low = name.lower()
    for s in (".nii.gz", ".hdr.gz", ".img.gz", ".nii", ".hdr", ".img", ".dcm", ".gz"):
        if low.endswith(s):
            return name[: -len(s)]
    return name



def natural_key(s: str) -> tuple:
    """Sort key that orders ``sub-2`` before ``sub-10``."""
    return tuple(int(t) if t.isdigit() else t for t in _DIGITS.split(s))



_DIGITS = re.compile(r"(\d+)")



def finish_rows(rows: list[dict[str, Any]], card: Any, columns: tuple[str, ...] = (),
                sort_by: tuple[str, ...] = ("subject", "modality", "path")) -> list[dict[str, str]]:
    """Common end of every layout's ``scan``.

    Keeps rows whose modality is one of ``card.modalities`` (all rows when the card lists none;
    compared case-insensitively), gives every row the same columns (``subject``, ``modality``,
    ``path``, then ``columns``; missing values are ``""``), turns values into text and sorts
    naturally (``sub-2`` before ``sub-10``) by ``sort_by`` then by the remaining columns.
    """
    wanted = {str(m).lower() for m in (getattr(card, "modalities", None) or ())}
    cols = ("subject", "modality", "path") + tuple(c for c in columns if c not in ("subject", "modality",
                                                                                  "path"))
    out = []
    for r in rows:
        if wanted and str(r.get("modality", "")).lower() not in wanted:
            continue
        out.append({c: "" if r.get(c) is None else str(r.get(c)) for c in cols})
    keys = tuple(sort_by) + tuple(c for c in cols if c not in sort_by)
    out.sort(key=lambda r: tuple(natural_key(r[c]) for c in keys))
    return out


def nifti_files(folder: Path) -> list[Path]:
    """NIfTI/Analyze files directly in ``folder``, in natural order."""
    ok = NIFTI_SUFFIXES + (".hdr", ".hdr.gz")
    return sorted((p for p in Path(folder).iterdir() if p.is_file() and p.name.lower().endswith(ok)),
                  key=lambda p: natural_key(p.name))
