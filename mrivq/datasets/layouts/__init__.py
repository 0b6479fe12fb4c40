"""Layouts: parsers that turn a dataset folder's files into manifest rows.

One small module per layout (``ixi``, ``msd``, ``idx``, ``cifar``, ``nifti_folder``, ``dicom``,
``phantom``, ...). A card names its layout with dashes (``nifti-folder``); the module uses
underscores. Each module defines:

``scan(dataset_dir: Path, card: Card) -> list[dict[str, str]]``
    Read the finished dataset folder and return manifest rows. Every row has ``subject``,
    ``modality`` and ``path`` (POSIX, relative to ``dataset_dir``); layouts add what they know
    (IXI: ``site``, ``sex``, ``age``; 2D arrays: ``index``, ``label``, ``split``; MSD: ``channel``).

``prepare(part_dir: Path, card: Card, file: CardFile | None) -> None`` (optional)
    Called on a freshly extracted part inside the staging folder, before it is moved into place
    (e.g. to decompress or index). Must only write inside ``part_dir``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mrivq.utils.errors import CardError

KNOWN = ("ixi", "msd", "idx", "cifar", "nifti-folder", "dicom", "phantom", "oasis", "mni152", "brats")


def get_layout(name: str) -> ModuleType:
    """Import the layout module for a card's ``layout`` value."""
    if name not in KNOWN:
        raise CardError(f"unknown layout {name!r}; use one of: {', '.join(KNOWN)}")
    return importlib.import_module(f"mrivq.datasets.layouts.{name.replace('-', '_')}")
