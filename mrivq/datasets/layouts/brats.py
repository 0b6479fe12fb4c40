"""BraTS: ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}.nii.gz`` case folders.

One row per case and modality (``t1``, ``t1ce``, ``t2``, ``flair``); ``label`` = the case's ``seg``
file. BraTS 2023 names (``BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``) map to the same
modalities. Subject = the case id (``BraTS2021_00000``) unless ``options.case_pattern`` (a regex with
a named group ``subject``, matched against the case id) says otherwise. ``options.modality_suffixes``
/ ``alt_modality_suffixes`` (``{modality: file suffix}``) and ``label_suffix`` override the suffixes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mrivq.io.files import finish_rows, iter_files, relposix
from mrivq.utils.errors import CardError

COLUMNS = ("label",)
_SUFFIXES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
_ALT = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
_FILE = re.compile(r"^(?P<case>BraTS.+?)[_-](?P<suffix>[A-Za-z0-9]+)\.nii(?:\.gz)?$", re.IGNORECASE)


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    opts = getattr(card, "options", None) or {}
    suffix_to_mod: dict[str, str] = {}
    for table in (opts.get("alt_modality_suffixes") or _ALT, opts.get("modality_suffixes") or _SUFFIXES):
        suffix_to_mod.update({str(s).lower(): str(m).lower() for m, s in table.items()})
    label_suffix = str(opts.get("label_suffix") or "seg").lower()
    case_re = None
    if opts.get("case_pattern"):
        try:
            case_re = re.compile(str(opts["case_pattern"]))
        except re.error as e:
            raise CardError(f"card {getattr(card, 'name', '?')}: option 'case_pattern' is not a valid regular "
                            f"expression ({e})") from None
    rows: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    for p in iter_files(dataset_dir):
        m = _FILE.match(p.name)
        if not m:
            continue
        case, suffix = m.group("case"), m.group("suffix").lower()
        rel = relposix(p, dataset_dir)
        if suffix == label_suffix:
            labels.setdefault(case, rel)
        elif suffix in suffix_to_mod:
            rows.append({"case": case, "modality": suffix_to_mod[suffix], "path": rel})
    for r in rows:
        case = r.pop("case")
        cm = case_re.match(case) if case_re else None
        r["subject"] = cm.group("subject") if cm and cm.groupdict().get("subject") else case
        r["label"] = labels.get(case, "")
    return finish_rows(rows, card, COLUMNS)
