"""Reading one source into an array: IDX/CIFAR array files (read once per file and kept in memory),
PNG/JPEG 2D images, and volumes through :func:`mrivq.io.images.load_volume` (:func:`load_source`); also the
stored dtype of an input file, so outputs can be written back alike.
"""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

import numpy as np

from mrivq.utils.errors import ImageReadError, MrivqError

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

ARRAYS: dict[str, tuple[tuple[int, int], np.ndarray]] = {}  # resolved path -> (size, mtime), array
_ARRAYS_LOCK = threading.Lock()


def _array_kind(path: Path) -> str:
    """'idx' or 'cifar', by the file's first bytes (gzip is looked through)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(4)
    except OSError as e:
        raise ImageReadError(f"{path} cannot be read ({e.strerror or e}); re-fetch the dataset") from None
    if len(head) == 4 and head[0] == 0 and head[1] == 0 and head[3] in (1, 2, 3, 4):
        return "idx"
    if head[:1] == b"\x80":
        return "cifar"
    name = path.name.lower()
    if "ubyte" in name or name.endswith((".idx", ".idx.gz")):
        return "idx"
    raise ImageReadError(f"{path} is neither an IDX nor a CIFAR batch file; re-fetch the dataset")


def read_array_file(path: Path) -> np.ndarray:
    """All images of an IDX or CIFAR batch file as uint8 [N, H, W(, 3)]; read once per file."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise ImageReadError(f"{path} does not exist; re-fetch the dataset") from None
    key, stamp = str(path.resolve()), (st.st_size, st.st_mtime_ns)
    with _ARRAYS_LOCK:
        if key in ARRAYS and ARRAYS[key][0] == stamp:
            return ARRAYS[key][1]
        kind = _array_kind(path)
        try:
            if kind == "idx":
                from mrivq.datasets.layouts.idx import read_idx

                arr = np.asarray(read_idx(path))
            else:
                from mrivq.datasets.layouts.cifar import read_cifar_batch

                arr = np.asarray(read_cifar_batch(path)[0])
        except MrivqError:
            raise
        except Exception as e:
            raise ImageReadError(f"{path} is corrupt or truncated ({type(e).__name__}); re-fetch the dataset") \
                from None
        if arr.ndim not in (3, 4):
            raise ImageReadError(f"{path} holds an array of shape {arr.shape}, not a stack of 2D images")
        ARRAYS[key] = (stamp, arr)
        return arr


def _read_image2d(path: Path) -> np.ndarray:
    """A PNG/JPEG as [H, W] or [H, W, 3] (alpha dropped, palette expanded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            if im.mode in ("RGBA", "LA"):
                im = im.convert(im.mode[:-1])
            if im.mode not in ("L", "RGB", "I;16", "I", "F"):
                im = im.convert("RGB")
            arr = np.array(im)
    except FileNotFoundError:
        raise ImageReadError(f"{path} does not exist; check the path") from None
    except Exception as e:
        raise ImageReadError(f"{path} is not a readable image ({type(e).__name__}); check the file") from None
    return arr


def is_image2d(path: Path) -> bool:
    return Path(path).suffix.lower() in _IMAGE_SUFFIXES


def input_dtype(path: Path) -> str:
    """The stored data type of an input file (for writing outputs back alike)."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz", ".hdr", ".img", ".img.gz")):
        try:
            import nibabel as nib

            return np.dtype(nib.load(str(path)).get_data_dtype()).name
        except Exception:
            return "float32"
    return "float32"


def load_source(src: dict, base: Path | None) -> tuple[np.ndarray, np.ndarray, bool, tuple | None]:
    """One source -> (array channel-first [C, *spatial], affine 4x4, had_channel_axis, fixed_range)."""
    path = Path(src["path"])
    if base is not None and not path.is_absolute():
        path = base / path
    if "index" in src:
        arr = read_array_file(path)
        i = int(src["index"])
        if not 0 <= i < arr.shape[0]:
            raise ImageReadError(f"{path} has {arr.shape[0]} images; index {i} is out of range; re-fetch")
        img = arr[i]
        chans = img.ndim == 3
        img = np.moveaxis(img, -1, 0) if chans else img[None]
        fixed = (0.0, 255.0) if arr.dtype == np.uint8 else None
        return img.astype(np.float32), np.eye(4), chans, fixed
    if is_image2d(path):
        img = _read_image2d(path)
        fixed = (0.0, 255.0) if img.dtype == np.uint8 else None
        chans = img.ndim == 3
        img = np.moveaxis(img, -1, 0) if chans else img[None]
        return img.astype(np.float32), np.eye(4), chans, fixed
    from mrivq.io.images import load_volume

    try:
        arr, affine = load_volume(path, series_uid=src.get("series_uid") or None)
    except MrivqError:
        raise
    except Exception as e:  # the reader should raise ImageReadError itself; name the file regardless
        raise ImageReadError(f"{path} cannot be read ({type(e).__name__}: {e}); check or re-fetch it") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        chans, arr = False, arr[None]
    elif arr.ndim == 4:
        chans, arr = True, np.moveaxis(arr, -1, 0)
    else:
        raise ImageReadError(f"{path} has {arr.ndim} dimensions; expected a 3D volume (or 4D with channels)")
    if "channel" in src:
        c = int(src["channel"])
        if not 0 <= c < arr.shape[0]:
            raise ImageReadError(f"{path} has {arr.shape[0]} channels; channel {c} is out of range")
        arr, chans = arr[c:c + 1], False
    return np.ascontiguousarray(arr), np.asarray(affine, dtype=np.float64), chans, None
