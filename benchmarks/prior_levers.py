"""Which prior options make samples real? Each lever trains a new prior on one run's VQ-VAE codes (the
same codes, steps and schedule), synthesizes ``--count`` volumes and measures them with ``mrivq eval
--samples`` against the run's held-out and training subjects. Prints JSON, one row per lever.

    python benchmarks/prior_levers.py --run runs/quickstart --root data \\
        --lever none='{}' --lever axes='{"positions": "axes"}' --lever attn='{"attention_every": 4}'

A lever is ``NAME=JSON`` of ``prior.model`` keys (``prior.train`` keys under ``"train"``; ``NAME={}``
is the run's own prior, measured without training it again; ``{"from": "OTHER", "decode_steps": 24}``
samples lever ``OTHER``'s trained prior with other sampling-time keys, without training). Each prior
trains in a copy of the run (``WORK/NAME``: config, run.json, VQ-VAE checkpoints and code cache),
so the run itself is untouched; a rerun resumes an unfinished prior and skips a finished one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.realism import KEEP, stage_seconds  # noqa: E402


def copy_stage1(run: Path, dst: Path, model: dict, train: dict) -> None:
    """``dst``: the run's stage 1 (config, run.json without the prior, VQ-VAE checkpoints, code cache,
    VQ-VAE metrics) with ``prior.model``/``prior.train`` updated."""
    (dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    for f in ("vqvae_best.pt", "vqvae_last.pt"):
        if (run / "checkpoints" / f).is_file():
            shutil.copy2(run / "checkpoints" / f, dst / "checkpoints" / f)
    if (run / "codes").is_dir():
        shutil.copytree(run / "codes", dst / "codes", dirs_exist_ok=True)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    prior = cfg.setdefault("prior", {})
    base = prior.get("model", {})
    if model.get("family", "pixelcnn") != base.get("family", "pixelcnn"):  # another family: its own options only
        from mrivq.models.factory import FAMILY_ONLY

        base = {k: v for k, v in base.items() if k not in FAMILY_ONLY[base.get("family", "pixelcnn")]}
    prior["model"] = {**base, **model}
    prior["train"] = {**prior.get("train", {}), **train}
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    info = json.loads((run / "run.json").read_text())
    info["model_config"].pop("prior", None)
    info.get("stages", {}).pop("prior", None)
    (dst / "run.json").write_text(json.dumps(info, indent=2))
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if '"stage": "vqvae"' in ln]
    (dst / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def copy_sampling_variant(src: Path, dst: Path, keys: dict) -> None:
    """``dst``: the trained lever ``src`` with the prior's sampling-time constructor keys (the maskgit
    family's ``decode_steps``, ``choice_temperature``) replaced in run.json; no training."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("samples*"))
    info = json.loads((dst / "run.json").read_text())
    info["model_config"]["prior"].update(keys)
    (dst / "run.json").write_text(json.dumps(info, indent=2))


def step_cost(run: Path, steps: int, batch: int = 8) -> float:
    """Median milliseconds of one training step (forward, backward, Adam) of the run's prior on its codes."""
    import statistics

    import torch
    import torch.nn.functional as F

    from mrivq.models.maskgit import masked_token_loss, random_masks
    from mrivq.runs.folder import codes_path
    from mrivq.runs.run import load_run

    prior = load_run(run, need_prior=True).prior.train()
    codes = torch.load(codes_path(run), weights_only=True)["train"][:batch].long()
    opt = torch.optim.Adam(prior.parameters(), lr=1e-4)
    masked = getattr(prior, "family", "pixelcnn") == "maskgit"
    mask = random_masks(len(codes), codes[0].numel(), torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        loss = masked_token_loss(prior, codes, mask) if masked else F.cross_entropy(prior(codes), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times[2:]), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained run (its VQ-VAE and codes are reused)")
    ap.add_argument("--root", type=Path, help="data root of the run's dataset")
    ap.add_argument("--work", type=Path, default=Path("levers"), help="folder for the lever runs and samples")
    ap.add_argument("--lever", action="append", default=[], help="NAME=JSON of prior.model keys (repeatable)")
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-only", action="store_true",
                    help="levers already trained and measured: only time a training step and `synth` again "
                         "(for a quiet machine)")
    ap.add_argument("--timing-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    from mrivq.evaluate.realism import evaluate_realism
    from mrivq.inference.synth import synthesize
    from mrivq.runs.run import load_run

    dataset = load_run(args.run).info["dataset"]
    rows = {}
    for spec in args.lever:
        name, _, kw = spec.partition("=")
        model = json.loads(kw or "{}")
        train = model.pop("train", {})
        dst = args.work / name
        if args.timing_only:
            t0 = time.perf_counter()
            synthesize(dst, args.count, dst / "samples-timing", seed=args.seed, overwrite=True, device="cpu")
            rows[name] = {"prior_ms_per_step": step_cost(dst, args.timing_steps),
                          "volumes_per_min": round(60 * args.count / (time.perf_counter() - t0), 1)}
            print(json.dumps({name: rows[name]}), file=sys.stderr)
            continue
        base = model.pop("from", None)
        done = (dst / "run.json").is_file() and json.loads((dst / "run.json").read_text()).get(
            "stages", {}).get("prior", {}).get("done")
        if base:  # a sampling variant of a trained lever: its checkpoints, other sampling keys in run.json
            copy_sampling_variant(args.work / base, dst, model)
        elif not done and not model and not train:  # no lever: the run's own prior, not trained again
            copy_stage1(args.run, dst, model, train)
            for f in ("prior_best.pt", "prior_last.pt"):
                shutil.copy2(args.run / "checkpoints" / f, dst / "checkpoints" / f)
            shutil.copy2(args.run / "run.json", dst / "run.json")
            shutil.copy2(args.run / "metrics.jsonl", dst / "metrics.jsonl")
        elif not done:
            resume = (dst / "checkpoints" / "prior_last.pt").is_file()
            if not resume:
                copy_stage1(args.run, dst, model, train)
            subprocess.run([sys.executable, "-m", "mrivq", "train", "--stage", "prior", "--run", str(dst),
                            *(["--resume"] if resume else []), "--device", "cpu"], check=True)
        info = json.loads((dst / "run.json").read_text())
        t0 = time.perf_counter()
        synthesize(dst, args.count, dst / "samples", seed=args.seed, overwrite=True, device="cpu")
        synth_s = time.perf_counter() - t0
        m = evaluate_realism(dst, dst / "samples", f"{dataset}:val", f"{dataset}:train", root=args.root)["metrics"]
        prior = load_run(dst, need_prior=True).prior
        rows[name] = {**{k: m.get(k) for k in KEEP}, "lever": model, "prior_seconds": stage_seconds(dst).get("prior"),
                      "prior_val_nats": info["stages"]["prior"]["val"].get("val_nats_per_token"),
                      "prior_val_masked_nats": info["stages"]["prior"]["val"].get("val_masked_nats"),
                      "prior_params": sum(p.numel() for p in prior.parameters()),
                      "volumes_per_min": round(60 * args.count / synth_s, 1)}
        print(json.dumps({name: rows[name]}), file=sys.stderr)
    text = json.dumps({"run": str(args.run), "command": "python " + " ".join(sys.argv), "rows": rows}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
