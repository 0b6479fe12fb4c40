"""Using a trained run: evaluate, encode, decode, reconstruct and score single images.

Inputs are any NIfTI file or DICOM series folder; the run's own preprocessing is applied
(:func:`mrivq.data.restore.preprocess_file`) and outputs are mapped back to the input's shape, affine and
intensity scale (:func:`mrivq.data.restore`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mrivq.data.restore import preprocess_file, restore, slices_to_volume, volume_to_slices
from mrivq.io.images import save_nifti
from mrivq.runs.run import Run, load_run_on
from mrivq.utils.atomic import new_file_mode
from mrivq.utils.errors import MrivqError
from mrivq.utils.limits import check_npz


def prepare_input(r: Run, image: Path, dev: torch.device) -> tuple[torch.Tensor, dict]:
    """Preprocess ``image`` with the run's settings -> a model batch [B, C, *spatial] and its ctx.

    A 2D run given a volume encodes it slice by slice along ``preprocess.slice_axis`` (B = slices);
    :func:`_unbatch` puts the slices back together before the geometry is restored.
    """
    x, ctx = preprocess_file(image if isinstance(image, (list, tuple)) else Path(image), r.preprocess)
    x = torch.as_tensor(x).float()
    want = int(r.info.get("in_channels", x.shape[0]))
    dims = r.preprocess.dims
    if x.ndim == 4 and dims == 2:
        ctx = {**ctx, "_sliced": True}
        xb = volume_to_slices(x, r.preprocess.slice_axis)
    elif x.ndim != dims + 1:
        raise MrivqError(f"{image} gives a {x.ndim - 1}D image but run {r.path.name} is {dims}D; "
                         f"use a run trained with --dims {x.ndim - 1}")
    else:
        xb = x[None]
    if xb.shape[1] != want:
        raise MrivqError(f"{image} has {xb.shape[1]} channel(s) but the run expects {want}; pass an image "
                         f"with the run's modalities ({', '.join(r.preprocess.modalities)})")
    return xb.to(dev), ctx


def _unbatch(y: torch.Tensor, ctx: dict, r: Run) -> torch.Tensor:
    """Model-space batch -> one [C, *spatial] image on the preprocessed grid."""
    y = y.detach().float().cpu()
    return slices_to_volume(y, r.preprocess.slice_axis) if ctx.get("_sliced") else y[0]


def check_output(output: Path, *inputs: Path, overwrite: bool = False, run: Path | None = None,
                 suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output that would destroy something: the input itself (``-o IN``), a
    file of the run folder (its checkpoints, run.json), a directory, a device, a FIFO or any other
    non-regular file, or (without ``overwrite``) an existing file; its folder must exist, and its name
    end in one of ``suffixes`` when given."""
    output = Path(output)
    if output.exists() or output.is_symlink():
        if not output.is_file():
            raise MrivqError(f"output {output} exists and is not a regular file; name a new file")
        for src in inputs:
            if Path(src).exists() and output.resolve() == Path(src).resolve():
                raise MrivqError(f"output {output} is the input; name another output file")
        if run is not None:
            from mrivq.runs.folder import resolve_run

            home = resolve_run(run).resolve()
            if output.resolve().is_relative_to(home):
                raise MrivqError(f"output {output} is a file of run {home.name}; name a file outside the run folder")
        if not overwrite:
            raise MrivqError(f"output {output} already exists; pass --overwrite to replace it")
    if not output.parent.is_dir():
        raise MrivqError(f"output folder {output.parent} does not exist; create it first")
    if suffixes and not output.name.lower().endswith(suffixes):
        raise MrivqError(f"output {output} must end in {' or '.join(suffixes)}")
    return output


