"""The quick start's recipe on scans as they arrive: trained on aligned phantoms with alignment (the quick
start itself), on varied phantoms (poses, three fields of view, neck) with alignment, and on varied
phantoms without it; each arm's realism (``mrivq eval --samples``) and anomaly figures (``mrivq eval
--anomaly`` on lesion phantoms of its kind, maps measured in the scans' own geometry). Resumable: a
finished step is not run again.

    python benchmarks/alignment_training.py --work bench/alignment_training \\
        --out benchmarks/results/alignment_training_cpu_2cores.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cli, emit  # noqa: E402

NO_ALIGN = ["--set", "data.register=null", "--set", "data.head_percentiles=false"]
ARMS = {
    "aligned phantom, aligned (quick start)": {"data": "phantom", "lesions": "phantom-lesions", "extra": []},
    "varied phantom, aligned": {"data": "phantom-varied", "lesions": "phantom-varied-lesions", "extra": []},
    "varied phantom, no alignment": {"data": "phantom-varied", "lesions": "phantom-varied-lesions",
                                     "extra": NO_ALIGN},
}
REALISM = ("c2st_accuracy", "c2st_texture_accuracy", "mmd", "mmd_floor", "ms_ssim_synth", "ms_ssim_real",
           "mask_dice_synth", "mask_dice_real", "tissue_in_range", "memorization", "tissue_dice_gap",
           "ventricles_present", "anatomy")
ANOMALY = ("auprc", "auroc", "best_dice", "dice")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--count", type=int, default=160)
    ap.add_argument("--lesion-count", type=int, default=24)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra train --set (smoke runs)")
    a = ap.parse_args()
    root = a.work / "data"
    log = a.work / "times.json"
    times = json.loads(log.read_text()) if log.is_file() else {}

    def step(key: str, *args: str) -> None:
        if key not in times:
            times[key] = round(cli(*args), 1)
            a.work.mkdir(parents=True, exist_ok=True)
            log.write_text(json.dumps(times, indent=2))

    n = str(a.count)
    step("fetch phantom", "fetch", "phantom", "--root", str(root), "--count", n, "--modality", "t1")
    step("fetch phantom-varied", "fetch", "phantom", "--varied", "--root", str(root), "--count", n, "--modality", "t1")
    for varied in (False, True):
        step(f"fetch lesions varied={varied}", "fetch", "phantom", *(["--varied"] if varied else []), "--lesions",
             "--root", str(root), "--count", str(a.lesion_count), "--seed", "1", "--modality", "t1")
    rows = {}
    for i, (name, arm) in enumerate(ARMS.items()):
        run = a.work / f"run{i}"
        sets = [x for s in a.sets for x in ("--set", s)]
        step(f"train {name}", "train", "--dataset", arm["data"], "--root", str(root), "--preset", "vqvae3d-cpu",
             "--out", str(run), "--device", "cpu", *arm["extra"], *sets,
             *(["--resume"] if (run / "run.json").exists() else []))
        samples = a.work / f"samples{i}"
        step(f"synth {name}", "synth", "--run", str(run), "--count", str(a.samples), "--out", str(samples),
             "--device", "cpu")
        real = a.work / f"realism{i}.json"
        step(f"realism {name}", "eval", "--run", str(run), "--samples", str(samples), "--root", str(root),
             "--json", str(real), "--overwrite", "--device", "cpu")
        anom = a.work / f"anomaly{i}.json"
        step(f"anomaly {name}", "eval", "--anomaly", "--run", str(run), "--dataset", f"{arm['lesions']}:all",
             "--root", str(root), "--json", str(anom), "--overwrite", "--device", "cpu")
        info = json.loads((run / "run.json").read_text())
        r = json.loads(real.read_text())
        an = json.loads(anom.read_text())
        rows[name] = {"dataset": arm["data"], "register": info["preprocess"].get("register"),
                      "train_seconds": times[f"train {name}"],
                      "stage_seconds": {k: v.get("seconds") for k, v in info.get("stages", {}).items()
                                        if isinstance(v, dict)},
                      "realism": {k: r.get(k) for k in REALISM},
                      "anomaly_healed": {k: an.get(k) for k in ANOMALY}}
    emit({"arms": rows, "times": times, "samples": a.samples, "lesion_subjects": a.lesion_count,
          "subjects": a.count}, a.out)


if __name__ == "__main__":
    main()
