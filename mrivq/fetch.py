"""Fetch a dataset described by a card into ``<root>/<name>/`` and write its ``manifest.csv``.

What it guarantees (each has a test in ``tests/test_fetch.py``):

- **Streamed, hashed, resumable downloads.** Each file streams into ``.mrivq/downloads/<file>.part``
  while md5/sha256 are computed; no second read of a multi-GB file. A dropped connection is resumed
  with an HTTP ``Range`` request inside the same call; a rerun after a kill resumes the ``.part`` file.
  On such a rerun the existing partial is hashed once from disk (hash objects cannot be persisted
  portably, and reading N local bytes is far cheaper than downloading them again). A server that
  ignores ``Range`` (answers 200) is handled by truncating and starting over.
- **Retries** with exponential backoff for transient failures (resets, timeouts, short reads, 5xx,
  429); a 4xx, or retries used up, raise a one-line :class:`MrivqError` naming the URL.
- **Verify before extract.** Size and checksums are checked before anything is unpacked; a mismatch
  removes the downloaded file and raises :class:`ChecksumError`, leaving no data files behind.
- **Atomic placement.** Each part is unpacked (:func:`mrivq.archive.safe_extract`) into
  ``<root>/<name>/.staging-XXXX/``, offered to the layout's optional ``prepare``, then renamed into place;
  its completion marker ``.mrivq/done/<file>.json`` is written last. A killed fetch leaves at most a
  staging folder, which the next run removes. ``manifest.csv`` is written with temp + ``os.replace``.
- **Disk use.** Archives are deleted once extracted (IXI is 17 GB); non-archive files (``.nii.gz``,
  ``.xls``, MNIST's ``.gz``) are moved, not copied, into the dataset folder. ``.mrivq/downloads/`` thus
  only ever holds unfinished ``.part`` files or verified files not yet placed.
- **Idempotent and concurrent-safe.** A second fetch of a complete selection makes no request at all;
  two fetches of one dataset serialise on the file lock ``.mrivq/lock``. Nothing complete is ever
  deleted or overwritten on an error.

Where a fetched file lands: an archive's members keep their paths relative to ``<root>/<name>/``; a
non-archive file lands at ``<root>/<name>/<filename>``; a folder given with ``--from`` to a manual card
lands at ``<root>/<name>/<folder name>/``; the builtin phantom writes at ``<root>/<name>/`` directly.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import inspect
import json
import os
import re
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlsplit

from mrivq.archive import kind as archive_kind
from mrivq.archive import safe_extract
from mrivq.atomic import atomic_write_text
from mrivq.catalog import Card, CardFile, dataset_dir, is_archive
from mrivq.errors import ChecksumError, MrivqError, UnsafeArchiveError
from mrivq.progress import Progress, silent

CHUNK = 1 << 20
BUILTIN_DEFAULTS: dict[str, Any] = {"count": 160, "shape": (64, 64, 64), "spacing": 3.0, "seed": 0}
STATE = ".mrivq"
STAGING_PREFIX = ".staging-"
_RESERVED = {STATE, "manifest.csv"}
_TRANSIENT_HTTP = {408, 425, 429}


@dataclass
class FetchResult:
    """What :func:`fetch` did. ``rows`` are the manifest rows (all modalities present on disk)."""

    dataset_dir: Path
    manifest_path: Path
    rows: list[dict[str, str]]
    bytes_downloaded: int = 0
    already_complete: bool = False
    warnings: list[str] = field(default_factory=list)


class _Transient(Exception):
    """A failure worth retrying; ``progressed`` if bytes arrived before it (resets the retry count)."""

    def __init__(self, what: str, *, progressed: bool = False, connect: bool = False) -> None:
        super().__init__(what)
        self.progressed, self.connect = progressed, connect


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
        raise MrivqError(f"--from {src} does not exist; {_from_expectation(card)}")
    if src is not None and card.access == "builtin":
        raise MrivqError(f"dataset '{card.name}' is generated on your machine; --from does not apply")
    if mirror is not None and not re.match(r"^(https?|ftp)://[^/]+", mirror):
        raise MrivqError(f"--mirror {mirror!r} must be an http(s):// or ftp:// URL")
    mods = _check_modalities(card, modalities)
    from mrivq.layouts import get_layout

    layout = get_layout(card.layout)  # fail fast, before any download
    ddir = dataset_dir(root, card.name)
    if card.access == "manual" and src is None and not (ddir / STATE / "done").is_dir():
        raise MrivqError(_manual_help(card))
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
        job = _Fetch(card, ddir, layout, progress, mirror=mirror, retries=retries, timeout=timeout,
                     backoff=backoff)
        return job.run(mods, modalities is not None, src, builtin_options)
    finally:
        lock.release()


def _check_modalities(card: Card, modalities: list[str] | None) -> list[str] | None:
    if modalities is None:
        return None
    by_lower = {m.lower(): m for m in card.modalities}
    out = []
    for m in modalities:
        if m in card.modalities:
            out.append(m)
        elif m.lower() in by_lower:
            out.append(by_lower[m.lower()])
        else:
            choices = ", ".join(card.modalities) or "(this card lists none)"
            raise MrivqError(f"dataset '{card.name}' has no modality '{m}'; choose from {choices}")
    return list(dict.fromkeys(out))


def _from_expectation(card: Card) -> str:
    names = [f.filename for f in card.files]
    if card.access == "manual":
        return "expected the archive (.tar, .tar.gz, .tgz, .zip) or folder downloaded as the card says: " \
               + _instructions_summary(card)
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"expected one of the card's files ({shown}) or a folder holding them"


def _manual_help(card: Card) -> str:
    return (f"dataset '{card.name}' cannot be downloaded automatically: {_instructions_summary(card)} — "
            f"then pass the downloaded file with --from PATH (see `mrivq datasets show {card.name}`)")


def _instructions_summary(card: Card) -> str:
    text = card.instructions.strip().split("\n\n", 1)[0]
    text = " ".join(text.split())
    return text if len(text) <= 400 else text[:397] + "..."


def _hashers(cf: CardFile | None) -> dict[str, Any]:
    algos = list(cf.checksums) if cf is not None else []
    if "sha256" not in algos:
        algos.append("sha256")  # recorded in the completion marker even when the card gives only md5
    return {a: hashlib.new(a) for a in algos}


def _hash_into(path: Path, hashers: dict[str, Any], bar: Any | None = None) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            n += len(chunk)
            if bar is not None:
                bar.advance(len(chunk))
    return n


def _merge_move(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into ``dst``: whole folders by rename when new, else merged; files
    replace same-named files (a re-extraction of the same part after a killed run)."""
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir() and not target.is_symlink():
                _merge_move(entry, target)
            elif target.exists() or target.is_symlink():
                raise MrivqError(f"cannot place folder {entry.name} in {dst}: a file of that name exists")
            else:
                os.rename(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                raise MrivqError(f"cannot place file {entry.name} in {dst}: a folder of that name exists")
            os.replace(entry, target)


class _Fetch:
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
            raise MrivqError(_manual_help(self.card))
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
            raise MrivqError(f"--from {src} is not a folder or an archive; {_from_expectation(self.card)}")
        return self._finish()

    def _run_builtin(self, mods: list[str] | None, options: dict[str, Any] | None) -> FetchResult:
        opts = self._builtin_options(options)
        modalities = mods if mods is not None else list(self.card.modalities)
        marker = self._marker("builtin")
        if marker is not None:
            had = marker.get("options", {})
            had_mods = marker.get("modalities", [])
            if {k: had.get(k) for k in opts} == _jsonable(opts) and set(modalities) <= set(had_mods):
                if self._manifest_current():
                    return self._complete()
                return self._finish()
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in had.items())
            raise MrivqError(f"dataset '{self.card.name}' already exists at {self.ddir} with other options "
                             f"({shown}, modalities={','.join(had_mods)}); remove that folder (or use "
                             "another --root) to generate it again with these options")
        from mrivq.phantom import write_dataset

        kwargs: dict[str, Any] = dict(count=opts["count"], shape=tuple(opts["shape"]), spacing=opts["spacing"],
                                      seed=opts["seed"], modalities=list(modalities))
        if "progress" in inspect.signature(write_dataset).parameters:
            kwargs["progress"] = self.progress  # it shows its own bar
        with self._staging() as staging:
            write_dataset(staging, **kwargs)
            entries = self._place(staging, None)
        self._write_marker("builtin", {"options": _jsonable(opts), "modalities": list(modalities),
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
        return {"count": count, "shape": shape, "spacing": spacing, "seed": seed}

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
                                 f"{_from_expectation(self.card)}")
            return found
        if src.name in names:
            return {src.name: src}
        if strict:
            raise MrivqError(f"--from {src} is not one of the files of dataset '{self.card.name}'; "
                             f"{_from_expectation(self.card)}")
        return {}

    def _url(self, cf: CardFile) -> str:
        if self.mirror:
            return self.mirror.rstrip("/") + "/" + quote(cf.filename)
        assert cf.url is not None
        return cf.url

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
            if name in _RESERVED or name.startswith(STAGING_PREFIX):
                what = cf.filename if cf is not None else "the source"
                raise UnsafeArchiveError(f"{what} contains a top-level {name!r}, a name mrivq uses for its "
                                         "own bookkeeping; refusing to place it")
        _merge_move(staging, self.ddir)
        return entries

    # ------------------------------------------------------------------ verification
    def _check(self, cf: CardFile, size: int, hashers: dict[str, Any], origin: str, *,
               bad: Path | None, todo: str | None = None) -> dict[str, str]:
        """Compare with the card; on mismatch remove ``bad`` (our own copy) and raise ChecksumError."""
        got = {a: h.hexdigest() for a, h in hashers.items()}
        problem = None
        if cf.size is not None and size != cf.size:
            problem = f"size is {size} bytes, expected {cf.size}"
        else:
            for algo, want in cf.checksums.items():
                if got.get(algo) != want:
                    problem = f"{algo} is {got.get(algo)}, expected {want}"
                    break
        if problem is None:
            return got
        if bad is not None:
            bad.unlink(missing_ok=True)
        if todo is None:
            todo = ("the bad download was removed; run the fetch again, or use --mirror URL / --from PATH"
                    if bad is not None else
                    "the file was left as it is; check that it is the right file, or fetch it again")
        raise ChecksumError(f"{cf.filename} from {origin}: {problem}; {todo}")

    def _verify_local(self, path: Path, cf: CardFile) -> dict[str, str]:
        hashers = _hashers(cf)
        with self.progress.task(f"checking {path.name}", total=path.stat().st_size, unit="B") as bar:
            n = _hash_into(path, hashers, bar)
        return self._check(cf, n, hashers, str(path), bad=None)

    def _copy_verified(self, src: Path, dest: Path, cf: CardFile) -> dict[str, str]:
        part = dest.with_name(dest.name + ".part")
        hashers = _hashers(cf)
        n = 0
        try:
            with open(src, "rb") as fin, open(part, "wb") as fout, \
                    self.progress.task(f"copying {src.name}", total=src.stat().st_size, unit="B") as bar:
                while chunk := fin.read(CHUNK):
                    fout.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    n += len(chunk)
                    bar.advance(len(chunk))
        except OSError as e:
            part.unlink(missing_ok=True)
            raise MrivqError(f"cannot copy {src} into {dest.parent}: {e.strerror or e}") from None
        got = self._check(cf, n, hashers, str(src), bad=part,
                          todo="your file was left as it is; check that it is the right one")
        os.replace(part, dest)
        return got

    # ------------------------------------------------------------------ download
    def _download(self, url: str, dest: Path, cf: CardFile) -> dict[str, str]:
        part = dest.with_name(dest.name + ".part")
        hashers = _hashers(cf)
        offset = 0
        if part.exists():
            offset = part.stat().st_size
            if cf.size is not None and offset > cf.size:
                part.unlink()
                offset = 0
            elif offset:
                # Resuming after a killed run: hash the bytes already on disk once (see module doc).
                _hash_into(part, hashers)
        st = _Partial(part, offset, hashers)
        with self.progress.task(cf.filename, total=cf.size, unit="B") as bar:
            bar.reset(offset)
            failures = 0
            last = ""
            ever_connected = False
            while not (cf.size is not None and st.offset == cf.size):
                try:
                    if self._attempt(url, st, cf, bar):
                        break
                    ever_connected = True
                except _Transient as e:
                    ever_connected = ever_connected or not e.connect
                    failures = 1 if e.progressed else failures + 1
                    last = str(e)
                    if failures > self.retries:
                        host = urlsplit(url).hostname or url
                        if not ever_connected:
                            raise MrivqError(f"cannot reach {host} ({last}) after {failures} tries; check "
                                             "the network, fetch from another server with --mirror URL, "
                                             "or pass files you already have with --from PATH") from None
                        raise MrivqError(f"download of {url} failed after {failures} tries ({last}); run "
                                         "the fetch again to resume, or use --mirror URL / --from PATH") \
                            from None
                    time.sleep(min(self.backoff * 2 ** (failures - 1), 60.0))
        got = self._check(cf, st.offset, st.hashers, url, bad=part)
        os.replace(part, dest)
        return got

    def _attempt(self, url: str, st: _Partial, cf: CardFile, bar: Any) -> bool:
        """One request; returns True when the file is complete, raises _Transient to retry."""
        from mrivq import __version__

        headers = {"User-Agent": f"mrivq/{__version__}", "Accept-Encoding": "identity"}
        if st.offset:
            headers["Range"] = f"bytes={st.offset}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            code, reason, hdrs = e.code, e.reason, e.headers
            e.close()
            if code == 416 and st.offset:
                total = _range_total(hdrs.get("Content-Range", "") if hdrs else "")
                if total is not None and total == st.offset:
                    return True  # the partial already holds the whole file
                st.restart()
                bar.reset(0)
                raise _Transient("range not satisfiable; starting over", progressed=True) from None
            if code in _TRANSIENT_HTTP or 500 <= code < 600:
                raise _Transient(f"HTTP {code} {reason}") from None
            hint = " (is the --mirror right?)" if self.mirror else ""
            raise MrivqError(f"download failed: HTTP {code} {reason} for {url}{hint}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                host = urlsplit(url).hostname or url
                raise MrivqError(f"cannot reach {host} (name lookup failed); check the network, fetch from "
                                 "another server with --mirror URL, or pass files you already have with "
                                 "--from PATH") from None
            raise _Transient(str(e.reason), connect=True) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise _Transient(f"{type(e).__name__}: {e}", connect=True) from None
        with resp:
            status = resp.status
            if st.offset and status == 206:
                start = _range_start(resp.headers.get("Content-Range", ""))
                if start != st.offset:
                    st.restart()
                    bar.reset(0)
                    raise _Transient("server answered a different range; starting over", progressed=True)
            elif st.offset:  # 200 to a Range request: the server ignores Range, take the whole file
                st.restart()
                bar.reset(0)
            length = resp.headers.get("Content-Length")
            expect = int(length) if length and length.isdigit() else None
            if cf.size is not None and expect is not None and st.offset + expect != cf.size:
                st.part.unlink(missing_ok=True)
                raise ChecksumError(f"{cf.filename} from {url}: the server offers {st.offset + expect} "
                                    f"bytes, expected {cf.size}; nothing was kept — check the card or use "
                                    "--mirror URL / --from PATH")
            received = 0
            try:
                fh = open(st.part, "ab" if st.offset else "wb")
            except OSError as e:
                raise MrivqError(f"cannot write {st.part}: {e.strerror or e}") from None
            with fh:
                while True:
                    try:
                        chunk = resp.read1(CHUNK)  # what has arrived, up to CHUNK
                    except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                        raise _Transient(f"{type(e).__name__}: {e}", progressed=received > 0) from None
                    if not chunk:
                        break
                    try:
                        fh.write(chunk)
                    except OSError as e:
                        raise MrivqError(f"cannot write {st.part}: {e.strerror or e}") from None
                    for h in st.hashers.values():
                        h.update(chunk)
                    n = len(chunk)
                    st.offset += n
                    received += n
                    self.bytes += n
                    bar.advance(n)
                    if cf.size is not None and st.offset > cf.size:
                        break  # too long: the size check will reject it
            if expect is not None and received < expect:
                raise _Transient(f"connection closed after {received} of {expect} bytes",
                                 progressed=received > 0)
            return True


class _Partial:
    """A ``.part`` file being written and the hash state of the bytes it holds."""

    def __init__(self, part: Path, offset: int, hashers: dict[str, Any]) -> None:
        self.part, self.offset, self.hashers = part, offset, hashers

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.offset = 0
        self.hashers = {a: hashlib.new(a) for a in self.hashers}


def _range_start(content_range: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", content_range)
    return int(m.group(1)) if m else None


def _range_total(content_range: str) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", content_range)
    return int(m.group(1)) if m else None


def _jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}


def _fmt(v: Any) -> str:
    return "x".join(str(s) for s in v) if isinstance(v, (list, tuple)) else str(v)
