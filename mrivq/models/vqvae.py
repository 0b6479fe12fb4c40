"""2D/3D VQ-VAE: MONAI's VQ-VAE encoder and decoder around :class:`VectorQuantizerEMA`.

The encoder and decoder are MONAI's own (``monai.networks.nets.vqvae.Encoder`` / ``Decoder``, the
architecture of Tudosiu et al. 2022, https://arxiv.org/abs/2209.03177): strided 4x4 convolutions that
halve every axis per level, with residual units between. Only the quantizer is replaced (see
:mod:`mrivq.models.quantizer` for why), and the model gains what a training/sampling pipeline needs:
pure ``encode_indices``/``decode_indices``, ``latent_shape``, a ``config`` to rebuild it, and a
one-line error for inputs whose size the strided convolutions cannot invert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.vqvae import Decoder, Encoder
from torch import nn

from mrivq.models.fsq import FiniteScalarQuantizer
from mrivq.models.quantizer import VectorQuantizerEMA, perplexity_and_usage
from mrivq.utils.errors import MrivqError


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


class VQVAE(nn.Module):
    """Vector-quantised autoencoder for ``spatial_dims`` 2 or 3 (van den Oord et al. 2017).

    Each of the ``len(channels)`` levels halves every spatial axis, so inputs must be divisible by
    ``downsample_factor = 2 ** len(channels)`` and code grids are ``input_shape / downsample_factor``.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_channels: input channels (modalities).
        out_channels: output channels; ``None`` means ``in_channels``.
        channels: feature channels of each level (its length is the number of 2x downsamplings).
        num_res_layers: residual units per level.
        num_res_channels: hidden channels of the residual units, one per level (or one int for all).
        num_embeddings: codebook size.
        embedding_dim: code length; the encoder's last convolution projects to it, the decoder's first
            projects back, so a small value (8-64) needs no extra 1x1 projection.
        commitment_cost, decay, epsilon, init, dead_code_threshold, restart_every, restart_window,
            restart_from, decay_warmup, usage_window, use_cosine, ddp_sync: see :class:`VectorQuantizerEMA`.
        act: activation (MONAI name or ``(name, kwargs)``).
        dropout: dropout ratio inside the encoder/decoder.
        output_act: activation on the output (``None``: linear, the trainer clamps for metrics).
        checkpointing: activation checkpointing of the encoder's and decoder's blocks in training: less
            memory for more compute (the 1 mm preset needs it); the results are the same.
        quantizer: ``"ema"`` (a learned codebook, :class:`VectorQuantizerEMA`) or ``"fsq"`` (finite scalar
            quantization, :class:`~mrivq.models.fsq.FiniteScalarQuantizer`, Mentzer et al. 2023: each code
            channel rounded to a few levels, no codebook to learn or collapse).
        fsq_levels: levels per code channel with ``quantizer="fsq"``; they set ``num_embeddings`` (their
            product) and ``embedding_dim`` (their number).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int | None = None,
        channels: Sequence[int] = (32, 64),
        num_res_layers: int = 2,
        num_res_channels: Sequence[int] | int = (32, 64),
        num_embeddings: int = 512,
        embedding_dim: int = 64,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        init: str = "kmeans",
        dead_code_threshold: float = 3.0,
        restart_every: int = 5,
        restart_window: int = 50,
        restart_from: str = "error",
        decay_warmup: bool = False,
        usage_window: int = 100,
        use_cosine: bool = False,
        act: str | Sequence = "relu",
        dropout: float = 0.0,
        output_act: str | Sequence | None = None,
        ddp_sync: bool = True,
        checkpointing: bool = False,
        quantizer: str = "ema",
        fsq_levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MrivqError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise MrivqError("channels must name at least one level, e.g. [32, 64]")
        if isinstance(num_res_channels, int):
            num_res_channels = (num_res_channels,) * len(channels)
        num_res_channels = tuple(int(c) for c in num_res_channels)
        if len(num_res_channels) != len(channels):
            raise MrivqError(f"num_res_channels {list(num_res_channels)} needs one entry per level of "
                             f"channels {list(channels)}")
        out_channels = in_channels if out_channels is None else out_channels
        if quantizer not in ("ema", "fsq"):
            raise MrivqError(f"model.quantizer {quantizer!r} is not one of ema, fsq")
        if quantizer == "fsq":  # the grid of levels is the codebook and its channels the code length
            if not fsq_levels:
                raise MrivqError("model.quantizer fsq needs model.fsq_levels, e.g. [8, 5, 5, 5] (1000 codes)")
            fsq_levels = [int(v) for v in fsq_levels]
            num_embeddings, embedding_dim = math.prod(fsq_levels), len(fsq_levels)
        act = tuple(act) if isinstance(act, list) else act  # a config read back from JSON has lists
        output_act = tuple(output_act) if isinstance(output_act, list) else output_act
        self._config = {k: _jsonable(v) for k, v in dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=channels,
            num_res_layers=num_res_layers, num_res_channels=num_res_channels, num_embeddings=num_embeddings,
            embedding_dim=embedding_dim, commitment_cost=commitment_cost, decay=decay, epsilon=epsilon,
            init=init, dead_code_threshold=dead_code_threshold, restart_every=restart_every,
            restart_window=restart_window, restart_from=restart_from, decay_warmup=decay_warmup,
            usage_window=usage_window, use_cosine=use_cosine, act=act, dropout=dropout, output_act=output_act,
            ddp_sync=ddp_sync, checkpointing=checkpointing,
            **({"quantizer": quantizer, "fsq_levels": fsq_levels} if quantizer == "fsq" else {})).items()}
        self.checkpointing = bool(checkpointing)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        levels = len(channels)
        # MONAI's default (stride 2, kernel 4, dilation 1, padding 1): an exact 2x per level.
        self.encoder = Encoder(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=embedding_dim, channels=channels,
            num_res_layers=num_res_layers, num_res_channels=num_res_channels,
            downsample_parameters=((2, 4, 1, 1),) * levels, dropout=dropout, act=act)
        self.decoder = Decoder(
            spatial_dims=spatial_dims, in_channels=embedding_dim, out_channels=out_channels, channels=channels,
            num_res_layers=num_res_layers, num_res_channels=num_res_channels,
            upsample_parameters=((2, 4, 1, 1, 0),) * levels, dropout=dropout, act=act, output_act=output_act)
        # Departure from monai.networks.nets.VQVAE: our quantizer (data init, dead-code restart, pure
        # lookups in eval mode, windowed usage stats) instead of MONAI's EMAQuantizer.
        # model.quantizer fsq: finite scalar quantization, no learned codebook (mrivq.models.fsq)
        self.quantizer: nn.Module
        if quantizer == "fsq":
            self.quantizer = FiniteScalarQuantizer(fsq_levels, usage_window=usage_window)
        else:
            self.quantizer = VectorQuantizerEMA(
                num_embeddings=num_embeddings, embedding_dim=embedding_dim, commitment_cost=commitment_cost,
                decay=decay, epsilon=epsilon, init=init, dead_code_threshold=dead_code_threshold,
                restart_every=restart_every, restart_window=restart_window, restart_from=restart_from,
                decay_warmup=decay_warmup, usage_window=usage_window,
                use_cosine=use_cosine, ddp_sync=ddp_sync)

    # ----------------------------------------------------------------- shapes
    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-friendly): ``VQVAE(**model.config)`` rebuilds the model."""
        return dict(self._config)

    @property
    def downsample_factor(self) -> int:
        """How many input voxels one code covers along each axis."""
        return 2 ** len(self._config["channels"])

    def latent_shape(self, input_spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Code-grid shape for an input of ``input_spatial_shape`` (checked for divisibility)."""
        shape = tuple(int(s) for s in input_spatial_shape)
        f = self.downsample_factor
        if len(shape) != self.spatial_dims or any(s % f or s <= 0 for s in shape):
            raise MrivqError(f"input spatial shape {shape} must have {self.spatial_dims} sizes divisible by "
                             f"{f} (2**{len(self._config['channels'])} levels); crop or pad it to a multiple")
        return tuple(s // f for s in shape)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise MrivqError(f"input of shape {tuple(x.shape)} is not [batch, {self.in_channels}, "
                             f"{self.spatial_dims} spatial sizes]; check channels and dims")
        self.latent_shape(x.shape[2:])

    # ----------------------------------------------------------------- model
    def forward_with_info(self, x: torch.Tensor) -> dict:
        """Reconstruct ``x`` -> dict(x_hat, vq_loss, indices, perplexity, usage).

        ``vq_loss`` is the commitment loss only (the trainer adds the reconstruction loss). In training
        mode ``perplexity`` and ``usage`` are over the quantizer's usage window (as :meth:`stats`); in
        eval mode over this batch.
        """
        self._check(x)
        z_q, vq_loss, idx = self.quantizer(self.run_transforms(self.encoder, x))
        x_hat = self.run_transforms(self.decoder, z_q)
        if self.training:
            s = self.quantizer.stats()
            ppl, usage = s["perplexity"], s["usage"]
        else:
            ppl, usage = perplexity_and_usage(idx, self.num_embeddings)
        return {"x_hat": x_hat, "vq_loss": vq_loss, "indices": idx, "perplexity": ppl, "usage": usage}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` -> ``(x_hat, vq_loss)``; ``vq_loss`` is the commitment loss only."""
        info = self.forward_with_info(x)
        return info["x_hat"], info["vq_loss"]

    def run_transforms(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net(x)``; with ``checkpointing`` in training, block by block under activation checkpointing
        (Chen et al. 2016): each block's activations are recomputed in the backward pass instead of kept,
        which bounds the memory of a 1 mm volume at about a third more compute."""
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return net(x)
        from torch.utils.checkpoint import checkpoint

        for block in net.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices ``LongTensor[B, *latent]`` of ``x``. Pure: never updates the codebook."""
        self._check(x)
        return self.quantizer.quantize_indices(self.encoder(x))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Reconstruction from code indices ``[B, *latent]``."""
        if indices.dim() != self.spatial_dims + 1:
            raise MrivqError(f"code grid of shape {tuple(indices.shape)} is not [batch, "
                             f"{self.spatial_dims} latent sizes]")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise MrivqError(f"code indices must be integers, not {str(indices.dtype).replace('torch.', '')}")
        codes = self.quantizer.embed(indices.long())  # int16 grids of the code cache included
        return self.decoder(codes.to(next(self.decoder.parameters()).dtype))

    def stats(self) -> dict:
        """The quantizer's windowed perplexity, usage and dead-code count."""
        return self.quantizer.stats()
