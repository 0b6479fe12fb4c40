"""One-shot check of every CUDA path of mrivq, for a machine with a GPU; prints one JSON object.

Run it from a checkout on a machine with one CUDA GPU (it takes about 5 minutes on an H200 and stops
itself at 7.5; CI never runs it, and nothing in the test suite calls it)::

    python benchmarks/gpu_check.py --out gpu.json

Progress goes to stderr, the JSON to stdout (and to ``--out``). Every check is a key of the JSON with its
figures, or ``"error": "Type: message"`` (with the tail of the command's stderr where a command failed),
or ``"skipped": ...``; one failing check never stops the others. The checks (run in this order, except
``torchrun_1gpu``, which runs last so that a hanging launcher cannot starve the in-process measurements):

- ``phantom``: ``mrivq fetch phantom`` writes the synthetic dataset the other checks train on;
- ``train_fp32``, ``train_bf16``: ``mrivq train`` (preset vqvae3d-cpu and its prior, 40 + 40 steps) on
  CUDA with ``train.amp=off`` and ``bf16``: wall seconds, steps/s, last ``val_psnr`` and
  ``val_nats_per_token`` from the run's ``metrics.jsonl``, whether every logged loss is finite;
- ``resume_cuda``: SIGTERM a CUDA training run once ``metrics.jsonl`` shows VQ-VAE step 10 (exit code 130,
  checkpoint written), ``--resume`` it to the end, then continue its prior with ``--stage prior --run``
  (this path once crashed on CUDA: RNG states were loaded onto the GPU);
- ``torchrun_1gpu``: the same tiny run under ``python -m torch.distributed.run --standalone
  --nproc_per_node=1 -m mrivq train``;
- ``throughput_vs_monai``: in-process stage-1 training steps/s, voxels/s and peak memory of mrivq's VQVAE
  against ``monai.networks.nets.VQVAE`` at the same architecture as ``benchmarks/vqvae.py`` builds them,
  batch 4 of 1x96x112x96, fp32 and bf16 autocast, after warm-up;
- ``prior_sampling``: mrivq's cached sampler on a GatedPixelCNN with the prior3d-t1 preset's architecture
  at latent grids 12^3 and 16^3, batch 1 and 32: seconds, codes/s, peak memory; plus whether the cached
  and the reference sampler draw the same codes on the GPU (a 4^3 grid);
- ``peak_memory``: the peak-memory figures above in one place (``torch.cuda.max_memory_allocated``).

Without a visible CUDA GPU it prints ``{"cuda": false, "message": ...}`` with the machine's description
and exits 0. ``--cpu-dry-run`` runs the same checks on the CPU with tiny sizes and steps (about 3 minutes
on 2 cores), to check the script itself on a machine without CUDA::

    python benchmarks/gpu_check.py --cpu-dry-run --work /tmp/gpucheck
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
for _p in (str(REPO), str(BENCH)):  # run from a checkout; benchmarks/vqvae.py's helpers beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

MARKER = ".mrivq-gpu-check"  # written into --work; only a folder holding it is cleaned on a rerun
TAIL_CHARS = 2000


def log(*a: Any) -> None:
    print("[gpu_check]", *a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ plan: sizes per mode

@dataclass
class Plan:
    """Sizes and steps of every check, for the GPU run or the CPU dry run."""

    device: str
    budget_s: float
    phantom: list[str]
    train_sets: list[str] = field(default_factory=list)
    steps: int = 40
    prior_steps: int = 40
    resume_steps: int = 60
    resume_prior_steps: int = 20
    resume_signal_at: int = 10
    resume_sets: list[str] = field(default_factory=list)
    torchrun_steps: int = 20
    tp_shape: tuple[int, int, int] = (96, 112, 96)
    tp_batch: int = 4
    tp_warmup: int = 5
    tp_steps: int = 30
    tp_max_s: float = 12.0
    grids: tuple[int, ...] = (12, 16)
    batches: tuple[int, ...] = (1, 32)
    check_grid: int = 4
    train_timeout: float = 120.0


def gpu_plan() -> Plan:
    return Plan(device="cuda", budget_s=450.0, phantom=["--count", "12"])


def dry_plan() -> Plan:
    tiny = ["data.shape=[32,32,32]", "data.spacing=[6.0,6.0,6.0]", "model.channels=[8,16]",
            "model.num_res_channels=[8,16]", "prior.model.channels=8", "prior.model.num_layers=2",
            "train.log_every=2", "prior.train.log_every=2"]
    return Plan(device="cpu", budget_s=170.0, phantom=["--count", "6", "--shape", "32", "32", "32", "--spacing", "6"],
                train_sets=tiny, steps=6, prior_steps=6, resume_steps=8, resume_prior_steps=4, resume_signal_at=4,
                torchrun_steps=4, tp_shape=(16, 16, 16), tp_batch=2,
                tp_warmup=1, tp_steps=3, tp_max_s=5.0, grids=(6,), batches=(1, 2), check_grid=2,
                train_timeout=120.0)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ------------------------------------------------------------------ small helpers

def tail(path: Path, n: int = TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:].strip()


def key_lines(path: Path, n: int = 8) -> list[str]:
    """The stderr lines that name an error (under torchrun the tail is its summary, the cause is above)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    keep = [ln.strip()[:400] for ln in lines
            if any(w in ln for w in ("error", "Error", "Traceback", "Exception", "exitcode"))
            and "elastic/errors.html" not in ln and "error_file" not in ln]
    return list(dict.fromkeys(keep))[-n:]


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def jsonable(x: Any) -> Any:
    """NaN/inf as strings (plain JSON has no such numbers); tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None


def sub_env() -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """End the process group this script started for ``proc``: TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Done:
    rc: int | None
    seconds: float
    timed_out: bool
    stdout: Path
    stderr: Path

    def failure(self, what: str) -> dict:
        why = "timed out" if self.timed_out else f"exit code {self.rc}"
        return {"error": f"CommandFailed: {what} {why}", "error_lines": key_lines(self.stderr),
                "stderr_tail": tail(self.stderr),
                "stdout_tail": tail(self.stdout, 600)}


