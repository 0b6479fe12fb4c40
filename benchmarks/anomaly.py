"""Does healing find lesions? ``mrivq eval --anomaly`` on lesion phantoms for a run trained on healthy
phantoms with the README's CPU recipe, with every baseline in the same run. Prints JSON.

    python benchmarks/anomaly.py --work /tmp/anomaly                  # fetch + quick start, then all rows
    python benchmarks/anomaly.py --run runs/quickstart --root data --thresholds 0.001,0.01,0.05

Rows: ``healed@T`` (the healed residual, Pinaya et al. 2022, for each code-probability threshold T),
``residual`` (the VQ-VAE's reconstruction residual alone), ``nll`` (mrivq's per-code NLL, upsampled)
and ``monai-nll`` (MONAI's ``VQVAE`` + ``DecoderOnlyTransformer`` trained for the run's stage
budgets, the map of ``VQVAETransformerInferer.get_likelihood``, as negative log-likelihood). All are
measured on the held-out half of the lesion subjects (``phantom-lesions:val``) with the Dice threshold
chosen on the other half; the targets: healed AUPRC at least twice the residual's, best Dice at
least 0.5 for lesions of 1 cm and more.
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

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import cli, emit, quickstart_run  # noqa: E402

KEEP = ("auprc", "auroc", "best_dice", "dice")


def summary(method: dict) -> dict:
    """Pooled figures, best Dice of lesions >= 1 cm and per kind AUPRC / best Dice."""
    out = {k: method["pooled"].get(k) for k in KEEP}
    big = {k: v for k, v in method["sizes"].items() if k in ("10-20 mm", ">=20 mm")}
    out["best_dice_by_size"] = {k: v["best_dice"] for k, v in method["sizes"].items()}
    out["auprc_by_kind"] = {k: v["auprc"] for k, v in method["kinds"].items()}
    out["best_dice_by_kind"] = {k: v["best_dice"] for k, v in method["kinds"].items()}
    out["n_subjects_1cm"] = sum(v["n_subjects"] for v in big.values())
    return out


def monai_rows(run: Path, root: Path, dataset: str, split: str, seed: int, smooth: float) -> dict:
    """MONAI's transformer likelihood map on the same subjects, region, smoothing and calibration as eval."""
    from monai.inferers import VQVAETransformerInferer

    from benchmarks.realism import stage_seconds, train_monai
    from mrivq.data.restore import preprocess_file, restore
    from mrivq.evaluate.anomaly import (
        brain_values_of,
        calibrated_threshold,
        lesion_items,
        split_items,
        truth_and_region,
    )
    from mrivq.inference.heal import smooth_map
    from mrivq.metrics.anomaly import anomaly_metrics
    from mrivq.runs.run import load_run

    r = load_run(run)
    m = train_monai(run, stage_seconds(run), seed)
    ddir = root / dataset
    measured, calib = split_items(lesion_items(ddir, list(r.preprocess.modalities)), split)
    brain = brain_values_of(ddir)
    inferer = VQVAETransformerInferer()

    def maps(items: list[dict]) -> tuple[list, list, list]:
        out = ([], [], [])
        for it in items:
            x, ctx = preprocess_file(ddir / it["sources"][0]["path"], r.preprocess)
            with torch.no_grad():
                lik = inferer.get_likelihood(
                    inputs=torch.as_tensor(x)[None].float(), vqvae_model=m["vqvae"],
                    transformer_model=m["transformer"], ordering=m["ordering"],
                    resample_latent_likelihoods=True,
                    resample_interpolation_mode="trilinear")
            nll = smooth_map(-lik, smooth)[0]  # get_likelihood returns log-likelihoods
            xm = torch.as_tensor(x)
            head = (xm.amax(0, keepdim=True) > 0.05).float()
            arr, _ = restore(nll * head, ctx, intensity=False)
            hd, _ = restore(head, ctx, intensity=False)
            shape = arr.shape[:3]
            mask, region = truth_and_region(ddir, it, hd.reshape(shape) > 0.5, brain)
            out[0].append(arr.reshape(shape))
            out[1].append(mask > 0)
            out[2].append(region)
        return out

    t0 = time.perf_counter()
    mp, tr, rg = maps(measured)
    thr = calibrated_threshold(*maps(calib)) if calib else None
    res = anomaly_metrics(mp, tr, rg, threshold=thr)["pooled"]
    return {**{k: res.get(k) for k in KEEP}, "seconds": round(time.perf_counter() - t0, 1), **m["record"]}


