"""``torchrun -m mrivq train`` on CPU with the gloo backend and 2 processes: the same model as one
process with the same global batch, resume under torchrun, and a failing rank that stops the job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed"),
              pytest.mark.slow]  # torchrun: several processes per test

SMALL = [*TINY, "--set", "prior.train.batch_size=4"]  # global batches that split over 2 ranks
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _fetch(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "mrivq", "fetch", "phantom", "--root", str(root), "--count", "6",
                    "--shape", "32", "32", "32", "--spacing", "6"], check=True, capture_output=True, env=ENV)


def _train(root: Path, out: Path, nproc: int, *extra: str, script: list[str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    entry = script or ["-m", "mrivq"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    if nproc > 1 and entry[0] == "-m":
        launcher += ["-m", entry[1]]
    else:
        launcher += entry
    cmd = [*launcher, "train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu",
           "--device", "cpu", "--out", str(out), *SMALL, *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=Path(__file__).parents[2])
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _models(run: Path) -> dict:
    return {st: torch.load(run / "checkpoints" / f"{st}_last.pt", weights_only=True)["model"]
            for st in ("vqvae", "prior")}


def _close(a: dict, b: dict) -> None:
    for st in a:
        assert a[st].keys() == b[st].keys()
        for k in a[st]:
            assert torch.allclose(a[st][k].double(), b[st][k].double(), atol=1e-5, rtol=1e-4), (st, k)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("ddp-data")
    _fetch(r)
    return r


@pytest.fixture(scope="module")
def one_process(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, 6 VQ-VAE and 4 prior steps."""
    run = tmp_path_factory.mktemp("ddp-one") / "one"
    _train(root, run, 1, "--max-steps", "6", "--prior-max-steps", "4")
    return run


