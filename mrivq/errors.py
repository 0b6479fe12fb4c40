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