def _option(key: str, value: str) -> Any:
    """A ``--variant`` value as its HealOptions type."""
    if key == "against":
        return value
    if key in ("calibrate", "normalize"):
        return value.lower() in ("1", "true")
    return float(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run trained on healthy phantoms (default: the quick start in --work)")
    ap.add_argument("--root", type=Path, help="data root holding the lesion dataset (default: --work/data)")
    ap.add_argument("--work", type=Path, help="folder for data and the run (default: a temp folder)")
    ap.add_argument("--dataset", default="phantom-lesions")
    ap.add_argument("--split", default="val")
    ap.add_argument("--count", type=int, default=24, help="lesion subjects to generate")
    ap.add_argument("--thresholds", default="0.05", help="healing thresholds (code probability), comma-separated")
    ap.add_argument("--resamples", type=int, default=4)
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra healed row with these HealOptions, e.g. threshold=0.05,smooth=1 (repeatable)")
    ap.add_argument("--no-baselines", action="store_true", help="only the healed rows")
    ap.add_argument("--no-monai", action="store_true", help="skip MONAI's transformer row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    from mrivq.evaluate.anomaly import evaluate_anomaly
    from mrivq.inference.heal import HealOptions

    work = args.work or Path(tempfile.mkdtemp(prefix="mrivq-anomaly-"))
    work.mkdir(parents=True, exist_ok=True)
    root = args.root or work / "data"
    run = args.run or quickstart_run(work / "run", root)
    if not (root / args.dataset / "manifest.csv").is_file():
        cli("fetch", "phantom", "--lesions", "--name", args.dataset, "--count", str(args.count), "--seed", "1",
            "--root", str(root))
    rows: dict[str, dict] = {}
    specs = [(f"healed@{t}", {"threshold": float(t)}) for t in args.thresholds.split(",") if t]
    for v in args.variant:
        kw = dict(kv.split("=", 1) for kv in v.split(","))
        specs.append((f"healed[{v}]", {k: _option(k, val) for k, val in kw.items()}))
    for i, (name, kw) in enumerate(specs):
        kw = {"resamples": args.resamples, "seed": args.seed, **kw}
        kw["resamples"], kw["seed"] = int(kw["resamples"]), int(kw["seed"])
        if "erode" in kw:
            kw["erode"] = int(kw["erode"])
        t0 = time.perf_counter()
        res = evaluate_anomaly(run, f"{args.dataset}:{args.split}", root=root, device="cpu", overwrite=True,
                               opts=HealOptions(**kw), json_out=work / f"anomaly_{i}.json")["metrics"]
        rows[name] = {**summary(res["methods"]["healed"]), "seconds": round(time.perf_counter() - t0, 1),
                      "n_subjects": res["n_subjects"], "options": res["heal"]}
        if i == 0 and not args.no_baselines:  # the baselines do not depend on the healing options
            rows["residual"] = summary(res["methods"]["residual"])
            rows["nll"] = summary(res["methods"]["nll"])
        if "normative" in res["methods"] and not args.no_baselines:  # the first spec that normalizes
            rows.setdefault("normative", summary(res["methods"]["normative"]))
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    if not args.no_monai:
        first = rows[specs[0][0]]["options"]["smooth"] if specs else HealOptions().smooth
        rows["monai-nll"] = monai_rows(run, root, args.dataset, args.split, args.seed, first)
    base = rows["residual"]["auprc"] if "residual" in rows else None
    ratios = {k: v["auprc"] / base for k, v in rows.items()
              if k.startswith("healed") and base and v.get("auprc") is not None}
    emit({"run": str(run), "dataset": f"{args.dataset}:{args.split}", "rows": rows,
          "healed_auprc_over_residual": ratios}, args.out)


if __name__ == "__main__":
    main()