def test_two_ranks_train_the_model_one_process_trains(root: Path, one_process: Path, tmp_path: Path) -> None:
    """Same global batch, each rank half of it: parameters equal within float tolerance, both stages;
    rank 0 alone writes (one metrics line per step)."""
    import json

    _train(root, tmp_path / "two", 2, "--max-steps", "6", "--prior-max-steps", "4")
    _close(_models(one_process), _models(tmp_path / "two"))
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [(x["stage"], x["step"]) for x in lines if "loss" in x]
    assert len(steps) == len(set(steps))
    # throughput counts the whole global batch
    one = [json.loads(x) for x in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert {x["step"] for x in lines if "voxels_per_s" in x} == {x["step"] for x in one if "voxels_per_s" in x}


def test_two_rank_run_resumes_under_torchrun(root: Path, tmp_path: Path) -> None:
    _train(root, tmp_path / "one", 1, "--max-steps", "4", "--prior-max-steps", "3")
    _train(root, tmp_path / "one", 1, "--resume", "--max-steps", "8", "--prior-max-steps", "5")
    _train(root, tmp_path / "two", 2, "--max-steps", "4", "--prior-max-steps", "3")
    _train(root, tmp_path / "two", 2, "--resume", "--max-steps", "8", "--prior-max-steps", "5")
    ck = torch.load(tmp_path / "two" / "checkpoints" / "vqvae_last.pt", weights_only=True)
    assert ck["step"] == 8 and len(ck["rng_ranks"]) == 2  # each rank's own generators, restored by each rank
    _close(_models(tmp_path / "one"), _models(tmp_path / "two"))


def test_batch_that_does_not_split_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    res = _train(root, tmp_path / "odd", 2, "--max-steps", "2", "--set", "train.batch_size=3", check=False)
    assert res.returncode != 0
    assert "train.batch_size=3 does not split over 2 processes" in res.stderr
    assert "preprocessing" not in res.stderr, "refused before any data is prepared"
    assert "/mrivq/" not in res.stderr, "a traceback through mrivq (torchrun's own summary is expected)"


def test_a_batch_larger_than_the_set_is_capped_to_split_over_the_ranks(root: Path, tmp_path: Path) -> None:
    """5 training subjects, batch 8, 2 ranks: each step takes 4 (2 per rank) instead of refusing 5."""
    res = _train(root, tmp_path / "small", 2, "--max-steps", "2", "--prior-max-steps", "1",
                 "--set", "train.batch_size=8")
    assert res.returncode == 0
    assert torch.load(tmp_path / "small" / "checkpoints" / "vqvae_last.pt", weights_only=True)["step"] == 2


def test_a_failing_rank_stops_the_others(root: Path, tmp_path: Path) -> None:
    """Rank 1 fails at its third batch; rank 0 must not wait for it for ever, and the job names it."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys\n"
        "import mrivq.data.split as S\n"
        "from mrivq.utils.errors import MrivqError\n"
        "calls = {'n': 0}\n"
        "orig = S.collate_items\n"
        "def failing(*a, **k):\n"
        "    calls['n'] += 1\n"
        "    if os.environ['RANK'] == '1' and calls['n'] == 3:\n"
        "        raise MrivqError('injected failure')\n"
        "    return orig(*a, **k)\n"
        "S.collate_items = failing\n"
        "from mrivq.cli.app import main\n"
        "sys.argv = ['mrivq', *sys.argv[1:]]\n"
        "main()\n")
    res = _train(root, tmp_path / "fail", 2, "--max-steps", "40", script=[str(driver)], check=False)
    assert res.returncode != 0
    assert "rank 1: injected failure" in res.stderr
    ck = tmp_path / "fail" / "checkpoints" / "vqvae_last.pt"
    assert not ck.exists() or torch.load(ck, weights_only=True)["step"] < 40


def test_sigterm_to_torchrun_stops_every_rank_with_a_checkpoint_and_resumes(root: Path, tmp_path: Path) -> None:
    """torchrun forwards SIGTERM to its workers: every rank stops at the same step, rank 0 writes the
    checkpoint, and ``--resume`` under torchrun ends where the uninterrupted 2-rank run ends."""
    import json
    import signal
    import time

    args = ["--stage", "vqvae", "--max-steps", "120", "--set", "train.log_every=1", "--set", "train.ckpt_every=1000"]
    _train(root, tmp_path / "full", 2, *args)
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mrivq",
           "train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu", "--device", "cpu",
           "--out", str(cut), *SMALL, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=Path(__file__).parents[2])
    metrics, deadline = cut / "metrics.jsonl", time.time() + 240
    while time.time() < deadline:
        lines = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
        if any(x.get("step", 0) >= 10 and "loss" in x for x in lines):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    step = torch.load(cut / "checkpoints" / "vqvae_last.pt", weights_only=True)["step"]
    assert 10 <= step < 120, "the signal should arrive mid-run"
    assert f"vqvae interrupted at step {step}; checkpoint written" in stderr
    _train(root, cut, 2, "--resume", *args)
    a = torch.load(tmp_path / "full" / "checkpoints" / "vqvae_last.pt", weights_only=True)["model"]
    b = torch.load(cut / "checkpoints" / "vqvae_last.pt", weights_only=True)["model"]
    _close({"vqvae": a}, {"vqvae": b})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_the_model_one_process_trains(root: Path, one_process: Path, tmp_path: Path) -> None:
    """``--nnodes=2`` with c10d rendezvous: two launchers (here on one machine, sharing the file system
    as a cluster's nodes share theirs), one process each, give the 1-process model."""
    port = _free_port()
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mrivq-test", "-m", "mrivq",
             "train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu", "--device", "cpu",
             "--out", str(tmp_path / "nodes"), *SMALL, "--max-steps", "6", "--prior-max-steps", "4"]
            for i in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                              cwd=Path(__file__).parents[2]) for c in cmds]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    _close(_models(one_process), _models(tmp_path / "nodes"))


def test_two_ranks_train_the_maskgit_prior_one_process_trains(root: Path, tmp_path: Path) -> None:
    """The masks of a step are drawn for the global batch and split like it."""
    mg = ["--set", "prior.model.family=maskgit"]
    _train(root, tmp_path / "one", 1, "--max-steps", "2", "--prior-max-steps", "3", *mg)
    _train(root, tmp_path / "two", 2, "--max-steps", "2", "--prior-max-steps", "3", *mg)
    _close(_models(tmp_path / "one"), _models(tmp_path / "two"))