class Runner:
    """Starts commands (argument lists, never shell strings) in a process group of their own with stdout/stderr in
    log files, each with a timeout capped by the time budget; on a timeout the whole group is ended (so
    torchrun's workers do not outlive it)."""

    def __init__(self, work: Path, budget: Budget) -> None:
        self.work, self.budget = work, budget
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands: dict[str, list[str]] = {}

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path, Path]:
        out, err = self.logs / f"{name}.stdout", self.logs / f"{name}.stderr"
        self.commands[name] = args
        log(f"$ {shlex.join(args)}")
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen(args, cwd=self.work, env=sub_env(), stdout=fo, stderr=fe,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return proc, out, err

    def timeout(self, limit: float) -> float:
        return max(5.0, min(limit, self.budget.left()))

    def wait(self, proc: subprocess.Popen, out: Path, err: Path, t0: float, limit: float) -> Done:
        timed_out = False
        try:
            proc.wait(timeout=max(1.0, self.timeout(limit) - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
        except BaseException:  # Ctrl-C: take the children down too
            kill_group(proc)
            raise
        return Done(proc.returncode, round(time.perf_counter() - t0, 2), timed_out, out, err)

    def run(self, name: str, args: list[str], limit: float) -> Done:
        t0 = time.perf_counter()
        proc, out, err = self.start(name, args)
        return self.wait(proc, out, err, t0, limit)


def mrivq_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mrivq", *args]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    recs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except ValueError:  # a line being written
                continue
    return recs


def summarize_metrics(run_dir: Path) -> dict:
    """Per stage: last step, logged losses finite, first/last loss, steps/s between the first and the last
    logged training step, last validation figure and throughput, and whether each step is logged once."""
    recs = read_metrics(run_dir)
    out: dict[str, Any] = {}
    for stage, val_key, rate_key in (("vqvae", "val_psnr", "voxels_per_s"), ("prior", "val_nats_per_token",
                                                                              "items_per_s")):
        rs = [r for r in recs if r.get("stage") == stage]
        if not rs:
            out[stage] = None
            continue
        trains = [r for r in rs if "loss" in r]
        losses = [r["loss"] for r in trains]
        vals = [r[val_key] for r in rs if val_key in r]
        s: dict[str, Any] = {
            "last_step": max(int(r.get("step", 0)) for r in rs),
            "losses_finite": bool(losses) and all(finite(v) for v in losses),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            val_key: vals[-1] if vals else None,
            rate_key: trains[-1].get(rate_key) if trains else None,
            "train_lines_unique_steps": len({r["step"] for r in trains}) == len(trains),
        }
        if len(trains) >= 2 and trains[-1]["time"] > trains[0]["time"]:
            span = trains[-1]["time"] - trains[0]["time"]
            s["steps_per_s"] = round((trains[-1]["step"] - trains[0]["step"]) / span, 2)
        out[stage] = s
    return out


def ckpt_step(path: Path) -> int | None:
    if not path.is_file():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


# ------------------------------------------------------------------ the checks

class Checks:
    def __init__(self, plan: Plan, work: Path, budget: Budget) -> None:
        self.plan, self.work, self.budget = plan, work, budget
        self.runner = Runner(work, budget)
        self.data = work / "data"
        self.runs = work / "runs"
        self.dev = torch.device(plan.device)

    def train_args(self, name: str, steps: int, prior_steps: int,
                   extra_sets: tuple[str, ...] | list[str] = ()) -> list[str]:
        args = ["train", "--dataset", "phantom", "--root", str(self.data), "--preset", "vqvae3d-cpu",
                "--device", self.plan.device, "--out", str(self.runs / name), "--max-steps", str(steps),
                "--prior-max-steps", str(prior_steps)]
        for s in [*self.plan.train_sets, *extra_sets]:
            args += ["--set", s]
        return args

    # 1
    def phantom(self) -> dict:
        d = self.runner.run("phantom", mrivq_cmd("fetch", "phantom", "--root", str(self.data), *self.plan.phantom),
                            120)
        if d.rc != 0:
            return d.failure("mrivq fetch phantom")
        manifest = self.data / "phantom" / "manifest.csv"
        rows = max(0, len(manifest.read_text().splitlines()) - 1) if manifest.is_file() else 0
        return {"ok": rows > 0, "wall_s": d.seconds, "manifest_rows": rows, "options": self.plan.phantom}

    # 2
    def train(self, name: str, amp: str) -> dict:
        p = self.plan
        args = self.train_args(name, p.steps, p.prior_steps, [f"train.amp={amp}", f"prior.train.amp={amp}"])
        d = self.runner.run(name, mrivq_cmd(*args), p.train_timeout)
        m = summarize_metrics(self.runs / name)
        res: dict[str, Any] = {"amp": amp, "wall_s": d.seconds, "exit_code": d.rc, "steps": p.steps,
                               "prior_steps": p.prior_steps, "metrics": m}
        if d.rc != 0:
            return {**d.failure(f"mrivq train (amp {amp})"), **res}
        vq, pr = m.get("vqvae") or {}, m.get("prior") or {}
        res["val_psnr"], res["val_nats_per_token"] = vq.get("val_psnr"), pr.get("val_nats_per_token")
        res["losses_finite"] = bool(vq.get("losses_finite")) and bool(pr.get("losses_finite"))
        res["ok"] = (res["losses_finite"] and finite(res["val_psnr"]) and finite(res["val_nats_per_token"])
                     and vq.get("last_step") == p.steps and pr.get("last_step") == p.prior_steps)
        return res

    # 3
    def resume(self) -> dict:
        p, name = self.plan, "resume"
        run_dir = self.runs / name
        args = mrivq_cmd(*self.train_args(name, p.resume_steps, p.resume_prior_steps, p.resume_sets))
        res: dict[str, Any] = {"steps": p.resume_steps, "prior_steps": p.resume_prior_steps,
                               "signal_at_logged_step": p.resume_signal_at}
        t0 = time.perf_counter()
        proc, out, err = self.runner.start("resume_1_interrupted", args)
        seen, sent = 0, None
        try:
            while proc.poll() is None and time.perf_counter() - t0 < self.runner.timeout(p.train_timeout):
                steps = [int(r.get("step", 0)) for r in read_metrics(run_dir) if r.get("stage") == "vqvae"]
                seen = max(steps, default=0)
                if seen >= p.resume_signal_at:
                    proc.send_signal(signal.SIGTERM)
                    sent = seen
                    break
                time.sleep(0.05)
        except BaseException:
            kill_group(proc)
            raise
        d1 = self.runner.wait(proc, out, err, t0, p.train_timeout)
        res["interrupted"] = {"signal_sent_at_logged_step": sent, "exit_code": d1.rc, "wall_s": d1.seconds,
                              "checkpoint_step": ckpt_step(run_dir / "checkpoints" / "vqvae_last.pt")}
        if sent is None:
            return {"error": f"NotInterrupted: the run never logged vqvae step >= {p.resume_signal_at} (last "
                             f"seen {seen}; exit code {d1.rc}, timed out {d1.timed_out})",
                    "stderr_tail": tail(d1.stderr), **res}
        if d1.rc != 130:
            return {"error": f"WrongExitCode: the run sent SIGTERM at logged step {sent} exited with {d1.rc}, not 130",
                    "stderr_tail": tail(d1.stderr), **res}
        d2 = self.runner.run("resume_2_resumed", args + ["--resume"], p.train_timeout)
        vq_step = ckpt_step(run_dir / "checkpoints" / "vqvae_last.pt")
        pr_step = ckpt_step(run_dir / "checkpoints" / "prior_last.pt")
        m = summarize_metrics(run_dir)
        res["resumed"] = {"exit_code": d2.rc, "wall_s": d2.seconds, "vqvae_last_step": vq_step,
                          "vqvae_last_step_equals_max_steps": vq_step == p.resume_steps, "prior_last_step": pr_step,
                          "metrics": m}
        if d2.rc != 0:
            return {**d2.failure("mrivq train --resume"), **res}
        more = p.resume_prior_steps + max(2, p.resume_prior_steps // 2)
        d3 = self.runner.run("resume_3_stage_prior", mrivq_cmd(
            "train", "--stage", "prior", "--run", str(run_dir), "--prior-max-steps", str(more),
            "--device", p.device), p.train_timeout)
        pr_step2 = ckpt_step(run_dir / "checkpoints" / "prior_last.pt")
        res["stage_prior_continued"] = {"exit_code": d3.rc, "wall_s": d3.seconds, "prior_max_steps": more,
                                        "prior_last_step": pr_step2}
        if d3.rc != 0:
            return {**d3.failure("mrivq train --stage prior --run"), **res}
        unique = all((s or {}).get("train_lines_unique_steps", True) for s in summarize_metrics(run_dir).values())
        res["metrics_steps_logged_once"] = unique
        res["ok"] = vq_step == p.resume_steps and pr_step == p.resume_prior_steps and pr_step2 == more and unique
        if not res["ok"]:
            res["error"] = (f"CheckFailed: checkpoint steps vqvae {vq_step} (want {p.resume_steps}), prior {pr_step} "
                            f"(want {p.resume_prior_steps}) then {pr_step2} (want {more}); steps logged once: "
                            f"{unique}")
        return res

    # 4
    def torchrun(self) -> dict:
        p, name = self.plan, "torchrun"
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "mrivq",
                *self.train_args(name, p.torchrun_steps, p.torchrun_steps)]
        d = self.runner.run(name, args, p.train_timeout)
        m = summarize_metrics(self.runs / name)
        res: dict[str, Any] = {"wall_s": d.seconds, "exit_code": d.rc, "steps": p.torchrun_steps, "metrics": m}
        info = self.runs / name / "run.json"
        if info.is_file():
            try:
                ri = json.loads(info.read_text())
                res["run_json_distributed"] = {k: v for k, v in ri.items()
                                               if any(w in k.lower() for w in ("world", "rank", "distributed", "ddp"))}
            except ValueError:
                pass
        warned = [ln.strip()[:300] for ln in tail(d.stderr, 200_000).splitlines() if "Warning" in ln]
        res["stderr_warnings"] = list(dict.fromkeys(warned))[:6]  # e.g. DDP's, once each
        res["stderr_mentions_ddp"] = "DistributedDataParallel" in tail(d.stderr, 200_000)
        if d.rc != 0:
            return {**d.failure("torchrun --nproc_per_node=1 -m mrivq train"), **res}
        vq, pr = m.get("vqvae") or {}, m.get("prior") or {}
        res["val_psnr"], res["val_nats_per_token"] = vq.get("val_psnr"), pr.get("val_nats_per_token")
        res["ok"] = (vq.get("last_step") == p.torchrun_steps and pr.get("last_step") == p.torchrun_steps
                     and bool(vq.get("losses_finite")) and bool(pr.get("losses_finite")))
        return res

    # 5
    def throughput(self) -> dict:
        import monai
        import vqvae as bench  # benchmarks/vqvae.py: build() and load_volumes() of its MONAI comparison

        p, dev = self.plan, self.dev
        vols, source = bench.load_volumes(p.tp_batch, 0, p.tp_shape)
        x = vols.to(dev)
        voxels = p.tp_batch * math.prod(p.tp_shape)
        res: dict[str, Any] = {
            "input": [p.tp_batch, 1, *p.tp_shape], "data": source, "warmup_steps": p.tp_warmup,
            "architecture": "benchmarks/vqvae.py build(): channels (32, 64), num_res_layers 2, num_res_channels "
                            "(32, 64), 512 codes, embedding_dim 64 (both models), Adam lr 1e-3 with 50 warm-up "
                            "steps, grad clip 1; MONAI's EMA decay 0.99",
            "monai": monai.__version__, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "results": {}}
        for model_name, label in (("mrivq", "mrivq"), ("monai-decay0.99", "monai")):
            for prec in ("fp32", "bf16"):
                key = f"{label}_{prec}"
                if self.budget.left() < p.tp_max_s + 5:
                    res["results"][key] = {"skipped": "time budget"}
                    continue
                try:
                    res["results"][key] = self._train_speed(bench.build(model_name, {}), x, prec, voxels)
                except Exception as e:  # one configuration failing must not stop the others
                    res["results"][key] = {"error": err_text(e)}
                    log(f"throughput {key}: {err_text(e)}")
                finally:
                    reset_peak(dev)
                log(f"throughput {key}: {res['results'][key]}")
        r = res["results"]
        for prec in ("fp32", "bf16"):
            a, b = r.get(f"mrivq_{prec}", {}), r.get(f"monai_{prec}", {})
            if "steps_per_s" in a and "steps_per_s" in b:
                res[f"mrivq_over_monai_speed_{prec}"] = round(a["steps_per_s"] / b["steps_per_s"], 3)
        errors = [k for k, v in r.items() if "error" in v]
        res["ok"] = not errors and all("steps_per_s" in v for v in r.values())
        if errors:
            res["error"] = "ConfigFailed: " + "; ".join(f"{k}: {r[k]['error']}" for k in errors)
        return res

    def _train_speed(self, model: torch.nn.Module, x: torch.Tensor, prec: str, voxels: int) -> dict:
        p, dev = self.plan, self.dev
        torch.manual_seed(0)
        reset_peak(dev)
        model = model.to(dev).train()
        lr, warmup = 1e-3, 50
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        dtype = torch.bfloat16 if prec == "bf16" else None
        losses: list[float] = []
        done = [0]

        def step() -> torch.Tensor:
            for group in opt.param_groups:  # linear warm-up, as benchmarks/vqvae.py and mrivq train do
                group["lr"] = lr * min(1.0, (done[0] + 1) / warmup)
            done[0] += 1
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                x_hat, vq_loss = model(x)
                loss = F.mse_loss(x_hat.float(), x) + vq_loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss.detach()

        t0 = time.perf_counter()
        for _ in range(p.tp_warmup):
            losses.append(float(step()))
        sync(dev)
        warm = time.perf_counter() - t0
        n, t0 = 0, time.perf_counter()
        last = []
        while n < p.tp_steps and (n < 3 or time.perf_counter() - t0 < p.tp_max_s):
            last.append(step())
            n += 1
        sync(dev)
        dt = time.perf_counter() - t0
        losses += [float(v) for v in last]
        out = {"steps_timed": n, "seconds": round(dt, 3), "steps_per_s": round(n / dt, 3),
               "voxels_per_s": round(n * voxels / dt), "warmup_s": round(warm, 2), "peak_memory_mb": peak_mb(dev),
               "losses_finite": all(math.isfinite(v) for v in losses), "first_loss": round(losses[0], 5),
               "last_loss": round(losses[-1], 5),
               "parameters": sum(q.numel() for q in model.parameters())}
        return out  # model and optimizer go with this frame

    # 6
    def sampling(self) -> dict:
        from mrivq.config.presets import load_preset
        from mrivq.inference.sampling import sample_tokens
        from mrivq.models.pixelcnn import GatedPixelCNN

        p, dev = self.plan, self.dev
        arch = dict(load_preset("prior3d-t1")["prior"]["model"])
        codes = int(load_preset("vqvae3d-t1").get("model", {}).get("num_embeddings", 512))

        def make(size: int) -> GatedPixelCNN:
            torch.manual_seed(0)
            return GatedPixelCNN(3, codes, latent_shape=(size,) * 3, **arch).to(dev).eval()

        res: dict[str, Any] = {"prior": {**arch, "num_embeddings": codes, "preset": "prior3d-t1"},
                               "sampler": "mrivq.sample_tokens(cached=True), seed 0, random-init prior",
                               "results": []}
        g = p.check_grid
        small = make(g)
        res["prior"]["parameters_at_check_grid"] = sum(q.numel() for q in small.parameters())
        t0 = time.perf_counter()
        fast = sample_tokens(small, (g,) * 3, 2, seed=0)  # also the warm-up
        sync(dev)
        res["warmup_s"] = round(time.perf_counter() - t0, 3)
        slow = sample_tokens(small, (g,) * 3, 2, seed=0, cached=False)
        res[f"cached_equals_reference_{g}^3_b2"] = bool(torch.equal(fast.cpu(), slow.cpu()))
        del small
        per_code: dict[int, float] = {}  # batch -> seconds per position, to predict the next grid
        errors = []
        for size in p.grids:
            prior = make(size)
            n_pos = size ** 3
            for b in p.batches:
                row: dict[str, Any] = {"latent": [size] * 3, "batch": b}
                guess = per_code.get(b, 0.0) * n_pos
                if self.budget.left() < guess * 1.5 + 5:
                    row["skipped"] = f"time budget (predicted {guess:.0f} s, {self.budget.left():.0f} s left)"
                    res["results"].append(row)
                    continue
                try:
                    reset_peak(dev)
                    t0 = time.perf_counter()
                    tok = sample_tokens(prior, (size,) * 3, b, seed=0)
                    sync(dev)
                    dt = time.perf_counter() - t0
                    per_code[b] = dt / n_pos
                    row.update(seconds=round(dt, 3), codes_per_s=round(b * n_pos / dt, 1),
                               ms_per_position=round(1e3 * dt / n_pos, 4), peak_memory_mb=peak_mb(dev),
                               tokens_in_range=bool(tok.min() >= 0 and tok.max() < codes))
                except Exception as e:  # the other sizes still run
                    row["error"] = err_text(e)
                    errors.append(f"{size}^3 b{b}: {err_text(e)}")
                log(f"sampling {size}^3 b={b}: {row}")
                res["results"].append(row)
            del prior
            reset_peak(dev)
        res["ok"] = not errors and res[f"cached_equals_reference_{g}^3_b2"] and all(
            r.get("tokens_in_range") for r in res["results"] if "skipped" not in r)
        if errors:
            res["error"] = "SampleFailed: " + "; ".join(errors)
        return res


def peak_summary(results: dict) -> dict:
    out: dict[str, Any] = {"unit": "MiB, torch.cuda.max_memory_allocated, reset before each measurement"}
    tp = results.get("throughput_vs_monai", {}).get("results", {})
    for k, v in tp.items():
        out[f"train_{k}"] = v.get("peak_memory_mb")
    for r in results.get("prior_sampling", {}).get("results", []):
        out[f"sample_{r['latent'][0]}^3_b{r['batch']}"] = r.get("peak_memory_mb")
    if all(v is None for k, v in out.items() if k != "unit"):
        out["note"] = "no CUDA figures (CPU dry run, or the measurements failed)"
    return out


# ------------------------------------------------------------------ machine and main

def machine_info(cuda: bool) -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cuda_visible_devices": os.environ.get(
                                "CUDA_VISIBLE_DEVICES")}
    try:
        import monai

        info["monai"] = monai.__version__
    except Exception as e:
        info["monai"] = f"unavailable ({err_text(e)})"
    try:
        import mrivq

        info["mrivq"] = mrivq.__version__
    except Exception as e:
        info["mrivq"] = f"unavailable ({err_text(e)})"
    if cuda:
        try:
            prop = torch.cuda.get_device_properties(0)
            info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                        gpu_memory_gib=round(prop.total_memory / 2**30, 1),
                        compute_capability=f"{prop.major}.{prop.minor}", cudnn=torch.backends.cudnn.version(),
                        bf16_native=torch.cuda.is_bf16_supported(including_emulation=False))
        except Exception as e:
            info["gpu_error"] = err_text(e)
    return info


