"""OASIS-1 cross-sectional discs: ``discN/OAS1_XXXX_MR1/...`` with Analyze 7.5 ``.img``/``.hdr`` pairs.

One row per session folder (``OAS1_0001_MR1``), modality ``t1``: by default the atlas-registered,
gain-field corrected, brain-masked average
``PROCESSED/MPRAGE/T88_111/OAS1_XXXX_MR1_mpr_n4_anon_111_t88_masked_gfc.img``. Subject =
``OAS1_XXXX`` (the reliability re-scans ``_MR2`` share it; column ``session``), ``label`` = the FSL
tissue segmentation when present, ``sex``/``age`` from the demographics CSV
(``oasis_cross-sectional.csv``: ``ID``, ``M/F``, ``Age``) when present. Options:

- ``session_pattern``: regex for session folder names; a named group ``subject`` names the subject.
- ``variants`` (name -> glob, the file-name part is matched) + ``variant`` / ``default_variant``:
  which image to use (``raw``, ``t88``, ``t88_masked``).
- ``segmentation``: glob of the label file; ``demographics``: ``file``, ``id_column``,
  ``sex_column``, ``age_column``.
"""

from __future__ import annotations

import csv
import fnmatch
import re
from pathlib import Path, PurePosixPath
from typing import Any

from mrivq.io.files import finish_rows, iter_files, relposix
from mrivq.utils.errors import CardError, MrivqError

COLUMNS = ("session", "label", "sex", "age")
_SESSION = r"^(?P<subject>OAS1_\d{4})_MR(?P<session>\d+)$"
_VARIANTS = {
    "raw": "OAS1_*_MR*_mpr-1_anon.img",
    "t88": "OAS1_*_MR*_mpr_n*_anon_111_t88_gfc.img",
    "t88_masked": "OAS1_*_MR*_mpr_n*_anon_111_t88_masked_gfc.img",
}
_SEGMENTATION = "OAS1_*_MR*_mpr_n*_anon_111_t88_masked_gfc_fseg.img"


def read_demographics(path: Path, id_col: str = "ID", sex_col: str = "M/F",
                      age_col: str = "Age") -> dict[str, dict[str, str]]:
    """``{session id: {"sex": "M"|"F"|"", "age": "74"|""}}`` from the OASIS CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            if id_col not in fields:
                raise MrivqError(f"{path}: has no {id_col!r} column; is this the OASIS demographics CSV?")
            out = {}
            for r in reader:
                ident = (r.get(id_col) or "").strip()
                if not ident:
                    continue
                sex = (r.get(sex_col) or "").strip().upper()[:1]
                age = (r.get(age_col) or "").strip()
                out[ident] = {"sex": sex if sex in ("M", "F") else "", "age": age}
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MrivqError(f"{path}: cannot be read ({' '.join(str(e).split())}); fetch it again") from None


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    opts = getattr(card, "options", None) or {}
    name = getattr(card, "name", "?")
    try:
        session_re = re.compile(str(opts.get("session_pattern") or _SESSION))
    except re.error as e:
        raise CardError(f"card {name}: option 'session_pattern' is not a valid regular expression ({e})") from None
    variants = {**_VARIANTS, **(opts.get("variants") or {})}
    variant = opts.get("variant") or opts.get("default_variant") or "t88_masked"
    if variant not in variants:
        raise CardError(f"card {name}: option 'variant' {variant!r} is not one of {', '.join(variants)}")
    img_glob = PurePosixPath(str(variants[variant])).name
    seg_glob = PurePosixPath(str(opts.get("segmentation") or _SEGMENTATION)).name
    demo_opts = opts.get("demographics") or {}
    demo_name = str(demo_opts.get("file") or "oasis_cross-sectional.csv")

    images: dict[str, Path] = {}  # session folder name -> image
    segs: dict[str, Path] = {}
    sessions: dict[str, re.Match] = {}
    demo_files: list[Path] = []
    for p in iter_files(dataset_dir):
        if p.name.lower() == demo_name.lower():
            demo_files.append(p)
            continue
        is_img = fnmatch.fnmatch(p.name, img_glob)
        is_seg = fnmatch.fnmatch(p.name, seg_glob)
        if not (is_img or is_seg):
            continue
        rel = PurePosixPath(relposix(p, dataset_dir))
        for folder in reversed(rel.parent.parts):
            m = session_re.match(folder)
            if m:
                sessions[folder] = m
                (segs if is_seg and not is_img else images).setdefault(folder, p)
                break
    demo: dict[str, dict[str, str]] = {}
    for f in demo_files:
        demo.update(read_demographics(f, str(demo_opts.get("id_column") or "ID"),
                                      str(demo_opts.get("sex_column") or "M/F"),
                                      str(demo_opts.get("age_column") or "Age")))
    rows = []
    for folder, p in images.items():
        m = sessions[folder]
        gd = m.groupdict()
        subject = gd.get("subject") or folder
        session = f"MR{gd['session']}" if gd.get("session") else folder
        d = demo.get(folder, {})
        rows.append({"subject": subject, "modality": "t1", "path": relposix(p, dataset_dir), "session": session,
                     "label": relposix(segs[folder], dataset_dir) if folder in segs else "",
                     "sex": d.get("sex", ""), "age": d.get("age", "")})
    return finish_rows(rows, card, COLUMNS, sort_by=("subject", "session", "modality", "path"))
