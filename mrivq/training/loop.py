"""One training loop for both stages: steps, schedule, AMP, checkpoints, resume, signals, metrics.

Read it top to bottom like nanoGPT's ``train.py``. What makes ``--resume`` end exactly where an
uninterrupted run would:

- batches are a pure function of the step (:func:`batch_indices`: a seeded permutation per epoch),
  so no data-loader state needs saving;
- the checkpoint holds model, optimizer, scheduler, grad-scaler, step, best metric and every RNG
  state (python, numpy, torch, CUDA);
- SIGINT/SIGTERM only set a flag; the loop finishes the step in flight, writes ``<stage>_last.pt``
  and raises :class:`Interrupted`.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrivq.runs.folder import load_checkpoint, load_weights, save_checkpoint
from mrivq.utils import distributed as ddp
from mrivq.utils.device import amp_dtype
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress, silent


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""

    def __init__(self, stage: str, step: int, signum: int) -> None:
        super().__init__(f"{stage} interrupted at step {step}")
        self.stage, self.step, self.signum = stage, step, signum


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``min_ratio`` (Loshchilov & Hutter, SGDR, 2017)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((state["python_version"], tuple(int(v) for v in py[:-1]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def own_rng_state(ck: dict) -> dict:
    """This rank's RNG state in checkpoint ``ck``: its own when the checkpoint was written by as many
    ranks as run now (``rng_ranks``), else rank 0's (a checkpoint of one process, or another world size)."""
    ranks = ck.get("rng_ranks")
    if isinstance(ranks, list) and len(ranks) == ddp.world():
        return ranks[ddp.rank()]
    return ck["rng"]


