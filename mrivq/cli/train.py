"""`mrivq train`: both stages, new runs and resumed ones."""

from __future__ import annotations

from pathlib import Path

import typer

from mrivq.cli.common import RootOpt, err, out
from mrivq.utils.paths import resolve_root
from mrivq.utils.progress import Progress


def train(
    dataset: str | None = typer.Option(None, "--dataset", "-d", help="Dataset name under the data root [ixi]."),
    modality: list[str] = typer.Option(None, "--modality", "-m", help="Input modality (repeat for multi-contrast)."),
    dims: int | None = typer.Option(None, "--dims", help="2 or 3 spatial dimensions [3]."),
    preset: str | None = typer.Option(None, "--preset", help="Preset from configs/ (default: by dims/device)."),
    config: Path | None = typer.Option(None, "--config", help="A YAML config file (overrides the preset)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable); "
                                   "on an existing run only the schedule's length, logging and speed."),
    stage: str = typer.Option("all", "--stage", help="all (VQ-VAE then prior), vqvae, or prior."),
    run: Path | None = typer.Option(None, "--run", help="Existing run (for --stage prior or --resume)."),
    out_dir: Path | None = typer.Option(None, "--out", help="Run folder (default runs/<dataset>-<mod>-<dims>d-<t>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stage-1 optimizer steps."),
    epochs: int | None = typer.Option(None, "--epochs", help="Stage-1 epochs (instead of --max-steps)."),
    prior_max_steps: int | None = typer.Option(None, "--prior-max-steps", help="Stage-2 optimizer steps."),
    root: Path | None = RootOpt,
) -> None:
    """Train the VQ-VAE (stage 1) and the prior (stage 2: the PixelCNN, or --set prior.model.family=maskgit).

    Under `torchrun --nproc_per_node=N -m mrivq train ...` each of N processes (GPUs) takes an equal
    share of every batch: train.batch_size is the global batch, so a run learns the same with any N.
    """
    from mrivq.training import runconfig as RC
    from mrivq.utils import distributed as ddp

    req = RC.TrainRequest(dataset, list(modality) if modality else None, dims, preset, config, set_ or None)
    device = ddp.init_from_env(device)  # torchrun: join the process group, take this rank's GPU
    try:
        _train(req, stage, run, out_dir, resume, device, max_steps, epochs, prior_max_steps, root)
    finally:
        ddp.shutdown()


def _train(req, stage: str, run: Path | None, out_dir: Path | None, resume: bool, device: str,
           max_steps: int | None, epochs: int | None, prior_max_steps: int | None, root: Path | None) -> None:
    from mrivq.training import runconfig as RC
    from mrivq.training.loop import Interrupted
    from mrivq.training.run import train_run
    from mrivq.utils import distributed as ddp
    from mrivq.utils.device import resolve_device

    main = ddp.is_main()
    t = RC.train_target(req, stage, run, out_dir, resume, resolve_root(root), resolve_device(device).type)
    run_dir = t.run_dir
    if t.new and main:
        err.print(f"preset {t.cfg['preset']}; run folder {run_dir}")
    try:
        with Progress(enabled=main) as prog:
            summary = train_run(t.cfg, data_dir=t.data_dir, run_dir=run_dir, stage=stage, resume=resume,
                                device=device, max_steps=max_steps, epochs=epochs,
                                prior_max_steps=prior_max_steps, progress=prog, meta=t.meta, request=req)
    except Interrupted as e:
        if main:
            err.print(f"{e}; checkpoint written. Continue with: mrivq train --resume --out {run_dir}")
        raise typer.Exit(code=130) from None
    if not main:
        return
    for st in ("vqvae", "prior"):
        if st in summary:
            vals = "  ".join(f"{k} {v:.4g}" for k, v in summary[st].items() if isinstance(v, (int, float)))
            out.print(f"{st}: {vals}")
    out.print(f"run: {run_dir}")



