"""EMA vector quantizer for channel-first feature maps of any spatial rank.

The codebook is learned by exponential moving averages of assignment counts and assigned-vector sums
(van den Oord et al., "Neural Discrete Representation Learning", 2017, appendix A.1; Sonnet's
``VectorQuantizerEMA``); the encoder sees a straight-through gradient and a commitment loss.

What differs from MONAI's ``EMAQuantizer`` (``monai/networks/layers/vector_quantizer.py``), which is
known to collapse to a handful of codes on MRI:

- the codebook starts from the data (k-means on the first training batch) instead of N(0, 1);
- codes unused for a while are re-seeded from recent encoder outputs (dead-code restart, as in
  Jukebox, Dhariwal et al. 2020, and SoundStream, Zeghidour et al. 2021);
- optionally (``decay_warmup``) the EMA decay warms up as TensorFlow's
  ``ExponentialMovingAverage(num_updates=t)`` does, ``min(decay, (1 + t) / (10 + t))``;
- the EMA sums start consistent with the codebook (no blow-up of rarely used codes on step 1);
- eval mode and :meth:`quantize_indices` never touch the codebook (MONAI's ``index_quantize`` updates
  it when the model is left in train mode);
- distances are float32 under any autocast (MONAI only disables CUDA autocast);
- usage and perplexity are measured over a window of recent steps, kept in buffers, so a
  ``state_dict`` round trip resumes exactly.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_INITS = ("kmeans", "sample", "random")
_RESTARTS = ("error", "data")
_CHUNK = 1 << 15  # rows per distance block: bounds the [N, K] distance matrix


def _dist_ready(enabled: bool) -> bool:
    return enabled and dist.is_available() and dist.is_initialized()


def _nearest(x: torch.Tensor, codes: torch.Tensor, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest code for every row of ``x`` (float32, chunked)."""
    idx, dmin = [], []
    c2 = (codes * codes).sum(1)
    for s in range(0, x.shape[0], _CHUNK):
        xs = x[s:s + _CHUNK]
        if cosine:  # unit vectors: |x - c|^2 = 2 - 2 x.c
            d = 2.0 - 2.0 * xs @ codes.t()
        else:
            d = torch.addmm(c2[None], xs, codes.t(), alpha=-2.0) + (xs * xs).sum(1, keepdim=True)
        m, i = d.min(1)
        idx.append(i)
        dmin.append(m.clamp(min=0))
    return torch.cat(idx), torch.cat(dmin)


