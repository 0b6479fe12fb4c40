"""Per-code likelihood under an autoregressive prior, and the prior-free baselines (each position's
training frequencies, drawn independently)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mrivq.inference.draws import cond_slice, eval_mode, need_autoregressive, pick, sample_uniforms
from mrivq.models.pixelcnn import Cond, GatedPixelCNN
from mrivq.utils.errors import MrivqError


def log_likelihood(prior: GatedPixelCNN, indices: torch.Tensor, cond: Cond = None, *,
                   batch_size: int | None = None) -> torch.Tensor:
    """Negative log-likelihood per code in nats, ``FloatTensor[B, *latent]`` (``-log p(z_i | z_<i)``).

    Equals ``F.cross_entropy(prior(indices, cond), indices, reduction="none")``; computed in eval mode
    without gradients. Summing over the grid gives the code grid's total NLL.
    """
    need_autoregressive(prior)
    idx = indices.long().to(prior.embedding.weight.device)
    b = idx.shape[0]
    bs = max(1, int(batch_size or b or 1))
    outs = []
    with eval_mode(prior):
        for s in range(0, b, bs):
            logits = prior(idx[s:s + bs], cond_slice(cond, s, min(b, s + bs), b))
            outs.append(F.cross_entropy(logits.float(), idx[s:s + bs], reduction="none"))
    return torch.cat(outs) if outs else torch.empty(0, *idx.shape[1:])



def marginal_logits(codes: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """``[*latent, K]`` log training frequencies of each code at each position, from the training code
    grids ``codes [N, *latent]`` (``-inf`` where a code never occurs): the "no prior" baseline of
    the Keras VQ-VAE example, with the anatomy's position dependence but no interaction between codes."""
    idx = codes.long().flatten(1)
    counts = torch.zeros(idx.shape[1], num_embeddings, dtype=torch.float64)
    counts.scatter_add_(1, idx.t(), torch.ones_like(idx.t(), dtype=torch.float64))
    return (counts / counts.sum(1, keepdim=True)).log().reshape(*codes.shape[1:], num_embeddings)



def sample_independent(logits: torch.Tensor, n: int, *, temperature: float = 1.0, top_k: int | None = None,
                       seed: int | None = None) -> torch.LongTensor:
    """``n`` code grids drawn position by position, independently, from ``logits [*latent, K]``, with
    the same uniforms, temperature and top-k rule as :func:`sample_tokens` (uniform codes: zeros)."""
    shape, k = tuple(logits.shape[:-1]), logits.shape[-1]
    if temperature < 0:
        raise MrivqError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MrivqError(f"top_k must be >= 1, got {top_k}")
    p = math.prod(shape)
    u = sample_uniforms(seed, n, p)
    flat = logits.reshape(1, p, k).expand(n, p, k).reshape(n * p, k)
    return pick(flat, u.reshape(-1), temperature, top_k).reshape(n, *shape)
