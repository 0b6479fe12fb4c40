"""Bad input never crashes, destroys a file or exhausts memory: each class of bad input through the CLI's
entry point (exit code 2, one line, no traceback, every file byte-identical after); memory limits and
Ctrl-C in a process of their own."""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from filelock import FileLock

from mrivq.utils.errors import user_message
from tests.helpers import Completed, invoke, mrivq_main

AFF = np.diag([6.0, 6.0, 6.0, 1.0])
MEM_LIMIT = 6 * 1024 ** 3  # bytes of address space for the memory-bomb cases


def _vol(shape=(32, 32, 32)) -> np.ndarray:
    return np.random.default_rng(0).random(shape).astype(np.float32)


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray = AFF) -> Path:
    if np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12:
        nib.save(nib.Nifti1Image(data, affine), path)
        return path
    img = nib.Nifti1Image(data, AFF)  # nibabel refuses to write such an affine: set the sform by hand
    hdr = img.header
    for i, row in enumerate(("srow_x", "srow_y", "srow_z")):
        hdr[row] = affine[i]
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + data.astype(np.float32).tobytes(order="F")))
    return path


def _header_bomb(path: Path) -> Path:
    """A few hundred bytes of gzip whose header declares 1024^3 float32 voxels (4 GB)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(AFF, code=1)
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024))
    return path


def _gzip_bomb(path: Path) -> Path:
    """A valid 8^3 NIfTI followed by 300 MB of zeros, compressed to a few hundred kilobytes."""
    img = nib.Nifti1Image(_vol((8, 8, 8)), AFF)
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [c.compress(img.to_bytes())]
    zeros = b"\0" * (1 << 24)
    parts += [c.compress(zeros) for _ in range(18)]
    parts.append(c.flush())
    path.write_bytes(b"".join(parts))
    return path


def _big_voxels(path: Path) -> Path:
    return _nifti(path, _vol((16, 16, 16)), np.diag([500.0, 500.0, 500.0, 1.0]))


def _snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink() and p.name != ".lock":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))


def _mrivq(*args: str, limit: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess | Completed:
    """The command in this process through the console entry point; under a memory limit (``limit``) in
    a process of its own, so that the limit holds for it alone."""
    if not limit:
        return mrivq_main(*args, cwd=cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mrivq", *args], capture_output=True, text=True, timeout=300,
                          env=env, preexec_fn=_limit_memory, cwd=cwd)


def _assert_one_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def _inputs(tmp: Path) -> None:
    _nifti(tmp / "zero_affine.nii.gz", _vol(), np.zeros((4, 4)))
    _nifti(tmp / "singular_affine.nii.gz", _vol(), np.diag([6.0, 6.0, 0.0, 1.0]))
    nan_aff = AFF.copy()
    nan_aff[0, 3] = np.nan
    _nifti(tmp / "nan_affine.nii.gz", _vol(), nan_aff)
    _nifti(tmp / "flat.nii.gz", _vol((32, 32)))
    _nifti(tmp / "all_nan.nii.gz", np.full((32, 32, 32), np.nan, np.float32))
    _header_bomb(tmp / "bomb.nii.gz")
    _gzip_bomb(tmp / "gzbomb.nii.gz")
    _big_voxels(tmp / "huge_voxels.nii.gz")
    _nifti(tmp / "complex.nii.gz", (_vol() + 1j * _vol()).astype(np.complex64))
    zero_sform = nib.Nifti1Header()  # qform valid, sform all zeros while sform_code says it is valid
    zero_sform.set_data_shape((32, 32, 32))
    zero_sform.set_data_dtype(np.float32)
    zero_sform.set_qform(AFF, code=1)
    for row in ("srow_x", "srow_y", "srow_z"):
        zero_sform[row] = 0
    zero_sform["sform_code"] = 1
    nib.save(nib.Nifti1Image(_vol(), None, header=zero_sform), tmp / "zero_sform.nii.gz")
    os.symlink("/dev/zero", tmp / "zero.nii")
    os.mkfifo(tmp / "fifo.nii.gz")
    (tmp / "alias.yaml").write_text("base: vqvae3d-cpu\ntrain:\n  a: &x [1, 2]\n  b: *x\n")
    with open(tmp / "codes_bomb.npz", "wb") as f:  # a member header declaring 2^40 int64 codes
        import zipfile

        with zipfile.ZipFile(f, "w") as z:
            head = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.int64))
            head["shape"] = (1 << 40,)
            buf = __import__("io").BytesIO()
            np.lib.format.write_array_header_1_0(buf, head)
            z.writestr("indices.npy", buf.getvalue())


CASES = [
    (["encode", "{tmp}/zero_affine.nii.gz", "-o", "{tmp}/c.npz"], "its sform is all zeros although"),
    (["encode", "{tmp}/singular_affine.nii.gz", "-o", "{tmp}/c.npz"], "is singular"),
    (["reconstruct", "{tmp}/nan_affine.nii.gz", "-o", "{tmp}/r.nii.gz"], "matrix) is not finite"),
    (["score", "{tmp}/flat.nii.gz", "-o", "{tmp}/s.nii.gz"], "a 2D image or a single slice"),
    (["encode", "{tmp}/all_nan.nii.gz", "-o", "{tmp}/c.npz"], "holds no finite voxel"),
    (["encode", "{tmp}/bomb.nii.gz", "-o", "{tmp}/c.npz"], "1024x1024x1024 voxels"),
    (["reconstruct", "{tmp}/gzbomb.nii.gz", "-o", "{tmp}/r.nii.gz"], "decompresses to more than"),
    (["encode", "{tmp}/huge_voxels.nii.gz", "-o", "{tmp}/c.npz"], "resampled to"),
    (["encode", "{tmp}/complex.nii.gz", "-o", "{tmp}/c.npz"], "holds complex voxels (complex64)"),
    (["reconstruct", "{tmp}/zero_sform.nii.gz", "-o", "{tmp}/r.nii.gz"], "its sform is all zeros although"),
    (["encode", "{tmp}/zero.nii", "-o", "{tmp}/c.npz"], "is a device, not a regular file"),
    (["encode", "{tmp}/fifo.nii.gz", "-o", "{tmp}/c.npz"], "is a FIFO, not a regular file"),
    (["decode", "{tmp}/codes_bomb.npz", "-o", "{tmp}/d.nii.gz"], "above the"),
]


def _limited(args: list[str]) -> bool:
    """The bombs run in a process of their own under a memory limit."""
    return any(k in args[1] for k in ("bomb", "huge"))


@pytest.mark.parametrize("args, needle", [pytest.param(*c, marks=[pytest.mark.slow] if _limited(c[0]) else [])
                                          for c in CASES], ids=[c[0][1].split("/")[-1] for c in CASES])
def test_bad_images_are_one_line_and_touch_nothing(args: list[str], needle: str, tmp_path: Path,
                                                   trained_run: Path) -> None:
    _inputs(tmp_path)
    before = _snapshot(tmp_path, trained_run)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--run", str(trained_run), "--device", "cpu"]
    proc = _mrivq(*args, limit=_limited(args))
    _assert_one_line(proc, needle)
    assert _snapshot(tmp_path, trained_run) == before


TRAIN_CASES = [
    (["--set", "model.channels=abc"], "model.channels='abc' is not valid: it must be a list of integers >= 1"),
    (["--set", "train.batch_size=0"], "train.batch_size=0 is not valid: it must be an integer >= 1"),
    (["--set", "train.batchsize=2"], "did you mean batch_size?"),
    (["--set", "modle.channels=[8]"], "did you mean model?"),
    (["--set", "train.lr=-1"], "train.lr=-1 is not valid"),
    (["--set", "prior.model.positions=everywhere"], "one of null, none, axes, grid"),
    (["--config", "{tmp}/alias.yaml"], "anchors and aliases"),
]


@pytest.mark.parametrize("extra, needle", TRAIN_CASES, ids=[c[0][1].split("=")[0] for c in TRAIN_CASES])
def test_bad_config_values_are_refused_before_work(extra: list[str], needle: str, tmp_path: Path,
                                                  phantom_root: Path) -> None:
    _inputs(tmp_path)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    proc = _mrivq("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                  "--out", str(tmp_path / "run"), "--device", "cpu", *extra)
    _assert_one_line(proc, needle)
    assert not (tmp_path / "run").exists()


def test_set_on_resume_is_validated_too(trained_run: Path) -> None:
    before = _snapshot(trained_run)
    _assert_one_line(_mrivq("train", "--resume", "--out", str(trained_run), "--set", "train.val_evry=3"),
                     "did you mean val_every?")
    _assert_one_line(_mrivq("train", "--resume", "--out", str(trained_run), "--set", "train.val_every=0"),
                     "train.val_every=0 is not valid")
    assert _snapshot(trained_run) == before


def test_damaged_run_folders(trained_run: Path, tmp_path: Path) -> None:
    listed = tmp_path / "listed"
    shutil.copytree(trained_run, listed)
    (listed / "run.json").write_text("[1, 2]")
    _assert_one_line(_mrivq("synth", "--run", str(listed), "--out", str(tmp_path / "s")), "is not a JSON object")
    (listed / "run.json").write_text("{")
    _assert_one_line(_mrivq("synth", "--run", str(listed), "--out", str(tmp_path / "s")), "cannot be read")


def test_a_finished_run_is_not_rewritten_by_fewer_steps(trained_run: Path) -> None:
    before = _snapshot(trained_run)
    _assert_one_line(_mrivq("train", "--stage", "prior", "--run", str(trained_run), "--prior-max-steps", "1",
                            "--device", "cpu"), "fewer than the 6 steps the run's prior has already trained")
    assert _snapshot(trained_run) == before


def test_train_never_writes_into_a_users_folder(phantom_root: Path, tmp_path: Path) -> None:
    """`train --config DIR/config.yaml --out DIR` leaves the user's file as it was."""
    (tmp_path / "config.yaml").write_text("base: vqvae3d-cpu\ntrain:\n  batch_size: 2\n")
    before = _snapshot(tmp_path)
    proc = _mrivq("train", "--dataset", "phantom", "--root", str(phantom_root), "--config",
                  str(tmp_path / "config.yaml"), "--out", str(tmp_path), "--device", "cpu")
    _assert_one_line(proc, "exists and is not an mrivq run (it holds config.yaml)")
    assert _snapshot(tmp_path) == before


