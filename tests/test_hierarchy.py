"""The VQ-VAE-2 lever: two-level codes and the bottom prior conditioned on the top grid."""

from __future__ import annotations

import torch

from mrivq.inference.sampling import sample_tokens
from mrivq.models.hierarchy import VQVAE2, CoarseConditionedPixelCNN

SHAPE, TOP = (4, 6, 4), (2, 3, 2)


def _prior() -> CoarseConditionedPixelCNN:
    torch.manual_seed(0)
    p = CoarseConditionedPixelCNN(3, 8, channels=8, num_layers=3, latent_shape=SHAPE, position_dim=4, top_codes=5,
                                  attention_every=2, attention_heads=2)
    with torch.no_grad():  # non-trivial attention output and position weights
        for a in p.attention.values():
            a.out.weight.normal_(0, 0.3)
    return p.eval()


def test_bottom_prior_is_causal_and_reads_the_top_grid() -> None:
    p = _prior()
    top = torch.randint(0, 5, (1, *TOP), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 8, (1, *SHAPE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = p(x, top).flatten(2)
        for pos in (0, 17, 50, 95):
            y = x.clone().view(-1)
            y[pos:] = (y[pos:] + 3) % 8  # change this position and every later one
            assert torch.allclose(p(y.view_as(x), top).flatten(2)[..., :pos + 1], base[..., :pos + 1])
        other = (top + 1) % 5
        assert not torch.allclose(p(x, other), p(x, top))


def test_cached_sampler_equals_reference_with_per_sample_top_grids() -> None:
    p = _prior()
    top = torch.randint(0, 5, (3, *TOP), generator=torch.Generator().manual_seed(3))
    fast = sample_tokens(p, SHAPE, 3, seed=4, cond=top, batch_size=2)
    slow = sample_tokens(p, SHAPE, 3, seed=4, cond=top, cached=False)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, sample_tokens(p, SHAPE, 3, seed=4, cond=(top + 2) % 5))


def test_vqvae2_shapes_and_round_trip() -> None:
    torch.manual_seed(0)
    m = VQVAE2({"spatial_dims": 3, "in_channels": 1, "channels": [8, 8], "num_res_channels": [8, 8],
                "num_res_layers": 1, "num_embeddings": 16, "embedding_dim": 4}, top_codes=8, top_channels=8)
    x = torch.rand(2, 1, 16, 24, 16)
    x_hat, loss, it, ib = m(x)
    assert x_hat.shape == x.shape and it.shape == (2, *TOP) and ib.shape == (2, *SHAPE)
    m.eval()
    t, b = m.encode_indices(x)
    with torch.no_grad():
        assert torch.allclose(m.decode_indices(t, b), m(x)[0], atol=1e-5)
    loss.backward()
    assert m.top_enc[0].weight.grad is not None
