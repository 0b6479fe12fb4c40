"""Every training default in one place: what a stage uses for a key that neither the preset nor ``--set``
gives. Presets state their own choices on top (the 3D presets train with ``recon_loss: l1``, measured
best on the CPU preset); a run folder's ``config.yaml`` keeps only what was given, so these values
are part of what a run means and change only with a note in the changelog."""

from __future__ import annotations

from typing import Any

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 2, "lr": 1e-3, "max_steps": None, "epochs": None, "warmup_steps": 50,
    "min_lr_ratio": 0.05, "weight_decay": 0.0, "grad_clip": 1.0, "val_every": 100, "ckpt_every": 200,
    "log_every": 10, "preview_every": None, "amp": "auto", "seed": 0, "val_fraction": 0.15,
    "cache": "memory", "recon_loss": "mse", "threads": None, "workers": "auto",
    "cache_dtype": "float32", "cache_workers": "auto",
    "adversarial_weight": 0.0, "adversarial_start": 0, "disc_channels": 32, "disc_layers": 3, "disc_lr": None,
}



PRIOR_TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 16, "lr": 1e-3, "max_steps": None, "epochs": None, "warmup_steps": 50,
    "min_lr_ratio": 0.05, "weight_decay": 0.0, "grad_clip": 1.0, "val_every": 100, "ckpt_every": 200,
    "log_every": 10, "amp": "auto", "seed": 0,
}


def train_settings(cfg: dict) -> dict[str, Any]:
    """Stage 1's ``train`` section with every default filled in."""
    return {**TRAIN_DEFAULTS, **cfg.get("train", {})}


def prior_train_settings(cfg: dict) -> dict[str, Any]:
    """Stage 2's ``prior.train`` section with every default filled in."""
    return {**PRIOR_TRAIN_DEFAULTS, **cfg.get("prior", {}).get("train", {})}
