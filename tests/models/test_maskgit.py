"""The parallel-decoding (MaskGIT) prior: masks, loss, sampler, learning, and the CLI with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mrivq.inference.likelihood import log_likelihood
from mrivq.inference.masked_sampling import decode_masked, sample_masked
from mrivq.inference.sampling import heal_tokens, sample_tokens
from mrivq.models.factory import build_prior, prior_from_config
from mrivq.models.maskgit import MaskedTokenPrior, mask_ratio, masked_nats, masked_token_loss, random_masks
from mrivq.utils.errors import MrivqError
from tests.helpers import TINY, invoke

SHAPE = (3, 4, 3)


def _prior(**kw) -> MaskedTokenPrior:
    torch.manual_seed(0)
    return MaskedTokenPrior(3, 8, SHAPE, channels=8, num_blocks=2, position_dim=4, **kw)


def test_random_masks_follow_the_cosine_schedule_and_the_generator() -> None:
    n = 36
    g = torch.Generator().manual_seed(3)
    m = random_masks(500, n, g)
    again = random_masks(500, n, torch.Generator().manual_seed(3))
    assert torch.equal(m, again)
    counts = m.sum(1)
    assert int(counts.min()) >= 1 and int(counts.max()) <= n
    # E[cos(pi u / 2)] = 2 / pi for u ~ U(0, 1)
    assert abs(float(counts.float().mean()) / n - 2 / math.pi) < 0.05
    r = torch.rand(500, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(counts, torch.ceil(mask_ratio(r) * n).clamp(1, n).long())


def test_loss_sees_only_the_unmasked_codes() -> None:
    p = _prior().eval()
    idx = torch.randint(0, 8, (2, *SHAPE), generator=torch.Generator().manual_seed(0))
    mask = random_masks(2, idx[0].numel(), torch.Generator().manual_seed(1))
    logits_in = torch.where(mask, torch.full_like(idx.flatten(1), 8), idx.flatten(1)).view_as(idx)
    other = idx.clone().flatten(1)
    other[mask] = (other[mask] + 1) % 8  # other tokens where masked: same input, other targets
    with torch.no_grad():
        assert torch.equal(p(logits_in), p(torch.where(mask, torch.full_like(other, 8), other).view_as(idx)))
        loss = masked_token_loss(p, idx, mask)
        want = torch.nn.functional.cross_entropy(p(logits_in).flatten(2), idx.flatten(1), reduction="none")[mask]
    assert torch.allclose(loss, want.mean())
    assert p(idx).shape == (2, 8, *SHAPE)  # logits for the codes, never for the mask token


def test_bidirectional_context() -> None:
    """Unlike the PixelCNN, a position's logits depend on codes after it in raster order."""
    p = _prior().eval()
    a = torch.full((1, *SHAPE), 8)
    b = a.clone()
    b[0, -1, -1, -1] = 3
    with torch.no_grad():
        assert not torch.allclose(p(a)[0, :, 0, 0, 0], p(b)[0, :, 0, 0, 0])


def test_sampler_is_seeded_per_sample_and_fills_every_code() -> None:
    p = _prior(decode_steps=4)
    a = sample_tokens(p, SHAPE, 5, seed=7)
    assert a.shape == (5, *SHAPE) and int(a.min()) >= 0 and int(a.max()) < 8  # no mask token left
    assert torch.equal(a, sample_tokens(p, SHAPE, 5, seed=7, batch_size=2))
    assert torch.equal(a[3:], sample_tokens(p, SHAPE, 2, seed=7, first=3))
    assert not torch.equal(a, sample_tokens(p, SHAPE, 5, seed=8))
    assert torch.equal(a, sample_tokens(p, SHAPE, 5, seed=7, cached=False))  # one sampler: cached does not apply
    assert p.training  # the training flag is restored


def test_greedy_without_choice_noise_does_not_depend_on_the_seed() -> None:
    p = _prior(decode_steps=3, choice_temperature=0.0)
    assert torch.equal(sample_masked(p, 2, temperature=0, seed=1), sample_masked(p, 2, temperature=0, seed=2))


