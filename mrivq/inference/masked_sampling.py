"""Parallel decoding of a masked-token prior (MaskGIT, Chang et al. 2022)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from mrivq.inference.draws import code_task, eval_mode, pick, sample_uniforms
from mrivq.models.maskgit import MaskedTokenPrior, mask_ratio
from mrivq.utils.errors import MrivqError


def sample_masked(prior: MaskedTokenPrior, n: int, *, steps: int | None = None, temperature: float = 1.0,
                  top_k: int | None = None, seed: int | None = None, batch_size: int | None = None,
                  device: str | torch.device | None = None, progress: Any = None, first: int = 0
                  ) -> torch.LongTensor:
    """``n`` code grids from a masked-token prior by MaskGIT's parallel decoding (Chang et al. 2022).

    From an all-masked grid, each of ``steps`` (default: the prior's ``decode_steps``) evaluations of the
    network draws a code for every masked position (the same temperature/top-k inverse-CDF rule as the
    autoregressive samplers), scores each drawn code by its log-probability plus Gumbel noise scaled by
    ``choice_temperature * (1 - (t+1)/steps)``, and masks again the ``floor(N cos(pi/2 (t+1)/steps))``
    least confident (at least one code is fixed per step; none is left masked after the last).
    Randomness: per sample its own generator, ``2 N`` uniforms per step, so a sample depends only on
    ``seed`` and its index (``first`` as in :func:`sample_tokens`), not on ``batch_size``."""
    steps = int(steps or prior.decode_steps)
    if steps < 1:
        raise MrivqError(f"decode steps must be >= 1, got {steps}")
    shape, npos = prior.latent_shape, math.prod(prior.latent_shape)
    dev = torch.device(device) if device is not None else prior.embedding.weight.device
    model = prior if prior.embedding.weight.device == dev else copy.deepcopy(prior).to(dev)
    bs = max(1, int(batch_size or n or 1))
    u = sample_uniforms(seed, n, 2 * steps * npos, first)
    out = torch.empty(n, *shape, dtype=torch.long, device=dev)
    with eval_mode(model), code_task(progress, n * npos) as task:
        for s in range(0, n, bs):
            e = min(n, s + bs)
            out[s:e] = decode_masked(model, u[s:e].to(dev), steps, temperature, top_k, task).view(e - s, *shape)
    return out



def decode_masked(prior: MaskedTokenPrior, u: torch.Tensor, steps: int, temperature: float, top_k: int | None,
                   task: Any) -> torch.Tensor:
    b, npos, k = u.shape[0], math.prod(prior.latent_shape), prior.num_embeddings
    tokens = torch.full((b, npos), prior.mask_token, dtype=torch.long, device=u.device)
    masked = torch.ones(b, npos, dtype=torch.bool, device=u.device)
    for t in range(steps):
        logits = prior(tokens.view(b, *prior.latent_shape)).flatten(2).transpose(1, 2)  # [b, N, K]
        ut = u[:, 2 * t * npos:(2 * t + 1) * npos]
        ug = u[:, (2 * t + 1) * npos:(2 * t + 2) * npos].clamp(1e-300, 1 - 1e-16)
        drawn = pick(logits.reshape(b * npos, k), ut.reshape(-1), temperature, top_k).view(b, npos)
        conf = torch.log_softmax(logits.double(), -1).gather(-1, drawn.unsqueeze(-1)).squeeze(-1)
        noise = prior.choice_temperature * (1 - (t + 1) / steps)
        if noise > 0:
            conf = conf - noise * torch.log(-torch.log(ug))  # + Gumbel(0, 1)
        tokens = torch.where(masked, drawn, tokens)
        left = math.floor(npos * mask_ratio((t + 1) / steps)) if t + 1 < steps else 0
        before = int(masked.sum(1).max()) if task is not None else 0
        if left > 0:
            n_masked = masked.sum(1)
            keep = torch.clamp(torch.minimum(torch.full_like(n_masked, left), n_masked - 1), min=0)
            rank = conf.masked_fill(~masked, float("inf")).argsort(dim=1, stable=True).argsort(dim=1, stable=True)
            masked = rank < keep[:, None]
            tokens = torch.where(masked, torch.full_like(tokens, prior.mask_token), tokens)
        else:
            masked = torch.zeros_like(masked)
        if task is not None:
            task.advance(b * (before - int(masked.sum(1).max())))
    return tokens
