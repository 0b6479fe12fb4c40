"""MNIST / Fashion-MNIST: gzip-compressed IDX files (``train-images-idx3-ubyte.gz`` and friends).

One row per image: subject ``train-00000`` / ``test-00000``, modality ``image``, ``path`` = the images
file, ``index`` in it, ``label`` (from the matching labels file) and ``split`` (``t10k`` is the test
split). :func:`read_idx` reads either kind of file.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.io.files import finish_rows, iter_files, relposix
from mrivq.utils.errors import ImageReadError, MrivqError

COLUMNS = ("index", "label", "split")
# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IMAGES = re.compile(r"^(?P<pre>.*?)(?P<split>train|t10k|test)-images[-.]idx3-ubyte(?:\.gz)?$", re.I)
_LABELS = re.compile(r"^(?P<pre>.*?)(?P<split>train|t10k|test)-labels[-.]idx1-ubyte(?:\.gz)?$", re.I)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _header(fh, path: Path) -> tuple[str, tuple[int, ...]]:
    magic = fh.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES or magic[3] == 0:
        raise ImageReadError(f"{path}: is not an IDX file (bad magic number {magic.hex() or 'empty'}); "
                             "delete it and fetch the dataset again")
    ndim = magic[3]
    raw = fh.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise ImageReadError(f"{path}: is truncated inside its header; delete it and fetch the dataset again")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4"))
    return _DTYPES[magic[2]], shape


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array in native byte order.

    The magic number (two zero bytes, a type code, the number of dimensions) and the data length are
    checked; the whole gzip stream is decompressed, so truncation is caught.
    """
    path = Path(path)
    try:
        with _open(path) as fh:
            dtype, shape = _header(fh, path)
            data = fh.read()
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(f"{path}: no such file; fetch the dataset again") from None
    except (EOFError, OSError, zlib.error) as e:
        raise ImageReadError(f"{path}: is truncated or not valid gzip ({' '.join(str(e).split())}); delete "
                             "it and fetch the dataset again") from None
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != need:
        raise ImageReadError(f"{path}: holds {len(data)} data bytes but its header {shape} needs {need}; "
                             "delete it and fetch the dataset again")
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))


def idx_count(path: Path) -> int:
    """Number of items in an IDX file, from its header alone."""
    try:
        with _open(path) as fh:
            _, shape = _header(fh, path)
    except ImageReadError:
        raise
    except (EOFError, OSError, zlib.error) as e:
        raise ImageReadError(f"{path}: is not readable ({' '.join(str(e).split())}); delete it and fetch "
                             "the dataset again") from None
    return shape[0]


def _find(dataset_dir: Path, regex: re.Pattern, what: str) -> dict[tuple[str, str], Path]:
    """``{(prefix, split): file}`` for IDX files named like ``regex`` anywhere under ``dataset_dir``."""
    by_key: dict[tuple[str, str], list[Path]] = {}
    for p in iter_files(dataset_dir):
        m = regex.match(p.name)
        if m:
            split = "train" if m.group("split").lower() == "train" else "test"
            by_key.setdefault((m.group("pre").lower(), split), []).append(p)
    found: dict[tuple[str, str], Path] = {}
    for key, paths in by_key.items():
        if len(paths) == 2 and _strip_gz(paths[0]) == _strip_gz(paths[1]):
            paths = [q for q in paths if q.name.lower().endswith(".gz")]  # both forms: read the .gz one
        if len(paths) > 1:
            raise MrivqError(f"{dataset_dir}: holds {len(paths)} {key[1]} {what} files ("
                             + ", ".join(relposix(q, dataset_dir) for q in paths) + "); keep one")
        found[key] = paths[0]
    return found


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    splits = (getattr(card, "options", None) or {}).get("splits")
    if isinstance(splits, dict) and splits:
        # The card names the files: {split: {images: name, labels: name}}, found anywhere in the folder.
        by_name = {p.name: p for p in iter_files(dataset_dir)}
        pairs = []
        for split, names in splits.items():
            names = names or {}
            img = by_name.get(str(names.get("images", "")))
            if img is None:
                continue
            pairs.append((str(split), img, by_name.get(str(names.get("labels", "")))))
    else:
        images = _find(dataset_dir, _IMAGES, "image")
        labels = _find(dataset_dir, _LABELS, "label")
        pairs = [(split, p, labels.get((pre, split))) for (pre, split), p in sorted(images.items())]
    if not pairs:
        raise MrivqError(f"{dataset_dir}: no IDX image files (train-images-idx3-ubyte.gz, "
                         "t10k-images-idx3-ubyte.gz) found; fetch the dataset again")
    if len({s for s, _, _ in pairs}) != len(pairs):
        raise MrivqError(f"{dataset_dir}: holds several IDX sets ("
                         + ", ".join(relposix(p, dataset_dir) for _, p, _ in pairs) + "); keep one")
    rows: list[dict[str, Any]] = []
    for split, images_path, lab_path in pairs:
        n = idx_count(images_path)
        labels_arr = read_idx(lab_path) if lab_path is not None else None
        if labels_arr is not None and len(labels_arr) != n:
            raise MrivqError(f"{lab_path}: has {len(labels_arr)} labels for {n} images in {images_path.name}; "
                             "fetch the dataset again")
        rel = relposix(images_path, dataset_dir)
        lab = [str(int(v)) for v in labels_arr] if labels_arr is not None else [""] * n
        rows.extend({"subject": f"{split}-{i:05d}", "modality": "image", "path": rel, "index": str(i),
                     "label": lab[i], "split": split} for i in range(n))
    return finish_rows(rows, _AnyModality(), COLUMNS, sort_by=("split", "subject"))


def _strip_gz(p: Path) -> str:
    return p.name[:-3] if p.name.lower().endswith(".gz") else p.name


class _AnyModality:
    modalities = ()  # rows are always modality "image": the card's modality list does not filter them
