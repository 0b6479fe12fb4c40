"""Realism of samples, and what the prior adds: every metric of ``mrivq eval --samples`` for
each prior and sampling setting of one run, plus MONAI's ``VQVAE`` + ``DecoderOnlyTransformer``
(``VQVAETransformerInferer``) trained for the same wall-clock budget on the same data. Prints JSON.

    python benchmarks/realism.py --work /tmp/realism            # fetch + README quick-start recipe, then all rows
    python benchmarks/realism.py --run runs/quickstart --root data --rows pixelcnn,marginal,uniform,monai

Rows (``--rows``): ``pixelcnn`` (T=1), ``pixelcnn-raw`` (T=1 without the decoder's intensity
calibration), ``pixelcnn-t0.7``, ``pixelcnn-top8``, ``pixelcnn-greedy`` (T=0),
``marginal`` (each position's code drawn from its training frequencies), ``marginal-greedy`` (the most
frequent code everywhere), ``uniform`` (random codes), ``recon`` (VQ-VAE reconstructions of training
scans, calibrated as synth's samples are: the ceiling the decoder allows), ``recon-raw`` (without the
calibration) and ``monai``. Every row is compared with the run's held-out
subjects (``DATASET:val``) and, for memorization, its training subjects (``DATASET:train``).

The MONAI row trains MONAI's ``VQVAE`` (same channels, residual layers, codes and code size; its
default decay 0.5, which ``benchmarks/vqvae.py`` found better than 0.99) for as long as the mrivq run's
stage 1 took, then a ``DecoderOnlyTransformer`` on its code grids (raster order) for as long as the
mrivq prior took, each with the run's batch size, learning rate, warm-up and gradient clipping, and
samples with ``VQVAETransformerInferer.sample``, which reruns the transformer on the whole prefix for
every code (no cache), so it samples ``--monai-count`` volumes (fewer than the other rows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import emit, quickstart_run  # noqa: E402

ROWS = {
    "pixelcnn": {"prior": "pixelcnn", "temperature": 1.0},
    "pixelcnn-raw": {"prior": "pixelcnn", "temperature": 1.0, "calibrate": False},
    "pixelcnn-t0.7": {"prior": "pixelcnn", "temperature": 0.7},
    "pixelcnn-top8": {"prior": "pixelcnn", "temperature": 1.0, "top_k": 8},
    "pixelcnn-greedy": {"prior": "pixelcnn", "temperature": 0.0},
    "marginal": {"prior": "marginal", "temperature": 1.0},
    "marginal-greedy": {"prior": "marginal", "temperature": 0.0},
    "uniform": {"prior": "uniform", "temperature": 1.0},
}
KEEP = ("c2st_accuracy", "c2st_p_value", "c2st_null_q95", "c2st_texture_accuracy", "c2st_texture_p_value",
        "c2st_texture_null_q95", "mmd", "mmd_floor", "mmd_p_value", "mmd_linear_monai", "mmd_linear_monai_floor",
        "ms_ssim_synth", "ms_ssim_real", "memorization", "memorization_min", "mask_dice_synth", "mask_dice_real",
        "mask_dice_synth_min", "head_shaped_fraction", "tissue_in_range", "tissue_z", "tissue_dice_gap",
        "ventricles_present", "anatomy", "n_synth", "n_real", "n_train", "checks")
#: what the control rows (measured once, with the first row) keep
CONTROL_KEEP = ("c2st_accuracy", "c2st_p_value", "c2st_texture_accuracy", "c2st_texture_p_value", "mmd", "mmd_floor",
                "mmd_p_value", "ms_ssim_synth", "mask_dice_synth", "mask_dice_synth_min", "head_shaped_fraction",
                "tissue_in_range", "tissue_z", "tissue_dice_gap", "ventricles_present", "n", "checks")


def stage_seconds(run: Path) -> dict[str, float]:
    """Wall-clock seconds of each training stage, from the first to the last line of metrics.jsonl."""
    times: dict[str, list[float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "time" in m:
            times.setdefault(m["stage"], []).append(float(m["time"]))
    return {s: max(t) - min(t) for s, t in times.items()}


def evaluate(run: Path, folder: Path, root: Path | None, dataset: str, controls: bool = False) -> dict:
    """A row's realism metrics (``KEEP``); with ``controls`` also ``controls``: the control rows' (``CONTROL_KEEP``)."""
    from mrivq.evaluate.realism import evaluate_realism

    res = evaluate_realism(run, folder, f"{dataset}:val", f"{dataset}:train", root=root, controls=controls)["metrics"]
    out = {k: res.get(k) for k in KEEP}
    if controls:
        out["controls"] = {n: {k: c.get(k) for k in CONTROL_KEEP} for n, c in (res.get("controls") or {}).items()}
    return out


def write_volumes(r, vols: np.ndarray, out: Path, calibration: str = "none") -> None:
    """[N, 1, *grid] in [0, 1] -> NIfTI files as synth writes them, with a sidecar saying ``calibration``
    (as synth's sidecars say it), so that eval reads them back exactly and compares them in the same space."""
    from mrivq.evaluate.volumes import write_as_samples

    write_as_samples(vols, r, out, "synth", calibration)


def recon_row(run: Path, count: int, out: Path, which: str = "best", calibrate: bool = True) -> None:
    """The ``which`` checkpoint's reconstructions of ``count`` training scans, through the run's
    calibration when ``calibrate`` (as synth decodes), written as NIfTI."""
    from mrivq.data.split import load_split
    from mrivq.models.calibration import describe
    from mrivq.runs.run import load_run

    r = load_run(run, which=which)
    sp = load_split(r.config, Path(r.info["data_dir"]), subjects=r.info.get("split"))
    x = torch.stack([torch.as_tensor(sp.train[i]["image"]) for i in range(min(count, len(sp.train)))])
    with torch.no_grad():
        y = torch.cat([r.decode(r.vqvae.encode_indices(x[s:s + 4]), calibrate) for s in range(0, len(x), 4)])
    write_volumes(r, y.numpy(), out, describe(r.calibration if calibrate else None))


def train_for(model: torch.nn.Module, seconds: float, loss_fn, tcfg: dict) -> tuple[int, float]:
    """Adam with ``mrivq train``'s linear warm-up and gradient clipping, for ``seconds`` of wall clock;
    ``loss_fn()`` draws a batch and returns its loss. Returns (steps, last loss)."""
    lr, warmup = float(tcfg.get("lr", 1e-3)), int(tcfg.get("warmup_steps", 50))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps, loss, t0 = 0, float("nan"), time.perf_counter()
    model.train()
    while time.perf_counter() - t0 < seconds:
        out = loss_fn()
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.get("grad_clip", 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (steps + 1) / max(warmup, 1))
        opt.step()
        steps, loss = steps + 1, float(out.detach())
    model.eval()
    return steps, loss


def train_monai(run: Path, budgets: dict[str, float], seed: int = 0, lr: float | None = None,
                loss: str = "mse") -> dict:
    """MONAI's VQ-VAE and DecoderOnlyTransformer trained for the mrivq stages' budgets on the run's
    training split: ``{"vqvae", "transformer", "ordering", "latent", "start_token", "record"}``.
    ``lr`` replaces the run's stage-1 learning rate for MONAI's VQ-VAE (at the CPU preset's 0.002 its
    codebook collapses to one code: it has no dead-code restart); ``loss``: ``mse`` (MONAI's tutorials)
    or ``l1`` (the run's own, when ``train.recon_loss`` is l1)."""
    from monai.networks.nets import VQVAE, DecoderOnlyTransformer
    from monai.utils.ordering import Ordering, OrderingType

    from mrivq.data.split import load_split
    from mrivq.runs.run import load_run

    torch.manual_seed(seed)
    r = load_run(run)
    vq_cfg, tr = r.info["model_config"]["vqvae"], dict(r.config.get("train", {}))
    if lr:
        tr["lr"] = lr
    recon = F.l1_loss if loss == "l1" else F.mse_loss
    pr = r.config.get("prior", {}).get("train", {})
    sp = load_split(r.config, Path(r.info["data_dir"]), subjects=r.info.get("split"))
    x_all = torch.stack([torch.as_tensor(sp.train[i]["image"]) for i in range(len(sp.train))])
    levels = len(vq_cfg["channels"])
    vq = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=tuple(vq_cfg["channels"]),
               num_res_layers=int(vq_cfg.get("num_res_layers", 1)), num_res_channels=tuple(vq_cfg["num_res_channels"]),
               downsample_parameters=((2, 4, 1, 1),) * levels, upsample_parameters=((2, 4, 1, 1, 0),) * levels,
               num_embeddings=int(vq_cfg["num_embeddings"]), embedding_dim=int(vq_cfg["embedding_dim"]))
    g = torch.Generator().manual_seed(seed)

    def vq_loss() -> torch.Tensor:
        xb = x_all[torch.randint(len(x_all), (int(tr.get("batch_size", 2)),), generator=g)]
        x_hat, q_loss = vq(xb)
        return recon(x_hat, xb) + q_loss

    steps, _ = train_for(vq, budgets["vqvae"], vq_loss, tr)
    with torch.no_grad():
        codes = torch.cat([vq.index_quantize(x_all[s:s + 8]) for s in range(0, len(x_all), 8)])
    latent = tuple(codes.shape[1:])
    k = int(vq_cfg["num_embeddings"])
    ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=3, dimensions=(1, *latent))
    n_pos = int(np.prod(latent))
    tf = DecoderOnlyTransformer(num_tokens=k + 1, max_seq_len=n_pos + 1, attn_layers_dim=64, attn_layers_depth=4,
                                attn_layers_heads=4, use_flash_attention=True)
    seq = codes.flatten(1)[:, ordering.get_sequence_ordering()]
    seq = F.pad(seq, (1, 0), value=k)  # start token

    def tf_loss() -> torch.Tensor:
        sb = seq[torch.randint(len(seq), (int(pr.get("batch_size", 8)),), generator=g)]
        return F.cross_entropy(tf(sb[:, :-1]).transpose(1, 2), sb[:, 1:])

    tsteps, loss = train_for(tf, budgets["prior"], tf_loss, pr)
    record = {"vqvae_steps": steps, "vqvae_codes_used": int(codes.unique().numel()), "transformer_steps": tsteps,
              "transformer_final_loss": loss,
              "transformer": "DecoderOnlyTransformer 64 wide, 4 layers, 4 heads, use_flash_attention (torch SDPA)",
              "vqvae": "monai.networks.nets.VQVAE, decay 0.5 (MONAI default)", "budget_seconds": budgets,
              "vqvae_lr": float(tr.get("lr", 1e-3)), "vqvae_loss": recon.__name__.removesuffix("_loss")}
    return {"vqvae": vq, "transformer": tf, "ordering": ordering, "latent": latent, "start_token": k,
            "record": record}


