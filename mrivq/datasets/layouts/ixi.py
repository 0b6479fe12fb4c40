"""IXI: ~600 healthy subjects from three London hospitals, T1/T2/PD/MRA/DTI as NIfTI.

Files are named ``IXI<id>-<site>-<number>-<modality>.nii.gz`` (``IXI002-Guys-0828-T1.nii.gz``); DTI
volumes carry a direction index (``IXI002-Guys-0828-DTI-00.nii.gz``, column ``volume``). Rows get
``site`` (Guys, HH, IOP) and ``ixi_id``; when ``IXI.xls`` (the demographics sheet) is in the dataset
folder, also ``sex`` (M/F) and ``age`` (years, two decimals).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mrivq.io.files import finish_rows, iter_files, relposix
from mrivq.utils.errors import MrivqError

COLUMNS = ("site", "ixi_id", "volume", "sex", "age")
_NAME = re.compile(r"^(?P<subject>IXI(?P<id>\d+)-(?P<site>[A-Za-z]+)-\d+)-(?P<mod>T1|T2|PD|MRA|DTI)"
                   r"(?:-(?P<vol>\d+))?\.nii(?:\.gz)?$", re.IGNORECASE)
_SEX = {1: "M", 2: "F"}


def parse_name(name: str) -> dict[str, str] | None:
    """``IXI002-Guys-0828-T1.nii.gz`` -> subject, site, ixi_id, modality (lower case), volume."""
    m = _NAME.match(name)
    if not m:
        return None
    vol = m.group("vol")
    return {"subject": m.group("subject"), "site": m.group("site"), "ixi_id": str(int(m.group("id"))),
            "modality": m.group("mod").lower(), "volume": str(int(vol)) if vol is not None else ""}


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def demographics_from_rows(header: list[Any], rows: list[list[Any]]) -> dict[int, dict[str, str]]:
    """``{IXI_ID: {"sex": "M"|"F"|"", "age": "35.80"|""}}`` from the sheet's header and data rows.

    Columns are found by name: ``IXI_ID``, the one starting with ``SEX_ID`` (the sheet calls it
    ``SEX_ID (1=m, 2=f)``) and ``AGE``. The sheet lists some IXI_IDs twice (one row usually without
    an age); we keep the row that has an AGE, and among equals the first one, so the result does
    not depend on which duplicate happens to come last.
    """
    names = [str(h).strip().upper() for h in header]

    def col(pred) -> int | None:
        return next((i for i, n in enumerate(names) if pred(n)), None)

    i_id = col(lambda n: n == "IXI_ID")
    i_sex = col(lambda n: n.startswith("SEX_ID") or n == "SEX")
    i_age = col(lambda n: n == "AGE")
    if i_id is None:
        raise ValueError("no IXI_ID column")
    out: dict[int, dict[str, str]] = {}
    def cell(r: list[Any], i: int | None) -> Any:
        return r[i] if i is not None and i < len(r) else None

    for r in rows:
        ident = _number(cell(r, i_id))
        if ident is None:
            continue
        sex_n = _number(cell(r, i_sex))
        age_n = _number(cell(r, i_age))
        rec = {"sex": _SEX.get(int(sex_n), "") if sex_n is not None else "",
               "age": f"{age_n:.2f}" if age_n is not None and age_n > 0 else ""}
        key = int(ident)
        prev = out.get(key)
        if prev is None or (not prev["age"] and rec["age"]):
            out[key] = rec
    return out


def read_demographics(path: Path) -> dict[int, dict[str, str]]:
    """Parse ``IXI.xls`` (legacy BIFF; read with xlrd) into :func:`demographics_from_rows` form."""
    try:
        import xlrd
    except ImportError:
        raise MrivqError(f"{path}: reading IXI.xls needs xlrd; pip install xlrd") from None
    try:
        book = xlrd.open_workbook(str(path), on_demand=True)
        sheet = book.sheet_by_index(0)
        rows = [sheet.row_values(i) for i in range(sheet.nrows)]
    except Exception as e:
        raise MrivqError(f"{path}: cannot be read as an Excel sheet ({' '.join(str(e).split())}); delete "
                         "it and fetch the dataset again") from None
    if not rows:
        raise MrivqError(f"{path}: the sheet is empty; delete it and fetch the dataset again")
    try:
        return demographics_from_rows(rows[0], rows[1:])
    except ValueError as e:
        raise MrivqError(f"{path}: {e}; is this the IXI demographics sheet?") from None


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    rows: list[dict[str, str]] = []
    sheet: Path | None = None
    for p in iter_files(dataset_dir):
        if p.name.lower() == "ixi.xls":
            sheet = sheet or p
            continue
        info = parse_name(p.name)
        if info is not None:
            rows.append({**info, "path": relposix(p, dataset_dir)})
    demo = read_demographics(sheet) if sheet is not None else {}
    for r in rows:
        d = demo.get(int(r["ixi_id"]), {})
        r["sex"], r["age"] = d.get("sex", ""), d.get("age", "")
    return finish_rows(rows, card, COLUMNS, sort_by=("subject", "modality", "volume", "path"))
