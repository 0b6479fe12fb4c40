"""Anomaly maps by "healing" (Pinaya et al. 2022, *Unsupervised brain imaging 3D anomaly detection and
segmentation with transformers*, Medical Image Analysis 79).

A model trained on healthy scans only knows healthy anatomy. For a new scan:

1. encode it into codes and score each code under the prior, ``p(z_i | z_<i)``;
2. flag the codes the prior finds unlikely (``p < threshold``) and redraw them from the prior, keeping
   every other code (:func:`mrivq.sampling.heal_tokens`), ``resamples`` times;
3. decode each healed grid: a healthy-looking version of the scan;
4. the anomaly map is the mean absolute residual between the input and its healed reconstructions,
   weighted by where codes were redrawn (the flag mask, upsampled smoothly to the image grid) and
   restricted to the head (a foreground mask with its holes filled, so the field of view's edge stays
   dark but a signal void inside the head does not).

The baselines that :func:`heal` returns in the same pass (for ``mrivq eval --anomaly``): the
reconstruction residual ``|x - D(E(x))|`` and the upsampled per-code NLL map.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.errors import MrivqError
from mrivq.sampling import heal_tokens, log_likelihood


@dataclass(frozen=True)
class HealOptions:
    """Healing settings (``mrivq score --heal`` options).

    ``threshold``: a code is redrawn where the prior gives it a probability below this;
    ``resamples``: healed versions averaged; ``temperature``: of the redraws; ``background``: scaled
    intensity (0-1, as the model sees it) below which a voxel is outside the head in both the input
    and its healed reconstruction; ``erode``: voxels taken off the head's edge (partial volume and
    interpolation light the edge up otherwise); ``seed``: same seed, same map."""

    threshold: float = 0.01
    resamples: int = 4
    temperature: float = 1.0
    background: float = 0.05
    erode: int = 1
    seed: int = 0

    def validate(self) -> HealOptions:
        if not 0 < self.threshold < 1:
            raise MrivqError(f"--threshold is a probability between 0 and 1, got {self.threshold}")
        if self.resamples < 1:
            raise MrivqError(f"--resamples must be >= 1, got {self.resamples}")
        if self.temperature <= 0:
            raise MrivqError(f"--temperature must be > 0 for healing, got {self.temperature}")
        if not 0 <= self.background < 1:
            raise MrivqError(f"--background is a scaled intensity in [0, 1), got {self.background}")
        if self.erode < 0:
            raise MrivqError(f"--erode must be >= 0 voxels, got {self.erode}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _upsample(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    mode = "trilinear" if t.ndim == 5 else "bilinear"
    return F.interpolate(t, size=size, mode=mode, align_corners=False)


def _erode(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Binary erosion of ``[B, 1, *spatial]`` by ``n`` voxels (a cube), by min-pooling."""
    if n <= 0:
        return mask
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return 1 - pool(1 - mask.float(), 2 * n + 1, stride=1, padding=n)


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """The head with its holes filled, per image: a signal void inside the head (an artefact, a
    resection cavity) is dark like the background but is where an anomaly map must look."""
    from scipy.ndimage import binary_fill_holes

    filled = [binary_fill_holes(m[0].cpu().numpy()) for m in mask]
    return torch.as_tensor(np.stack(filled)[:, None], device=mask.device).float()


def heal(vqvae: Any, prior: Any, x: torch.Tensor, opts: HealOptions, cond: Any = None, *,
         cached: bool = True, batch_size: int | None = None, progress: Any = None) -> dict[str, torch.Tensor]:
    """Heal a model-space batch ``x [B, C, *spatial]`` (a volume, or a 2D run's slices).

    Returns tensors on the model grid: ``anomaly``, ``recon_residual`` and ``nll`` (``[B, 1, *]``:
    the healed residual, the reconstruction residual and the upsampled NLL in nats, all zero outside
    the head), ``healed`` (``[B, C, *]``, the mean healed reconstruction), ``resampled`` (``[B, *latent]``
    bool) and ``head`` (``[B, 1, *]``, the foreground mask used)."""
    opts.validate()
    with torch.no_grad():
        idx = vqvae.encode_indices(x)
        nll = log_likelihood(prior, idx, cond, batch_size=batch_size).float()
        resample = nll > -math.log(opts.threshold)
        recon = vqvae.decode_indices(idx).float().clamp(0, 1)
        if resample.any():
            grids = heal_tokens(prior, idx, resample, opts.resamples, temperature=opts.temperature,
                                seed=opts.seed, cached=cached, cond=cond, batch_size=batch_size,
                                progress=progress)
            b, n = grids.shape[:2]
            flat = grids.flatten(0, 1)
            dec = torch.cat([vqvae.decode_indices(flat[s:s + 8]).float().clamp(0, 1)
                             for s in range(0, flat.shape[0], 8)])
            dec = dec.view(b, n, *dec.shape[1:])
        else:  # nothing unlikely: the healed scan is the reconstruction
            dec = recon[:, None]
        size = tuple(x.shape[2:])
        xf = x.float()
        head = (xf.amax(1, keepdim=True) > opts.background) | (dec.mean(1).amax(1, keepdim=True) > opts.background)
        head = _erode(_fill_holes(head), opts.erode)
        weight = _upsample(resample[:, None].float(), size).clamp(0, 1)
        residual = (xf[:, None] - dec).abs().mean(2).mean(1, keepdim=True)  # over channels, then resamples
        return {
            "anomaly": residual * weight * head,
            "recon_residual": (xf - recon).abs().mean(1, keepdim=True) * head,
            "nll": _upsample(nll[:, None], size) * head,
            "healed": dec.mean(1),
            "resampled": resample,
            "head": head,
        }
