"""The MONAI transforms of the pipeline: :class:`LoadSourcesd` (sources -> MetaTensor),
:class:`ScalePercentilesd` (invertible percentile scaling), :class:`CentralSlicesd`, the pad/crop
choice and its index map for 2D arrays, :func:`build_transforms` (the Compose used by datasets,
single files and :func:`mrivq.data.restore`) and :func:`run_transforms`, which surfaces our one-line errors
from inside MONAI's wrapped ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    DivisiblePadd,
    EnsureTyped,
    InvertibleTransform,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    SelectItemsd,
    Spacingd,
    SpatialResample,
)

from mrivq.data.preprocess import Preprocess
from mrivq.data.readers import is_image2d, load_source
from mrivq.utils.errors import ImageReadError, MrivqError, find_in_chain

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class LoadSourcesd(MapTransform):
    """``d[key]`` (a list of sources) -> MetaTensor [C, *spatial] with its affine; sources after
    the first are resampled (bilinear) onto the first one's grid when their grids differ."""

    def __init__(self, keys: str = "image", base: str | None = None) -> None:
        super().__init__(keys)
        self.base = Path(base) if base else None

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            sources = d[key]
            chans, fixed, ref_aff, ref_shape, had_ch = [], None, None, None, False
            for i, src in enumerate(sources):
                arr, aff, ch, fx = load_source(src, self.base)
                if i == 0:
                    ref_aff, ref_shape, had_ch, fixed = aff, arr.shape[1:], ch, fx
                    chans.append(torch.from_numpy(arr))
                    continue
                fixed = fixed if fx == fixed else None
                if arr.shape[1:] == ref_shape and np.allclose(aff, ref_aff, atol=1e-4):
                    chans.append(torch.from_numpy(arr))
                    continue
                if "index" in src or is_image2d(Path(src["path"])):
                    raise ImageReadError(f"{src['path']} is {arr.shape[1:]} but {sources[0]['path']} is "
                                         f"{ref_shape}; 2D channels must have the same size")
                mt = MetaTensor(torch.from_numpy(arr), affine=torch.as_tensor(aff))
                res = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
                    mt, dst_affine=torch.as_tensor(ref_aff), spatial_size=tuple(ref_shape))
                chans.append(torch.as_tensor(res.as_tensor() if hasattr(res, "as_tensor") else res).float())
            img = torch.cat(chans, 0).float()
            d[key] = MetaTensor(img, affine=torch.as_tensor(ref_aff, dtype=torch.float64))
            d["fixed_range"] = list(fixed) if fixed else None
            d["channels_last"] = bool(had_ch)
            d["orig_shape"] = [int(s) for s in ref_shape]
            d["orig_affine"] = np.asarray(ref_aff, dtype=np.float64).tolist()
            d["source_name"] = str(sources[0].get("path", sources[0].get("index", "")))
        return d


class CheckGeometryd(MapTransform):
    """Refuse, before any resampling, what a volumetric run cannot use: a 3D run given a 2D image or
    a single slice, and a volume whose resampled grid would exceed the memory budget (a header
    with 500 mm voxels resamples to thousands of voxels per axis)."""

    def __init__(self, pre: Preprocess, keys: str = "image") -> None:
        super().__init__(keys)
        self.pre = pre

    def __call__(self, data: dict) -> dict:
        from mrivq.utils import limits

        for key in self.key_iterator(data):
            img = data[key]
            name = data.get("source_name") or "the input"
            shape = tuple(int(s) for s in img.shape[1:])
            if self.pre.dims == 3 and (len(shape) != 3 or min(shape) < 2):
                raise ImageReadError(f"{name}: is a 2D image or a single slice ({'x'.join(map(str, shape))} "
                                     "voxels) but the run is 3D; pass a volume (a whole DICOM series or a 3D "
                                     "NIfTI)")
            pixdim = _volumetric_pixdim(self.pre)
            if pixdim is None:
                continue
            aff = np.asarray(img.affine, dtype=np.float64)
            zooms = np.sqrt((aff[:3, :3] ** 2).sum(0))
            out = [n if t <= 0 else int(np.ceil(n * z / t)) for n, z, t in zip(shape, zooms, pixdim, strict=False)]
            limits.check_voxels(name, [img.shape[0], *out], why=f"resampled to {pixdim} mm it would be ")
        return data


def _with_array(img: MetaTensor, y: np.ndarray, affine: np.ndarray | None = None) -> MetaTensor:
    """``img``'s metadata and applied operations around a new array (and, if given, a new affine)."""
    meta = img.meta if affine is None else {k: v for k, v in img.meta.items() if k != "affine"}
    extra = {} if affine is None else {"affine": torch.as_tensor(affine)}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(y)), meta=meta,
                      applied_operations=list(img.applied_operations), **extra)


