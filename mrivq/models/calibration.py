"""Intensity calibration of decoded volumes: one monotone map per run and channel that gives what the
decoder writes the intensity distribution of the scans it was trained on.

Why: a VQ-VAE's reconstructions are smoother than the scans, so their histogram is narrower (dark
tissue and bright peaks are averaged towards the middle), and a per-volume percentile scaling, as
every downstream pipeline applies, then shifts them: the tissue fractions of samples sit several
standard deviations from the real ones even when the shapes are right. Pooled quantile mapping
(histogram standardisation, Nyúl & Udupa 1999; Nyúl et al. 2000) between the training scans and
their reconstructions corrects that systematic bias of the decoder. It is one map for the whole run,
fitted once, so each sample keeps its own departures from the mean histogram (an atrophied head keeps
its extra CSF); it is not matched to a histogram of its own.

The map is fitted from streaming histograms (:class:`QuantileSketch`: fixed memory at any dataset
size, exact counts of the values clipped at 0 and 1, where the preprocessed scans have point masses),
stored in ``run.json`` under ``calibration`` with the hash of the VQ-VAE checkpoint it belongs to, and
applied by :meth:`mrivq.runs.run.Run.decode`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: histogram bins on (0, 1) and quantile levels of the stored map
BINS = 4096
LEVELS = 513
#: training subjects whose reconstructions the map is fitted on (every one when fewer), evenly spread
MAX_SUBJECTS = 64


class QuantileSketch:
    """Per-channel histogram of values in [0, 1] (values outside are counted at the ends) from which
    quantiles are read; ``update`` takes ``[B, C, *spatial]`` tensors on any device."""

    def __init__(self, channels: int, bins: int = BINS) -> None:
        self.bins = bins
        self.low = np.zeros(channels)  # values <= 0
        self.high = np.zeros(channels)  # values >= 1
        self.hist = np.zeros((channels, bins))
        self.items = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        for c in range(x.shape[1]):
            v = x[:, c]
            self.low[c] += float((v <= 0).sum())
            self.high[c] += float((v >= 1).sum())
            mid = v[(v > 0) & (v < 1)]
            if mid.numel():
                self.hist[c] += torch.histc(mid, bins=self.bins, min=0.0, max=1.0).double().cpu().numpy()
        self.items += int(x.shape[0])

    def quantiles(self, levels: np.ndarray) -> np.ndarray:
        """``[C, len(levels)]``: the value below which each level's share of the voxels lies, linear
        within a bin; a level inside the mass at 0 (or 1) is exactly 0 (or 1)."""
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        levels = np.asarray(levels, dtype=np.float64)
        out = []
        for c in range(len(self.low)):
            # the CDF at the right end of each piece: the mass at 0, each bin, the mass at 1
            counts = np.concatenate([[0.0, self.low[c]], self.hist[c], [self.high[c]]])
            xs = np.concatenate([[0.0, 0.0], edges[1:], [1.0]])
            cdf = np.cumsum(counts) / max(counts.sum(), 1.0)
            # the piece each level falls in (the first whose CDF reaches it: empty pieces are skipped),
            # then linear within that piece only
            k = np.clip(np.searchsorted(cdf, levels, side="left"), 1, len(cdf) - 1)
            lo, hi = cdf[k - 1], cdf[k]
            t = np.where(hi > lo, (levels - lo) / np.where(hi > lo, hi - lo, 1.0), 1.0)
            out.append(xs[k - 1] + np.clip(t, 0.0, 1.0) * (xs[k] - xs[k - 1]))
        return np.asarray(out)


def fit_quantile_map(decoded: QuantileSketch, target: QuantileSketch, vqvae_sha256: str,
                     levels: int = LEVELS) -> dict:
    """The map sending each quantile of ``decoded`` to the same quantile of ``target``, as a JSON-able
    dict. Where several levels share one decoded value (a point mass, such as the decoder's zeros in
    the background and padding), that value goes to the target quantile at the *lowest* of those levels:
    the map stays a function, and a mass at 0 stays at 0 where the scans are 0 (the mean of the targets
    would lift the whole background by a constant the scans never have)."""
    q = np.linspace(0.0, 1.0, levels)
    src, dst = decoded.quantiles(q), target.quantiles(q)
    source, mapped = [], []
    for s, d in zip(src, dst, strict=True):
        u, first = np.unique(np.round(s, 7), return_index=True)  # s rises with the level: first = lowest level
        source.append(u.tolist())
        mapped.append(d[first].tolist())
    return {"kind": "quantile", "vqvae_sha256": vqvae_sha256, "subjects": int(target.items),
            "source": source, "target": mapped}


def apply_quantile_map(x: torch.Tensor, cal: dict[str, Any]) -> torch.Tensor:
    """``x`` ``[B, C, *spatial]`` in [0, 1] through the run's map (piecewise linear between its
    points, constant beyond them); same device and dtype (computed in float32: half precision would
    merge neighbouring points of the map)."""
    dtype, x = x.dtype, x.float()
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        src = torch.as_tensor(cal["source"][c], dtype=x.dtype, device=x.device)
        dst = torch.as_tensor(cal["target"][c], dtype=x.dtype, device=x.device)
        v = x[:, c]
        if len(src) == 1:
            out[:, c] = dst[0]
            continue
        i = torch.searchsorted(src, v.contiguous()).clamp(1, len(src) - 1)
        x0, x1, y0, y1 = src[i - 1], src[i], dst[i - 1], dst[i]
        t = ((v - x0) / (x1 - x0)).clamp(0, 1)
        out[:, c] = y0 + t * (y1 - y0)
    return out.to(dtype)


def decode(vqvae: Any, indices: torch.Tensor, calibration: dict | None = None) -> torch.Tensor:
    """Code grids -> float volumes in [0, 1] on the VQ-VAE's device, through ``calibration`` when
    given (no graph is kept: this is inference). :meth:`mrivq.runs.run.Run.decode` and healing use it."""
    dev = next(vqvae.parameters()).device
    with torch.no_grad():
        x = vqvae.decode_indices(indices.to(dev)).float().clamp(0, 1)
        return apply_quantile_map(x, calibration) if calibration is not None else x


def describe(cal: dict | None) -> str:
    """One phrase for sidecars and bundle metadata."""
    if not cal:
        return "none"
    return f"quantile map fitted on {cal['subjects']} training reconstructions"
