"""Synthetic phantom heads written by :func:`mrivq.datasets.phantom.write_dataset`.

Layout: ``sub-XXXX/sub-XXXX_<mod>.nii.gz`` per modality, ``sub-XXXX/sub-XXXX_labels.nii.gz`` (or
``sub-XXXX_<mod>_labels.nii.gz``) with the tissue label map, and ``phantom.json`` with the generation
settings and each subject's covariates. Label files are not rows; each row's ``label`` column points
at its subject's label map. ``sex`` and ``age`` come from ``phantom.json`` (a ``subjects`` mapping or
list) or from per-subject sidecars (``sub-XXXX.json`` / ``sub-XXXX_<mod>.json``) when present.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mrivq.io.files import finish_rows, iter_files, relposix
from mrivq.utils.errors import MrivqError

COLUMNS = ("label", "mask", "sex", "age")
_IMAGE = re.compile(r"^(?P<subject>sub-[A-Za-z0-9]+)_(?P<rest>[A-Za-z0-9_\-]+?)\.nii(?:\.gz)?$")
_SIDECAR = re.compile(r"^(?P<subject>sub-[A-Za-z0-9]+)(?:_(?P<mod>[A-Za-z0-9]+))?\.json$")


def _covariates(obj: Any, depth: int = 0) -> dict[str, dict[str, str]]:
    """``{subject: {"sex", "age"}}`` found in a phantom.json (mapping or list form, a level deep)."""
    out: dict[str, dict[str, str]] = {}
    if depth > 3:
        return out

    def rec(d: dict) -> dict[str, str]:
        r = {}
        if d.get("sex") not in (None, ""):
            r["sex"] = str(d["sex"]).upper()[:1]
        if d.get("age") not in (None, ""):
            r["age"] = str(d["age"])
        return r

    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, str) and k.startswith("sub-") and isinstance(v, dict):
                out[k] = rec(v)
            elif isinstance(v, (dict, list)):
                for s, r in _covariates(v, depth + 1).items():
                    out.setdefault(s, r)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict):
                sid = v.get("subject", v.get("id"))
                if isinstance(sid, str) and sid.startswith("sub-"):
                    out[sid] = rec(v)
                else:
                    for s, r in _covariates(v, depth + 1).items():
                        out.setdefault(s, r)
    return out


def _load_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MrivqError(f"{p}: is not readable JSON ({' '.join(str(e).split())}); generate the phantom "
                         "again (mrivq fetch phantom --force)") from None


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    rows: list[dict[str, Any]] = []
    labels: dict[tuple[str, str], str] = {}  # (subject, modality or "") -> label path
    masks: dict[str, str] = {}  # subject -> lesion mask path
    covars: dict[str, dict[str, str]] = {}
    sidecars: dict[str, dict[str, str]] = {}
    for p in iter_files(dataset_dir):
        if p.name == "phantom.json":
            covars.update(_covariates(_load_json(p)))
            continue
        m = _SIDECAR.match(p.name)
        if m:
            data = _load_json(p)
            if isinstance(data, dict):
                got = _covariates({m.group("subject"): data}).get(m.group("subject"), {})
                for k, v in got.items():
                    sidecars.setdefault(m.group("subject"), {}).setdefault(k, v)
            continue
        m = _IMAGE.match(p.name)
        if not m:
            continue
        subject, rest = m.group("subject"), m.group("rest")
        rel = relposix(p, dataset_dir)
        if rest == "mask":  # lesion phantoms: the ground-truth lesion mask (0 healthy, 1.. the kind)
            masks[subject] = rel
            continue
        if rest == "labels" or rest.endswith("_labels"):
            labels[(subject, rest[: -len("_labels")].lower() if rest != "labels" else "")] = rel
            continue
        rows.append({"subject": subject, "modality": rest.lower(), "path": rel})
    for r in rows:
        s = r["subject"]
        r["label"] = labels.get((s, r["modality"]), labels.get((s, ""), ""))
        r["mask"] = masks.get(s, "")
        cov = {**sidecars.get(s, {}), **covars.get(s, {})}
        r["sex"], r["age"] = cov.get("sex", ""), cov.get("age", "")
    return finish_rows(rows, card, COLUMNS)