def prepare_work(work: Path) -> None:
    """Create ``work``; a folder this script made before is cleaned (its runs would refuse a new --out)."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise SystemExit(f"--work {work} is not empty and was not made by gpu_check.py; pick another folder")
        for sub in ("data", "runs", "logs"):
            shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by benchmarks/gpu_check.py; its data/, runs/ and logs/ are replaced on a rerun\n")


def emit(out: dict, path: Path | None) -> None:
    text = json.dumps(jsonable(out), indent=2)
    print(text, flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--work", type=Path, default=None, help="folder for data, runs and logs (default: a temp dir)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same checks on the CPU, tiny sizes and steps")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {"cuda": cuda, "command": shlex.join([sys.executable, *sys.argv]),
                              "machine": machine_info(cuda)}
    if not cuda and not args.cpu_dry_run:
        result.update(message="no CUDA GPU visible: nothing checked (use --cpu-dry-run to check the script on "
                              "the CPU)", total_seconds=round(time.perf_counter() - t_start, 2))
        emit(result, args.out)
        return 0
    plan = dry_plan() if args.cpu_dry_run else gpu_plan()
    work = (args.work or Path(tempfile.mkdtemp(prefix="mrivq-gpu-check-"))).resolve()
    prepare_work(work)
    budget = Budget(plan.budget_s)
    checks = Checks(plan, work, budget)
    result.update(mode="cpu-dry-run" if args.cpu_dry_run else "cuda", device=plan.device, work=str(work),
                  budget_s=plan.budget_s)
    log(f"mode {result['mode']}, work folder {work}, budget {plan.budget_s:.0f} s")

    steps: list[tuple[str, Callable[[], dict], float]] = [
        ("phantom", checks.phantom, 10),
        ("train_fp32", lambda: checks.train("train_fp32", "off"), 20),
        ("train_bf16", lambda: checks.train("train_bf16", "bf16"), 20),
        ("resume_cuda", checks.resume, 30),
        # the in-process measurements before torchrun, whose multi-GPU support is being written: a slow
        # or hanging torchrun run must not leave them without time
        ("throughput_vs_monai", checks.throughput, 15),
        ("prior_sampling", checks.sampling, 10),
        ("torchrun_1gpu", checks.torchrun, 20),
    ]
    for name, fn, need in steps:
        if budget.left() < need:
            result[name] = {"skipped": f"time budget ({budget.elapsed():.0f} s used of {plan.budget_s:.0f})"}
            log(f"{name}: skipped (time budget)")
            continue
        log(f"{name}: start ({budget.elapsed():.0f} s used)")
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:  # record it, go on with the next check
            res = {"error": err_text(e), "traceback_tail": traceback.format_exc()[-TAIL_CHARS:]}
        finally:
            if plan.device == "cuda":
                try:
                    torch.cuda.empty_cache()
                except Exception:  # a broken context shows in the next check's error
                    pass
        res["check_seconds"] = round(time.perf_counter() - t0, 2)
        result[name] = res
        status = "ok" if res.get("ok") else f"FAILED: {str(res.get('error', 'see figures'))[:300]}"
        log(f"{name}: {status} ({res['check_seconds']} s)")
    result["peak_memory"] = peak_summary(result)
    result["commands"] = {k: shlex.join(v) for k, v in checks.runner.commands.items()}
    result["logs"] = str(checks.runner.logs)
    names = [n for n, _, _ in steps]
    result["summary"] = {n: ("ok" if result[n].get("ok") else "skipped" if "skipped" in result[n] else "failed")
                         for n in names}
    result["total_seconds"] = round(time.perf_counter() - t_start, 2)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
