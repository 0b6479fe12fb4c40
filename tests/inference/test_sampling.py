"""Samplers: the cached incremental sampler equals the reference one; seeds; top-k; log-likelihood."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrivq.inference.likelihood import log_likelihood
from mrivq.inference.sampling import sample_tokens
from mrivq.models.pixelcnn import GatedPixelCNN
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress

K = 9


pytestmark = pytest.mark.usefixtures("one_thread")


def _prior(dims: int, **kw) -> GatedPixelCNN:
    torch.manual_seed(0)
    model = GatedPixelCNN(dims, K, **{"channels": 8, "num_layers": 3, **kw}).double()
    with torch.no_grad():  # sharper logits than the default init, so samples are not all alike
        model.head[3].weight.mul_(4)
        for blk in model.attention.values():  # attention outputs start at zero: make them count
            torch.nn.init.normal_(blk.out.weight, std=0.5)
        for p in [*getattr(model, "pos_tables", []), getattr(model, "pos_grid", None)]:
            if p is not None:
                p.normal_(std=1.0)
    return model


CASES = [
    pytest.param((5, 6), {}, None, {}, id="2d"),
    pytest.param((3, 4, 5), {}, None, {"temperature": 0.7, "top_k": 4}, id="3d-temperature-topk"),
    pytest.param((4, 3, 4), {"num_classes": 3}, torch.tensor([2, 0, 1]), {"temperature": 1.3}, id="3d-class"),
    pytest.param((6, 5), {"num_classes": 2, "kernel_size": 5}, torch.tensor([1, 0, 1]), {"top_k": 3},
                 id="2d-class-k5"),
    pytest.param((11,), {}, None, {"top_k": 2}, id="1d"),
    pytest.param((3, 4, 5), {"positions": "axes", "latent_shape": (3, 4, 5)}, None, {}, id="3d-positions-axes"),
    pytest.param((4, 3, 4), {"positions": "grid", "latent_shape": (4, 3, 4), "attention_every": 1,
                             "attention_heads": 2}, None, {"temperature": 0.8}, id="3d-grid-attention"),
    pytest.param((5, 6), {"attention_every": 2, "num_layers": 4, "num_classes": 2}, torch.tensor([1, 0, 1]), {},
                 id="2d-attention-class"),
    pytest.param((11,), {"attention_every": 1, "positions": "axes", "latent_shape": (11,)}, None, {},
                 id="1d-attention-positions"),
]


@pytest.mark.parametrize("shape,kw,cond,skw", CASES)
def test_cached_equals_reference(shape, kw, cond, skw) -> None:
    prior = _prior(len(shape), **kw)
    ref = sample_tokens(prior, shape, 3, seed=7, cached=False, cond=cond, **skw)
    fast = sample_tokens(prior, shape, 3, seed=7, cached=True, cond=cond, **skw)
    assert ref.shape == (3, *shape) and ref.dtype == torch.long
    assert torch.equal(fast, ref)
    assert len(torch.unique(fast)) > 1  # not a degenerate all-zeros grid


@pytest.mark.parametrize("shape,kw,cond", [
    ((4, 5), {}, None), ((3, 4, 3), {"num_classes": 2}, torch.tensor([1, 0])),
    ((3, 4, 3), {"positions": "axes", "latent_shape": (3, 4, 3), "attention_every": 1, "attention_heads": 2}, None),
    ((4, 5), {"positions": "grid", "latent_shape": (4, 5), "attention_every": 2, "num_layers": 4}, None),
])
def test_cached_features_equal_forward(shape, kw, cond) -> None:
    prior = _prior(len(shape), **kw)
    record: list = []
    tokens = sample_tokens(prior, shape, 2, seed=3, cond=cond, _record=record)
    full = prior.eval().features(tokens, cond)
    rec = record[0]
    for layer in range(prior.num_layers):
        torch.testing.assert_close(rec["horizontal"][layer], full["horizontal"][layer], atol=1e-10, rtol=0)
        for k in range(len(shape) - 1):
            torch.testing.assert_close(rec["stacks"][layer][k], full["stacks"][layer][k], atol=1e-10, rtol=0)


def test_seeds_batches_and_sample_independence() -> None:
    prior = _prior(3, num_classes=2)
    shape = (3, 3, 4)
    a = sample_tokens(prior, shape, 5, seed=1, cond=1)
    assert torch.equal(a, sample_tokens(prior, shape, 5, seed=1, cond=1, batch_size=2))
    assert torch.equal(a[:2], sample_tokens(prior, shape, 2, seed=1, cond=torch.tensor([1])))
    assert not torch.equal(a, sample_tokens(prior, shape, 5, seed=2, cond=1))
    assert not torch.equal(a, sample_tokens(prior, shape, 5, seed=1, cond=0))
    torch.manual_seed(5)
    b = sample_tokens(prior, shape, 2, cond=1)
    torch.manual_seed(5)
    assert torch.equal(b, sample_tokens(prior, shape, 2, cond=1))  # seed=None follows torch.manual_seed


def test_top_k_and_temperature_zero() -> None:
    prior = _prior(2)
    shape = (5, 5)
    tokens = sample_tokens(prior, shape, 4, seed=0, top_k=2, temperature=1.5)
    with torch.no_grad():
        logits = prior(tokens)  # causal: the logits the sampler saw at every position
    rank = (logits > logits.gather(1, tokens.unsqueeze(1))).sum(1)
    assert rank.max() < 2  # every sampled code is one of the two most likely
    greedy = sample_tokens(prior, shape, 2, seed=0, temperature=0)
    assert torch.equal(greedy, sample_tokens(prior, shape, 2, seed=9, top_k=1))
    assert torch.equal(greedy, prior(greedy).argmax(1))


def test_covariate_conditioning_and_progress() -> None:
    prior = _prior(2, num_classes=2, num_covariates=2)
    cond = {"class": torch.tensor([0, 1, 1]), "covariates": torch.tensor([[0.1, 1.0], [0.5, 0.0], [0.9, 1.0]])}
    with Progress(enabled=False) as prog:
        fast = sample_tokens(prior, (4, 4), 3, seed=4, cond=cond, progress=prog, batch_size=2)
    ref = sample_tokens(prior, (4, 4), 3, seed=4, cond=cond, cached=False)
    assert torch.equal(fast, ref)

    class Task:
        completed = 0

        def advance(self, k: float = 1) -> None:
            self.completed += k

    task = Task()
    sample_tokens(prior, (4, 4), 3, seed=4, cond=cond, progress=task)
    assert task.completed == 3 * 16


def test_eval_mode_restored_and_bad_arguments() -> None:
    prior = _prior(2).train()
    torch.set_num_threads(2)
    sample_tokens(prior, (3, 3), 1, seed=0)  # runs on one CPU thread, then restores the setting
    assert prior.training and torch.get_num_threads() == 2
    with pytest.raises(MrivqError, match="latent shape"):
        sample_tokens(prior, (3, 3, 3), 1)
    with pytest.raises(MrivqError, match="temperature"):
        sample_tokens(prior, (3, 3), 1, temperature=-1)
    with pytest.raises(MrivqError, match="top_k"):
        sample_tokens(prior, (3, 3), 1, top_k=0)
    with pytest.raises(MrivqError, match="rows"):
        sample_tokens(_prior(2, num_classes=2), (3, 3), 3, cond=torch.tensor([0, 1]))


@pytest.mark.parametrize("dims,kw,cond", [(2, {}, None), (3, {"num_classes": 3}, torch.tensor([2, 0, 1]))])
def test_log_likelihood_is_cross_entropy(dims, kw, cond) -> None:
    prior = _prior(dims, **kw)
    shape = (4, 3, 5)[:dims]
    codes = torch.randint(0, K, (3, *shape))
    nll = log_likelihood(prior, codes, cond, batch_size=2)
    with torch.no_grad():
        expected = F.cross_entropy(prior.eval()(codes, cond).float(), codes, reduction="none")
    assert nll.shape == codes.shape and (nll > 0).all()
    torch.testing.assert_close(nll, expected)
    # a grid sampled from the prior is more likely under it than uniform noise, on average
    sampled = sample_tokens(prior, shape, 8, seed=0, cond=cond[:1] if cond is not None else None)
    noise = torch.randint(0, K, sampled.shape)
    c1 = cond[:1] if cond is not None else None
    assert log_likelihood(prior, sampled, c1).mean() < log_likelihood(prior, noise, c1).mean()


@pytest.mark.parametrize("shape,kw,cond", [
    ((3, 4, 5), {}, None),
    ((4, 3, 4), {"num_classes": 3, "positions": "grid", "latent_shape": (4, 3, 4), "attention_every": 1,
                 "attention_heads": 2}, torch.tensor([2, 0])),
])
def test_heal_tokens_keeps_unflagged_codes_and_cached_equals_reference(shape, kw, cond) -> None:
    from mrivq.inference.sampling import heal_tokens

    prior = _prior(len(shape), **kw)
    idx = sample_tokens(prior, shape, 2, seed=1, cond=cond)
    flag = torch.zeros(2, *shape, dtype=torch.bool)
    flag[0, 1:, :2] = True
    flag[1, -1] = True
    ref = heal_tokens(prior, idx, flag, 3, seed=4, cached=False, cond=cond)
    fast = heal_tokens(prior, idx, flag, 3, seed=4, cond=cond, batch_size=2)
    assert fast.shape == (2, 3, *shape) and torch.equal(fast, ref)
    keep = ~flag[:, None].expand_as(fast)
    assert torch.equal(fast[keep], idx[:, None].expand_as(fast)[keep])  # unflagged codes never change
    assert not torch.equal(fast[~keep], idx[:, None].expand_as(fast)[~keep])  # flagged ones are redrawn
    assert not torch.equal(fast[:, 0], fast[:, 1])  # resamples differ
    # nothing flagged: the input; everything flagged: a fresh sample with the same seed
    assert torch.equal(heal_tokens(prior, idx, torch.zeros_like(flag), 2, seed=4, cond=cond)[:, 1], idx)
    one = heal_tokens(prior, idx[:1], torch.ones_like(flag[:1]), 1, seed=9,
                      cond=None if cond is None else cond[:1])
    assert torch.equal(one[:, 0], sample_tokens(prior, shape, 1, seed=9, cond=None if cond is None else cond[:1]))


def test_heal_tokens_bad_input() -> None:
    from mrivq.inference.sampling import heal_tokens

    prior = _prior(2)
    idx = torch.zeros(1, 4, 5, dtype=torch.long)
    with pytest.raises(MrivqError, match="does not match"):
        heal_tokens(prior, idx, torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(MrivqError, match="resamples"):
        heal_tokens(prior, idx, torch.zeros(1, 4, 5, dtype=torch.bool), 0)


def test_first_draws_a_part_of_the_seeds_sequence() -> None:
    prior = _prior(3)
    whole = sample_tokens(prior, (3, 4, 3), 6, seed=11)
    for first in (0, 2, 5):
        assert torch.equal(sample_tokens(prior, (3, 4, 3), 1, seed=11, first=first)[0], whole[first])
    assert torch.equal(sample_tokens(prior, (3, 4, 3), 3, seed=11, first=3, batch_size=2), whole[3:])
    with pytest.raises(MrivqError, match="first"):
        sample_tokens(prior, (3, 4, 3), 1, seed=11, first=-1)


def test_long_sampling_says_how_long_it_will_take(monkeypatch) -> None:
    import mrivq.inference.draws as D

    class Recorder(Progress):
        def __init__(self) -> None:
            super().__init__(enabled=False)
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    prior = _prior(3)
    quiet = Recorder()
    sample_tokens(prior, (3, 4, 3), 2, seed=0, progress=quiet)
    assert quiet.notes == []  # a short sampling says nothing
    monkeypatch.setattr(D, "ANNOUNCE_ABOVE_S", -1.0)  # every sampling counts as long
    told = Recorder()
    sample_tokens(prior, (3, 4, 3), 2, seed=0, progress=told)
    assert len(told.notes) == 1 and "sampling 72 codes will take about" in told.notes[0]
    assert D.duration_text(30) == "30 s" and D.duration_text(600) == "10 min" and D.duration_text(7200) == "2.0 h"
