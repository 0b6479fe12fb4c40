"""Known answers for the realism statistics on real scans: the run's held-out scans against perturbed
copies of its training scans, each set written and read back as ``mrivq synth`` output is. Prints JSON.

    python benchmarks/metric_controls.py --run runs/quickstart --root data

Rows: ``none`` (the training scans themselves: every statistic's null), ``offset_padding`` (+0.002 in
the grid's padding only, as a decoder writes there), ``offset`` (+0.002 everywhere), ``noise`` (2%
Gaussian noise), ``blur`` (a 0.5-voxel Gaussian blur) and ``mean_volume`` (the mean training scan
repeated: no diversity at all). Columns: the pooled C2ST (a logistic regression on
block means standardised over both sets pooled, plain accuracy's binomial p-value) beside the anatomy and
texture C2STs and the multi-bandwidth MMD of :mod:`mrivq.metrics.twosample`, each with its permutation
p-value, and diversity (pairwise MS-SSIM).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import emit  # noqa: E402


def pooled_c2st(real: np.ndarray, other: np.ndarray, seed: int = 0) -> dict:
    """The C2ST as it was: StandardScaler over both sets pooled, L2 logistic regression, 5-fold balanced
    accuracy averaged over 5 shuffles, binomial p-value of the first shuffle's plain accuracy."""
    from scipy.stats import binomtest
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([real, other]).astype(np.float64)
    y = np.r_[np.zeros(len(real), int), np.ones(len(other), int)]
    accs, p = [], 1.0
    for r in range(5):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
        pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(5, shuffle=True, random_state=seed + r))
        accs.append(balanced_accuracy_score(y, pred))
        if r == 0:
            p = float(binomtest(int((pred == y).sum()), len(y), 0.5, alternative="greater").pvalue)
    return {"accuracy": float(np.mean(accs)), "p_value": p}


def perturbations(x: np.ndarray, padding: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The rows' sets from training scans ``x [N, C, *grid]`` in [0, 1]; ``padding``: the grid's padded voxels."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    off = x.copy()
    off[:, :, padding] += 0.002
    return {
        "none": x,
        "offset_padding": off,
        "offset": np.clip(x + 0.002, 0, 1),
        "noise": np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1).astype(np.float32),
        "blur": gaussian_filter(x, (0, 0, 0.5, 0.5, 0.5)).astype(np.float32),
        "mean_volume": np.repeat(x.mean(0, keepdims=True), len(x), 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a trained 3D run")
    ap.add_argument("--root", type=Path, help="data root of the run's dataset (default: the run's data_dir)")
    ap.add_argument("--count", type=int, default=24, help="training scans perturbed (and real scans compared)")
    ap.add_argument("--permutations", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    from mrivq.evaluate.volumes import load_samples, load_spec, write_as_samples
    from mrivq.metrics import realism as M
    from mrivq.metrics import twosample as TS
    from mrivq.runs.run import load_run

    r = load_run(args.run)
    name = r.info["dataset"]
    real = load_spec(f"{name}:val", r, args.root).x[:args.count]
    train = load_spec(f"{name}:train", r, args.root).x
    pick = np.linspace(0, len(train) - 1, min(args.count, len(train))).round().astype(int)
    train = train[pick]
    padding = ~TS.support_mask(np.concatenate([real, train]))  # 0 in every scan: the grid's padding
    params = M.ms_ssim_params(real.shape[2:])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row, x in perturbations(train, padding, args.seed).items():
            write_as_samples(x, r, Path(tmp) / row)
            x = load_samples(Path(tmp) / row, r)[0].x  # the samples' path
            fr, fx = M.downsample(real).numpy(), M.downsample(x).numpy()
            old = pooled_c2st(fr, fx, args.seed)
            a = TS.c2st_anatomy(real, x, permutations=args.permutations, seed=args.seed)
            t = TS.c2st_texture(real, x, permutations=args.permutations, seed=args.seed)
            m = TS.mmd(fr, fx, permutations=2 * args.permutations, seed=args.seed)
            rows[row] = {"pooled_c2st": old["accuracy"], "pooled_c2st_binomial_p": old["p_value"],
                         "c2st_anatomy": a["accuracy"], "c2st_anatomy_p": a["p_value"],
                         "c2st_anatomy_null_q95": a["null_q95"], "c2st_texture": t["accuracy"],
                         "c2st_texture_p": t["p_value"], "c2st_texture_null_q95": t["null_q95"],
                         "mmd": m["mmd"], "mmd_floor": m["floor"], "mmd_p": m["p_value"],
                         "ms_ssim": M.pairwise_ms_ssim(x, params)}
            print(row, rows[row], file=sys.stderr)
    emit({"run": str(args.run), "real": f"{name}:val ({len(real)})", "compared": f"{name}:train ({len(train)})",
          "padding_voxels": int(padding.sum()), "ms_ssim_real": M.pairwise_ms_ssim(real, params),
          "permutations": args.permutations, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
