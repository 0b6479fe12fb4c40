"""HTTP download with resume: one file streams into ``<file>.part`` while it is hashed, a dropped
connection is resumed with a ``Range`` request, transient failures (resets, timeouts, short reads,
5xx, 429) are retried with exponential backoff, and a server that ignores ``Range`` is handled by
starting over. Also the URL of a card file (its own, or under ``--mirror``).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from mrivq.datasets.catalog import CardFile
from mrivq.datasets.fetch.verify import CHUNK, hash_into, new_hashers
from mrivq.utils.errors import ChecksumError, MrivqError

TRANSIENT_HTTP = {408, 425, 429}


class Transient(Exception):
    """A failure worth retrying; ``progressed`` if bytes arrived before it (resets the retry count)."""

    def __init__(self, what: str, *, progressed: bool = False, connect: bool = False) -> None:
        super().__init__(what)
        self.progressed, self.connect = progressed, connect


class Downloader:
    """Methods of :class:`mrivq.datasets.fetch.job.FetchJob` (which sets the attributes they use):
    the URL of a card file, resumable downloads with retries."""

    def _url(self, cf: CardFile) -> str:
        if self.mirror:
            return self.mirror.rstrip("/") + "/" + quote(cf.filename)
        assert cf.url is not None
        return cf.url

    # ------------------------------------------------------------------ download
    def _download(self, url: str, dest: Path, cf: CardFile) -> dict[str, str]:
        part = dest.with_name(dest.name + ".part")
        hashers = new_hashers(cf)
        offset = 0
        if part.exists():
            offset = part.stat().st_size
            if cf.size is not None and offset > cf.size:
                part.unlink()
                offset = 0
            elif offset:
                # Resuming after a killed run: hash the bytes already on disk once (see the mrivq.datasets.fetch doc).
                hash_into(part, hashers)
        st = Partial(part, offset, hashers)
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
                except Transient as e:
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

    def _attempt(self, url: str, st: Partial, cf: CardFile, bar: Any) -> bool:
        """One request; returns True when the file is complete, raises Transient to retry."""
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
                total = range_total(hdrs.get("Content-Range", "") if hdrs else "")
                if total is not None and total == st.offset:
                    return True  # the partial already holds the whole file
                st.restart()
                bar.reset(0)
                raise Transient("range not satisfiable; starting over", progressed=True) from None
            if code in TRANSIENT_HTTP or 500 <= code < 600:
                raise Transient(f"HTTP {code} {reason}") from None
            hint = " (is the --mirror right?)" if self.mirror else ""
            raise MrivqError(f"download failed: HTTP {code} {reason} for {url}{hint}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                host = urlsplit(url).hostname or url
                raise MrivqError(f"cannot reach {host} (name lookup failed); check the network, fetch from "
                                 "another server with --mirror URL, or pass files you already have with "
                                 "--from PATH") from None
            raise Transient(str(e.reason), connect=True) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            raise Transient(f"{type(e).__name__}: {e}", connect=True) from None
        with resp:
            status = resp.status
            if st.offset and status == 206:
                start = range_start(resp.headers.get("Content-Range", ""))
                if start != st.offset:
                    st.restart()
                    bar.reset(0)
                    raise Transient("server answered a different range; starting over", progressed=True)
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
                        raise Transient(f"{type(e).__name__}: {e}", progressed=received > 0) from None
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
                raise Transient(f"connection closed after {received} of {expect} bytes",
                                 progressed=received > 0)
            return True


class Partial:
    """A ``.part`` file being written and the hash state of the bytes it holds."""

    def __init__(self, part: Path, offset: int, hashers: dict[str, Any]) -> None:
        self.part, self.offset, self.hashers = part, offset, hashers

    def restart(self) -> None:
        self.part.unlink(missing_ok=True)
        self.offset = 0
        self.hashers = {a: hashlib.new(a) for a in self.hashers}


def range_start(content_range: str) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)", content_range)
    return int(m.group(1)) if m else None


def range_total(content_range: str) -> int | None:
    m = re.match(r"\s*bytes\s+(?:\*|\d+-\d+)/(\d+)", content_range)
    return int(m.group(1)) if m else None