def test_a_run_in_use_is_refused(trained_run: Path) -> None:
    before = _snapshot(trained_run)
    with FileLock(str(trained_run / ".lock")):
        proc = _mrivq("train", "--resume", "--out", str(trained_run), "--device", "cpu")
    _assert_one_line(proc, "is in use by another `mrivq train`")
    assert _snapshot(trained_run) == before


def test_an_incomplete_run_is_named_and_resumes_from_scratch(trained_run: Path, phantom_root: Path,
                                                             tmp_path: Path) -> None:
    """A run stopped while preparing its data: run.json and config.yaml, no checkpoint yet."""
    run = tmp_path / "half"
    run.mkdir()
    shutil.copy(trained_run / "config.yaml", run / "config.yaml")
    info = json.loads((trained_run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({k: info[k] for k in ("created", "data_dir", "dataset",
                                                                   "modalities", "dims")}))
    args = ["train", "--dataset", "phantom", "--root", str(phantom_root), "--out", str(run), "--device", "cpu",
            "--max-steps", "2", "--prior-max-steps", "2"]
    res = invoke(*args)
    assert res.exit_code == 2 and "never completed a step" in res.output and "--resume" in res.output
    res = invoke(*args, "--resume")
    assert res.exit_code == 0, res.output
    assert (run / "checkpoints" / "prior_last.pt").is_file()


def test_nan_voxels_are_set_to_zero_with_a_warning(trained_run: Path, tmp_path: Path) -> None:
    vol = _vol()
    vol[3, 4, 5] = np.nan
    vol[6, 7, 8] = np.inf
    src = _nifti(tmp_path / "holes.nii.gz", vol)
    proc = _mrivq("reconstruct", str(src), "-o", str(tmp_path / "r.nii.gz"), "--run", str(trained_run),
                  "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "2 of 32768 voxels are NaN or Inf; they were set to 0" in proc.stderr
    assert [x for x in proc.stderr.splitlines() if "NaN" in x][0].startswith("warning:")
    assert np.isfinite(nib.load(tmp_path / "r.nii.gz").get_fdata()).all()


def test_synth_rerun_continues_an_interrupted_one(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    args = ("synth", "--run", str(trained_run), "--count", "3", "--out", str(out), "--device", "cpu")
    assert invoke(*args).exit_code == 0
    assert not (out / ".synth-in-progress.json").exists()
    full = _snapshot(out)
    # as left by an interruption after two samples: the third has its volume but no sidecar yet
    side = json.loads((out / "synth_0002.json").read_text())
    (out / "synth_0002.json").unlink()
    (out / "synth_0002.nii.gz").write_bytes(b"half-written")
    marker = {k: v for k, v in side.items() if k not in ("index", "class", "covariates", "class_name")}
    (out / ".synth-in-progress.json").write_text(json.dumps({**marker, "count": 3}))
    kept = {p: os.stat(p).st_mtime_ns for p in map(str, out.glob("synth_000[01].*"))}
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert "2 of 3 samples are already complete" in res.output
    assert _snapshot(out) == full  # the same sample, bytes and all
    assert {p: os.stat(p).st_mtime_ns for p in kept} == kept  # the finished ones were not rewritten
    # without the marker, a file that is not a complete sample is someone else's: refused
    (out / "synth_0002.json").unlink()
    res = invoke(*args)
    assert res.exit_code == 2 and "--overwrite" in res.output


@pytest.mark.parametrize("exc, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/x.pt"), "/data/run/x.pt: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out.nii.gz"), "check its permissions"),
    (MemoryError(), "out of memory"),
])
def test_the_boundary_turns_machine_errors_into_messages(exc: BaseException, needle: str) -> None:
    msg = user_message(exc)
    assert msg is not None and needle in msg and "\n" not in msg


