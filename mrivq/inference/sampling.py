"""Sampling code grids from a :class:`~mrivq.models.pixelcnn.GatedPixelCNN`, and per-code likelihood.

Two samplers that return the same tokens for the same seed:

- the *reference* sampler reruns the whole network for every position (as the Keras VQ-VAE example
  does): simple and obviously right, but ``O(N)`` full forwards for ``N`` positions;
- the *cached* sampler (Ramachandran et al. 2017, *Fast Generation for Convolutional Autoregressive
  Models*, extended to the depth/vertical/horizontal stacks) computes every layer's activation at
  every position once, when its inputs are final: after a whole block along axis ``k`` (3D: a slice,
  then a row) it evaluates stack ``k`` for that block from the last ``r+1`` cached blocks; for each new
  position it evaluates the horizontal stack at that single position from its last ``r+1`` cached
  positions. Work per position is constant, so time is linear in the number of positions.

Randomness is drawn up front: each sample gets its own generator (seeded from ``seed``) and one
uniform number per position, and a token is picked by inverse CDF of the temperature/top-k adjusted
softmax. Both samplers therefore consume randomness identically, and a sample does not depend on
``batch_size`` or on how many samples are drawn with it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from mrivq.inference.draws import code_task, cond_slice, eval_mode, need_autoregressive, pick, sample_uniforms
from mrivq.inference.masked_sampling import sample_masked
from mrivq.models.maskgit import MaskedTokenPrior
from mrivq.models.pixelcnn import Cond, GatedPixelCNN, gate, pad_axes
from mrivq.utils.errors import MrivqError

Given = tuple[torch.Tensor, torch.Tensor] | None  # (tokens, keep) [b, positions]: keep those tokens


def _choose(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None, given: Given,
            pos: int) -> torch.Tensor:
    tok = pick(logits, u[:, pos], temperature, top_k)
    if given is not None:
        tok = torch.where(given[1][:, pos], given[0][:, pos], tok)
    return tok


def _sample_reference(prior: GatedPixelCNN, shape: tuple[int, ...], u: torch.Tensor, cond: Cond,
                      temperature: float, top_k: int | None, task: Any, given: Given = None) -> torch.Tensor:
    """One full forward per position (the obviously-correct baseline)."""
    b, dev = u.shape[0], prior.embedding.weight.device
    tokens = torch.zeros(b, *shape, dtype=torch.long, device=dev)
    flat = tokens.view(b, -1)
    for pos in range(flat.shape[1]):
        logits = prior(tokens, cond).flatten(2)[:, :, pos]
        flat[:, pos] = _choose(logits, u, temperature, top_k, given, pos)
        if task is not None and (pos + 1) % shape[-1] == 0:
            task.advance(b * shape[-1])
    return tokens


class _Incremental:
    """The cached sampler's state for one batch: per stack and layer a window of the last ``r+1``
    blocks along the stack's axis (stack ``k``'s blocks are ``[b, C, *latent[k+1:]]``), per layer the
    current row of the horizontal stack, and the row's bias from the earlier stacks and conditioning.
    ``record=True`` also keeps every computed feature in full-size tensors (for tests)."""

    def __init__(self, prior: GatedPixelCNN, shape: tuple[int, ...], b: int, cond: Cond, record: bool) -> None:
        self.p, self.shape, self.b, self.n = prior, shape, b, len(shape)
        self.r, self.C, self.L = prior.kernel_size // 2, prior.channels, prior.num_layers
        w = prior.embedding.weight
        self.cb = prior.cond_biases(cond, b)
        self.pos = prior.position_biases()
        zeros = dict(device=w.device, dtype=w.dtype)
        # attention key-value caches per block, filled in raster order: keys transposed
        # [b*heads, d, positions] (one query against all keys is then one contiguous product), values
        # [b*heads, positions, d]
        npos, heads = math.prod(shape), prior.attention_heads
        d = self.C // heads
        self.kv = {int(k): (torch.zeros(b * heads, d, npos, **zeros), torch.zeros(b * heads, npos, d, **zeros))
                   for k in prior.attention}
        self.attn_w = {int(k): (a.norm.weight, a.norm.bias, a.qkv.weight.t().contiguous(), a.qkv.bias,
                                a.out.weight.t().contiguous(), a.out.bias) for k, a in prior.attention.items()}
        n, r, C = self.n, self.r, self.C
        # win[k][l+1]: stack k features of layer l (index 0: token embeddings), r+1 blocks along axis k
        self.win = [[torch.zeros(b, C, r + 1, *shape[k + 1:], **zeros) for _ in range(self.L + 1)]
                    for k in range(n - 1)]
        D = shape[-1]
        self.ebuf = torch.zeros(b, D + r, C, **zeros)  # row embeddings, r zeros in front (positions first)
        self.hbuf = [torch.zeros(b, D + r, C, **zeros) for _ in range(self.L)]
        self.hw, self.pw, self.pb = [], [], []
        for layer in prior.layers:  # horizontal conv as a matrix over (tap, channel), transposed
            cw = layer.convs[n - 1].weight
            taps = cw.shape[-1]
            self.hw.append(cw.reshape(2 * C, C, taps).permute(0, 2, 1).reshape(2 * C, taps * C).t().contiguous())
            self.pw.append(layer.proj.weight.reshape(C, C).t().contiguous())
            self.pb.append(layer.proj.bias)
        h1, h2 = prior.head[1], prior.head[3]
        self.head = (h1.weight.flatten(1).t().contiguous(), h1.bias, h2.weight.flatten(1).t().contiguous(), h2.bias)
        self.rec = None
        if record:
            full = lambda: torch.zeros(b, C, *shape, **zeros)  # noqa: E731
            self.rec = {"stacks": [[full() for _ in range(n - 1)] for _ in range(self.L)],
                        "horizontal": [full() for _ in range(self.L)]}

    def block(self, k: int, prefix: tuple[int, ...], tokens: torch.Tensor) -> None:
        """Stack ``k`` (all layers) on the finished block ``prefix = (p_0..p_k)``; pushes it into ``win[k]``."""
        p, n, r, b = self.p, self.n, self.r, self.b
        idx = (slice(None),) + prefix
        win = self.win[k]
        win[0] = torch.cat([win[0][:, :, 1:], p.embedding(tokens[idx]).movedim(-1, 1).unsqueeze(2)], 2)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n - k]
        pads = [(0, 0)] + [(r, r)] * (n - 1 - k)
        for l_, layer in enumerate(p.layers):
            cw = layer.convs[k]
            pre = conv(pad_axes(win[l_], pads), cw.weight.reshape(*cw.weight.shape[:2], *cw.weight.shape[2 + k:]),
                       cw.bias).squeeze(2)
            if k > 0:  # shift_j(S_j): the last finished block of stack j at this prefix
                src = torch.cat([self.win[j][l_ + 1][(slice(None), slice(None), -1) + prefix[j + 1:]]
                                 for j in range(k)], 1)
                lw = layer.links[k - 1].weight.flatten(1)
                pre = pre + torch.einsum("oc,bc...->bo...", lw, src)
            if self.cb[l_] is not None:
                pre = pre + self.cb[l_][:, k].reshape(b, -1, *[1] * (n - 1 - k))
            if self.pos[l_] is not None:
                pre = pre + self.pos[l_][k][self._lead(self.pos[l_]) + prefix]
            new = win[l_][:, :, -1] + gate(pre)
            win[l_ + 1] = torch.cat([win[l_ + 1][:, :, 1:], new.unsqueeze(2)], 2)
            if self.rec is not None:
                self.rec["stacks"][l_][k][(slice(None), slice(None)) + prefix] = new

    def _lead(self, pb: torch.Tensor) -> tuple[slice, ...]:
        """Index prefix of a layer's position biases: ``[n, 2C, *latent]``, or ``[n, b, 2C, *latent]`` when
        they differ per sample (a subclass's spatial conditioning, e.g. on a coarser code grid)."""
        return (slice(None),) * (pb.dim() - 1 - self.n)

    def reset(self, k: int) -> None:
        """A new block along axis ``k-1`` starts: stack ``k``'s window is zero padding again."""
        for t in self.win[k]:
            t.zero_()

    def row_bias(self, prefix: tuple[int, ...]) -> list[torch.Tensor]:
        """Per layer ``[b, D, 2C]``: horizontal conv bias + links from shifted earlier stacks + condition."""
        n, b, out = self.n, self.b, []
        for l_, layer in enumerate(self.p.layers):
            bias = layer.convs[n - 1].bias.reshape(1, 1, -1)
            if n > 1:
                src = torch.cat([self.win[j][l_ + 1][(slice(None), slice(None), -1) + prefix[j + 1:]]
                                 for j in range(n - 1)], 1)  # [b, (n-1)C, D]
                bias = bias + src.transpose(1, 2) @ layer.links[n - 2].weight.flatten(1).t()
            if self.cb[l_] is not None:
                bias = bias + self.cb[l_][:, n - 1].unsqueeze(1)
            if self.pos[l_] is not None:
                bias = bias + self.pos[l_][n - 1][self._lead(self.pos[l_]) + prefix].transpose(-1, -2)
            out.append(bias.expand(b, self.shape[-1], -1))
        return out

    def attend(self, l_: int, h: torch.Tensor, pos: int) -> torch.Tensor:
        """Attention block after layer ``l_`` at flat position ``pos``: cache its key and value, attend
        to every cached position ``<= pos`` (the full model's causal mask), return the new stream.
        The same arithmetic as :class:`~mrivq.models.pixelcnn.CausalAttention`, as plain matrix
        products on one position (module calls and SDPA dispatch cost more than the maths here)."""
        ln_w, ln_b, qkv_w, qkv_b, out_w, out_b = self.attn_w[l_]
        b, heads, C = self.b, self.p.attention_heads, self.C
        d = C // heads
        qkv = torch.addmm(qkv_b, F.layer_norm(h, (C,), ln_w, ln_b), qkv_w).view(b, 3, heads * d)
        kt, vc = self.kv[l_]  # keys transposed [b*heads, d, N], values [b*heads, N, d]
        kt[:, :, pos] = qkv[:, 1].reshape(b * heads, d)
        vc[:, pos] = qkv[:, 2].reshape(b * heads, d)
        scores = torch.bmm(qkv[:, 0].reshape(b * heads, 1, d), kt[:, :, :pos + 1]) * d ** -0.5
        y = torch.bmm(torch.softmax(scores, -1), vc[:, :pos + 1]).reshape(b, C)
        return h + torch.addmm(out_b, y, out_w)

    def position(self, i: int, rbias: list[torch.Tensor], pos: int) -> torch.Tensor:
        """Horizontal stack at position ``i`` of the current row (flat index ``pos``), all layers;
        returns logits ``[b, K]``."""
        r, b = self.r, self.b
        h = None
        for l_ in range(self.L):
            src = self.ebuf[:, i:i + r] if l_ == 0 else self.hbuf[l_ - 1][:, i:i + r + 1]
            pre = torch.addmm(rbias[l_][:, i], src.reshape(b, -1), self.hw[l_])
            out = torch.addmm(self.pb[l_], gate(pre), self.pw[l_])
            h = out if l_ == 0 else h + out
            if l_ in self.kv:
                h = self.attend(l_, h, pos)
            self.hbuf[l_][:, i + r] = h
        w1, b1, w2, b2 = self.head
        return torch.addmm(b2, torch.relu(torch.addmm(b1, torch.relu(h), w1)), w2)

    def run(self, u: torch.Tensor, temperature: float, top_k: int | None, task: Any,
            given: Given = None) -> torch.Tensor:
        shape, n, r, b = self.shape, self.n, self.r, self.b
        tokens = torch.zeros(b, *shape, dtype=torch.long, device=self.ebuf.device)
        D = shape[-1]
        for ri, row in enumerate(_rows(shape[:-1])):
            rbias = self.row_bias(row)
            for i in range(D):
                logits = self.position(i, rbias, ri * D + i)
                tok = _choose(logits, u, temperature, top_k, given, ri * D + i)
                tokens[(slice(None),) + row + (i,)] = tok
                self.ebuf[:, i + r] = self.p.embedding(tok)
            if self.rec is not None:
                for l_ in range(self.L):
                    self.rec["horizontal"][l_][(slice(None), slice(None)) + row] = self.hbuf[l_][:, r:].transpose(1, 2)
            # the row ends blocks of stacks n-2, n-3, ... while the later indices are at their maxima
            for k in range(n - 2, -1, -1):
                if any(row[j] != shape[j] - 1 for j in range(k + 1, n - 1)):
                    break
                self.block(k, row[:k + 1], tokens)
                if k + 1 < n - 1:
                    self.reset(k + 1)
            if task is not None:
                task.advance(b * D)
        return tokens


def _rows(lead: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Raster order over the leading axes (every row of the grid)."""
    for flat in range(math.prod(lead)):
        idx = []
        for s in reversed(lead):
            idx.append(flat % s)
            flat //= s
        yield tuple(reversed(idx))


def _check(prior: Any, latent_shape: Sequence[int], temperature: float, top_k: int | None,
           masked_ok: bool = False) -> tuple[int, ...]:
    if masked_ok and isinstance(prior, MaskedTokenPrior):
        pass
    else:
        need_autoregressive(prior)
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != prior.spatial_dims or min(shape) < 1:
        raise MrivqError(f"latent shape {shape} does not fit a {prior.spatial_dims}D prior")
    if temperature < 0:
        raise MrivqError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise MrivqError(f"top_k must be >= 1, got {top_k}")
    return shape


def sample_tokens(prior: GatedPixelCNN, latent_shape: Sequence[int], n: int, *, temperature: float = 1.0,
                  top_k: int | None = None, seed: int | None = None, cached: bool = True, cond: Cond = None,
                  batch_size: int | None = None, device: str | torch.device | None = None,
                  progress: Any = None, first: int = 0, _record: list | None = None) -> torch.LongTensor:
    """Draw ``n`` code grids ``LongTensor[n, *latent_shape]`` from ``prior`` in raster order.

    Args:
        temperature: softmax temperature (``0`` picks the most likely code).
        top_k: sample only among the ``k`` most likely codes.
        seed: same seed, same tokens, whichever sampler and ``batch_size``.
        cached: the fast incremental sampler (default) or the reference one (a full forward per code).
        cond: class id(s) or ``{"class": ..., "covariates": ...}``, one row per sample or one for all.
        batch_size: samples drawn together (default: all ``n``).
        device: where to run (default: the prior's device); the prior itself is not moved.
        progress: a :class:`mrivq.utils.progress.Progress` or a task with ``advance``; advanced per row.
        first: return samples ``first .. first+n-1`` of the seed's sequence (``first=5, n=1`` is the
            sixth grid of ``n=10``), so a seed's samples can be drawn one at a time or in parts.

    A :class:`~mrivq.models.maskgit.MaskedTokenPrior` is decoded in its ``decode_steps`` parallel steps
    instead (:func:`sample_masked`; ``cached`` does not apply, ``cond`` must be None).

    The prior runs in eval mode without gradients; its training flag is restored afterwards.
    """
    shape = _check(prior, latent_shape, temperature, top_k, masked_ok=True)
    if first < 0:
        raise MrivqError(f"first must be >= 0, got {first}")
    if isinstance(prior, MaskedTokenPrior):
        if cond is not None:
            raise MrivqError("the maskgit prior is unconditional; sample it without a class/covariates")
        return sample_masked(prior, int(n), temperature=temperature, top_k=top_k, seed=seed, batch_size=batch_size,
                             device=device, progress=progress, first=first)
    return _draw(prior, shape, int(n), None, temperature, top_k, seed, cached, cond, batch_size, device,
                 progress, _record, first)


def heal_tokens(prior: GatedPixelCNN, indices: torch.Tensor, resample: torch.Tensor, n: int = 1, *,
                temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                cached: bool = True, cond: Cond = None, batch_size: int | None = None,
                device: str | torch.device | None = None, progress: Any = None) -> torch.LongTensor:
    """"Healing" (Pinaya et al. 2022, *Unsupervised brain imaging 3D anomaly detection and segmentation
    with transformers*): ``n`` resamples of each code grid in ``indices [B, *latent]`` where the codes
    flagged in ``resample`` (bool, same shape) are drawn again from the prior, in raster order and
    conditioned on everything before them (kept and redrawn), and every other code is kept.
    Returns ``LongTensor[B, n, *latent]``. Same seed, same result for either sampler and any
    ``batch_size``; ``cond`` has one row per input grid or one for all."""
    shape = _check(prior, indices.shape[1:], temperature, top_k)
    if resample.shape != indices.shape:
        raise MrivqError(f"resample mask {tuple(resample.shape)} does not match the codes {tuple(indices.shape)}")
    b, n = int(indices.shape[0]), int(n)
    if n < 1:
        raise MrivqError(f"the number of resamples must be >= 1, got {n}")
    fixed = indices.long().reshape(b, -1).repeat_interleave(n, 0)
    keep = (~resample.bool()).reshape(b, -1).repeat_interleave(n, 0)
    out = _draw(prior, shape, b * n, (fixed, keep), temperature, top_k, seed, cached,
                _repeat_cond(cond, b, n), batch_size, device, progress, None)
    return out.view(b, n, *shape)


def _repeat_cond(cond: Cond, b: int, n: int) -> Cond:
    """A per-grid condition, repeated for each grid's ``n`` resamples."""
    if cond is None or isinstance(cond, int):
        return cond
    if isinstance(cond, dict):
        return {k: _repeat_cond(v, b, n) for k, v in cond.items()}
    t = torch.as_tensor(cond)
    return t.repeat_interleave(n, 0) if t.dim() > 0 and t.shape[0] == b and b > 1 else t


def _draw(prior: GatedPixelCNN, shape: tuple[int, ...], n: int, given: Given, temperature: float,
          top_k: int | None, seed: int | None, cached: bool, cond: Cond, batch_size: int | None,
          device: str | torch.device | None, progress: Any, record: list | None, first: int = 0) -> torch.LongTensor:
    dev = torch.device(device) if device is not None else prior.embedding.weight.device
    model = prior if prior.embedding.weight.device == dev else copy.deepcopy(prior).to(dev)
    bs = max(1, int(batch_size or n or 1))
    u = sample_uniforms(seed, n, math.prod(shape), first)
    out = torch.empty(n, *shape, dtype=torch.long, device=dev)
    with eval_mode(model), code_task(progress, n * math.prod(shape)) as task:
        for s in range(0, n, bs):
            e = min(n, s + bs)
            c = cond_slice(cond, s, e, n)
            uu = u[s:e].to(dev)
            g = None if given is None else (given[0][s:e].to(dev), given[1][s:e].to(dev))
            if cached:
                inc = _Incremental(model, shape, e - s, c, record is not None)
                with _threads(1 if dev.type == "cpu" and e - s < SMALL_BATCH else None):
                    out[s:e] = inc.run(uu, temperature, top_k, task, g)
                if record is not None:
                    record.append(inc.rec)
            else:
                if model.conditional and c is not None:
                    model.cond_vector(c, e - s)  # validate once
                out[s:e] = _sample_reference(model, shape, uu, c, temperature, top_k, task, g)
    return out


# Below this many samples per batch the cached sampler's ops (one position, row or slice at a time)
# are too small to gain from CPU intra-op threads, which then only add synchronisation; on a machine
# whose cores are shared with other processes that made it 5-20x slower. So it runs on one thread.
SMALL_BATCH = 64


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


