"""Memory of one stage-1 training step at 1 mm (``vqvae3d-t1-1mm``: 160x192x160, 3 levels, channels 64-128-256),
measured on the CPU at the preset's full size and widths, with and without activation checkpointing, fp32 and
bf16 autocast. Prints JSON; says what batch fits a 24 GB and an 80 GB GPU.

    python benchmarks/memory_1mm.py --out benchmarks/results/memory_1mm_cpu.json
    python benchmarks/memory_1mm.py --scale 0.25          # quicker: a quarter of the widths

What is measured, exactly: the bytes of every tensor autograd saves for the backward pass during one
forward of one volume (``torch.autograd.graph.saved_tensors_hooks``; the hook keeps only the size, so the
forward runs at full size without holding the activations). That is the memory a training step holds at its
peak, between forward and backward. Under checkpointing autograd keeps only each block's input, and the
backward recomputes one block at a time, so its peak adds the largest block's own saved bytes (measured the
same way, block by block). Model, gradients and Adam's two moments add 4 x parameters x 4 bytes, CUDA's
context about 1 GB. Kernel workspaces and allocator fragmentation are not counted: keep a 20% margin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import emit  # noqa: E402

GB = 2**30


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward while running ``fn(x)`` (nothing is kept)."""
    total = [0]

    def pack(t: torch.Tensor):
        total[0] += t.numel() * t.element_size()
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        fn(x)
    return total[0]


def measure(scale: float, bf16: bool) -> dict:
    from mrivq.config import presets as C
    from mrivq.models.vqvae import VQVAE

    cfg = C.load_preset("vqvae3d-t1-1mm")
    m = dict(cfg["model"])
    for k in ("channels", "num_res_channels"):
        m[k] = [max(1, round(c * scale)) for c in m[k]]
    model = VQVAE(spatial_dims=3, in_channels=1, **{**m, "checkpointing": False}).train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 1, *cfg["data"]["shape"], requires_grad=False)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else (
        lambda: torch.autocast("cpu", enabled=False))
    t0 = time.perf_counter()
    with ctx():
        plain = saved_bytes(model, x)
        # checkpointing keeps each block's input; the backward recomputes the largest block on its own
        inputs, largest = 0, 0
        h = x
        for net in (model.encoder, model.decoder):
            if net is model.decoder:
                h = model.quantizer(h)[0].detach()
            for block in net.blocks:
                inputs += h.numel() * h.element_size()
                largest = max(largest, saved_bytes(block, h))
                with torch.no_grad():
                    h = block(h)
        quant = saved_bytes(lambda z: model.quantizer(model.encoder(z)), x) - saved_bytes(model.encoder, x)
    return {"scale": scale, "channels": m["channels"], "bf16": bf16, "params": params,
            "saved_for_backward_gb": round(plain / GB, 2),
            "checkpointed_peak_gb": round((inputs + largest + max(quant, 0)) / GB, 2),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="channel widths as a fraction of the preset's")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    rows = []
    for bf16 in (False, True):
        rows.append(measure(args.scale, bf16))
        print(json.dumps(rows[-1]), file=sys.stderr)
    fits = {}
    for r in rows:
        fixed = 4 * r["params"] * 4 / GB + 1.0  # weights, grads, Adam moments; CUDA context
        for key, per in (("plain", r["saved_for_backward_gb"]), ("checkpointing", r["checkpointed_peak_gb"])):
            for gpu in (24, 80):
                usable = gpu / 1.2 - fixed  # 20% margin
                fits[f"{'bf16' if r['bf16'] else 'fp32'} {key}, {gpu} GB"] = max(0, int(usable // per))
    emit({"preset": "vqvae3d-t1-1mm", "rows": rows, "batch_per_gpu_that_fits": fits}, args.out)

if __name__ == "__main__":
    main()
