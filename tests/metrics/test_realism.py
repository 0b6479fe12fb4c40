"""Realism metrics on cases whose answer is known: real against real, against noise and shuffled
voxels, copies of the training set, identical and varied sets, and the FID features' loading path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from mrivq.evaluate.realism import realism_metrics
from mrivq.metrics import realism as M
from mrivq.metrics import twosample as TS
from mrivq.metrics.features import fid, load_features
from mrivq.utils.errors import MrivqError

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


def padded(x: np.ndarray, planes: int = 4) -> np.ndarray:
    """``x`` with ``planes`` zero planes after its second spatial axis, as ``data.divisible_by`` pads the
    CPU preset's 48-voxel field of view to 56: voxels that are exactly 0 in every real scan."""
    return np.pad(x, [(0, 0)] * 3 + [(0, planes), (0, 0)])


def test_an_invisible_offset_in_the_padding_does_not_move_the_c2st(real: np.ndarray) -> None:
    """A decoder writes 0.0005-0.004 into the padding. Standardised over both sets pooled (the
    statistic as it was) that decides the test on its own; relative to the real scans it is
    invisible: both C2STs and the MMD stay in the band of their permutation nulls."""
    a, b = padded(real[:24]), padded(heads(24, 2))
    shifted = b.copy()
    shifted[..., GRID[1]:, :] += 0.002
    for stat in (TS.c2st_anatomy, TS.c2st_texture):
        plain, moved = stat(a, b, permutations=40), stat(a, shifted, permutations=40)
        assert moved["accuracy"] == pytest.approx(plain["accuracy"], abs=1e-9)
        assert moved["accuracy"] <= moved["null_q95"] and moved["p_value"] >= 0.05, (stat.__name__, moved)
    m = TS.mmd(M.downsample(a).numpy(), M.downsample(shifted).numpy(), permutations=60)
    assert m["mmd"] <= m["floor"] and m["p_value"] >= 0.05
    # standardised over both sets pooled (as the statistic was), the padding features alone separate them
    fa, fb = M.downsample(a).numpy(), M.downsample(shifted).numpy()
    pooled = StandardScaler().fit_transform(np.concatenate([fa, fb]))
    pad = fa.std(0) == 0
    assert pad.sum() > 0 and (pooled[:24, pad].mean(1) < 0).all() and (pooled[24:, pad].mean(1) > 0).all()


def test_real_changes_are_told_apart(real: np.ndarray) -> None:
    """Shuffled voxels (no anatomy) fail the anatomy test; 5% noise and a blur fail the texture test."""
    from scipy.ndimage import gaussian_filter

    a, b = real[:20], heads(20, 1)
    shuf = np.stack([np.random.default_rng(i).permutation(v.ravel()).reshape(v.shape) for i, v in enumerate(b)])
    res = TS.c2st_anatomy(a, shuf, permutations=40)
    assert res["accuracy"] >= 0.95 and res["p_value"] <= 1 / 41 + 1e-9
    noisy = np.clip(b + np.random.default_rng(2).normal(0, 0.05, b.shape), 0, 1).astype(np.float32)
    blurred = gaussian_filter(b, (0, 0, 1, 1, 1))
    for other in (noisy, blurred):
        res = TS.c2st_texture(a, other, permutations=40)
        assert res["accuracy"] >= 0.9 and res["p_value"] <= 1 / 41 + 1e-9


@pytest.mark.slow
def test_one_distribution_in_unequal_sets_gives_uniform_p_values() -> None:
    """Forty volumes against ten from one distribution: a binomial test of plain accuracy (as the C2ST
    had) is significant whenever the classifier just names the larger set (80% right). Balanced
    accuracy with a permutation p-value gives p uniform on (0, 1]."""
    from scipy.stats import binomtest, kstest

    assert binomtest(40, 50, 0.5, alternative="greater").pvalue < 0.05
    ps = []
    for s in range(24):
        x = np.random.default_rng(s).normal(size=(50, 40))
        x[:, :8] = 0.0  # features constant in every real row, as the padding
        ps.append(TS.classifier_test(x[:40], x[40:], permutations=39, repeats=1, seed=s)["p_value"])
    ps = np.array(ps)
    assert (ps < 0.05).sum() <= 3 and kstest(ps, "uniform").pvalue > 0.01, np.sort(ps)


