"""What every sampler shares: uniforms drawn up front per sample, the inverse-CDF pick under temperature and
top-k, eval mode, conditioning slices, and the progress task with its time estimate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from mrivq.models.maskgit import MaskedTokenPrior
from mrivq.models.pixelcnn import Cond, GatedPixelCNN
from mrivq.utils.errors import MrivqError


def need_autoregressive(prior: Any) -> None:
    if isinstance(prior, MaskedTokenPrior):
        raise MrivqError("healing and likelihood maps need the autoregressive prior (prior.model.family: pixelcnn); "
                         "this run's prior is maskgit, which has no per-code likelihood")
    if not isinstance(prior, GatedPixelCNN):
        raise MrivqError(f"expected a GatedPixelCNN prior, got {type(prior).__name__}")



@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)



def sample_uniforms(seed: int | None, n: int, positions: int, first: int = 0) -> torch.Tensor:
    """``[n, positions]`` float64 uniforms of samples ``first .. first+n-1``; sample ``i`` uses its own
    generator, seeded with the ``i``-th number drawn from ``seed``."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
    master = torch.Generator().manual_seed(int(seed))
    seeds = torch.randint(0, 2**62, (first + n,), generator=master).tolist()[first:]
    return torch.stack([torch.rand(positions, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                        for s in seeds]) if n else torch.empty(0, positions, dtype=torch.float64)



def pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Token per row of ``logits [b, K]`` by inverse CDF at ``u [b]`` (temperature 0: argmax)."""
    logits = logits.double()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = torch.softmax(logits, -1).cumsum(-1)
    v = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, v, right=True).squeeze(1).clamp_(max=logits.shape[-1] - 1)



def cond_slice(cond: Cond, start: int, stop: int, n: int, key: str = "class") -> Cond:
    """Rows ``start:stop`` of a per-sample condition (an int, one class or one covariate row broadcast)."""
    if cond is None or isinstance(cond, int):
        return cond
    if isinstance(cond, dict):
        return {k: cond_slice(v, start, stop, n, k) for k, v in cond.items()}
    t = torch.as_tensor(cond)
    if t.dim() == 0 or t.shape[0] == 1 or (key == "covariates" and t.dim() == 1):
        return t
    if t.shape[0] != n:
        raise MrivqError(f"conditioning has {t.shape[0]} rows for {n} samples; give one per sample or one for all")
    return t[start:stop]



#: a sampling expected to take longer than this many seconds says so before most of it runs
ANNOUNCE_ABOVE_S = 30.0



class TimeEstimate:
    """A progress task that, after the first ``1/50`` of the codes (or first second) is sampled, notes
    how long the whole sampling will take, when that is above :data:`ANNOUNCE_ABOVE_S` (a run whose
    latent grid is large, or many samples, should not run for hours without a word)."""

    def __init__(self, task: Any, progress: Any, total: int) -> None:

        self.task, self.progress, self.total, self.done = task, progress, max(int(total), 1), 0
        self.t0, self.said, self.clock = time.perf_counter(), False, time.perf_counter

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self.task is not None:
            self.task.advance(n)
        if self.said or not hasattr(self.progress, "note"):
            return
        spent = self.clock() - self.t0
        if self.done >= self.total / 50 or spent >= 1.0:
            self.said = True
            left = spent * (self.total - self.done) / max(self.done, 1)
            if spent + left > ANNOUNCE_ABOVE_S:
                self.progress.note(f"sampling {self.total:,} codes will take about {duration_text(spent + left)} "
                                   f"({self.done / max(spent, 1e-9):,.0f} codes/s so far)")



def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"



@contextmanager
def code_task(progress: Any, total: int) -> Iterator[Any]:
    if progress is None:
        yield None
    elif hasattr(progress, "task"):
        with progress.task("sample codes", total=total, unit="code") as t:
            yield TimeEstimate(t, progress, total)
    else:
        yield progress
