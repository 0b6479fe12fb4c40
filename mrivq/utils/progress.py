"""Progress reporting: rich bars on a terminal, plain periodic lines otherwise (CI logs, pipes).

Library code takes an optional ``Progress``-like object created with :func:`progress`; it never
prints on its own, so the CLI decides what the user sees.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO


class _Task:
    """Handle for one bar: ``advance(n)``, ``set(**fields)`` to show extra values (loss, rate)."""

    def __init__(self, bar: Any, task_id: Any, total: float | None, desc: str, unit: str,
                 stream: TextIO | None, start: float = 0) -> None:
        self._bar, self._id, self.total, self.desc, self.unit = bar, task_id, total, desc, unit
        self._stream = stream
        self.completed = float(start)
        self._base = float(start)  # the rate counts only work done since start/reset (resumed runs)
        self.fields: dict[str, Any] = {}
        self._t0 = time.monotonic()
        self._last_print = 0.0

    def advance(self, n: float = 1) -> None:
        self.completed += n
        if self._bar is not None:
            self._bar.update(self._id, advance=n, fields=self._fmt(), counts=self.counts())
        else:
            self._maybe_print()

    def counts(self) -> str:
        """``done/total (rate/s)``, e.g. ``1.2 GB/4.5 GB (38.0 MB/s)``; the rate leaves out work done
        before ``start``/``reset``."""
        done = _human(self.completed, self.unit)
        tot = f"/{_human(self.total, self.unit)}" if self.total else ""
        rate = (self.completed - self._base) / max(time.monotonic() - self._t0, 1e-9)
        return f"{done}{tot} ({_human(rate, self.unit)}/s)"

    def reset(self, completed: float = 0) -> None:
        """Restart the count (e.g. a download falling back to a whole transfer)."""
        self.completed = self._base = completed
        self._t0 = time.monotonic()
        if self._bar is not None:
            self._bar.reset(self._id, completed=completed)

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._id, fields=self._fmt())

    def _fmt(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def _maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._stream is None or (not force and now - self._last_print < 10.0):
            return
        self._last_print = now
        extra = f"  {self._fmt()}" if self.fields else ""
        print(f"{self.desc}: {self.counts()}{extra}", file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is None:
            self._maybe_print(force=True)


def _human(x: float | None, unit: str) -> str:
    if x is None:
        return "?"
    if unit != "B":
        return f"{x:.0f} {unit}" if float(x).is_integer() else f"{x:.1f} {unit}"
    for u in ("B", "KB", "MB", "GB", "TB"):
        if abs(x) < 1024 or u == "TB":
            return f"{x:.1f} {u}" if u != "B" else f"{int(x)} B"
        x /= 1024
    return f"{x} B"


class Progress:
    """A group of bars. ``enabled=False`` silences everything (library default)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._rich = None

    def __enter__(self) -> Progress:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[counts]}"), TimeRemainingColumn(),
                TextColumn("{task.fields[fields]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def note(self, message: str) -> None:
        """A one-line message between the bars (e.g. why a stage starts again)."""
        if self._rich is not None:
            self._rich.console.print(message)
        elif self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def task(self, desc: str, total: float | None = None, unit: str = "it",
             start: float = 0) -> Iterator[_Task]:
        """A bar for one job; ``unit="B"`` shows bytes and transfer rate; ``start``: already done
        (a resumed run), shown as done but left out of the rate."""
        if self._rich is not None:
            tid = self._rich.add_task(desc, total=total, completed=start, fields="", counts="")
            t = _Task(self._rich, tid, total, desc, unit, None, start)
        else:
            t = _Task(None, None, total, desc, unit, self.stream if self.enabled else None, start)
        try:
            yield t
        finally:
            t.close()
            if self._rich is not None:
                self._rich.update(tid, counts=t.counts())


def silent() -> Progress:
    """A Progress that shows nothing (the default for library calls)."""
    return Progress(enabled=False)