def test_a_bug_keeps_its_traceback() -> None:
    assert user_message(ZeroDivisionError("x")) is None
    assert user_message(KeyError("x")) is None


def test_damaged_checkpoints_and_caches(trained_run: Path, tmp_path: Path) -> None:
    import torch

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    torch.save({"step": 3}, run / "checkpoints" / "vqvae_best.pt")
    _assert_one_line(_mrivq("synth", "--run", str(run), "--out", str(tmp_path / "s")), "holds no model weights")
    shutil.copy(trained_run / "checkpoints" / "prior_best.pt", run / "checkpoints" / "vqvae_best.pt")
    _assert_one_line(_mrivq("synth", "--run", str(run), "--out", str(tmp_path / "s")), "does not fit the run's model")
    shutil.copy(trained_run / "checkpoints" / "vqvae_best.pt", run / "checkpoints" / "vqvae_best.pt")
    (run / "codes" / "codes.pt").write_bytes(os.urandom(4096))
    _assert_one_line(_mrivq("synth", "--run", str(run), "--out", str(tmp_path / "s"), "--prior", "marginal"),
                     "codes.pt cannot be read")


def test_outputs_never_replace_a_runs_own_files(trained_run: Path, tmp_path: Path) -> None:
    src = _nifti(tmp_path / "in.nii.gz", _vol())
    before = _snapshot(trained_run)
    for target in ("checkpoints/vqvae_best.pt", "run.json"):
        _assert_one_line(_mrivq("reconstruct", str(src), "-o", str(trained_run / target), "--run", str(trained_run),
                                "--overwrite"), "is a file of run")
    _assert_one_line(_mrivq("encode", str(src), "-o", str(tmp_path / "codes.nii.gz"), "--run", str(trained_run)),
                     "must end in .npz")
    assert _snapshot(trained_run) == before