class BiasFieldd(MapTransform):
    """N4 bias-field correction of every channel (:func:`mrivq.data.align.n4_correct`), fitted at 4 mm."""

    def __call__(self, data: dict) -> dict:
        from mrivq.data.align import n4_correct

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            aff = np.asarray(img.affine, dtype=np.float64)
            x = img.as_tensor().numpy()
            d[key] = _with_array(img, np.stack([n4_correct(c, aff) for c in x]) if x.ndim == 4 else x)
        return d


class AlignToTemplated(MapTransform):
    """Register the scan (its first channel) with the template (:func:`mrivq.data.align.cached_register`) and
    resample every channel into the template's box at the preset's spacing (the crop is the template's
    box: a head is never cut by an array centre). Sets ``d["registration"]`` (JSON-able, with its
    quality check) and ``d["brain_mask"]`` (the template's brain on the grid)."""

    def __init__(self, pre: Preprocess, keys: str = "image") -> None:
        super().__init__(keys)
        self.pre = pre

    def __call__(self, data: dict) -> dict:
        from mrivq.data import align

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            aff = np.asarray(img.affine, dtype=np.float64)
            x = img.as_tensor().numpy()
            name = align.resolve_template(self.pre.template, d.get("source_name"))
            tpl = align.load_template(name)
            reg = align.cached_register(x[0], aff, tpl, method=str(self.pre.register),
                                        resolution_mm=float(min(self.pre.spacing or [2.0])),
                                        source=d.get("source_name"))
            grid_aff, grid_shape = align.template_grid(tpl, self.pre.spacing, self.pre.shape, self.pre.divisible_by)
            y = align.to_template(x, aff, reg, grid_aff, grid_shape, channels_first=True)
            d[key] = _with_array(img, y, grid_aff)
            d["registration"] = reg.to_dict()
            d["brain_mask"] = torch.from_numpy(align.grid_brain(name, grid_aff, grid_shape))
        return d


class HeadMaskd(MapTransform):
    """``d["head_mask"]``: the head in the (first channel of the) image (:func:`mrivq.data.align.head_mask`)."""

    def __call__(self, data: dict) -> dict:
        from mrivq.data.align import head_mask

        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            d["head_mask"] = torch.from_numpy(head_mask(x[0].numpy()))
        return d


class SkullStripd(MapTransform):
    """Keep the brain alone: voxels outside ``d["brain_mask"]`` set to 0 (after scaling)."""

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mask = torch.as_tensor(d["brain_mask"]).to(img.dtype)
            y = img * mask[None]
            d[key] = y
        return d


