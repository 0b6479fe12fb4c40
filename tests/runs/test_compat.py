"""Run folders, checkpoints and bundles written by mrivq 0.1.0 keep working (``tests/fixtures/v0.1.0``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import invoke

OLD = Path(__file__).parents[1] / "fixtures" / "v0.1.0"


@pytest.fixture(scope="module")
def old(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the 0.1.0 run, data and bundle, the run pointed at its copied data."""
    root = tmp_path_factory.mktemp("v010")
    shutil.copytree(OLD, root, dirs_exist_ok=True)
    info = json.loads((root / "run" / "run.json").read_text())
    info["data_dir"] = str(root / "data" / "phantom")
    (root / "run" / "run.json").write_text(json.dumps(info))
    return root


def test_an_old_run_loads_with_its_models_and_preprocessing(old: Path) -> None:
    import mrivq

    r = mrivq.load_run(old / "run", need_prior=True)
    assert r.latent_shape == (4, 4, 4) and list(r.preprocess.shape) == [16, 16, 16]
    assert set(r.checkpoints) == {"vqvae", "prior"} and r.calibration is not None
    codes = mrivq.sample_tokens(r.prior, r.latent_shape, 2, seed=0)
    assert codes.shape == (2, 4, 4, 4) and int(codes.max()) < 32
    assert r.unfinished("prior") is None  # a finished run says nothing about stopping early


def test_an_old_run_synthesizes_encodes_decodes_and_evaluates(old: Path, tmp_path: Path) -> None:
    res = invoke("synth", "--run", str(old / "run"), "--count", "2", "--out", str(tmp_path / "s"),
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    img = nib.load(tmp_path / "s" / "synth_0000.nii.gz")
    assert img.shape == (16, 16, 16)
    scan = next((old / "data" / "phantom").rglob("*_t1.nii.gz"))
    res = invoke("reconstruct", str(scan), "-o", str(tmp_path / "rec.nii.gz"), "--run", str(old / "run"),
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert nib.load(tmp_path / "rec.nii.gz").shape == nib.load(scan).shape
    res = invoke("encode", str(scan), "-o", str(tmp_path / "codes.npz"), "--run", str(old / "run"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = invoke("decode", str(tmp_path / "codes.npz"), "-o", str(tmp_path / "dec.nii.gz"), "--run",
                 str(old / "run"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = invoke("eval", "--run", str(old / "run"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads((old / "run" / "eval_val.json").read_text())["n_images"] == 1


def test_an_old_run_resumes_for_more_prior_steps(old: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(old / "run", run)
    before = torch.load(run / "checkpoints" / "vqvae_last.pt", weights_only=True)["model"]
    res = invoke("train", "--out", str(run), "--resume", "--prior-max-steps", "5", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert torch.load(run / "checkpoints" / "prior_last.pt", weights_only=True)["step"] == 5
    after = torch.load(run / "checkpoints" / "vqvae_last.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # stage 1 was finished: untouched
    assert json.loads((run / "run.json").read_text())["stages"]["prior"]["steps"] == 5


def test_an_old_bundle_instantiates_and_samples(old: Path) -> None:
    """0.1.0 bundles name ``mrivq.bundle.BundleNetwork``: MONAI's config parser still finds it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(old / "bundle" / "configs" / "inference.json"))
    parser["bundle_root"] = str(old / "bundle")
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == "BundleNetwork"
    ds = parser.get_parsed_content("dataset")
    x = ds[0]["image"]
    assert tuple(x.shape[-3:]) == (16, 16, 16) and np.isfinite(np.asarray(x)).all()
