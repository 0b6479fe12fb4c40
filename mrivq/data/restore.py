"""Single files and the way back: :func:`preprocess_file` (one input -> tensor and a JSON-able
``ctx``), :func:`restore` (model output -> the input's own shape, affine and intensity units, by
MONAI's inverse or one resampling), the JSON encoding of applied operations, slicing volumes for 2D
models and back, and :func:`to_input_dtype`.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from monai.utils import TraceKeys

from mrivq.data.preprocess import Preprocess
from mrivq.data.readers import input_dtype, is_image2d
from mrivq.data.transforms import build_transforms, pad_crop_map, run_transforms
from mrivq.utils.errors import ImageReadError, MrivqError

#: ctx format written by :func:`preprocess_file`.
CTX_VERSION = 1


def _to_json(obj: Any) -> Any:
    """Applied operations -> JSON-able (tensors/arrays/tuples tagged; transform ids dropped)."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.detach().cpu().tolist(), "dtype": str(obj.dtype).replace("torch.", "")}
    if isinstance(obj, np.ndarray):
        return {"__array__": obj.tolist(), "dtype": obj.dtype.name}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v) for v in obj]}
    if isinstance(obj, list):
        return [_to_json(v) for v in obj]
    if isinstance(obj, dict):
        out = {str(k): _to_json(v) for k, v in obj.items()}
        if TraceKeys.CLASS_NAME in obj and TraceKeys.ID in obj:
            out[TraceKeys.ID] = TraceKeys.NONE  # another process/instance will invert it
        return out
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.dtype):
        return {"__torch_dtype__": str(obj).replace("torch.", "")}
    if isinstance(obj, np.dtype):
        return obj.name
    return str(obj)


