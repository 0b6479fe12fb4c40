"""A trained run loaded for use: its VQ-VAE and prior (eval mode), preprocessing and conditioning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrivq.runs.folder import (
    checkpoint_path,
    file_sha256,
    load_checkpoint,
    load_weights,
    read_config,
    read_run_info,
    resolve_run,
)
from mrivq.utils.device import resolve_device
from mrivq.utils.errors import MrivqError, RunError


@dataclass
class Run:
    """A trained run loaded for use: models (eval mode), preprocessing and what synth needs."""

    path: Path
    config: dict
    info: dict
    preprocess: Any  # mrivq.data.preprocess.Preprocess
    vqvae: Any  # mrivq.models.vqvae.VQVAE
    prior: Any | None = None  # GatedPixelCNN or MaskedTokenPrior (mrivq.models.factory.prior_from_config)
    checkpoints: dict[str, str] = field(default_factory=dict)  # stage -> sha256

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.info["latent_shape"])

    @property
    def calibration(self) -> dict | None:
        """The decoder's intensity calibration (:mod:`mrivq.models.calibration`) when it was fitted for the
        loaded VQ-VAE checkpoint, else None (runs from before it, or a checkpoint trained since)."""
        cal = self.info.get("calibration")
        return cal if cal and cal.get("vqvae_sha256") == self.checkpoints.get("vqvae") else None

    def decode(self, indices: torch.Tensor, calibrate: bool = True) -> torch.Tensor:
        """Code grids -> float volumes in [0, 1] on the VQ-VAE's device, through the calibration
        when ``calibrate`` and the run has one (what synth writes; reconstructions stay raw)."""
        from mrivq.models.calibration import decode

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
        from mrivq.utils.errors import MrivqError

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

    def unfinished(self, stage: str) -> tuple[int, int] | None:
        """``(steps trained, steps asked for)`` of a stage whose training stopped before its end (an
        interrupted or killed run), else None."""
        from mrivq.config.defaults import prior_train_settings, train_settings
        from mrivq.models.factory import total_steps

        if self.info.get("stages", {}).get(stage, {}).get("done"):
            return None
        last = checkpoint_path(self.path, stage, "last")
        if not last.is_file():
            return None
        step = int(load_checkpoint(last).get("step", 0))
        tcfg = prior_train_settings(self.config) if stage == "prior" else train_settings(self.config)
        n = int(self.info.get("n_train") or 0)
        try:
            total = total_steps(tcfg, n, int(tcfg["batch_size"])) if n else step
        except MrivqError:
            total = step
        return (step, total) if step < total else None

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



def load_run(path: str | Path | None = None, *, device: str | torch.device = "cpu",
             need_prior: bool = False, which: str = "best") -> Run:
    """Load a run's VQ-VAE (and prior, when trained) with its preprocessing.

    ``path=None`` picks the most recent run under ``./runs``. Models are returned in eval mode, so
    the codebook never changes while they are used.
    """
    from mrivq.data.preprocess import Preprocess
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
        from mrivq.models.factory import prior_from_config

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


def load_run_on(run: str | Path | None, device: str, need_prior: bool = False) -> tuple[Run, torch.device]:
    """:func:`load_run` on the device that ``--device`` names (``auto``, ``cpu``, ``cuda[:i]``); returns
    the run and that device."""
    dev = resolve_device(device)
    return load_run(run, device=dev, need_prior=need_prior), dev
