"""``mrivq train``: create or continue a run folder and train the requested stages in order."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mrivq.config.defaults import prior_train_settings, train_settings
from mrivq.data.split import load_split
from mrivq.models.factory import total_steps
from mrivq.runs.folder import RunFolder, is_run, write_config
from mrivq.training.prior import train_prior
from mrivq.training.runconfig import TrainRequest, continued_config
from mrivq.training.vqvae import train_vqvae
from mrivq.utils import distributed as ddp
from mrivq.utils.device import resolve_device
from mrivq.utils.errors import MrivqError, RunError
from mrivq.utils.progress import Progress, silent


def train_run(
    cfg: dict | None,
    *,
    data_dir: Path | None,
    run_dir: Path,
    stage: str = "all",
    resume: bool = False,
    device: str = "auto",
    max_steps: int | None = None,
    epochs: int | None = None,
    prior_max_steps: int | None = None,
    progress: Progress | None = None,
    meta: dict | None = None,
    request: TrainRequest | None = None,
) -> dict:
    """Create or resume a run and train the requested stage(s). Returns a summary dict.

    ``cfg`` is the resolved config for a new run (:func:`mrivq.training.runconfig.new_run_config`); with
    ``resume`` (or ``stage='prior'`` on an existing run) it is read from the run directory instead, so a
    resumed run is the same run, and ``request`` (what the command line gave again) is checked against
    it: its resumable ``--set`` keys apply, anything else that differs is refused.
    """
    if stage not in ("all", "vqvae", "prior"):
        raise MrivqError(f"--stage {stage!r} is not one of all, vqvae, prior")
    for option, value in (("--max-steps", max_steps), ("--epochs", epochs), ("--prior-max-steps", prior_max_steps)):
        if value is not None and value < 1:
            raise MrivqError(f"{option} {value} must be at least 1")
    if max_steps is not None and epochs is not None:
        raise MrivqError("--max-steps and --epochs both set stage 1's length; pass one of them")
    if (resume or stage == "prior") and not ddp.broadcast(is_run(run_dir)):
        raise RunError(f"{run_dir} is not an mrivq run (no run.json); pass a folder made by `mrivq train`")
    folder = RunFolder(run_dir)
    with folder.lock():
        return _train_locked(cfg, data_dir, folder, stage, resume, resolve_device(device), max_steps, epochs,
                             prior_max_steps, progress or silent(), meta, request)



def _train_locked(cfg: dict | None, data_dir: Path | None, run: RunFolder, stage: str, resume: bool,
                  dev: torch.device, max_steps: int | None, epochs: int | None, prior_max_steps: int | None,
                  progress: Progress, meta: dict | None, request: TrainRequest | None) -> dict:
    run_dir = run.path
    existing = ddp.broadcast(is_run(run_dir))  # rank 0's view: it is the one that creates the folder
    if existing and not resume and stage != "prior":
        if not any((run_dir / "checkpoints").glob("*.pt")):
            raise RunError(f"{run_dir} holds a run that never completed a step (stopped while preparing "
                           "the data?); continue it with --resume (it starts from the beginning) or choose "
                           "another --out")
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if (resume or stage == "prior") and not existing:
        raise RunError(f"{run_dir} is not an mrivq run (no run.json); pass a folder made by `mrivq train`")
    if existing:
        cfg, changed = continued_config(run_dir, request or TrainRequest())
        if changed:
            write_config(run_dir, cfg)
        data_dir = Path(run.info["data_dir"]) if data_dir is None else data_dir
    else:
        assert cfg is not None
        if ddp.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
        run.update(created=time.strftime("%Y-%m-%dT%H:%M:%S"), data_dir=str(data_dir), **(meta or {}))
        ddp.barrier()
    trained = run.info.get("stages", {}) if existing else {}
    for option, value, st in (("--max-steps", max_steps, "vqvae"), ("--prior-max-steps", prior_max_steps, "prior")):
        have = trained.get(st, {}).get("steps") or 0
        if value is not None and value < have:
            raise RunError(f"{option} {value} is fewer than the {have} steps the run's {st} has already "
                           f"trained; pass at least {have} (or leave it out)")
    if max_steps is not None:
        cfg.setdefault("train", {})["max_steps"] = max_steps
    if epochs is not None:
        cfg.setdefault("train", {})["epochs"] = epochs
        cfg["train"]["max_steps"] = None
    if prior_max_steps is not None:
        cfg.setdefault("prior", {}).setdefault("train", {})["max_steps"] = prior_max_steps
    if max_steps is not None or epochs is not None or prior_max_steps is not None:
        write_config(run_dir, cfg)
    threads = cfg.get("train", {}).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    assert data_dir is not None
    check_batches(cfg, stage, ddp.world())
    split = load_split(cfg, data_dir, progress=progress, subjects=run.info.get("split"))
    if not existing or "split" not in run.info:  # runs from before the split was recorded
        run.update(split=split.subjects)
    summary: dict = {"run": str(run_dir)}
    done = run.info.get("stages", {})
    if stage in ("all", "vqvae"):
        n_train = run.info.get("n_train")  # recorded by stage 1: no need to build the set
        if done.get("vqvae", {}).get("done") and total_steps(
                train_settings(cfg), n_train if n_train is not None else len(split.train),
                cfg["train"].get("batch_size", 2)) <= done["vqvae"]["steps"]:
            summary["vqvae"] = done["vqvae"]["val"]
        else:
            summary["vqvae"] = train_vqvae(cfg, run, split, dev, resume=resume, progress=progress)
    if stage in ("all", "prior"):
        summary["prior"] = train_prior(cfg, run, split, dev, resume=resume or stage == "prior",
                                       progress=progress)
    return summary


def check_batches(cfg: dict, stage: str, world: int) -> None:
    """Before any data is prepared: each trained stage's batch must split evenly over the processes."""
    if world < 2:
        return
    sizes = {"vqvae": ("train.batch_size", train_settings(cfg)["batch_size"]),
             "prior": ("prior.train.batch_size", prior_train_settings(cfg)["batch_size"])}
    for st, (key, bs) in sizes.items():
        if stage in ("all", st) and int(bs) % world:
            raise MrivqError(f"{key}={bs} does not split over {world} processes; set it to a multiple of {world} "
                             f"(--set {key}={max(world, int(bs) - int(bs) % world)})")