def encode_file(run: Path | None, image: Path, output: Path, device: str = "auto",
                overwrite: bool = False) -> dict:
    """Code indices of ``image`` + the geometry context needed to decode back -> ``.npz``."""
    output = check_output(output, image, overwrite=overwrite, run=run, suffixes=(".npz",))
    r, dev = load_run_on(run, device)
    x, ctx = prepare_input(r, image, dev)
    with torch.no_grad():
        idx = r.vqvae.encode_indices(x).cpu().numpy()
    if not ctx.get("_sliced"):
        idx = idx[0]
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=output.parent)
    os.fchmod(fd, new_file_mode())
    os.close(fd)
    try:
        np.savez_compressed(tmp, indices=idx.astype(np.int32), ctx=np.array(json.dumps(ctx, default=_jsonable)),
                            run=np.array(str(r.path.resolve())), vqvae_sha256=np.array(r.checkpoints["vqvae"]),
                            model_shape=np.array(x.shape[2:]))
        os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"shape": idx.shape, "path": str(output)}


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def check_target(output: Path, *inputs: Path, fmt: str = "nifti", overwrite: bool = False,
                 run: Path | None = None) -> Path:
    """:func:`check_output` for a NIfTI output; for ``fmt="dicom"`` the series folder ``output`` (new,
    empty, or with ``overwrite`` a DICOM series), never an input or inside the run folder."""
    if fmt not in ("nifti", "dicom"):
        raise MrivqError(f"--format {fmt!r} is not one of nifti, dicom")
    if fmt == "nifti":
        return check_output(output, *inputs, overwrite=overwrite, run=run)
    from mrivq.io.dicom_out import check_series_folder
    from mrivq.runs.folder import resolve_run

    out = Path(output)
    for src in inputs:
        if Path(src).exists() and out.resolve() == Path(src).resolve():
            raise MrivqError(f"output {out} is the input; name another output folder")
    if run is not None and out.resolve().is_relative_to(resolve_run(run).resolve()):
        raise MrivqError(f"output {out} is inside run folder {Path(run).name}; name a folder outside it")
    return check_series_folder(out, overwrite)


def _write(arr: np.ndarray, affine: np.ndarray, output: Path, fmt: str, overwrite: bool, what: str) -> None:
    if fmt == "dicom":
        from mrivq.io.dicom_out import save_dicom_series

        if arr.ndim != 3:
            raise MrivqError(f"--format dicom writes one 3D volume per series; this output is {arr.ndim}D "
                             f"{'x'.join(map(str, arr.shape))} (write NIfTI instead)")
        save_dicom_series(arr, affine, output, description=f"mrivq {what}", overwrite=overwrite)
    else:
        save_nifti(arr, affine, output)


