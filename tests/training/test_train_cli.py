"""End-to-end: fetch the phantom, train both stages (tiny), synth, encode/decode, score, eval, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import TINY, invoke, mrivq_main


def test_run_folder_contents(trained_run: Path) -> None:
    for name in ("config.yaml", "run.json", "metrics.jsonl", "checkpoints/vqvae_last.pt",
                 "checkpoints/vqvae_best.pt", "checkpoints/prior_last.pt", "codes/codes.pt"):
        assert (trained_run / name).is_file(), name
    info = json.loads((trained_run / "run.json").read_text())
    assert info["latent_shape"] == [8, 8, 8]
    assert info["preprocess"]["spacing"] == [6.0, 6.0, 6.0]
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    vq = [x for x in lines if x["stage"] == "vqvae"]
    assert any("val_psnr" in x and "val_ssim" in x and "val_code_usage" in x for x in vq)
    assert any("perplexity" in x and "voxels_per_s" in x and "lr" in x for x in vq)
    assert any("val_nats_per_token" in x for x in lines if x["stage"] == "prior")
    assert list((trained_run / "previews").glob("*.png"))
    codes = torch.load(trained_run / "codes" / "codes.pt", weights_only=True)
    assert codes["train"].dtype == torch.int16 and codes["val"].dtype == torch.int16  # compact, not int64
    ck = torch.load(trained_run / "checkpoints" / "vqvae_last.pt", weights_only=True)
    assert ck["step"] == 8 and "optimizer" in ck and "rng" in ck


def test_synth_writes_nifti_png_and_sidecars(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "nii"
    res = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(out), "--seed", "3",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    img = nib.load(out / "synth_0000.nii.gz")
    assert img.shape == (32, 32, 32)
    assert np.allclose(np.abs(np.diag(img.affine)[:3]), 6.0)
    assert not np.allclose(img.affine, np.eye(4))
    assert (out / "synth_0001.png").is_file()
    side = json.loads((out / "synth_0001.json").read_text())
    assert side["seed"] == 3 and side["temperature"] == 1.0 and "vqvae" in side["checkpoint_sha256"]
    # same seed -> same volume; refuses to overwrite without --overwrite
    res2 = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(out), "--device", "cpu")
    assert res2.exit_code == 2 and "--overwrite" in res2.output
    res3 = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(tmp_path / "b"), "--seed", "3",
                  "--device", "cpu")
    assert res3.exit_code == 0
    assert np.array_equal(nib.load(tmp_path / "b" / "synth_0000.nii.gz").get_fdata(), img.get_fdata())
    # intensities in the training data's units: [0, 1] mapped through the run's median range
    inten = json.loads((trained_run / "run.json").read_text())["intensity"]
    lo, hi = inten["lo"][0], inten["hi"][0]
    vals = img.get_fdata()
    assert hi > lo and lo - 1e-3 <= vals.min() and vals.max() <= hi + 1e-3 and vals.max() > lo + 0.1 * (hi - lo)


def test_synth_guards_every_output_and_the_folder(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = invoke("synth", "--run", str(trained_run), "--count", "1", "--out", str(out), "--device", "cpu")
    assert res.exit_code == 0, res.output
    for name in ("synth_0000.nii.gz", "synth_0000.png"):  # only the sidecar is left: still refused
        (out / name).unlink()
    side = (out / "synth_0000.json").read_text()
    res = invoke("synth", "--run", str(trained_run), "--count", "1", "--out", str(out), "--device", "cpu")
    assert res.exit_code == 2 and "synth_0000.json already exists" in res.output
    assert (out / "synth_0000.json").read_text() == side and not (out / "synth_0000.nii.gz").exists()
    assert invoke("synth", "--run", str(trained_run), "--count", "1", "--out", str(out), "--device", "cpu",
                  "--overwrite").exit_code == 0
    (tmp_path / "file").write_text("x")
    res = invoke("synth", "--run", str(trained_run), "--count", "1", "--out", str(tmp_path / "file" / "sub"),
                 "--device", "cpu")
    assert res.exit_code == 2 and "cannot create output folder" in res.output


def _an_input(phantom_root: Path, tmp_path: Path) -> Path:
    # An input in a geometry unlike the training grid: LPS-ish flipped affine and odd shape.
    src = sorted((phantom_root / "phantom").rglob("*_t1.nii.gz"))[0]
    img = nib.load(src)
    data = np.asarray(img.dataobj, dtype=np.float32)[:, 1:, :-3] * 3.0 + 100.0
    aff = img.affine.copy()
    aff[0, :] *= -1
    path = tmp_path / "input.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), path)
    return path


def test_encode_decode_keeps_geometry(trained_run: Path, phantom_root: Path, tmp_path: Path) -> None:
    inp = _an_input(phantom_root, tmp_path)
    src = nib.load(inp)
    assert invoke("encode", str(inp), "-o", str(tmp_path / "c.npz"), "--run", str(trained_run),
                  "--device", "cpu").exit_code == 0
    res = invoke("decode", str(tmp_path / "c.npz"), "-o", str(tmp_path / "d.nii.gz"), "--run", str(trained_run),
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = nib.load(tmp_path / "d.nii.gz")
    assert out.shape == src.shape
    assert np.allclose(out.affine, src.affine, atol=1e-4)
    d = out.get_fdata()
    assert d.max() > 50  # back in the input's intensity scale, not [0, 1]
    res = invoke("reconstruct", str(inp), "-o", str(tmp_path / "r.nii.gz"), "--run", str(trained_run),
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert nib.load(tmp_path / "r.nii.gz").shape == src.shape


def test_score_and_eval(trained_run: Path, phantom_root: Path, tmp_path: Path) -> None:
    inp = _an_input(phantom_root, tmp_path)
    res = invoke("score", str(inp), "-o", str(tmp_path / "nll.nii.gz"), "--run", str(trained_run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "mean NLL" in res.output
    nll = nib.load(tmp_path / "nll.nii.gz")
    assert nll.shape == nib.load(inp).shape and np.all(np.isfinite(nll.get_fdata()))
    assert nll.get_fdata().max() > 0
    res = invoke("eval", "--run", str(trained_run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    ev = json.loads((trained_run / "eval_val.json").read_text())
    assert {"psnr", "ssim", "code_usage", "perplexity"} <= set(ev)


@pytest.mark.parametrize("args, needle", [
    (["fetch", "no-such-dataset"], "no-such-dataset"),
    (["train", "--dataset", "ixi", "--root", "{tmp}"], "mrivq fetch"),
    (["synth", "--run", "{tmp}"], "not an mrivq run"),
    (["encode", "{tmp}/missing.nii.gz", "-o", "{tmp}/c.npz", "--run", "{run}"], "missing.nii.gz"),
    (["train", "--dims", "4"], "--dims"),
    (["decode", "{tmp}/junk.npz", "-o", "{tmp}/o.nii.gz", "--run", "{run}"], "junk.npz"),
    (["train", "--stage", "prior", "--run", "{tmp}"], "is not an mrivq run"),
    (["train", "--resume", "--out", "{tmp}/nope"], "nope does not exist"),
    (["train", "--resume", "--out", "{run}", "--max-steps", "-5"], "--max-steps -5 must be at least 1"),
    (["train", "--stage", "prior", "--run", "{run}", "--prior-max-steps", "0"], "--prior-max-steps 0 must be at"),
    (["synth", "--run", "{run}", "--out", "{tmp}/s", "--temperature", "nan"], "--temperature nan must be a number"),
    (["synth", "--run", "{run}", "--out", "{tmp}/s", "--batch-size", "0"], "--batch-size 0 must be at least 1"),
    (["encode", "{tmp}/slice.png", "-o", "{tmp}/c.npz", "--run", "{run}"], "2D image but the model is 3D"),
    (["encode", "{tmp}/two.nii.gz", "-o", "{tmp}/c.npz", "--run", "{run}"], "2 channel(s) but the run expects 1"),
])
def test_cli_errors_are_one_line(args: list[str], needle: str, tmp_path: Path, trained_run: Path) -> None:
    from PIL import Image

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "slice.png")
    vol = np.random.default_rng(0).random((32, 32, 32, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([6.0, 6.0, 6.0, 1.0])), tmp_path / "two.nii.gz")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{run}", str(trained_run)) for a in args]
    proc = mrivq_main(*args)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["reconstruct", "encode", "score", "decode"])
def test_outputs_never_destroy_an_input_or_a_non_file(command: str, tmp_path: Path, trained_run: Path) -> None:
    """`reconstruct IN -o IN` never replaces the input, and `-o DIR` or a FIFO are never written over."""
    vol = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([6.0, 6.0, 6.0, 1.0])), src)
    if command == "decode":
        assert invoke("encode", str(src), "-o", str(tmp_path / "c.npz"), "--run", str(trained_run)).exit_code == 0
        src = tmp_path / "c.npz"
    before = src.read_bytes()
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    for target, needle in ((src, "is the input"), (tmp_path / "folder", "is not a regular file"),
                           (tmp_path / "fifo", "is not a regular file")):
        proc = mrivq_main(command, str(src), "-o", str(target), "--run", str(trained_run))
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert src.read_bytes() == before and (tmp_path / "folder").is_dir() and not list((tmp_path / "folder").iterdir())


def test_existing_outputs_are_replaced_only_with_overwrite(tmp_path: Path, trained_run: Path) -> None:
    vol = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([6.0, 6.0, 6.0, 1.0])), src)
    assert invoke("encode", str(src), "-o", str(tmp_path / "c.npz"), "--run", str(trained_run)).exit_code == 0
    for command, inp, name in (("reconstruct", src, "r.nii.gz"), ("score", src, "s.nii.gz"),
                               ("encode", src, "e.npz"), ("decode", tmp_path / "c.npz", "d.nii.gz")):
        target = tmp_path / name
        target.write_bytes(b"precious")
        res = invoke(command, str(inp), "-o", str(target), "--run", str(trained_run))
        assert res.exit_code == 2 and "already exists; pass --overwrite" in res.output, res.output
        assert target.read_bytes() == b"precious"
        res = invoke(command, str(inp), "-o", str(target), "--run", str(trained_run), "--overwrite")
        assert res.exit_code == 0, res.output
        assert target.read_bytes() != b"precious"


@pytest.mark.slow
def test_debug_shows_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mrivq", "--debug", "synth", "--run", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _signal_at(proc: subprocess.Popen, metrics: Path, stage: str, step: int, sig: int) -> str:
    """Send ``sig`` once ``metrics`` logs ``stage`` at ``step`` or later; the run must exit with 130."""
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        if any(x["stage"] == stage and x["step"] >= step for x in lines):
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    return stderr


ADVERSARIAL = ["--set", "train.adversarial_weight=0.1", "--set", "train.adversarial_start=5",
               "--set", "train.disc_channels=4", "--set", "train.disc_layers=2"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ADVERSARIAL, ["--set", "train.workers=2"]],
                         ids=["plain", "adversarial", "loader-workers"])
def test_resume_after_sigterm_equals_uninterrupted(phantom_root: Path, tmp_path: Path, extra: list[str]) -> None:
    """Also with the patch discriminator on (its weights and optimizer resume exactly too) and with
    DataLoader worker processes (the batches stay a function of the step)."""
    base = [sys.executable, "-m", "mrivq", "train", "--dataset", "phantom", "--root", str(phantom_root),
            "--preset", "vqvae3d-cpu", "--device", "cpu", "--stage", "vqvae", "--max-steps", "30", *TINY, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run([*base, "--out", str(full)], check=True, capture_output=True, env=env, timeout=600)
    cut = tmp_path / "cut"
    # no periodic checkpoints in the interrupted run: the one it resumes from must be the signal's
    proc = subprocess.Popen([*base, "--out", str(cut), "--set", "train.ckpt_every=1000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    stderr = _signal_at(proc, cut / "metrics.jsonl", "vqvae", 10, signal.SIGTERM)
    step = torch.load(cut / "checkpoints" / "vqvae_last.pt", weights_only=True)["step"]
    assert 10 <= step < 30, "the signal should arrive mid-run"
    assert f"vqvae interrupted at step {step}; checkpoint written" in stderr
    subprocess.run([*base, "--out", str(cut), "--resume"], check=True, capture_output=True, env=env, timeout=600)
    a, b = _weights(full / "checkpoints" / "vqvae_last.pt"), _weights(cut / "checkpoints" / "vqvae_last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if extra == ["--set", "train.workers=2"]:  # and the same model as without workers
        plain = tmp_path / "plain"
        subprocess.run([*base[:-2], "--out", str(plain)], check=True, capture_output=True, env=env, timeout=600)
        c = _weights(plain / "checkpoints" / "vqvae_last.pt")
        assert all(torch.equal(a[k], c[k]) for k in a)
    if extra == ADVERSARIAL:
        da = torch.load(full / "checkpoints" / "vqvae_last.pt", weights_only=True)["discriminator"]
        db = torch.load(cut / "checkpoints" / "vqvae_last.pt", weights_only=True)["discriminator"]
        assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)
        lines = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
        logged = [x for x in lines if "adv_g" in x]
        assert logged and min(x["step"] for x in logged) > 5, "the discriminator starts at adversarial_start"
        assert all(np.isfinite(x["adv_d"]) for x in logged)


@pytest.mark.slow
def test_prior_resume_after_sigint_equals_uninterrupted(trained_run: Path, tmp_path: Path) -> None:
    """Ctrl-C in stage 2 writes prior_last.pt at the step it stopped; resuming gives the same prior."""
    import shutil

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    shutil.copytree(trained_run, full)
    shutil.copytree(trained_run, cut)
    start = torch.load(cut / "checkpoints" / "prior_last.pt", weights_only=True)["step"]
    base = [sys.executable, "-m", "mrivq", "train", "--stage", "prior", "--device", "cpu", "--prior-max-steps", "300"]
    subprocess.run([*base, "--run", str(full)], check=True, capture_output=True, env=env, timeout=600)
    proc = subprocess.Popen([*base, "--run", str(cut)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    stderr = _signal_at(proc, cut / "metrics.jsonl", "prior", start + 30, signal.SIGINT)
    step = torch.load(cut / "checkpoints" / "prior_last.pt", weights_only=True)["step"]
    assert start + 30 <= step < 300, "the signal should arrive mid-run"
    assert f"prior interrupted at step {step}; checkpoint written" in stderr
    assert (cut / "checkpoints" / "prior_best.pt").is_file()
    subprocess.run([*base, "--run", str(cut)], check=True, capture_output=True, env=env, timeout=600)
    a, b = _weights(full / "checkpoints" / "prior_last.pt"), _weights(cut / "checkpoints" / "prior_last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage_prior_continues_an_existing_run(trained_run: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import mrivq.data.split

    def no_preprocessing(*a, **k):
        raise AssertionError("the training set was preprocessed though the code cache is valid")

    # with a valid code cache stage 2 needs no image: neither set is preprocessed nor are intensities read
    monkeypatch.setattr(mrivq.data.split, "make_dataset", no_preprocessing)
    monkeypatch.setattr(mrivq.data.split, "dataset_intensity_stats", no_preprocessing)
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    res = invoke("train", "--stage", "prior", "--run", str(run), "--prior-max-steps", "9", "--device", "cpu")
    assert res.exit_code == 0, res.output
    ck = torch.load(run / "checkpoints" / "prior_last.pt", weights_only=True)
    assert ck["step"] == 9
    # the VQ-VAE is untouched and the code cache reused
    a = torch.load(trained_run / "checkpoints" / "vqvae_last.pt", weights_only=True)["model"]
    b = torch.load(run / "checkpoints" / "vqvae_last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vqvae_retrained_on_resume_trains_the_prior_again(trained_run: Path, tmp_path: Path) -> None:
    """More VQ-VAE steps change its best checkpoint and so the codes: the old prior (trained on the old
    codebook) is set aside, not resumed or taken as finished, and synth decodes the new prior's codes."""
    import shutil

    from mrivq.runs.folder import file_sha256

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    old_vq = file_sha256(run / "checkpoints" / "vqvae_best.pt")
    old_prior = torch.load(run / "checkpoints" / "prior_last.pt", weights_only=True)
    assert old_prior["vqvae_sha256"] == old_vq
    res = invoke("train", "--resume", "--out", str(run), "--max-steps", "16", "--device", "cpu")
    assert res.exit_code == 0, res.output
    new_vq = file_sha256(run / "checkpoints" / "vqvae_best.pt")
    assert new_vq != old_vq, "premise: 8 more steps give a better VQ-VAE checkpoint"
    prior = torch.load(run / "checkpoints" / "prior_last.pt", weights_only=True)
    assert prior["vqvae_sha256"] == new_vq and prior["step"] == old_prior["step"]
    stale = list((run / "checkpoints").glob("stale-*/prior_last.pt"))
    assert len(stale) == 1 and torch.load(stale[0], weights_only=True)["step"] == old_prior["step"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for stage in ("vqvae", "prior"):
        steps = [x["step"] for x in lines if x["stage"] == stage and "loss" in x]
        assert len(steps) == len(set(steps)), f"{stage} lines repeated"
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert res.exit_code == 0, res.output


def test_synth_refuses_a_prior_of_another_vqvae(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    for which in ("best", "last"):
        path = run / "checkpoints" / f"prior_{which}.pt"
        ck = torch.load(path, weights_only=True)
        ck["vqvae_sha256"] = "0" * 64
        torch.save(ck, path)
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert res.exit_code == 2 and "trained on the codes of another VQ-VAE" in res.output
    assert not (tmp_path / "s").exists()


def test_run_json_records_the_modalities_used(trained_run: Path) -> None:
    info = json.loads((trained_run / "run.json").read_text())
    assert info["modalities"] == ["t1"] and info["dims"] == 3 and info["dataset"] == "phantom"
    assert sorted(info["split"]) == ["train", "val"] and len(info["split"]["train"]) == info["n_train"]


@pytest.mark.parametrize("args,message", [
    (["--set", "model.channels=[4,8]"], "--set model.channels cannot change on an existing run"),
    (["--set", "train.lr=0.5"], "--set train.lr cannot change on an existing run"),
    (["--preset", "vqvae3d-t1"], "--preset vqvae3d-t1 differs from the run's vqvae3d-cpu"),
    (["--modality", "t2"], "--modality t2 differs from the run's t1"),
    (["--dims", "2"], "--dims 2 differs from the run's 3"),
    (["--dataset", "ixi"], "--dataset ixi differs from the run's phantom"),
], ids=["model", "lr", "preset", "modality", "dims", "dataset"])
def test_existing_run_refuses_what_it_cannot_change(trained_run: Path, tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    """--set, --preset, --modality, --dims and --dataset on an existing run are refused, never ignored silently."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for how in (["--resume", "--out", str(run)], ["--stage", "prior", "--run", str(run)]):
        res = invoke("train", *how, "--device", "cpu", *args)
        assert res.exit_code == 2 and message in res.output, res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_existing_run_takes_schedule_overrides_and_the_same_command_again(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    import yaml

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    res = invoke("train", "--stage", "prior", "--run", str(run), "--device", "cpu", "--preset", "vqvae3d-cpu",
                 "--set", "prior.train.max_steps=9", "--set", "prior.train.log_every=1", *TINY)
    assert res.exit_code == 0, res.output
    assert torch.load(run / "checkpoints" / "prior_last.pt", weights_only=True)["step"] == 9
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["prior"]["train"]["max_steps"] == 9 and cfg["prior"]["train"]["log_every"] == 1


@pytest.mark.slow
def test_split_stays_when_more_subjects_are_fetched(phantom_root: Path, tmp_path: Path) -> None:
    """The validation subjects of a run are fixed at creation, not recomputed from a grown manifest."""
    import csv
    import shutil

    from mrivq.data.manifest import load_manifest, select_rows, split_subjects
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    run = tmp_path / "run"
    base = ["train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu", "--device", "cpu",
            "--stage", "vqvae", "--out", str(run), *TINY]
    assert invoke(*base, "--max-steps", "2").exit_code == 0
    split = json.loads((run / "run.json").read_text())["split"]
    manifest = root / "phantom" / "manifest.csv"
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    grown = rows + [{**r, "subject": r["subject"] + f"-copy{k}"} for k in range(3) for r in rows]
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(grown)
    t1 = select_rows(load_manifest(root / "phantom"), ["t1"])
    _, va = split_subjects(t1, 0.15, 0)
    assert sorted({r["subject"] for r in va}) != sorted(split["val"]), "premise: a fresh split would differ"
    res = invoke("train", "--resume", "--out", str(run), "--max-steps", "4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    info = json.loads((run / "run.json").read_text())
    assert info["split"] == split and info["n_train"] == len(split["train"])
    lost = [r for r in grown if r["subject"] != split["val"][0]]
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(lost)
    res = invoke("train", "--resume", "--out", str(run), "--max-steps", "6", "--device", "cpu")
    assert res.exit_code == 2 and f"no longer lists 1 of the run's val subjects (e.g. {split['val'][0]})" in res.output


def test_synth_defaults_to_latest_run(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copytree(trained_run, tmp_path / "runs" / "a")
    (tmp_path / "runs" / "not-a-run").mkdir()
    res = invoke("synth", "--count", "1", "--out", "nii", "--device", "cpu")
    assert res.exit_code == 0, res.output
    side = json.loads((tmp_path / "nii" / "synth_0000.json").read_text())
    assert Path(side["run"]).name == "a"


@pytest.mark.slow
def test_datasets_listing_and_show(phantom_root: Path) -> None:
    res = invoke("datasets", "--json")
    cards = json.loads(res.output)
    ixi = next(c for c in cards if c["name"] == "ixi")
    assert any(f.get("md5") == "34901a0593b41dd19c1a1f746eac2d58" for f in ixi["files"])
    proc = subprocess.run([sys.executable, "-m", "mrivq", "datasets", "--root", str(phantom_root)], text=True,
                          capture_output=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {cells[0]: cells for line in proc.stdout.splitlines()
            if (cells := [c.strip() for c in line.strip("│ ").split("│")]) and len(cells) == 6}
    assert rows["phantom"][3] == "builtin" and rows["phantom"][5] == "pd, t1, t2"  # fetched: its modalities
    assert rows["ixi"][1:6] == ["t1, t2, pd, mra, dti", ">= 15.9 GB", "open", "CC BY-SA 3.0", "-"]
    assert rows["brats"][3] == "manual" and rows["brats"][5] == "-"
    res = invoke("datasets", "show", "ixi")
    assert "IXI-T1.tar" in res.output and "CC BY-SA 3.0" in res.output
    assert invoke("datasets", "show", "nope").exit_code == 2


def test_padding_follows_the_model_levels(phantom_root: Path, tmp_path: Path) -> None:
    """Three levels via --set (factor 8) on a preset that pads to 4: volumes are padded to 8."""
    run = tmp_path / "r"
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--stage", "vqvae", "--max-steps", "2", *TINY,
                 "--set", "data.shape=null", "--set", "data.spacing=[7.0,7.0,7.0]",
                 "--set", "model.channels=[8,8,16]", "--set", "model.num_res_channels=[8,8,16]")
    assert res.exit_code == 0, res.output
    info = json.loads((run / "run.json").read_text())
    assert info["preprocess"]["divisible_by"] == 8
    assert all(s % 8 == 0 for s in info["image_shape"])
    assert info["latent_shape"] == [s // 8 for s in info["image_shape"]]
