"""A dataset folder's fetch bookkeeping: the names reserved for it (``.mrivq/``, ``.staging-*``,
``manifest.csv``), completion markers under ``.mrivq/done/``, removal of what a killed fetch left,
and writing ``manifest.csv`` from the layout's scan into a :class:`FetchResult`.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrivq.datasets.catalog import CardFile
from mrivq.utils.atomic import atomic_write_text
from mrivq.utils.errors import MrivqError

STATE = ".mrivq"
STAGING_PREFIX = ".staging-"
RESERVED = {STATE, "manifest.csv"}


@dataclass
class FetchResult:
    """What :func:`fetch` did. ``rows`` are the manifest rows (all modalities present on disk)."""

    dataset_dir: Path
    manifest_path: Path
    rows: list[dict[str, str]]
    bytes_downloaded: int = 0
    already_complete: bool = False
    warnings: list[str] = field(default_factory=list)


class FetchState:
    """Methods of :class:`mrivq.datasets.fetch.job.FetchJob` (which sets the attributes they use):
    completion markers, leftovers of a killed fetch, the manifest."""

    # ------------------------------------------------------------------ state
    def _clean_stale(self) -> None:
        """We hold the lock, so any staging folder or temp file is left over from a killed fetch."""
        for p in self.ddir.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True)
        leftovers = [*self.ddir.glob(".manifest.csv.*.tmp"), *self.state.glob(".*.tmp"),
                     *self.done_dir.glob(".*.tmp")]
        for p in leftovers:
            p.unlink(missing_ok=True)

    def _marker(self, key: str) -> dict[str, Any] | None:
        p = self.done_dir / f"{key}.json"
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _write_marker(self, key: str, data: dict[str, Any]) -> None:
        self.done_dir.mkdir(parents=True, exist_ok=True)
        data = {"key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **data}
        atomic_write_text(self.done_dir / f"{key}.json", json.dumps(data, indent=2) + "\n")

    def _done_keys(self) -> list[str]:
        return sorted(p.stem for p in self.done_dir.glob("*.json")) if self.done_dir.is_dir() else []

    @staticmethod
    def _expected(cf: CardFile) -> dict[str, Any]:
        return {"size": cf.size, "md5": cf.md5, "sha256": cf.sha256}

    def _is_done(self, cf: CardFile) -> bool:
        m = self._marker(cf.filename)
        return m is not None and m.get("expected") == self._expected(cf)

    def _manifest_current(self) -> bool:
        """manifest.csv exists and was written after the last part was placed."""
        if not (self.ddir / "manifest.csv").is_file():
            return False
        try:
            st = json.loads((self.state / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return st.get("parts") == self._done_keys()

    def _complete(self) -> FetchResult:
        path = self.ddir / "manifest.csv"
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        return FetchResult(self.ddir, path, rows, 0, True, [])

    def _finish(self) -> FetchResult:
        raw = self.layout.scan(self.ddir, self.card)
        if not raw:
            raise MrivqError(f"no images found in {self.ddir} for layout '{self.card.layout}'; check that "
                             "the files (or the --from path) are the ones the card describes")
        cols = ["subject", "modality", "path"]
        for r in raw:
            for k in r:
                if k not in cols:
                    cols.append(k)
        rows = [{c: "" if r.get(c) is None else str(r.get(c)) for c in cols} for r in raw]
        path = self.ddir / "manifest.csv"
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        atomic_write_text(self.state / "manifest.json",
                           json.dumps({"parts": self._done_keys(), "rows": len(rows)}) + "\n")
        return FetchResult(self.ddir, path, rows, self.bytes, False, self.warnings)

    def _warn(self, msg: str) -> None:
        self.warnings.append(msg)
