"""mrivq: vector-quantized autoencoders and volumetric PixelCNN priors for MRI, on MONAI.

Public API (imported lazily so ``mrivq --help`` stays fast):

- :class:`mrivq.VQVAE` — 2D/3D quantized autoencoder (``encode_indices``, ``decode_indices``).
- :class:`mrivq.GatedPixelCNN` — masked-convolution prior over code grids, 2D/3D, no blind spot.
- :class:`mrivq.MaskedTokenPrior` — parallel-decoding (MaskGIT) prior over the same code grids.
- :func:`mrivq.sample_tokens` — reference and cached incremental samplers (parallel decoding for a
  masked-token prior).
- :func:`mrivq.load_run` — a trained run's models together with its preprocessing.
- :func:`mrivq.evaluate_realism` / :func:`mrivq.realism_metrics` — how real samples are (C2ST, MMD,
  MS-SSIM diversity, memorization, anatomy, FID on named features).
- :class:`mrivq.SyntheticDataset` — a run's samples as a MONAI-style dataset, for downstream training.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VQVAE": ("mrivq.models.vqvae", "VQVAE"),
    "VectorQuantizerEMA": ("mrivq.models.quantizer", "VectorQuantizerEMA"),
    "GatedPixelCNN": ("mrivq.models.pixelcnn", "GatedPixelCNN"),
    "MaskedTokenPrior": ("mrivq.models.maskgit", "MaskedTokenPrior"),
    "sample_tokens": ("mrivq.inference.sampling", "sample_tokens"),
    "load_run": ("mrivq.runs.run", "load_run"),
    "evaluate_realism": ("mrivq.evaluate.realism", "evaluate_realism"),
    "realism_metrics": ("mrivq.evaluate.realism", "realism_metrics"),
    "MrivqError": ("mrivq.utils.errors", "MrivqError"),
    "SyntheticDataset": ("mrivq.inference.synthetic_dataset", "SyntheticDataset"),
}

__all__ = list(_LAZY) + ["__version__"]


# Module paths that configuration files written by earlier versions name: a MONAI bundle exported by
# mrivq 0.1.0 instantiates ``mrivq.bundle.BundleNetwork`` (its configs/inference.json).
_MOVED = {"bundle": "mrivq.inference.bundle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    if name in _MOVED:
        import importlib

        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'mrivq' has no attribute {name!r}")
