"""Peak memory of one stage-1 training step at 1 mm (``vqvae3d-t1-1mm``: 160x192x160, 3 levels), measured
on the CPU with the preset's architecture at reduced channel widths, with and without activation
checkpointing, then extrapolated to the preset's widths. Prints JSON.

    python benchmarks/memory_1mm.py                       # widths 1/8 and 1/4 of the preset, batch 1
    python benchmarks/memory_1mm.py --scales 0.125 --batch 2

Each configuration runs in a fresh process: peak resident memory (``ru_maxrss``) after a forward, backward
and Adam step, minus the process's resident memory before the step (model, optimizer state and input
already allocated). Activations dominate and grow linearly with the channel widths, so the step memory at
the preset's widths is the measured figure times 1/scale (the two scales check that). What fits a GPU is
that plus the model, its gradients and Adam's two moments (4 x parameters x 4 bytes) and about 1 GB of
CUDA context; GPU kernels' workspaces and the allocator's fragmentation are not in it, so treat the result
as a lower bound with a 20% margin.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def one(scale: float, checkpointing: bool, batch: int, amp: bool) -> dict:
    import time

    import torch
    import torch.nn.functional as F

    from mrivq import config as C
    from mrivq.models.vqvae import VQVAE

    cfg = C.load_preset("vqvae3d-t1-1mm")
    m = dict(cfg["model"])
    full = m["channels"]
    m["channels"] = [max(1, round(c * scale)) for c in m["channels"]]
    m["num_res_channels"] = [max(1, round(c * scale)) for c in m["num_res_channels"]]
    m["checkpointing"] = checkpointing
    model = VQVAE(spatial_dims=3, in_channels=1, **m)
    params = sum(p.numel() for p in model.parameters())
    full_params = sum(p.numel() for p in VQVAE(spatial_dims=3, in_channels=1, **{**cfg["model"]}).parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, *cfg["data"]["shape"])
    model.train()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    with ctx:
        x_hat, vq = model(x)
        loss = F.l1_loss(x_hat.float(), x) + vq
    loss.backward()
    opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"scale": scale, "channels": m["channels"], "preset_channels": full, "checkpointing": checkpointing,
            "batch": batch, "bf16": amp, "params": params, "preset_params": full_params,
            "step_memory_mb": round((peak - before) / 1024, 1), "step_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", default="0.125,0.25", help="channel-width fractions of the preset")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as on GPUs)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.one:
        scale, ck = args.one.split(":")
        print(json.dumps(one(float(scale), ck == "1", args.batch, args.bf16)))
        return
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        for ck in (False, True):
            cmd = [sys.executable, __file__, "--one", f"{scale}:{int(ck)}", "--batch", str(args.batch),
                   *(["--bf16"] if args.bf16 else [])]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    est = {}
    for ck in (False, True):
        rs = [r for r in rows if r["checkpointing"] == ck]
        per = [r["step_memory_mb"] / r["scale"] for r in rs]  # linear in the widths
        model_mb = rs[0]["preset_params"] * 4 * 4 / 2**20
        est["checkpointing" if ck else "plain"] = {
            "step_activations_mb_at_preset_widths": [round(v) for v in per],
            "model_grads_adam_mb": round(model_mb),
            "total_gb_per_gpu_lower_bound": round((max(per) + model_mb) / 1024 + 1.0, 1)}
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "batch_per_gpu": args.batch, "rows": rows, "estimate": est, "command": "python " + " ".join(sys.argv)}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
