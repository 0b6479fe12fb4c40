"""What every benchmark prints: its figures with the machine and the command, as JSON."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path


def cli(*args: str) -> float:
    """Run ``mrivq ARGS`` as a user would, in a subprocess; return its wall-clock seconds."""
    import time

    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mrivq", *args], check=True)
    return time.perf_counter() - t


def quickstart_run(run: Path, root: Path) -> Path:
    """The README quick start's run at ``run`` (phantom fetched into ``root``), trained unless it is
    already, resumed if it was cut off."""
    if not (run / "checkpoints" / "prior_best.pt").is_file():
        cli("fetch", "phantom", "--root", str(root))
        cli("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu",
            "--out", str(run), *(["--resume"] if (run / "run.json").exists() else []))
    return run


def emit(out: dict, path: str | Path | None = None) -> None:
    """Print ``out`` with ``machine``, ``command`` and ``date`` added, as indented JSON; also write it to
    ``path``."""
    import datetime

    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    out = {"machine": machine, **out, "command": "python " + shlex.join(sys.argv),
           "date": datetime.date.today().isoformat()}
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
