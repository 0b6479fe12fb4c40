"""Finite scalar quantization: the implicit codebook, straight-through gradients, and a run trained with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mrivq.models.fsq import FiniteScalarQuantizer
from mrivq.models.vqvae import VQVAE
from mrivq.utils.errors import MrivqError
from tests.helpers import TINY, invoke


def test_every_code_of_the_grid_round_trips() -> None:
    q = FiniteScalarQuantizer([4, 3, 5])
    assert q.num_embeddings == 60 and q.embedding_dim == 3
    idx = torch.arange(60).view(1, 60, 1)
    codes = q.embed(idx)  # [1, 3, 60, 1]
    assert codes.shape == (1, 3, 60, 1) and codes.abs().max() <= 1
    # distinct codes for distinct indices, and quantizing a code gives its index back
    assert torch.unique(codes.squeeze(0).flatten(1).T, dim=0).shape[0] == 60
    # every code is reachable from the encoder's side: a sweep of inputs lands on all 60
    sweep = torch.linspace(-4, 4, 41)
    z = torch.stack(torch.meshgrid(sweep, sweep, sweep, indexing="ij")).unsqueeze(0)  # [1, 3, 41, 41, 41]
    hit = q.quantize_indices(z)
    assert set(hit.unique().tolist()) == set(range(60))
    assert torch.equal(q.embed(hit), q(z)[0])  # the indices name exactly the codes the decoder gets


def test_forward_is_bounded_straight_through_and_counts_usage() -> None:
    q = FiniteScalarQuantizer([8, 5, 5, 5], usage_window=4).train()
    z = (torch.randn(2, 4, 3, 3, 3) * 3).requires_grad_()
    zq, loss, idx = q(z)
    assert zq.shape == z.shape and float(loss) == 0 and idx.shape == (2, 3, 3, 3)
    assert zq.abs().max() <= 1 and torch.equal(q.embed(idx), zq.detach())
    zq.sum().backward()
    assert z.grad is not None and bool((z.grad != 0).any())  # the rounding passes gradients through
    s = q.stats()
    assert s["dead_codes"] == 0 and 0 < s["usage"] <= 54 / 1000 and s["perplexity"] >= 1
    q.eval()
    before = q.usage_counts.clone()
    q(z)
    assert torch.equal(before, q.usage_counts)  # eval mode changes nothing


def test_vqvae_with_fsq_sets_its_codebook_size_and_rebuilds_from_its_config() -> None:
    m = VQVAE(spatial_dims=3, channels=(8, 16), num_res_channels=(8, 16), num_res_layers=1, quantizer="fsq",
              fsq_levels=[4, 4, 4])
    assert (m.num_embeddings, m.embedding_dim) == (64, 3)
    cfg = json.loads(json.dumps(m.config))
    assert cfg["quantizer"] == "fsq" and cfg["num_embeddings"] == 64
    m2 = VQVAE(**cfg)
    m2.load_state_dict(m.state_dict())
    x = torch.rand(1, 1, 16, 16, 16)
    m.eval(), m2.eval()
    assert torch.equal(m.encode_indices(x), m2.encode_indices(x))
    assert "quantizer" not in VQVAE(spatial_dims=3, channels=(8,), num_res_channels=(8,)).config  # ema: as before
    with pytest.raises(MrivqError, match="fsq_levels"):
        VQVAE(quantizer="fsq")
    with pytest.raises(MrivqError, match="ema, fsq"):
        VQVAE(quantizer="lfq")


@pytest.mark.parametrize("extra", [[], ["--set", "train.adversarial_weight=0.1", "--set", "train.adversarial_start=2",
                                    "--set", "train.disc_channels=4", "--set", "train.disc_layers=2",
                                    "--set", "prior.model.dropout=0.2", "--set", "train.log_every=1"]],
                         ids=["plain", "discriminator-dropout"])
def test_a_run_trains_and_samples_with_fsq_codes(phantom_root: Path, tmp_path: Path, extra: list[str]) -> None:
    run = tmp_path / "run"
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), *TINY, "--set", "model.quantizer=fsq", "--set", "model.fsq_levels=[4,3,3]",
                 "--set", "train.max_steps=4", "--set", "prior.train.max_steps=3", "--device", "cpu", *extra)
    assert res.exit_code == 0, res.output
    info = json.loads((run / "run.json").read_text())
    assert info["model_config"]["vqvae"]["num_embeddings"] == 36
    assert info["model_config"]["prior"].get("dropout") == (0.2 if extra else None)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert any("adv_d" in r for r in rows) == bool(extra)  # the discriminator trained on FSQ reconstructions
    res = invoke("synth", "--run", str(run), "--count", "2", "--out", str(tmp_path / "synth"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "synth").glob("*.nii.gz"))) == 2
