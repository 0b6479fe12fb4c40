"""mrivq's VQVAE against MONAI's VQVAE of the same size, trained for the same wall-clock budget.

Prints one JSON object: per model, the train-step time (median, ms), peak memory (CUDA: max allocated;
CPU: growth of the process's max RSS during training), steps done, and on held-out phantom volumes
the PSNR (monai.metrics.PSNRMetric, max_val 1), the fraction of the 512 codes used and the perplexity.

Each model trains in its own subprocess (clean RSS peak, same thread count), one after the other:

    python benchmarks/vqvae.py --budget 120 --shape 64 64 64 --batch-size 2 --threads 1

MONAI's VQVAE runs twice: with decay 0.99 (the paper's) and with its own default 0.5. Every model
trains with Adam, the same linear warm-up and gradient clipping as ``mrivq train`` (``--warmup 50
--grad-clip 1``). Without them, with seed 1 mrivq's encoder output collapsed to a constant in the first
steps (gradient norm 23 at step 2, commitment loss 0 from then on, 11 dB), so the figures said more
about the seed than the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

MODELS = ("mrivq", "monai-decay0.99", "monai-decay0.5")
N_CODES = 512


def load_volumes(n: int, first: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """``n`` phantom T1 volumes [n, 1, *shape], each scaled by its 99.5th percentile into [0, 1]."""
    try:
        from mrivq.datasets.phantom import generate_subject
    except ImportError:  # stand-in while the phantom is not there: smooth random blobs
        g = torch.Generator().manual_seed(first)
        vols = F.interpolate(torch.rand(n, 1, *(max(2, s // 8) for s in shape), generator=g), size=shape,
                             mode="trilinear", align_corners=False)
        return vols, "smooth-random-stand-in"
    vols = []
    for i in range(first, first + n):
        v = generate_subject(i, seed=0, shape=shape, spacing=3.0, modalities=("t1",))["t1"]
        vols.append(np.clip(v / max(float(np.percentile(v, 99.5)), 1e-6), 0, 1))
    return torch.from_numpy(np.stack(vols)[:, None]).float(), "mrivq.datasets.phantom t1"


def build(name: str, overrides: dict) -> torch.nn.Module:
    if name == "mrivq":
        from mrivq.models.vqvae import VQVAE

        return VQVAE(spatial_dims=3, in_channels=1, channels=(32, 64), num_res_layers=2,
                     num_res_channels=(32, 64), num_embeddings=N_CODES, **overrides)
    from monai.networks.nets import VQVAE as MonaiVQVAE

    return MonaiVQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64), num_res_layers=2,
                      num_res_channels=(32, 64), downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                      upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=N_CODES,
                      embedding_dim=64, decay=float(name.split("decay")[1]))


def codes_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "encode_indices"):
        return model.encode_indices(x)
    return model.index_quantize(x)  # MONAI; pure only because the model is in eval mode


def decode(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "decode_indices"):
        return model.decode_indices(idx)
    return model.decode_samples(idx)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    shape = tuple(args.shape)
    crop = tuple(args.crop) if args.crop else shape
    train, source = load_volumes(args.n_train, 0, shape)
    val, _ = load_volumes(args.n_val, 1000, shape)
    overrides = json.loads(args.mrivq_kw) if args.name == "mrivq" else {}
    model = build(args.name, overrides).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = max_rss_mb()
    times, losses = [], []
    model.train()
    start = time.perf_counter()
    while (len(times) < args.steps) if args.steps else (time.perf_counter() - start < args.budget):
        idx = torch.randint(len(train), (args.batch_size,), generator=g)
        offs = [int(torch.randint(s - c + 1, (1,), generator=g)) for s, c in zip(shape, crop, strict=True)]
        x = train[idx][(slice(None), slice(None), *(slice(o, o + c) for o, c in zip(offs, crop, strict=True)))].to(dev)
        t = time.perf_counter()
        x_hat, vq_loss = model(x)
        rec = F.mse_loss(x_hat, x)
        loss = rec + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for group in opt.param_groups:  # linear warm-up, as mrivq train does
            group["lr"] = args.lr * min(1.0, (len(times) + 1) / max(args.warmup, 1))
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
        losses.append(float(rec.detach()))
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else max_rss_mb() - rss0)

    from monai.metrics import PSNRMetric

    model.eval()
    psnr = PSNRMetric(max_val=1.0)
    counts = torch.zeros(N_CODES, dtype=torch.long)
    with torch.no_grad():
        for i in range(len(val)):
            x = val[i:i + 1].to(dev)
            codes = codes_of(model, x)
            psnr(decode(model, codes).float().clamp(0, 1), x)
            counts += torch.bincount(codes.flatten().cpu(), minlength=N_CODES)
    p = counts[counts > 0].float() / counts.sum()
    return {
        "steps": len(times),
        "train_step_ms": round(1000 * statistics.median(times[1:] or times), 1),
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": "cuda max_memory_allocated" if dev.type == "cuda" else "max RSS growth",
        "train_mse_first10": round(float(np.mean(losses[:10])), 5),
        "train_mse_last10": round(float(np.mean(losses[-10:])), 5),
        "val_psnr": round(float(psnr.aggregate().item()), 2),
        "val_code_usage": round(float((counts > 0).float().mean()), 4),
        "val_codes_used": int((counts > 0).sum()),
        "val_perplexity": round(float(torch.exp(-(p * p.log()).sum())), 1),
        "data": source,
        "quantizer": model.stats() if hasattr(model, "stats") else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=120.0, help="training seconds per model")
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --budget seconds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", type=int, nargs=3, default=(64, 64, 64), help="phantom volume shape")
    ap.add_argument("--crop", type=int, nargs=3, default=None, help="training crop (default: whole volume)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50,
                    help="linear learning-rate warm-up steps, all models (mrivq train's default; 0: none)")
    ap.add_argument("--grad-clip", type=float, default=1.0,
                    help="gradient-norm clip, all models (mrivq train's default; 0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per model run")
    ap.add_argument("--n-train", type=int, default=8)
    ap.add_argument("--n-val", type=int, default=4, help="held-out volumes (4 x 16^3 codes at 64^3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    ap.add_argument("--mrivq-kw", default="{}", help="JSON of extra mrivq VQVAE keywords (tuning)")
    ap.add_argument("--name", help=argparse.SUPPRESS)  # internal: run one model in this process
    args = ap.parse_args()
    if args.name:
        print(json.dumps(worker(args)))
        return
    results = {}
    for name in args.models.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--name", name] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {"device": args.device, "threads": args.threads, "torch": torch.__version__,
           "budget_s": args.budget, "shape": list(args.shape), "crop": args.crop, "batch_size": args.batch_size,
           "steps": args.steps or None, "lr": args.lr,
           "warmup": args.warmup, "grad_clip": args.grad_clip, "n_train": args.n_train, "n_val": args.n_val,
           "codes": N_CODES, "models": results}
    m = results.get("mrivq", {})
    monai_psnr = [r["val_psnr"] for k, r in results.items() if k.startswith("monai") and "val_psnr" in r]
    if "val_psnr" in m:
        out["target"] = {"mrivq_psnr_ge_monai": bool(monai_psnr) and m["val_psnr"] >= max(monai_psnr),
                         "mrivq_usage_ge_90pct": m["val_code_usage"] >= 0.9}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
