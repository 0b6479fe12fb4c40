"""A two-level hierarchy of codes (VQ-VAE-2, Razavi et al. 2019), for measuring it as a realism lever.

- :class:`VQVAE2`: the run's VQ-VAE (its encoder, bottom quantizer and decoder) plus a top level: the
  encoder's features go down 2x more to a small top code grid (global shape), whose decoding is
  upsampled back and given to the bottom quantizer and to the decoder beside the bottom codes.
- :class:`CoarseConditionedPixelCNN`: the bottom prior, a :class:`~mrivq.models.pixelcnn.GatedPixelCNN`
  whose per-position gate bias also carries the top codes (embedded, upsampled 2x and mixed by a
  3x3x3 convolution). The top grid is given whole before the bottom is sampled, so this conditioning
  reads no bottom code and causality holds; the cached sampler takes it as per-sample position biases.
  The top grid is passed as ``cond`` (``LongTensor[B, *top_shape]``).

Sampling: top codes from an ordinary PixelCNN over the top grid, then bottom codes from this prior
given them, then :meth:`VQVAE2.decode_indices`. Not wired into ``mrivq train``: it is measured by
``benchmarks/hierarchy.py`` at the quick start's budget (README, "Hierarchy").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.models.pixelcnn import GatedPixelCNN
from mrivq.models.quantizer import VectorQuantizerEMA
from mrivq.models.vqvae import VQVAE
from mrivq.utils.errors import MrivqError


class VQVAE2(nn.Module):
    """``VQVAE(**vqvae)`` with a top code grid of ``top_codes`` codes at half the bottom grid's size."""

    def __init__(self, vqvae: dict, top_codes: int = 512, top_channels: int = 64) -> None:
        super().__init__()
        self.base = VQVAE(**vqvae)
        if self.base.spatial_dims != 3:
            raise MrivqError("the hierarchy is 3D only")
        d = self.base.embedding_dim
        self.top_enc = nn.Sequential(nn.Conv3d(d, top_channels, 4, 2, 1), nn.ReLU(),
                                     nn.Conv3d(top_channels, d, 3, 1, 1))
        self.top_q = VectorQuantizerEMA(num_embeddings=top_codes, embedding_dim=d)
        self.top_up = nn.ConvTranspose3d(d, d, 4, 2, 1)
        self.bottom_in = nn.Conv3d(2 * d, d, 1)  # the bottom quantizes the encoder features given the top
        self.dec_in = nn.Conv3d(2 * d, d, 1)     # the decoder reads both levels
        self.top_codes = top_codes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` -> (reconstruction, commitment loss of both levels, top indices, bottom indices)."""
        h = self.base.encoder(x)
        qt, lt, it = self.top_q(self.top_enc(h))
        up = self.top_up(qt)
        qb, lb, ib = self.base.quantizer(self.bottom_in(torch.cat([h, up], 1)))
        return self.base.decoder(self.dec_in(torch.cat([qb, up], 1))), lt + lb, it, ib

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top, bottom) code grids of ``x``; never updates a codebook."""
        h = self.base.encoder(x)
        it = self.top_q.quantize_indices(self.top_enc(h))
        up = self.top_up(self.top_q.embed(it))
        return it, self.base.quantizer.quantize_indices(self.bottom_in(torch.cat([h, up], 1)))

    def decode_indices(self, top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
        up = self.top_up(self.top_q.embed(top.long()))
        return self.base.decoder(self.dec_in(torch.cat([self.base.quantizer.embed(bottom.long()), up], 1)))


class CoarseConditionedPixelCNN(GatedPixelCNN):
    """The bottom prior: a grid-position PixelCNN whose position biases also carry a coarser code grid
    given as ``cond`` (see module docstring)."""

    def __init__(self, *args: Any, top_codes: int, **kw: Any) -> None:
        kw.setdefault("positions", "grid")
        super().__init__(*args, **kw)
        if self.positions != "grid" or self.spatial_dims != 3:
            raise MrivqError("CoarseConditionedPixelCNN needs positions='grid' in 3D")
        self.top_embedding = nn.Embedding(top_codes, self.position_dim)
        self.top_mix = nn.Conv3d(self.position_dim, self.position_dim, 3, padding=1)
        self._top: torch.Tensor | None = None

    def cond_biases(self, cond: Any, batch: int) -> list[torch.Tensor | None]:
        """Takes the top grid ``cond [B, *top]`` (kept for :meth:`position_biases`); no class bias."""
        if not isinstance(cond, torch.Tensor) or cond.dim() != 4:
            raise MrivqError("this prior needs the top code grids [B, d, h, w] as cond")
        self._top = cond.long().to(self.pos_grid.device).expand(batch, *cond.shape[1:])
        return [None] * self.num_layers

    def position_biases(self) -> list[torch.Tensor | None]:
        """Per layer ``[n, B, 2C, *latent]``: grid positions plus the upsampled, mixed top codes."""
        if self._top is None:
            raise MrivqError("call with the top code grids as cond")
        top = self.top_embedding(self._top).movedim(-1, 1)  # [B, pd, *top]
        up = F.interpolate(top, size=self.latent_shape, mode="nearest")
        vec = self.pos_grid[None] + self.top_mix(up)  # [B, pd, *latent]
        b, n = vec.shape[0], self.spatial_dims
        return [layer.pos(vec).reshape(b, n, 2 * self.channels, *self.latent_shape).transpose(0, 1)
                for layer in self.layers]
