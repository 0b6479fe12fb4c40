"""Gated PixelCNN: strict causality, no blind spot, conditioning, shapes, config round trip."""

from __future__ import annotations

import itertools

import pytest
import torch

from mrivq.models.pixelcnn import GatedPixelCNN
from mrivq.utils.errors import MrivqError

K = 7  # codebook size for the small models


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dims: int, **kw) -> GatedPixelCNN:
    torch.manual_seed(0)
    kw = {"channels": 8, "num_layers": 4, **kw}
    return GatedPixelCNN(dims, K, **kw).double().eval()


def _perturbed(x: torch.Tensor, positions: list[tuple[int, ...]]) -> torch.Tensor:
    """One copy of ``x[0]`` per position with the token at that position changed."""
    batch = x.repeat(len(positions), *[1] * (x.dim() - 1))
    for i, q in enumerate(positions):
        batch[(i,) + q] = (batch[(i,) + q] + 1 + i % (K - 1)) % K
    return batch


def _levers(model: GatedPixelCNN) -> GatedPixelCNN:
    """Attention outputs start at zero and position tables near it: give them weight so they count."""
    with torch.no_grad():
        for blk in model.attention.values():
            torch.nn.init.normal_(blk.out.weight, std=0.5)
        for p in [*getattr(model, "pos_tables", []), getattr(model, "pos_grid", None)]:
            if p is not None:
                p.normal_(std=1.0)
    return model


@pytest.mark.parametrize("shape,kw", [
    ((5, 5), {}), ((4, 4, 4), {}), ((6,), {}),
    ((4, 4, 4), {"positions": "axes", "attention_every": 1, "attention_heads": 2}),
    ((5, 5), {"positions": "grid", "attention_every": 2}),
    ((3, 4, 5), {"positions": "grid", "attention_every": 2}),
])
def test_strict_causality_every_position(shape: tuple[int, ...], kw: dict) -> None:
    """Changing the token at q never changes the logits at q or at any position before it."""
    if kw.get("positions"):
        kw = {**kw, "latent_shape": shape}
    model = _levers(_model(len(shape), num_classes=2, **kw))
    torch.manual_seed(1)
    x = torch.randint(0, K, (1, *shape))
    positions = list(itertools.product(*[range(s) for s in shape]))  # raster order
    with torch.no_grad():
        base = model(x, torch.tensor([1]))
        pert = model(_perturbed(x, positions), torch.tensor([1]))
    diff = (pert - base).abs().amax(1).flatten(1)  # [changed position, logits position]
    for qi in range(len(positions)):
        assert diff[qi, :qi + 1].max() <= 1e-9, f"logits at or before {positions[qi]} depend on it"
    # ...and the model is not trivially constant: the next position does depend on q
    assert all(diff[qi, qi + 1] > 1e-9 for qi in range(len(positions) - 1))


@pytest.mark.parametrize("shape,p", [((7, 7), (3, 3)), ((5, 5, 5), (2, 2, 2))])
def test_no_blind_spot(shape: tuple[int, ...], p: tuple[int, ...]) -> None:
    """Every earlier position within 2 steps along every axis influences the logits at p."""
    model = _model(len(shape), kernel_size=3, num_layers=4)
    torch.manual_seed(2)
    x = torch.randint(0, K, (1, *shape))
    earlier = [tuple(pi + o for pi, o in zip(p, off, strict=True))
               for off in itertools.product(range(-2, 3), repeat=len(shape)) if off < (0,) * len(shape)]
    assert len(earlier) == (5 ** len(shape) - 1) // 2
    with torch.no_grad():
        base = model(x)[(0, slice(None)) + p]
        pert = model(_perturbed(x, earlier))[(slice(None), slice(None)) + p]
    changed = (pert - base).abs().amax(1)
    blind = [q for q, d in zip(earlier, changed.tolist(), strict=True) if d <= 1e-9]
    assert not blind, f"positions {blind} never reach the logits at {p}"


@pytest.mark.parametrize("dims", [2, 3])
def test_shapes_and_config_round_trip(dims: int) -> None:
    model = GatedPixelCNN(dims, 16, channels=8, num_layers=3, num_classes=4, num_covariates=2, cond_dim=5)
    shape = (3, 4, 5)[:dims]
    x = torch.randint(0, 16, (2, *shape))
    cond = {"class": torch.tensor([0, 3]), "covariates": torch.randn(2, 2)}
    logits = model(x, cond)
    assert logits.shape == (2, 16, *shape) and logits.dtype == torch.float32
    again = GatedPixelCNN(**model.config)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x, cond), logits)
    logits.sum().backward()  # trainable end to end
    assert model.class_embedding.weight.grad is not None and model.layers[0].convs[0].weight.grad is not None


