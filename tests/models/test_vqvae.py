"""VQVAE: shapes in 2D/3D, pure encode/decode, config rebuild, shape errors, a tiny overfit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mrivq import VQVAE, MrivqError

TINY = dict(channels=(8, 16), num_res_layers=1, num_res_channels=(8, 16), num_embeddings=32, embedding_dim=8)


@pytest.mark.parametrize("dims,spatial", [(2, (16, 12)), (3, (8, 12, 16))])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(dims, spatial, channels):
    torch.manual_seed(0)
    m = VQVAE(spatial_dims=dims, in_channels=channels, **TINY)
    x = torch.rand(2, channels, *spatial)
    assert m.downsample_factor == 4
    latent = tuple(s // 4 for s in spatial)
    assert m.latent_shape(spatial) == latent
    x_hat, loss = m(x)
    assert x_hat.shape == x.shape and loss.dim() == 0
    idx = m.encode_indices(x)
    assert idx.shape == (2, *latent) and idx.dtype == torch.long
    assert int(idx.max()) < 32
    assert m.decode_indices(idx).shape == x.shape
    info = m.forward_with_info(x)
    assert set(info) == {"x_hat", "vq_loss", "indices", "perplexity", "usage"}
    assert info["indices"].shape == (2, *latent) and 0 < info["usage"] <= 1


def test_bad_input_sizes_are_one_line_errors():
    m = VQVAE(spatial_dims=3, **TINY)
    with pytest.raises(MrivqError, match=r"\(8, 8, 10\).*divisible by 4"):
        m(torch.rand(1, 1, 8, 8, 10))
    with pytest.raises(MrivqError, match="divisible by 4"):
        m.latent_shape((6, 8, 8))
    with pytest.raises(MrivqError, match="channels"):
        m.encode_indices(torch.rand(1, 2, 8, 8, 8))


def test_config_rebuilds_same_model_and_state_round_trips():
    torch.manual_seed(0)
    m = VQVAE(spatial_dims=2, in_channels=3, out_channels=2, act=("leakyrelu", {"negative_slope": 0.1}), **TINY)
    x = torch.rand(2, 3, 16, 16)
    m.train()
    m(x)
    import json

    cfg = json.loads(json.dumps(m.config))  # what a run directory stores
    n = VQVAE(**cfg)
    n.load_state_dict(m.state_dict())
    m.eval()
    n.eval()
    assert torch.equal(m.encode_indices(x), n.encode_indices(x))
    assert torch.allclose(m(x)[0], n(x)[0])
    assert n.out_channels == 2 and m.config == n.config


def test_encode_indices_never_updates_codebook_even_in_train_mode():
    torch.manual_seed(0)
    m = VQVAE(spatial_dims=3, **TINY)
    x = torch.rand(2, 1, 8, 8, 8)
    m.train()
    m(x)  # initialises the codebook
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.encode_indices(x)
    m.eval()
    m(x)
    m.forward_with_info(x)
    m.decode_indices(m.encode_indices(x))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_tiny_model_overfits_tiny_batch():
    torch.manual_seed(0)
    g = torch.linspace(0, 1, 16)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    x = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 3 * yy) * torch.cos(5 * zz),
                     0.5 + 0.4 * torch.cos(4 * xx - 5 * zz) * torch.sin(3 * yy)])[:, None]
    m = VQVAE(spatial_dims=3, **TINY)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    m.train()
    losses = []
    for _ in range(100):
        x_hat, vq = m(x)
        rec = F.mse_loss(x_hat, x)
        opt.zero_grad()
        (rec + vq).backward()
        opt.step()
        losses.append(float(rec.detach()))
    m.eval()
    with torch.no_grad():
        final = float(F.mse_loss(m.decode_indices(m.encode_indices(x)), x))
    assert final < losses[0] / 5, (losses[0], final)


def test_decode_takes_any_integer_codes_and_refuses_others():
    """The code cache holds int16 grids; float or bool "indices" are garbage, not codes."""
    from mrivq.utils.errors import MrivqError

    m = VQVAE(spatial_dims=3, in_channels=1, channels=(8, 16), num_res_channels=(8, 16), num_embeddings=16,
              embedding_dim=4).eval()
    idx = torch.randint(0, 16, (1, 2, 2, 2))
    with torch.no_grad():
        ref = m.decode_indices(idx)
        assert torch.equal(m.decode_indices(idx.to(torch.int16)), ref)
        for bad in (idx.float(), idx > 3):
            with pytest.raises(MrivqError, match="code indices must be integers"):
                m.decode_indices(bad)


def test_activation_checkpointing_gives_the_same_step():
    """Same loss and gradients with and without checkpointing (only memory and compute differ)."""
    kw = dict(spatial_dims=3, in_channels=1, channels=(4, 8), num_res_channels=(4, 8), num_embeddings=16,
              embedding_dim=4, init="random")
    torch.manual_seed(0)
    a = VQVAE(**kw)
    b = VQVAE(**kw, checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 16, 16, 16)
    grads = []
    for m in (a, b):
        m.train()
        x_hat, vq = m(x)
        (F.mse_loss(x_hat, x) + vq).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(*grads, strict=True))
    assert VQVAE(**b.config).checkpointing
