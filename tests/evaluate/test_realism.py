"""End-to-end: `mrivq synth --prior ...` and `mrivq eval --samples` on a tiny trained phantom run,
real NIfTI and DICOM inputs, and the bad inputs that must give one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrivq.evaluate.realism import KEYS
from tests.helpers import TINY, invoke, mrivq_main


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    res = invoke("fetch", "phantom", "--root", str(root), "--count", "12", "--shape", "32", "32", "32",
                 "--spacing", "6")
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def run(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "r"
    res = invoke("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu", "--out", str(run),
                 "--device", "cpu", "--max-steps", "6", "--prior-max-steps", "4", *TINY,
                 "--set", "train.val_fraction=0.4")
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture(scope="module")
def samples(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "s"
    res = invoke("synth", "--run", str(run), "--count", "6", "--out", str(out), "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_eval_samples_writes_json_table_and_picture(run: Path, root: Path, samples: Path) -> None:
    res = invoke("eval", "--run", str(run), "--samples", str(samples), "--real", "phantom:val",
                 "--train", "phantom:train", "--root", str(root))
    assert res.exit_code == 0, res.output
    assert "c2st_accuracy" in res.output and "realism.json" in res.output
    m = json.loads((samples / "realism.json").read_text())
    assert set(KEYS) <= set(m)
    assert m["n_synth"] == 6 and m["n_real"] >= 4 and m["n_train"] >= 4 and m["memorization"] is not None
    assert 0 <= m["c2st_accuracy"] <= 1 and m["ms_ssim"]["kernel_size"] <= 5 and m["grid"] == [32, 32, 32]
    assert 0 < m["c2st_p_value"] <= 1 and 0 < m["c2st_texture_p_value"] <= 1 and m["mmd_floor"] is not None
    # synth's own output is read back exactly, not re-scaled
    assert m["sample_paths"] == {"synth_grid": 6, "preprocessed": 0}
    # the control rows, from the training scans, each judged by the same checks
    assert set(m["controls"]) == {"real_as_samples", "reconstructions", "mean_volume"}
    assert m["controls_source"] == "phantom:train" and m["controls"]["real_as_samples"]["n"] == 6
    assert set(m["checks"]) == set(m["controls"]["mean_volume"]["checks"])
    assert m["controls"]["mean_volume"]["checks"]["diversity"]["pass"] is False
    assert "real scans written and read as samples" in " ".join(res.output.split())
    assert len(m["nearest"]) == 6 and all(n.startswith("sub-") for n in m["nearest"])
    png = samples / "realism.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_defaults_and_folders_of_nifti_and_dicom(run: Path, root: Path, samples: Path, tmp_path: Path) -> None:
    """--real defaults to the run's dataset:val; a NIfTI folder and a DICOM folder are real sets too."""
    import shutil

    from tests.helpers import write_dicom_series

    nifti = tmp_path / "nifti"
    nifti.mkdir()
    vols = sorted((root / "phantom").rglob("*t1*.nii.gz"))[:5]
    assert len(vols) == 5
    for v in vols:
        shutil.copy(v, nifti / v.name)
    out = tmp_path / "a.json"
    res = invoke("eval", "--run", str(run), "--samples", str(samples), "--real", str(nifti), "--json", str(out),
                 "--no-controls")
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    assert m["n_real"] == 5 and m["real"] == str(nifti) and m["memorization"] is None
    assert (tmp_path / "a.png").is_file()
    dcm = tmp_path / "dicom"
    for i, v in enumerate(vols[:4]):
        img = nib.load(v)
        write_dicom_series(dcm / f"s{i}", np.asarray(img.dataobj, np.float32) * 1000, img.affine, desc=f"T1 {i}")
    res = invoke("eval", "--run", str(run), "--samples", str(samples), "--real", str(dcm), "--json",
                 str(tmp_path / "d.json"), "--no-controls")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d.json").read_text())["n_real"] == 4
    # DICOM series as the samples (another model's output, say): through the run's preprocessing
    res = invoke("eval", "--run", str(run), "--samples", str(dcm), "--real", str(nifti), "--json",
                 str(tmp_path / "ds.json"), "--no-controls")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ds.json").read_text())
    assert m["n_synth"] == 4 and m["sample_paths"] == {"synth_grid": 0, "preprocessed": 4}


