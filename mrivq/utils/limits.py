"""Budgets checked before work, so that a small hostile or broken file cannot make mrivq allocate
gigabytes, read forever or hang.

- Only regular files are read as inputs (not ``/dev/zero``, a FIFO or a socket, even through a link).
- An image's declared size is checked against a memory budget before its data is read, decompressed or
  resampled: ``MRIVQ_MAX_IMAGE_GB`` (default 2) gigabytes of float32 voxels per volume, which is about
  537 M voxels, 60 times a 1 mm 256x256x150 T1.
- A gzip stream is decompressed only up to what its header declares (a gzip bomb stops there).
- YAML (cards, configs, run folders) is read only up to 1 MB and without anchors or aliases (the
  "billion laughs" expansion).
- ``.npz`` members are checked by their declared shape before they are decompressed.

Each refusal is a :class:`~mrivq.utils.errors.MrivqError` whose message names the file and the size.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mrivq.utils.errors import ImageReadError, MrivqError

DEFAULT_MAX_IMAGE_GB = 2.0
MAX_YAML_BYTES = 1 << 20
GZIP_SLACK = 1 << 20  # bytes a NIfTI stream may hold beyond its declared header + data


def max_image_bytes() -> int:
    """The per-volume budget in bytes (``MRIVQ_MAX_IMAGE_GB``, default 2)."""
    raw = os.environ.get("MRIVQ_MAX_IMAGE_GB", "").strip()
    if not raw:
        return int(DEFAULT_MAX_IMAGE_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not gb > 0 or gb == float("inf"):
        raise MrivqError(f"MRIVQ_MAX_IMAGE_GB={raw!r} is not a positive number of gigabytes; unset it or "
                         "set e.g. MRIVQ_MAX_IMAGE_GB=8")
    return int(gb * 1e9)


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_voxels(what: str, shape: Any, *, itemsize: int = 4, why: str = "") -> int:
    """Refuse a volume of ``shape`` whose float32 array would exceed the budget; returns the voxels."""
    dims = [int(s) for s in shape]
    if any(s < 0 for s in dims):
        raise ImageReadError(f"{what}: declares a negative size {tuple(dims)}; the file is corrupt")
    n = int(np.prod(np.asarray(dims, dtype=np.float64))) if dims else 1
    need = n * itemsize
    budget = max_image_bytes()
    if need > budget:
        shown = "x".join(str(s) for s in dims)
        raise ImageReadError(f"{what}: {why}{shown} voxels ({_gb(need)} in memory), above the {_gb(budget)} "
                             "budget per volume; check the file (or raise MRIVQ_MAX_IMAGE_GB if it is real)")
    return n


def regular_file(path: Path, what: str = "") -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) if it is a regular file; else a one-line refusal."""
    label = f"{what} {path}".strip()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(f"{label}: no such file; check the path") from None
    except OSError as e:
        raise ImageReadError(f"{label}: cannot be read ({e.strerror or e}); check its permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{label}: is a folder, not a file; pass a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if (
            stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else "a socket or special file"
        raise ImageReadError(f"{label}: is {kind}, not a regular file; pass a file")
    return st


class GzipReader:
    """Reads a gzip file's decompressed bytes with a cap: :meth:`head` for a header, :meth:`upto` for
    the rest once the header says how much there should be. The CRC and length in the trailer are
    checked when the stream ends, so a truncated download fails rather than loading as zeros."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = gzip.open(path, "rb")
        self.buf = b""

    def __enter__(self) -> GzipReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()

    def head(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self._f.read(n - len(self.buf))
            if not chunk:
                break
            self.buf += chunk
        return self.buf[:n]

    def upto(self, need: int, slack: int = GZIP_SLACK) -> bytes:
        """All decompressed bytes, refused if the stream holds more than ``need + slack``."""
        parts = [self.buf]
        have = len(self.buf)
        cap = need + slack
        while True:
            chunk = self._f.read(min(1 << 22, cap + 1 - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
            if have > cap:
                raise ImageReadError(f"{self.path}: decompresses to more than the {need} bytes its header "
                                     "declares (a corrupt file or a gzip bomb); replace the file")
        self.buf = b"".join(parts)
        return self.buf


def _no_aliases_loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401
            if self.check_event(yaml.AliasEvent):
                ev = self.peek_event()
                raise yaml.constructor.ConstructorError(
                    None, None, "anchors and aliases (&name / *name) are not allowed", ev.start_mark)
            return super().compose_node(parent, index)

    return Loader


def read_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text without anchors/aliases; errors name ``where`` and the line."""
    import yaml

    if len(text.encode("utf-8", "replace")) > MAX_YAML_BYTES:
        raise MrivqError(f"{where}: is larger than {MAX_YAML_BYTES // (1 << 20)} MB; a config or card is a "
                         "few kilobytes, check the file")
    try:
        return yaml.load(text, Loader=_no_aliases_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MrivqError(f"{where}: not valid YAML{at}: {problem}; fix the file") from None


def read_yaml_file(path: Path, where: str) -> Any:
    """A YAML file (a regular file of at most 1 MB, no aliases); ``where`` names it in messages."""
    try:
        st = regular_file(Path(path))
    except ImageReadError as e:
        raise MrivqError(str(e).replace(f"{path}:", f"{where}:", 1)) from None
    if st.st_size > MAX_YAML_BYTES:
        raise MrivqError(f"{where}: is {st.st_size} bytes, larger than {MAX_YAML_BYTES // (1 << 20)} MB; a "
                         "config or card is a few kilobytes, check the file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MrivqError(f"{where}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    return read_yaml_text(text, where)


def npz_member_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Declared (shape, dtype) of every array in an ``.npz``, read from the member headers only."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                head = io.BytesIO(f.read(4096))
            version = np.lib.format.read_magic(head)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = reader(head)
            out[info.filename[:-4]] = (tuple(int(s) for s in shape), dtype)
    return out


def check_npz(path: Path, what: str) -> None:
    """Refuse an ``.npz`` whose arrays would exceed the per-volume budget once decompressed."""
    regular_file(Path(path), what)
    try:
        shapes = npz_member_shapes(Path(path))
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise MrivqError(f"{what} {path}: is not a readable .npz ({type(e).__name__}); replace the file") \
            from None
    total = sum(int(np.prod(s, dtype=np.float64)) * max(d.itemsize, 1) for s, d in shapes.values())
    if total > max_image_bytes():
        raise MrivqError(f"{what} {path}: its arrays would take {_gb(total)} in memory, above the "
                         f"{_gb(max_image_bytes())} budget; the file is not what it claims to be")


#: seeds are 64-bit: torch's generators take signed 64-bit values and numpy's streams take them too
SEED_RANGE = (-(2**63), 2**63 - 1)


def check_seed(seed: int, option: str = "--seed") -> int:
    """Refuse a seed that the random generators cannot take (outside the signed 64-bit range)."""
    lo, hi = SEED_RANGE
    if not isinstance(seed, int) or isinstance(seed, bool) or not lo <= seed <= hi:
        raise MrivqError(f"{option} {seed} is outside the 64-bit range the random generators take; pass a "
                         f"seed between {lo} and {hi}")
    return seed
