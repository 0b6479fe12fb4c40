"""The ICBM 2009 nonlinear MNI152 template zip (``mni_icbm152_nlin_sym_09a_nifti.zip``).

One "subject" (``options.subject``, default ``mni152``) with modalities ``t1``, ``t2`` and ``pd`` from
``mni_icbm152_<mod>_tal_nlin_<sym|asym>_09<a|b|c>.nii[.gz]``, and a ``mask`` column holding the
brain mask (``..._t1_tal_nlin_sym_09a_mask.nii``) when present. ``options.images``
(``{modality: file stem}``) and ``options.mask`` (a stem) name the files explicitly instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mrivq.io.files import NIFTI_SUFFIXES, finish_rows, iter_files, relposix, strip_suffix

COLUMNS = ("mask",)
_IMAGE = re.compile(r"^mni_icbm152_(?P<mod>t1|t2|pd)_tal_nlin_(?:a?sym)_09[abc]$", re.IGNORECASE)
_MASK = re.compile(r"^mni_icbm152_t1_tal_nlin_(?:a?sym)_09[abc]_mask$", re.IGNORECASE)


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    opts = getattr(card, "options", None) or {}
    by_stem = {str(v): str(k).lower() for k, v in (opts.get("images") or {}).items()}
    mask_stem = opts.get("mask")
    subject = str(opts.get("subject") or "mni152")
    rows: list[dict[str, Any]] = []
    mask = ""
    for p in iter_files(dataset_dir):
        if not p.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        stem = strip_suffix(p.name)
        if (mask_stem and stem == mask_stem) or (not mask_stem and _MASK.match(stem)):
            mask = mask or relposix(p, dataset_dir)
            continue
        if by_stem:
            mod = by_stem.get(stem)
        else:
            m = _IMAGE.match(stem)
            mod = m.group("mod").lower() if m else None
        if mod:
            rows.append({"subject": subject, "modality": mod, "path": relposix(p, dataset_dir)})
    for r in rows:
        r["mask"] = mask
    return finish_rows(rows, card, COLUMNS)