def kmeans(x: torch.Tensor, k: int, iters: int = 10, cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows of ``x`` -> (centres [k, D], counts [k]).

    Starts from random rows; an empty cluster is re-seeded at a row drawn with probability proportional
    to its squared distance to its centre (as in k-means++), so duplicated rows (MRI background) cannot
    hold more than one centre.
    """
    n = x.shape[0]
    if n >= k:
        centres = x[torch.randperm(n, device=x.device)[:k]].clone()
    else:  # fewer rows than codes: repeat rows, jittered so the copies are distinct
        centres = x[torch.randint(n, (k,), device=x.device)]
        centres = centres + 1e-3 * x.std().clamp(min=1e-6) * torch.randn_like(centres)
    if cosine:
        centres = F.normalize(centres, dim=1)
    counts = torch.zeros(k, device=x.device)
    for _ in range(max(1, iters)):
        idx, dmin = _nearest(x, centres, cosine)
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        empty = int((~filled).sum())
        if empty and dmin.sum() > 0:
            centres[~filled] = x[torch.multinomial(dmin, empty, replacement=empty > n)]
        if cosine:
            centres = F.normalize(centres, dim=1)
    return centres, counts


class VectorQuantizerEMA(nn.Module):
    """Vector quantizer with an EMA-learned codebook, data-driven init and dead-code restart.

    Input and output are channel-first ``[B, embedding_dim, *spatial]`` for any number of spatial
    dims; ``forward`` returns ``(quantized, loss, indices)`` with ``indices`` ``[B, *spatial]``.

    Args:
        num_embeddings: number of codes in the codebook.
        embedding_dim: length of each code (channels of the encoder output it quantizes).
        commitment_cost: weight of ``mse(z_e, sg(z_q))``, the only loss (the codebook learns by EMA).
        decay: EMA decay of cluster sizes and code sums (0.99 as in the paper; MONAI's VQVAE uses 0.5).
        epsilon: Laplace smoothing of cluster sizes, keeps codes finite when their count nears 0.
        init: ``"kmeans"`` (Lloyd on the first training batch), ``"sample"`` (random vectors of the
            first training batch) or ``"random"`` (N(0, 1) at construction, as MONAI).
        kmeans_iters: Lloyd iterations of the k-means init.
        kmeans_samples: at most this many vectors of the first batch are clustered.
        dead_code_threshold: a code whose EMA cluster size (vectors per step) falls below this is dead;
            capped at half the mean cluster size so that small batches do not churn the whole codebook.
        restart_every: every this many training steps dead codes are re-seeded (0: never).
        restart_window: a code not selected in this many training steps is dead as well.
        buffer_size: recent encoder outputs kept (a ring, in a buffer) to re-seed dead codes from.
        restart_from: ``"error"`` re-seeds dead codes at recent encoder outputs drawn in proportion to
            their squared distance to the nearest live code (k-means++ style: new codes go where the
            quantization error is largest); ``"data"`` draws them uniformly (Jukebox, Dhariwal et al.
            2020). ``"data"`` puts more of the book in use on held-out phantom volumes (98-99% vs 96-98%),
            but it spends codes on dense, smooth regions. That doubles the code entropy (held-out
            perplexity ~250 vs ~140), and the quick start's prior then sampled far fewer head-like
            volumes, so ``"error"`` is the default (docs: design decisions).
        decay_warmup: EMA decay ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (TensorFlow's
            ``num_updates``), reaching ``decay`` = 0.99 after 890 updates. It helps a training loop without
            learning-rate warm-up; with ``mrivq train``'s warm-up it changed little. False (default):
            ``decay`` throughout.
        usage_window: training steps over which :meth:`stats` measures perplexity and usage.
        use_cosine: l2-normalise inputs and codes (cosine-similarity codebook, Yu et al. 2022).
        ddp_sync: under torch.distributed, gather every rank's encoder outputs for the EMA statistics,
            initialisation and restart pool, and broadcast rank 0's random choices.
    """

    def __init__(
        self,
        num_embeddings: int = 512,
        embedding_dim: int = 64,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        init: str = "kmeans",
        kmeans_iters: int = 10,
        kmeans_samples: int = 32768,
        dead_code_threshold: float = 3.0,
        restart_every: int = 5,
        restart_window: int = 50,
        buffer_size: int = 4096,
        restart_from: str = "error",
        decay_warmup: bool = False,
        usage_window: int = 100,
        use_cosine: bool = False,
        ddp_sync: bool = True,
    ) -> None:
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if num_embeddings < 1 or embedding_dim < 1 or usage_window < 1 or buffer_size < 1:
            raise ValueError("num_embeddings, embedding_dim, usage_window and buffer_size must be >= 1")
        if restart_from not in _RESTARTS:
            raise ValueError(f"restart_from must be one of {_RESTARTS}, got {restart_from!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.commitment_cost, self.decay, self.epsilon = float(commitment_cost), float(decay), float(epsilon)
        self.init, self.kmeans_iters, self.kmeans_samples = init, int(kmeans_iters), int(kmeans_samples)
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart_every, self.restart_window = int(restart_every), int(restart_window)
        self.use_cosine, self.ddp_sync = bool(use_cosine), bool(ddp_sync)
        self.restart_from, self.decay_warmup = restart_from, bool(decay_warmup)

        k, d = self.num_embeddings, self.embedding_dim
        codebook = torch.randn(k, d)
        if self.use_cosine:
            codebook = F.normalize(codebook, dim=1)
        # Invariant: codebook == embed_sum / smoothed(cluster_size) after every update.
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialised", torch.tensor(init == "random"))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(k, dtype=torch.long))
        self.register_buffer("usage_counts", torch.zeros(int(usage_window), k, dtype=torch.long))
        self.register_buffer("recent", torch.zeros(int(buffer_size), d))
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------- pure parts
    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 3 or z.shape[1] != self.embedding_dim:
            raise ValueError(f"expected [B, {self.embedding_dim}, *spatial], got {tuple(z.shape)}")
        flat = z.float().movedim(1, -1).reshape(-1, self.embedding_dim)
        return F.normalize(flat, dim=1) if self.use_cosine else flat

    def quantize_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices ``[B, *spatial]`` of ``z`` ``[B, D, *spatial]``. Pure: changes nothing."""
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            idx, _ = _nearest(self._flatten(z), self.codebook, self.use_cosine)
        return idx.view(z.shape[0], *z.shape[2:])

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of ``indices`` ``[B, *spatial]`` as a channel-first float32 ``[B, D, *spatial]``. Pure."""
        return F.embedding(indices.long(), self.codebook).movedim(-1, 1)

    def stats(self) -> dict:
        """Perplexity, fraction of codes used and dead codes over the last ``usage_window`` train steps."""
        ppl, usage = histogram_perplexity_and_usage(self.usage_counts.sum(0))
        return {"perplexity": ppl, "usage": usage, "dead_codes": int(self._dead().sum())}

    def _dead(self) -> torch.Tensor:
        mean = float(self.cluster_size.sum()) / self.num_embeddings
        dead = self.cluster_size < min(self.dead_code_threshold, 0.5 * mean)
        if self.restart_window > 0:
            dead |= (self.step - self.last_used) >= self.restart_window
        return dead

    # ----------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` -> (straight-through quantized ``z``, commitment loss, indices). Updates the codebook
        only in training mode."""
        with torch.autocast(z.device.type, enabled=False):
            flat = self._flatten(z)
            if self.training:
                # every rank's encoder outputs in global-batch order (rank 0's items first), so the EMA,
                # the initialisation and the restart pool are those of one process with the whole batch
                pooled = self._gather(flat.detach())
                # an fp16 overflow upstream must not reach the codebook: the loop rejects the step's
                # loss, but the EMA would already hold inf/NaN for good (every rank sees the same pool)
                learn = bool(torch.isfinite(pooled).all())
                if learn and not bool(self.initialised):
                    self._init_codebook(pooled)
            idx, _ = _nearest(flat.detach(), self.codebook, self.use_cosine)
            z_q = self.codebook[idx]
            if self.training and learn:
                self._update(pooled, self._gather(idx))
            loss = self.commitment_cost * F.mse_loss(flat, z_q)  # z_q carries no gradient
            z_st = flat + (z_q - flat).detach()
            shape = (z.shape[0], *z.shape[2:])
            quantized = z_st.view(*shape, self.embedding_dim).movedim(-1, 1)
        return quantized, loss, idx.view(shape)

    # ----------------------------------------------------------------- training-only updates
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of every rank concatenated in rank order under torch.distributed (``t`` alone otherwise);
        the ranks' shares of a batch are equal, contiguous slices (:func:`mrivq.utils.distributed.shard`)."""
        if not _dist_ready(self.ddp_sync):
            return t
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        k = self.num_embeddings
        if self.init == "kmeans":
            sub = flat[torch.randperm(flat.shape[0], device=flat.device)[: self.kmeans_samples]]
            codes, counts = kmeans(sub, k, self.kmeans_iters, self.use_cosine)
            size = (counts * flat.shape[0] / sub.shape[0]).clamp(min=1.0)
        else:  # "sample"
            codes = flat[torch.randint(flat.shape[0], (k,), device=flat.device)]
            size = torch.full((k,), max(1.0, flat.shape[0] / k), device=flat.device)
        self.codebook.copy_(codes)
        self.cluster_size.copy_(size)
        self.embed_sum.copy_(codes * size[:, None])
        self.initialised.fill_(True)
        self._broadcast("codebook", "cluster_size", "embed_sum")

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        k = self.num_embeddings
        counts = torch.bincount(idx, minlength=k).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, flat)
        decay = self.current_decay()
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + k * self.epsilon) * n
        codes = self.embed_sum / smoothed[:, None]
        self.codebook.copy_(F.normalize(codes, dim=1) if self.use_cosine else codes)

        step = int(self.step)
        self.usage_counts[step % self.usage_counts.shape[0]] = counts.long()
        self.last_used[counts > 0] = step
        self._remember(flat)
        self.step.add_(1)
        if self.restart_every > 0 and (step + 1) % self.restart_every == 0:
            self._restart()

    def current_decay(self) -> float:
        """EMA decay of this step: ``decay``, or with ``decay_warmup`` ``min(decay, (1 + t) / (10 + t))``
        (TensorFlow's ``ExponentialMovingAverage(num_updates=t)``), so codes track a fast-changing
        encoder early in training and the nominal decay holds from step ``~(10 decay - 1) / (1 - decay)``."""
        if not self.decay_warmup:
            return self.decay
        t = float(self.step)
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def _remember(self, flat: torch.Tensor) -> None:
        """Write a random subset of this batch into the ring of recent encoder outputs."""
        size = self.recent.shape[0]
        m = min(flat.shape[0], max(1, size // 4))
        rows = flat[torch.randperm(flat.shape[0], device=flat.device)[:m]]
        start = int(self.recent_filled) % size
        pos = (torch.arange(m, device=flat.device) + start) % size
        self.recent[pos] = rows
        self.recent_filled.add_(m)

    def _restart(self) -> None:
        """Re-seed dead codes at recent encoder outputs, drawn in proportion to their squared distance
        to the nearest live code (k-means++ style: new codes go where quantization error is largest)."""
        dead = self._dead()
        n_dead = int(dead.sum())
        filled = min(int(self.recent_filled), self.recent.shape[0])
        if n_dead == 0 or filled == 0:
            return
        pool = self.recent[:filled]
        live = self.codebook[~dead]
        if self.restart_from == "error" and live.shape[0] > 0:
            _, w = _nearest(pool, live, self.use_cosine)
        else:
            w = torch.ones(filled, device=pool.device)
        w = w + 1e-12
        new = pool[torch.multinomial(w, n_dead, replacement=n_dead > filled)]
        if n_dead > filled:
            new = new + 1e-3 * pool.std().clamp(min=1e-6) * torch.randn_like(new)
        if self.use_cosine:
            new = F.normalize(new, dim=1)
        size = max(self.dead_code_threshold, 1.0)
        self.codebook[dead] = new
        self.cluster_size[dead] = size
        self.embed_sum[dead] = new * size
        self.last_used[dead] = int(self.step)
        self._broadcast("codebook", "cluster_size", "embed_sum", "last_used")

    def _broadcast(self, *names: str) -> None:
        """Make rank 0's random choices (init, restarts) every rank's."""
        if _dist_ready(self.ddp_sync):
            for name in names:
                dist.broadcast(getattr(self, name), src=0)

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"decay={self.decay}, init={self.init!r}, cosine={self.use_cosine}")


def histogram_perplexity_and_usage(counts: torch.Tensor) -> tuple[float, float]:
    """exp(entropy) of the code histogram ``counts`` (0 when empty) and the fraction of codes used."""
    counts = counts.float()
    p = counts[counts > 0] / counts.sum().clamp(min=1)
    ppl = math.exp(float(-(p * p.log()).sum())) if p.numel() else 0.0
    return ppl, float((counts > 0).float().mean())


def perplexity_and_usage(indices: torch.Tensor, num_embeddings: int) -> tuple[float, float]:
    """Perplexity and fraction of codes used of one batch of indices."""
    return histogram_perplexity_and_usage(torch.bincount(indices.flatten(), minlength=num_embeddings))
