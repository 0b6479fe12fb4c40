"""Checksum verification: the hash objects for a card file (sha256 always, plus what the card
publishes), hashing a file from disk, comparing size and checksums with the card before anything is
unpacked (a mismatch removes our own bad copy and raises :class:`ChecksumError`), and copying a
``--from`` file while hashing it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mrivq.datasets.catalog import CardFile
from mrivq.utils.errors import ChecksumError, MrivqError

CHUNK = 1 << 20


def new_hashers(cf: CardFile | None) -> dict[str, Any]:
    algos = list(cf.checksums) if cf is not None else []
    if "sha256" not in algos:
        algos.append("sha256")  # recorded in the completion marker even when the card gives only md5
    return {a: hashlib.new(a) for a in algos}


def hash_into(path: Path, hashers: dict[str, Any], bar: Any | None = None) -> int:
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            n += len(chunk)
            if bar is not None:
                bar.advance(len(chunk))
    return n


class Verifier:
    """Methods of :class:`mrivq.datasets.fetch.job.FetchJob` (which sets the attributes they use):
    size and checksum checks against the card."""

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
        hashers = new_hashers(cf)
        with self.progress.task(f"checking {path.name}", total=path.stat().st_size, unit="B") as bar:
            n = hash_into(path, hashers, bar)
        return self._check(cf, n, hashers, str(path), bad=None)

    def _copy_verified(self, src: Path, dest: Path, cf: CardFile) -> dict[str, str]:
        part = dest.with_name(dest.name + ".part")
        hashers = new_hashers(cf)
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