def monai_row(run: Path, budgets: dict[str, float], count: int, out: Path, seed: int = 0, **kw: Any) -> dict:
    """Train MONAI's VQ-VAE and transformer for the mrivq stages' budgets (``kw``: :func:`train_monai`'s
    ``lr``, ``loss``); sample ``count`` volumes."""
    from monai.inferers import VQVAETransformerInferer

    from mrivq.runs.run import load_run

    m = train_monai(run, budgets, seed, **kw)
    k, latent = m["start_token"], m["latent"]
    t0 = time.perf_counter()
    with torch.no_grad():
        img = VQVAETransformerInferer().sample(
            latent_spatial_dim=latent, starting_tokens=torch.full((count, 1), k, dtype=torch.long),
            vqvae_model=m["vqvae"], transformer_model=m["transformer"], ordering=m["ordering"], verbose=False)
    sample_s = time.perf_counter() - t0
    write_volumes(load_run(run), img.clamp(0, 1).numpy(), out, "none")  # compared with mrivq's raw reconstructions
    return {**m["record"], "sample_seconds": round(sample_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a trained run (default: train the README quick start in --work)")
    ap.add_argument("--root", type=Path, help="data root of the run's dataset (default: the run's data_dir)")
    ap.add_argument("--work", type=Path, help="folder for data, the run and samples (default: a temp folder)")
    ap.add_argument("--count", type=int, default=24, help="samples per row")
    ap.add_argument("--monai-count", type=int, default=8, help="samples of the MONAI row (its sampler is slow)")
    ap.add_argument("--monai-lr", type=float, help="MONAI VQ-VAE learning rate (default: the run's)")
    ap.add_argument("--monai-loss", choices=("mse", "l1"), default="mse", help="MONAI VQ-VAE reconstruction loss")
    ap.add_argument("--rows", default=",".join([*ROWS, "recon", "recon-raw", "monai"]))
    ap.add_argument("--budget-vqvae", type=float, help="MONAI VQ-VAE seconds (default: the run's stage 1 time)")
    ap.add_argument("--budget-prior", type=float, help="MONAI transformer seconds (default: the run's prior time)")
    ap.add_argument("--reuse", action="store_true", help="measure rows already generated in --work again")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    from mrivq.inference.synth import synthesize

    work = args.work or Path(tempfile.mkdtemp(prefix="mrivq-realism-"))
    work.mkdir(parents=True, exist_ok=True)
    run = args.run or quickstart_run(work / "run", work / "data")
    from mrivq.runs.run import load_run

    info = load_run(run).info
    budgets = stage_seconds(run)
    budgets.update({k: v for k, v in (("vqvae", args.budget_vqvae), ("prior", args.budget_prior)) if v})
    rows: dict[str, dict] = {}
    controls: dict = {}  # measured with the first row: they do not depend on the samples
    for name in args.rows.split(","):
        folder = work / "samples" / name
        t0 = time.perf_counter()
        extra: dict = {}
        done = folder / "generated.json"  # what generating the row cost (and MONAI's training record)
        if args.reuse and done.is_file():
            extra = json.loads(done.read_text())
        elif name in ROWS:
            synthesize(run, args.count, folder, seed=args.seed, overwrite=True, device="cpu", **ROWS[name])
        elif name in ("recon", "recon-raw"):
            recon_row(run, args.count, folder, calibrate=name == "recon")
        elif name == "monai":
            extra = monai_row(run, budgets, args.monai_count, folder, args.seed, lr=args.monai_lr,
                              loss=args.monai_loss)
        else:
            raise SystemExit(f"unknown row {name!r}; choose from {', '.join([*ROWS, 'recon', 'recon-raw', 'monai'])}")
        if not (args.reuse and done.is_file()):
            extra["generate_seconds"] = round(time.perf_counter() - t0, 1)
            done.write_text(json.dumps(extra))
        rows[name] = {**evaluate(run, folder, args.root, info["dataset"], controls=not controls), **extra}
        controls = controls or rows[name].pop("controls", {})
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    judge(rows, controls)
    emit({"run": str(run), "stage_seconds": budgets, "controls": controls, "rows": rows}, args.out)


def judge(rows: dict[str, dict], controls: dict) -> None:
    """Every row's checks against the one set of controls (measured with the first row only)."""
    from mrivq.evaluate.realism import checks

    for row in rows.values():
        row["checks"] = checks(row, row["ms_ssim_real"], row["mask_dice_real"], controls.get("real_as_samples"))

if __name__ == "__main__":
    main()