def _from_json(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return torch.tensor(obj["__tensor__"], dtype=getattr(torch, obj["dtype"]))
        if "__array__" in obj:
            return np.asarray(obj["__array__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(_from_json(v) for v in obj["__tuple__"])
        if "__torch_dtype__" in obj:
            return getattr(torch, obj["__torch_dtype__"])
        return {k: _from_json(v) for k, v in obj.items()}
    return obj


def preprocess_file(path: Path | str | Sequence[Path | str], pre: Preprocess) -> tuple[torch.Tensor, dict]:
    """One input (NIfTI/Analyze file, DICOM series folder, PNG/JPEG for dims=2; a list of files, one
    per modality, for multi-contrast models) -> (tensor [C, *spatial], ctx).

    ``ctx`` is a JSON-able dict with what :func:`restore` needs: the input's shape, affine, dtype, the
    per-channel intensity lo/hi and MONAI's applied operations. With ``pre.dims == 2`` and a volume
    the tensor is the whole volume [C, X, Y, Z] (in-plane padded); :func:`volume_to_slices` turns it
    into a batch of slices for the model and :func:`slices_to_volume` back.
    """
    pre.validate()
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    if not paths:
        raise MrivqError("no input file given")
    for p in paths:
        if not p.exists():
            raise ImageReadError(f"{p} does not exist; check the path")
    image2d = is_image2d(paths[0])
    if image2d and pre.dims != 2:
        raise MrivqError(f"{paths[0]} is a 2D image but the model is 3D; give a NIfTI volume or DICOM folder")
    t = build_transforms(pre, volumetric=not image2d, for_dataset=False)
    d = run_transforms(t, {"image": [{"path": str(p)} for p in paths], "subject": paths[0].name})
    img = d["image"]
    n_ch, want = int(img.shape[0]), pre.channels
    if not image2d and want > 1 and n_ch != want:
        raise MrivqError(f"{', '.join(map(str, paths))}: {n_ch} channel(s), but the model takes {want} "
                         f"({', '.join(pre.modalities)}); pass one file per modality in that order")
    x = img.as_tensor().float().contiguous() if isinstance(img, MetaTensor) else torch.as_tensor(img).float()
    ctx = {
        "version": CTX_VERSION,
        "path": [str(p) for p in paths],
        "kind": "image2d" if image2d else "volume",
        "pre": pre.to_dict(),
        "shape": d["orig_shape"],
        "channels": n_ch,
        "channels_last": bool(d["channels_last"] or len(paths) > 1),
        "affine": d["orig_affine"],
        "dtype": input_dtype(paths[0]),
        "lo": [float(v) for v in d["lo"]],
        "hi": [float(v) for v in d["hi"]],
        "fixed_range": d.get("fixed_range"),
        "preprocessed_shape": [int(s) for s in x.shape[1:]],
        "preprocessed_affine": np.asarray(img.affine, dtype=np.float64).tolist(),
        "ops": _to_json(list(img.applied_operations)),
    }
    if not image2d and pre.dims == 2:
        ctx["slice_axis"] = pre.slice_axis
    if d.get("registration") is not None:  # the way back goes through the inverse of this transform
        ctx["registration"] = d["registration"]
    return x, ctx


def volume_to_slices(x: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """[C, X, Y, Z] -> [S, C, H, W] along spatial ``slice_axis`` (a batch for a 2D model)."""
    return x.movedim(1 + slice_axis, 0).contiguous()


def slices_to_volume(y: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """[S, C, H, W] -> [C, X, Y, Z], inverse of :func:`volume_to_slices`."""
    return y.movedim(0, 1 + slice_axis).contiguous()


def restore(x: torch.Tensor | np.ndarray, ctx: dict | str, *, intensity: bool = True,
            method: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Model output [C, *spatial] on the preprocessed grid -> (array, affine) in the input's own
    shape, affine and intensity units (crop/pad, resampling, orientation and scaling undone).

    The array is float32, spatial axes first, channels last when there are several (multi-contrast
    or 4D inputs); :func:`to_input_dtype` casts it like the input. ``intensity=False`` maps the
    geometry only (for maps that are not images, e.g. per-voxel NLL; any channel count then).
    ``method``: "monai" replays MONAI's inverse of the recorded operations, "resample" maps the grid
    through the affines in one resampling, "auto" tries the first and falls back to the second.
    """
    if isinstance(ctx, str):
        ctx = json.loads(ctx)
    if not isinstance(ctx, dict) or "preprocessed_shape" not in ctx:
        raise MrivqError("restore needs the ctx returned by preprocess_file")
    x = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)).float()
    pshape = [int(s) for s in ctx["preprocessed_shape"]]
    if list(x.shape) == pshape:
        x = x[None]
    if list(x.shape[1:]) != pshape:
        raise MrivqError(f"restore got an image of shape {list(x.shape)}; expected [C, {', '.join(map(str, pshape))}]")
    if intensity and x.shape[0] != len(ctx["lo"]):
        raise MrivqError(f"restore got {x.shape[0]} channel(s) for an input with {len(ctx['lo'])}")
    if method not in ("auto", "monai", "resample"):
        raise MrivqError(f"restore method must be auto, monai or resample, not {method!r}")
    if not intensity:  # identity intensity mapping with the output's channel count
        ctx = {**ctx, "lo": [0.0] * x.shape[0], "hi": [1.0] * x.shape[0],
               "ops": _with_identity_scaling(ctx["ops"], x.shape[0])}
    out = None
    if ctx.get("registration") is not None:  # aligned with a template: one resampling through its inverse
        method = "resample"
    if method in ("auto", "monai"):
        try:
            out = _restore_monai(x, ctx)
        except Exception as e:
            if method == "monai":
                raise
            warnings.warn(f"MONAI's inverse could not replay the recorded operations ({type(e).__name__}: {e}); "
                          "restoring by resampling through the affines instead", stacklevel=2)
    if out is None:
        out = _restore_resample(x, ctx)
    arr = out.numpy().astype(np.float32)
    if list(arr.shape[1:]) != list(ctx["shape"]):  # never hand back a wrong grid silently
        raise MrivqError(f"restored shape {list(arr.shape[1:])} differs from the input's {ctx['shape']}")
    arr = np.moveaxis(arr, 0, -1) if arr.shape[0] > 1 else arr[0]
    return np.ascontiguousarray(arr), np.asarray(ctx["affine"], dtype=np.float64)


def _with_identity_scaling(ops: list, channels: int) -> list:
    ops = copy.deepcopy(ops)
    for op in ops:
        if isinstance(op, dict) and op.get("class") == "ScalePercentilesd":
            op["extra_info"] = {**op.get("extra_info", {}), "lo": [0.0] * channels, "hi": [1.0] * channels}
    return ops


def _restore_monai(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    pre = Preprocess.from_dict(ctx["pre"])
    t = build_transforms(pre, volumetric=ctx["kind"] == "volume", for_dataset=False)
    mt = MetaTensor(x, affine=torch.tensor(ctx["preprocessed_affine"], dtype=torch.float64),
                         applied_operations=_from_json(ctx["ops"]))
    out = t.inverse({"image": mt})["image"]
    if out.applied_operations:
        raise RuntimeError("operations left after the inverse")
    return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out).float()


def _restore_resample(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """One bilinear resampling from the preprocessed grid onto the original one, then intensity."""
    shape = list(ctx["shape"])
    if ctx["kind"] == "volume":
        mt = MetaTensor(x, affine=torch.tensor(ctx["preprocessed_affine"], dtype=torch.float64))
        dst = np.asarray(ctx["affine"], dtype=np.float64)
        if ctx.get("registration") is not None:  # the input's voxels as they sit in template space
            from mrivq.data.align import Registration

            dst = Registration.from_dict(ctx["registration"]).registered_affine(dst)
        res = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
            mt, dst_affine=torch.tensor(dst, dtype=torch.float64), spatial_size=tuple(shape))
        y = torch.as_tensor(res.as_tensor() if hasattr(res, "as_tensor") else res).float()
    else:  # 2D images: only a centred pad/crop happened; invert it with the forward index map
        pre = Preprocess.from_dict(ctx["pre"])
        mapping, _ = pad_crop_map(tuple(shape), pre)
        flat = x.reshape(x.shape[0], -1)
        y = torch.zeros((x.shape[0], int(np.prod(shape))))
        valid = mapping >= 0
        y[:, mapping[valid]] = flat[:, valid]
        y = y.reshape(x.shape[0], *shape)
    view = (-1,) + (1,) * (y.ndim - 1)
    lo = torch.tensor(ctx["lo"]).reshape(view)
    hi = torch.tensor(ctx["hi"]).reshape(view)
    return y * (hi - lo) + lo


def to_input_dtype(arr: np.ndarray, ctx: dict) -> np.ndarray:
    """Cast a restored array to the input's stored dtype (rounded and clipped for integers)."""
    dt = np.dtype(ctx.get("dtype") or "float32")
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.rint(arr), info.min, info.max).astype(dt)
    return arr.astype(dt)
