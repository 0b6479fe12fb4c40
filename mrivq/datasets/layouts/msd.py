"""Medical Segmentation Decathlon: ``TaskNN_Name/`` with ``dataset.json``, ``imagesTr/``, ``labelsTr/``.

``dataset.json`` lists ``training`` (``{"image", "label"}`` pairs) and ``test`` images, and names the
channels of multichannel volumes in ``modality`` (``{"0": "FLAIR", "1": "T1w", ...}``). Options:

- ``channels``: channel names (case-insensitive) or indices to keep (default: all). A list naming
  every channel, in order, with names dataset.json does not use renames them instead.
- ``split_channels`` (default true): one row per channel, modality = the channel's name in lower
  case, column ``channel`` = its index in the 4D volume. False: one row per image (the whole 4D
  volume, channels last), modality ``multi``, ``channel`` empty and ``channels`` = all channel names
  in order, ``;``-separated (``channels`` must then keep every channel).

Single-channel tasks (3D images) give one row per image named after their only channel (``mri``,
``ct``) with an empty ``channel``. Every row has ``label`` (the segmentation, empty for test
images) and ``split`` (train/test).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrivq.io.files import finish_rows, iter_files, relposix, strip_suffix
from mrivq.utils.errors import CardError, MrivqError

COLUMNS = ("channel", "channels", "label", "split", "task")


def _channels(meta: dict, where: Path) -> list[str]:
    mod = meta.get("modality") or {"0": "image"}
    if not isinstance(mod, dict):
        raise MrivqError(f"{where}: 'modality' must map channel indices to names")
    try:
        items = sorted((int(k), str(v)) for k, v in mod.items())
    except (TypeError, ValueError):
        raise MrivqError(f"{where}: 'modality' keys must be channel indices (\"0\", \"1\", ...)") from None
    if [i for i, _ in items] != list(range(len(items))):
        raise MrivqError(f"{where}: 'modality' must number channels 0..{len(items) - 1}")
    return [v for _, v in items]


def _select(names: list[str], wanted: Any, card: Any) -> list[int]:
    if wanted is None:
        return list(range(len(names)))
    if not isinstance(wanted, (list, tuple)):
        wanted = [wanted]
    low = [n.lower() for n in names]
    out = []
    for w in wanted:
        if isinstance(w, int) and not isinstance(w, bool) and 0 <= w < len(names):
            out.append(w)
        elif str(w).lower() in low:
            out.append(low.index(str(w).lower()))
        else:
            raise CardError(f"card {getattr(card, 'name', '?')}: option 'channels' names {w!r}, which is not "
                            f"a channel of this task ({', '.join(names)}); list channels to keep, or name "
                            "all of them in order to rename them")
    return sorted(set(out))


def _task_rows(meta_path: Path, dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MrivqError(f"{meta_path}: is not readable JSON ({' '.join(str(e).split())}); delete the task "
                         "folder and fetch it again") from None
    if not isinstance(meta, dict):
        raise MrivqError(f"{meta_path}: is not an MSD dataset.json (expected a mapping)")
    base = meta_path.parent
    names = _channels(meta, meta_path)
    opts = getattr(card, "options", None) or {}
    wanted = opts.get("channels")
    split = bool(opts.get("split_channels", True))
    try:
        keep = _select(names, wanted, card)
    except CardError:
        # A full list of names that are not dataset.json's renames the channels, in order
        # (Task04_Hippocampus calls its only channel "MRI"; a card may call it t1).
        if not (isinstance(wanted, (list, tuple)) and len(wanted) == len(names)
                and all(isinstance(w, str) and w for w in wanted)):
            raise
        names, keep = [str(w) for w in wanted], list(range(len(names)))
    if not split and len(keep) != len(names):
        # A 'multi' row stands for the whole 4D volume (the loader reads every channel).
        raise CardError(f"card {getattr(card, 'name', '?')}: option 'channels' keeps {len(keep)} of "
                        f"{len(names)} channels, which needs split_channels: true (one row per channel)")
    task = str(meta.get("name") or base.name)

    entries: list[tuple[str, str | None, str]] = []
    for e in meta.get("training") or []:
        img = e.get("image") if isinstance(e, dict) else e
        lab = e.get("label") if isinstance(e, dict) else None
        if img:
            entries.append((str(img), str(lab) if lab else None, "train"))
    for e in meta.get("test") or []:
        img = e.get("image") if isinstance(e, dict) else e
        if img:
            entries.append((str(img), None, "test"))
    if not entries:
        raise MrivqError(f"{meta_path}: lists no training or test images; is this an MSD task folder?")

    missing = [img for img, _, _ in entries if not (base / img).is_file()]
    if missing:
        raise MrivqError(f"{meta_path}: {len(missing)} listed image(s) are missing (first: {missing[0]}); "
                         "delete the task folder and fetch it again")
    rows = []
    for img, lab, part in entries:
        rel = relposix(base / img, dataset_dir)
        common = {"subject": strip_suffix(Path(img).name), "path": rel, "split": part, "task": task,
                  "label": relposix(base / lab, dataset_dir) if lab and (base / lab).is_file() else ""}
        if len(names) == 1:
            rows.append({**common, "modality": names[0].lower(), "channel": "", "channels": names[0]})
        elif split:
            for c in keep:
                rows.append({**common, "modality": names[c].lower(), "channel": str(c), "channels": names[c]})
        else:
            rows.append({**common, "modality": "multi", "channel": "", "channels": ";".join(names)})
    return rows


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    metas = [p for p in iter_files(dataset_dir) if p.name == "dataset.json"]
    if not metas:
        raise MrivqError(f"{dataset_dir}: no dataset.json found; an MSD task folder (TaskNN_Name/) holds one")
    rows: list[dict[str, str]] = []
    for m in metas:
        rows.extend(_task_rows(m, dataset_dir, card))
    opts = getattr(card, "options", None) or {}
    if not bool(opts.get("split_channels", True)):
        # 'multi' rows are not named by a channel, so the card's modality filter does not apply.
        card = _NoFilter(card)
    return finish_rows(rows, card, COLUMNS, sort_by=("subject", "modality", "channel", "path"))


class _NoFilter:
    def __init__(self, card: Any) -> None:
        self.modalities = ()
        self.name = getattr(card, "name", "")