def test_each_step_fixes_the_codes_the_schedule_says() -> None:
    p = _prior().eval()
    n, steps = math.prod(SHAPE), 5

    class Task:
        done: list = []

        def advance(self, k: float) -> None:
            self.done.append(k)

    u = torch.rand(1, 2 * steps * n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decode_masked(p, u, steps, 1.0, None, Task())
    left = [math.floor(n * mask_ratio((t + 1) / steps)) for t in range(steps - 1)] + [0]
    fixed = [n - left[0]] + [left[t - 1] - left[t] for t in range(1, steps)]
    assert Task.done == fixed and sum(Task.done) == n


def test_a_trained_prior_draws_the_training_grid() -> None:
    """Trained on one grid, greedy parallel decoding returns it."""
    torch.manual_seed(0)
    p = MaskedTokenPrior(3, 8, SHAPE, channels=16, num_blocks=2, position_dim=8, decode_steps=4)
    grid = torch.randint(0, 8, (1, *SHAPE), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam(p.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        loss = masked_token_loss(p, grid.expand(4, *SHAPE), random_masks(4, grid.numel(), g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert masked_nats(p, grid, 1, torch.device("cpu")) < 0.1
    assert torch.equal(sample_masked(p, 1, temperature=0, seed=0), grid)


def test_config_round_trip_and_errors() -> None:
    p = _prior(dilations=[1, 3])
    q = prior_from_config(p.config)
    q.load_state_dict(p.state_dict())
    assert isinstance(q, MaskedTokenPrior) and q.config == p.config
    with pytest.raises(MrivqError, match="unconditional"):
        MaskedTokenPrior(3, 8, SHAPE, num_classes=2)
    with pytest.raises(MrivqError, match="latent_shape"):
        MaskedTokenPrior(3, 8, (3, 4))
    with pytest.raises(MrivqError, match="family"):
        prior_from_config({"family": "diffusion", "spatial_dims": 3, "num_embeddings": 8})
    with pytest.raises(MrivqError, match="bad key for the maskgit"):
        prior_from_config({**p.config, "num_layers": 3})
    with pytest.warns(UserWarning, match="num_layers, positions are not options of the maskgit prior"):
        b = build_prior({"prior": {"model": {"family": "maskgit", "num_layers": 3, "positions": "grid",
                                             "channels": 8}}}, 3, 8, SHAPE)
    assert b.latent_shape == SHAPE and b.channels == 8
    with pytest.raises(MrivqError, match="this prior was built for code grids"):
        p(torch.zeros(1, 4, 4, 4, dtype=torch.long))


def test_likelihood_and_healing_need_the_autoregressive_prior() -> None:
    p = _prior()
    codes = torch.zeros(1, *SHAPE, dtype=torch.long)
    with pytest.raises(MrivqError, match="autoregressive prior"):
        log_likelihood(p, codes)
    with pytest.raises(MrivqError, match="autoregressive prior"):
        heal_tokens(p, codes, codes.bool())
    with pytest.raises(MrivqError, match="unconditional"):
        sample_tokens(p, SHAPE, 1, cond=0)


@pytest.fixture(scope="module")
def maskgit_run(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mg"
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--max-steps", "4", "--prior-max-steps", "4", *TINY,
                 "--set", "prior.model.family=maskgit", "--set", "prior.model.decode_steps=3")
    assert res.exit_code == 0, res.output
    return run


def test_cli_trains_and_synthesizes_with_the_maskgit_family(maskgit_run: Path, tmp_path: Path) -> None:
    info = json.loads((maskgit_run / "run.json").read_text())
    assert info["model_config"]["prior"]["family"] == "maskgit"
    assert info["model_config"]["prior"]["decode_steps"] == 3
    assert "num_layers" not in info["model_config"]["prior"]  # the preset's PixelCNN option, dropped with a warning
    lines = [json.loads(x) for x in (maskgit_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_masked_nats" in x for x in lines if x["stage"] == "prior")
    res = invoke("synth", "--run", str(maskgit_run), "--count", "2", "--out", str(tmp_path / "s"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "s").glob("*.nii.gz")) == ["synth_0000.nii.gz", "synth_0001.nii.gz"]
    assert json.loads((tmp_path / "s" / "synth_0000.json").read_text())["sampler"] == "parallel (3 steps)"
    res2 = invoke("synth", "--run", str(maskgit_run), "--count", "2", "--out", str(tmp_path / "t"))
    a = (tmp_path / "s" / "synth_0001.nii.gz").read_bytes()
    assert res2.exit_code == 0 and a == (tmp_path / "t" / "synth_0001.nii.gz").read_bytes()


def test_cli_score_refuses_a_maskgit_prior_in_one_line(maskgit_run: Path, phantom_root: Path,
                                                       tmp_path: Path) -> None:
    img = phantom_root / "phantom" / "sub-0000" / "sub-0000_t1.nii.gz"
    for extra in ([], ["--heal"]):
        res = invoke("score", "--run", str(maskgit_run), str(img), "-o", str(tmp_path / "m.nii.gz"), *extra)
        assert res.exit_code == 2 and "autoregressive prior" in res.output, res.output
        assert not (tmp_path / "m.nii.gz").exists()


def test_bundle_and_synthetic_dataset_take_a_maskgit_prior(maskgit_run: Path, tmp_path: Path) -> None:
    import mrivq
    from mrivq.inference.bundle import load_bundle

    res = invoke("export", "--run", str(maskgit_run), "--bundle", str(tmp_path / "b"))
    assert res.exit_code == 0, res.output
    r = load_bundle(tmp_path / "b")
    assert isinstance(r.prior, MaskedTokenPrior) and r.prior.decode_steps == 3
    ds = mrivq.SyntheticDataset(tmp_path / "b", 2)
    a, b = ds[1], mrivq.SyntheticDataset(maskgit_run, 2)[1]
    assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))  # same weights, same sample