@contextmanager
def catch_signals() -> Any:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps."""
    flag: dict[str, int | None] = {"sig": None}

    def handler(signum: int, frame: Any) -> None:
        flag["sig"] = signum

    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, handler)
    except ValueError:  # not in the main thread: no signal handling
        old = {}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class LoopConfig:
    stage: str
    run_dir: Path
    total_steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    val_every: int = 100
    ckpt_every: int = 200
    log_every: int = 10
    amp: str = "auto"
    higher_is_better: bool = True  # best checkpoint by the validation key
    best_key: str = "val_psnr"
    best_from: int = 0  # validations before this step never become the best checkpoint


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl`` and mirrors scalars to TensorBoard when installed."""

    def __init__(self, run_dir: Path, stage: str) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.stage = stage
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except Exception:  # tensorboard not installed: metrics.jsonl is enough
            self.tb = None

    def forget_after(self, step: int) -> None:
        """Drop this stage's lines after ``step``: training resumed from a checkpoint at ``step`` redoes
        them, and must not log them twice. (0: a stage started afresh drops all of its old lines.)"""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if not _later(ln, self.stage, step)]
        if len(keep) != len(lines):
            from mrivq.utils.atomic import atomic_write_text

            atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def write(self, step: int, values: dict) -> None:
        rec = {"stage": self.stage, "step": step, "time": time.time(), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _NoLog:
    """The metrics log of a rank other than 0: writes nothing."""

    def forget_after(self, step: int) -> None:
        pass

    def write(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _later(line: str, stage: str, step: int) -> bool:
    try:
        rec = json.loads(line)
    except ValueError:  # a line cut short by a crash: dropped as well
        return True
    return rec.get("stage") == stage and int(rec.get("step", 0)) > step


def run_loop(
    lc: LoopConfig,
    model: torch.nn.Module,
    device: torch.device,
    step_fn: Callable[[int], tuple[torch.Tensor, dict]],
    val_fn: Callable[[], dict],
    *,
    resume: bool = False,
    extra_state: Callable[[], dict] | None = None,
    restore_state: Callable[[dict], None] | None = None,
    on_best: Callable[[int, dict], None] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Train ``model`` for ``lc.total_steps`` optimizer steps.

    ``step_fn(step)`` returns ``(loss, logs)`` for one batch (under autocast, set up here);
    ``val_fn()`` returns validation metrics (model put in eval mode here). Returns the last
    validation metrics. Raises :class:`Interrupted` after checkpointing on SIGINT/SIGTERM.
    """
    main = ddp.is_main()  # under torchrun only rank 0 writes
    progress = (progress or silent()) if main else silent()
    ck_dir = Path(lc.run_dir) / "checkpoints"
    last_path, best_path = ck_dir / f"{lc.stage}_last.pt", ck_dir / f"{lc.stage}_best.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(lc.warmup_steps, lc.total_steps, lc.min_lr_ratio))
    dtype = amp_dtype(device, lc.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best = 0, None
    last_val: dict = {}
    if resume and last_path.is_file():
        # on the CPU: the RNG states must stay CPU tensors; the weights move to the model's device
        ck = load_checkpoint(last_path, map_location="cpu")
        load_weights(model, ck, last_path)
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler") and scaler.is_enabled():  # a run that switches to fp16 starts a fresh scale
            scaler.load_state_dict(ck["scaler"])
        step, best, last_val = ck["step"], ck.get("best"), ck.get("last_val", {})
        if step > lc.total_steps:
            raise MrivqError(f"{last_path} is at step {step}, beyond the {lc.total_steps} steps asked for; "
                             "ask for at least that many steps (or leave --max-steps/--epochs out)")
        if restore_state:  # the counterpart of extra_state (e.g. a discriminator)
            restore_state(ck)
        set_rng_state(own_rng_state(ck))

    def checkpoint(path: Path) -> None:
        rngs = ddp.gather(rng_state())  # every rank's own generators (dropout, CUDA), not rank 0's for all
        if not main:
            return
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step,
                 "best": best, "last_val": last_val, "rng": rngs[0], "rng_ranks": rngs, "stage": lc.stage}
        if extra_state:
            state.update(extra_state())
        save_checkpoint(path, state)

    def validate() -> None:
        nonlocal best, last_val
        model.eval()
        with torch.no_grad():
            last_val = val_fn()
        model.train()
        log.write(step, last_val)
        v = last_val.get(lc.best_key) if step >= lc.best_from else None
        if v is not None and (best is None or (v > best if lc.higher_is_better else v < best)):
            best = v
            checkpoint(best_path)
            if on_best and main:
                on_best(step, last_val)

    log = MetricsLog(lc.run_dir, lc.stage) if main else _NoLog()
    log.forget_after(step if resume else 0)
    model.train()
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    try:
        with catch_signals() as sig, progress.task(f"train {lc.stage}", total=lc.total_steps,
                                                   unit="step", start=step) as bar:
            while step < lc.total_steps:
                t0 = time.perf_counter()
                with autocast():
                    loss, logs = step_fn(step)
                if ddp.any_rank(not bool(torch.isfinite(loss.detach()))):
                    checkpoint(ck_dir / f"{lc.stage}_nonfinite.pt")
                    raise MrivqError(f"{lc.stage} loss became {loss.item()} at step {step}; lower train.lr "
                                     f"or use --set train.amp=off (state saved for inspection)")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if lc.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), lc.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                step += 1
                dt = time.perf_counter() - t0
                logs = {"loss": float(loss.detach()), "lr": sched.get_last_lr()[0], **logs}
                for k in ("items", "voxels"):
                    if k in logs:
                        logs[f"{k}_per_s"] = logs.pop(k) / max(dt, 1e-9)
                bar.advance(1)
                bar.set(**{k: v for k, v in logs.items() if k in ("loss", "perplexity", "voxels_per_s",
                                                                   "items_per_s")})
                if step % lc.log_every == 0 or step == 1:
                    log.write(step, logs)
                # every rank validates (MONAI's metrics gather over ranks); rank 0 alone writes
                if step % lc.val_every == 0 or step == lc.total_steps:
                    validate()
                if step % lc.ckpt_every == 0 or step == lc.total_steps:
                    checkpoint(last_path)
                if ddp.any_rank(sig["sig"] is not None):  # every rank stops at the same step
                    checkpoint(last_path)
                    raise Interrupted(lc.stage, step, sig["sig"] or signal.SIGTERM)
    finally:
        log.close()
    if not last_val:
        validate()
    return last_val
