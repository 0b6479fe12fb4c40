"""Realism metrics on cases whose answer is known: real against real, against noise and shuffled
voxels, copies of the training set, identical and varied sets, and the FID features' loading path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mrivq.errors import MrivqError
from mrivq.evaluate import metrics as M
from mrivq.evaluate import realism_metrics
from mrivq.evaluate.features import fid, load_features

GRID = (24, 28, 24)


def heads(n: int, seed: int) -> np.ndarray:
    """``[n, 1, *GRID]`` head-like volumes: an ellipsoid of random size and position (skull rim,
    darker ventricles, a bright and a mid tissue), smooth and a little noisy; one distribution."""
    rng = np.random.default_rng(seed)
    z = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in GRID], indexing="ij"))
    out = np.zeros((n, 1, *GRID), np.float32)
    for i in range(n):
        c = rng.normal(0, 0.05, 3)[:, None, None, None]
        r = rng.uniform(0.7, 0.85, 3)[:, None, None, None]
        d = np.sqrt((((z - c) / r) ** 2).sum(0))
        v = np.where(d < 1, 0.35, 0.0)
        v = np.where(d < 0.9, 0.7 + 0.1 * np.sin(6 * z[0] + rng.uniform(0, 6)) * np.cos(5 * z[1]), v)
        v = np.where(d < 0.25 * rng.uniform(0.8, 1.2), 0.15, v)
        out[i, 0] = np.clip(v + rng.normal(0, 0.02, GRID), 0, 1)
    return out


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return heads(30, 0)


def test_c2st_real_vs_real_is_near_chance_and_noise_is_told_apart(real: np.ndarray) -> None:
    other = heads(30, 1)
    same = M.c2st(M.downsample(real).numpy(), M.downsample(other).numpy())
    assert 0.25 <= same["accuracy"] <= 0.72 and same["p_value"] > 0.01
    noise = np.random.default_rng(2).random(real.shape).astype(np.float32)
    assert M.c2st(M.downsample(real).numpy(), M.downsample(noise).numpy())["accuracy"] >= 0.95
    # shuffled voxels: the same intensities, no anatomy
    shuf = np.stack([np.random.default_rng(i).permutation(v.ravel()).reshape(v.shape) for i, v in enumerate(other)])
    res = M.c2st(M.downsample(real).numpy(), M.downsample(shuf).numpy())
    assert res["accuracy"] >= 0.95 and res["p_value"] < 1e-6


def test_mmd_near_floor_for_real_and_far_for_noise(real: np.ndarray) -> None:
    fr = M.downsample(real)
    bw = M.rbf_bandwidth(fr)
    floor = M.mmd_floor(fr, bw)
    assert floor > 0
    assert M.mmd_rbf(fr, M.downsample(heads(30, 3)), bw) <= 3 * floor
    noise = M.downsample(np.random.default_rng(4).random(real.shape).astype(np.float32))
    assert M.mmd_rbf(fr, noise, bw) > 20 * floor
    # MONAI's linear-kernel MMD is the squared distance of the means: 0 for one set, large for noise
    assert M.mmd_linear(fr, noise) > 20 * M.half_splits(fr, M.mmd_linear)


def test_ms_ssim_params_fit_monai_on_the_cpu_grid_and_diversity_is_ordered(real: np.ndarray) -> None:
    from monai.metrics import MultiScaleSSIMMetric

    for shape in [(48, 56, 48), GRID, (96, 112, 96)]:
        p = M.ms_ssim_params(shape)
        x = torch.rand(1, 1, *shape)
        MultiScaleSSIMMetric(spatial_dims=3, kernel_size=p["kernel_size"], kernel_sigma=p["kernel_sigma"],
                             weights=p["weights"])(x, x)  # MONAI accepts it (its defaults reject < 176)
        assert abs(sum(p["weights"]) - 1) < 1e-6
    assert M.ms_ssim_params((48, 56, 48))["weights"].__len__() >= 3
    p = M.ms_ssim_params(GRID)
    same = np.repeat(real[:1], 5, 0)
    assert M.pairwise_ms_ssim(same, p) == pytest.approx(1.0, abs=1e-4)
    varied = M.pairwise_ms_ssim(real[:10], p)
    noise = M.pairwise_ms_ssim(np.random.default_rng(5).random((6, 1, *GRID)).astype(np.float32), p)
    assert noise < varied < 1.0


def test_memorization_is_near_zero_for_copies_and_near_one_for_new_volumes(real: np.ndarray) -> None:
    train, held = real[:20], real[20:]
    copies = train[:8] + np.random.default_rng(6).normal(0, 1e-3, train[:8].shape).astype(np.float32)
    res_copy = realism_metrics(copies, held, train)
    res_new = realism_metrics(heads(8, 7), held, train)
    assert res_copy["memorization"] < 0.1 and res_copy["memorization_min"] < 0.1
    assert 0.6 < res_new["memorization"] < 1.6
    nearest = res_copy["_nearest"][1]
    assert list(nearest) == list(range(8))  # each copy's nearest training volume is its original


def test_anatomy_masks_and_tissue_fractions(real: np.ndarray) -> None:
    res = realism_metrics(heads(10, 8), real[:12], None)
    assert res["mask_dice_real"] > 0.85 and res["mask_dice_synth"] > 0.85 and res["head_shaped_fraction"] >= 0.7
    assert res["memorization"] is None
    t = res["tissue"]
    assert len(t["real_mean"]) == 3 and abs(sum(t["real_mean"]) - 1) < 1e-6
    assert t["means"] == sorted(t["means"]) and t["synth_in_real_range"] >= 0.5
    # half-size heads: the Dice with the real mean mask drops, and so does the head-shaped share
    small = np.zeros_like(real[:6])
    small[:, :, 6:18, 7:21, 6:18] = real[:6, :, ::2, ::2, ::2]
    res = realism_metrics(small, real[:12], None)
    assert res["mask_dice_synth"] < 0.6 and res["head_shaped_fraction"] == 0
    assert res["mask_dice_real"] > 0.85


def _medicalnet_like(path: Path, depth: int = 10, wrap: bool = True) -> None:
    """A MedicalNet-style checkpoint of a randomly initialised MONAI ResNet (``module.`` prefixes,
    a ``state_dict`` wrapper and a segmentation head, as the published files have)."""
    from monai.networks.nets import resnet

    net = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                            shortcut_type="A" if depth in (18, 34) else "B",
                                            bias_downsample=depth in (18, 34))
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}
    sd["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)
    torch.save({"state_dict": sd} if wrap else sd, path)


def test_medicalnet_features_load_and_give_an_fid(tmp_path: Path, real: np.ndarray) -> None:
    _medicalnet_like(tmp_path / "r10.pth")
    fx = load_features(f"medicalnet:{tmp_path / 'r10.pth'}")
    assert "ResNet-10" in fx.name and "r10.pth" in fx.name
    f = fx(real[:6])
    assert f.shape == (6, 512) and torch.isfinite(f).all()
    assert fid(f, f) == pytest.approx(0.0, abs=1e-6)
    noise = fx(np.random.default_rng(9).random((6, 1, *GRID)).astype(np.float32))
    assert fid(noise, f) > 0
    res = realism_metrics(real[:6], real[6:12], None, features=fx)
    assert res["fid"] >= 0 and res["fid_features"] == fx.name
    _medicalnet_like(tmp_path / "r18.pth", 18, wrap=False)
    assert "ResNet-18" in load_features(f"medicalnet:{tmp_path / 'r18.pth'}").name


@pytest.mark.parametrize("make, spec, needle", [
    (lambda p: _medicalnet_like(p, 18), "medicalnet10:{p}", "not a MedicalNet ResNet checkpoint"),
    (lambda p: p.write_bytes(b"garbage"), "medicalnet:{p}", "not a MedicalNet ResNet checkpoint"),
    (lambda p: torch.save({"x": torch.zeros(1)}, p), "medicalnet:{p}", "not a MedicalNet ResNet checkpoint"),
    (lambda p: None, "medicalnet:{p}", "do not exist"),
    (lambda p: None, "inception:{p}", "unknown kind"),
    (lambda p: None, "medicalnet", "names no weights"),
])
def test_features_checkpoint_errors(tmp_path: Path, make, spec: str, needle: str) -> None:
    p = tmp_path / "w.pth"
    make(p)
    with pytest.raises(MrivqError, match=needle):
        load_features(spec.format(p=p))


def test_independent_sampler_follows_position_frequencies() -> None:
    from mrivq.sampling import marginal_logits, sample_independent

    codes = torch.zeros(10, 2, 3, dtype=torch.long)
    codes[:, 0, 0] = 5  # always 5 at one position
    codes[:5, 1, 2] = 7  # half 7, half 0 at another
    lg = marginal_logits(codes, 8)
    assert lg.shape == (2, 3, 8)
    s = sample_independent(lg, 200, seed=0)
    assert (s[:, 0, 0] == 5).all() and set(s[:, 1, 2].tolist()) == {0, 7}
    assert 0.35 < (s[:, 1, 2] == 7).float().mean() < 0.65
    assert torch.equal(s, sample_independent(lg, 200, seed=0))  # seeded
    assert (sample_independent(lg, 4, temperature=0)[:, 0, 0] == 5).all()
    u = sample_independent(torch.zeros(2, 3, 8), 400, seed=1)
    assert set(u.unique().tolist()) == set(range(8))
