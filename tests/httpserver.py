"""A real HTTP file server on 127.0.0.1 for the fetch tests (no request mocking).

It serves in-memory files that a test registers, and can misbehave on purpose:

- ``range_support=False``: ignore ``Range`` and always answer 200 with the whole file
- ``cut_after[name] = n``: send only ``n`` body bytes of the next response for ``name``, then drop the
  connection (once)
- ``fail_first[name] = k``: answer ``503`` to the first ``k`` requests for ``name``
- ``status[name] = code``: always answer ``code`` (e.g. 403) for ``name``
- ``delay``: seconds to sleep after each 4 KiB written (to keep a download in flight)

and counts what it did: ``bytes_sent`` (body bytes written), ``requests`` (list of
``(name, range_header, status)``), ``count(name)``.

    with FileServer() as srv:
        srv.add("a.tar", data)
        url = srv.url("a.tar")
"""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_BLOCK = 4096


class FileServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.files: dict[str, bytes] = {}
        self.range_support = True
        self.cut_after: dict[str, int] = {}
        self.fail_first: dict[str, int] = {}
        self.status: dict[str, int] = {}
        self.delay = 0.0
        self.bytes_sent = 0
        self.requests: list[tuple[str, str | None, int]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- control
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return self.url(name)

    def count(self, name: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if name is None or r[0] == name)

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.requests.clear()

    def start(self) -> FileServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- bookkeeping (handler side)
    def _record(self, name: str, rng: str | None, status: int) -> None:
        with self._lock:
            self.requests.append((name, rng, status))

    def _sent(self, n: int) -> None:
        with self._lock:
            self.bytes_sent += n

    def _take_failure(self, name: str) -> bool:
        with self._lock:
            k = self.fail_first.get(name, 0)
            if k > 0:
                self.fail_first[name] = k - 1
                return True
            return False

    def _take_cut(self, name: str) -> int | None:
        with self._lock:
            return self.cut_after.pop(name, None)


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _plain(self, code: int, name: str, rng: str | None, extra: dict[str, str] | None = None) -> None:
            server._record(name, rng, code)
            body = f"{code}\n".encode()
            self.send_response(code)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            name = unquote(urlsplit(self.path).path).lstrip("/")
            rng = self.headers.get("Range")
            if name in server.status:
                return self._plain(server.status[name], name, rng)
            if name not in server.files:
                return self._plain(404, name, rng)
            if server._take_failure(name):
                return self._plain(503, name, rng)
            data = server.files[name]
            total = len(data)
            start, end, code = 0, total - 1, 200
            m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
            if server.range_support and m:
                start = int(m.group(1))
                if m.group(2):
                    end = min(int(m.group(2)), total - 1)
                if start >= total:
                    return self._plain(416, name, rng, {"Content-Range": f"bytes */{total}"})
                code = 206
            server._record(name, rng, code)
            body = data[start:end + 1]
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if code == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
            if server.range_support:
                self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = server._take_cut(name)
            limit = len(body) if cut is None else min(cut, len(body))
            pos = 0
            try:
                while pos < limit:
                    block = body[pos:min(pos + _BLOCK, limit)]
                    self.wfile.write(block)
                    self.wfile.flush()
                    server._sent(len(block))
                    pos += len(block)
                    if server.delay:
                        time.sleep(server.delay)
            except (BrokenPipeError, ConnectionResetError):
                return
            if cut is not None:  # drop the connection mid-body
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    return Handler
