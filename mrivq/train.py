"""Stage 1 (VQ-VAE) and the orchestration of ``mrivq train``.

``train_run`` creates or resumes a run directory, trains the VQ-VAE (stage 1) and then the
PixelCNN prior (stage 2, :mod:`mrivq.train_prior`) on the code grids of the training set.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrivq import data as D
from mrivq.errors import MrivqError, RunError
from mrivq.loop import LoopConfig, batch_indices, resolve_device, run_loop
from mrivq.progress import Progress, silent
from mrivq.runs import (
    is_run,
    read_config,
    read_run_info,
    update_run_info,
    write_config,
)

TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 2, "lr": 1e-3, "max_steps": None, "epochs": None, "warmup_steps": 50,
    "min_lr_ratio": 0.05, "weight_decay": 0.0, "grad_clip": 1.0, "val_every": 100, "ckpt_every": 200,
    "log_every": 10, "preview_every": None, "amp": "auto", "seed": 0, "val_fraction": 0.15,
    "cache": "memory", "recon_loss": "mse", "threads": None,
    "adversarial_weight": 0.0, "adversarial_start": 0, "disc_channels": 32, "disc_layers": 3, "disc_lr": None,
}


@dataclass
class Split:
    train: Any  # torch Dataset of {"image", "subject", ["label"]}
    val: Any
    pre: D.Preprocess
    stats: dict
    classes: dict | None = None  # {"column": "site", "names": [...]}: class id i means names[i]
    covariates: dict | None = None  # {"columns", "mean", "std", "missing"} (data.covariates)
    covariate_values: dict | None = None  # subject -> z-scores, one per column


def load_split(cfg: dict, data_dir: Path, progress: Progress | None = None) -> Split:
    """Manifest -> rows of the chosen modalities -> seeded subject split -> cached datasets."""
    pre = D.Preprocess.from_dict(cfg["data"])
    levels = len(cfg.get("model", {}).get("channels") or ())
    if levels:  # pad to the model's downsampling factor even when a --set changed the levels
        pre.divisible_by = math.lcm(int(pre.divisible_by), 2 ** levels)
    pre.validate()
    tcfg = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    rows = D.load_manifest(data_dir)
    rows = D.pool_rows(rows, pre.modalities) if pre.pool_modalities else D.select_rows(rows, pre.modalities)
    classes = None
    column = cfg["data"].get("condition_on")
    if column:
        if column == "modality" and not pre.pool_modalities and len(pre.modalities) > 1:
            raise MrivqError("data.condition_on=modality needs data.pool_modalities=true (each modality its "
                             "own image); add --set data.pool_modalities=true")
        rows, names = D.condition_items(rows, str(column), order=pre.modalities if column == "modality" else None)
        classes = {"column": str(column), "names": names}
    if cfg["data"].get("max_subjects"):
        keep = sorted({r["subject"] for r in rows})[: int(cfg["data"]["max_subjects"])]
        rows = [r for r in rows if r["subject"] in set(keep)]
    tr_rows, va_rows = D.split_subjects(rows, tcfg["val_fraction"], tcfg["seed"])
    if cfg["data"].get("max_val_subjects"):
        keep = sorted({r["subject"] for r in va_rows})[: int(cfg["data"]["max_val_subjects"])]
        va_rows = [r for r in va_rows if r["subject"] in set(keep)]
    if not tr_rows or not va_rows:
        raise MrivqError(f"{data_dir} has too few subjects to split into train and validation "
                         f"({len({r['subject'] for r in rows})}); fetch more (e.g. --count 8 for the phantom)")
    covariates, cov_values = _covariates(cfg["data"].get("covariates"), rows, tr_rows)
    cache = tcfg["cache"]
    cache_dir = data_dir / ".mrivq" / "cache" if cache == "disk" else None
    train = D.make_dataset(tr_rows, data_dir, pre, cache=cache, cache_dir=cache_dir, progress=progress)
    val = D.make_dataset(va_rows, data_dir, pre, cache=cache, cache_dir=cache_dir, progress=progress)
    stats = D.dataset_intensity_stats(tr_rows, data_dir, pre)
    if pre.pool_modalities:  # each modality's own range, so synthesized T2s come out in T2 units
        by_mod: dict[str, list] = {}
        for r in tr_rows:
            by_mod.setdefault(r["modality"], []).append(r)
        stats["by_modality"] = {m: D.dataset_intensity_stats(rs, data_dir, pre) for m, rs in by_mod.items()}
    return Split(train, val, pre, stats, classes, covariates, cov_values)


def _covariates(columns: Any, rows: list[dict], tr_rows: list[dict]) -> tuple[dict | None, dict | None]:
    """``data.covariates`` -> (standardisation fitted on the training subjects, subject -> z-scores)."""
    if not columns:
        return None, None
    columns = [columns] if isinstance(columns, str) else list(columns)
    raw = D.subject_covariates(rows, columns)
    train_subjects = {r["subject"] for r in tr_rows}
    spec = D.fit_covariates({s: v for s, v in raw.items() if s in train_subjects}, columns)
    return spec, {s: D.standardise(spec, v) for s, v in raw.items()}


def collate(ds: Any, idx: list[int], device: torch.device) -> dict:
    items = [ds[i] for i in idx]
    out = {"image": torch.stack([torch.as_tensor(it["image"]).float() for it in items]).to(device)}
    if "label" in items[0]:
        out["label"] = torch.tensor([int(it["label"]) for it in items], device=device)
    out["subject"] = [str(it.get("subject", "")) for it in items]
    return out


def iterate(ds: Any, batch_size: int, device: torch.device):
    for s in range(0, len(ds), batch_size):
        yield collate(ds, list(range(s, min(len(ds), s + batch_size))), device)


def build_vqvae(cfg: dict, in_channels: int) -> torch.nn.Module:
    from mrivq.models.vqvae import VQVAE

    mcfg = dict(cfg.get("model", {}))
    mcfg.setdefault("spatial_dims", cfg["data"]["dims"])
    mcfg.setdefault("in_channels", in_channels)
    try:
        return VQVAE(**mcfg)
    except TypeError as e:
        raise MrivqError(f"model config has a bad key ({e}); check the preset's model section") from None


class _ReconMetrics:
    """Running PSNR and SSIM (MONAI metrics), MSE, code histogram of one group of images."""

    def __init__(self, dims: int, n_codes: int) -> None:
        from monai.metrics import PSNRMetric, SSIMMetric

        self.psnr, self.ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=dims, data_range=1.0)
        self.counts = torch.zeros(n_codes, dtype=torch.long)
        self.mse: list[float] = []
        self.n = 0

    def add(self, x_hat: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> None:
        self.counts += torch.bincount(idx.flatten().cpu(), minlength=self.counts.numel())
        self.psnr(x_hat, x)
        if min(x.shape[2:]) >= 7:  # SSIM's 7-voxel window needs at least that many
            self.ssim(x_hat, x)
        self.mse.append(F.mse_loss(x_hat, x).item())
        self.n += x.shape[0]

    def result(self) -> dict:
        p = self.counts.float() / self.counts.sum().clamp(min=1)
        perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        out = {"val_psnr": float(self.psnr.aggregate().item()), "val_mse": float(np.mean(self.mse)),
               "val_code_usage": float((self.counts > 0).float().mean()), "val_perplexity": perplexity}
        try:
            out["val_ssim"] = float(self.ssim.aggregate().item())
        except Exception:  # no SSIM computed (tiny images)
            pass
        return out


def reconstruction_metrics(model: Any, ds: Any, dims: int, batch_size: int, device: torch.device, *,
                           by_label: bool = False) -> dict:
    """Validation PSNR and SSIM (MONAI metrics), code usage and perplexity, model in eval mode.

    With ``by_label`` the same pass also measures each label's images on their own, under
    ``"by_label": {label: {metrics..., "n_images"}}`` (items without a label are only in the total)."""
    n_codes = model.num_embeddings
    total, groups = _ReconMetrics(dims, n_codes), {}
    with torch.no_grad():
        for b in iterate(ds, batch_size, device):
            x = b["image"]
            idx = model.encode_indices(x)
            x_hat = model.decode_indices(idx).float().clamp(0, 1)
            total.add(x_hat, x, idx)
            if by_label and "label" in b:
                for lab in b["label"].unique().tolist():
                    m = b["label"] == lab
                    groups.setdefault(int(lab), _ReconMetrics(dims, n_codes)).add(x_hat[m], x[m], idx[m])
    out = total.result()
    if by_label:
        out["by_label"] = {lab: {**g.result(), "n_images": g.n} for lab, g in sorted(groups.items())}
    return out


def write_preview(path: Path, x: torch.Tensor, x_hat: torch.Tensor) -> None:
    """Input beside reconstruction (three orthogonal mid-slices for 3D)."""
    from mrivq.io import save_png
    from mrivq.preview import montage

    save_png(montage([x.cpu().numpy(), x_hat.cpu().numpy()]), path)


def train_vqvae(cfg: dict, run_dir: Path, split: Split, device: torch.device, *, resume: bool,
                progress: Progress | None = None) -> dict:
    """Stage 1: reconstruction (MSE or L1) + commitment loss; EMA codebook (van den Oord et al. 2017)."""
    tcfg = {**TRAIN_DEFAULTS, **cfg.get("train", {})}
    torch.manual_seed(tcfg["seed"])
    first = split.train[0]["image"]
    in_ch = int(first.shape[0])
    model = build_vqvae(cfg, in_ch).to(device)
    spatial = tuple(int(s) for s in first.shape[1:])
    latent = tuple(int(s) for s in model.latent_shape(spatial))
    n = len(split.train)
    bs = int(tcfg["batch_size"])
    total = _total_steps(tcfg, n, bs)
    update_run_info(run_dir, preprocess=split.pre.to_dict(), latent_shape=list(latent),
                    image_shape=list(spatial), in_channels=in_ch, intensity=split.stats,
                    model_config={**read_run_info(run_dir).get("model_config", {}), "vqvae": model.config},
                    n_train=n, n_val=len(split.val), classes=split.classes)
    if tcfg["recon_loss"] not in ("mse", "l1"):
        raise MrivqError(f"train.recon_loss={tcfg['recon_loss']!r} is not one of mse, l1")
    recon = F.l1_loss if tcfg["recon_loss"] == "l1" else F.mse_loss
    dims = split.pre.dims
    preview_every = int(tcfg["preview_every"] or tcfg["val_every"])
    adv = Adversary.from_config(tcfg, dims, in_ch, device) if float(tcfg["adversarial_weight"]) > 0 else None
    if adv is not None and resume:
        adv.resume(run_dir / "checkpoints" / "vqvae_last.pt", device)

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        b = collate(split.train, batch_indices(step, n, bs, tcfg["seed"]), device)
        x = b["image"]
        info = model.forward_with_info(x)
        rec = recon(info["x_hat"].float(), x)
        loss = rec + info["vq_loss"].float()
        logs = {"recon": float(rec.detach()), "vq": float(info["vq_loss"].detach()),
                "perplexity": float(info["perplexity"]), "code_usage": float(info["usage"]),
                "voxels": float(x.numel())}
        if adv is not None and step >= adv.start:
            g_loss = adv.step(x, info["x_hat"].float())
            loss = loss + adv.weight * g_loss
            logs.update(adv_g=float(g_loss.detach()), adv_d=adv.last_d_loss)
        if step % preview_every == 0:
            with torch.no_grad():
                write_preview(run_dir / "previews" / f"vqvae_step{step:06d}.png", x[0], info["x_hat"][0].float())
        return loss, logs

    def val_fn() -> dict:
        m = reconstruction_metrics(model, split.val, dims, bs, device)
        x = split.val[0]["image"][None].float().to(device)
        x_hat = model.decode_indices(model.encode_indices(x)).float().clamp(0, 1)
        write_preview(run_dir / "previews" / "vqvae_val_latest.png", x[0], x_hat[0])
        return m

    lc = LoopConfig(stage="vqvae", run_dir=run_dir, total_steps=total, lr=float(tcfg["lr"]),
                    warmup_steps=int(tcfg["warmup_steps"]), min_lr_ratio=float(tcfg["min_lr_ratio"]),
                    weight_decay=float(tcfg["weight_decay"]), grad_clip=float(tcfg["grad_clip"]),
                    val_every=int(tcfg["val_every"]), ckpt_every=int(tcfg["ckpt_every"]),
                    log_every=int(tcfg["log_every"]), amp=tcfg["amp"], best_key="val_psnr",
                    # a sharper decoder trades PSNR for realism: the best is chosen among adversarial steps
                    best_from=adv.start + 1 if adv is not None else 0)
    val = run_loop(lc, model, device, step_fn, val_fn, resume=resume, progress=progress,
                   extra_state=adv.state_dict if adv is not None else None)
    update_run_info(run_dir, stages={**read_run_info(run_dir).get("stages", {}),
                                     "vqvae": {"done": True, "steps": total, "val": val}})
    return val


class Adversary:
    """A patch discriminator that sharpens the decoder (Isola et al. 2017; Esser et al. 2021, VQGAN).

    MONAI's ``PatchDiscriminator`` scores overlapping patches of a volume as real or decoded with the
    least-squares GAN loss (Mao et al. 2017, MONAI's ``PatchAdversarialLoss``). :meth:`step` first updates
    the discriminator on ``x`` (real) and the detached reconstruction (fake), in float32 outside autocast,
    then returns the generator's loss for the reconstruction, which the training loop adds to the VQ-VAE's
    loss scaled by ``train.adversarial_weight``. ``train.adversarial_start`` delays it until the
    autoencoder reconstructs something, as VQGAN does. Its state is saved in ``vqvae_last.pt`` so that
    ``--resume`` continues it exactly.
    """

    def __init__(self, disc: torch.nn.Module, lr: float, weight: float, start: int, grad_clip: float) -> None:
        from monai.losses import PatchAdversarialLoss

        self.disc, self.weight, self.start, self.grad_clip = disc, weight, start, grad_clip
        self.opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.5, 0.9))
        self.loss = PatchAdversarialLoss(criterion="least_squares")
        self.last_d_loss = float("nan")

    @classmethod
    def from_config(cls, tcfg: dict, dims: int, in_channels: int, device: torch.device) -> Adversary:
        from monai.networks.nets import PatchDiscriminator

        disc = PatchDiscriminator(spatial_dims=dims, channels=int(tcfg["disc_channels"]), in_channels=in_channels,
                                  num_layers_d=int(tcfg["disc_layers"]), norm="INSTANCE").to(device)
        return cls(disc, float(tcfg["disc_lr"] or tcfg["lr"]), float(tcfg["adversarial_weight"]),
                   int(tcfg["adversarial_start"]), float(tcfg["grad_clip"]))

    def step(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            self.disc.train()
            d_loss = 0.5 * (self.loss(self.disc(x_hat.detach().float())[-1], target_is_real=False,
                                      for_discriminator=True)
                            + self.loss(self.disc(x.float())[-1], target_is_real=True, for_discriminator=True))
            self.opt.zero_grad(set_to_none=True)
            d_loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.grad_clip)
            self.opt.step()
            self.last_d_loss = float(d_loss.detach())
            for p in self.disc.parameters():  # the generator's loss trains the VQ-VAE only
                p.requires_grad_(False)
            g_loss = self.loss(self.disc(x_hat.float())[-1], target_is_real=True, for_discriminator=False)
            for p in self.disc.parameters():
                p.requires_grad_(True)
        return g_loss

    def state_dict(self) -> dict:
        return {"discriminator": self.disc.state_dict(), "discriminator_optimizer": self.opt.state_dict()}

    def resume(self, path: Path, device: torch.device) -> None:
        from mrivq.runs import load_checkpoint

        if not path.is_file():
            return
        ck = load_checkpoint(path, map_location=device)
        if "discriminator" in ck:  # a run that turned the discriminator on later starts it fresh
            self.disc.load_state_dict(ck["discriminator"])
            self.opt.load_state_dict(ck["discriminator_optimizer"])


def _total_steps(tcfg: dict, n: int, bs: int) -> int:
    if tcfg.get("max_steps"):
        return int(tcfg["max_steps"])
    if tcfg.get("epochs"):
        return int(tcfg["epochs"]) * max(1, n // min(bs, n))
    raise MrivqError("the config sets neither train.max_steps nor train.epochs; pass --max-steps or --epochs")


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
) -> dict:
    """Create or resume a run and train the requested stage(s). Returns a summary dict.

    ``cfg`` is the resolved config for a new run; with ``resume`` (or ``stage='prior'`` on an
    existing run) it is read from the run directory instead, so a resumed run is the same run.
    """
    progress = progress or silent()
    dev = resolve_device(device)
    if stage not in ("all", "vqvae", "prior"):
        raise MrivqError(f"--stage {stage!r} is not one of all, vqvae, prior")
    existing = is_run(run_dir)
    if existing and not resume and stage != "prior":
        raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if (resume or stage == "prior") and not existing:
        raise RunError(f"{run_dir} is not an mrivq run (no run.json); pass a folder made by `mrivq train`")
    if existing:
        cfg = read_config(run_dir)
        info = read_run_info(run_dir)
        data_dir = Path(info["data_dir"]) if data_dir is None else data_dir
    else:
        assert cfg is not None
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)
        update_run_info(run_dir, created=time.strftime("%Y-%m-%dT%H:%M:%S"), data_dir=str(data_dir),
                        **(meta or {}))
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
    split = load_split(cfg, data_dir, progress=progress)
    summary: dict = {"run": str(run_dir)}
    done = read_run_info(run_dir).get("stages", {})
    if stage in ("all", "vqvae"):
        if done.get("vqvae", {}).get("done") and _total_steps({**TRAIN_DEFAULTS, **cfg["train"]},
                                                              len(split.train), cfg["train"].get(
                                                                  "batch_size", 2)) <= done["vqvae"]["steps"]:
            summary["vqvae"] = done["vqvae"]["val"]
        else:
            summary["vqvae"] = train_vqvae(cfg, run_dir, split, dev, resume=resume, progress=progress)
    if stage in ("all", "prior"):
        from mrivq.train_prior import train_prior

        summary["prior"] = train_prior(cfg, run_dir, split, dev, resume=resume or stage == "prior",
                                       progress=progress)
    return summary
