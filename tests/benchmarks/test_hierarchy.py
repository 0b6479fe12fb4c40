"""The VQ-VAE-2 lever: two-level codes and the bottom prior conditioned on the top grid."""

from __future__ import annotations

import torch

from benchmarks.hierarchy_models import VQVAE2, CoarseConditionedPixelCNN
from mrivq.inference.sampling import sample_tokens

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


def test_the_benchmark_trains_through_the_library_loop(tmp_path) -> None:
    """``benchmarks/hierarchy.py`` fits its models with ``mrivq train``'s loop: checkpoints and metrics land
    in the work folder, the loss falls, and a second call resumes from the finished checkpoint."""
    import json

    import torch.nn.functional as F

    from benchmarks.hierarchy import fit

    torch.manual_seed(0)
    p = _prior()
    codes = torch.randint(0, 8, (6, *SHAPE), generator=torch.Generator().manual_seed(3))
    top = torch.randint(0, 5, (6, *TOP), generator=torch.Generator().manual_seed(4))
    tcfg = {"batch_size": 3, "lr": 3e-3, "warmup_steps": 1, "seed": 0}

    def loss(ids):
        return F.cross_entropy(p(codes[ids], top[ids]), codes[ids])

    def val():
        return F.cross_entropy(p(codes, top), codes)

    before = float(val().detach())
    res = fit(p.train(), tcfg, 8, 6, loss, "bottom prior", tmp_path, val)
    assert res["steps"] == 8 and res["val_loss"] < before
    assert (tmp_path / "bottom_prior" / "checkpoints" / "bottom_prior_last.pt").is_file()
    logged = [json.loads(x) for x in (tmp_path / "bottom_prior" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(r["stage"] == "bottom_prior" for r in logged)
    again = fit(p, tcfg, 8, 6, loss, "bottom prior", tmp_path, val)  # already finished: resumes at step 8
    assert again["steps"] == 8
