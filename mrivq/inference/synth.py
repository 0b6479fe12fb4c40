"""``mrivq synth``: sample code grids from the prior, decode them, write NIfTI/PNG with provenance.

3D runs write ``synth_0000.nii.gz`` ... with the run's training spacing and orientation (a real
affine, centred at 0 mm) and intensities mapped back to the training range, a PNG montage of three
orthogonal mid-slices per sample and a JSON sidecar (run, checkpoint hashes, seed, temperature).
2D runs write ``synth_0000.png`` ... and one ``grid.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrivq.data.intensity import sample_space, synth_geometry, to_intensity
from mrivq.runs.folder import DECODE_BATCH, codes_path, load_codes, write_json
from mrivq.runs.run import load_run
from mrivq.utils.device import resolve_device
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress, silent

PRIORS = ("pixelcnn", "marginal", "uniform")


def baseline_logits(r: Any, prior: str) -> torch.Tensor:
    """``[*latent, K]`` logits of a prior-free baseline: per-position training frequencies of the
    codes (from the run's code cache, which must belong to its VQ-VAE) or uniform."""
    from mrivq.inference.likelihood import marginal_logits

    k = int(r.vqvae.num_embeddings)
    if prior == "uniform":
        return torch.zeros(*r.latent_shape, k, dtype=torch.float64)
    cache = codes_path(r.path)
    if not cache.is_file():
        raise MrivqError(f"run {r.path.name} has no training code cache ({cache}); train the prior stage "
                         f"(`mrivq train --stage prior --run {r.path}`) to write it")
    codes = load_codes(cache)
    if codes is None:
        raise MrivqError(f"{cache} cannot be read (damaged); rerun `mrivq train --stage prior --run {r.path}` to "
                         "write it again")
    if codes.get("vqvae_sha256") != r.checkpoints["vqvae"]:
        raise MrivqError(f"{cache} was encoded by another VQ-VAE checkpoint; rerun `mrivq train --stage prior "
                         f"--run {r.path}` to refresh it")
    return marginal_logits(codes["train"].long(), k)


def _sampler_name(r: Any, prior: str, cached: bool) -> str:
    """What drew the codes, for the sidecar: the PixelCNN's cached or reference sampler, the masked-token
    prior's parallel decoding (``--reference`` does not apply to it), or a baseline's independent draws."""
    if prior != "pixelcnn":
        return "independent"
    if getattr(r.prior, "family", "pixelcnn") == "maskgit":
        return f"parallel ({r.prior.decode_steps} steps)"
    return "cached" if cached else "reference"


def _outputs(out_dir: Path, count: int, dims: int, fmt: str = "nifti") -> list[list[Path]]:
    """Per sample its image(s): ``synth_0000.nii.gz`` and/or the DICOM series folder ``synth_0000/``
    (3D), ``synth_0000.png`` (2D)."""
    if dims != 3:
        return [[out_dir / f"synth_{i:04d}.png"] for i in range(count)]
    kinds = {"nifti": [".nii.gz"], "dicom": [""], "both": [".nii.gz", ""]}[fmt]
    return [[out_dir / f"synth_{i:04d}{ext}" for ext in kinds] for i in range(count)]


def sample_intensity(r: Any, cls: int | None) -> dict:
    """The training data's intensity range to map [0, 1] samples back to: the sampled modality's own
    when the run pools modalities and conditions on them (T1 and T2 ranges differ), else the run's."""
    inten = r.info.get("intensity") or {"lo": [0.0], "hi": [1.0]}
    names = r.class_names
    by_mod = inten.get("by_modality") or {}
    if cls is not None and names and names[cls] in by_mod:
        return by_mod[names[cls]]
    return inten


def _check_out_dir(out_dir: Path, planned: list[Path], overwrite: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MrivqError(f"cannot create output folder {out_dir} ({e.strerror}); choose another --out") from None
    if not os.access(out_dir, os.W_OK):
        raise MrivqError(f"output folder {out_dir} is not writable; choose another --out")
    clash = [p for p in planned if p.exists()]
    if clash and not overwrite:
        raise MrivqError(f"{clash[0]} already exists ({len(clash)} file(s) would be replaced); "
                         f"pass --overwrite or choose another --out")


def synthesize(run: Path | None, count: int, out_dir: Path, *, seed: int = 0, temperature: float = 1.0,
               top_k: int | None = None, batch_size: int = 16, cls: str | int | None = None,
               covariates: dict[str, float] | None = None, overwrite: bool = False, cached: bool = True,
               device: str = "auto", progress: Progress | None = None, prior: str = "pixelcnn",
               fmt: str = "nifti", calibrate: bool = True) -> dict:
    """Sample ``count`` images from a run's prior into ``out_dir``; returns the written paths.

    ``cls`` picks the class of a class-conditional prior (default: cycle through the classes);
    ``covariates`` (``{"age": 40}``) sets continuous covariates (default: the training means).
    ``prior`` is the run's trained prior (``pixelcnn``, whichever its family), or a baseline that
    answers "is a prior needed?":
    ``marginal`` draws each position's code independently from its training frequency there,
    ``uniform`` draws codes uniformly at random. ``fmt``: ``nifti``, ``dicom`` (one DICOM series
    folder per 3D sample, :mod:`mrivq.io.dicom_out`) or ``both``. ``calibrate``: decoded volumes go through
    the run's intensity calibration (:mod:`mrivq.models.calibration`) when it has one."""
    from mrivq.inference.likelihood import sample_independent
    from mrivq.inference.sampling import sample_tokens
    from mrivq.io.images import save_nifti, save_png
    from mrivq.utils.limits import check_seed

    check_seed(seed)
    from mrivq.io.preview import grid, montage
    from mrivq.models.calibration import describe

    progress = progress or silent()
    if count < 1:
        raise MrivqError(f"--count {count} must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise MrivqError(f"--temperature {temperature} must be a number >= 0 (0 picks the most likely code)")
    if batch_size < 1:
        raise MrivqError(f"--batch-size {batch_size} must be at least 1")
    if top_k is not None and top_k < 1:
        raise MrivqError(f"--top-k {top_k} must be at least 1")
    from mrivq.utils.limits import max_image_bytes

    if prior not in PRIORS:
        raise MrivqError(f"--prior {prior!r} is not one of {', '.join(PRIORS)}")
    if prior != "pixelcnn" and (cls is not None or covariates):
        raise MrivqError(f"--prior {prior} is unconditional; drop --class/--covariate or use --prior pixelcnn")
    from mrivq.io.dicom_out import check_format, save_dicom_series

    check_format(fmt)
    dev = resolve_device(device)
    r = load_run(run, device=dev, need_prior=prior == "pixelcnn")
    unfinished = r.unfinished("prior") if prior == "pixelcnn" else None
    if unfinished:
        (progress or silent()).note(
            f"the prior of run {r.path.name} stopped at step {unfinished[0]} of {unfinished[1]}; sampling from "
            f"its best checkpoint so far (finish it with `mrivq train --out {r.path} --resume`)")
    dims = r.preprocess.dims
    if dims != 3 and fmt != "nifti":
        raise MrivqError(f"--format {fmt} is for 3D runs; run {r.path.name} is 2D and writes PNG")
    class_ids = None
    n_classes = getattr(r.prior, "num_classes", None) if prior == "pixelcnn" else None
    cls_id = r.class_id(cls)
    if cls_id is not None:
        class_ids = torch.full((count,), cls_id, dtype=torch.long, device=dev)
    elif n_classes is not None:  # conditional prior and no class asked for: cycle through classes
        class_ids = torch.arange(count, device=dev) % n_classes
    cond, cov_values = r.condition(class_ids, covariates, count, dev)
    need = count * math.prod(r.latent_shape) * 16  # the sampler's uniforms and tokens, 8 bytes each
    if need > max_image_bytes():
        raise MrivqError(f"--count {count} needs {need / 1e9:.3g} GB for its random numbers and codes, above the "
                         f"{max_image_bytes() / 1e9:.3g} GB budget; synthesize in several calls (--seed S --out "
                         "DIR each) or raise MRIVQ_MAX_IMAGE_GB")
    out_dir = Path(out_dir)
    images_of = _outputs(out_dir, count, dims, fmt)
    planned = [p for ps in images_of for p in ps]
    prov = {"run": str(r.path.resolve()), "checkpoint_sha256": r.checkpoints, "seed": seed,
            "temperature": temperature, "top_k": top_k, "prior": prior,
            "sampler": _sampler_name(r, prior, cached),
            "calibration": describe(r.calibration if calibrate else None), **sample_space(r.preprocess)}

    def sidecar_of(i: int) -> dict:
        c = None if class_ids is None else int(class_ids[i])
        return {**prov, "index": i, "class": c, "covariates": cov_values or None,
                "class_name": r.class_names[c] if c is not None and r.class_names else None}

    files = [images_of[i] + ([out_dir / f"synth_{i:04d}.png"] if dims == 3 else []) + [out_dir / f"synth_{i:04d}.json"]
             for i in range(count)]
    done = set() if overwrite else {i for i in range(count) if _complete(files[i], sidecar_of(i))}
    marker = out_dir / INPROGRESS
    ours = read_json(marker) == {**prov, "count": count}  # an interrupted run of this same command
    todo = [i for i in range(count) if i not in done]
    _check_out_dir(out_dir, [p for i in todo for p in files[i]] + ([out_dir / "grid.png"] if dims == 2 else []),
                   overwrite or ours)
    if done:
        progress.note(f"{len(done)} of {count} samples are already complete in {out_dir}; writing the other "
                     f"{len(todo)}")
    write_json(marker, {**prov, "count": count})
    if prior == "pixelcnn":
        tokens = sample_tokens(r.prior, r.latent_shape, count, temperature=temperature, top_k=top_k, seed=seed,
                               cached=cached, cond=cond, batch_size=batch_size, device=dev, progress=progress)
    else:
        tokens = sample_independent(baseline_logits(r, prior), count, temperature=temperature, top_k=top_k,
                                    seed=seed)
    decoded: dict[int, np.ndarray] = {}
    with torch.no_grad(), progress.task("decode", total=len(todo), unit="sample") as bar:
        for s in range(0, count, DECODE_BATCH):
            ids = [i for i in range(s, min(s + DECODE_BATCH, count)) if i not in done]
            if not ids:
                continue
            # code grids are sampled batch_size at a time (the cached sampler's cost per position is
            # mostly fixed overhead) but decoded DECODE_BATCH at a time (decoder activations are large);
            # the whole batch, as a run from scratch decodes it: a sample's float rounding (and so its
            # bytes) does not depend on which of its neighbours an earlier run finished
            x = r.decode(tokens[s:s + DECODE_BATCH], calibrate).cpu().numpy()
            for i in ids:
                xi = x[i - s]
                # each sample is written whole before the next (its sidecar last: the mark of a
                # complete sample), so an interruption keeps every finished one
                side = sidecar_of(i)
                if dims == 3:
                    affine = synth_geometry(r.preprocess, xi.shape[1:])
                    vol = to_intensity(xi, sample_intensity(r, side["class"]))
                    arr = np.moveaxis(vol, 0, -1) if vol.shape[0] > 1 else vol[0]
                    for p in images_of[i]:
                        if p.name.endswith(".nii.gz"):
                            save_nifti(arr, affine, p)
                        else:
                            save_dicom_series(arr, affine, p, description=f"mrivq synth {i}", series_number=i + 1,
                                              patient_id=f"SYNTHETIC-{i:04d}", overwrite=True)
                    save_png(montage([xi]), files[i][-2])
                else:
                    save_png(np.moveaxis(xi, 0, -1) if xi.shape[0] == 3 else xi[0], images_of[i][0])
                    decoded[i] = xi
                write_json(files[i][-1], side)
            bar.advance(len(ids))
    images = [str(p) for p in planned]
    sidecars = [str(f[-1]) for f in files]
    previews = [str(f[-2]) for f in files] if dims == 3 else []
    if dims == 2:
        g = out_dir / "grid.png"
        if done:  # the grid shows every sample: decode again the ones an earlier run wrote (cheap in 2D)
            ids = sorted(done)
            x = r.decode(tokens[ids], calibrate).cpu().numpy()
            decoded.update(zip(ids, x, strict=True))
        save_png(grid([decoded[i] for i in range(count)]), g)
        previews.append(str(g))
    marker.unlink(missing_ok=True)
    return {"images": images, "previews": previews, "sidecars": sidecars, "skipped": len(done)}


INPROGRESS = ".synth-in-progress.json"


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or not JSON (sidecars, markers)."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _complete(paths: list[Path], sidecar: dict) -> bool:
    """A sample an earlier run of the same command finished: every file there, the sidecar equal."""
    def there(p: Path) -> bool:  # a file, or a DICOM series folder (it appears whole: see dicomout)
        return p.is_file() or (p.is_dir() and any(p.glob("*.dcm")))

    return all(there(p) for p in paths) and read_json(paths[-1]) == json_roundtrip(sidecar)


def read_sidecar(path: Path) -> Any:
    """The JSON sidecar ``mrivq synth`` writes beside a NIfTI sample (``NAME.json``), or None."""
    path = Path(path)
    return read_json(path.with_name(path.name.removesuffix(".gz").removesuffix(".nii") + ".json"))


def read_sample(path: Path, r: Any) -> tuple[np.ndarray, int | None]:
    """A NIfTI sample ``mrivq synth`` wrote for run ``r``, back in the model's [0, 1] space (``[C, *grid]``):
    the exact inverse of the intensity mapping it was written with (its sidecar's class, if any); with
    that class."""
    from mrivq.data.intensity import intensity_range
    from mrivq.io.images import load_volume

    path = Path(path)
    arr, _ = load_volume(path)
    meta = read_sidecar(path)
    c = meta.get("class") if isinstance(meta, dict) else None
    c = c if isinstance(c, int) else None
    x = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[None]
    lo, hi = intensity_range(sample_intensity(r, c))
    if len(x) != len(lo):
        raise MrivqError(f"sample {path.name} has {len(x)} channel(s) but run {r.path.name} has {len(lo)}")
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - lo.reshape(shape)) / np.maximum(hi - lo, 1e-12).reshape(shape)).astype(np.float32), c


def json_roundtrip(d: dict) -> Any:
    import json

    return json.loads(json.dumps(d))
