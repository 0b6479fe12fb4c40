"""What samples hold inside the brain at a fixed CPU budget: how the split of training time between the VQ-VAE and
the prior decides what samples hold, on held-out real anatomy (the deformed ICBM152 cohort of
``benchmarks/anatomy_cohort.py``: 52 subjects train, 12 held out, aligned to ICBM152 by the presets).

Each arm trains both stages, synthesizes, and runs ``mrivq eval --samples`` against the 12 held-out scans
(controls: 24 training scans read as samples, and their reconstructions). Arms: the presets
(quick start, one hour) and, at their budgets, the levers: the split between the stages, a smaller codebook,
finite scalar quantization, finer codes (8 mm cells), prior dropout, a patch discriminator. Figures per arm:
stage times, val PSNR, prior held-out nats per token, C2ST of samples and of reconstructions, tissue Dice gap,
ventricles present, MS-SSIM, memorization, head-mask Dice, synth volumes per minute, and a goals table (each
figure against its bar, met or missed, with the real-as-samples control against the same bars). Resumable: a
finished step is not run again; an interrupted training resumes.

    python benchmarks/anatomy.py --work bench/anatomy --out benchmarks/results/anatomy_cpu_2cores.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.anatomy_cohort import write_cohort  # noqa: E402
from benchmarks.common import cli, emit  # noqa: E402
from benchmarks.realism import stage_seconds  # noqa: E402
from benchmarks.report import pick  # noqa: E402

HELD_OUT = 12 / 64  # val_fraction: 12 of the cohort's 64 subjects
STAGE1_HEAVY = ["train.max_steps=800", "train.val_every=200", "train.ckpt_every=200", "prior.train.max_steps=240",
                "prior.train.batch_size=4", "prior.train.val_every=60", "prior.train.ckpt_every=60"]
FSQ = ["model.quantizer=fsq", "model.fsq_levels=[8,6,5]"]  # finite scalar quantization, 240 codes of 3 channels
FSQ_SPLIT = ["train.max_steps=600", "train.val_every=150", "train.ckpt_every=150", "prior.train.max_steps=200",
             "prior.train.val_every=50", "prior.train.ckpt_every=50"]
HOUR = "one hour (vqvae3d-cpu-hour): FSQ 8x6x5, prior dropout 0.2"
ARMS: dict[str, dict] = {
    # the one-hour preset's network and steps with a learned codebook of 512 and no prior dropout
    "one hour, learned codebook: 512 codes, no prior dropout": {"preset": "vqvae3d-cpu-hour",
                                                                "sets": ["model.quantizer=ema",
                                                                         "prior.model.dropout=0"]},
    # ten minutes split the other way: most of it to stage 1
    "ten minutes, stage-1-heavy: stage 1 800 steps, prior 240 steps of 4": {"preset": "vqvae3d-cpu",
                                                                             "sets": STAGE1_HEAVY},
    "quick start (vqvae3d-cpu): stage 1 250 steps, prior 280 steps of 8": {"preset": "vqvae3d-cpu", "sets": []},
    # codes easier to model at the stage-1-heavy split: a quarter of the codebook
    "ten minutes, stage-1-heavy, 128 codes": {"preset": "vqvae3d-cpu", "sets": [*STAGE1_HEAVY,
                                                                                 "model.num_embeddings=128"]},
    # finite scalar quantization (Mentzer et al. 2023), its 2^8 setting: 240 codes of 3 channels
    "quick start, FSQ 8x6x5": {"preset": "vqvae3d-cpu", "sets": FSQ},
    # finer codes: one downsampling, so 8 mm code cells (a 24x28x24 grid, 8x the tokens); the prior sees the
    # same tokens per step as the quick start's 8 coarse grids
    "quick start, 8 mm code cells: one downsampling, prior 280 steps of 1 grid": {
        "preset": "vqvae3d-cpu", "sets": ["model.channels=[32]", "model.num_res_channels=[32]",
                                          "prior.train.batch_size=1"]},
    # the one-hour preset: codes easier to model, and a prior slower to memorise the training grids
    HOUR: {"preset": "vqvae3d-cpu-hour", "sets": []},
    "quick start, FSQ 8x6x5, prior dropout 0.2": {"preset": "vqvae3d-cpu", "sets": [*FSQ, "prior.model.dropout=0.2"]},
    # FSQ's codes are learned by the prior in ~200 steps: the rest of the ten minutes to stage 1, for sharper
    # reconstructions (the ventricles are filled in at 250 steps)
    "ten minutes, FSQ 8x6x5: stage 1 600 steps, prior 200 steps of 8": {"preset": "vqvae3d-cpu",
                                                                       "sets": [*FSQ, *FSQ_SPLIT]},
    # the same ten minutes with a patch discriminator (least-squares GAN, weight 0.01 from step 100), which
    # about halves stage 1's steps per second: 320 steps
    "ten minutes, FSQ 8x6x5, patch discriminator: stage 1 320 steps, prior 200 steps of 8": {
        "preset": "vqvae3d-cpu", "sets": [*FSQ, *FSQ_SPLIT, "train.max_steps=320", "train.val_every=80",
                                          "train.ckpt_every=80", "train.adversarial_weight=0.01",
                                          "train.adversarial_start=100"]},
    # sampling only: the one-hour preset's run sampled hotter (synth --temperature), for diversity
    "one hour, sampled at temperature 1.1": {"samples_from": HOUR, "synth": ["--temperature", "1.1"]},
    # prior levers on FSQ codes at the quick start's budget: causal attention every 4 gated layers (a third
    # more time per step: 210 steps), and the parallel-decoding MaskGIT family
    "quick start, FSQ 8x6x5, prior attention every 4 layers (210 steps of 8)": {
        "preset": "vqvae3d-cpu", "sets": [*FSQ, "prior.model.attention_every=4", "prior.train.max_steps=210"]},
    "quick start, FSQ 8x6x5, MaskGIT prior": {"preset": "vqvae3d-cpu", "sets": [*FSQ, "prior.model.family=maskgit"]},
    # a wider prior (64 channels, about 1.8x the time per step: 160 steps of 8 in the same time)
    "quick start, FSQ 8x6x5, wider prior (64 channels, 160 steps of 8)": {
        "preset": "vqvae3d-cpu", "sets": [*FSQ, "prior.model.channels=64", "prior.train.max_steps=160",
                                          "prior.train.val_every=40", "prior.train.ckpt_every=40"]},
}
REALISM = ("c2st_accuracy", "c2st_texture_accuracy", "mmd", "mmd_floor", "ms_ssim_synth", "ms_ssim_real",
           "mask_dice_synth", "mask_dice_real", "tissue_in_range", "memorization", "tissue_dice_gap",
           "ventricles_present", "anatomy")
CONTROL = ("c2st_accuracy", "c2st_texture_accuracy", "tissue_dice_gap", "ventricles_present", "ms_ssim_synth",
           "mask_dice_synth")



#: the goals at a preset's budget: (name, the figure from an arm's row, the test it must pass)
GOALS: list[tuple[str, Callable[[dict], float | None], Callable[[float], bool]]] = [
    # one-sided: reconstructions harder to tell from the held-out scans than the training scans are pass
    ("C2ST of training scans' reconstructions - control <= 0.1",
     lambda r: _gap(r, ("controls", "reconstructions", "c2st_accuracy"),
                    ("controls", "real_as_samples", "c2st_accuracy"), signed=True), lambda v: v <= 0.1),
    ("tissue Dice gap <= 0.05", lambda r: _at(r, ("samples", "tissue_dice_gap")), lambda v: v <= 0.05),
    ("ventricles present >= 0.9", lambda r: _at(r, ("samples", "ventricles_present")), lambda v: v >= 0.9),
    ("MS-SSIM - real's <= 0.05", lambda r: _gap(r, ("samples", "ms_ssim_synth"), ("samples", "ms_ssim_real")),
     lambda v: v <= 0.05),
    ("memorization >= 0.7", lambda r: _at(r, ("samples", "memorization")), lambda v: v >= 0.7),
    ("head-mask Dice - real's <= 0.03", lambda r: _gap(r, ("samples", "mask_dice_synth"),
                                                       ("samples", "mask_dice_real")), lambda v: v <= 0.03),
    ("C2ST <= 0.75", lambda r: _at(r, ("samples", "c2st_accuracy")), lambda v: v <= 0.75),
    ("synth volumes per minute (the synth command, start-up included) >= 100",
     lambda r: _at(r, ("synth_volumes_per_minute",)), lambda v: v >= 100),
]


def _at(row: dict, path: tuple[str, ...]) -> float | None:
    v = pick(row, path)
    return float(v) if isinstance(v, (int, float)) else None


def _gap(row: dict, a: tuple[str, ...], b: tuple[str, ...], signed: bool = False) -> float | None:
    x, y = _at(row, a), _at(row, b)
    return None if x is None or y is None else (x - y if signed else abs(x - y))


def goals(row: dict) -> dict[str, str]:
    """Each goal's figure for one arm and whether it is met (a dash where the arm lacks the figure)."""
    out = {}
    for name, get, ok in GOALS:
        v = get(row)
        out[name] = "—" if v is None or not math.isfinite(v) else f"{v:.3g} {'met' if ok(v) else 'missed'}"
    return out


