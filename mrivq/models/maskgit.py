"""A parallel-decoding prior over VQ-VAE code grids: masked-token modelling as in MaskGIT.

Chang et al. 2022, *MaskGIT: Masked Generative Image Transformer*: the prior is trained to predict the
codes at randomly masked positions from every unmasked one (bidirectional context, no raster order),
with the share of masked codes drawn from a cosine schedule; sampling starts from an all-masked grid
and in a fixed number of steps keeps the most confident of the predicted codes and masks the rest
again. It is the absorbing-state discrete diffusion of Austin et al. 2021 with a confidence-ordered
reverse process, so this is the "diffusion" family of priors, beside the autoregressive
:class:`~mrivq.models.pixelcnn.GatedPixelCNN`.

The network here is convolutional rather than a transformer: a stack of gated residual blocks with
dilated kernels (dilations cycle through ``dilations``, so 8 blocks of kernel 3 with dilations
1, 2, 4, 8 see 61 codes along every axis: the whole 12x14x12 grid of the CPU preset) and a learned
embedding per latent position added to every block's gate bias, the lever that made the PixelCNN's
samples head-shaped. Full self-attention over the 2016 codes of that grid costs more than the whole
network on a CPU; the dilated stack reaches as far for a fraction of it.

Token ``num_embeddings`` is the mask. ``forward(indices)`` takes ``LongTensor[B, *latent]`` with values
in ``0..num_embeddings`` and returns logits ``[B, num_embeddings, *latent]`` (never the mask token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.models.pixelcnn import gate
from mrivq.utils.errors import MrivqError


def _conv(n: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]


def mask_ratio(r: torch.Tensor | float) -> torch.Tensor | float:
    """MaskGIT's cosine schedule ``gamma(r) = cos(pi r / 2)``: the share of codes masked at ``r`` in [0, 1]
    (training draws ``r`` uniformly; sampling step ``t`` of ``T`` leaves ``gamma((t+1)/T)`` masked)."""
    if isinstance(r, torch.Tensor):
        return torch.cos(r * (math.pi / 2))
    return math.cos(r * math.pi / 2)


class _Block(nn.Module):
    """Pre-norm gated residual block: ``x + proj(gate(conv_dilated(norm(x)) + position bias))``."""

    def __init__(self, n: int, channels: int, kernel_size: int, dilation: int, pos_dim: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        conv = _conv(n)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.conv = conv(channels, 2 * channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation)
        self.pos = conv(pos_dim, 2 * channels, 1, bias=False)
        self.proj = conv(channels, channels, 1, bias=False)  # a norm follows everywhere: a bias would get no gradient

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x + self.proj(self.drop(gate(self.conv(self.norm(x)) + self.pos(pos))))


class MaskedTokenPrior(nn.Module):
    """Bidirectional masked-token prior over a code grid (see module docstring).

    Args:
        spatial_dims: 1, 2 or 3.
        num_embeddings: codebook size; the mask token is ``num_embeddings``.
        latent_shape: the code grid (the learned position embedding is tied to it).
        channels: feature width.
        num_blocks: gated residual blocks.
        kernel_size: odd, >= 3.
        dilations: the blocks' dilations, cycled.
        position_dim: width of the per-position embedding before each block's projection.
        decode_steps: sampling steps (every code is fixed after this many network evaluations).
        choice_temperature: scale of the Gumbel noise added to the confidences when choosing which codes
            to keep, annealed linearly to 0 over the steps (MaskGIT's 4.5).
        dropout: dropout on every block's gated activation while training (as the pixelcnn family's).
    """

    family = "maskgit"

    def __init__(self, spatial_dims: int, num_embeddings: int, latent_shape: Sequence[int], channels: int = 64,
                 num_blocks: int = 8, kernel_size: int = 3, dilations: Sequence[int] = (1, 2, 4, 8),
                 position_dim: int = 32, decode_steps: int = 12, choice_temperature: float = 4.5,
                 num_classes: int | None = None, num_covariates: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise MrivqError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if num_classes or num_covariates:
            raise MrivqError("the maskgit prior is unconditional; use prior.model.family=pixelcnn to condition on "
                             "classes or covariates")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise MrivqError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if num_blocks < 1 or channels < 1 or num_embeddings < 2 or position_dim < 1:
            raise MrivqError("num_blocks, channels and position_dim must be >= 1 and num_embeddings >= 2")
        if not dilations or min(int(d) for d in dilations) < 1:
            raise MrivqError(f"dilations must be a non-empty list of integers >= 1, got {list(dilations)}")
        if decode_steps < 1 or choice_temperature < 0:
            raise MrivqError("decode_steps must be >= 1 and choice_temperature >= 0")
        if not 0 <= dropout < 1:
            raise MrivqError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        shape = tuple(int(s) for s in latent_shape)
        if len(shape) != spatial_dims or min(shape) < 1:
            raise MrivqError(f"latent_shape {list(shape)} does not fit a {spatial_dims}D prior")
        self.spatial_dims, self.num_embeddings, self.latent_shape = spatial_dims, int(num_embeddings), shape
        self.channels, self.num_blocks, self.kernel_size = int(channels), int(num_blocks), int(kernel_size)
        self.dilations = [int(d) for d in dilations]
        self.position_dim, self.decode_steps = int(position_dim), int(decode_steps)
        self.choice_temperature = float(choice_temperature)
        self.num_classes, self.num_covariates, self.conditional = None, 0, False
        self.mask_token = self.num_embeddings
        self.embedding = nn.Embedding(self.num_embeddings + 1, channels)
        self.pos_grid = nn.Parameter(torch.randn(self.position_dim, *shape) * 0.02)
        self.blocks = nn.ModuleList([_Block(spatial_dims, channels, kernel_size,
                                            self.dilations[i % len(self.dilations)], self.position_dim, self.dropout)
                                     for i in range(num_blocks)])
        conv = _conv(spatial_dims)
        self.head = nn.Sequential(nn.GroupNorm(min(8, channels), channels), nn.ReLU(), conv(channels, channels, 1),
                                  nn.ReLU(), conv(channels, num_embeddings, 1))

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments plus ``family``, to rebuild the model from a checkpoint."""
        return {"family": self.family, "spatial_dims": self.spatial_dims, "num_embeddings": self.num_embeddings,
                "latent_shape": list(self.latent_shape), "channels": self.channels, "num_blocks": self.num_blocks,
                "kernel_size": self.kernel_size, "dilations": list(self.dilations),
                "position_dim": self.position_dim, "decode_steps": self.decode_steps,
                "choice_temperature": self.choice_temperature,
                **({"dropout": self.dropout} if self.dropout else {})}  # only when set: older versions read it

    def forward(self, indices: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Logits ``[B, num_embeddings, *latent]`` for every position, from the unmasked codes."""
        if cond is not None:
            raise MrivqError("this prior is unconditional; sample or score it without a class/covariates")
        if tuple(indices.shape[1:]) != self.latent_shape or indices.dim() != self.spatial_dims + 1:
            raise MrivqError(f"this prior was built for code grids {list(self.latent_shape)}, got "
                             f"{list(indices.shape[1:])}")
        x = self.embedding(indices.long()).movedim(-1, 1)
        pos = self.pos_grid[None]
        for block in self.blocks:
            x = block(x, pos)
        with torch.autocast(x.device.type, enabled=False):  # fp32 logits, as in the PixelCNN
            return self.head(x.to(self.head[2].weight.dtype))


def random_masks(b: int, positions: int, generator: torch.Generator) -> torch.Tensor:
    """``BoolTensor[b, positions]``: per row a uniformly random set of ``ceil(gamma(r) N)`` positions
    (at least one), ``r ~ U(0, 1)`` (MaskGIT training)."""
    r = torch.rand(b, generator=generator, dtype=torch.float64)
    count = torch.ceil(mask_ratio(r) * positions).clamp(1, positions).long()
    rank = torch.rand(b, positions, generator=generator).argsort(1).argsort(1)
    return rank < count[:, None]


def masked_token_loss(prior: nn.Module, indices: torch.Tensor, mask: torch.Tensor,
                      count: float | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats) of the codes at the masked positions (``mask [B, positions]``, bool),
    predicted from the others. ``count``: divide the sum by this instead of the number of masked codes
    here (a rank's share of a global batch divides by the global count over the ranks, so that averaged
    gradients are those of the global mean)."""
    idx = indices.long()
    flat = idx.flatten(1)
    token = getattr(prior, "module", prior).mask_token
    inp = torch.where(mask, torch.full_like(flat, token), flat).view_as(idx)
    logits = prior(inp).float().flatten(2)  # [B, K, N]
    ce = F.cross_entropy(logits, flat, reduction="none")[mask]
    return ce.mean() if count is None else ce.sum() / count


def masked_nats(prior: MaskedTokenPrior, codes: torch.Tensor, batch_size: int, device: torch.device,
                seed: int = 0) -> float:
    """Validation figure: :func:`masked_token_loss` over ``codes`` with masks drawn from ``seed`` (the same
    masks every time, so checkpoints compare), averaged per masked code. Not the joint likelihood the
    PixelCNN's nats per token measure: it is the expected cross-entropy under the training schedule."""
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    was = prior.training
    prior.eval()
    with torch.no_grad():
        for s in range(0, len(codes), batch_size):
            idx = codes[s:s + batch_size].to(device).long()
            mask = random_masks(idx.shape[0], idx[0].numel(), g).to(device)
            n = int(mask.sum())
            total += float(masked_token_loss(prior, idx, mask)) * n
            count += n
    prior.train(was)
    return total / max(count, 1)
