"""Plain-text progress lines (CI logs, pipes): counts and rates."""

from __future__ import annotations

import io

import mrivq.utils.progress as P


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_resumed_task_rate_counts_only_new_work(monkeypatch) -> None:
    """A run resumed at step 7000 that does 100 steps in 10 s reports 10 step/s, not 710."""
    clock = Clock()
    monkeypatch.setattr(P.time, "monotonic", clock)
    out = io.StringIO()
    with P.Progress(enabled=True, stream=out) as prog, prog.task("train", total=14000, unit="step",
                                                                 start=7000) as bar:
        clock.t += 10.0
        bar.advance(100)
    last = out.getvalue().strip().splitlines()[-1]
    assert last == "train: 7100 step/14000 step (10 step/s)"


def test_reset_restarts_the_rate(monkeypatch) -> None:
    """A download that falls back to a whole transfer measures its rate from the restart."""
    clock = Clock()
    monkeypatch.setattr(P.time, "monotonic", clock)
    out = io.StringIO()
    with P.Progress(enabled=True, stream=out) as prog, prog.task("x.tar", total=4096, unit="B") as bar:
        clock.t += 100.0
        bar.advance(2048)
        bar.reset(0)
        clock.t += 2.0
        bar.advance(2048)
    assert out.getvalue().strip().splitlines()[-1] == "x.tar: 2.0 KB/4.0 KB (1.0 KB/s)"


def test_silent_progress_prints_nothing() -> None:
    out = io.StringIO()
    with P.Progress(enabled=False, stream=out) as prog, prog.task("t", total=3) as bar:
        bar.advance(3)
    assert out.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_bar_shows_bytes_and_rate(monkeypatch) -> None:
    """On a terminal the rich bar shows done/total bytes and the transfer rate, not just a percent."""
    clock = Clock()
    monkeypatch.setattr(P.time, "monotonic", clock)
    out = Terminal()
    with P.Progress(enabled=True, stream=out) as prog, prog.task("IXI-T1.tar", total=4 * 2**20,
                                                                 unit="B") as bar:
        clock.t += 2.0
        bar.advance(2**20)
        assert bar.counts() == "1.0 MB/4.0 MB (512.0 KB/s)"
        bar.advance(3 * 2**20)
    assert "4.0 MB/4.0 MB" in out.getvalue()
