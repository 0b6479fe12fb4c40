"""Safe extraction of downloaded archives.

:func:`safe_extract` unpacks a tar (any compression) or zip into a folder after checking EVERY member
first: an archive with one member that has an absolute path, a ``..`` component, a link that points
outside the destination (or that later members are written through), or a device/fifo is refused whole,
before a single byte is written. Tar extraction additionally runs through Python's ``data`` filter
(PEP 706) where the interpreter has it, as a second line of defence.

A plain ``.gz`` that is not a tar (e.g. MNIST's ``train-images-idx3-ubyte.gz``) is copied as is: the
layouts read gzip themselves.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mrivq.utils.errors import MrivqError, UnsafeArchiveError

_DAMAGED = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # PEP 706 (3.10.12+, 3.11.4+)


def _check_name(archive: Path, name: str) -> str:
    """The member's normalised relative POSIX path, or raise if it could land outside ``dest``."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":") or "\0" in unified:
        raise UnsafeArchiveError(f"archive {archive.name}: member {name!r} has an absolute path; "
                                 "refusing to extract any of it")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive {archive.name}: member {name!r} has a '..' component; "
                                 "refusing to extract any of it")
    return "/".join(parts)


def _check_link(archive: Path, name: str, target: str, *, hard: bool) -> None:
    t = target.replace("\\", "/")
    kind = "hard link" if hard else "symlink"
    if t.startswith("/") or (len(t) > 1 and t[1] == ":"):
        raise UnsafeArchiveError(f"archive {archive.name}: member {name!r} is a {kind} to the absolute "
                                 f"path {target!r}; refusing to extract any of it")
    # Hard links name another member (relative to the archive root); symlinks are relative to the
    # folder holding the link.
    base = "" if hard else posixpath.dirname(name)
    resolved = posixpath.normpath(posixpath.join(base, t))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"archive {archive.name}: member {name!r} is a {kind} pointing outside "
                                 f"the destination ({target!r}); refusing to extract any of it")


def _check_through_links(archive: Path, names: Iterable[str], links: set[str]) -> None:
    """Refuse members written *through* a linked folder (``a -> sub``, then ``a/x``)."""
    if not links:
        return
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise UnsafeArchiveError(f"archive {archive.name}: member {name!r} would be written "
                                         "through a link in the same archive; refusing to extract any of it")


def check_tar(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Raise :class:`UnsafeArchiveError` if any tar member is unsafe (see module docstring)."""
    names, links = [], set()
    for m in members:
        norm = _check_name(archive, m.name)
        if m.isdev() or m.isfifo():
            raise UnsafeArchiveError(f"archive {archive.name}: member {m.name!r} is a device or fifo; "
                                     "refusing to extract any of it")
        if m.issym() or m.islnk():
            _check_link(archive, norm, m.linkname, hard=m.islnk())
            if m.issym():
                links.add(norm)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"archive {archive.name}: member {m.name!r} has an unsupported type; "
                                     "refusing to extract any of it")
        names.append(norm)
    _check_through_links(archive, names, links)


def check_zip(archive: Path, infos: list[zipfile.ZipInfo]) -> None:
    """Raise :class:`UnsafeArchiveError` if any zip member is unsafe."""
    names, links = [], set()
    with zipfile.ZipFile(archive) as zf:
        for info in infos:
            norm = _check_name(archive, info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                raise UnsafeArchiveError(f"archive {archive.name}: member {info.filename!r} is a device "
                                         "or fifo; refusing to extract any of it")
            if stat.S_ISLNK(mode):  # zipfile writes links as small files; still refuse escaping ones
                target = zf.read(info).decode("utf-8", "replace")
                _check_link(archive, norm, target, hard=False)
                links.add(norm)
            names.append(norm)
    _check_through_links(archive, names, links)


def kind(path: Path) -> str | None:
    """``"tar"``, ``"zip"``, ``"gz"`` (a single gzip file) or None (not something we unpack)."""
    low = path.name.lower()
    if low.endswith(".zip"):
        return "zip"
    if low.endswith(_TAR_SUFFIXES):
        return "tar"  # by name, so that a damaged one is reported as damaged, not copied
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError, zlib.error):
        pass
    if low.endswith(".gz"):
        return "gz"
    return None


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike,
                 callback: Callable[[str], None] | None = None) -> list[str]:
    """Unpack ``archive`` into ``dest`` (created) after checking every member; returns the top-level
    names written. ``callback(member_name)`` is called as members are extracted (progress)."""
    archive, dest = Path(archive), Path(dest)
    what = kind(archive)
    if what is None:
        raise MrivqError(f"{archive} is not a tar, zip or .gz file")
    dest.mkdir(parents=True, exist_ok=True)
    if what == "gz":
        shutil.copyfile(archive, dest / archive.name)
        return [archive.name]
    try:
        if what == "zip":
            return _extract_zip(archive, dest, callback)
        return _extract_tar(archive, dest, callback)
    except UnsafeArchiveError:
        raise
    except _DAMAGED as e:
        raise MrivqError(f"archive {archive.name} is damaged or incomplete ({type(e).__name__}: {e}); "
                         "remove it and fetch again") from None


def _top_level(names: Iterable[str]) -> list[str]:
    return sorted({n.split("/", 1)[0] for n in names if n})


def _extract_tar(archive: Path, dest: Path, callback: Callable[[str], None] | None) -> list[str]:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()  # reads the index (for compressed tars: one pass before writing)
        check_tar(archive, members)

        def progress(ms: list[tarfile.TarInfo]) -> Iterator[tarfile.TarInfo]:
            for m in ms:
                if callback is not None:
                    callback(m.name)
                yield m

        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        try:
            tf.extractall(dest, members=progress(members), **kwargs)
        except _FILTER_ERROR as e:  # our checks should have caught it first
            raise UnsafeArchiveError(f"archive {archive.name}: {e}; refusing to extract it") from None
        return _top_level(_check_name(archive, m.name) for m in members)


def _extract_zip(archive: Path, dest: Path, callback: Callable[[str], None] | None) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        check_zip(archive, infos)
        for info in infos:
            if callback is not None:
                callback(info.filename)
            zf.extract(info, dest)
        return _top_level(_check_name(archive, i.filename) for i in infos)
