"""User-facing errors.

Anything a user can cause (bad path, bad card, bad checksum, unsafe archive, a folder that is not a
run) raises :class:`MrivqError` with a one-line message that names the thing and says what to do.
The CLI prints it and exits with code 2; tracebacks appear only with ``--debug``.
"""

from __future__ import annotations


class MrivqError(Exception):
    """A problem with the user's input or environment, reported as one line (CLI exit code 2)."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))  # force one line


class ChecksumError(MrivqError):
    """A downloaded or supplied file does not match the size/checksum its card publishes."""


class UnsafeArchiveError(MrivqError):
    """An archive member would escape the destination (absolute path, ``..``, outside link)."""


class CardError(MrivqError):
    """A dataset card is missing a field or has a bad value."""


class ImageReadError(MrivqError):
    """A NIfTI/DICOM/PNG input is missing, corrupt, truncated or of the wrong kind."""


class RunError(MrivqError):
    """A folder is not an mrivq run, or lacks what the command needs."""


def find_in_chain(e: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]
                  ) -> BaseException | None:
    """The first exception of ``kind`` in ``e``'s chain (``e``, then its causes and contexts): libraries
    wrap errors (MONAI's transforms in RuntimeError, typer's Ctrl-C in ``Exit(130)``)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _os_message(e: OSError) -> str:
    import errno

    name = e.filename if e.filename is not None else "a file"
    why = e.strerror or type(e).__name__
    todo = {
        errno.ENOSPC: "free some space (or write elsewhere) and run the command again",
        errno.EDQUOT: "free some space (or write elsewhere) and run the command again",
        errno.EACCES: "check its permissions (or write elsewhere)",
        errno.EPERM: "check its permissions (or write elsewhere)",
        errno.EROFS: "write to a writable folder",
        errno.ENOENT: "check the path",
        errno.ENOTDIR: "check the path: a part of it is a file, not a folder",
        errno.EISDIR: "pass a file, not a folder",
        errno.EMFILE: "raise the open-files limit (ulimit -n) or use fewer workers",
    }.get(e.errno, "check the path and the disk")
    return f"{name}: {why}; {todo}"


def user_message(e: BaseException) -> str | None:
    """The one-line message for an error a user's input or machine can cause, or None for a bug.

    This is the CLI's one boundary: mrivq's own errors, the operating system's (a full disk, a
    permission, a missing folder), running out of memory, and the readers' errors that escape the
    checks at the source (nibabel, pydicom, YAML). Anything else is a bug and keeps its traceback."""
    if isinstance(e, MrivqError):
        return str(e)
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return ("out of GPU memory; lower --set train.batch_size (or synth --batch-size), use "
                "--set train.amp=bf16 or --set model.checkpointing=true, or free the GPU")
    if isinstance(e, MemoryError):
        return ("out of memory; lower --set train.batch_size (or synth --batch-size), a coarser "
                "data.spacing, or --set train.cache=disk, or use a machine with more memory")
    if isinstance(e, OSError):
        return _os_message(e)
    try:
        from nibabel.filebasedimages import ImageFileError
        from nibabel.spatialimages import HeaderDataError

        if isinstance(e, (ImageFileError, HeaderDataError)):
            return f"an image cannot be read ({e}); check or replace the file"
    except ImportError:  # pragma: no cover
        pass
    try:
        from pydicom.errors import InvalidDicomError

        if isinstance(e, InvalidDicomError):
            return f"a DICOM file cannot be read ({e}); check or replace the file"
    except ImportError:  # pragma: no cover
        pass
    try:
        import yaml

        if isinstance(e, yaml.YAMLError):
            return f"invalid YAML ({str(e).splitlines()[0]}); fix the file"
    except ImportError:  # pragma: no cover
        pass
    return None
