"""``mrivq eval --samples``: how real are a run's samples?

Samples, real scans and (optionally) the training scans all go through the run's own preprocessing,
then every metric of :mod:`mrivq.evaluate.metrics` is computed on that one grid: a classifier
two-sample test, MMD against its real-halves noise floor, diversity (pairwise MS-SSIM), memorization
(nearest training volume), head-mask Dice and tissue fractions, and FID only with named features.
The result is a table, ``realism.json`` and ``realism.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrivq.errors import MrivqError
from mrivq.evaluate import metrics as M
from mrivq.evaluate.volumes import check_samples, load_folder, load_spec

MIN_VOLUMES = 4
#: the keys every realism.json has (``memorization`` when a training set was given, ``fid`` with features)
KEYS = ("c2st_accuracy", "mmd", "mmd_floor", "ms_ssim_synth", "ms_ssim_real", "memorization",
        "mask_dice_synth", "mask_dice_real")


def _finite(v: Any) -> Any:
    """JSON-safe: NaN/inf become None (JSON has no NaN), numpy scalars become floats."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def _need(n: int, source: str, what: str) -> None:
    if n < MIN_VOLUMES:
        raise MrivqError(f"{what} {source} has {n} volume(s); realism metrics need at least "
                         f"{MIN_VOLUMES} on each side")


