"""`mrivq export --bundle`: a MONAI bundle that MONAI's own tools read, verify and run, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import mrivq
from tests.helpers import TINY, invoke

SCHEMA = Path(__file__).parents[1] / "fixtures" / "bundle_meta_schema.json"


@pytest.fixture(scope="module")
def bundle(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    res = invoke("export", "--run", str(trained_run), "--bundle", str(out), "--num-samples", "2")
    assert res.exit_code == 0, res.output
    return out


def test_bundle_layout_and_metadata_verify(bundle: Path, tmp_path: Path) -> None:
    from monai.bundle import verify_metadata

    for rel in ("configs/metadata.json", "configs/inference.json", "configs/mrivq.json", "models/model.pt",
                "models/prior.pt", "docs/README.md", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["required_packages_version"]["mrivq"] == mrivq.__version__
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32, 32]
    assert "phantom" in (bundle / "docs" / "README.md").read_text() and "CC0" in (bundle / "LICENSE").read_text()
    # the specification's schema (a copy the tests ship: it cannot be downloaded here)
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in meta.items() if k != "task"}))
    with pytest.raises(ValueError):
        verify_metadata(meta_file=str(bad), filepath=str(schema))
    # the weights are plain state dicts
    sd = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())


@pytest.mark.slow
def test_monai_runs_the_bundle_offline_and_checks_its_network(bundle: Path, trained_run: Path,
                                                               tmp_path: Path) -> None:
    from monai.bundle import verify_net_in_out

    env = {**os.environ, "NO_PROXY": "*", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                          str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    written = sorted((bundle / "samples").glob("*.nii.gz"))
    assert [p.name for p in written] == ["synth_0000.nii.gz", "synth_0001.nii.gz"]
    out = tmp_path / "s"
    assert invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(out), "--device", "cpu",
                  "--seed", "0").exit_code == 0
    for p in written:  # the bundle's samples are the run's own (same models, same seed)
        mine, theirs = nib.load(out / p.name), nib.load(p)
        assert theirs.shape == mine.shape
        np.testing.assert_allclose(np.asarray(theirs.dataobj), np.asarray(mine.dataobj), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(theirs.affine, mine.affine, atol=1e-4)
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), device="cpu")
    ds = mrivq.SyntheticDataset(bundle, 1)
    assert ds[0]["image"].shape == (1, 32, 32, 32)


def test_export_bad_input(bundle: Path, trained_run: Path, phantom_root: Path, tmp_path: Path) -> None:
    from mrivq.inference.bundle import load_bundle
    from mrivq.utils.errors import RunError

    res = invoke("export", "--run", str(trained_run), "--bundle", str(bundle))
    assert res.exit_code == 2 and "already exists" in res.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = invoke("export", "--run", str(trained_run), "--bundle", str(mine), "--overwrite")
    assert res.exit_code == 2 and "not a bundle" in res.output and (mine / "notes.txt").read_text() == "keep"
    res = invoke("export", "--run", str(trained_run), "--bundle", str(trained_run / "b"))
    assert res.exit_code == 2 and "inside run" in res.output
    again = invoke("export", "--run", str(trained_run), "--bundle", str(bundle), "--overwrite", "--num-samples", "2")
    assert again.exit_code == 0, again.output
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken, ignore=shutil.ignore_patterns("samples"))
    (broken / "models" / "prior.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="not a bundle exported"):
        load_bundle(broken)
    run = tmp_path / "vq"
    assert invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu", "--out",
                  str(run), "--device", "cpu", "--stage", "vqvae", "--max-steps", "2", *TINY).exit_code == 0
    res = invoke("export", "--run", str(run), "--bundle", str(tmp_path / "b2"))
    assert res.exit_code == 2 and "no trained prior" in res.output
