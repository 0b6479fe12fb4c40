"""Per-dataset fetch orchestration: :func:`fetch` checks the request, takes the dataset's file lock
and runs a :class:`FetchJob`, which picks the open, manual or builtin path, works out which card files
are still to do (or supplied with ``--from``), fetches each part (download or local copy, verify,
extract, place, completion marker) and writes the manifest.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from mrivq.datasets.archive import kind as archive_kind
from mrivq.datasets.archive import safe_extract
from mrivq.datasets.catalog import Card, CardFile, dataset_dir, is_archive
from mrivq.datasets.fetch.download import Downloader
from mrivq.datasets.fetch.messages import check_modalities, from_expectation, manual_help
from mrivq.datasets.fetch.place import Placer
from mrivq.datasets.fetch.state import STATE, FetchResult, FetchState
from mrivq.datasets.fetch.verify import Verifier
from mrivq.utils.errors import ChecksumError, MrivqError
from mrivq.utils.progress import Progress, silent

BUILTIN_DEFAULTS: dict[str, Any] = {"count": 160, "shape": (64, 64, 64), "spacing": 3.0, "seed": 0,
                                    "lesions": False, "varied": False}


def fetch(card: Card, root: str | os.PathLike, *, modalities: list[str] | None = None,
          mirror: str | None = None, from_path: str | os.PathLike | None = None,
          progress: Progress | None = None, retries: int = 5, timeout: float = 30,
          builtin_options: dict[str, Any] | None = None, backoff: float = 1.0) -> FetchResult:
    """Fetch ``card`` into ``<root>/<card.name>/`` and (re)write its ``manifest.csv``.

    ``modalities``: a subset of ``card.modalities`` (None: all; with ``from_path`` and no explicit
    selection, the modalities of the files it supplies). ``mirror``: a base URL that serves every file by
    its file name. ``from_path``: an archive or folder the user already has (the only way in for manual
    datasets). ``retries``: how many times a transient failure is retried (backoff ``backoff * 2**k``
    seconds). ``builtin_options``: count/shape/spacing/seed for generated datasets.

    Warnings (e.g. a file with no published checksum) are returned in ``FetchResult.warnings`` for the
    caller to print (the CLI does); fetch itself prints nothing but progress.
    """
    from filelock import FileLock, Timeout

    progress = progress or silent()
    root = Path(root).expanduser()
    src = Path(from_path).expanduser() if from_path is not None else None
    if src is not None and not src.exists():
        raise MrivqError(f"--from {src} does not exist; {from_expectation(card)}")
    if src is not None and card.access == "builtin":
        raise MrivqError(f"dataset '{card.name}' is generated on your machine; --from does not apply")
    if mirror is not None and not re.match(r"^(https?|ftp)://[^/]+", mirror):
        raise MrivqError(f"--mirror {mirror!r} must be an http(s):// or ftp:// URL")
    mods = check_modalities(card, modalities)
    from mrivq.datasets.layouts import get_layout

    layout = get_layout(card.layout)  # fail fast, before any download
    ddir = dataset_dir(root, card.name)
    if card.access == "manual" and src is None and not (ddir / STATE / "done").is_dir():
        raise MrivqError(manual_help(card))
    try:
        (ddir / STATE).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MrivqError(f"cannot create {ddir} ({e.strerror}); choose another --root") from None
    lock = FileLock(str(ddir / STATE / "lock"))
    try:
        lock.acquire(timeout=0.2)
    except Timeout:
        if progress.enabled:
            print(f"waiting for another fetch of {card.name} to finish (lock {ddir / STATE / 'lock'})",
                  file=progress.stream, flush=True)
        lock.acquire()
    try:
        job = FetchJob(card, ddir, layout, progress, mirror=mirror, retries=retries, timeout=timeout,
                     backoff=backoff)
        return job.run(mods, modalities is not None, src, builtin_options)
    finally:
        lock.release()


class FetchJob(FetchState, Placer, Verifier, Downloader):
    """One fetch of one card into ``ddir`` (the caller holds the lock); the state, placement,
    verification and download methods come from the mixins of the sibling modules."""

    def __init__(self, card: Card, ddir: Path, layout: ModuleType, progress: Progress, *,
                 mirror: str | None, retries: int, timeout: float, backoff: float) -> None:
        self.card, self.ddir, self.layout, self.progress = card, ddir, layout, progress
        self.mirror, self.retries, self.timeout, self.backoff = mirror, max(0, retries), timeout, backoff
        self.state = ddir / STATE
        self.done_dir = self.state / "done"
        self.downloads = self.state / "downloads"
        self.bytes = 0
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ flow
    def run(self, mods: list[str] | None, explicit: bool, src: Path | None,
            builtin_options: dict[str, Any] | None) -> FetchResult:
        self._clean_stale()
        if self.card.access == "builtin":
            return self._run_builtin(mods, builtin_options)
        if self.card.access == "manual":
            return self._run_manual(mods, explicit, src)
        return self._run_open(mods, explicit, src)

    def _run_open(self, mods: list[str] | None, explicit: bool, src: Path | None) -> FetchResult:
        supplied = self._supplied_files(src) if src is not None else {}
        if src is not None and mods is None and not explicit:
            # `fetch ixi --from IXI-T1.tar` means T1 (plus the shared files), not everything.
            chosen = {cf.modality for cf in self.card.files if cf.filename in supplied and cf.modality}
            mods = sorted(chosen) if chosen else None
        files = self.card.select_files(mods)
        selected = {cf.filename for cf in files}
        if src is not None and src.is_dir():
            supplied = {n: p for n, p in supplied.items() if n in selected}
        for name in supplied:
            if name not in selected:
                cf = next(f for f in self.card.files if f.filename == name)
                raise MrivqError(f"--from supplies {name} (modality {cf.modality}), which is not among the "
                                 f"selected modalities {', '.join(mods or [])}; add it with --modality")
        todo = [cf for cf in files if not self._is_done(cf)]
        if not todo and self._manifest_current():
            return self._complete()
        for cf in todo:
            self._fetch_part(cf, supplied.get(cf.filename))
        return self._finish()

    def _run_manual(self, mods: list[str] | None, explicit: bool, src: Path | None) -> FetchResult:
        if src is None:
            if self._done_keys() and self._manifest_current():
                return self._complete()
            raise MrivqError(manual_help(self.card))
        supplied = self._supplied_files(src, strict=False) if self.card.files else {}
        if supplied:  # the card lists its files (maybe with checksums): same path as open access
            todo = [self._card_file(n) for n in supplied]
            todo = [cf for cf in todo if not self._is_done(cf)]
            if not todo and self._manifest_current():
                return self._complete()
            for cf in todo:
                self._fetch_part(cf, supplied[cf.filename])
            return self._finish()
        key = f"from-{src.name}"
        if self._marker(key) is not None and self._manifest_current():
            return self._complete()
        if src.is_dir():
            self._place_folder(src, key)
        elif is_archive(src.name) or archive_kind(src) in ("tar", "zip"):
            self._place_archive(src, key)
        else:
            raise MrivqError(f"--from {src} is not a folder or an archive; {from_expectation(self.card)}")
        return self._finish()

    def _run_builtin(self, mods: list[str] | None, options: dict[str, Any] | None) -> FetchResult:
        opts = self._builtin_options(options)
        modalities = mods if mods is not None else list(self.card.modalities)
        marker = self._marker("builtin")
        if marker is not None:
            had = marker.get("options", {})
            had_mods = marker.get("modalities", [])
            if {k: had.get(k) for k in opts} == jsonable(opts) and set(modalities) <= set(had_mods):
                if self._manifest_current():
                    return self._complete()
                return self._finish()
            shown = ", ".join(f"{k}={format_size(v)}" for k, v in had.items())
            raise MrivqError(f"dataset '{self.card.name}' already exists at {self.ddir} with other options "
                             f"({shown}, modalities={','.join(had_mods)}); remove that folder (or use "
                             "another --root) to generate it again with these options")
        from mrivq.datasets.phantom import write_dataset

        kwargs: dict[str, Any] = dict(count=opts["count"], shape=tuple(opts["shape"]), spacing=opts["spacing"],
                                      seed=opts["seed"], modalities=list(modalities))
        for flag in ("lesions", "varied"):
            if opts.get(flag):
                kwargs[flag] = True
        if "progress" in inspect.signature(write_dataset).parameters:
            kwargs["progress"] = self.progress  # it shows its own bar
        with self._staging() as staging:
            write_dataset(staging, **kwargs)
            entries = self._place(staging, None)
        self._write_marker("builtin", {"options": jsonable(opts), "modalities": list(modalities),
                                       "entries": entries})
        return self._finish()

    def _builtin_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        # defaults, then the card's own options (a user card may change them), then the caller's
        opts = dict(BUILTIN_DEFAULTS)
        opts.update({k: v for k, v in self.card.options.items() if k in BUILTIN_DEFAULTS})
        for k, v in (options or {}).items():
            if k not in BUILTIN_DEFAULTS:
                raise MrivqError(f"unknown option {k!r} for dataset '{self.card.name}'; "
                                 f"use {', '.join(BUILTIN_DEFAULTS)}")
            if v is not None:
                opts[k] = v
        try:
            count, seed, spacing = int(opts["count"]), int(opts["seed"]), float(opts["spacing"])
            shape = tuple(int(s) for s in opts["shape"])
        except (TypeError, ValueError):
            raise MrivqError(f"bad options for '{self.card.name}': {opts}; count and seed are whole numbers, "
                             "shape is three whole numbers, spacing a number (mm)") from None
        if count < 1 or spacing <= 0 or len(shape) != 3:
            raise MrivqError(f"bad options for '{self.card.name}': count must be >= 1, shape three sizes, "
                             f"spacing > 0 (got count={count}, shape={shape}, spacing={spacing})")
        # "lesions" and "varied" only when asked for: folders fetched before they existed keep matching
        return {"count": count, "shape": shape, "spacing": spacing, "seed": seed,
                **{flag: True for flag in ("lesions", "varied") if opts.get(flag)}}

    # ------------------------------------------------------------------ sources
    def _card_file(self, name: str) -> CardFile:
        return next(f for f in self.card.files if f.filename == name)

    def _supplied_files(self, src: Path, strict: bool = True) -> dict[str, Path]:
        """Card files that ``--from`` provides, by file name (a folder holding them, or one of them)."""
        names = {f.filename for f in self.card.files}
        if src.is_dir():
            found = {n: src / n for n in names if (src / n).is_file()}
            if not found and strict:
                raise MrivqError(f"--from folder {src} holds none of the card's files; "
                                 f"{from_expectation(self.card)}")
            return found
        if src.name in names:
            return {src.name: src}
        if strict:
            raise MrivqError(f"--from {src} is not one of the files of dataset '{self.card.name}'; "
                             f"{from_expectation(self.card)}")
        return {}

    # ------------------------------------------------------------------ one part
    def _fetch_part(self, cf: CardFile, local: Path | None) -> None:
        if cf.unverified and not cf.checksums:
            self._warn(f"{cf.filename}: no checksum is published ({cf.unverified}); its integrity will "
                       "not be verified")
        self.downloads.mkdir(parents=True, exist_ok=True)
        got: dict[str, str]
        if local is not None and cf.extract:
            got = self._verify_local(local, cf)  # verified in place, extracted straight from it
            source, origin = local, str(local)
        else:
            dest = self.downloads / cf.filename
            if local is not None:
                got = self._copy_verified(local, dest, cf)
                origin = str(local)
            elif dest.is_file():  # verified by a killed run that did not get to place it: check again
                origin = self._url(cf)
                try:
                    got = self._verify_local(dest, cf)
                except ChecksumError:
                    dest.unlink(missing_ok=True)
                    got = self._download(origin, dest, cf)
            else:
                origin = self._url(cf)
                got = self._download(origin, dest, cf)
            source = dest
        with self._staging() as staging:
            if cf.extract:
                with self.progress.task(f"extracting {cf.filename}", total=None, unit="files") as bar:
                    safe_extract(source, staging, callback=lambda _name: bar.advance(1))
            else:
                os.replace(source, staging / cf.filename)  # same file system: a rename, not a copy
            entries = self._place(staging, cf)
        self._write_marker(cf.filename, {"filename": cf.filename, "source": origin,
                                         "modality": cf.modality, "expected": self._expected(cf),
                                         "got": got, "entries": entries})
        if cf.extract and source.parent == self.downloads:
            source.unlink(missing_ok=True)  # archives are not kept once extracted (disk)


def jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def format_size(v: Any) -> str:
    return "x".join(str(s) for s in v) if isinstance(v, (list, tuple)) else str(v)
