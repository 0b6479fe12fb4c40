"""``mrivq eval --samples``: how real are a run's samples?

Samples (read back exactly when ``mrivq synth`` wrote them for this run, else through the run's
preprocessing), real scans and (optionally) the training scans meet on one grid, then every metric is
computed there: two classifier two-sample tests (anatomy and texture, relative to the real scans, with
permutation p-values; :mod:`mrivq.metrics.twosample`), a multi-bandwidth MMD against its permutation
null, diversity (pairwise MS-SSIM), memorization (nearest training volume), head-mask Dice and tissue
fractions, and FID only with named features. Control rows measured the same way (real scans written
and read as samples, their reconstructions, their mean volume repeated) give each figure its empirical
null and ceiling, and :func:`checks` states each goal against them. The result is a table,
``realism.json`` and ``realism.png``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrivq.evaluate.volumes import load_samples, load_spec
from mrivq.io.files import nifti_files
from mrivq.metrics import realism as M
from mrivq.metrics import twosample as TS
from mrivq.utils.errors import MrivqError

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


#: depth (mm) below the head's surface where the brain starts, when no template brain mask is given, and
#: the depth inside the brain from which CSF counts as ventricular
BRAIN_DEPTH_MM, VENTRICLE_DEPTH_MM = 14.0, 18.0
MIN_BRAIN_VOXELS = 64


def anatomy_reference(real: np.ndarray, seed: int = 0, brain: np.ndarray | None = None,
                      voxel_mm: float = 1.0) -> dict:
    """What every compared set is measured against, computed once from the real scans: head masks and
    their threshold, the leave-one-out real mask Dice, the tissue mixture and real fractions, MS-SSIM
    parameters and the real scans' own diversity; inside the brain (``brain``: the template's brain on
    the grid, else the mean head mask less :data:`BRAIN_DEPTH_MM`) a 3-class mixture fitted on the real
    scans, their mean tissue map, its per-class leave-one-out Dice, the ventricles' region and the real
    ventricle volumes (``voxel_mm``: the grid's voxel size)."""
    thr = M.head_threshold(real[:, 0])
    masks = M.head_masks(real[:, 0], thr)
    gmm, order = M.tissue_model(real[:, 0], masks, seed=seed)
    params = M.ms_ssim_params(real.shape[2:])
    ref = {"threshold": thr, "masks": masks, "mean_mask": M.mean_mask(masks), "dice": M.loo_mask_dice(masks),
           "gmm": gmm, "order": order, "tissue": M.tissue_fractions(real[:, 0], masks, gmm, order),
           "ms_ssim": params, "ms_ssim_real": M.pairwise_ms_ssim(real, params, seed=seed), "brain": None}
    roi = np.asarray(brain, bool) if brain is not None else M.brain_roi(masks, BRAIN_DEPTH_MM / voxel_mm)
    if roi.sum() < MIN_BRAIN_VOXELS:  # a grid too coarse or small for a brain inside the head: no measure
        return ref
    bgmm, border = M.tissue_model(real[:, 0], np.broadcast_to(roi, masks.shape), seed=seed)
    labels = M.tissue_labels(real[:, 0], roi, bgmm, border)
    mean_map = M.mean_tissue_map(labels)
    region = M.ventricle_region(mean_map, roi, VENTRICLE_DEPTH_MM / voxel_mm)
    return {**ref, "brain": roi, "brain_from": "template" if brain is not None else "eroded head mask",
            "brain_gmm": bgmm, "brain_order": border, "tissue_map": mean_map,
            "tissue_dice_real": M.loo_tissue_dice(labels), "ventricle_region": region,
            "ventricles_real": M.ventricle_volumes(labels, region), "voxel_ml": voxel_mm ** 3 / 1000.0}


def internal_anatomy(x: np.ndarray, ref: dict) -> dict:
    """A set's tissue maps against the real mean map: median per-class Dice (CSF, grey, white matter),
    the ventricles' volumes, and the share of volumes whose ventricles are present within the real range
    (None throughout when the grid holds no brain region to measure)."""
    if ref.get("brain") is None:
        return {"tissue_dice": None, "tissue_dice_real": None, "tissue_dice_gap": None, "ventricles_ml": None,
                "ventricles_real_ml": None, "ventricles_present": None, "brain_from": None}
    labels = M.tissue_labels(x[:, 0], ref["brain"], ref["brain_gmm"], ref["brain_order"])
    d = M.tissue_dice(labels, ref["tissue_map"])
    vols = M.ventricle_volumes(labels, ref["ventricle_region"]) * ref["voxel_ml"]
    real_vols = ref["ventricles_real"] * ref["voxel_ml"]
    lo, hi = float(real_vols.min()), float(real_vols.max())
    real_d = np.median(ref["tissue_dice_real"], axis=0)
    return {
        "tissue_dice": {c: float(v) for c, v in zip(M.TISSUE_CLASSES, np.median(d, axis=0), strict=True)},
        "tissue_dice_real": {c: float(v) for c, v in zip(M.TISSUE_CLASSES, real_d, strict=True)},
        # both ways: a set *more* alike to the mean map than real scans are is over-smooth (a mean volume)
        "tissue_dice_gap": float(np.max(np.abs(real_d - np.median(d, axis=0)))),
        "ventricles_ml": vols.tolist(), "ventricles_real_ml": [lo, hi],
        "ventricles_present": float(((vols >= lo) & (vols <= hi) & (vols > 0)).mean()),
        "brain_from": ref["brain_from"],
    }


def set_metrics(x: np.ndarray, real: np.ndarray, ref: dict, *, seed: int = 0, permutations: int = 100) -> dict:
    """The two-sample, diversity and anatomy figures of one set ``x`` against ``real`` (``ref``: its
    :func:`anatomy_reference`): what the samples and every control row report."""
    res: dict[str, Any] = {"n": len(x)}
    a = TS.c2st_anatomy(real, x, seed=seed, permutations=permutations)
    t = TS.c2st_texture(real, x, seed=seed, permutations=permutations)
    res.update(c2st_accuracy=a["accuracy"], c2st_p_value=a["p_value"], c2st_null_q95=a["null_q95"], c2st=a,
               c2st_texture_accuracy=t["accuracy"], c2st_texture_p_value=t["p_value"],
               c2st_texture_null_q95=t["null_q95"], c2st_texture=t)
    fr, fx = M.downsample(real).numpy(), M.downsample(x).numpy()
    m = TS.mmd(fr, fx, seed=seed, permutations=2 * permutations)
    res.update(mmd=m["mmd"], mmd_floor=m["floor"], mmd_p_value=m["p_value"], mmd_kernel=m)
    res["ms_ssim_synth"] = M.pairwise_ms_ssim(x, ref["ms_ssim"], seed=seed)
    masks = M.head_masks(x[:, 0], ref["threshold"])
    dice = M.mask_dice(masks, ref["mean_mask"])
    res.update(mask_dice_synth=float(np.median(dice)), mask_dice_synth_min=float(dice.min()),
               head_shaped_fraction=float((dice >= 0.85).mean()), mask_dice_synth_all=dice.tolist())
    tr = ref["tissue"]
    ts = M.tissue_fractions(x[:, 0], masks, ref["gmm"], ref["order"])
    lo, hi = tr.min(0), tr.max(0)
    res["tissue"] = {
        "classes": ["dark", "mid", "bright"], "means": np.sort(ref["gmm"].means_.ravel()).tolist(),
        "real_mean": tr.mean(0).tolist(), "real_min": lo.tolist(), "real_max": hi.tolist(),
        "synth_mean": ts.mean(0).tolist(), "synth_min": ts.min(0).tolist(), "synth_max": ts.max(0).tolist(),
        "synth_in_real_range": float(np.all((ts >= lo) & (ts <= hi), axis=1).mean()),
        # how far the synthetic mean fraction is from the real one, in real standard deviations
        "synth_mean_z": (np.abs(ts.mean(0) - tr.mean(0)) / np.maximum(tr.std(0), 1e-6)).tolist(),
    }
    res["tissue_in_range"] = res["tissue"]["synth_in_real_range"]
    res["anatomy"] = internal_anatomy(x, ref)
    res["tissue_dice_gap"] = res["anatomy"]["tissue_dice_gap"]
    res["ventricles_present"] = res["anatomy"]["ventricles_present"]
    res["tissue_z"] = max(res["tissue"]["synth_mean_z"])
    res["_anatomy"] = {"mask Dice with the real mean mask": (ref["dice"], dice),
                       **{f"{n} tissue fraction": (tr[:, i], ts[:, i]) for i, n in enumerate(res["tissue"]["classes"])}}
    return res


#: how far below the real-as-samples control a row's tissue-in-range share and head-mask Dice may be
TISSUE_SLACK, DICE_SLACK = 0.10, 0.05


def checks(row: dict, ms_ssim_real: float, mask_dice_real: float, control: dict | None = None) -> dict:
    """Pass/fail of each realism goal for one row, each bound stated against a null or a control:
    ``c2st`` and ``c2st_texture``: not told apart at 5% (permutation p >= 0.05); ``mmd``: MMD² within the
    95% band of its permutation null; ``diversity``: at least half the real scans' pairwise
    dissimilarity (1 - MS-SSIM); ``head_shape``: median head-mask Dice within ``DICE_SLACK`` of the real
    scans' leave-one-out median; ``tissue``: tissue fractions in the real range for as many volumes as
    the real-as-samples ``control`` has, less ``TISSUE_SLACK`` (real scans themselves miss the range
    sometimes; without a control, 0.75)."""
    def check(value: float | None, bound: float | None, ok: Callable[[float, float], bool]) -> dict:
        known = value is not None and bound is not None  # (no permutations: no null to judge against)
        return {"value": value, "bound": bound, "pass": bool(ok(value, bound)) if known else None}

    tissue = control["tissue_in_range"] - TISSUE_SLACK if control else 0.75
    below, above = (lambda v, b: v <= b), (lambda v, b: v >= b)
    return {
        "c2st": check(row["c2st_p_value"], 0.05, above),
        "c2st_texture": check(row["c2st_texture_p_value"], 0.05, above),
        "mmd": check(row["mmd"], row["mmd_floor"], below),
        "diversity": check(row["ms_ssim_synth"], 1 - 0.5 * (1 - ms_ssim_real), below),
        "head_shape": check(row["mask_dice_synth"], mask_dice_real - DICE_SLACK, above),
        "tissue": check(row["tissue_in_range"], tissue, above),
    }


def realism_metrics(synth: np.ndarray, real: np.ndarray, train: np.ndarray | None = None, *,
                    features: Any = None, seed: int = 0, model_space: tuple[np.ndarray, np.ndarray] | None = None,
                    controls: dict[str, np.ndarray] | None = None, permutations: int = 100,
                    brain: np.ndarray | None = None, voxel_mm: float = 1.0) -> dict:
    """Every realism metric of ``synth`` against ``real`` (arrays ``[N, C, *spatial]`` on one grid).

    ``train`` adds memorization; ``features`` (a :class:`mrivq.metrics.features.FeatureExtractor`)
    adds an FID named after it. ``model_space`` = (train, real) as the autoencoder reconstructs them:
    memorization then compares samples with what the model can express of the training set, so a
    decoded copy of a training code grid is at distance 0 (against the raw volumes it is as far away
    as a new subject, by the reconstruction error). ``controls`` (name -> volumes): sets measured the
    same way as the samples, each with its own row under ``controls`` (see :func:`control_sets`); the
    ``real_as_samples`` one sets the tissue goal of :func:`checks`. Returns the JSON-able dict written
    to ``realism.json``, plus ``_nearest`` (index of each sample's nearest train-or-real volume) and
    ``_anatomy`` (the histograms' values). ``brain`` (the template's brain on the grid) and ``voxel_mm``
    place the internal-anatomy measure (:func:`internal_anatomy`)."""
    ref = anatomy_reference(real, seed, brain, voxel_mm)
    res: dict[str, Any] = {"n_synth": len(synth), "n_real": len(real), "grid": list(synth.shape[2:]),
                           "features": "4x block means (anatomy), random-convolution texture (texture)"}
    row = set_metrics(synth, real, ref, seed=seed, permutations=permutations)
    row.pop("n")
    res.update(row)
    fr, fs = M.downsample(real), M.downsample(synth)
    res.update(mmd_linear_monai=M.mmd_linear(fr, fs, seed=seed),
               mmd_linear_monai_floor=M.half_splits(fr, M.mmd_linear, seed=seed))
    res.update(ms_ssim_real=ref["ms_ssim_real"], ms_ssim=ref["ms_ssim"], mask_threshold=ref["threshold"],
               mask_dice_real=float(np.median(ref["dice"])), mask_dice_real_all=ref["dice"].tolist())
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
    rows: dict[str, dict] = {}
    for name, x in (controls or {}).items():
        rows[name] = set_metrics(x, real, ref, seed=seed, permutations=permutations)
        rows[name].pop("_anatomy")
    control = rows.get("real_as_samples")
    res["checks"] = checks(res, res["ms_ssim_real"], res["mask_dice_real"], control)
    for r in rows.values():
        r["checks"] = checks(r, res["ms_ssim_real"], res["mask_dice_real"], control)
    res["controls"] = rows
    if features is not None:
        res["fid"] = _fid(features, synth, real)
        res["fid_features"] = features.name
    return res


def _fid(features: Any, synth: np.ndarray, real: np.ndarray) -> float:
    from mrivq.metrics.features import fid

    return fid(features(synth), features(real))


def samples_calibrated(files: list[Path]) -> bool:
    """Whether the samples went through the run's intensity calibration: their synth sidecars say
    so (one from before calibrations existed: no); files without sidecars (not written by ``mrivq
    synth``) are taken as synth's default."""
    from mrivq.inference.synth import read_sidecar

    said = [read_sidecar(f) for f in files]
    # a sidecar from before calibrations existed has no such key: raw output
    said = [d.get("calibration", "none") for d in said if isinstance(d, dict)]
    return any(v != "none" for v in said) if said else True


def _reconstruct(r: Any, x: np.ndarray, progress: Any = None, batch: int = 4, calibrate: bool = True) -> np.ndarray:
    """``x`` encoded and decoded by the run's VQ-VAE (eval mode: the codebook never changes), through
    its calibration as synth decodes (when ``calibrate``): model space, as samples are read back."""
    from mrivq.utils.progress import silent

    out = []
    dev = next(r.vqvae.parameters()).device
    with torch.no_grad(), (progress or silent()).task("reconstruct", total=len(x), unit="vol") as bar:
        for s in range(0, len(x), batch):
            xb = torch.as_tensor(x[s:s + batch], device=dev)
            out.append(r.decode(r.vqvae.encode_indices(xb), calibrate).cpu().numpy())
            bar.advance(len(xb))
    return np.concatenate(out)


def control_sets(r: Any, source: np.ndarray, count: int, calibrate: bool,
                 progress: Any = None) -> dict[str, np.ndarray]:
    """The control rows every realism table carries, from ``count`` real scans of ``source`` (evenly
    spread; the training scans, never the real reference set), each written as ``mrivq synth`` writes and
    read back as samples are:

    - ``real_as_samples``: the scans themselves: every metric's empirical null for the samples' path;
    - ``reconstructions``: the VQ-VAE's reconstructions of them (through the calibration when the
      samples had it): the ceiling the decoder allows;
    - ``mean_volume``: their mean volume repeated ``count`` times: a collapsed model, which diversity and
      MMD must fail."""
    import tempfile

    from mrivq.evaluate.volumes import load_samples, write_as_samples
    from mrivq.models.calibration import describe

    pick = sorted({int(round(v)) for v in np.linspace(0, len(source) - 1, min(count, len(source)))})
    x = source[pick]
    sets = {"real_as_samples": x, "reconstructions": _reconstruct(r, x, progress, calibrate=calibrate)}
    out: dict[str, np.ndarray] = {}
    how = {"real_as_samples": "none", "reconstructions": describe(r.calibration if calibrate else None)}
    with tempfile.TemporaryDirectory(prefix="mrivq-controls-") as tmp:
        for name, v in sets.items():
            write_as_samples(v, r, Path(tmp) / name, calibration=how[name])
            out[name] = load_samples(Path(tmp) / name, r)[0].x
    out["mean_volume"] = np.repeat(out["real_as_samples"].mean(0, keepdims=True), len(x), 0)
    return out


def evaluate_realism(run: Path | None, samples: Path, real: str | None = None, train: str | None = None, *,
                     features: str | None = None, json_out: Path | None = None, root: Path | None = None,
                     progress: Any = None, seed: int = 0, device: str = "auto", overwrite: bool = False,
                     controls: bool = True, permutations: int = 100) -> dict:
    """Realism of the samples in ``samples`` (NIfTI files or DICOM series: ``mrivq synth`` output of this
    run is read back exactly, any other volume goes through the run's preprocessing) against ``real``
    (default: the run's validation split), with memorization against ``train`` when given. With
    ``controls``, the control rows of :func:`control_sets` are measured beside the samples, from the
    training scans (``train``, else the run's own dataset's training split when it is there). Writes JSON
    (``json_out``, else ``samples/realism.json``) and ``realism.png`` beside it; returns
    ``{"metrics", "json", "picture"}``."""
    from mrivq.evaluate.picture import realism_figure
    from mrivq.metrics.features import load_features
    from mrivq.runs.folder import write_json
    from mrivq.runs.run import load_run
    from mrivq.utils.device import resolve_device

    r = load_run(run, device=resolve_device(device))
    if r.preprocess.dims != 3:
        raise MrivqError(f"run {r.path.name} is 2D; eval --samples measures 3D volumes (NIfTI samples)")
    extractor = load_features(features) if features else None  # fail early, before loading volumes
    out = Path(json_out) if json_out else Path(samples) / "realism.json"
    if not Path(samples).is_dir():
        raise MrivqError(f"samples folder {samples} does not exist; write samples with `mrivq synth --out {samples}`")
    if not out.parent.is_dir():
        raise MrivqError(f"--json: folder {out.parent} does not exist; create it or choose another path")
    if out.is_dir() or not os.access(out.parent, os.W_OK):
        raise MrivqError(f"cannot write {out}; pass --json with a writable file path")
    if json_out and not overwrite and (out.exists() or out.with_suffix(".png").exists()):
        raise MrivqError(f"{out} (or its .png) already exists; pass --overwrite or choose another --json")
    S, paths = load_samples(Path(samples), r, progress)
    _need(len(S), str(samples), "samples folder")
    files = nifti_files(Path(samples))
    real = real or f"{r.info.get('dataset')}:val"
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
    cal = samples_calibrated(files) and r.calibration is not None
    space = (_reconstruct(r, T.x, progress, calibrate=cal), _reconstruct(r, R.x, progress, calibrate=cal)) \
        if T is not None else None
    ctrl, note = None, None
    if controls:
        C = T if T is not None else _own_train(r, real, root, progress, splits)
        if C is None or len(C) < MIN_VOLUMES:
            note = ("no training scans to build the controls from (pass --train, or fetch the run's dataset); "
                    "controls skipped")
        else:
            ctrl = control_sets(r, C.x, len(S), cal, progress)
    brain, voxel_mm = _brain_on_grid(r.preprocess, S.x.shape[2:])
    res = realism_metrics(S.x, R.x, T.x if T is not None else None, features=extractor, seed=seed, model_space=space,
                          controls=ctrl, permutations=permutations, brain=brain, voxel_mm=voxel_mm)
    label, idx = res.pop("_nearest")
    anatomy = res.pop("_anatomy")
    ref = T if T is not None else R
    if space is not None:
        res["memorization_space"] += " (calibrated)" if cal else ""
    res.update(run=str(r.path), samples=str(samples), real=R.source, train=T.source if T is not None else None,
               nearest=[ref.names[i] for i in idx], sample_names=S.names, sample_paths=paths,
               controls_source=(T.source if T is not None else f"{r.info.get('dataset')}:train") if ctrl else None,
               controls_note=note)
    res = _finite(res)
    write_json(out, res)
    pic = realism_figure(out.with_suffix(".png"), S.x, ref.x[idx], label, anatomy,
                         f"{r.path.name}: {len(S)} samples vs {R.source}")
    return {"metrics": res, "json": str(out), "picture": str(pic)}


def _brain_on_grid(pre: Any, shape: tuple) -> tuple[np.ndarray | None, float]:
    """The template's brain mask on the run's grid (aligned runs), and the grid's voxel size (mm)."""
    voxel_mm = float(np.prod(pre.spacing) ** (1 / 3)) if pre.spacing else 1.0
    if not pre.register:
        return None, voxel_mm
    from mrivq.data.align import grid_brain, resolve_template
    from mrivq.data.intensity import synth_geometry

    return grid_brain(resolve_template(pre.template), synth_geometry(pre, shape), list(shape)), voxel_mm


def _own_train(r: Any, real: str, root: Path | None, progress: Any, splits: dict) -> Any:
    """The run's own dataset's training split, when it is there and is not the real reference set."""
    name = r.info.get("dataset")
    if not name or real == f"{name}:train" or real == f"{name}:all" or real == name:
        return None
    try:
        return load_spec(f"{name}:train", r, root, progress, "training volumes", splits)
    except MrivqError:
        return None
