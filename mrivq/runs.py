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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from mrivq import distributed as ddp
from mrivq.atomic import atomic_write_bytes, atomic_write_text
from mrivq.errors import MrivqError, RunError

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


def read_config(path: Path) -> dict:
    from mrivq.limits import read_yaml_file

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


@dataclass
class Run:
    """A trained run loaded for use: models (eval mode), preprocessing and what synth needs."""

    path: Path
    config: dict
    info: dict
    preprocess: Any  # mrivq.data.Preprocess
    vqvae: Any  # mrivq.models.vqvae.VQVAE
    prior: Any | None = None  # GatedPixelCNN or MaskedTokenPrior (mrivq.builders.prior_from_config)
    checkpoints: dict[str, str] = field(default_factory=dict)  # stage -> sha256

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.info["latent_shape"])

    @property
    def calibration(self) -> dict | None:
        """The decoder's intensity calibration (:mod:`mrivq.calibration`) when it was fitted for the
        loaded VQ-VAE checkpoint, else None (runs from before it, or a checkpoint trained since)."""
        cal = self.info.get("calibration")
        return cal if cal and cal.get("vqvae_sha256") == self.checkpoints.get("vqvae") else None

    def decode(self, indices: torch.Tensor, calibrate: bool = True) -> torch.Tensor:
        """Code grids -> float volumes in [0, 1] on the VQ-VAE's device, through the calibration
        when ``calibrate`` and the run has one (what synth writes; reconstructions stay raw)."""
        from mrivq.calibration import decode

        return decode(self.vqvae, indices, self.calibration if calibrate else None)

    @property
    def class_names(self) -> list[str] | None:
        """Names of the prior's classes (``data.condition_on``), id ``i`` is ``names[i]``; None when
        the classes are a dataset's numeric labels (MNIST digits) or the prior is unconditional."""
        c = self.info.get("classes") or {}
        return list(c["names"]) if c.get("names") else None

    def class_id(self, value: str | int | None) -> int | None:
        """``--class`` as an id (``0``) or a class name (``HH``, ``t2``); None stays None.
        Raises :class:`MrivqError` for an unconditional prior or an unknown class."""
        from mrivq.errors import MrivqError

        if value is None:
            return None
        n = getattr(self.prior, "num_classes", None)
        if n is None:
            raise MrivqError(f"run {self.path.name} has an unconditional prior; drop --class")
        names = self.class_names
        if names and str(value) in names:
            return names.index(str(value))
        try:
            i = int(str(value))
        except ValueError:
            i = -1
        if not 0 <= i < n:
            known = ", ".join(f"{k} ({v})" for k, v in enumerate(names)) if names else f"0..{n - 1}"
            raise MrivqError(f"--class {value} is not a class of run {self.path.name}; choose one of: {known}")
        return i

    def condition(self, cls_ids: torch.Tensor | None, covariates: dict[str, float] | None, n: int,
                  device: torch.device | str = "cpu") -> tuple[Any, dict[str, float]]:
        """The prior's ``cond`` for ``n`` samples: ``cls_ids`` plus, when the run has ``data.covariates``,
        their z-scores. Returns it with the raw covariate values used (``covariates`` completed with the
        training means). Raises :class:`MrivqError` for covariates the run does not have."""
        from mrivq.data.covariates import parse_covariates, standardise

        spec = self.info.get("covariates")
        values = parse_covariates(spec, covariates, self.path.name)
        if not values:
            return cls_ids, {}
        z = torch.tensor(standardise(spec, [values[c] for c in spec["columns"]]), dtype=torch.float32)
        return {"class": cls_ids, "covariates": z.to(device).expand(n, -1)}, values


def codes_path(run: Path) -> Path:
    """``codes/codes.pt``: the prior's cached training/validation code grids (see ``train_prior``)."""
    return Path(run) / "codes" / "codes.pt"


def checkpoint_path(run: Path, stage: str, which: str = "best") -> Path:
    """``checkpoints/<stage>_<which>.pt``, falling back to ``last`` when there is no ``best``."""
    p = Path(run) / "checkpoints" / f"{stage}_{which}.pt"
    if not p.is_file() and which == "best":
        p = Path(run) / "checkpoints" / f"{stage}_last.pt"
    return p


def load_run(path: str | Path | None = None, *, device: str | torch.device = "cpu",
             need_prior: bool = False, which: str = "best") -> Run:
    """Load a run's VQ-VAE (and prior, when trained) with its preprocessing.

    ``path=None`` picks the most recent run under ``./runs``. Models are returned in eval mode, so
    the codebook never changes while they are used.
    """
    from mrivq.data import Preprocess
    from mrivq.models.vqvae import VQVAE

    run_dir = resolve_run(path)
    cfg = read_config(run_dir)
    info = read_run_info(run_dir)
    if "vqvae" not in info.get("model_config", {}):
        raise RunError(f"{run_dir} has no trained VQ-VAE yet; run `mrivq train --out {run_dir} --resume`")
    pre = Preprocess.from_dict(info.get("preprocess", cfg.get("data", {})))
    vq = VQVAE(**info["model_config"]["vqvae"])
    ck_path = checkpoint_path(run_dir, "vqvae", which)
    ck = load_checkpoint(ck_path, map_location=device)
    load_weights(vq, ck, ck_path)
    vq.to(device).eval()
    run = Run(run_dir, cfg, info, pre, vq, checkpoints={"vqvae": file_sha256(ck_path)})
    if "prior" in info.get("model_config", {}) and checkpoint_path(run_dir, "prior", which).is_file():
        from mrivq.builders import prior_from_config

        prior = prior_from_config(info["model_config"]["prior"])
        p_path = checkpoint_path(run_dir, "prior", which)
        try:
            p_ck = load_checkpoint(p_path, map_location=device)
        except RunError as e:
            if need_prior:
                raise
            # encode, decode, reconstruct and eval need only the VQ-VAE: say so and go on without the prior
            import warnings

            warnings.warn(f"{e}; continuing without the prior (this command does not need it)", stacklevel=2)
            return run
        # absent in checkpoints from before it was recorded
        trained_on = p_ck.get("vqvae_sha256") if isinstance(p_ck, dict) else None
        best = checkpoint_path(run_dir, "vqvae", "best")
        best_sha = run.checkpoints["vqvae"] if best == ck_path else file_sha256(best)  # hashed once
        if trained_on is not None and trained_on != best_sha:
            raise RunError(f"{run_dir}: the prior was trained on the codes of another VQ-VAE checkpoint; train it "
                           f"again with `mrivq train --stage prior --run {run_dir}`")
        load_weights(prior, p_ck, p_path)
        run.prior = prior.to(device).eval()
        run.checkpoints["prior"] = file_sha256(p_path)
    elif need_prior:
        raise RunError(f"{run_dir} has no trained prior; run `mrivq train --stage prior --run {run_dir}`")
    return run
