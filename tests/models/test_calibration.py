"""The decoder's intensity calibration (mrivq.models.calibration): the quantile sketch, the fitted map, and
a run's synth, eval, bundle and stale-checkpoint paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mrivq.models.calibration import QuantileSketch, apply_quantile_map, describe, fit_quantile_map
from tests.helpers import invoke


def _sketch(x: torch.Tensor) -> QuantileSketch:
    s = QuantileSketch(x.shape[1])
    s.update(x)
    return s


def test_sketch_quantiles_keep_the_point_masses_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 20, 20, 20, generator=g)
    x[:, :, :5] = 0.0  # a quarter of the voxels exactly 0, as a scan's background after clipping
    x[:, :, -1] = 1.0
    q = _sketch(x).quantiles(np.array([0.0, 0.1, 0.24, 0.5, 0.9, 1.0]))[0]
    assert q[0] == q[1] == q[2] == 0.0  # inside the mass at 0
    ref = np.quantile(x.numpy().ravel(), [0.5, 0.9])
    assert np.allclose(q[3:5], ref, atol=2e-3)
    assert q[5] == 1.0


def test_sketch_quantiles_of_gapped_and_discrete_distributions() -> None:
    two = torch.tensor([0.3] * 500 + [0.9] * 500).reshape(1, 1, -1)  # tissue classes, nothing between
    q = _sketch(two).quantiles(np.array([0.25, 0.75]))[0]
    assert np.allclose(q, [0.3, 0.9], atol=1e-3)
    gap = torch.cat([torch.zeros(4000), 0.5 + 0.5 * torch.rand(6000, generator=torch.Generator().manual_seed(0))])
    q = _sketch(gap.reshape(1, 1, -1)).quantiles(np.array([0.39, 0.40005, 0.7]))[0]
    assert q[0] == 0.0 and q[1] == pytest.approx(0.5, abs=1e-3) and q[2] == pytest.approx(0.75, abs=0.02)


def test_map_recovers_a_monotone_distortion_per_channel() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.rand(3, 2, 16, 16, 16, generator=g)
    target[:, 1] = target[:, 1] ** 3  # the second channel has another distribution
    decoded = target.sqrt()  # a blurred decoder's narrower histogram, stood in for by a monotone change
    cal = fit_quantile_map(_sketch(decoded), _sketch(target), "sha")
    out = apply_quantile_map(decoded, cal)
    assert out.dtype == decoded.dtype and out.shape == decoded.shape
    assert float((out - target).abs().max()) < 0.01  # the distortion undone, channel by channel
    assert float((decoded - target).abs().max()) > 0.2
    # monotone, inside [0, 1], and constant beyond the fitted range
    v = torch.linspace(-0.5, 1.5, 101).reshape(1, 1, 101).expand(1, 2, 101).contiguous()
    m = apply_quantile_map(v, cal)
    assert bool((m.diff(dim=-1) >= -1e-6).all()) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert json.loads(json.dumps(cal)) == cal and cal["vqvae_sha256"] == "sha" and cal["subjects"] == 3


def test_a_mass_in_the_decoded_values_maps_to_the_target_at_its_lowest_level() -> None:
    target = torch.linspace(0, 1, 1000).reshape(1, 1, 10, 10, 10)
    decoded = target.clone()
    decoded[decoded < 0.4] = 0.0  # the decoder writes 0 for the darkest 40%
    cal = fit_quantile_map(_sketch(decoded), _sketch(target), "sha")
    zero = float(apply_quantile_map(torch.zeros(1, 1, 1), cal))
    assert zero == 0.0  # not the mean of the targets it shares (0.2): the background stays where scans are
    assert float(apply_quantile_map(torch.full((1, 1, 1), 0.7), cal)) == pytest.approx(0.7, abs=0.01)
    # a mass at 0 in both, as the padding of every volume on the model grid: it stays exactly 0
    scan = torch.rand(2, 1, 12, 12, 12, generator=torch.Generator().manual_seed(3))
    scan[:, :, :4] = 0.0
    blurred = (scan * 0.8 + 0.1).clamp(0, 1)
    blurred[:, :, :5] = 0.0  # the decoder's zeros reach one plane further in
    cal = fit_quantile_map(_sketch(blurred), _sketch(scan), "sha")
    assert float(apply_quantile_map(blurred, cal)[:, :, :5].abs().max()) == 0.0
    assert describe(None) == "none" and "2 training" in describe(cal)


def _pooled_w1(a: np.ndarray, b: np.ndarray) -> float:
    """1-D Wasserstein distance between the pooled intensities of two volume sets."""
    q = np.linspace(0, 1, 501)
    return float(np.abs(np.quantile(a.ravel(), q) - np.quantile(b.ravel(), q)).mean())


def test_run_fits_it_and_its_reconstructions_match_the_training_histogram(trained_run: Path) -> None:
    from mrivq.data.split import load_split
    from mrivq.runs.folder import codes_path, load_codes
    from mrivq.runs.run import load_run

    r = load_run(trained_run)
    cal = r.calibration
    assert cal is not None and cal["vqvae_sha256"] == r.checkpoints["vqvae"]
    assert cal["subjects"] == len(load_codes(codes_path(trained_run))["train"])
    split = load_split(r.config, Path(r.info["data_dir"]), subjects=r.info["split"])
    x = np.stack([np.asarray(split.train[i]["image"]) for i in range(len(split.train))])
    codes = load_codes(codes_path(trained_run))["train"].long()
    with torch.no_grad():
        raw, calibrated = r.decode(codes, calibrate=False).numpy(), r.decode(codes).numpy()
    assert _pooled_w1(calibrated, x) < 0.5 * _pooled_w1(raw, x)


def test_synth_calibrates_by_default_and_says_so(trained_run: Path, tmp_path: Path) -> None:
    res = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(tmp_path / "a"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(tmp_path / "b"), "--device", "cpu",
                 "--no-calibrate")
    assert res.exit_code == 0, res.output
    side_a = json.loads((tmp_path / "a" / "synth_0000.json").read_text())
    side_b = json.loads((tmp_path / "b" / "synth_0000.json").read_text())
    assert side_a["calibration"].startswith("quantile map") and side_b["calibration"] == "none"
    a = nib.load(tmp_path / "a" / "synth_0000.nii.gz").get_fdata()
    b = nib.load(tmp_path / "b" / "synth_0000.nii.gz").get_fdata()
    assert not np.allclose(a, b)  # same codes (same seed), other intensities
    # monotone: the calibrated volume orders its voxels as the raw one does
    order = np.argsort(b.ravel(), kind="stable")
    assert (np.diff(a.ravel()[order]) >= -1e-4 * max(float(a.max()), 1.0)).all()

    from mrivq.evaluate.realism import samples_calibrated
    from mrivq.io.files import nifti_files

    assert samples_calibrated(nifti_files(tmp_path / "a"))
    assert not samples_calibrated(nifti_files(tmp_path / "b"))
    side = tmp_path / "a" / "synth_0001.json"  # samples written before calibrations existed: raw
    side.write_text(json.dumps({k: v for k, v in json.loads(side.read_text()).items() if k != "calibration"}))
    (tmp_path / "a" / "synth_0000.json").unlink()
    assert not samples_calibrated(nifti_files(tmp_path / "a"))


def test_a_retrained_vqvae_leaves_no_stale_calibration(trained_run: Path, tmp_path: Path) -> None:
    from mrivq.runs.run import load_run

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    info = json.loads((run / "run.json").read_text())
    info["calibration"]["vqvae_sha256"] = "0" * 64  # fitted for another checkpoint
    (run / "run.json").write_text(json.dumps(info))
    r = load_run(run)
    assert r.calibration is None
    codes = torch.zeros((1, *r.latent_shape), dtype=torch.long)
    assert torch.equal(r.decode(codes), r.decode(codes, calibrate=False))
    assert not r.decode(codes).requires_grad  # an inference helper keeps no graph
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "synth_0000.json").read_text())["calibration"] == "none"
    # the next stage-2 call fits it again for the checkpoint there is (the code cache is rebuilt with it)
    (run / "codes" / "codes.pt").unlink()
    res = invoke("train", "--stage", "prior", "--run", str(run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert load_run(run).calibration is not None


def test_fit_takes_evenly_spread_subjects(trained_run: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import mrivq.training.prior as tp
    from mrivq.runs.run import load_run

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    (run / "codes" / "codes.pt").unlink()
    seen: list[int] = []
    real_update = QuantileSketch.update

    def counting(self: QuantileSketch, x: torch.Tensor) -> None:
        seen.append(int(x.shape[0]))
        real_update(self, x)

    monkeypatch.setattr(tp, "MAX_SUBJECTS", 2)
    monkeypatch.setattr(QuantileSketch, "update", counting)
    res = invoke("train", "--stage", "prior", "--run", str(run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert load_run(run).calibration["subjects"] == 2 and sum(seen) == 4  # 2 decoded + their 2 scans


def test_bundle_carries_the_calibration(trained_run: Path, tmp_path: Path) -> None:
    from mrivq.inference.bundle import load_bundle
    from mrivq.runs.run import load_run

    res = invoke("export", "--run", str(trained_run), "--bundle", str(tmp_path / "b"), "--num-samples", "1")
    assert res.exit_code == 0, res.output
    b, r = load_bundle(tmp_path / "b"), load_run(trained_run)
    assert b.calibration is not None and b.calibration["target"] == r.calibration["target"]
    codes = torch.randint(0, r.vqvae.num_embeddings, (1, *r.latent_shape))
    assert torch.allclose(b.decode(codes), r.decode(codes))


def test_healing_can_compare_calibrated_reconstructions(trained_run: Path) -> None:
    from mrivq.data.split import load_split
    from mrivq.inference.heal import HealOptions, heal
    from mrivq.runs.run import load_run
    from mrivq.utils.errors import MrivqError

    r = load_run(trained_run, need_prior=True)
    split = load_split(r.config, Path(r.info["data_dir"]), subjects=r.info["split"])
    x = torch.as_tensor(np.asarray(split.val[0]["image"]))[None].float()
    with pytest.raises(MrivqError, match="calibration"):
        heal(r.vqvae, r.prior, x, HealOptions(calibrate=True))
    raw = heal(r.vqvae, r.prior, x, HealOptions(smooth=0))
    cal = heal(r.vqvae, r.prior, x, HealOptions(smooth=0, calibrate=True), calibration=r.calibration)
    assert torch.equal(raw["resampled"], cal["resampled"])  # the same codes are flagged
    auto = heal(r.vqvae, r.prior, x, HealOptions(smooth=0), calibration=r.calibration)  # default: when there is one
    assert torch.equal(auto["anomaly"], cal["anomaly"])
    off = heal(r.vqvae, r.prior, x, HealOptions(smooth=0, calibrate=False), calibration=r.calibration)
    assert torch.equal(off["anomaly"], raw["anomaly"])
    # the baseline residual is against the calibrated reconstruction
    with torch.no_grad():
        idx = r.vqvae.encode_indices(x)
        want = (x - r.decode(idx)).abs().mean(1, keepdim=True) * cal["head"]
    assert torch.allclose(cal["recon_residual"], want, atol=1e-6)
    assert not torch.allclose(raw["recon_residual"], cal["recon_residual"])


def test_score_heal_calibrate_cli(trained_run: Path, phantom_root: Path, tmp_path: Path) -> None:
    scan = sorted((phantom_root / "phantom").rglob("*.nii.gz"))[0]
    res = invoke("score", str(scan), "-o", str(tmp_path / "map.nii.gz"), "--run", str(trained_run), "--heal",
                 "--calibrate", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "map.nii.gz").is_file() and (tmp_path / "map_healed.nii.gz").is_file()
    run = tmp_path / "old"
    shutil.copytree(trained_run, run)
    info = json.loads((run / "run.json").read_text())
    del info["calibration"]  # a run from before calibrations were fitted
    (run / "run.json").write_text(json.dumps(info))
    res = invoke("score", str(scan), "-o", str(tmp_path / "map2.nii.gz"), "--run", str(run), "--heal",
                 "--calibrate", "--device", "cpu")
    assert res.exit_code == 2 and "mrivq train --stage prior" in res.output
    assert not (tmp_path / "map2.nii.gz").exists()
    for flag in ([], ["--no-calibrate"]):  # without the flag an old run heals raw, as before
        res = invoke("score", str(scan), "-o", str(tmp_path / "map3.nii.gz"), "--run", str(run), "--heal",
                     "--device", "cpu", "--overwrite", *flag)
        assert res.exit_code == 0, res.output
