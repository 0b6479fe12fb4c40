"""Gated PixelCNN prior over VQ-VAE code grids, for 1, 2 or 3 spatial dimensions, without blind spot.

van den Oord et al. 2016, *Conditional Image Generation with PixelCNN Decoders*: gated layers
``tanh(a) * sigmoid(b)``, stacks that together see every earlier position (no blind spot), and a
conditioning vector added as a per-layer gate bias.

Order: raster order over the latent's spatial axes in array order (axis 0 slowest). With ``n`` spatial
axes there are ``n`` stacks (3D: depth, vertical, horizontal) and ``r = kernel_size // 2``:

- stack ``k < n-1`` works along axis ``k``: its kernel is 1 on axes ``< k``, ``r+1`` on axis ``k``
  (offsets ``-r..0``) and ``2r+1`` (centred) on axes ``> k``. Its features at index ``i_k`` include
  that index, so other stacks only read them shifted by one along axis ``k`` (``shift_k``);
- at every layer stack ``k`` adds a 1x1 projection of ``shift_j(S_j)`` for every ``j < k`` (the
  last stack reads every earlier stack directly, else index 0 of an axis would miss the earlier
  slices: a blind spot);
- the last (horizontal) stack has kernel ``r+1`` on the last axis: its first layer is mask A
  (offsets ``-r..-1``), later layers mask B (``-r..0``), with residual connections; a 1x1 head
  turns it into logits.

Receptive field: with ``L`` layers the logits at ``p`` depend on every earlier position within about
``L*r`` steps back along each axis and ``L*r`` either side along later axes (slightly more along
earlier axes through the shifts); nothing at or after ``p`` in raster order.

Two options give the prior what a translation-equivariant, local network lacks on registered anatomy:

- ``positions="axes"`` or ``"grid"``: learned absolute position embeddings (a sum of one table per
  axis, or one vector per latent position), projected per layer into every stack's gate bias, so a
  layer knows where in the head it is. Needs ``latent_shape``. It reads no tokens, so causality holds.
- ``attention_every=k``: a causal multi-head self-attention block over the horizontal stream after
  every ``k``-th gated layer (PixelSNAIL, Chen et al. 2018): position ``p`` attends to the stream at
  every position ``<= p`` in raster order, whose values depend only on codes before ``p``, so the
  whole earlier volume is in view instead of an ``L*r`` neighbourhood. The output projection starts
  at zero, so a new block starts as the identity.

The layer weights are laid out so that :mod:`mrivq.inference.sampling` can evaluate the same network one
block (slice, row, position) at a time (Ramachandran et al. 2017); attention keeps a key-value cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mrivq.utils.errors import MrivqError

Cond = torch.Tensor | int | dict | None


def _conv(n: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]


def gate(x: torch.Tensor) -> torch.Tensor:
    """``tanh(a) * sigmoid(b)`` over the two channel halves."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def pad_axes(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Zero-pad spatial axes (``pads[i]`` = (before, after) for spatial axis ``i``) of ``[B, C, ...]``."""
    flat: list[int] = []
    for before, after in reversed(pads):
        flat += [before, after]
    return F.pad(x, flat) if any(flat) else x


