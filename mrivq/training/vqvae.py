"""Stage 1 (VQ-VAE) and the orchestration of ``mrivq train``.

``train_run`` creates or resumes a run directory, trains the VQ-VAE (stage 1) and then the
PixelCNN prior (stage 2, :mod:`mrivq.training.prior`) on the code grids of the training set.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from mrivq.config.defaults import train_settings
from mrivq.data.split import Split, StepBatches
from mrivq.metrics.reconstruction import reconstruction_metrics
from mrivq.models.factory import build_vqvae, total_steps
from mrivq.runs.folder import RunFolder
from mrivq.training.adversary import Adversary
from mrivq.training.loop import LoopConfig, run_loop
from mrivq.utils import distributed as ddp
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress


def write_preview(path: Path, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """Input beside reconstruction (three orthogonal mid-slices for 3D)."""
    from mrivq.io.images import save_png
    from mrivq.io.preview import montage

    save_png(montage([x.cpu().numpy(), x_hat.cpu().numpy()]), path)


def train_vqvae(cfg: dict, run: RunFolder, split: Split, device: torch.device, *, resume: bool,
                progress: Progress | None = None) -> dict:
    """Stage 1: reconstruction (MSE or L1) + commitment loss; EMA codebook (van den Oord et al. 2017)."""
    tcfg = train_settings(cfg)
    torch.manual_seed(tcfg["seed"])
    first = split.train[0]["image"]
    in_ch = int(first.shape[0])
    model = build_vqvae(cfg, in_ch).to(device)
    net = ddp.wrap(_WithInfo(model), device)  # DDP under torchrun: gradients averaged over ranks
    spatial = tuple(int(s) for s in first.shape[1:])
    latent = tuple(int(s) for s in model.latent_shape(spatial))
    n = len(split.train)
    bs = int(tcfg["batch_size"])
    total = total_steps(tcfg, n, bs)
    run.update(preprocess=split.pre.to_dict(), latent_shape=list(latent), image_shape=list(spatial),
               in_channels=in_ch, intensity=split.stats,
               model_config={**run.info.get("model_config", {}), "vqvae": model.config},
               n_train=n, n_val=len(split.val), classes=split.classes)
    if tcfg["recon_loss"] not in ("mse", "l1"):
        raise MrivqError(f"train.recon_loss={tcfg['recon_loss']!r} is not one of mse, l1")
    recon = F.l1_loss if tcfg["recon_loss"] == "l1" else F.mse_loss
    dims = split.pre.dims
    preview_every = int(tcfg["preview_every"] or tcfg["val_every"])
    adv = Adversary.from_config(tcfg, dims, in_ch, device) if float(tcfg["adversarial_weight"]) > 0 else None

    batches = StepBatches(split.train, bs, int(tcfg["seed"]), total, device, workers=loader_workers(tcfg, device))

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        b = batches.get(step)
        x = b["image"]
        info = net(x)
        rec = recon(info["x_hat"].float(), x)
        loss = rec + info["vq_loss"].float()
        logs = {"recon": float(rec.detach()), "vq": float(info["vq_loss"].detach()),
                "perplexity": float(info["perplexity"]), "code_usage": float(info["usage"]),
                "voxels": float(x.numel() * ddp.world())}
        if adv is not None and step >= adv.start:
            g_loss = adv.step(x, info["x_hat"].float())
            loss = loss + adv.weight * g_loss
            logs.update(adv_g=float(g_loss.detach()), adv_d=adv.last_d_loss)
        if step % preview_every == 0 and ddp.is_main():
            with torch.no_grad():
                write_preview(run.path / "previews" / f"vqvae_step{step:06d}.png", x[0], info["x_hat"][0].float())
        return loss, logs

    def val_fn() -> dict:
        m = reconstruction_metrics(model, split.val, dims, bs, device)
        x = split.val[0]["image"][None].float().to(device)
        x_hat = model.decode_indices(model.encode_indices(x)).float().clamp(0, 1)
        if ddp.is_main():
            write_preview(run.path / "previews" / "vqvae_val_latest.png", x[0], x_hat[0])
        return m

    lc = LoopConfig(stage="vqvae", run_dir=run.path, total_steps=total, lr=float(tcfg["lr"]),
                    warmup_steps=int(tcfg["warmup_steps"]), min_lr_ratio=float(tcfg["min_lr_ratio"]),
                    weight_decay=float(tcfg["weight_decay"]), grad_clip=float(tcfg["grad_clip"]),
                    val_every=int(tcfg["val_every"]), ckpt_every=int(tcfg["ckpt_every"]),
                    log_every=int(tcfg["log_every"]), amp=tcfg["amp"], best_key="val_psnr",
                    # a sharper decoder trades PSNR for realism: the best is chosen among adversarial steps
                    best_from=adv.start + 1 if adv is not None else 0)
    val = run_loop(lc, model, device, step_fn, val_fn, resume=resume, progress=progress,
                   extra_state=adv.state_dict if adv is not None else None,
                   restore_state=adv.load_state_dict if adv is not None else None)
    run.stage_done("vqvae", done=True, steps=total, val=val)
    ddp.barrier()  # the other ranks read what rank 0 wrote (best checkpoint, run.json)
    return val


def loader_workers(tcfg: dict, device: torch.device) -> int:
    """``train.workers``: data-loading processes; ``auto`` is 4 on a GPU (up to half the CPU cores per
    process) and 0 on the CPU, where the cached batches are cheap and the cores are busy training."""
    w = tcfg.get("workers", "auto")
    if w in (None, "auto"):
        if device.type != "cuda":
            return 0
        import os

        return max(0, min(4, (os.cpu_count() or 2) // (2 * ddp.world())))
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise MrivqError(f"train.workers={w!r} must be auto or a number of processes >= 0")
    return w


class _WithInfo(torch.nn.Module):
    """The VQ-VAE whose ``forward`` is ``forward_with_info``, so that DDP sees the training call."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict:
        return self.model.forward_with_info(x)


