"""Stage 2: the Gated PixelCNN prior over the VQ-VAE's code grids.

The training and validation sets are encoded once, in eval mode (the codebook cannot change), with
the stage-1 best checkpoint, and cached in ``<run>/codes/codes.pt`` together with that checkpoint's
hash; a changed VQ-VAE invalidates the cache. Loss is cross-entropy, reported in nats per token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.config.defaults import prior_train_settings
from mrivq.data.split import batch_indices, iterate
from mrivq.models.calibration import MAX_SUBJECTS, QuantileSketch, fit_quantile_map
from mrivq.models.factory import build_prior, build_vqvae, total_steps
from mrivq.runs.folder import (
    DECODE_BATCH,
    RunFolder,
    file_sha256,
    load_checkpoint,
    load_codes,
    load_weights,
    save_checkpoint,
)
from mrivq.training.loop import LoopConfig, run_loop
from mrivq.utils import distributed as ddp
from mrivq.utils.errors import MrivqError, RunError
from mrivq.utils.progress import Progress, silent


def encode_split(run: RunFolder, split: Any, device: torch.device, progress: Progress | None = None) -> dict:
    """Code grids of the train/val sets with the stage-1 best checkpoint (cached by its hash). Under
    torchrun rank 0 encodes and the others read its cache."""
    if ddp.is_main():
        codes = _encode_split(run, split, device, progress)
    ddp.barrier()
    if not ddp.is_main():
        codes = load_codes(run.codes)
    return codes


def _encode_split(run: RunFolder, split: Any, device: torch.device, progress: Progress | None = None) -> dict:
    progress = progress or silent()
    ck_path = run.checkpoint("vqvae", "best")
    if not ck_path.is_file():
        raise RunError(f"{run.path} has no VQ-VAE checkpoint; train stage 1 first (`mrivq train --stage vqvae`)")
    sha = file_sha256(ck_path)
    cache = run.codes
    if cache.is_file():
        codes = load_codes(cache)  # None when unreadable: encoded again below
        if codes is not None and codes.get("vqvae_sha256") == sha and "calibration" in codes:
            return codes
    info = run.info
    model = build_vqvae({"data": {"dims": split.pre.dims}, "model": info["model_config"]["vqvae"]},
                        info["in_channels"]).to(device)
    load_weights(model, load_checkpoint(ck_path, map_location=device), ck_path)
    model.eval()
    out: dict = {"vqvae_sha256": sha}
    # the calibration's subjects: evenly spread through the training set (its order may follow site or class)
    fit_rows = set(np.linspace(0, len(split.train) - 1, min(MAX_SUBJECTS, len(split.train))).round().astype(int))
    decoded = target = None
    for name, ds in (("train", split.train), ("val", split.val)):
        grids, labels, subjects = [], [], []
        seen = 0
        with torch.no_grad(), progress.task(f"encode {name}", total=len(ds), unit="item") as bar:
            for b in iterate(ds, 8, device):
                idx = model.encode_indices(b["image"])
                grids.append(compact_codes(idx.cpu(), model.num_embeddings))
                rows = [i for i in range(len(idx)) if seen + i in fit_rows] if name == "train" else []
                seen += len(idx)
                if rows:
                    if target is None:
                        decoded, target = QuantileSketch(b["image"].shape[1]), QuantileSketch(b["image"].shape[1])
                    for s in range(0, len(rows), DECODE_BATCH):  # decoder activations are the big ones
                        part = rows[s:s + DECODE_BATCH]
                        decoded.update(model.decode_indices(idx[part]).float().clamp(0, 1))
                        target.update(b["image"][part])
                if "label" in b:
                    labels.append(b["label"].cpu())
                subjects.extend(b["subject"])
                bar.advance(len(b["image"]))
        out[name] = torch.cat(grids)
        out[f"{name}_subjects"] = subjects
        if labels:
            out[f"{name}_labels"] = torch.cat(labels)
    # the decoder's intensity calibration (mrivq.models.calibration), fitted on the training reconstructions
    out["calibration"] = fit_quantile_map(decoded, target, sha) if target is not None else None
    save_checkpoint(cache, out)
    return out


def compact_codes(idx: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """Code grids as int16 when the codebook fits (a quarter of int64's memory and disk); users take
    ``.long()`` of a batch where an index is needed."""
    return idx.to(torch.int16) if num_embeddings <= torch.iinfo(torch.int16).max else idx


def set_aside_stale_prior(run: RunFolder, vqvae_sha256: str, progress: Progress | None = None) -> bool:
    """Move prior checkpoints trained on another VQ-VAE checkpoint (its codes mean something else now)
    into ``checkpoints/stale-<time>/``, so that stage 2 starts again instead of resuming them; returns
    whether it did. Checkpoints from before the hash was recorded are trusted."""
    import time

    ck_dir = run.path / "checkpoints"
    found = [ck_dir / f"prior_{w}.pt" for w in ("last", "best") if (ck_dir / f"prior_{w}.pt").is_file()]
    stale = [p for p in found if load_checkpoint(p).get("vqvae_sha256", vqvae_sha256) != vqvae_sha256]
    if not stale:
        return False
    dest = ck_dir / time.strftime("stale-%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=True)
    for p in found:
        p.rename(dest / p.name)
    run.update(stages={k: v for k, v in run.info.get("stages", {}).items() if k != "prior"})
    (progress or silent()).note(f"the VQ-VAE changed since the prior was trained: its checkpoints moved to "
                                f"{dest}; training the prior again on the new codes")
    return True


def _cond_rows(labels: torch.Tensor | None, covariates: torch.Tensor | None, rows: Any,
               device: torch.device) -> Any:
    """The prior's ``cond`` for the items ``rows``: class ids, covariates, both (a dict) or None."""
    cls = labels[rows].to(device) if labels is not None else None
    if covariates is None:
        return cls
    return {"class": cls, "covariates": covariates[rows].to(device)}


def nats_per_token(prior: Any, codes: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                   device: torch.device, covariates: torch.Tensor | None = None) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(codes), batch_size):
            idx = codes[s:s + batch_size].to(device).long()
            cond = _cond_rows(labels, covariates, slice(s, s + batch_size), device)
            logits = prior(idx, cond)
            total += float(F.cross_entropy(logits.float(), idx, reduction="sum"))
            count += idx.numel()
    return total / max(count, 1)


