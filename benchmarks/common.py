"""What every benchmark prints: its figures with the machine and the command, as JSON."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path


def emit(out: dict, path: str | Path | None = None) -> None:
    """Print ``out`` with ``machine`` and ``command`` added, as indented JSON; also write it to ``path``."""
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    out = {"machine": machine, **out, "command": "python " + " ".join(sys.argv)}
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