def shift(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Move features one step forward along spatial ``axis`` (zero at index 0)."""
    d = 2 + axis
    pads = [(0, 0)] * (x.dim() - 2)
    pads[axis] = (1, 0)
    return pad_axes(x, pads).narrow(d, 0, x.shape[d])


class GatedLayer(nn.Module):
    """One layer of all ``n`` stacks: causal convs, links from earlier stacks, output projection."""

    def __init__(self, spatial_dims: int, channels: int, r: int, first: bool, cond_dim: int | None,
                 pos_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        n, c, conv = spatial_dims, channels, _conv(spatial_dims)
        self.n, self.r, self.first = n, r, first
        convs = []
        for k in range(n):
            if k < n - 1:
                ks = (1,) * k + (r + 1,) + (2 * r + 1,) * (n - 1 - k)
            else:  # horizontal: mask A (-r..-1) on the first layer, mask B (-r..0) after
                ks = (1,) * (n - 1) + (r if first else r + 1,)
            convs.append(conv(c, 2 * c, ks))
        self.convs = nn.ModuleList(convs)
        # links[k-1]: 1x1 from concat(shift_j(S_j), j < k) into stack k's pre-activation
        self.links = nn.ModuleList([conv(k * c, 2 * c, 1, bias=False) for k in range(1, n)])
        self.proj = conv(c, c, 1)  # horizontal output projection (before the residual sum)
        self.cond = nn.Linear(cond_dim, n * 2 * c, bias=False) if cond_dim else None
        self.pos = conv(pos_dim, n * 2 * c, 1, bias=False) if pos_dim else None
        # on every gated activation, training only: elementwise, so no position sees a later one
        self.drop = nn.Dropout(dropout)

    def stack_pads(self, k: int) -> list[tuple[int, int]]:
        n, r = self.n, self.r
        if k == n - 1:
            return [(0, 0)] * (n - 1) + [(r, 0)]
        return [(0, 0)] * k + [(r, 0)] + [(r, r)] * (n - 1 - k)

    def forward(self, stacks: list[torch.Tensor], h: torch.Tensor, emb: torch.Tensor,
                cbias: torch.Tensor | None, pbias: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``pbias``: position bias ``[n, 2C, *latent]`` (see :meth:`GatedPixelCNN.position_biases`)."""
        n = self.n
        new: list[torch.Tensor] = []
        for k in range(n - 1):
            pre = self.convs[k](pad_axes(stacks[k], self.stack_pads(k)))
            if k > 0:
                pre = pre + self.links[k - 1](torch.cat([shift(new[j], j) for j in range(k)], 1))
            if cbias is not None:
                pre = pre + cbias[:, k].reshape(*cbias.shape[:1], -1, *[1] * n)
            if pbias is not None:
                pre = pre + pbias[k]
            new.append(stacks[k] + self.drop(gate(pre)))  # residual (the token embedding on the first layer)
        src = emb if self.first else h
        pre = self.convs[n - 1](pad_axes(src, self.stack_pads(n - 1)))
        if self.first:
            pre = pre.narrow(-1, 0, src.shape[-1])  # kernel r over -r..-1: drop the last output
        if n > 1:
            pre = pre + self.links[n - 2](torch.cat([shift(new[j], j) for j in range(n - 1)], 1))
        if cbias is not None:
            pre = pre + cbias[:, n - 1].reshape(*cbias.shape[:1], -1, *[1] * n)
        if pbias is not None:
            pre = pre + pbias[n - 1]
        out = self.proj(self.drop(gate(pre)))
        return new, out if self.first else h + out


class CausalAttention(nn.Module):
    """Pre-norm multi-head self-attention over a ``[B, C, *latent]`` stream in raster order, causal
    with the diagonal (position ``p`` sees ``<= p``), added residually; zero-initialised output."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise MrivqError(f"attention_heads ({heads}) must divide the prior's channels ({channels})")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` -> q, k, v each ``[B, heads, N, C/heads]``."""
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        return tuple(t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, heads, N, d]`` -> output projection ``[B, N, C]``."""
        b, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.flatten(2).transpose(1, 2)
        q, k, v = self.split(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.merge(y).transpose(1, 2).reshape(h.shape)


class GatedPixelCNN(nn.Module):
    """Autoregressive prior ``p(z) = prod_i p(z_i | z_<i)`` over a code grid (see module docstring).

    Args:
        spatial_dims: 1, 2 or 3; the latent's number of spatial axes.
        num_embeddings: codebook size (number of token values and of logits).
        channels: feature width of every stack.
        num_layers: gated layers (the first is mask A on the horizontal stack).
        kernel_size: odd, >= 3; ``r = kernel_size // 2`` positions of context per layer and axis.
        num_classes: class-conditional when set (``cond`` = class ids).
        num_covariates: number of continuous covariates (e.g. age, sex) when > 0.
        cond_dim: width of the conditioning vector built from class and covariates; it is projected
            to a per-layer, per-stack gate bias (the paper's ``V h`` term).
        latent_shape: the code grid's shape; needed by ``positions`` (the prior then only takes that grid).
        positions: ``None``, ``"axes"`` (one learned table per axis, summed) or ``"grid"`` (one learned
            vector per position): absolute position embeddings added to every gate's bias.
        position_dim: width of the position embedding before each layer's projection.
        attention_every: a causal self-attention block after every this many gated layers (0: none).
        attention_heads: heads of each attention block (must divide ``channels``).
        dropout: dropout on every gated activation while training (Srivastava et al. 2014; PixelCNN++,
            Salimans et al. 2017, regularises the same way); a prior trained long on a small cohort
            memorises its code grids without it. Sampling and scoring run in eval mode, unaffected.

    ``forward(indices, cond)`` takes ``LongTensor[B, *latent]`` and returns logits
    ``[B, num_embeddings, *latent]``. ``cond`` is ``None``, class ids ``LongTensor[B]`` (or an int for
    all), or ``{"class": LongTensor[B], "covariates": FloatTensor[B, m]}``.
    """

    def __init__(self, spatial_dims: int, num_embeddings: int, channels: int = 64, num_layers: int = 8,
                 kernel_size: int = 3, num_classes: int | None = None, num_covariates: int = 0,
                 cond_dim: int = 64, latent_shape: Sequence[int] | None = None, positions: str | None = None,
                 position_dim: int = 32, attention_every: int = 0, attention_heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise MrivqError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise MrivqError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if num_layers < 1 or channels < 1 or num_embeddings < 2:
            raise MrivqError("num_layers and channels must be >= 1 and num_embeddings >= 2")
        self.spatial_dims, self.num_embeddings, self.channels = spatial_dims, num_embeddings, channels
        self.num_layers, self.kernel_size = num_layers, kernel_size
        self.num_classes = int(num_classes) if num_classes else None
        self.num_covariates = int(num_covariates or 0)
        self.cond_dim = int(cond_dim)
        self.conditional = self.num_classes is not None or self.num_covariates > 0
        if positions not in (None, "none", "axes", "grid"):
            raise MrivqError(f"positions must be null, 'axes' or 'grid', not {positions!r}")
        self.positions = None if positions in (None, "none") else str(positions)
        self.latent_shape = tuple(int(v) for v in latent_shape) if latent_shape is not None else None
        if self.latent_shape is not None and (len(self.latent_shape) != spatial_dims or min(self.latent_shape) < 1):
            raise MrivqError(f"latent_shape {list(self.latent_shape)} does not fit a {spatial_dims}D prior")
        if self.positions and self.latent_shape is None:
            raise MrivqError("positions need the code grid's latent_shape")
        if attention_every < 0 or attention_heads < 1:
            raise MrivqError("attention_every must be >= 0 and attention_heads >= 1")
        if not 0 <= dropout < 1:
            raise MrivqError(f"dropout must be in [0, 1), got {dropout}")
        self.dropout = float(dropout)
        self.position_dim, self.attention_every, self.attention_heads = int(position_dim), int(attention_every), \
            int(attention_heads)
        r = kernel_size // 2
        self.embedding = nn.Embedding(num_embeddings, channels)
        pd = self.position_dim if self.positions else None
        if self.positions == "axes":
            self.pos_tables = nn.ParameterList([nn.Parameter(torch.randn(s, self.position_dim) * 0.02)
                                                for s in self.latent_shape])
        elif self.positions == "grid":
            self.pos_grid = nn.Parameter(torch.randn(self.position_dim, *self.latent_shape) * 0.02)
        self.class_embedding = nn.Embedding(self.num_classes, cond_dim) if self.num_classes else None
        self.covariate_proj = nn.Linear(self.num_covariates, cond_dim) if self.num_covariates else None
        cd = cond_dim if self.conditional else None
        self.layers = nn.ModuleList([GatedLayer(spatial_dims, channels, r, i == 0, cd, pd, self.dropout)
                                     for i in range(num_layers)])
        # attention[str(l)]: the block after gated layer l
        self.attention = nn.ModuleDict({str(i): CausalAttention(channels, self.attention_heads)
                                        for i in range(num_layers)
                                        if self.attention_every and (i + 1) % self.attention_every == 0})
        conv = _conv(spatial_dims)
        self.head = nn.Sequential(nn.ReLU(), conv(channels, channels, 1), nn.ReLU(),
                                  conv(channels, num_embeddings, 1))

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, to rebuild the model from a checkpoint: ``GatedPixelCNN(**config)``."""
        return {"spatial_dims": self.spatial_dims, "num_embeddings": self.num_embeddings,
                "channels": self.channels, "num_layers": self.num_layers, "kernel_size": self.kernel_size,
                "num_classes": self.num_classes, "num_covariates": self.num_covariates,
                "cond_dim": self.cond_dim, "latent_shape": list(self.latent_shape) if self.latent_shape else None,
                "positions": self.positions, "position_dim": self.position_dim,
                "attention_every": self.attention_every, "attention_heads": self.attention_heads,
                **({"dropout": self.dropout} if self.dropout else {})}  # only when set: older versions read it

    def position_biases(self) -> list[torch.Tensor | None]:
        """Per layer: the position part of every stack's gate bias, ``[n, 2C, *latent]`` (None without)."""
        if not self.positions:
            return [None] * self.num_layers
        n = self.spatial_dims
        if self.positions == "grid":
            vec = self.pos_grid
        else:
            vec = 0
            for a, table in enumerate(self.pos_tables):
                shape = [self.position_dim] + [1] * n
                shape[1 + a] = table.shape[0]
                vec = vec + table.t().reshape(shape)
            vec = vec.expand(self.position_dim, *self.latent_shape)
        return [layer.pos(vec[None])[0].reshape(n, 2 * self.channels, *self.latent_shape) for layer in self.layers]

    def cond_vector(self, cond: Cond, batch: int) -> torch.Tensor | None:
        """The conditioning vector ``[batch, cond_dim]`` for ``cond`` (None for an unconditional prior)."""
        if not self.conditional:
            if cond is not None:
                raise MrivqError("this prior is unconditional; sample or score it without a class/covariates")
            return None
        if not isinstance(cond, dict):
            cond = {"class": cond}
        unknown = set(cond) - {"class", "covariates"}
        if unknown:
            raise MrivqError(f"unknown conditioning keys {sorted(unknown)}; use 'class' and 'covariates'")
        dev = self.embedding.weight.device
        vec = torch.zeros(batch, self.cond_dim, device=dev, dtype=self.embedding.weight.dtype)
        if self.class_embedding is not None:
            cls = cond.get("class")
            if cls is None:
                raise MrivqError(f"this prior is class-conditional ({self.num_classes} classes); give a class")
            cls = torch.as_tensor(cls, device=dev).long().reshape(-1).expand(batch)
            if bool(((cls < 0) | (cls >= self.num_classes)).any()):
                raise MrivqError(f"class ids must be in 0..{self.num_classes - 1}")
            vec = vec + self.class_embedding(cls)
        elif cond.get("class") is not None:
            raise MrivqError("this prior has no classes; remove the class")
        if self.covariate_proj is not None:
            cov = cond.get("covariates")
            if cov is None:
                raise MrivqError(f"this prior needs {self.num_covariates} covariates per item")
            cov = torch.as_tensor(cov, device=dev, dtype=vec.dtype).reshape(-1, self.num_covariates)
            vec = vec + self.covariate_proj(cov.expand(batch, -1))
        elif cond.get("covariates") is not None:
            raise MrivqError("this prior takes no covariates; remove them")
        return vec

    def cond_biases(self, cond: Cond, batch: int) -> list[torch.Tensor | None]:
        """Per layer: the gate bias ``[batch, n, 2*channels]`` of every stack (None if unconditional)."""
        vec = self.cond_vector(cond, batch)
        if vec is None:
            return [None] * self.num_layers
        return [layer.cond(vec).reshape(batch, self.spatial_dims, -1) for layer in self.layers]

    def features(self, indices: torch.Tensor, cond: Cond = None) -> dict[str, Any]:
        """Logits and every layer's stack features (``stacks[l][k]``, ``horizontal[l]``)."""
        n = self.spatial_dims
        if indices.dim() != n + 1:
            raise MrivqError(f"expected code grids [B, {n} spatial axes], got shape {tuple(indices.shape)}")
        if self.latent_shape is not None and tuple(indices.shape[1:]) != self.latent_shape:
            raise MrivqError(f"this prior was built for code grids {list(self.latent_shape)}, got "
                             f"{list(indices.shape[1:])}")
        emb = self.embedding(indices.long()).movedim(-1, 1)
        cbs = self.cond_biases(cond, indices.shape[0])
        pbs = self.position_biases()
        stacks, h = [emb] * (n - 1), emb
        all_stacks, all_h = [], []
        for i, (layer, cb, pb) in enumerate(zip(self.layers, cbs, pbs, strict=True)):
            stacks, h = layer(stacks, h, emb, cb, pb)
            if str(i) in self.attention:
                h = self.attention[str(i)](h)
            all_stacks.append(stacks)
            all_h.append(h)
        with torch.autocast(h.device.type, enabled=False):  # fp32 logits: bf16 would round them by ~1%
            logits = self.head(h.to(self.head[1].weight.dtype))
        return {"logits": logits, "stacks": all_stacks, "horizontal": all_h}

    def forward(self, indices: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        """Logits ``[B, num_embeddings, *latent]``; position ``p`` depends only on positions before it."""
        return self.features(indices, cond)["logits"]