def slug(name: str) -> str:
    """An arm's picture name: its name before any ``(`` or ``:``, in lower case with underscores."""
    return re.sub(r"[^a-z0-9]+", "_", name.split("(")[0].split(":")[0].lower()).strip("_")


def run_figures(run: Path) -> dict:
    """Stage wall times (first to last logged row), the last val PSNR and the best prior held-out nats."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict = {}
    seconds = stage_seconds(run)
    for stage in ("vqvae", "prior"):
        r = [x for x in rows if x.get("stage") == stage]
        if r:
            out[f"{stage}_steps"] = max(x.get("step", 0) for x in r)
            out[f"{stage}_seconds"] = round(seconds[stage], 1)
    psnr = [x["val_psnr"] for x in rows if "val_psnr" in x]
    nats = [x["val_nats_per_token"] for x in rows if "val_nats_per_token" in x]
    out["val_psnr"] = round(psnr[-1], 2) if psnr else None
    out["prior_val_nats_best"] = round(min(nats), 3) if nats else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--arms", nargs="*", help="run only these arms (names as in ARMS)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra train --set (smoke runs)")
    a = ap.parse_args()
    root = a.work / "data"
    log = a.work / "times.json"
    a.work.mkdir(parents=True, exist_ok=True)
    times = json.loads(log.read_text()) if log.is_file() else {}

    def step(key: str, *args: str) -> None:
        if key not in times:
            times[key] = round(cli(*args), 1)
            log.write_text(json.dumps(times, indent=2))

    if not (root / "icbm-cohort" / "manifest.csv").is_file():
        card = write_cohort(a.work / "cohort", a.count)
        cli("fetch", str(card), "--from", str(a.work / "cohort" / "scans"), "--root", str(root))
    rows = {}
    for i, (name, arm) in enumerate(ARMS.items()):
        if a.arms and name not in a.arms:
            continue
        trained = arm.get("samples_from", name)  # a sampling-only arm samples another arm's run
        run = a.work / f"run{list(ARMS).index(trained)}"
        if trained == name:
            sets = [x for s in [f"train.val_fraction={HELD_OUT}", *arm["sets"], *a.sets] for x in ("--set", s)]
            step(f"train {name}", "train", "--dataset", "icbm-cohort", "--root", str(root), "--preset",
                 arm["preset"], "--out", str(run), "--device", "cpu", *sets,
                 *(["--resume"] if (run / "run.json").exists() else []))
        samples = a.work / f"samples{i}"
        step(f"synth {name}", "synth", "--run", str(run), "--count", str(a.samples), "--out", str(samples),
             "--device", "cpu", "--overwrite", *arm.get("synth", []))
        real = a.work / f"realism{i}.json"
        step(f"realism {name}", "eval", "--run", str(run), "--samples", str(samples), "--root", str(root),
             "--train", "icbm-cohort:train", "--json", str(real), "--overwrite", "--device", "cpu")
        r = json.loads(real.read_text())
        picture = None
        if a.out and real.with_suffix(".png").is_file():  # samples beside their nearest real scans, 3 planes
            picture = a.out.parent / f"anatomy_{slug(name)}.png"
            shutil.copyfile(real.with_suffix(".png"), picture)
        rows[name] = {"preset": ARMS[trained]["preset"], "sets": ARMS[trained]["sets"],
                      **({"samples_from": trained, "synth": arm["synth"]} if trained != name else {}),
                      "train_seconds": times[f"train {trained}"],
                      **run_figures(run),
                      "synth_volumes_per_minute": round(60 * a.samples / times[f"synth {name}"], 1),
                      "samples": {k: r.get(k) for k in REALISM},
                      "controls": {c: {k: v.get(k) for k in CONTROL} for c, v in (r.get("controls") or {}).items()},
                      "picture": picture.name if picture else None,
                      **({"note": arm["note"]} if "note" in arm else {})}
    # the real-as-samples control against the goals it can be held to (a reference for each bar)
    control = next(({"samples": {**c["real_as_samples"], "ms_ssim_real": r["samples"]["ms_ssim_real"],
                                 "mask_dice_real": r["samples"]["mask_dice_real"]}}
                    for r in rows.values() if (c := r.get("controls") or {}).get("real_as_samples")), None)
    table = {name: goals(r) for name, r in rows.items()}
    if control:
        table["control: training scans read as samples"] = {
            k: v for k, v in goals(control).items()
            if not any(w in k for w in ("reconstructions", "memorization", "synth"))}
    emit({"cohort": "deformed ICBM152 2009a T1, benchmarks/anatomy_cohort.py", "subjects": a.count,
          "held_out": round(a.count * HELD_OUT), "samples": a.samples, "arms": rows, "goals": table,
          "times": times}, a.out)


if __name__ == "__main__":
    main()