@pytest.mark.slow
def test_collapse_fails_mmd_and_diversity_and_real_passes(real: np.ndarray) -> None:
    """Copies of the mean volume (a model that always draws the same head): the median-bandwidth
    MMD scored it as well as good samples; the multi-bandwidth MMD and the diversity check fail it,
    while another draw of real heads passes both."""
    ref, other = real[:16], heads(16, 2)
    collapsed = np.repeat(other.mean(0, keepdims=True), 16, 0)
    res = realism_metrics(other, ref, None, permutations=20,
                          controls={"real_as_samples": heads(16, 4), "mean_volume": collapsed})
    c = res["controls"]["mean_volume"]
    assert not c["checks"]["mmd"]["pass"] and not c["checks"]["diversity"]["pass"]
    assert c["mmd"] > 5 * c["mmd_floor"] and c["mmd_p_value"] <= 1 / 41 + 1e-9
    for row in (res, res["controls"]["real_as_samples"]):
        assert row["checks"]["mmd"]["pass"] and row["checks"]["diversity"]["pass"], row["checks"]
        assert row["checks"]["c2st"]["pass"] and row["checks"]["head_shape"]["pass"], row["checks"]
    assert set(res["checks"]) == {"c2st", "c2st_texture", "mmd", "diversity", "head_shape", "tissue"}
    # MONAI's linear-kernel MMD is the squared distance of the means: 0 for one set, large for noise
    fr = M.downsample(ref)
    noise = M.downsample(np.random.default_rng(4).random(ref.shape).astype(np.float32))
    assert M.mmd_linear(fr, noise) > 20 * M.half_splits(fr, M.mmd_linear)


def test_real_reference_keeps_what_real_scans_vary_along() -> None:
    x = np.random.default_rng(0).normal(size=(10, 6))
    x[:, 0] = 0.0  # constant in every real row: dropped
    x[:, 1] = 0.5 + 5e-3 * x[:, 2]  # hardly varies: kept, standardised by the noise floor
    ref = TS.RealReference(components=None).fit(x)
    assert ref.keep_.tolist() == [False, True, True, True, True, True]
    z = ref.transform(x + np.r_[5.0, 0.002, 0, 0, 0, 0]) - ref.transform(x)
    assert np.allclose(z[:, 0], 0.002 / TS.NOISE)
    w = TS.RealReference(components=3).fit(np.r_[x, x + 100], np.r_[np.zeros(10), np.ones(10)])
    assert np.allclose(w.transform(x).std(0, ddof=1), 1.0)  # whitened on the real rows only
    with pytest.raises(ValueError, match="at least 2"):
        TS.RealReference().fit(x[:1])


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
    res_copy = realism_metrics(copies, held, train, permutations=0)
    res_new = realism_metrics(heads(8, 7), held, train, permutations=0)
    assert res_copy["memorization"] < 0.1 and res_copy["memorization_min"] < 0.1
    assert 0.6 < res_new["memorization"] < 1.6
    nearest = res_copy["_nearest"][1]
    assert list(nearest) == list(range(8))  # each copy's nearest training volume is its original


def test_anatomy_masks_and_tissue_fractions(real: np.ndarray) -> None:
    res = realism_metrics(heads(10, 8), real[:12], None, permutations=0)
    assert res["mask_dice_real"] > 0.85 and res["mask_dice_synth"] > 0.85 and res["head_shaped_fraction"] >= 0.7
    assert res["memorization"] is None
    t = res["tissue"]
    assert len(t["real_mean"]) == 3 and abs(sum(t["real_mean"]) - 1) < 1e-6
    assert t["means"] == sorted(t["means"]) and t["synth_in_real_range"] >= 0.5
    # half-size heads: the Dice with the real mean mask drops, and so does the head-shaped share
    small = np.zeros_like(real[:6])
    small[:, :, 6:18, 7:21, 6:18] = real[:6, :, ::2, ::2, ::2]
    res = realism_metrics(small, real[:12], None, permutations=0)
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


@pytest.mark.slow
def test_medicalnet_features_load_and_give_an_fid(tmp_path: Path, real: np.ndarray) -> None:
    _medicalnet_like(tmp_path / "r10.pth")
    fx = load_features(f"medicalnet:{tmp_path / 'r10.pth'}")
    assert "ResNet-10" in fx.name and "r10.pth" in fx.name
    f = fx(real[:6])
    assert f.shape == (6, 512) and torch.isfinite(f).all()
    assert fid(f, f) == pytest.approx(0.0, abs=1e-6)
    noise = fx(np.random.default_rng(9).random((6, 1, *GRID)).astype(np.float32))
    assert fid(noise, f) > 0
    res = realism_metrics(real[:6], real[6:12], None, features=fx, permutations=0)
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
    from mrivq.inference.likelihood import marginal_logits, sample_independent

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
