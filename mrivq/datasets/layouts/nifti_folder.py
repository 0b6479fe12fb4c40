"""Any folder of NIfTI files, one image per file (your own data, IXI-tiny, UK Biobank exports, ...).

By default every ``.nii``/``.nii.gz`` file under the dataset folder is an image; its subject is the
file name without suffix and its modality is ``options.modality``, else the card's first modality.
Options (all optional):

- ``images_dir`` / ``labels_dir`` (also spelled ``image_dir`` / ``label_dir``): only files in folders
  of that name (or ending in that relative path) are images; files in ``labels_dir`` are labels,
  paired with images by name once a trailing ``_image`` / ``_label`` style word (or
  ``image_suffix`` / ``label_suffix``) is dropped: ``image/IXI002-Guys-0828_image.nii.gz`` gets
  ``label/IXI002-Guys-0828_label.nii.gz`` in its ``label`` column (IXI-tiny). Without ``labels_dir``
  the ``label`` column is empty.
- ``modality_from_name``: a regular expression searched in the file name; the modality is its named
  group ``modality`` (else group 1, else the whole match), lower-cased; files that do not match are
  left out. The subject is the name with the matched text removed (``sub01_T1.nii.gz`` with
  ``_(T1|T2)`` -> subject ``sub01``, modality ``t1``) unless ``subject_pattern`` says otherwise.
- ``subject_pattern``: a regular expression with a named group ``subject``, matched against the file
  name and then each enclosing folder name, innermost first; the first match names the subject and
  its other named groups become columns (``site``, ``session``, ...). Files it matches nowhere are
  left out.
- ``image`` (+ ``alternatives``): the relative path of each subject's image inside its folder
  (``T1/T1.nii.gz``); where several are present the first in that order is used.

When two files would get the same subject and modality (nested folders of equally named files),
their subjects become their relative paths without suffix, which are unique.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

from mrivq.io.files import NIFTI_SUFFIXES, finish_rows, iter_files, relposix, strip_suffix
from mrivq.utils.errors import CardError

_ROLE_WORD = re.compile(r"[_\-.](image|images|img|label|labels|seg|segmentation|mask)$", re.IGNORECASE)


def _regex(card: Any, key: str) -> re.Pattern | None:
    pattern = (getattr(card, "options", None) or {}).get(key)
    if not pattern:
        return None
    try:
        return re.compile(str(pattern))
    except re.error as e:
        raise CardError(f"card {getattr(card, 'name', '?')}: option '{key}' is not a valid regular "
                        f"expression ({e})") from None


def _key(stem: str, suffix: str | None, folder_name: str | None) -> str:
    """Pairing key of an image or label: its stem without a trailing role word."""
    for s in (suffix, f"_{folder_name}" if folder_name else None):
        if s and stem.lower().endswith(str(s).lower()) and len(stem) > len(s):
            return stem[: -len(s)]
    return _ROLE_WORD.sub("", stem)


def _in_dir(rel: PurePosixPath, d: str | None) -> bool:
    if not d:
        return True
    want = PurePosixPath(str(d).strip("/")).parts
    parent = rel.parent.parts
    return len(parent) >= len(want) and parent[-len(want):] == want


def _ends_with(rel: PurePosixPath, tail: str) -> bool:
    want = PurePosixPath(str(tail).strip("/")).parts
    return len(rel.parts) >= len(want) and rel.parts[-len(want):] == want


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    opts = getattr(card, "options", None) or {}
    images_dir = opts.get("images_dir", opts.get("image_dir"))
    labels_dir = opts.get("labels_dir", opts.get("label_dir"))
    img_sfx, lab_sfx = opts.get("image_suffix"), opts.get("label_suffix")
    mod_re, subj_re = _regex(card, "modality_from_name"), _regex(card, "subject_pattern")
    wanted_paths = [p for p in [opts.get("image"), *(opts.get("alternatives") or [])] if p]
    mods = tuple(getattr(card, "modalities", None) or ())
    default_mod = str(opts.get("modality") or (mods[0] if mods else "image")).lower()
    img_folder = PurePosixPath(str(images_dir)).name if images_dir else None
    lab_folder = PurePosixPath(str(labels_dir)).name if labels_dir else None

    images: list[dict[str, Any]] = []
    labels: dict[str, str] = {}
    extra_cols: list[str] = []
    for p in iter_files(dataset_dir):
        if not p.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        rel = PurePosixPath(relposix(p, dataset_dir))
        stem = strip_suffix(p.name)
        if labels_dir and _in_dir(rel, labels_dir):
            labels.setdefault(_key(stem, lab_sfx, lab_folder), rel.as_posix())
            continue
        if not _in_dir(rel, images_dir):
            continue
        rank = 0
        if wanted_paths:
            ranks = [i for i, w in enumerate(wanted_paths) if _ends_with(rel, w)]
            if not ranks:
                continue
            rank = ranks[0]
        row: dict[str, Any] = {"path": rel.as_posix(), "modality": default_mod, "_rank": rank,
                               "_key": _key(stem, img_sfx, img_folder) if (labels_dir or img_sfx) else stem}
        subject = stem
        if mod_re is not None:
            m = mod_re.search(p.name)
            if not m:
                continue
            gd = m.groupdict()
            row["modality"] = (gd.get("modality") or (m.group(1) if mod_re.groups else m.group(0)) or "").lower()
            s0, s1 = m.span("modality") if "modality" in gd else (m.span(1) if mod_re.groups else m.span())
            subject = strip_suffix(p.name[:s0] + p.name[s1:]).strip("_-. ") or stem
        elif labels_dir or img_sfx:
            subject = row["_key"]
        if subj_re is not None:
            names = [p.name, *reversed(rel.parent.parts)]
            m = next((mm for mm in (subj_re.search(n) for n in names) if mm and mm.groupdict().get("subject")),
                     None)
            if m is None:
                continue
            subject = m.group("subject")
            for k, v in m.groupdict().items():
                if k in ("subject", "modality") or v is None:
                    continue
                row[k] = v
                if k not in extra_cols:
                    extra_cols.append(k)
        row["subject"] = subject
        images.append(row)

    if wanted_paths:  # keep each subject's preferred image (image, then alternatives in order)
        best: dict[tuple[str, str], int] = {}
        for r in images:
            k = (r["subject"], r["modality"])
            best[k] = min(best.get(k, r["_rank"]), r["_rank"])
        images = [r for r in images if r["_rank"] == best[(r["subject"], r["modality"])]]
    count: dict[tuple[str, str], int] = {}
    for r in images:
        count[(r["subject"], r["modality"])] = count.get((r["subject"], r["modality"]), 0) + 1
    for r in images:
        if count[(r["subject"], r["modality"])] > 1:
            r["subject"] = strip_suffix(r["path"])
        r["label"] = labels.get(r.pop("_key"), "") if labels_dir else ""
        r.pop("_rank")
    return finish_rows(images, card, ("label", *extra_cols))
