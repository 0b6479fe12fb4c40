"""The run directory: the only thing the stages share.

Layout::

    <run>/config.yaml           resolved config (data preprocessing, model, train, prior)
    <run>/run.json              what a later command needs: dataset, latent shape, intensity range
    <run>/checkpoints/          {vqvae,prior}_{last,best}.pt, written atomically
    <run>/metrics.jsonl         one JSON line per logged step (field "stage")
    <run>/previews/             input | reconstruction PNGs
    <run>/codes/                code grids of the training/validation sets (prior stage)

Everything here is written write-then-rename so a crash never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from mrivq.utils import distributed as ddp
from mrivq.utils.atomic import atomic_write_bytes, atomic_write_text
from mrivq.utils.errors import MrivqError, RunError

RUN_MARKER = "run.json"

#: volumes decoded at once (synth, fitting the calibration): the decoder's activations at full
#: resolution are what takes memory
DECODE_BATCH = 4


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_checkpoint(path: Path, state: dict) -> str:
    """Atomically save a checkpoint; returns its sha256 (recorded in outputs for provenance)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``: no arbitrary pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist; train the stage first or pass another --run")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt / truncated / not a checkpoint
        raise RunError(f"checkpoint {path} cannot be read ({type(e).__name__}); it may be truncated or "
                       f"not an mrivq checkpoint") from None


def load_weights(module: torch.nn.Module, ck: dict, path: Path) -> None:
    """``module.load_state_dict(ck["model"])``, refused in one line when the checkpoint holds no model or
    another model's weights (a damaged run folder, or a checkpoint copied from another run)."""
    state = ck.get("model") if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path} holds no model weights; the run folder is damaged (train again or "
                       "restore the file)")
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        what = " ".join(str(e).split())[:160]
        raise RunError(f"checkpoint {path} does not fit the run's model ({what}); it belongs to another run "
                       "or the run folder is damaged") from None


def load_codes(path: Path) -> dict | None:
    """A run's code cache (``codes/codes.pt``), or None when it is unreadable or not a cache."""
    try:
        codes = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, random bytes, another kind of file: rebuild or refuse where it is used
        return None
    return codes if isinstance(codes, dict) and "train" in codes else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_run_dir(base: Path, dataset: str, modality: str, dims: int) -> Path:
    """``runs/<dataset>-<modality>-<dims>d-<timestamp>`` (suffixed if it already exists)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{dataset}-{modality}-{dims}d-{stamp}"
    i = 1
    while path.exists():
        i += 1
        path = Path(base) / f"{dataset}-{modality}-{dims}d-{stamp}-{i}"
    return path


def is_run(path: Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


LOCK_NAME = ".lock"


def check_run_folder(path: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder that holds other files than a run's."""
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file; choose a folder for the run")
    if path.is_dir() and not is_run(path):
        others = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
        if others:
            raise RunError(f"--out {path} exists and is not an mrivq run (it holds {', '.join(others[:3])}"
                           f"{', ...' if len(others) > 3 else ''}); choose a new or empty folder")


@contextlib.contextmanager
def run_lock(path: Path) -> Iterator[None]:
    """Hold the run folder's file lock for a training (rank 0 only under torchrun): a second
    ``mrivq train`` into the same folder is refused at once instead of mixing checkpoints and metrics.
    The folder is created if needed; one that exists and holds other files than a run's is refused, so
    that a training never writes into (or over) a user's folder."""
    from filelock import FileLock, Timeout

    path = Path(path)
    if not ddp.is_main():
        yield
        return
    check_run_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"{path} is in use by another `mrivq train` (lock {path / LOCK_NAME}); wait for it to "
                       "finish or choose another --out") from None
    try:
        yield
    finally:
        lock.release()


def resolve_run(run: str | Path | None, base: Path = Path("runs")) -> Path:
    """A run folder: the given one (validated), or the most recent run under ``base``."""
    if run is not None:
        path = Path(run)
        if not path.exists():
            raise RunError(f"run folder {path} does not exist; pass a folder made by `mrivq train`")
        if not is_run(path):
            raise RunError(f"{path} is not an mrivq run (no {RUN_MARKER}); pass a folder made by `mrivq train`")
        return path
    candidates = [p for p in Path(base).glob("*") if is_run(p)] if Path(base).is_dir() else []
    if not candidates:
        raise RunError(f"no runs under {base}/; train one with `mrivq train` or pass --run")
    return max(candidates, key=lambda p: (p / RUN_MARKER).stat().st_mtime)


def read_run_info(path: Path) -> dict:
    try:
        info = json.loads((Path(path) / RUN_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise RunError(f"{path}/{RUN_MARKER} cannot be read; the run folder is damaged") from None
    if not isinstance(info, dict):
        raise RunError(f"{path}/{RUN_MARKER} is not a JSON object; the run folder is damaged")
    return info


def update_run_info(path: Path, **fields: Any) -> dict:
    """Merge ``fields`` into run.json (under torchrun only rank 0 writes; the others wait at a barrier
    where they need it)."""
    info = read_run_info(path) if is_run(path) else {}
    info.update(fields)
    if ddp.is_main():
        write_json(Path(path) / RUN_MARKER, info)
    return info


class RunFolder:
    """One run folder: its paths, its ``run.json`` read once and written back atomically, its lock.

    Training passes one of these from stage to stage instead of a path, so run state is read from disk
    once and every change goes through :meth:`update`. Under torchrun every rank makes the same updates
    (each keeps its copy current) and rank 0 alone writes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._info: dict | None = None

    @property
    def info(self) -> dict:
        """``run.json`` (empty for a folder that is not a run yet), read on first use."""
        if self._info is None:
            self._info = read_run_info(self.path) if is_run(self.path) else {}
        return self._info

    def update(self, **fields: Any) -> dict:
        """Merge ``fields`` into ``run.json`` and write it back (rank 0)."""
        self.info.update(fields)
        if ddp.is_main():
            write_json(self.path / RUN_MARKER, self.info)
        return self.info

    def stage_done(self, stage: str, **record: Any) -> None:
        """Record a finished (or stopped) stage under ``stages``."""
        self.update(stages={**self.info.get("stages", {}), stage: record})

    @property
    def config(self) -> dict:
        return read_config(self.path)

    def checkpoint(self, stage: str, which: str = "best") -> Path:
        return checkpoint_path(self.path, stage, which)

    @property
    def codes(self) -> Path:
        return codes_path(self.path)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return run_lock(self.path)


def read_config(path: Path) -> dict:
    from mrivq.utils.limits import read_yaml_file

    try:
        cfg = read_yaml_file(Path(path) / "config.yaml", f"{path}/config.yaml") or {}
    except MrivqError as e:
        raise RunError(f"{e}; the run folder is damaged") from None
    if not isinstance(cfg, dict):
        raise RunError(f"{path}/config.yaml is not a mapping of sections; the run folder is damaged")
    return cfg


def write_config(path: Path, cfg: dict) -> None:
    if not ddp.is_main():  # under torchrun rank 0 writes the run folder
        return
    atomic_write_text(Path(path) / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def codes_path(run: Path) -> Path:
    """``codes/codes.pt``: the prior's cached training/validation code grids (see ``train_prior``)."""
    return Path(run) / "codes" / "codes.pt"


def checkpoint_path(run: Path, stage: str, which: str = "best") -> Path:
    """``checkpoints/<stage>_<which>.pt``, falling back to ``last`` when there is no ``best``."""
    p = Path(run) / "checkpoints" / f"{stage}_{which}.pt"
    if not p.is_file() and which == "best":
        p = Path(run) / "checkpoints" / f"{stage}_last.pt"
    return p


