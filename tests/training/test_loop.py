"""The shared training loop: resume on another device, AMP modes, scaler changes, metrics after resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mrivq.training.loop import LoopConfig, run_loop
from mrivq.utils.device import amp_dtype
from mrivq.utils.errors import MrivqError


class Crash(Exception):
    pass


def _fit(run_dir: Path, total: int, *, device: str = "cpu", resume: bool = False, amp: str = "off",
         crash_at: int | None = None, ckpt_every: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(64, 4)

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        if step == crash_at:
            raise Crash
        x = data[torch.randint(0, 64, (8,))]  # draws from the torch RNG: resume must restore it
        return model(x).pow(2).mean(), {}

    lc = LoopConfig(stage="toy", run_dir=run_dir, total_steps=total, lr=0.01, val_every=1000,
                    ckpt_every=ckpt_every, log_every=1, amp=amp, best_key="none")
    run_loop(lc, model, torch.device(device), step_fn, lambda: {"val": 0.0}, resume=resume)
    return model


def test_resume_loads_rng_states_on_the_cpu_whatever_the_device(tmp_path: Path) -> None:
    """The checkpoint is loaded on the CPU whatever the device: with map_location=device the RNG states
    would land on the GPU, where torch.set_rng_state rejects them. The meta device stands in for the GPU
    here: the loop must load the checkpoint on the CPU and resume exactly."""
    full = _fit(tmp_path / "full", 6)
    with pytest.raises(Crash):
        _fit(tmp_path / "cut", 6, crash_at=4)
    cut = _fit(tmp_path / "cut", 6, device="meta", resume=True)
    assert torch.equal(full.weight, cut.weight) and torch.equal(full.bias, cut.bias)


def test_each_rank_resumes_its_own_rng_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint keeps every rank's RNG state (``rng_ranks``); on resume each rank takes its own, and
    a checkpoint of another world size (or of one process) gives rank 0's."""
    from mrivq.training.loop import own_rng_state
    from mrivq.utils import distributed as ddp

    _fit(tmp_path / "r", 3)
    ck = torch.load(tmp_path / "r" / "checkpoints" / "toy_last.pt", weights_only=True)
    assert len(ck["rng_ranks"]) == 1 and torch.equal(ck["rng_ranks"][0]["torch"], ck["rng"]["torch"])
    states = [{"torch": torch.full((4,), r, dtype=torch.uint8)} for r in range(3)]
    ck3 = {"rng": states[0], "rng_ranks": states}
    for rank in range(3):
        monkeypatch.setattr(ddp, "world", lambda: 3)
        monkeypatch.setattr(ddp, "rank", lambda rank=rank: rank)
        assert own_rng_state(ck3) is states[rank]
    monkeypatch.setattr(ddp, "world", lambda: 2)
    assert own_rng_state(ck3) is states[0] and own_rng_state({"rng": states[1]}) is states[1]


def test_metrics_after_resume_have_each_step_once(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        _fit(tmp_path, 6, crash_at=4)  # steps 1-4 logged, checkpoint at 3
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4]
    _fit(tmp_path, 6, resume=True)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3, 4, 5, 6]


def test_fp32_checkpoint_resumes_under_fp16_with_a_grad_scaler(tmp_path: Path) -> None:
    """A checkpoint saved without a GradScaler (fp32/bf16) resumes with one (fp16), and back."""
    _fit(tmp_path, 3)
    m = _fit(tmp_path, 6, resume=True, amp="fp16")
    ck = torch.load(tmp_path / "checkpoints" / "toy_last.pt", weights_only=True)
    assert ck["step"] == 6 and ck["scaler"], "the fp16 steps ran with a grad scaler"
    assert torch.isfinite(m.weight).all()
    _fit(tmp_path, 8, resume=True, amp="off")


def test_bf16_loop_runs_on_cpu(tmp_path: Path) -> None:
    m = _fit(tmp_path, 4, amp="bf16")
    assert m.weight.dtype == torch.float32 and torch.isfinite(m.weight).all()


def test_amp_auto_avoids_emulated_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """V100 and T4 only emulate bf16: ``auto`` picks fp16 there, bf16 on Ampere and later, nothing on CPU."""
    native = {"value": False}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native["value"])
    assert amp_dtype(torch.device("cuda"), "auto") == torch.float16
    native["value"] = True
    assert amp_dtype(torch.device("cuda"), "auto") == torch.bfloat16
    assert amp_dtype(torch.device("cpu"), "auto") is None
    assert amp_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert amp_dtype(torch.device("cuda"), "off") is None
    with pytest.raises(MrivqError, match="train.amp='fp8'"):
        amp_dtype(torch.device("cpu"), "fp8")


def test_best_checkpoint_is_chosen_from_best_from_on(tmp_path: Path) -> None:
    """With ``best_from`` (the adversarial stage 1), an earlier, better-scoring validation never becomes
    the best checkpoint."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    scores = iter([9.0, 1.0, 2.0])  # validations at steps 2, 4, 6: the first scores best

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        return model(torch.ones(1, 2)).pow(2).mean(), {}

    lc = LoopConfig(stage="toy", run_dir=tmp_path, total_steps=6, lr=0.01, val_every=2, ckpt_every=6,
                    log_every=1, amp="off", best_key="score", best_from=3)
    run_loop(lc, model, torch.device("cpu"), step_fn, lambda: {"score": next(scores)})
    best = torch.load(tmp_path / "checkpoints" / "toy_best.pt", weights_only=True)
    assert best["step"] == 6 and best["best"] == 2.0


@pytest.mark.parametrize("key,value", [("workers", -1), ("workers", "many"), ("cache_workers", 0)])
def test_loader_and_cache_worker_counts_are_checked(key: str, value: object) -> None:
    from mrivq.data.split import fill_workers
    from mrivq.training.vqvae import loader_workers

    with pytest.raises(MrivqError, match=f"train.{key}="):
        if key == "workers":
            loader_workers({"workers": value}, torch.device("cpu"))
        else:
            fill_workers(value)
    assert loader_workers({"workers": "auto"}, torch.device("cpu")) == 0 and fill_workers("auto") >= 1
