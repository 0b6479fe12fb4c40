"""Anomaly maps by "healing" (Pinaya et al. 2022, *Unsupervised brain imaging 3D anomaly detection and
segmentation with transformers*, Medical Image Analysis 79).

A model trained on healthy scans only knows healthy anatomy. For a new scan:

1. encode it into codes and score each code under the prior, ``p(z_i | z_<i)``;
2. flag the codes the prior finds unlikely (``p < threshold``) and redraw them from the prior, keeping
   every other code (:func:`mrivq.inference.sampling.heal_tokens`), ``resamples`` times;
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
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.inference.likelihood import log_likelihood
from mrivq.inference.sampling import heal_tokens
from mrivq.utils.errors import MrivqError


@dataclass(frozen=True)
class HealOptions:
    """Healing settings (``mrivq score --heal`` options).

    ``threshold``: a code is redrawn where the prior gives it a probability below this;
    ``resamples``: healed versions averaged; ``temperature``: of the redraws; ``background``: scaled
    intensity (0-1, as the model sees it) below which a voxel is outside the head in both the input
    and its healed reconstruction; ``erode``: voxels taken off the head's edge (partial volume and
    interpolation light the edge up otherwise); ``seed``: same seed, same map.

    Levers measured by ``benchmarks/anomaly.py``: ``against`` is what the healed reconstructions are
    compared with, the ``input`` (Pinaya et al.) or its ``reconstruction`` (which cancels the VQ-VAE's
    own error on healthy tissue); ``smooth``: Gaussian sigma in voxels applied to the map and the baselines' (0: none);
    ``zscore``: when above 0, flag a code whose NLL is that many standard deviations above the NLL at
    its position in the run's healthy training codes, instead of by ``threshold`` (the prior is more
    certain in some places than others: a fixed probability flags the uncertain places first);
    ``calibrate``: decoded volumes (healed and plain reconstructions) go through the run's intensity
    calibration (:mod:`mrivq.models.calibration`) before they are compared with the input; None (the
    default) when the run has one. Measured on 48 lesion subjects: calibrated and raw healing score alike
    (``benchmarks/anomaly.py``, docs/results/anomaly.md), so one decoding path serves ``synth`` and healing;
    ``normalize``: residuals (the healed one and the reconstruction baseline's) become per-voxel
    z-scores against the reconstruction residuals of healthy held-out scans (:func:`residual_reference`),
    clipped at 0: a VQ-VAE errs most where anatomy varies (tissue borders, the cortex), and a raw
    residual lights those places up in every scan, lesion or not. A normative map in the sense of
    Marquand et al. 2016 (*Understanding heterogeneity in clinical cohorts using normative models*).
    None (the default): when a reference is available (:func:`heal`: when ``residual_ref`` is given).
    Measured on 48 lesion subjects, both halves: healed AUPRC and best Dice higher on both (docs/results/anomaly.md).
    The plain reconstruction residual stays the ``recon_residual`` baseline either way; the normalized
    one is ``normative_residual``."""

    threshold: float = 0.05
    resamples: int = 4
    temperature: float = 1.0
    background: float = 0.05
    erode: int = 1
    seed: int = 0
    against: str = "input"
    smooth: float = 2.0
    zscore: float = 0.0
    calibrate: bool | None = None
    normalize: bool | None = None

    def validate(self) -> HealOptions:
        from mrivq.utils.limits import check_seed

        check_seed(self.seed)
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
        if self.against not in ("input", "reconstruction"):
            raise MrivqError(f"against={self.against!r} is not one of input, reconstruction")
        if self.zscore < 0:
            raise MrivqError(f"--zscore must be >= 0 (0: use --threshold), got {self.zscore}")
        if self.smooth < 0:
            raise MrivqError(f"--smooth must be >= 0 voxels, got {self.smooth}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, calibration: dict | None) -> HealOptions:
        """These options with ``calibrate`` decided for a run whose calibration is ``calibration``
        (None: the run has none); an explicit ``calibrate=True`` without one is a one-line error."""
        if self.calibrate is None:
            return replace(self, calibrate=calibration is not None)
        if self.calibrate and calibration is None:
            raise MrivqError("calibrated healing needs the run's intensity calibration, which this run does not "
                             "have; run `mrivq train --stage prior --run RUN` to fit it, or pass --no-calibrate")
        return self


def _upsample(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    mode = "trilinear" if t.ndim == 5 else "bilinear"
    return F.interpolate(t, size=size, mode=mode, align_corners=False)


def erode_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Binary erosion of ``[B, 1, *spatial]`` by ``n`` voxels (a cube), by min-pooling."""
    if n <= 0:
        return mask
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return 1 - pool(1 - mask.float(), 2 * n + 1, stride=1, padding=n)


def fill_mask_holes(mask: torch.Tensor) -> torch.Tensor:
    """The head with its holes filled, per image: a signal void inside the head (an artefact, a
    resection cavity) is dark like the background but is where an anomaly map must look."""
    from scipy.ndimage import binary_fill_holes

    filled = [binary_fill_holes(m[0].cpu().numpy()) for m in mask]
    return torch.as_tensor(np.stack(filled)[:, None], device=mask.device).float()


def smooth_map(t: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, 1, *spatial]`` (sigma in voxels; 0 leaves it)."""
    if sigma <= 0:
        return t
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=t.dtype, device=t.device) / sigma) ** 2)
    k = k / k.sum()
    conv = F.conv3d if t.ndim == 5 else F.conv2d
    nd = t.ndim - 2
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = 2 * r + 1
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = r
        t = conv(F.pad(t, pad, mode="replicate"), k.view(shape))
    return t


def nll_reference(prior: Any, codes: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean and standard deviation of the NLL of healthy code grids ``codes [N, *latent]``
    (a run's training codes), for ``HealOptions.zscore``."""
    nll = log_likelihood(prior, codes, batch_size=batch_size).float()
    return nll.mean(0), nll.std(0).clamp_min(1e-3)


def _abs_residual(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|x - y|`` averaged over channels (dim 1): ``[B, 1, *spatial]`` for ``[B, C, *spatial]``."""
    return (x.float() - y.float()).abs().mean(1, keepdim=True)


#: the smallest per-voxel standard deviation a normalized residual divides by (scaled intensity):
#: voxels where every healthy scan's residual is the same (the background) would otherwise explode
MIN_RESIDUAL_STD = 0.01


def residual_reference(vqvae: Any, volumes: Any, calibration: dict | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel mean and standard deviation ``[1, 1, *spatial]`` of the reconstruction residual
    ``|x - D(E(x))|`` over healthy model-space batches ``volumes`` (an iterable of ``[B, C, *spatial]``,
    all one grid; at least two volumes), decoded through ``calibration`` when given, for
    ``HealOptions.normalize``."""
    from mrivq.models.calibration import decode

    total = total_sq = None
    n = 0
    with torch.no_grad():
        for xb in volumes:
            r = _abs_residual(xb, decode(vqvae, vqvae.encode_indices(xb), calibration)).double()
            if total is not None and r.shape[2:] != total.shape[2:]:
                raise MrivqError(f"healthy scans of different model grids ({tuple(total.shape[2:])} and "
                                 f"{tuple(r.shape[2:])}): a normalized residual needs one grid")
            total = r.sum(0, keepdim=True) + (0 if total is None else total)
            total_sq = (r ** 2).sum(0, keepdim=True) + (0 if total_sq is None else total_sq)
            n += r.shape[0]
    if n < 2:
        raise MrivqError(f"a residual reference needs at least 2 healthy scans, got {n}")
    mean = total / n
    std = ((total_sq - n * mean ** 2).clamp_min(0) / (n - 1)).sqrt()
    return mean.float(), std.float().clamp_min(MIN_RESIDUAL_STD)


def heal(vqvae: Any, prior: Any, x: torch.Tensor, opts: HealOptions, cond: Any = None, *,
         cached: bool = True, batch_size: int | None = None, progress: Any = None,
         reference: tuple[torch.Tensor, torch.Tensor] | None = None,
         calibration: dict | None = None,
         residual_ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Heal a model-space batch ``x [B, C, *spatial]`` (a volume, or a 2D run's slices).

    Returns tensors on the model grid: ``anomaly``, ``recon_residual`` and ``nll`` (``[B, 1, *]``:
    the healed residual, the reconstruction residual and the upsampled NLL in nats, all zero outside
    the head; with ``opts.normalize`` also ``normative_residual``, the reconstruction residual as a
    z-score against ``residual_ref``), ``healed`` (``[B, C, *]``, the mean healed reconstruction),
    ``resampled`` (``[B, *latent]`` bool) and ``head`` (``[B, 1, *]``, the foreground mask used).
    ``calibration``: the run's, applied to every decoded volume when ``opts.calibrate`` (None: when there
    is one); ``residual_ref``: the :func:`residual_reference` of healthy scans, needed by
    ``opts.normalize`` (None: when it is given), with the same calibration."""
    from mrivq.models.calibration import decode

    opts = opts.validate().resolved(calibration)
    if opts.normalize is None:
        opts = replace(opts, normalize=residual_ref is not None)
    used = calibration if opts.calibrate else None
    if opts.normalize and residual_ref is None:
        raise MrivqError("a normalized residual needs the reconstruction residuals of healthy scans "
                         "(heal.residual_reference)")

    with torch.no_grad():
        idx = vqvae.encode_indices(x)
        nll = log_likelihood(prior, idx, cond, batch_size=batch_size).float()
        if opts.zscore > 0:
            if reference is None:
                raise MrivqError("zscore healing needs the NLL of healthy codes (a run's codes/codes.pt)")
            mean, std = (t.to(nll.device) for t in reference)
            resample = (nll - mean) / std > opts.zscore
        else:
            resample = nll > -math.log(opts.threshold)
        recon = decode(vqvae, idx, used)
        if resample.any():
            grids = heal_tokens(prior, idx, resample, opts.resamples, temperature=opts.temperature,
                                seed=opts.seed, cached=cached, cond=cond, batch_size=batch_size,
                                progress=progress)
            b, n = grids.shape[:2]
            flat = grids.flatten(0, 1)
            dec = torch.cat([decode(vqvae, flat[s:s + 8], used) for s in range(0, flat.shape[0], 8)])
            dec = dec.view(b, n, *dec.shape[1:])
        else:  # nothing unlikely: the healed scan is the reconstruction
            dec = recon[:, None]
        size = tuple(x.shape[2:])
        xf = x.float()
        head = (xf.amax(1, keepdim=True) > opts.background) | (dec.mean(1).amax(1, keepdim=True) > opts.background)
        head = erode_mask(fill_mask_holes(head), opts.erode)
        weight = _upsample(resample[:, None].float(), size).clamp(0, 1)
        ref = xf if opts.against == "input" else recon
        residual = (ref[:, None] - dec).abs().mean(2).mean(1, keepdim=True)  # over channels, then resamples
        plain = _abs_residual(xf, recon)
        if opts.normalize:
            mean, std = (t.to(plain.device) for t in residual_ref)
            if mean.shape[2:] != plain.shape[2:]:
                raise MrivqError(f"the healthy residual reference is on a {tuple(mean.shape[2:])} grid, this scan's "
                                 f"model grid is {tuple(plain.shape[2:])}")
            residual, normative = (((t - mean) / std).clamp_min(0) for t in (residual, plain))
        extra = {"normative_residual": smooth_map(normative, opts.smooth) * head} if opts.normalize else {}
        return {
            **extra,
            "anomaly": smooth_map(residual * weight, opts.smooth) * head,
            # the baselines get the same smoothing, so that a comparison measures the method
            "recon_residual": smooth_map(plain, opts.smooth) * head,
            "nll": smooth_map(_upsample(nll[:, None], size), opts.smooth) * head,
            "healed": dec.mean(1),
            "resampled": resample,
            "head": head,
        }