def decode_file(run: Path | None, codes: Path, output: Path, device: str = "auto",
                overwrite: bool = False, fmt: str = "nifti") -> dict:
    """Decode a codes ``.npz`` into a NIfTI (or, ``fmt="dicom"``, a DICOM series folder) in the
    original image's geometry."""
    output = check_target(output, codes, fmt=fmt, overwrite=overwrite, run=run)
    r, dev = load_run_on(run, device)
    if not Path(codes).exists():
        raise MrivqError(f"codes file {codes} does not exist; write one with `mrivq encode`")
    check_npz(Path(codes), "codes file")  # declared sizes, before anything is decompressed
    try:
        with np.load(codes, allow_pickle=False) as z:
            raw = z["indices"]
            ctx = json.loads(str(z["ctx"]))
            sha = str(z["vqvae_sha256"])
            model_shape = tuple(int(s) for s in z["model_shape"])
    except (KeyError, ValueError, OSError, TypeError, EOFError, zipfile.BadZipFile):
        raise MrivqError(f"{codes} is not a codes file written by `mrivq encode`") from None
    if not isinstance(ctx, dict):
        raise MrivqError(f"{codes} is not a codes file written by `mrivq encode`")
    if raw.dtype.kind not in "iu":
        raise MrivqError(f"{codes} holds {raw.dtype} code indices; codes are integers (write them with "
                         "`mrivq encode`)")
    idx = torch.from_numpy(raw.astype(np.int64))
    if not ctx.get("_sliced"):
        idx = idx[None]
    f = r.vqvae.downsample_factor
    want = tuple(m // f for m in model_shape)
    if tuple(idx.shape[1:]) != want:
        raise MrivqError(f"{codes} holds a {'x'.join(map(str, idx.shape[1:]))} code grid but its own "
                         f"geometry needs {'x'.join(map(str, want))}; the file was edited or damaged")
    if sha != r.checkpoints["vqvae"]:
        raise MrivqError(f"{codes} was encoded by another VQ-VAE checkpoint than run {r.path.name}'s; "
                         f"decode with the run that encoded it")
    if idx.max() >= r.vqvae.num_embeddings or idx.min() < 0:
        raise MrivqError(f"{codes} holds code indices outside the run's codebook")
    with torch.no_grad():
        x_hat = r.vqvae.decode_indices(idx.to(dev)).float().clamp(0, 1)
    arr, affine = restore(_unbatch(x_hat, ctx, r), ctx)
    _write(arr, affine, output, fmt, overwrite, "decoded")
    return {"path": str(output)}


def reconstruct_file(run: Path | None, image: Path, output: Path, device: str = "auto",
                     overwrite: bool = False, fmt: str = "nifti") -> dict:
    """Encode and decode ``image``; the output (NIfTI, or ``fmt="dicom"`` a DICOM series folder) has
    its shape, affine and intensity scale."""
    output = check_target(output, image, fmt=fmt, overwrite=overwrite, run=run)
    r, dev = load_run_on(run, device)
    x, ctx = prepare_input(r, image, dev)
    with torch.no_grad():
        x_hat = r.vqvae.decode_indices(r.vqvae.encode_indices(x)).float().clamp(0, 1)
    mse = float(F.mse_loss(x_hat, x))
    arr, affine = restore(_unbatch(x_hat, ctx, r), ctx)
    _write(arr, affine, output, fmt, overwrite, "reconstruction")
    return {"path": str(output), "psnr": float(10 * np.log10(1.0 / max(mse, 1e-12)))}


def _prior_cond(r: Run, b: int, cls: str | int | None, covariates: dict[str, float] | None,
                dev: torch.device) -> tuple[Any, dict[str, float]]:
    """The prior's condition for a batch of ``b`` code grids of one input (``--class``, covariates)."""
    cond = None
    n_classes = getattr(r.prior, "num_classes", None)
    cls_id = r.class_id(cls)
    if n_classes is not None:
        if cls_id is None:
            known = ", ".join(r.class_names or []) or f"0..{n_classes - 1}"
            raise MrivqError(f"run {r.path.name} has a class-conditional prior; pass --class ({known})")
        cond = torch.full((b,), cls_id, dtype=torch.long, device=dev)
    return r.condition(cond, covariates, b, dev)


def score_file(run: Path | None, image: Path, output: Path, device: str = "auto",
               cls: str | int | None = None, covariates: dict[str, float] | None = None,
               overwrite: bool = False) -> dict:
    """Per-code negative log-likelihood under the prior (Pinaya et al. 2022), in the input's geometry."""
    from mrivq.inference.likelihood import log_likelihood

    output = check_output(output, image, overwrite=overwrite, run=run)
    r, dev = load_run_on(run, device, need_prior=True)
    x, ctx = prepare_input(r, image, dev)
    with torch.no_grad():
        idx = r.vqvae.encode_indices(x)
        cond, cov_values = _prior_cond(r, idx.shape[0], cls, covariates, dev)
        nll = log_likelihood(r.prior, idx, cond).float()
    mode = "trilinear" if nll.ndim == 4 else "bilinear"
    up = F.interpolate(nll[:, None], size=tuple(x.shape[2:]), mode=mode, align_corners=False)
    arr, affine = restore(_unbatch(up, ctx, r), ctx, intensity=False)
    save_nifti(arr, affine, output)
    return {"path": str(output), "mean_nll": float(nll.mean()), "covariates": cov_values or None}


def read_mask(path: Path, shape: tuple[int, ...], what: str,
              advice: str = "pass a NIfTI mask in the input's geometry") -> np.ndarray:
    """A mask or label volume's values; it must exist and have ``shape`` (``advice`` ends the message)."""
    from mrivq.io.images import load_volume

    path = Path(path)
    if not path.is_file():
        raise MrivqError(f"{what} {path} does not exist; {advice}")
    m = np.asarray(load_volume(path)[0])
    m = m.reshape(m.shape[:3]) if m.ndim > 3 and all(s == 1 for s in m.shape[3:]) else m
    if tuple(m.shape) != tuple(shape):
        raise MrivqError(f"{what} {path} is {'x'.join(map(str, m.shape))} but the input is "
                         f"{'x'.join(map(str, shape))}; {advice}")
    return m


def load_mask(path: Path, shape: tuple[int, ...], what: str = "brain mask") -> np.ndarray:
    """A binary mask (NIfTI, nonzero = inside) that must have the input's ``shape`` and not be empty."""
    m = read_mask(path, shape, what) > 0
    if not m.any():
        raise MrivqError(f"{what} {path} is empty (no nonzero voxel); pass a mask of the brain")
    return m


def heal_image(r: Run, dev: torch.device, image: Path | list[Path], opts: Any, *, cls: str | int | None = None,
               covariates: dict[str, float] | None = None, brain: Path | np.ndarray | None = None,
               progress: Any = None) -> dict[str, Any]:
    """:func:`mrivq.inference.heal.heal` on one input, mapped back to the input's geometry: ``anomaly``,
    ``recon_residual``, ``nll`` and ``healed`` arrays (zero outside ``brain`` when given), ``affine``,
    and ``resampled`` (the fraction of codes redrawn)."""
    from mrivq.inference.heal import heal

    opts = resolve_heal(r, opts)  # before any reading: a one-line error if it cannot be honoured
    x, ctx = prepare_input(r, image, dev)
    cond, cov_values = _prior_cond(r, x.shape[0], cls, covariates, dev)
    res = heal(r.vqvae, r.prior, x, opts, cond, progress=progress,
               reference=run_nll_reference(r) if opts.zscore > 0 else None, calibration=r.calibration,
               residual_ref=run_residual_reference(r, opts) if opts.normalize else None)
    out: dict[str, Any] = {}
    maps = [k for k in ("anomaly", "recon_residual", "normative_residual", "nll") if k in res]
    for key in maps:
        out[key], affine = restore(_unbatch(res[key], ctx, r), ctx, intensity=False)
    out["healed"], _ = restore(_unbatch(res["healed"], ctx, r), ctx)
    head, _ = restore(_unbatch(res["head"], ctx, r), ctx, intensity=False)
    out["head"] = head > 0.5
    if brain is not None:
        inside = load_mask(brain, out["anomaly"].shape[:3]) if not isinstance(brain, np.ndarray) else brain
        for key in maps:
            out[key] = np.where(inside, out[key], 0).astype(np.float32)
    out.update(affine=affine, resampled=float(res["resampled"].float().mean()),
               covariates=cov_values or None)
    return out


def run_nll_reference(r: Run) -> tuple[torch.Tensor, torch.Tensor]:
    """The NLL per position of the run's healthy validation codes (:func:`mrivq.inference.heal.nll_reference`),
    computed once per loaded run. Validation codes, not training ones: the prior has fitted the training
    codes' NLL more closely than a new scan's, so a training reference would flag every new scan a
    little; a run with fewer than ``RESIDUAL_REFERENCE_MIN`` validation codes is topped up with training
    codes."""
    from mrivq.inference.heal import nll_reference
    from mrivq.runs.folder import codes_path, load_codes

    ref = getattr(r, "_nll_reference", None)
    if ref is None:
        if getattr(r.prior, "conditional", False):
            raise MrivqError(f"run {r.path.name} has a conditional prior; --zscore needs an unconditional one "
                             "(use --threshold)")
        codes = load_codes(codes_path(r.path))
        if codes is None or codes.get("vqvae_sha256") not in (None, r.checkpoints["vqvae"]):
            raise MrivqError(f"run {r.path.name} has no usable codes/codes.pt for --zscore; run `mrivq train "
                             f"--stage prior --run {r.path}` or use --threshold")
        healthy = codes.get("val")
        healthy = healthy if healthy is not None else codes["train"][:0]
        if len(healthy) < RESIDUAL_REFERENCE_MIN:
            healthy = torch.cat([healthy, codes["train"][:RESIDUAL_REFERENCE_MIN - len(healthy)]])
        ref = nll_reference(r.prior, healthy.long().to(next(r.prior.parameters()).device))
        r._nll_reference = ref
    return ref


#: healthy held-out scans the residual reference of ``--normalize`` is computed from (evenly spread),
#: and the fewest: a run with fewer validation scans tops them up with training scans
RESIDUAL_REFERENCE_SUBJECTS, RESIDUAL_REFERENCE_MIN = 32, 8
#: where a run keeps its residual reference once computed (recomputed when the VQ-VAE changes)
RESIDUAL_REFERENCE_FILE = "residual_reference.pt"


def _residual_reference_file(r: Run) -> dict:
    """The run folder's residual references (``calibrated`` / ``raw``: ``{"mean", "std"}``), or ``{}`` when the
    file is absent, unreadable or belongs to another VQ-VAE (then computed again)."""
    try:
        ref = torch.load(r.path / RESIDUAL_REFERENCE_FILE, map_location="cpu", weights_only=True)
    except Exception:  # absent, truncated or not a reference
        return {}
    return ref if isinstance(ref, dict) and ref.get("vqvae_sha256") == r.checkpoints.get("vqvae") else {}


def _stored_residual_reference(r: Run, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    ref = _residual_reference_file(r).get(key)
    ok = isinstance(ref, dict) and all(isinstance(ref.get(k), torch.Tensor) for k in ("mean", "std"))
    return (ref["mean"], ref["std"]) if ok else None


def _residual_key(opts: Any) -> str:
    return "calibrated" if opts.calibrate else "raw"


def residual_reference_available(r: Run, opts: Any) -> bool:
    """Whether ``--normalize`` can be honoured for run ``r``: a 3D run whose folder holds the reference,
    or whose dataset is there to compute it from."""
    return r.preprocess.dims == 3 and (_stored_residual_reference(r, _residual_key(opts)) is not None
                                       or (Path(r.info.get("data_dir", "")) / "manifest.csv").is_file())


def resolve_heal(r: Run, opts: Any) -> Any:
    """Healing options with the run-dependent defaults decided (and recorded as used): ``calibrate`` when
    the run has a calibration, ``normalize`` when a residual reference is available; an explicit request
    that cannot be honoured is a one-line error (here or in :func:`run_residual_reference`)."""
    from dataclasses import replace

    opts = opts.resolved(r.calibration)
    return replace(opts, normalize=residual_reference_available(r, opts)) if opts.normalize is None else opts


def run_residual_reference(r: Run, opts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-voxel reconstruction residual of the run's validation scans (healthy, never trained
    on; :func:`mrivq.inference.heal.residual_reference`), with the calibration ``opts`` uses. Computed once per run
    and VQ-VAE and kept in the run folder (``residual_reference.pt``), so that a run copied without its
    dataset still normalizes. Validation scans rather than training ones: the VQ-VAE reconstructs what
    it trained on better than a new scan, so a training reference would flag every new scan a little.
    A run with fewer than ``RESIDUAL_REFERENCE_MIN`` validation scans adds training scans to reach it."""
    from mrivq.data.split import load_split
    from mrivq.inference.heal import residual_reference
    from mrivq.utils.atomic import atomic_write_bytes

    cache = r.__dict__.setdefault("_residual_reference", {})
    key = _residual_key(opts)
    if key in cache:
        return cache[key]
    if r.preprocess.dims != 3:
        raise MrivqError(f"run {r.path.name} is 2D; --normalize needs a 3D run (a voxel's healthy residual is "
                         "measured at its place in the volume)")
    stored = _stored_residual_reference(r, key)
    if stored is not None:
        cache[key] = stored
        return stored
    data_dir = Path(r.info.get("data_dir", ""))
    if not (data_dir / "manifest.csv").is_file():
        raise MrivqError(f"--normalize needs the run's own dataset, which is not at {data_dir}; fetch it again "
                         "there or heal with --no-normalize")
    sp = load_split(r.config, data_dir, subjects=r.info.get("split"))

    def spread(ds: Any, n: int) -> list:
        idx = np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int) if len(ds) else []
        return [ds[int(i)]["image"] for i in sorted(set(idx))]

    scans = spread(sp.val, RESIDUAL_REFERENCE_SUBJECTS)
    scans += spread(sp.train, RESIDUAL_REFERENCE_MIN - len(scans)) if len(scans) < RESIDUAL_REFERENCE_MIN else []
    dev = next(r.vqvae.parameters()).device
    batches = (torch.as_tensor(s)[None].float().to(dev) for s in scans)
    mean, std = residual_reference(r.vqvae, batches, r.calibration if opts.calibrate else None)
    cache[key] = (mean.cpu(), std.cpu())
    blob = {**_residual_reference_file(r), "vqvae_sha256": r.checkpoints.get("vqvae"),
            key: {"mean": cache[key][0], "std": cache[key][1]}}
    buf = io.BytesIO()
    torch.save(blob, buf)
    with contextlib.suppress(OSError):  # kept beside the checkpoints; a read-only run computes it again
        atomic_write_bytes(r.path / RESIDUAL_REFERENCE_FILE, buf.getvalue())
    return cache[key]


def beside(output: Path, tag: str) -> Path:
    """``map.nii.gz`` -> ``map_<tag>.nii.gz`` (same folder, same NIfTI suffix)."""
    name = Path(output).name
    for suf in (".nii.gz", ".nii"):
        if name.lower().endswith(suf):
            return Path(output).with_name(f"{name[:-len(suf)]}_{tag}{name[-len(suf):]}")
    return Path(output).with_name(f"{name}_{tag}.nii.gz")


def heal_file(run: Path | None, image: Path, output: Path, opts: Any, *, healed: Path | None = None,
              brain: Path | None = None, device: str = "auto", cls: str | int | None = None,
              covariates: dict[str, float] | None = None, overwrite: bool = False,
              progress: Any = None) -> dict:
    """``score --heal``: the anomaly map at ``output``; the healed volume (``healed``, default
    ``<output>_healed``) and the NLL map (``<output>_nll``) beside it, all in the input's geometry."""
    from mrivq.io.files import NIFTI_SUFFIXES

    opts.validate()
    healed = Path(healed) if healed is not None else beside(output, "healed")
    nll_path = beside(output, "nll")
    paths = {"anomaly": Path(output), "healed": healed, "nll": nll_path}
    if len({p.resolve() for p in paths.values()}) < 3:
        raise MrivqError(f"--healed {healed} is the anomaly map or the NLL map; name another file")
    for p in paths.values():
        check_output(p, image, *([brain] if brain else []), overwrite=overwrite, run=run, suffixes=NIFTI_SUFFIXES)
    if brain is not None and not Path(brain).is_file():
        raise MrivqError(f"brain mask {brain} does not exist; pass a NIfTI mask in the input's geometry")
    r, dev = load_run_on(run, device, need_prior=True)
    res = heal_image(r, dev, image, opts, cls=cls, covariates=covariates, brain=brain, progress=progress)
    for key, p in paths.items():
        save_nifti(res[key], res["affine"], p)
    inside = res["anomaly"] > 0
    return {"path": str(output), "healed": str(healed), "nll": str(nll_path), "resampled": res["resampled"],
            "max": float(res["anomaly"].max()), "mean_in_head": float(res["anomaly"][inside].mean()) if inside.any()
            else 0.0, "covariates": res["covariates"]}