class ScalePercentilesd(MapTransform, InvertibleTransform):
    """Per channel: [percentile lo, percentile hi] -> [0, 1] (optionally clipped). The lo/hi used
    are recorded in the applied operation (for the inverse) and in ``d["lo"]``/``d["hi"]``.
    Data with a fixed range (8-bit images) is scaled by that range instead. With ``mask_key``, the
    percentiles are taken inside ``d[mask_key]`` (the head, not a field of view that is mostly air)."""

    def __init__(self, keys: str = "image", lower: float = 0.5, upper: float = 99.5, clip: bool = True,
                 mask_key: str | None = None):
        super().__init__(keys)
        self.lower, self.upper, self.clip = float(lower), float(upper), bool(clip)
        self.mask_key = mask_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            fixed = d.get("fixed_range")
            if fixed:
                lo = [float(fixed[0])] * x.shape[0]
                hi = [float(fixed[1])] * x.shape[0]
            else:
                lo, hi = [], []
                mask = d.get(self.mask_key) if self.mask_key else None
                m = torch.as_tensor(mask).bool().numpy() if mask is not None else None
                for c in range(x.shape[0]):
                    v = x[c].numpy()
                    v = v[m] if m is not None and m.any() else v.ravel()
                    a, b = np.percentile(v, [self.lower, self.upper])
                    lo.append(float(a))
                    hi.append(float(b) if b > a else float(a) + 1.0)  # constant image: shift only
            shape = (-1,) + (1,) * (x.ndim - 1)
            lo_t = torch.tensor(lo, dtype=x.dtype).reshape(shape)
            hi_t = torch.tensor(hi, dtype=x.dtype).reshape(shape)
            y = (x - lo_t) / (hi_t - lo_t)
            if self.clip:
                y = y.clamp(0.0, 1.0)
            if isinstance(img, MetaTensor):
                y = MetaTensor(y, meta=img.meta, applied_operations=list(img.applied_operations))
            self.push_transform(y, extra_info={"lo": lo, "hi": hi})
            d[key], d["lo"], d["hi"] = y, lo, hi
        return d

    def inverse(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            op = self.pop_transform(d[key])
            info = op["extra_info"]
            img = d[key]
            x = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
            shape = (-1,) + (1,) * (x.ndim - 1)
            lo = torch.tensor(info["lo"], dtype=x.dtype).reshape(shape)
            hi = torch.tensor(info["hi"], dtype=x.dtype).reshape(shape)
            y = x * (hi - lo) + lo
            if isinstance(img, MetaTensor):
                y = MetaTensor(y, meta=img.meta, applied_operations=list(img.applied_operations))
            d[key] = y
        return d


class CentralSlicesd(MapTransform):
    """[C, X, Y, Z] -> [n, C, H, W]: the ``n`` central slices along spatial ``axis``."""

    def __init__(self, keys: str = "image", axis: int = 2, n: int = 1) -> None:
        super().__init__(keys)
        self.axis, self.n = int(axis), int(n)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            depth = x.shape[1 + self.axis]
            idx = central_slices(depth, self.n)
            d[key] = x.movedim(1 + self.axis, 0)[idx].contiguous()
        return d


def central_slices(depth: int, n: int) -> list[int]:
    """Indices of the ``n`` central slices of ``depth`` (edge slices repeat when n > depth)."""
    start = depth // 2 - n // 2
    return [min(max(start + i, 0), depth - 1) for i in range(n)]


def _volumetric_pixdim(pre: Preprocess) -> list[float] | None:
    if pre.spacing is None:
        return None
    if len(pre.spacing) == 3:
        return [float(s) for s in pre.spacing]
    inplane = iter(float(s) for s in pre.spacing)  # dims=2: in-plane spacing, slice spacing kept
    return [-1.0 if a == pre.slice_axis else next(inplane) for a in range(3)]


def _pad_crop(pre: Preprocess, nd: int, volumetric_2d: bool) -> tuple[str, Any]:
    """('shape', spatial_size) or ('k', k) for ``nd`` spatial dims."""
    if volumetric_2d:  # 2D model on volumes: pad/crop in-plane only
        if pre.shape is not None:
            it = iter(pre.shape)
            return "shape", [-1 if a == pre.slice_axis else next(it) for a in range(3)]
        return "k", [1 if a == pre.slice_axis else pre.divisible_by for a in range(3)]
    if pre.shape is not None:
        return "shape", list(pre.shape)
    return "k", [pre.divisible_by] * nd


def build_transforms(pre: Preprocess, *, volumetric: bool, for_dataset: bool, base: Path | None = None,
                     dtype: torch.dtype = torch.float32):
    """The MONAI Compose for volumes (``volumetric``) or 2D images; ``for_dataset`` adds typing,
    key selection and (2D model on volumes) central-slice extraction."""
    ts: list = [LoadSourcesd("image", base=str(base) if base else None)]
    if volumetric:
        ts.append(CheckGeometryd(pre))
        ts.append(Orientationd("image", axcodes=pre.orientation.upper(), labels=_RAS_LABELS))
        if pre.n4:
            ts.append(BiasFieldd("image"))
        pixdim = _volumetric_pixdim(pre)
        if pre.register:
            ts.append(AlignToTemplated(pre))
        elif pixdim is not None:
            ts.append(Spacingd("image", pixdim=pixdim, mode="bilinear", padding_mode="border",
                                    dtype=torch.float32))
    in_head = volumetric and pre.head_percentiles
    if in_head:
        ts.append(HeadMaskd("image"))
    ts.append(ScalePercentilesd("image", *pre.percentiles, clip=pre.clip, mask_key="head_mask" if in_head else None))
    if volumetric and pre.skull_strip:
        ts.append(SkullStripd("image"))
    volumetric_2d = volumetric and pre.dims == 2
    how, arg = _pad_crop(pre, 3 if volumetric else 2, volumetric_2d)
    if how == "shape":
        ts.append(ResizeWithPadOrCropd("image", spatial_size=arg))
    else:
        ts.append(DivisiblePadd("image", k=arg))
    if for_dataset:
        ts.append(EnsureTyped("image", data_type="tensor", dtype=dtype, track_meta=False))  # the cache's dtype
        if volumetric_2d:
            ts.append(CentralSlicesd("image", axis=pre.slice_axis, n=pre.slices_per_volume))
        ts.append(SelectItemsd(["image", "lo", "hi", "subject", "label", "registration"], allow_missing_keys=True))
    return Compose(ts)


def pad_crop_map(in_shape: tuple[int, ...], pre: Preprocess) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flat source index per output pixel (-1 = padding), from MONAI's own pad/crop on an index grid."""
    grid = torch.arange(1, int(np.prod(in_shape)) + 1, dtype=torch.float64).reshape(1, *in_shape)
    how, arg = _pad_crop(pre, len(in_shape), False)
    d = {"image": grid}
    t = ResizeWithPadOrCropd("image", spatial_size=arg) if how == "shape" else DivisiblePadd("image", k=arg)
    out = torch.as_tensor(t(d)["image"])[0]
    return (out.round().long() - 1).reshape(-1), tuple(out.shape)


def _unwrap_error(e: BaseException) -> MrivqError | None:
    """MONAI wraps transform errors in RuntimeError('applying transform ...'); find ours inside."""
    found = find_in_chain(e, MrivqError)
    return found if isinstance(found, MrivqError) else None


def run_transforms(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        ours = _unwrap_error(e)
        if ours is not None:
            raise ours from None
        raise
