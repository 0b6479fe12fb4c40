"""Selected items -> the data dicts MONAI datasets are built from (absolute paths, preprocessing,
file stamps: the disk-cache key), the kind of an item (array, 2D image, volume), its class label,
and the memo of per-item intensity ranges shared by :mod:`mrivq.data.datasets` and
:mod:`mrivq.data.intensity`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mrivq.data.preprocess import Preprocess
from mrivq.data.readers import is_image2d

#: Bump when the pipeline changes in a way that makes disk caches stale (it is part of the cache key).
DATA_VERSION = 1


def item_kind(item: dict) -> str:
    src = item["sources"][0]
    if "index" in src:
        return "array"
    if is_image2d(Path(src["path"])):
        return "image2d"
    return "volume"


def _stamp(path: Path) -> list:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]


def data_items(items: list[dict], dataset_dir: Path, pre: Preprocess, has_label: bool) -> list[dict]:
    pre_json = pre.to_json()
    out = []
    for it in items:
        sources = []
        for s in it["sources"]:
            p = Path(s["path"])
            p = p if p.is_absolute() else Path(dataset_dir) / p
            sources.append({**{k: v for k, v in s.items() if k != "modality"}, "path": str(p)})
        d = {"image": sources, "subject": str(it["subject"]), "_pre": pre_json, "_v": DATA_VERSION,
             "_stamp": [_stamp(Path(s["path"])) for s in sources]}
        if has_label:
            d["label"] = item_label(it)
        out.append(d)
    return out


def item_label(item: dict) -> int:
    """The item's class label, -1 when it has none (or a non-class one, e.g. MSD's segmentation path)."""
    v = str(item.get("label", "") or "")
    try:
        f = float(v)
    except ValueError:
        return -1
    return int(f) if f.is_integer() else -1


LOHI_MEMO: dict[str, tuple[list, list]] = {}


def memo_key(d: dict) -> str:
    return json.dumps([d["image"], d["_pre"], d["_stamp"]], sort_keys=True, default=str)