@pytest.mark.slow
def test_samples_read_back_exactly_and_any_other_volume_is_preprocessed(run: Path, root: Path, tmp_path: Path) -> None:
    """Volumes written on the run's synth grid come back as the model wrote them (to float32 rounding);
    another model's volumes or real scans in their own geometry go through the run's preprocessing."""
    import shutil

    from mrivq.evaluate.volumes import load_samples, load_spec, write_as_samples
    from mrivq.runs.run import load_run

    r = load_run(run)
    val = load_spec("phantom:val", r, root)
    write_as_samples(val.x, r, tmp_path / "as")
    back, paths = load_samples(tmp_path / "as", r)
    assert paths == {"synth_grid": len(val), "preprocessed": 0}
    assert np.abs(back.x - val.x).max() < 1e-5
    real = tmp_path / "real"
    real.mkdir()
    for v in sorted((root / "phantom").rglob("*_t1.nii.gz"))[:4]:
        shutil.copy(v, real / v.name)
    vs, paths = load_samples(real, r)
    assert paths == {"synth_grid": 0, "preprocessed": 4} and vs.x.shape[1:] == (1, 32, 32, 32)
    res = invoke("eval", "--run", str(run), "--samples", str(real), "--root", str(root), "--no-controls",
                 "--json", str(tmp_path / "r.json"))
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r.json").read_text())
    assert m["sample_paths"]["preprocessed"] == 4 and m["controls"] == {}


@pytest.mark.parametrize("args, needle", [
    (["--samples", "S", "--threshold", "0.1"], "--threshold does not apply to eval --samples"),
    (["--samples", "S", "--split", "train"], "--split does not apply to eval --samples"),
    (["--anomaly", "--split", "train"], "--split does not apply to eval --anomaly"),
    (["--anomaly", "--real", "phantom:val"], "--real does not apply to eval --anomaly"),
    (["--anomaly", "--no-controls"], "--controls/--no-controls does not apply to eval --anomaly"),
    (["--resamples", "2"], "--resamples does not apply to eval (reconstruction)"),
    (["--json", "x.json"], "--json does not apply to eval (reconstruction)"),
    (["--dataset", "phantom"], "--dataset does not apply to eval (reconstruction)"),
    (["--no-calibrate"], "--calibrate/--no-calibrate does not apply to eval (reconstruction)"),
])
def test_eval_refuses_options_its_mode_does_not_use(args: list[str], needle: str, run: Path, samples: Path) -> None:
    res = invoke("eval", "--run", str(run), *[str(samples) if a == "S" else a for a in args])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output


def test_synth_baseline_priors(run: Path, tmp_path: Path) -> None:
    import torch

    for prior in ("marginal", "uniform"):
        out = tmp_path / prior
        res = invoke("synth", "--run", str(run), "--count", "4", "--out", str(out), "--prior", prior,
                     "--device", "cpu")
        assert res.exit_code == 0, res.output
        side = json.loads((out / "synth_0000.json").read_text())
        assert side["prior"] == prior and side["sampler"] == "independent"
        assert nib.load(out / "synth_0003.nii.gz").shape == (32, 32, 32)
    # marginal codes only ever take codes that occur at their position in training
    from mrivq.inference.synth import baseline_logits
    from mrivq.runs.run import load_run

    lg = baseline_logits(load_run(run), "marginal")
    codes = torch.load(run / "codes" / "codes.pt", weights_only=True)["train"].long()
    seen = torch.zeros_like(lg, dtype=torch.bool).flatten(0, -2)
    seen[torch.arange(seen.shape[0]).repeat(len(codes)), codes.flatten(1).flatten()] = True
    assert torch.equal(torch.isfinite(lg).flatten(0, -2), seen)


def _nifti(path: Path, shape: tuple[int, ...], spacing: float = 6.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, np.diag([spacing] * 3 + [1.0])), path)


