"""DICOM trees: one manifest row per image series, wherever its files sit.

Files are grouped by SeriesInstanceUID. ``path`` is the deepest folder holding all of a series'
files and ``series_uid`` picks the series there (:func:`mrivq.io.images.load_volume` takes both).
Subject = the PatientID, else the folder's name; options may refine it. Options (all optional):

- ``series_modalities``: ``{modality: regex}`` searched (case-insensitively, in the order given) in
  the SeriesDescription (then ProtocolName); the first match names the modality and series that
  match none are left out. Without it every series gets ``options.modality``, else the card's first
  modality.
- ``skip_series``: words / regexes; series whose description matches one are left out
  (``localizer``, ``scout``, ...).
- ``subject_pattern``: regex with a named group ``subject`` matched against the enclosing folder
  names, innermost first (ADNI: ``^(?P<subject>\\d{3}_S_\\d{4})$``); used instead of the PatientID.
- ``accept_nifti``: also list NIfTI files found in the tree (one row each; subject as above).

Rows carry ``series_uid``, ``series_description`` and ``n_images``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from mrivq.io.files import NIFTI_SUFFIXES, finish_rows, iter_files, relposix, strip_suffix
from mrivq.io.images import scan_dicom_series
from mrivq.utils.errors import CardError

COLUMNS = ("series_uid", "series_description", "n_images")


def _compile(card: Any, key: str, pattern: Any) -> re.Pattern:
    try:
        return re.compile(str(pattern), re.IGNORECASE)
    except re.error as e:
        raise CardError(f"card {getattr(card, 'name', '?')}: option '{key}' has a bad regular expression "
                        f"{pattern!r} ({e})") from None


def _subject_from_folders(rel_folder: PurePosixPath, regex: re.Pattern | None) -> str | None:
    if regex is None:
        return None
    for name in reversed(rel_folder.parts):
        m = regex.search(name)
        if m and m.groupdict().get("subject"):
            return m.group("subject")
    return None


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    opts = getattr(card, "options", None) or {}
    mods = tuple(getattr(card, "modalities", None) or ())
    default_mod = str(opts.get("modality") or (mods[0] if mods else "image")).lower()
    mapping = opts.get("series_modalities") or {}
    if not isinstance(mapping, dict):
        raise CardError(f"card {getattr(card, 'name', '?')}: option 'series_modalities' must map a modality "
                        "to a regular expression")
    rules = [(str(m).lower(), _compile(card, "series_modalities", rx)) for m, rx in mapping.items()]
    skips = [_compile(card, "skip_series", s) for s in (opts.get("skip_series") or [])]
    subj_pat = opts.get("subject_pattern")
    subj_re = _compile(card, "subject_pattern", subj_pat) if subj_pat else None

    rows: list[dict[str, Any]] = []
    for uid, entry in scan_dicom_series(dataset_dir).items():
        hdr = entry["header"]
        desc = " ".join(str(getattr(hdr, "SeriesDescription", "") or "").split())
        text = f"{desc} {getattr(hdr, 'ProtocolName', '') or ''}".strip()
        if any(s.search(text) for s in skips):
            continue
        if rules:
            modality = next((m for m, rx in rules if rx.search(text)), None)
            if modality is None:
                continue
        else:
            modality = default_mod
        folder = Path(os.path.commonpath([str(f.parent) for f in entry["files"]]))
        rel = PurePosixPath(relposix(folder, dataset_dir))
        subject = (_subject_from_folders(rel, subj_re) or str(getattr(hdr, "PatientID", "") or "").strip()
                   or (folder.name if folder != dataset_dir else dataset_dir.name))
        rows.append({"subject": subject, "modality": modality, "path": rel.as_posix(), "series_uid": uid,
                     "series_description": desc, "n_images": len(entry["frames"])})
    if opts.get("accept_nifti"):
        for p in iter_files(dataset_dir):
            if not p.name.lower().endswith(NIFTI_SUFFIXES):
                continue
            rel = PurePosixPath(relposix(p, dataset_dir))
            subject = _subject_from_folders(rel.parent, subj_re) or strip_suffix(p.name)
            rows.append({"subject": subject, "modality": default_mod, "path": rel.as_posix()})
    return finish_rows(rows, card, COLUMNS)
