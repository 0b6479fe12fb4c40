"""Does a VQ-VAE-2 hierarchy (Razavi et al. 2019) make samples more real? At the quick start's budget:
stage 1 is the run's VQ-VAE configuration plus a top code grid at half the size
(``benchmarks/hierarchy_models.py``), trained for the run's stage-1 steps through ``mrivq train``'s own loop
and recipe (L1 or MSE as configured, batch, learning rate, warm-up, cosine schedule, clipping, seed); stage 2
is a grid-position PixelCNN over the top grid and the bottom PixelCNN conditioned on the top codes, each
for the run's prior steps with its recipe. Then ``--count`` samples (top codes, bottom codes given them,
decoded) are measured with ``mrivq eval --samples`` against the run's held-out and training subjects, with
the reconstructions of training scans (the hierarchy's ceiling) beside them. Prints JSON.

    python benchmarks/hierarchy.py --run runs/quickstart --root data --work hier
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import emit  # noqa: E402
from benchmarks.realism import KEEP, write_volumes  # noqa: E402


def fit(model: torch.nn.Module, tcfg: dict, steps: int, n: int, loss_fn, label: str, work: Path,
        val_fn=None) -> dict:
    """Train ``model`` through ``mrivq train``'s own loop (:func:`mrivq.training.loop.run_loop`: AdamW,
    warm-up + cosine, clipping, AMP, checkpoints and resume in ``work/<label>``), on the batches
    ``batch_indices(step)``; ``loss_fn(ids)`` returns the batch's loss, ``val_fn()`` its validation loss."""
    from mrivq.data.split import batch_indices
    from mrivq.training.loop import LoopConfig, run_loop
    from mrivq.utils.progress import Progress

    torch.manual_seed(int(tcfg.get("seed", 0)))
    seed, bs = int(tcfg.get("seed", 0)), int(tcfg["batch_size"])

    def step_fn(step: int) -> tuple[torch.Tensor, dict]:
        loss = loss_fn(batch_indices(step, n, bs, seed))
        return loss, {"loss": float(loss.detach())}

    def validate() -> dict:
        with torch.no_grad():
            return {"val_loss": float(val_fn()) if val_fn is not None else 0.0}

    lc = LoopConfig(stage=label.replace(" ", "_"), run_dir=work / label.replace(" ", "_"), total_steps=steps,
                    lr=float(tcfg["lr"]), warmup_steps=int(tcfg.get("warmup_steps", 50)),
                    min_lr_ratio=float(tcfg.get("min_lr_ratio", 0.05)), weight_decay=float(tcfg.get("weight_decay", 0)),
                    grad_clip=float(tcfg.get("grad_clip", 1.0)), val_every=max(1, steps // 4), ckpt_every=steps,
                    log_every=max(1, steps // 20), amp="off", higher_is_better=False, best_key="val_loss")
    lc.run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    val = run_loop(lc, model, torch.device("cpu"), step_fn, validate, resume=(lc.run_dir / "checkpoints").is_dir(),
                   progress=Progress(enabled=sys.stderr.isatty()))
    model.eval()
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), **val}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained run: its config, data and split")
    ap.add_argument("--root", type=Path, help="data root of the run's dataset")
    ap.add_argument("--work", type=Path, default=Path("hier"))
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top-codes", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from monai.metrics import PSNRMetric

    from benchmarks.hierarchy_models import VQVAE2, CoarseConditionedPixelCNN
    from mrivq.config.defaults import PRIOR_TRAIN_DEFAULTS, TRAIN_DEFAULTS
    from mrivq.data.split import load_split
    from mrivq.evaluate.realism import evaluate_realism
    from mrivq.inference.sampling import sample_tokens
    from mrivq.models.pixelcnn import GatedPixelCNN
    from mrivq.runs.run import load_run

    r = load_run(args.run)
    cfg, info = r.config, r.info
    sp = load_split(cfg, Path(info["data_dir"]), subjects=info.get("split"))
    x_tr = torch.stack([torch.as_tensor(sp.train[i]["image"]).float() for i in range(len(sp.train))])
    x_va = torch.stack([torch.as_tensor(sp.val[i]["image"]).float() for i in range(len(sp.val))])
    tcfg = {**TRAIN_DEFAULTS, **cfg["train"]}
    pcfg = {**PRIOR_TRAIN_DEFAULTS, **cfg["prior"]["train"]}
    args.work.mkdir(parents=True, exist_ok=True)
    ck = args.work / "hierarchy.pt"
    torch.manual_seed(int(tcfg["seed"]))
    vq = VQVAE2(info["model_config"]["vqvae"], top_codes=args.top_codes)
    recon = F.l1_loss if tcfg.get("recon_loss") == "l1" else F.mse_loss
    report: dict = {"run": str(args.run)}
    if ck.is_file():
        state = torch.load(ck, weights_only=True)
        vq.load_state_dict(state["vqvae2"])
        report.update(state["report"])
    else:
        def vq_loss(ids: list[int]) -> torch.Tensor:
            x = x_tr[ids]
            x_hat, commit, _, _ = vq(x)
            return recon(x_hat, x) + commit

        report["stage1"] = fit(vq, tcfg, int(tcfg["max_steps"]), len(x_tr), vq_loss, "vqvae2", args.work,
                               lambda: recon(vq(x_va)[0], x_va))
    vq.eval()
    with torch.no_grad():
        codes = {k: [vq.encode_indices(x[s:s + 8]) for s in range(0, len(x), 8)] for k, x in (("train", x_tr),
                                                                                               ("val", x_va))}
        top = {k: torch.cat([c[0] for c in v]) for k, v in codes.items()}
        bot = {k: torch.cat([c[1] for c in v]) for k, v in codes.items()}
        rec = torch.cat([vq.decode_indices(top["val"][s:s + 4], bot["val"][s:s + 4]).clamp(0, 1)
                         for s in range(0, len(x_va), 4)])
    report["val_psnr"] = round(float(PSNRMetric(max_val=1.0)(rec, x_va).mean()), 3)  # as mrivq train's
    report["top_codes_in_use"] = int(top["train"].unique().numel())
    report["bottom_codes_in_use"] = int(bot["train"].unique().numel())
    print(json.dumps({k: report[k] for k in ("val_psnr", "top_codes_in_use", "bottom_codes_in_use")}), file=sys.stderr)
    k_b = int(info["model_config"]["vqvae"]["num_embeddings"])
    pm = {k: v for k, v in cfg["prior"]["model"].items() if k in ("channels", "num_layers", "kernel_size")}
    top_shape, bot_shape = tuple(top["train"].shape[1:]), tuple(bot["train"].shape[1:])
    torch.manual_seed(int(pcfg["seed"]))
    top_prior = GatedPixelCNN(3, args.top_codes, latent_shape=top_shape, positions="grid", **pm)
    bot_prior = CoarseConditionedPixelCNN(3, k_b, latent_shape=bot_shape, top_codes=args.top_codes, **pm)
    if ck.is_file() and "top_prior" in state:
        top_prior.load_state_dict(state["top_prior"])
        bot_prior.load_state_dict(state["bottom_prior"])
    else:
        steps = int(pcfg["max_steps"])

        def top_loss(ids: list[int]) -> torch.Tensor:
            t = top["train"][ids]
            return F.cross_entropy(top_prior(t), t)

        def bot_loss(ids: list[int]) -> torch.Tensor:
            b = bot["train"][ids]
            return F.cross_entropy(bot_prior(b, top["train"][ids]), b)

        report["top_prior"] = fit(top_prior, pcfg, steps, len(top["train"]), top_loss, "top prior", args.work,
                                  lambda: F.cross_entropy(top_prior(top["val"]), top["val"]))
        report["bottom_prior"] = fit(bot_prior, pcfg, steps, len(bot["train"]), bot_loss, "bottom prior", args.work,
                                     lambda: F.cross_entropy(bot_prior(bot["val"], top["val"]), bot["val"]))
        torch.save({"vqvae2": vq.state_dict(), "top_prior": top_prior.state_dict(),
                    "bottom_prior": bot_prior.state_dict(), "report": report}, ck)
    with torch.no_grad():
        for name, p, c, t in (("top", top_prior, None, top["val"]), ("bottom", bot_prior, top["val"], bot["val"])):
            report[f"{name}_val_nats"] = round(float(F.cross_entropy(p(t, c) if c is not None else p(t), t)), 4)
    t0 = time.perf_counter()
    tops = sample_tokens(top_prior, top_shape, args.count, seed=args.seed)
    bots = sample_tokens(bot_prior, bot_shape, args.count, seed=args.seed + 1, cond=tops, batch_size=args.count)
    with torch.no_grad():
        vols = torch.cat([vq.decode_indices(tops[s:s + 4], bots[s:s + 4]).clamp(0, 1)
                          for s in range(0, args.count, 4)])
    report["sample_seconds"] = round(time.perf_counter() - t0, 1)
    dataset = info["dataset"]
    rows = {}
    # raw decoder output (the hierarchy has no calibration): compared with the run's raw reconstructions
    write_volumes(r, vols.numpy(), args.work / "samples", "none")
    write_volumes(r, torch.cat([vq.decode_indices(top["train"][s:s + 4], bot["train"][s:s + 4]).clamp(0, 1)
                                for s in range(0, args.count, 4)]).detach().numpy(), args.work / "recon", "none")
    for name in ("samples", "recon"):
        m = evaluate_realism(args.run, args.work / name, f"{dataset}:val", f"{dataset}:train", root=args.root,
                             json_out=args.work / f"{name}.json", overwrite=True)["metrics"]
        rows[name] = {k: m.get(k) for k in KEEP}
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    emit({**report, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