def test_synth_refuses_a_count_beyond_the_memory_budget(trained_run: Path, tmp_path: Path) -> None:
    _assert_one_line(_mrivq("synth", "--run", str(trained_run), "--count", "100000000", "--out", str(tmp_path / "s")),
                     "--count 100000000 needs")
    assert not (tmp_path / "s").exists()


def test_outputs_follow_the_users_umask(trained_run: Path, tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); the finished file gets the mode open() would give."""
    src = _nifti(tmp_path / "in.nii.gz", _vol())
    old = os.umask(0o027)
    try:
        assert invoke("encode", str(src), "-o", str(tmp_path / "c.npz"), "--run", str(trained_run),
                      "--device", "cpu").exit_code == 0
        assert invoke("synth", "--run", str(trained_run), "--count", "1", "--out", str(tmp_path / "s"),
                      "--device", "cpu").exit_code == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "c.npz", *sorted((tmp_path / "s").glob("synth_0000.*"))]:
        assert os.stat(p).st_mode & 0o777 == 0o640, p


@pytest.mark.slow
def test_ctrl_c_in_synth_keeps_finished_samples_and_a_rerun_continues(trained_run: Path, tmp_path: Path) -> None:
    """A real SIGINT to a running `mrivq synth`: one line, exit 130, every sample with a sidecar complete
    (volume and preview too), and the same command again finishes the rest without --overwrite."""
    import signal as sig

    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "mrivq", "synth", "--run", str(trained_run), "--count", "400", "--out", str(out),
           "--device", "cpu", "--batch-size", "400"]
    # a background CI job inherits SIGINT ignored, and Python then keeps ignoring it: restore the default
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: sig.signal(sig.SIGINT, sig.SIG_DFL))
    deadline = time.monotonic() + 240
    while not list(out.glob("synth_*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    said = [x for x in stderr.splitlines() if x.startswith("interrupted:")]  # beside the progress lines
    assert len(said) == 1 and "run the same command again" in said[0], stderr
    sidecars = sorted(out.glob("synth_*.json"))
    assert 0 < len(sidecars) < 400
    for side in sidecars:
        stem = side.name.removesuffix(".json")
        assert (out / f"{stem}.nii.gz").is_file() and (out / f"{stem}.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr
    assert f"{len(sidecars)} of 400 samples are already complete" in again.stderr + again.stdout
    assert len(list(out.glob("synth_*.json"))) == 400


@pytest.mark.parametrize("args,needle", [
    (["presets", "nosuch"], "unexpected extra argument"), (["nosuch"], "No such command 'nosuch'"),
    (["synth", "--count", "abc"], "Invalid value for '--count'"), (["--bogus"], "No such option: --bogus"),
    (["score"], "Missing argument"), (["datasets", "show"], "Missing argument 'name'"),
])
def test_command_line_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    proc = _mrivq(*args)
    _assert_one_line(proc, needle)
    assert "--help" in proc.stderr


def test_no_arguments_still_prints_the_help() -> None:
    proc = _mrivq()
    assert "Usage" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_a_damaged_prior_does_not_stop_commands_that_need_only_the_vqvae(trained_run: Path, phantom_root: Path,
                                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in ("prior_best.pt", "prior_last.pt"):
        (run / "checkpoints" / name).write_bytes(b"\x00" * 100)
    img = next((phantom_root / "phantom").glob("sub-*/sub-*_t1.nii.gz"))
    proc = _mrivq("encode", str(img), "-o", str(tmp_path / "c.npz"), "--run", str(run), "--device", "cpu")
    assert proc.returncode == 0 and (tmp_path / "c.npz").is_file(), proc.stderr
    assert "continuing without the prior" in proc.stderr and "Traceback" not in proc.stderr
    proc = _mrivq("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--device", "cpu")
    _assert_one_line(proc, "prior_best.pt cannot be read")


@pytest.mark.parametrize("seed", [str(2**63), str(-(2**63) - 1), str(10**30)])
def test_a_seed_beyond_64_bits_is_one_line(seed: str, trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    _assert_one_line(_mrivq("synth", "--run", str(trained_run), "--count", "1", "--seed", seed, "--out", str(out),
                            "--device", "cpu"), "outside the 64-bit range")
    assert not out.exists()
    src = _nifti(tmp_path / "x.nii.gz", _vol())
    _assert_one_line(_mrivq("score", str(src), "-o", str(tmp_path / "m.nii.gz"), "--heal", "--seed", seed,
                            "--run", str(trained_run), "--device", "cpu"), "outside the 64-bit range")
