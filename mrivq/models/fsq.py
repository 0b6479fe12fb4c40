"""Finite scalar quantization (FSQ; Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of the ``d = len(levels)`` latent channels is bounded and rounded to one of ``levels[i]`` values; a code is
the tuple of the rounded values, so the implicit codebook is the grid of ``prod(levels)`` points. Nothing is
learned in the quantizer: no codebook, no commitment loss, no dead codes to restart, and every code of the
grid is reachable. Gradients pass the rounding straight through. The interface is that of
:class:`mrivq.models.quantizer.VectorQuantizerEMA` (``forward``, ``quantize_indices``, ``embed``, ``stats``), so
the VQ-VAE, the code cache, the priors and sampling use it unchanged (``model.quantizer: fsq``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from mrivq.models.quantizer import histogram_perplexity_and_usage
from mrivq.utils.errors import MrivqError


class FiniteScalarQuantizer(nn.Module):
    """``levels`` values per channel (e.g. ``[8, 5, 5, 5]``: 1000 codes in 4 channels)."""

    def __init__(self, levels: Sequence[int], usage_window: int = 100) -> None:
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise MrivqError(f"fsq_levels {levels} needs at least one channel, each with 2 or more levels")
        self.levels = levels
        self.embedding_dim = len(levels)
        self.num_embeddings = math.prod(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.float32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.long), persistent=False)
        # training-step code counts over the last usage_window steps, as VectorQuantizerEMA keeps them
        self.register_buffer("usage_counts", torch.zeros(usage_window, self.num_embeddings))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash ``z`` (channel last) into each channel's range so that rounding gives its levels."""
        half = (self._levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _rounded(self, z: torch.Tensor) -> torch.Tensor:
        """Integer level of each channel, in ``[0, levels)``, with a straight-through gradient."""
        b = self._bound(z)
        q = b + (torch.round(b) - b).detach()
        return q + (self._levels // 2)

    def _indices(self, q: torch.Tensor) -> torch.Tensor:
        return (q.round().long() * self._basis).sum(-1)

    def _values(self, q: torch.Tensor) -> torch.Tensor:
        """Integer levels -> the code's values in [-1, 1] (what the decoder sees)."""
        half = self._levels // 2
        return (q - half) / half

    def _check(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected [B, {self.embedding_dim}, *spatial], got {tuple(z.shape)}")
        return z.float().movedim(1, -1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` -> (quantized ``z`` with a straight-through gradient, a zero loss, indices)."""
        with torch.autocast(z.device.type, enabled=False):
            q = self._rounded(self._check(z))
            idx = self._indices(q.detach())
            if self.training:
                counts = torch.bincount(idx.flatten(), minlength=self.num_embeddings).float()
                self.usage_counts[int(self.step) % self.usage_counts.shape[0]] = counts
                self.step += 1
            quantized = self._values(q).movedim(-1, 1)
        return quantized, z.new_zeros((), dtype=torch.float32), idx

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices ``[B, *spatial]`` of ``z`` ``[B, D, *spatial]``. Pure."""
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            return self._indices(self._rounded(self._check(z)))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` ``[B, *spatial]`` as a channel-first float32 ``[B, D, *spatial]``. Pure."""
        i = indices.long().unsqueeze(-1)
        q = (i // self._basis) % self._levels.long()
        return self._values(q.float()).movedim(-1, 1)

    def stats(self) -> dict:
        """Perplexity and fraction of codes used over the last ``usage_window`` train steps (no dead codes:
        nothing is learned)."""
        ppl, usage = histogram_perplexity_and_usage(self.usage_counts.sum(0))
        return {"perplexity": ppl, "usage": usage, "dead_codes": 0}

    def extra_repr(self) -> str:
        return f"levels={self.levels}, num_embeddings={self.num_embeddings}"
