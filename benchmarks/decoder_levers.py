"""Does a sharper decoder make reconstructions more real? Stage 1 of the README's CPU recipe trained with
each decoder lever at the same number of steps, then ``mrivq eval --samples``'s metrics for the VQ-VAE's
reconstructions of training scans against held-out subjects (the ceiling any prior's samples can reach:
a sample is no sharper than the decoder). Prints JSON.

    python benchmarks/decoder_levers.py --root data --work /tmp/decoder
    python benchmarks/decoder_levers.py --root data --work /tmp/decoder \
        --lever l1+adv=train.recon_loss=l1,train.adversarial_weight=0.01

Levers (``--lever NAME=KEY=VALUE,KEY=VALUE``, repeatable; default: the set below): the reconstruction
loss (``train.recon_loss``) and a patch discriminator (``train.adversarial_weight``, MONAI's
``PatchDiscriminator`` with the least-squares GAN loss, from ``train.adversarial_start``). Each row also
gives validation PSNR/SSIM and the stage's wall-clock seconds. Memorization is not meaningful here
(reconstructions of training scans are copies by construction) and is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import cli, emit  # noqa: E402
from benchmarks.realism import KEEP, recon_row  # noqa: E402

LEVERS = {
    "mse": "",
    "l1": "train.recon_loss=l1",
    "mse+adv0.002": "train.adversarial_weight=0.002,train.adversarial_start=100",
    "mse+adv0.01": "train.adversarial_weight=0.01,train.adversarial_start=100",
    "l1+adv0.01": "train.recon_loss=l1,train.adversarial_weight=0.01,train.adversarial_start=100",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="data root holding the fetched phantom")
    ap.add_argument("--work", type=Path, required=True, help="folder for the runs and reconstructions")
    ap.add_argument("--preset", default="vqvae3d-cpu")
    ap.add_argument("--steps", type=int, default=400, help="stage-1 steps of every lever (equal budget)")
    ap.add_argument("--count", type=int, default=24, help="reconstructions per row")
    ap.add_argument("--lever", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE (repeatable)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    from mrivq.evaluate.realism import evaluate_realism
    from mrivq.runs.folder import read_run_info

    levers = dict(lv.split("=", 1) for lv in args.lever) if args.lever else LEVERS
    rows: dict[str, dict] = {}
    for name, sets in levers.items():
        run = args.work / "runs" / name.replace("+", "_")
        if not (run / "run.json").is_file() or not read_run_info(run).get("stages", {}).get("vqvae", {}).get("done"):
            t0 = time.perf_counter()
            extra = [a for kv in sets.split(",") if kv for a in ("--set", kv)]
            cli("train", "--dataset", "phantom", "--root", str(args.root), "--preset", args.preset, "--stage",
                "vqvae", "--max-steps", str(args.steps), "--device", "cpu", "--out", str(run), *extra,
                *(["--resume"] if (run / "run.json").is_file() else []))
            (run / "bench_seconds.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
        folder = args.work / "recon" / name.replace("+", "_")
        recon_row(run, args.count, folder, which="last")
        res = evaluate_realism(run, folder, "phantom:val", "phantom:train", root=args.root)["metrics"]
        val = read_run_info(run)["stages"]["vqvae"]["val"]
        seconds = json.loads((run / "bench_seconds.json").read_text())["seconds"] \
            if (run / "bench_seconds.json").is_file() else None
        rows[name] = {"set": sets, "val_psnr": val.get("val_psnr"), "val_ssim": val.get("val_ssim"),
                      "train_seconds": seconds,
                      **{k: res.get(k) for k in KEEP if not k.startswith("memorization")}}
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    emit({"steps": args.steps, "rows": rows}, args.out)

if __name__ == "__main__":
    main()
