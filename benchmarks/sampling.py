"""Sampling speed: mrivq's cached incremental sampler vs its reference sampler vs MONAI's transformer.

For each cubic latent size and batch size it times

- ``cached``: :func:`mrivq.sample_tokens` with ``cached=True`` (Ramachandran et al. 2017);
- ``reference``: ``cached=False``, a full forward per position. Run in full only when its cost,
  measured on a prefix of positions (every position costs the same full forward), predicts at most
  ``--limit`` seconds; otherwise the prediction is reported with ``"extrapolated": true``;
- ``monai``: ``monai.inferers.VQVAETransformerInferer.sample`` with a ``DecoderOnlyTransformer`` of
  about the prior's parameter count, raster (identity) ordering and a tiny MONAI ``VQVAE`` whose latent
  has the requested size (its decode is included; it is tiny). MONAI reruns the transformer on the
  whole prefix at every step, so the step time grows with the prefix: it is measured at a few prefix
  lengths, fitted with ``a + b*L + c*L^2`` and summed over ``L = 1..N``; the sampler is run in full
  when that prediction is at most ``--limit`` seconds.

Prints one JSON document on stdout (progress on stderr). MONAI's transformer needs ``einops``
(``pip install einops``); without it the MONAI column is skipped. The default run takes about 6-8
minutes on 2 CPU cores::

    python benchmarks/sampling.py --threads 1 > sampling.json

It ends with volumes per minute (sampling plus decoding) for the default preset pairs, as
``synth_throughput.py`` measures them. (``--threads 1``: on a machine whose 2 cores are shared with
other jobs, 2 intra-op threads made a full forward up to 50x slower, which would flatter the cached
sampler.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # synth_throughput beside this file

from synth_throughput import PAIRS, measure  # noqa: E402

from mrivq.inference.draws import pick, sample_uniforms
from mrivq.inference.sampling import sample_tokens  # noqa: E402
from mrivq.models.pixelcnn import GatedPixelCNN  # noqa: E402


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Any, dev: torch.device) -> tuple[float, Any]:
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def reference_per_position(prior: GatedPixelCNN, shape: tuple[int, ...], b: int, dev: torch.device,
                           budget_s: float, max_positions: int) -> tuple[float, int]:
    """Seconds per position of the reference sampler, measured on a prefix (same loop as the sampler)."""
    n_pos = math.prod(shape)
    u = sample_uniforms(0, b, n_pos).to(dev)
    tokens = torch.zeros(b, *shape, dtype=torch.long, device=dev)
    flat = tokens.view(b, -1)
    with torch.no_grad():
        prior(tokens)  # warm-up
        sync(dev)
        t0, k, each = time.perf_counter(), 0, []
        while k < min(n_pos, max_positions) and (k < 5 or time.perf_counter() - t0 < budget_s):
            t, _ = timed(lambda k=k: flat.__setitem__((slice(None), k), pick(
                prior(tokens).flatten(2)[:, :, k], u[:, k], 1.0, None)), dev)
            each.append(t)
            k += 1
    return float(np.median(each)), k  # every position costs the same full forward; median resists noise


def build_monai(size: int, num_codes: int, target_params: int, dev: torch.device) -> dict:
    from monai.networks.nets import VQVAE, DecoderOnlyTransformer
    from monai.utils.ordering import Ordering, OrderingType

    n_pos = size ** 3
    # a tiny VQ-VAE with one stride-2 level: a (2*size)^3 image has a size^3 latent
    vq = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(8,), num_res_layers=1,
               num_res_channels=(8,), downsample_parameters=((2, 4, 1, 1),),
               upsample_parameters=((2, 4, 1, 1, 0),), num_embeddings=num_codes, embedding_dim=8)
    best = None
    for dim in (64, 96, 128, 160, 192, 256):  # width closest to the prior's parameter count, depth 8
        tf = DecoderOnlyTransformer(num_tokens=num_codes + 1, max_seq_len=n_pos + 1, attn_layers_dim=dim,
                                    attn_layers_depth=8, attn_layers_heads=8)
        if best is None or abs(params(tf) - target_params) < abs(params(best) - target_params):
            best = tf
    ordering = Ordering(ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=3, dimensions=(1,) + (size,) * 3)
    return {"vqvae": vq.to(dev).eval(), "transformer": best.to(dev).eval(), "ordering": ordering}


def monai_estimate(m: dict, size: int, b: int, num_codes: int, dev: torch.device, budget_s: float) -> dict:
    """Fit the per-step time of MONAI's sampler (a transformer forward on the prefix) and sum it.

    Prefix lengths 1, N/8, N/4, N/2, N are timed in turn (the fastest of 2 runs when a run is short);
    once ``budget_s`` is spent (and at least 3 lengths are timed) longer prefixes are extrapolated too.
    """
    tf, n_pos = m["transformer"], size ** 3
    lengths = sorted({1, max(2, n_pos // 8), max(3, n_pos // 4), max(4, n_pos // 2), n_pos})
    measured, times, spent = [], [], 0.0
    with torch.no_grad():
        tf(x=torch.zeros(b, 1, dtype=torch.long, device=dev))  # warm-up
        for L in lengths:
            if len(measured) >= 3 and spent > budget_s:
                break
            x = torch.randint(0, num_codes, (b, L), device=dev)
            t = timed(lambda x=x: tf(x=x), dev)[0]
            spent += t
            if t < 2.0:
                t2 = timed(lambda x=x: tf(x=x), dev)[0]
                spent, t = spent + t2, min(t, t2)
            measured.append(L)
            times.append(t)
    coef = np.polyfit(np.array(measured, float), np.array(times), 2)
    ls = np.arange(1, n_pos + 1, dtype=float)
    total = float(np.clip(np.polyval(coef, ls), min(times), None).sum())
    return {"predicted_s": total, "step_s_at": {str(L): t for L, t in zip(measured, times, strict=True)}}


def monai_sample(m: dict, size: int, b: int, num_codes: int, dev: torch.device) -> float:
    from monai.inferers import VQVAETransformerInferer

    start = torch.full((b, 1), num_codes, dtype=torch.long, device=dev)
    t, img = timed(lambda: VQVAETransformerInferer().sample(
        latent_spatial_dim=(size,) * 3, starting_tokens=start, vqvae_model=m["vqvae"],
        transformer_model=m["transformer"], ordering=m["ordering"], verbose=False), dev)
    assert img.shape == (b, 1) + (2 * size,) * 3
    return t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 16], help="cubic latent sizes")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="samples drawn together")
    ap.add_argument("--limit", type=float, default=180.0,
                    help="seconds a reference or MONAI run may take (per size and batch) before it is extrapolated")
    ap.add_argument("--prefix-budget", type=float, default=8.0, help="seconds spent measuring a reference prefix")
    ap.add_argument("--fit-budget", type=float, default=25.0,
                    help="seconds spent timing MONAI steps at long prefixes (longer ones are extrapolated)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="cached runs per setting (the fastest is kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--codes", type=int, default=512)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--positions", default=None, help="prior option positions (axes or grid)")
    ap.add_argument("--attention-every", type=int, default=0, help="prior option attention_every")
    ap.add_argument("--no-monai", action="store_true", help="skip MONAI's sampler")
    ap.add_argument("--preset-count", type=int, default=4,
                    help="volumes sampled and decoded per default preset pair (0: skip volumes per minute)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    def make_prior(shape: tuple[int, ...]) -> GatedPixelCNN:
        torch.manual_seed(0)
        return GatedPixelCNN(3, args.codes, channels=args.channels, num_layers=args.layers, latent_shape=shape,
                             positions=args.positions, attention_every=args.attention_every).to(dev).eval()

    prior = make_prior((4, 4, 4))
    sample_tokens(prior, (4, 4, 4), 1, seed=0)  # warm-up
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(dev),
               "torch": torch.__version__, "python": platform.python_version(),
               "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if dev.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(dev)
    monai_skipped = None
    try:
        import einops  # noqa: F401  (MONAI's transformer blocks need it)
        import monai

        machine["monai"] = monai.__version__
    except ImportError as e:
        monai_skipped, args.no_monai = f"{e} (pip install monai einops)", True
    results = []
    for size in args.sizes:
        shape, n_pos = (size,) * 3, size ** 3
        prior = make_prior(shape)
        monai_models = None if args.no_monai else build_monai(size, args.codes, params(prior), dev)
        for b in args.batches:
            row: dict[str, Any] = {"latent": list(shape), "positions": n_pos, "batch": b}
            runs = [timed(lambda b=b, shape=shape, prior=prior: sample_tokens(prior, shape, b, seed=0), dev)
                    for _ in range(args.repeats)]
            t_cached, fast = min(runs, key=lambda r: r[0])
            row["cached_s"] = round(t_cached, 3)
            row["cached_ms_per_position"] = round(1e3 * t_cached / n_pos, 4)
            log(f"{size}^3 b={b}: cached {t_cached:.2f}s")
            per_pos, k = reference_per_position(prior, shape, b, dev, args.prefix_budget, n_pos)
            predicted = per_pos * n_pos
            ref: dict[str, Any] = {"per_position_ms": round(1e3 * per_pos, 3), "measured_positions": k}
            if predicted <= args.limit:
                t_ref, slow = timed(lambda b=b, shape=shape, prior=prior: sample_tokens(
                    prior, shape, b, seed=0, cached=False), dev)
                ref.update(seconds=round(t_ref, 3), extrapolated=False, predicted_s=round(predicted, 3))
                row["identical_tokens"] = bool(torch.equal(fast, slow))
            else:
                ref.update(seconds=round(predicted, 3), extrapolated=True)
            row["reference"] = ref
            row["speedup_cached_vs_reference"] = round(ref["seconds"] / t_cached, 1)
            log(f"{size}^3 b={b}: reference {ref['seconds']:.1f}s{' (extrapolated)' if ref['extrapolated'] else ''}")
            if monai_models is not None:
                est = monai_estimate(monai_models, size, b, args.codes, dev, args.fit_budget)
                steps = {k_: round(v, 5) for k_, v in est["step_s_at"].items()}
                mon: dict[str, Any] = {"step_s_at_prefix_length": steps}
                if est["predicted_s"] <= args.limit:
                    t_m = monai_sample(monai_models, size, b, args.codes, dev)
                    mon.update(seconds=round(t_m, 3), extrapolated=False, predicted_s=round(est["predicted_s"], 3))
                else:
                    mon.update(seconds=round(est["predicted_s"], 3), extrapolated=True)
                tf = monai_models["transformer"]
                mon["transformer"] = {"attn_layers_dim": tf.attn_layers_dim, "attn_layers_depth": tf.attn_layers_depth,
                                      "attn_layers_heads": tf.attn_layers_heads, "parameters": params(tf)}
                row["monai"] = mon
                row["speedup_cached_vs_monai"] = round(mon["seconds"] / t_cached, 1)
                log(f"{size}^3 b={b}: monai {mon['seconds']:.1f}s{' (extrapolated)' if mon['extrapolated'] else ''}")
            results.append(row)
    presets = []
    for vq_name, prior_name in PAIRS if args.preset_count > 0 else []:
        presets.append(measure(vq_name, prior_name, args.preset_count, args.preset_count, dev))
        log(f"{vq_name} + {prior_name}: {presets[-1]['volumes_per_minute']} volumes/min")
    machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = {
        "benchmark": "sampling",
        "command": "python benchmarks/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "prior": {**prior.config, "parameters": params(prior)},
        "results": results,
        "volumes_per_minute": presets,
        "target": "cached >= 100x faster than reference at 16^3 on CPU",
        "notes": "reference and MONAI use torch_threads; on CPU the cached sampler uses one thread for batches < "
                 "64 (its ops are too small to gain from more). Times in seconds; seed 0; random-init prior.",
    }
    if monai_skipped:
        out["monai"] = {"skipped": monai_skipped}
    elif not args.no_monai:
        out["monai"] = {"sampler": "monai.inferers.VQVAETransformerInferer.sample (includes the tiny VQVAE decode)",
                        "transformer": "monai.networks.nets.DecoderOnlyTransformer, width closest to the prior's "
                                       "parameter count (position embeddings grow with the latent)",
                        "ordering": "monai.utils.ordering.Ordering raster_scan (identity)"}
    at16 = [r["speedup_cached_vs_reference"] for r in results if r["latent"] == [16, 16, 16]]
    if at16:
        out["target_met"] = min(at16) >= 100
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