@pytest.mark.parametrize("case, needle", [
    ("three_samples", "at least 4"),
    ("other_geometry", "at least 4"),
    ("bad_features", "not a MedicalNet ResNet checkpoint"),
    ("no_samples", "does not exist"),
    ("unknown_dataset", "is not fetched"),
    ("bad_split", "not one of train, val, all"),
    ("tiny_real", "at least 4"),
    ("bad_prior", "--prior"),
    ("json_is_a_folder", "cannot write"),
    ("json_exists", "already exists"),
])
def test_eval_bad_input_is_one_line(case: str, needle: str, run: Path, root: Path, samples: Path,
                                    tmp_path: Path) -> None:
    import shutil

    args = ["eval", "--run", str(run), "--samples", str(samples), "--root", str(root)]
    if case == "three_samples":
        few = tmp_path / "few"
        few.mkdir()
        for i in range(3):
            shutil.copy(samples / f"synth_{i:04d}.nii.gz", few)
        args[4] = str(few)
    elif case == "other_geometry":
        _nifti(tmp_path / "other" / "synth_0000.nii.gz", (48, 56, 48), 4.0)
        args[4] = str(tmp_path / "other")
    elif case == "bad_features":
        (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
        args += ["--features", f"medicalnet:{tmp_path / 'w.pth'}"]
    elif case == "no_samples":
        args[4] = str(tmp_path / "missing")
    elif case == "unknown_dataset":
        args += ["--real", "ixi:val"]
    elif case == "bad_split":
        args += ["--real", "phantom:test"]
    elif case == "tiny_real":
        for i in range(2):
            _nifti(tmp_path / "r2" / f"r{i}.nii.gz", (32, 32, 32))
        args += ["--real", str(tmp_path / "r2")]
    elif case == "json_is_a_folder":
        args += ["--json", str(tmp_path)]
    elif case == "json_exists":
        (tmp_path / "mine.json").write_text("{}")
        args += ["--json", str(tmp_path / "mine.json")]
    elif case == "bad_prior":
        args = ["synth", "--run", str(run), "--prior", "gan", "--out", str(tmp_path / "o")]
    proc = mrivq_main(*args)
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]  # (progress lines may precede)
    assert len(errors) == 1 and needle in errors[0] and proc.stderr.strip().endswith(errors[0].strip()), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "few" / "realism.json").exists()
    if case == "json_exists":
        assert (tmp_path / "mine.json").read_text() == "{}"  # the user's file is untouched


@pytest.mark.slow
def test_decoded_training_codes_are_caught_as_copies(run: Path, root: Path, samples: Path, tmp_path: Path) -> None:
    """Samples that are a training subject's code grid decoded (what a prior that memorized would
    give) sit at distance ~0 from the training set as the model reconstructs it; new samples do not."""
    import torch

    from mrivq.evaluate.volumes import write_as_samples
    from mrivq.models.calibration import describe
    from mrivq.runs.run import load_run

    r = load_run(run)
    codes = torch.load(run / "codes" / "codes.pt", weights_only=True)["train"][:5]
    with torch.no_grad():
        x = r.decode(codes.long()).numpy()  # as synth decodes: through the run's calibration
    copies = tmp_path / "copies"
    write_as_samples(x, r, copies, "synth", describe(r.calibration))  # as synth writes them
    res = invoke("eval", "--run", str(run), "--samples", str(copies), "--real", "phantom:val", "--train",
                 "phantom:train", "--root", str(root), "--no-controls")
    assert res.exit_code == 0, res.output
    m = json.loads((copies / "realism.json").read_text())
    assert m["memorization"] < 0.1 and m["memorization_space"].startswith("reconstructions")
    new = json.loads((samples / "realism.json").read_text()) if (samples / "realism.json").is_file() else None
    if new is None:
        invoke("eval", "--run", str(run), "--samples", str(samples), "--train", "phantom:train", "--root", str(root))
        new = json.loads((samples / "realism.json").read_text())
    assert new["memorization"] > 5 * m["memorization"]


@pytest.mark.slow
def test_train_and_synth_with_position_embeddings_and_attention(root: Path, tmp_path: Path) -> None:
    """The prior levers go through `mrivq train --set prior.model...`, are stored with the run, and
    the cached sampler (the default) and the reference one give the same samples from them."""
    run = tmp_path / "lev"
    res = invoke("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu", "--out", str(run),
                 "--device", "cpu", "--max-steps", "4", "--prior-max-steps", "3", *TINY,
                 "--set", "prior.model.positions=grid", "--set", "prior.model.attention_every=1",
                 "--set", "prior.model.attention_heads=2")
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "run.json").read_text())["model_config"]["prior"]
    assert cfg["positions"] == "grid" and cfg["attention_every"] == 1
    assert cfg["latent_shape"] == json.loads((run / "run.json").read_text())["latent_shape"]
    for sampler, out in (([], "a"), (["--reference"], "b")):
        res = invoke("synth", "--run", str(run), "--count", "2", "--out", str(tmp_path / out), "--device", "cpu",
                     *sampler)
        assert res.exit_code == 0, res.output
    a, b = (np.asarray(nib.load(tmp_path / o / "synth_0001.nii.gz").dataobj) for o in "ab")
    assert np.array_equal(a, b)