def test_conditioning_changes_outputs() -> None:
    model = _model(2, num_classes=3, num_covariates=2)
    x = torch.randint(0, K, (2, 4, 4))
    cov = torch.tensor([[0.3, 1.0], [0.7, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        a = model(x, {"class": torch.tensor([0, 0]), "covariates": cov})
        b = model(x, {"class": torch.tensor([1, 1]), "covariates": cov})
        c = model(x, {"class": torch.tensor([0, 0]), "covariates": cov + 1})
        d = model(x, {"class": 0, "covariates": cov})  # an int applies to every item
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
    assert torch.equal(a, d)
    # class-only priors take bare class ids
    cls_only = _model(3, num_classes=2)
    y = torch.randint(0, K, (2, 3, 3, 3))
    with torch.no_grad():
        assert (cls_only(y, torch.tensor([0, 1]))[1] - cls_only(y, torch.tensor([0, 0]))[1]).abs().max() > 1e-3


def test_bad_conditioning_and_arguments_are_one_line_errors() -> None:
    x = torch.zeros(1, 3, 3, dtype=torch.long)
    with pytest.raises(MrivqError, match="unconditional"):
        _model(2)(x, torch.tensor([0]))
    cond_model = _model(2, num_classes=3)
    with pytest.raises(MrivqError, match="class"):
        cond_model(x)
    with pytest.raises(MrivqError, match="0..2"):
        cond_model(x, torch.tensor([3]))
    with pytest.raises(MrivqError, match="unknown"):
        cond_model(x, {"label": 1})
    with pytest.raises(MrivqError, match="covariates"):
        _model(2, num_covariates=2)(x, {})
    with pytest.raises(MrivqError, match="kernel_size"):
        GatedPixelCNN(2, 8, kernel_size=4)
    with pytest.raises(MrivqError, match="spatial_dims"):
        GatedPixelCNN(4, 8)
    with pytest.raises(MrivqError, match="code grids"):
        _model(3)(x)


def test_attention_sees_the_whole_earlier_volume_and_positions_break_translation() -> None:
    """Without attention, a far earlier position cannot reach the logits (local receptive field);
    with it, every earlier position can. Position embeddings make identical context give different
    logits at different places; without them the interior is translation-equivariant."""
    shape = (6, 6, 6)
    x = torch.randint(0, K, (1, *shape))
    p, far = (5, 5, 5), (0, 0, 0)  # 5 steps back on every axis: beyond 2 layers of kernel 3
    for attention, reaches in ((0, False), (1, True)):
        model = _levers(_model(3, num_layers=2, attention_every=attention, attention_heads=2))
        with torch.no_grad():
            d = (model(_perturbed(x, [far]))[(0, slice(None)) + p] - model(x)[(0, slice(None)) + p]).abs().max()
        assert (d > 1e-9) == reaches
    zeros = torch.zeros(1, *shape, dtype=torch.long)
    plain = _model(3, num_layers=2)
    placed = _levers(_model(3, num_layers=2, positions="axes", latent_shape=shape))
    with torch.no_grad():
        a, b = plain(zeros), placed(zeros)
    assert (a[..., 3, 3, 3] - a[..., 4, 3, 3]).abs().max() < 1e-9  # same context, same logits
    assert (b[..., 3, 3, 3] - b[..., 4, 3, 3]).abs().max() > 1e-6


@pytest.mark.parametrize("positions", ["axes", "grid"])
def test_lever_config_round_trip_and_errors(positions: str) -> None:
    model = GatedPixelCNN(3, 16, channels=8, num_layers=4, latent_shape=(3, 4, 5), positions=positions,
                          attention_every=2, attention_heads=4)
    assert sorted(model.attention) == ["1", "3"]
    x = torch.randint(0, 16, (2, 3, 4, 5))
    logits = model(x)
    again = GatedPixelCNN(**model.config)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(x), logits)
    logits.sum().backward()
    assert model.layers[0].pos.weight.grad is not None
    with pytest.raises(MrivqError, match="built for code grids"):
        model(torch.zeros(1, 4, 4, 5, dtype=torch.long))
    with pytest.raises(MrivqError, match="latent_shape"):
        GatedPixelCNN(3, 8, positions=positions)
    with pytest.raises(MrivqError, match="positions must be"):
        GatedPixelCNN(3, 8, positions="sinusoid", latent_shape=(2, 2, 2))
    with pytest.raises(MrivqError, match="divide"):
        GatedPixelCNN(3, 8, channels=6, attention_every=1, attention_heads=4)


def test_logits_are_float32_under_bf16_autocast():
    """The output head runs outside autocast: cross-entropy sees unrounded logits."""
    from mrivq.models.pixelcnn import GatedPixelCNN

    prior = GatedPixelCNN(num_embeddings=16, spatial_dims=3, channels=8, num_layers=2)
    idx = torch.randint(0, 16, (2, 4, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prior(idx)
    assert logits.dtype == torch.float32
