"""Atomic placement: each part is unpacked or copied into a fresh ``.staging-XXXX`` folder inside the
dataset folder, offered to the layout's optional ``prepare``, checked for names reserved for
bookkeeping, and then moved into place by rename (merging into folders that already exist).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mrivq.datasets.archive import safe_extract
from mrivq.datasets.catalog import CardFile
from mrivq.datasets.fetch.state import RESERVED, STAGING_PREFIX
from mrivq.utils.errors import MrivqError, UnsafeArchiveError


def merge_move(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into ``dst``: whole folders by rename when new, else merged; files
    replace same-named files (a re-extraction of the same part after a killed run)."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir() and not target.is_symlink():
                merge_move(entry, target)
            elif target.exists() or target.is_symlink():
                raise MrivqError(f"cannot place folder {entry.name} in {dst}: a file of that name exists")
            else:
                os.rename(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                raise MrivqError(f"cannot place file {entry.name} in {dst}: a folder of that name exists")
            os.replace(entry, target)


class Placer:
    """Methods of :class:`mrivq.datasets.fetch.job.FetchJob` (which sets the attributes they use):
    staging folders and moving their contents into place."""

    def _place_folder(self, src: Path, key: str) -> None:
        with self._staging() as staging:
            with self.progress.task(f"copying {src.name}", total=None, unit="files") as bar:
                def _copy(s: str, d: str) -> Any:
                    bar.advance(1)
                    return shutil.copy2(s, d)
                try:
                    shutil.copytree(src, staging / src.name, copy_function=_copy, symlinks=False)
                except (OSError, shutil.Error) as e:
                    raise MrivqError(f"cannot copy --from folder {src}: {e}") from None
            entries = self._place(staging, None)
        self._write_marker(key, {"source": str(src), "entries": entries})

    def _place_archive(self, src: Path, key: str) -> None:
        with self._staging() as staging:
            with self.progress.task(f"extracting {src.name}", total=None, unit="files") as bar:
                safe_extract(src, staging, callback=lambda _name: bar.advance(1))
            entries = self._place(staging, None)
        self._write_marker(key, {"source": str(src), "entries": entries})

    @contextmanager
    def _staging(self) -> Iterator[Path]:
        """A fresh ``.staging-XXXX`` folder in the dataset folder, removed afterwards (also on errors;
        after a kill, the next run removes it)."""
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.ddir))
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _place(self, staging: Path, cf: CardFile | None) -> list[str]:
        prepare = getattr(self.layout, "prepare", None)
        if prepare is not None:
            prepare(staging, self.card, cf)
        entries = sorted(p.name for p in staging.iterdir())
        for name in entries:
            if name in RESERVED or name.startswith(STAGING_PREFIX):
                what = cf.filename if cf is not None else "the source"
                raise UnsafeArchiveError(f"{what} contains a top-level {name!r}, a name mrivq uses for its "
                                         "own bookkeeping; refusing to place it")
        merge_move(staging, self.ddir)
        return entries