def realism_metrics(synth: np.ndarray, real: np.ndarray, train: np.ndarray | None = None, *,
                    features: Any = None, seed: int = 0, model_space: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> dict:
    """Every realism metric of ``synth`` against ``real`` (arrays ``[N, C, *spatial]`` on one grid).

    ``train`` adds memorization; ``features`` (a :class:`mrivq.evaluate.features.FeatureExtractor`)
    adds an FID named after it. ``model_space`` = (train, real) as the autoencoder reconstructs them:
    memorization then compares samples with what the model can express of the training set, so a
    decoded copy of a training code grid is at distance 0 (against the raw volumes it is as far away
    as a new subject, by the reconstruction error). Returns the JSON-able dict written to
    ``realism.json``, plus ``_nearest`` (index of each sample's nearest train-or-real volume)."""
    fs, fr = M.downsample(synth), M.downsample(real)
    res: dict[str, Any] = {"n_synth": len(synth), "n_real": len(real), "grid": list(synth.shape[2:]),
                           "features": "4x block means of the preprocessed intensities"}
    c = M.c2st(fr.numpy(), fs.numpy(), seed=seed)
    res.update(c2st_accuracy=c["accuracy"], c2st_accuracy_std=c["accuracy_std"], c2st_p_value=c["p_value"],
               c2st=c)
    bw = M.rbf_bandwidth(fr)
    res.update(mmd=M.mmd_rbf(fr, fs, bw), mmd_floor=M.mmd_floor(fr, bw, seed=seed),
               mmd_kernel={"kind": "gaussian", "bandwidth": bw, "bandwidth_rule": "median real-real distance",
                           "estimator": "unbiased MMD^2 (Gretton et al. 2012)",
                           "floor": "mean |MMD^2| over 20 random halves of the real set"})
    res.update(mmd_linear_monai=M.mmd_linear(fr, fs, seed=seed),
               mmd_linear_monai_floor=M.half_splits(fr, M.mmd_linear, seed=seed))
    params = M.ms_ssim_params(synth.shape[2:])
    res.update(ms_ssim_synth=M.pairwise_ms_ssim(synth, params, seed=seed),
               ms_ssim_real=M.pairwise_ms_ssim(real, params, seed=seed), ms_ssim=params)
    xs, xr = torch.as_tensor(synth).flatten(1), torch.as_tensor(real).flatten(1)
    if train is not None:
        t_ref, r_ref = model_space if model_space is not None else (train, real)
        xt = torch.as_tensor(t_ref).flatten(1)
        ds, idx = M.nearest(xs, xt)
        dr, _ = M.nearest(torch.as_tensor(r_ref).flatten(1), xt)
        scale = float(np.median(dr))
        res.update(memorization=float(np.median(ds)) / max(scale, 1e-12),
                   memorization_min=float(ds.min()) / max(scale, 1e-12), n_train=len(train),
                   memorization_space="reconstructions through the run's VQ-VAE" if model_space is not None
                   else "preprocessed volumes",
                   nearest_train_distance_synth=ds.tolist(), nearest_train_distance_real=dr.tolist())
        res["_nearest"] = ("nearest training", idx)
    else:
        res["memorization"] = None
        res["_nearest"] = ("nearest real", M.nearest(xs, xr)[1])
    thr = M.head_threshold(real[:, 0])
    mr, ms = M.head_masks(real[:, 0], thr), M.head_masks(synth[:, 0], thr)
    dice_s, dice_r = M.mask_dice(ms, M.mean_mask(mr)), M.loo_mask_dice(mr)
    res.update(mask_dice_synth=float(np.median(dice_s)), mask_dice_real=float(np.median(dice_r)),
               mask_dice_synth_min=float(dice_s.min()), head_shaped_fraction=float((dice_s >= 0.85).mean()),
               mask_threshold=thr, mask_dice_synth_all=dice_s.tolist(), mask_dice_real_all=dice_r.tolist())
    gmm, order = M.tissue_model(real[:, 0], mr, seed=seed)
    tr, ts = M.tissue_fractions(real[:, 0], mr, gmm, order), M.tissue_fractions(synth[:, 0], ms, gmm, order)
    lo, hi = tr.min(0), tr.max(0)
    res["tissue"] = {
        "classes": ["dark", "mid", "bright"], "means": np.sort(gmm.means_.ravel()).tolist(),
        "real_mean": tr.mean(0).tolist(), "real_min": lo.tolist(), "real_max": hi.tolist(),
        "synth_mean": ts.mean(0).tolist(), "synth_min": ts.min(0).tolist(), "synth_max": ts.max(0).tolist(),
        "synth_in_real_range": float(np.all((ts >= lo) & (ts <= hi), axis=1).mean()),
        # how far the synthetic mean fraction is from the real one, in real standard deviations
        "synth_mean_z": (np.abs(ts.mean(0) - tr.mean(0)) / np.maximum(tr.std(0), 1e-6)).tolist(),
    }
    res["tissue_in_range"] = res["tissue"]["synth_in_real_range"]
    res["tissue_z"] = max(res["tissue"]["synth_mean_z"])
    res["_anatomy"] = {"mask Dice with the real mean mask": (dice_r, dice_s),
                       **{f"{n} tissue fraction": (tr[:, i], ts[:, i]) for i, n in enumerate(res["tissue"]["classes"])}}
    if features is not None:
        res["fid"] = _fid(features, synth, real)
        res["fid_features"] = features.name
    return res


def _fid(features: Any, synth: np.ndarray, real: np.ndarray) -> float:
    from mrivq.evaluate.features import fid

    return fid(features(synth), features(real))


def _samples_calibrated(files: list[Path]) -> bool:
    """Whether the samples went through the run's intensity calibration: their synth sidecars say
    so (one from before calibrations existed: no); files without sidecars (not written by ``mrivq
    synth``) are taken as synth's default."""
    from mrivq.synth import _read_json

    said = [_read_json(f.parent / (f.name.split(".")[0] + ".json")) for f in files]
    # a sidecar from before calibrations existed has no such key: raw output
    said = [d.get("calibration", "none") for d in said if isinstance(d, dict)]
    return any(v != "none" for v in said) if said else True


def _reconstruct(r: Any, x: np.ndarray, progress: Any = None, batch: int = 4, calibrate: bool = True) -> np.ndarray:
    """``x`` encoded and decoded by the run's VQ-VAE (eval mode: the codebook never changes), through
    its calibration as synth decodes (when ``calibrate``), then intensity-scaled as a written sample is
    when it is read back (the run's percentile scaling)."""
    from monai.data import MetaTensor

    from mrivq.data import ScalePercentilesd
    from mrivq.progress import silent

    pre = r.preprocess
    scale = ScalePercentilesd("image", pre.percentiles[0], pre.percentiles[1], pre.clip)
    out = []
    dev = next(r.vqvae.parameters()).device
    with torch.no_grad(), (progress or silent()).task("reconstruct", total=len(x), unit="vol") as bar:
        for s in range(0, len(x), batch):
            xb = torch.as_tensor(x[s:s + batch], device=dev)
            y = r.decode(r.vqvae.encode_indices(xb), calibrate).cpu()
            out.extend(scale({"image": MetaTensor(v)})["image"].as_tensor().numpy() for v in y)
            bar.advance(len(xb))
    return np.stack(out)


def evaluate_realism(run: Path | None, samples: Path, real: str | None = None, train: str | None = None, *,
                     features: str | None = None, json_out: Path | None = None, root: Path | None = None,
                     progress: Any = None, seed: int = 0, device: str = "auto", overwrite: bool = False) -> dict:
    """Realism of the NIfTI samples in ``samples`` against ``real`` (default: the run's validation
    split), with memorization against ``train`` when given. Writes JSON (``json_out``, else
    ``samples/realism.json``) and ``realism.png`` beside it; returns ``{"metrics", "json", "picture"}``."""
    from mrivq.evaluate.features import load_features
    from mrivq.evaluate.picture import realism_figure
    from mrivq.loop import resolve_device
    from mrivq.runs import load_run, write_json

    r = load_run(run, device=resolve_device(device))
    if r.preprocess.dims != 3:
        raise MrivqError(f"run {r.path.name} is 2D; eval --samples measures 3D volumes (NIfTI samples)")
    extractor = load_features(features) if features else None  # fail early, before loading volumes
    files = check_samples(Path(samples), r)
    _need(len(files), str(samples), "samples folder")
    out = Path(json_out) if json_out else Path(samples) / "realism.json"
    if not out.parent.is_dir():
        raise MrivqError(f"--json: folder {out.parent} does not exist; create it or choose another path")
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        raise MrivqError(f"cannot write {out}; pass --json with a writable file path")
    if json_out and not overwrite and (out.exists() or out.with_suffix(".png").exists()):
        raise MrivqError(f"{out} (or its .png) already exists; pass --overwrite or choose another --json")
    real = real or f"{r.info.get('dataset')}:val"
    S = load_folder(Path(samples), r.preprocess, progress, "samples", files=files)
    splits: dict = {}  # phantom:val and phantom:train preprocess the dataset once
    R = load_spec(real, r, root, progress, "real volumes", splits)
    _need(len(R), R.source, "real set")
    T = load_spec(train, r, root, progress, "training volumes", splits) if train else None
    if T is not None:
        _need(len(T), T.source, "training set")
    for other in (R, T):
        if other is not None and other.x.shape[1:] != S.x.shape[1:]:
            raise MrivqError(f"{other.source} preprocesses to {other.x.shape[1:]} but the samples to "
                             f"{S.x.shape[1:]}; compare volumes of one run")
    cal = _samples_calibrated(files) and r.calibration is not None
    space = (_reconstruct(r, T.x, progress, calibrate=cal), _reconstruct(r, R.x, progress, calibrate=cal)) \
        if T is not None else None
    res = realism_metrics(S.x, R.x, T.x if T is not None else None, features=extractor, seed=seed, model_space=space)
    label, idx = res.pop("_nearest")
    anatomy = res.pop("_anatomy")
    ref = T if T is not None else R
    if space is not None:
        res["memorization_space"] += " (calibrated)" if cal else ""
    res.update(run=str(r.path), samples=str(samples), real=R.source, train=T.source if T is not None else None,
               nearest=[ref.names[i] for i in idx], sample_names=S.names)
    res = _finite(res)
    write_json(out, res)
    pic = realism_figure(out.with_suffix(".png"), S.x, ref.x[idx], label, anatomy,
                         f"{r.path.name}: {len(S)} samples vs {R.source}")
    return {"metrics": res, "json": str(out), "picture": str(pic)}