def _pin_prior_size(cfg: dict, key: str, names: list[str], what: str, unset: tuple = ()) -> dict:
    """``cfg`` (a copy) with ``prior.model[key] = len(names)``, the size the data gives; a preset
    value other than that (or one of ``unset``) is a one-line error."""
    prior = cfg.get("prior", {})
    want, set_n = len(names), prior.get("model", {}).get(key)
    if set_n is not None and int(set_n) != want and int(set_n) not in unset:
        raise MrivqError(f"prior.model.{key} is {set_n} but {what} ({', '.join(names)}); "
                         f"drop {key} or set it to {want}")
    return {**cfg, "prior": {**prior, "model": {**prior.get("model", {}), key: want}}}


def _covariate_rows(split: Any, subjects: list[str]) -> torch.Tensor:
    """``FloatTensor[N, m]`` of the items' standardised covariates (subject order of the code cache)."""
    return torch.tensor([split.covariate_values[s] for s in subjects], dtype=torch.float32)


def train_prior(cfg: dict, run: RunFolder, split: Any, device: torch.device, *, resume: bool,
                progress: Progress | None = None) -> dict:
    """Stage 2: autoregressive prior p(z) = prod_i p(z_i | z_<i) (van den Oord et al. 2016, 2017)."""
    tcfg = prior_train_settings(cfg)
    codes = encode_split(run, split, device, progress)
    info = run.info
    num_embeddings = int(info["model_config"]["vqvae"].get("num_embeddings", 512))
    torch.manual_seed(tcfg["seed"])
    classes, cov = split.classes, split.covariates
    if classes:  # data.condition_on: one class per value of the column
        cfg = _pin_prior_size(cfg, "num_classes", classes["names"],
                              f"data.condition_on={classes['column']} has {len(classes['names'])} values")
    if cov:  # data.covariates: one standardised input per column
        cfg = _pin_prior_size(cfg, "num_covariates", cov["columns"],
                              f"data.covariates has {len(cov['columns'])} column(s)", unset=(0,))
    prior = build_prior(cfg, split.pre.dims, num_embeddings, tuple(codes["train"].shape[1:])).to(device)
    conditional = getattr(prior, "num_classes", None) is not None
    tr, va = codes["train"], codes["val"]
    tr_lab = codes.get("train_labels") if conditional else None
    va_lab = codes.get("val_labels") if conditional else None
    if conditional and tr_lab is None:
        raise MrivqError("prior.model.num_classes is set but the dataset has no labels; remove num_classes")
    if getattr(prior, "num_covariates", 0) and not cov:
        raise MrivqError("prior.model.num_covariates is set but data.covariates is not; name the columns with "
                         "--set data.covariates=[age] or remove num_covariates")
    tr_cov = _covariate_rows(split, codes["train_subjects"]) if cov else None
    va_cov = _covariate_rows(split, codes["val_subjects"]) if cov else None
    run.update(model_config={**info["model_config"], "prior": prior.config}, classes=classes,
                    covariates=cov, calibration=codes.get("calibration"))
    n, bs = len(tr), int(tcfg["batch_size"])
    stale = resume and ddp.is_main() and set_aside_stale_prior(run, codes["vqvae_sha256"], progress)
    if ddp.broadcast(stale):
        resume = False
    net = ddp.wrap(prior, device)
    if getattr(prior, "dropout", 0) and ddp.world() > 1:  # weights are in sync: now independent masks per rank
        torch.manual_seed(int(tcfg["seed"]) + 1_000_003 * ddp.rank())

    total = total_steps(tcfg, n, bs)

    masked = getattr(prior, "family", "pixelcnn") == "maskgit"
    best_key = "val_masked_nats" if masked else "val_nats_per_token"

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        batch = batch_indices(step, n, bs, tcfg["seed"], ddp.world())
        ids = ddp.shard(batch)
        idx = tr[ids].to(device).long()
        if masked:  # the masks, like the batch, are a function of the step: resume stays exact
            from mrivq.models.maskgit import masked_token_loss, random_masks

            g = torch.Generator().manual_seed(int(tcfg["seed"]) * 1_000_003 + step)
            rows = ddp.shard(list(range(len(batch))))
            full = random_masks(len(batch), idx[0].numel(), g)
            mask = full[rows].to(device)
            loss = masked_token_loss(net, idx, mask, float(full.sum()) / ddp.world())
        else:
            logits = net(idx, _cond_rows(tr_lab, tr_cov, ids, device))
            loss = F.cross_entropy(logits.float(), idx)
        return loss, {"nats": float(loss.detach()), "items": float(len(ids) * ddp.world())}

    def val_fn() -> dict:
        if masked:
            from mrivq.models.maskgit import masked_nats

            return {best_key: masked_nats(prior, va, bs, device)}
        return {best_key: nats_per_token(prior, va, va_lab, bs, device, va_cov)}

    lc = LoopConfig(stage="prior", run_dir=run.path, total_steps=total, lr=float(tcfg["lr"]),
                    warmup_steps=int(tcfg["warmup_steps"]), min_lr_ratio=float(tcfg["min_lr_ratio"]),
                    weight_decay=float(tcfg["weight_decay"]), grad_clip=float(tcfg["grad_clip"]),
                    val_every=int(tcfg["val_every"]), ckpt_every=int(tcfg["ckpt_every"]),
                    log_every=int(tcfg["log_every"]), amp=tcfg["amp"], higher_is_better=False,
                    best_key=best_key)
    val = run_loop(lc, prior, device, step_fn, val_fn, resume=resume, progress=progress,
                   extra_state=lambda: {"vqvae_sha256": codes["vqvae_sha256"]})
    run.stage_done("prior", done=True, steps=total, val=val)
    ddp.barrier()
    return val
