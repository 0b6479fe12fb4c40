"""Prior dropout (``prior.model.dropout``): active while training only, causal, exact cached sampling,
config round trip and validation, for both prior families."""

from __future__ import annotations

import pytest
import torch

from mrivq.config.schema import validate
from mrivq.inference.sampling import sample_tokens
from mrivq.models.factory import build_prior, prior_from_config
from mrivq.models.maskgit import MaskedTokenPrior
from mrivq.models.pixelcnn import GatedPixelCNN
from mrivq.utils.errors import MrivqError

K = 7
SHAPE = (3, 4, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _pixelcnn(dropout: float) -> GatedPixelCNN:
    torch.manual_seed(0)
    model = GatedPixelCNN(3, K, channels=8, num_layers=3, positions="grid", latent_shape=SHAPE, dropout=dropout)
    with torch.no_grad():
        model.head[3].weight.mul_(4)
        model.pos_grid.normal_(std=1.0)
    return model.double()


def _maskgit(dropout: float) -> MaskedTokenPrior:
    torch.manual_seed(0)
    return MaskedTokenPrior(3, K, SHAPE, channels=8, num_blocks=2, position_dim=4, dropout=dropout).double()


@pytest.mark.parametrize("make", [_pixelcnn, _maskgit], ids=["pixelcnn", "maskgit"])
def test_dropout_acts_while_training_only(make) -> None:
    x = torch.randint(0, K, (2, *SHAPE), generator=torch.Generator().manual_seed(1))
    model, plain = make(0.3), make(0.0)
    plain.load_state_dict(model.state_dict())  # dropout has no parameters: the same weights fit both
    model.train()
    assert not torch.allclose(model(x), model(x))  # a fresh mask each forward
    model.eval()
    plain.eval()
    torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
    assert model.config["dropout"] == 0.3 and "dropout" not in plain.config  # unset: configs as before
    rebuilt = prior_from_config(model.config)
    assert rebuilt.dropout == 0.3 and len([m for m in rebuilt.modules() if isinstance(m, torch.nn.Dropout)]) > 0


def test_dropout_keeps_the_pixelcnn_causal_while_training() -> None:
    """With the same dropout masks (same seed), changing the token at q never changes logits at or before q."""
    model = _pixelcnn(0.5).train()
    x = torch.randint(0, K, (1, *SHAPE), generator=torch.Generator().manual_seed(2))
    n = x[0].numel()
    for q in (0, 5, n // 2, n - 2):
        y = x.clone().flatten()
        y[q] = (y[q] + 1) % K
        torch.manual_seed(9)
        base = model(x).flatten(2)
        torch.manual_seed(9)
        pert = model(y.reshape(x.shape)).flatten(2)
        diff = (pert - base).abs().amax(1)[0]
        assert diff[:q + 1].max() <= 1e-9
        assert diff[q + 1:].max() > 1e-9  # later positions do see it


def test_cached_sampling_of_a_dropout_prior_is_exact_and_restores_training_mode() -> None:
    model = _pixelcnn(0.4).train()
    ref = sample_tokens(model, SHAPE, 3, seed=5, cached=False)
    fast = sample_tokens(model, SHAPE, 3, seed=5, cached=True)
    assert torch.equal(ref, fast) and len(torch.unique(fast)) > 1
    assert model.training


def test_dropout_is_a_validated_prior_model_key() -> None:
    cfg = {"prior": {"model": {"dropout": 0.2, "channels": 8, "num_layers": 2}}}
    validate(cfg)
    prior = build_prior(cfg, 3, K)
    assert isinstance(prior, GatedPixelCNN) and prior.dropout == 0.2
    with pytest.raises(MrivqError, match="dropout"):
        validate({"prior": {"model": {"dropout": 1.0}}})
    with pytest.raises(MrivqError, match="dropout"):
        GatedPixelCNN(3, K, dropout=-0.1)
    with pytest.raises(MrivqError, match="dropout"):
        MaskedTokenPrior(3, K, SHAPE, dropout=1.5)


class _Crash(Exception):
    pass


def _fit_prior(run_dir, total: int, *, resume: bool = False, crash_at: int | None = None) -> GatedPixelCNN:
    from mrivq.training.loop import LoopConfig, run_loop

    model = _pixelcnn(0.3).float().train()
    x = torch.randint(0, K, (4, *SHAPE), generator=torch.Generator().manual_seed(3))

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        if step == crash_at:
            raise _Crash
        return torch.nn.functional.cross_entropy(model(x), x), {}  # fresh dropout masks from the torch RNG

    lc = LoopConfig(stage="prior", run_dir=run_dir, total_steps=total, lr=0.01, val_every=1000, ckpt_every=3,
                    log_every=1, best_key="none")
    run_loop(lc, model, torch.device("cpu"), step_fn, lambda: {"val": 0.0}, resume=resume)
    return model


def test_a_dropout_prior_resumes_exactly(tmp_path) -> None:
    """The masks after a resume are the ones the uninterrupted run drew: the checkpoint carries the RNG."""
    full = _fit_prior(tmp_path / "full", 6)
    with pytest.raises(_Crash):
        _fit_prior(tmp_path / "cut", 6, crash_at=5)  # checkpoint at step 3
    cut = _fit_prior(tmp_path / "cut", 6, resume=True)
    for (name, a), b in zip(full.state_dict().items(), cut.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
