"""CIFAR-10 (python version): ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch`` pickles.

One row per image: subject ``train-00000`` (numbered across the five training batches) or
``test-00000``, modality ``image``, ``path`` = the batch file, ``index`` within it, ``label``, ``split``.

The batches are Python pickles, and unpickling runs whatever code a pickle names. We never call
``pickle.load`` on them: :class:`_BatchUnpickler` resolves only the handful of globals a CIFAR batch
uses (numpy's array reconstruction and dtype), so a tampered file is refused instead of executed.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.io.files import finish_rows, iter_files, relposix
from mrivq.utils.errors import ImageReadError, MrivqError

COLUMNS = ("index", "label", "split")
_BATCH = re.compile(r"^(data_batch_(?P<n>\d+)|test_batch)$")

try:  # numpy >= 2 moved the implementation to numpy._core; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

try:  # protocol-5 pickles of arrays (not what CIFAR ships, but harmless) rebuild through _frombuffer
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.numeric import _frombuffer as _np_frombuffer



def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Python 3 pickles (protocol 2) store bytes as ``_codecs.encode(str, 'latin1')``; only that."""
    if encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that builds only builtins (dict, list, bytes, str, numbers) and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return obj


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch as ``(images (N, 32, 32, 3) uint8 HWC, labels (N,) int64)``.

    Accepts CIFAR-10 (``labels``) and CIFAR-100 (``fine_labels``) batches; anything else, including
    a pickle that names other Python objects, raises :class:`~mrivq.utils.errors.ImageReadError`.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot be read ({e.strerror or e}); fetch the dataset again") from None
    try:
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ImageReadError(f"{path}: is not a plain CIFAR batch ({e}); delete it and fetch the dataset "
                             "again from its official source") from None
    except Exception as e:  # truncated / corrupt pickles raise EOFError, ValueError, ...
        raise ImageReadError(f"{path}: is not a readable CIFAR batch ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]}); delete it and fetch the dataset again") from None
    if not isinstance(obj, dict):
        raise ImageReadError(f"{path}: is not a CIFAR batch (expected a dict); fetch the dataset again")
    d = {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}
    data = d.get("data")
    labels = d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ImageReadError(f"{path}: its 'data' is not an N x 3072 uint8 array; fetch the dataset again")
    if labels is None or len(labels) != data.shape[0]:
        raise ImageReadError(f"{path}: has {0 if labels is None else len(labels)} labels for "
                             f"{data.shape[0]} images; fetch the dataset again")
    try:
        lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise ImageReadError(f"{path}: its labels are not integers; fetch the dataset again") from None
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image in row order.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), lab


def scan(dataset_dir: Path, card: Any) -> list[dict[str, str]]:
    dataset_dir = Path(dataset_dir)
    opts = getattr(card, "options", None) or {}
    # The card may name the batches (train_batches / test_batches: a list, or a mapping name -> md5).
    train_names = list(opts.get("train_batches") or [])
    test_names = list(opts.get("test_batches") or [])
    train: list[tuple[int, Path]] = []
    test: list[Path] = []
    for p in iter_files(dataset_dir):
        if train_names or test_names:
            if p.name in train_names:
                train.append((train_names.index(p.name), p))
            elif p.name in test_names:
                test.append(p)
            continue
        m = _BATCH.match(p.name)
        if not m:
            continue
        if m.group("n") is not None:
            train.append((int(m.group("n")), p))
        else:
            test.append(p)
    if not train and not test:
        raise MrivqError(f"{dataset_dir}: no CIFAR batches (data_batch_1..5, test_batch) found; fetch the "
                         "dataset again")
    nums = [n for n, _ in train]
    if len(set(nums)) != len(nums) or len(test) > max(1, len(test_names)):
        raise MrivqError(f"{dataset_dir}: holds more than one copy of the CIFAR batches; keep one")
    rows: list[dict[str, Any]] = []
    test.sort(key=lambda p: test_names.index(p.name) if p.name in test_names else 0)
    for split, files in (("train", [p for _, p in sorted(train)]), ("test", test)):
        i = 0
        for f in files:
            _, labels = read_cifar_batch(f)
            rel = relposix(f, dataset_dir)
            for j, lab in enumerate(labels.tolist()):
                rows.append({"subject": f"{split}-{i:05d}", "modality": "image", "path": rel, "index": str(j),
                             "label": str(lab), "split": split})
                i += 1
    return finish_rows(rows, _AnyModality(), COLUMNS, sort_by=("split", "subject"))


class _AnyModality:
    modalities = ()  # rows are always modality "image": the card's modality list does not filter them
