"""The README's and the documentation's fenced examples run, on the tiny phantom and the tiny trained run.

Every ```` ```bash ```` fence either holds only ``mrivq`` commands, which run here through the console entry
point in a folder where ``data/`` is the tiny phantom and ``runs/quickstart`` the tiny run, or says in its
info string why it cannot run here (```` ```bash skip="needs the network" ````). Every ```` ```python ````
fence runs in the same kind of folder. So an example that stops working fails here, not in a reader's hands.

Examples keep their real sizes; this runner makes them tiny: a phantom fetch without ``--count`` gets the
fixture's size, a new training run gets the tiny model settings (``tests.helpers.TINY``) and two steps per
stage, and ``phantom:val`` becomes ``phantom:all`` because the tiny phantom holds one validation subject where
realism statistics need four.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.helpers import TINY, mrivq_main

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.parts)
FENCE = re.compile(r"^```(\S*)(.*?)\n(.*?)^```\s*$", re.M | re.S)
TINY_PHANTOM = ["--count", "6", "--shape", "32", "32", "32", "--spacing", "6"]
SLOW = re.compile(r"^mrivq (train|eval)\b", re.M)


def fences() -> list[tuple[str, str, str, str]]:
    """(page, language, info, body) of every fenced block of the pages."""
    found = []
    for page in PAGES:
        for m in FENCE.finditer(page.read_text()):
            found.append((str(page.relative_to(ROOT)), m.group(1), m.group(2).strip(), m.group(3)))
    return found


def commands(body: str) -> list[list[str]]:
    """A shell fence's commands: continuation lines joined, comments dropped, split like a shell."""
    joined = re.sub(r"\\\n", " ", body)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


RUNNABLE = [f for f in fences() if f[1] in ("bash", "sh", "console", "python") and "skip=" not in f[2]]
SKIPPED = [f for f in fences() if "skip=" in f[2]]


def _param(f: tuple[str, str, str, str]) -> object:
    marks = [pytest.mark.slow] if SLOW.search(f[3]) else []
    first = f[3].strip().splitlines()[0][:50] if f[3].strip() else ""
    return pytest.param(f, id=f"{f[0]}:{first}", marks=marks)


@pytest.fixture
def workdir(tmp_path: Path, phantom_root: Path, trained_run: Path) -> Path:
    """A folder with ``data/`` (the tiny phantom) and ``runs/quickstart`` (the tiny run, pointing there)."""
    shutil.copytree(phantom_root, tmp_path / "data")
    run = tmp_path / "runs" / "quickstart"
    shutil.copytree(trained_run, run)
    info = json.loads((run / "run.json").read_text())
    info["data_dir"] = str(tmp_path / "data" / "phantom")
    (run / "run.json").write_text(json.dumps(info))
    return tmp_path


def tiny(words: list[str], cwd: Path) -> list[str]:
    """The example's arguments with the runner's tiny settings (see the module docstring)."""
    args = ["phantom:all" if w == "phantom:val" else w for w in words[1:]]
    if args[:2] == ["fetch", "phantom"] and "--count" not in args:
        args += TINY_PHANTOM
    if args[:1] == ["train"] and "--resume" not in args and "--run" not in args:
        out = args[args.index("--out") + 1] if "--out" in args else None
        if out and (cwd / out).exists():
            shutil.rmtree(cwd / out)  # the quick start trains into runs/quickstart: train it again, tiny
        args += [*TINY, "--device", "cpu", "--max-steps", "2", "--prior-max-steps", "2"]
    if args[:1] in (["synth"], ["eval"], ["score"], ["encode"], ["decode"], ["reconstruct"]) and "--device" not in args:
        args += ["--device", "cpu"] if args[0] in ("synth", "eval") else []
    return args


def test_every_example_fence_runs_or_says_why_not() -> None:
    """A shell fence with anything but ``mrivq`` commands must carry a skip reason; skips stay few."""
    for page, lang, info, body in fences():
        if lang in ("bash", "sh", "console") and "skip=" not in info:
            other = [w for w in commands(body) if w[0] != "mrivq"]
            assert not other, f"{page}: a runnable shell fence holds {' '.join(other[0])!r}; mark it skip=\"why\""
        if "skip=" in info:
            assert re.search(r'skip="[^"]+"', info), f"{page}: a skip marker needs its reason, skip=\"why\""
    assert len(SKIPPED) <= 10, [f[0] for f in SKIPPED]
    assert any(f[0] == "README.md" and "mrivq train" in f[3] for f in RUNNABLE)


@pytest.mark.parametrize("fence", [_param(f) for f in RUNNABLE])
def test_example_runs(fence: tuple[str, str, str, str], workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page, lang, _, body = fence
    if lang == "python":
        monkeypatch.chdir(workdir)
        exec(compile(body, f"{page} (example)", "exec"), {"__name__": "__example__"})  # noqa: S102
        return
    for words in commands(body):
        res = mrivq_main(*tiny(words, workdir), cwd=workdir)
        assert res.returncode == 0, f"{page}: {' '.join(words)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
