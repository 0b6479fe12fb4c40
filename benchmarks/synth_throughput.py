"""Volumes per minute that ``mrivq synth`` produces with the default presets (sample codes + decode).

Builds the VQ-VAE and prior of each preset pair at its configured size (random weights: speed does not
depend on what was learned), then times :func:`mrivq.sample_tokens` (cached sampler) and
``VQVAE.decode_indices`` for ``--count`` volumes. Prints JSON. Example (about 1-2 minutes on 2 cores)::

    python benchmarks/synth_throughput.py --count 4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import emit  # noqa: E402
from mrivq.config.presets import load_preset  # noqa: E402
from mrivq.inference.sampling import sample_tokens  # noqa: E402
from mrivq.models.pixelcnn import GatedPixelCNN  # noqa: E402
from mrivq.models.vqvae import VQVAE  # noqa: E402

PAIRS = [("vqvae3d-cpu", "prior3d-cpu"), ("vqvae3d-t1", "prior3d-t1")]


def measure(vq_name: str, prior_name: str, count: int, batch: int, dev: torch.device) -> dict:
    cfg = load_preset(vq_name)
    data, mcfg = cfg["data"], dict(cfg["model"])
    vq = VQVAE(spatial_dims=data["dims"], in_channels=1, **mcfg).to(dev).eval()
    shape = tuple(data["shape"])
    latent = tuple(vq.latent_shape(shape))
    pcfg = dict(load_preset(prior_name)["prior"]["model"])
    if pcfg.get("positions"):  # position embeddings are tied to the code grid, as mrivq train sets it
        pcfg["latent_shape"] = list(latent)
    # vq.num_embeddings: the codebook's size, or the product of the FSQ levels
    prior = GatedPixelCNN(spatial_dims=data["dims"], num_embeddings=vq.num_embeddings, **pcfg).to(dev).eval()
    sample_tokens(prior, latent, 1, seed=0, device=dev)  # warm-up
    t0 = time.perf_counter()
    tokens = sample_tokens(prior, latent, count, seed=0, batch_size=batch, device=dev)
    t1 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, count, batch):
            vq.decode_indices(tokens[s:s + batch].to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    total = t2 - t0
    return {"vqvae_preset": vq_name, "prior_preset": prior_name, "image_shape": list(shape),
            "latent_shape": list(latent), "count": count, "batch_size": batch,
            "sample_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3),
            "volumes_per_minute": round(60 * count / total, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", nargs="*", default=[v for v, _ in PAIRS])
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    rows = [measure(v, p, a.count, a.batch_size, dev) for v, p in PAIRS if v in a.presets]
    emit({"benchmark": "synth_throughput", "device": str(dev), "platform": platform.platform(),
          "loadavg": list(os.getloadavg()), "results": rows}, a.out)


if __name__ == "__main__":
    main()
