"""Alignment with a brain template: the shipped ICBM152 2009a template (:func:`load_template`), the
template's box at a preset's spacing (:func:`template_grid`), affine registration (:func:`register`:
moments start, then rigid, then affine, multi-resolution, Mattes mutual information; SimpleITK's
registration framework, Lowekamp et al. 2013, Yaniv et al. 2018), N4 bias-field correction at a
reduced resolution (:func:`n4_correct`, Tustison et al. 2010), resampling through a registration in
both directions (:func:`to_template`, :func:`to_native`) and a head mask (:func:`head_mask`).

Conventions: arrays are indexed (x, y, z) with a RAS+ affine (nibabel's). A :class:`Registration`
holds the 4x4 matrix that maps a point of the template's world (mm, RAS) to the scan's world: the
scan's voxels then sit in template space at ``inv(matrix) @ affine``, so that both directions are one
resampling through affines, and nothing of the scan's own geometry is lost.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mrivq.utils.errors import MrivqError

#: the template shipped in the package (``mrivq/data/templates``, licence beside it)
DEFAULT_TEMPLATE = "icbm152"
_ICBM = {"t1": "icbm152_2009a_t1_2mm.nii.gz", "brain": "icbm152_2009a_brain_2mm.nii.gz",
         "gm": "icbm152_2009a_gm_2mm.nii.gz", "wm": "icbm152_2009a_wm_2mm.nii.gz"}
#: the quality check: a registered scan whose intensities correlate less than this with the template's
#: inside the template's brain (absolute Pearson r, so that T2/PD contrast passes too) fails, as does a
#: linear part scaling the head by more than 1.6x or less than 1/1.6 in volume, or a brain of which
#: less than 97% lies inside the scan's field of view
MIN_SIMILARITY = 0.35
MAX_VOLUME_SCALE = 1.6
MIN_BRAIN_IN_VIEW = 0.97
_LPS = np.diag([-1.0, -1.0, 1.0])

#: registrations run in this process (a counter the cache tests read)
REGISTRATIONS = {"count": 0}
_COUNT_LOCK = threading.Lock()


@dataclass(frozen=True)
class Template:
    """A template: its T1 (scaled to [0, 1]), brain mask probability, optional tissue maps, RAS affine."""

    name: str
    t1: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    tissues: dict = field(default_factory=dict)

    @functools.cached_property
    def brain_centre(self) -> np.ndarray:
        """Centre (mm) of the brain mask's bounding box: the centre of every template grid."""
        idx = np.argwhere(self.brain > 0.5)
        lo, hi = idx.min(0), idx.max(0)
        return self.affine[:3, :3] @ ((lo + hi) / 2.0) + self.affine[:3, 3]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a corrupt template is named, whatever the reader says
        raise MrivqError(f"template {path} cannot be read ({type(e).__name__}: {e}); "
                         "set data.template to icbm152 or a readable T1 NIfTI") from None


@functools.lru_cache(maxsize=4)
def load_template(spec: str = DEFAULT_TEMPLATE) -> Template:
    """``"icbm152"`` (shipped: real brains), ``"phantom"`` (the procedural phantom's own template, for
    phantom datasets) or a path to a T1 NIfTI. A path's brain mask is ``NAME_brain.nii.gz``
    beside it when present, else the template's own non-zero voxels (a skull-stripped template)."""
    if spec == "phantom":
        from mrivq.datasets.phantom import phantom_template

        t = phantom_template()
        hi = float(np.percentile(t["t1"], 99.5))
        return Template("phantom", np.clip(t["t1"] / hi, 0, 1).astype(np.float32), t["brain"].astype(np.float32),
                        t["affine"])
    if spec == DEFAULT_TEMPLATE:
        base = importlib.resources.files("mrivq.data") / "templates"
        paths = {k: Path(str(base / v)) for k, v in _ICBM.items()}
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            raise MrivqError(f"template file {missing[0]} is missing from the installed package; "
                             "reinstall mrivq (pip install --force-reinstall mrivq)")
        t1, aff = _read(paths["t1"])
        brain, _ = _read(paths["brain"])
        tissues = {k: _read(paths[k])[0] / 255.0 for k in ("gm", "wm")}
        return Template(DEFAULT_TEMPLATE, t1 / 255.0, brain / 255.0, aff, tissues)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MrivqError(f"template {path} does not exist; set data.template to icbm152 or the path of a "
                         "T1 NIfTI")
    t1, aff = _read(path)
    if t1.ndim != 3:
        raise MrivqError(f"template {path} is not a 3D volume ({t1.ndim}D); give a 3D T1 NIfTI")
    hi = float(np.percentile(t1, 99.5)) or 1.0
    t1 = np.clip(t1 / hi, 0.0, 1.0)
    stem = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
    mask_path = path.with_name(f"{stem}_brain{path.name[len(stem):]}")
    if mask_path.is_file():
        brain, _ = _read(mask_path)
        brain = brain / (brain.max() or 1.0)
    else:
        brain = (t1 > 0.05).astype(np.float32)
    if not (brain > 0.5).any():
        raise MrivqError(f"template {path} has an empty brain mask; give a skull-stripped T1 or {mask_path.name}")
    return Template(str(path), t1.astype(np.float32), brain.astype(np.float32), aff)


def template_grid(template: Template, spacing: list[float] | None, shape: list[int] | None,
                  divisible_by: int = 1) -> tuple[np.ndarray, list[int]]:
    """The model's grid in template space: RAS axes at ``spacing`` mm, ``shape`` voxels (default: the
    template's extent, rounded up to ``divisible_by``), centred on the template's brain."""
    sp = np.asarray(spacing if spacing is not None else np.sqrt((template.affine[:3, :3] ** 2).sum(0)),
                    dtype=np.float64)
    if shape is None:
        extent = np.asarray(template.t1.shape) * np.sqrt((template.affine[:3, :3] ** 2).sum(0))
        k = max(1, int(divisible_by))
        shape = [int(math.ceil(e / s / k) * k) for e, s in zip(extent, sp, strict=True)]
    shape = [int(s) for s in shape]
    aff = np.diag([*sp, 1.0])
    aff[:3, 3] = template.brain_centre - sp * (np.asarray(shape) - 1) / 2.0
    return aff, shape


def resolve_template(spec: str, source: str | Path | None = None) -> str:
    """``auto`` -> ``phantom`` for a scan of a phantom dataset (a ``phantom.json`` written by mrivq in one
    of its three nearest folders), else ``icbm152``; any other value unchanged."""
    if spec != "auto":
        return spec
    if source:
        p = Path(str(source)).expanduser()
        for folder in list(p.parents)[:3]:
            meta = folder / "phantom.json"
            if meta.is_file():
                try:
                    if json.loads(meta.read_text(encoding="utf-8")).get("generator") == "mrivq.phantom":
                        return "phantom"
                except (OSError, ValueError):
                    pass
    return DEFAULT_TEMPLATE


def grid_brain(template: str, grid_affine: np.ndarray, grid_shape: list[int] | tuple) -> np.ndarray:
    """The template's brain mask (bool) on a grid of template space (computed once per grid)."""
    return _grid_brain(template, tuple(np.round(np.asarray(grid_affine, dtype=np.float64), 6).ravel()),
                       tuple(int(s) for s in grid_shape))


@functools.lru_cache(maxsize=8)
def _grid_brain(template: str, grid_affine: tuple, grid_shape: tuple) -> np.ndarray:
    tpl = load_template(template)
    aff = np.asarray(grid_affine, dtype=np.float64).reshape(4, 4)
    return resample(tpl.brain, tpl.affine, aff, list(grid_shape)) > 0.5


@dataclass
class Registration:
    """An affine registration of one scan with the template, JSON-able (stored in caches and sidecars).

    ``matrix`` maps template world (mm, RAS) -> scan world; ``similarity`` is the absolute Pearson
    correlation with the template inside its brain after registration; ``brain_in_view`` the fraction
    of the template's brain that lies inside the scan's field of view; ``passed`` the quality check.
    """

    matrix: list
    template: str
    similarity: float
    brain_in_view: float
    volume_scale: float
    metric: float
    seconds: float
    passed: bool
    why: str = ""
    method: str = "affine"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Registration:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=np.float64)

    def registered_affine(self, affine: np.ndarray) -> np.ndarray:
        """The scan's voxel -> template world affine (its own ``affine`` carried into template space)."""
        return np.linalg.solve(self.array, np.asarray(affine, dtype=np.float64))


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - a dependency; named if a broken install lacks it
        raise MrivqError("registration needs SimpleITK; pip install SimpleITK") from None
    return sitk


def _to_sitk(arr: np.ndarray, affine: np.ndarray):
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr, dtype=np.float32).transpose(2, 1, 0)))
    lin = _LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    sp = np.sqrt((lin ** 2).sum(0))
    img.SetSpacing([float(s) for s in sp])
    img.SetDirection([float(v) for v in (lin / sp).ravel()])
    img.SetOrigin([float(v) for v in _LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]])
    return img


def _from_sitk(img) -> np.ndarray:
    sitk = _sitk()
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def _matrix_ras(tx) -> np.ndarray:
    """A SimpleITK affine-like transform (fixed LPS -> moving LPS) as a 4x4 RAS matrix."""
    m = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = t + c - m @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def head_mask(image: np.ndarray) -> np.ndarray:
    """The head: voxels above an Otsu threshold of the scan's intensities, the largest connected part,
    closed and with its holes filled (dark skull, sinuses and CSF inside the head stay in)."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    x = np.asarray(image, dtype=np.float32)
    finite = x[np.isfinite(x)]
    if finite.size == 0 or float(finite.max()) <= float(finite.min()):
        return np.zeros(x.shape, dtype=bool)
    hi = float(np.percentile(finite, 99.5))
    thr = 0.5 * threshold_otsu(np.clip(finite, None, hi))
    fg = x > thr
    lab, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum(fg, lab, index=np.arange(1, n + 1))
        fg = lab == (int(np.argmax(sizes)) + 1)
    fg = ndimage.binary_closing(fg, iterations=2)
    return ndimage.binary_fill_holes(fg)


def n4_correct(image: np.ndarray, affine: np.ndarray, *, resolution_mm: float = 4.0,
               iterations: tuple[int, ...] = (20, 20, 10), threads: int | None = None) -> np.ndarray:
    """N4 bias-field correction (Tustison et al. 2010): the field is fitted on the scan shrunk to about
    ``resolution_mm`` inside its head mask and divided out at full resolution. Returns float32."""
    sitk = _sitk()
    x = np.asarray(image, dtype=np.float32)
    lo = float(np.min(x))
    pos = x - lo + 1e-3 * (float(np.percentile(x, 99)) - lo + 1e-6)  # N4 works on positive intensities
    img = _to_sitk(pos, affine)
    mask = sitk.Cast(_to_sitk(head_mask(x).astype(np.float32), affine), sitk.sitkUInt8)
    sp = np.asarray(img.GetSpacing())
    shrink = [max(1, int(math.ceil(resolution_mm / s - 1e-6))) for s in sp]
    small = sitk.Shrink(img, shrink)
    small_mask = sitk.Shrink(mask, shrink)
    if not np.any(sitk.GetArrayViewFromImage(small_mask)):
        return x
    f = sitk.N4BiasFieldCorrectionImageFilter()
    f.SetMaximumNumberOfIterations(list(iterations))
    if threads:
        f.SetNumberOfThreads(int(threads))
    f.Execute(small, small_mask)
    log_field = f.GetLogBiasFieldAsImage(img)
    field_ = np.exp(_from_sitk(log_field)).astype(np.float32)
    return (pos / field_ + lo - 1e-3 * (float(np.percentile(x, 99)) - lo + 1e-6)).astype(np.float32)


def _stage(sitk, fixed, moving, fixed_mask, initial, shrink: list[int], sigmas: list[float], iterations: int,
           seed: int, threads: int | None):
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    # about 40 000 samples per level: every voxel at the coarse levels (a noisy metric there sends the
    # start astray), a fraction at the fine ones (more buys no accuracy, only time)
    n_mask = float(np.count_nonzero(sitk.GetArrayViewFromImage(fixed_mask)))
    r.SetMetricSamplingPercentagePerLevel([min(1.0, 40000.0 * f ** 3 / max(n_mask, 1.0)) for f in shrink], seed)
    r.SetMetricFixedMask(fixed_mask)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                               relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetShrinkFactorsPerLevel(shrink)
    r.SetSmoothingSigmasPerLevel(sigmas)
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    r.SetInitialTransform(initial, inPlace=False)
    if threads:
        r.SetNumberOfThreads(int(threads))
    out = r.Execute(fixed, moving)
    if hasattr(out, "GetNthTransform") and out.GetNumberOfTransforms() == 1:  # unwrap the composite
        out = out.GetNthTransform(0)
    return out, float(r.GetMetricValue())


def _levels(resolution_mm: float, template: Template) -> tuple[list[int], list[float]]:
    """Shrink factors from 8 mm down to the finest level the preset needs (never finer than the template)."""
    tsp = float(np.sqrt((template.affine[:3, :3] ** 2).sum(0)).min())
    finest = max(1, int(round(max(resolution_mm, tsp) / tsp)))
    shrink = []
    s = max(finest, int(round(8.0 / tsp)))
    while s >= finest:
        shrink.append(s)
        s //= 2
    if shrink[-1] != finest:
        shrink.append(finest)
    return shrink, [0.5 * f * tsp for f in shrink[:-1]] + [0.0]


def _initial_translation(moving_arr: np.ndarray, affine: np.ndarray, template: Template):
    """Where the brain is likely to be: the centroid of the head mask's top 150 mm slab (the neck and
    shoulders, when in view, would drag a whole-head centre of mass down), in LPS mm."""
    mask = head_mask(moving_arr)
    if not mask.any():
        raise MrivqError("the scan holds no head (no voxel above its background)")
    idx = np.argwhere(mask)
    world = idx @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    top = world[:, 2].max()
    slab = world[world[:, 2] >= top - 150.0]
    centre_ras = slab.mean(0)
    # the template's brain centre sits about this far below the top of the head (skull and scalp)
    brain_idx = np.argwhere(template.brain > 0.5)
    bw = brain_idx @ template.affine[:3, :3].T + template.affine[:3, 3]
    tcentre = bw.mean(0)
    centre_ras[2] = min(centre_ras[2], top - (bw[:, 2].max() - tcentre[2]) - 12.0)
    return _LPS @ centre_ras, _LPS @ tcentre


def register(image: np.ndarray, affine: np.ndarray, template: Template, *, method: str = "affine",
             resolution_mm: float = 2.0, threads: int | None = None, seed: int = 1) -> Registration:
    """Affine (or rigid) registration of a scan (x, y, z array with its RAS affine) with ``template``.

    A start that puts the scan's head, top slab, on the template's brain (a centre-of-mass start
    that the neck cannot pull down), then rigid (Euler angles), then affine (``method="affine"``),
    each from 8 mm down to ``resolution_mm`` (or the template's own 2 mm), Mattes mutual information
    inside the template's dilated brain, regular-step gradient descent scaled by physical shifts.
    Returns a :class:`Registration` with its quality check.
    """
    if method not in ("rigid", "affine"):
        raise MrivqError(f"data.register must be rigid, affine or null, not {method!r}")
    sitk = _sitk()
    from scipy import ndimage

    t0 = time.perf_counter()
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or min(x.shape) < 2:
        raise MrivqError(f"registration needs a 3D volume, not an array of shape {list(x.shape)}")
    fixed = _to_sitk(template.t1, template.affine)
    dil = ndimage.binary_dilation(template.brain > 0.5, iterations=4)
    fixed_mask = sitk.Cast(_to_sitk(dil.astype(np.float32), template.affine), sitk.sitkUInt8)
    hi = float(np.percentile(x, 99.5)) or 1.0
    moving = _to_sitk(np.clip(x / hi, 0, 1.5), affine)
    shrink, sigmas = _levels(resolution_mm, template)
    m_centre, f_centre = _initial_translation(x, affine, template)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter([float(v) for v in f_centre])
    rigid.SetTranslation([float(v) for v in (m_centre - f_centre)])
    rigid, metric = _stage(sitk, fixed, moving, fixed_mask, rigid, shrink, sigmas, 200, seed, threads)
    best = _checked(_matrix_ras(rigid), x, affine, template, metric, 0.0, "rigid")
    if method == "affine":
        aff = sitk.AffineTransform(3)
        aff.SetCenter(rigid.GetCenter())
        aff.SetMatrix(rigid.GetMatrix())
        aff.SetTranslation(rigid.GetTranslation())
        final, metric = _stage(sitk, fixed, moving, fixed_mask, aff, shrink[-2:] if len(shrink) > 1 else shrink,
                               sigmas[-2:] if len(sigmas) > 1 else sigmas, 150, seed, threads)
        cand = _checked(_matrix_ras(final), x, affine, template, metric, 0.0, "affine")
        # the affine stage has 6 more degrees of freedom to go astray on a coarse or unusual scan: keep it
        # only when it is within the checks and matches the template at least as well as the rigid one
        sane = 1 / MAX_VOLUME_SCALE <= cand.volume_scale <= MAX_VOLUME_SCALE
        if (cand.passed or not best.passed) and sane and cand.similarity >= best.similarity - 0.01:
            best = cand
    with _COUNT_LOCK:
        REGISTRATIONS["count"] += 1
    best.seconds = round(time.perf_counter() - t0, 3)
    return best


#: the registration cache's format: a change that alters results bumps it (old entries are then ignored)
CACHE_VERSION = 1


def registration_cache(source: str | Path | None) -> Path | None:
    """Where a dataset's registrations are kept: ``DATASET/.mrivq/registrations`` for a scan inside a
    fetched dataset (a ``manifest.csv`` in one of its three nearest folders), else None (not cached)."""
    if not source:
        return None
    for folder in list(Path(str(source)).expanduser().resolve().parents)[:3]:
        if (folder / "manifest.csv").is_file():
            return folder / ".mrivq" / "registrations"
    return None


def cached_register(image: np.ndarray, affine: np.ndarray, template: Template, *, method: str,
                    resolution_mm: float, source: str | Path | None = None) -> Registration:
    """:func:`register`, kept per scan in :func:`registration_cache` (keyed by the file's path, size and
    modification time, the template, the method and the resolution): a dataset's scans are registered
    once, and training, ``eval``, ``--stage prior`` and ``mrivq preprocess --dataset`` reuse them."""
    import hashlib

    folder = registration_cache(source)
    path = None
    if folder is not None:
        src = Path(str(source)).expanduser().resolve()
        try:
            st = src.stat()
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        if stamp is not None:
            key = json.dumps([CACHE_VERSION, str(src), stamp, template.name, method, float(resolution_mm),
                              list(np.asarray(affine, dtype=np.float64).round(6).ravel()), list(image.shape)])
            path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
            if path.is_file():
                try:
                    return Registration.from_dict(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError, TypeError):
                    pass  # a damaged entry: register again and replace it
    reg = register(image, affine, template, method=method, resolution_mm=resolution_mm)
    if path is not None:
        from mrivq.utils.atomic import atomic_write_text

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(reg.to_dict()))
        except OSError:
            pass  # a read-only dataset folder: the registration is used, not kept
    return reg


def _checked(matrix: np.ndarray, x: np.ndarray, affine: np.ndarray, template: Template, metric: float,
             seconds: float, method: str) -> Registration:
    from scipy import ndimage

    brain = np.zeros(template.brain.shape, bool)  # every other voxel of the brain: plenty for a correlation
    brain[::2, ::2, ::2] = template.brain[::2, ::2, ::2] > 0.5
    idx = np.argwhere(brain)
    world = idx @ template.affine[:3, :3].T + template.affine[:3, 3]
    native = world @ matrix[:3, :3].T + matrix[:3, 3]
    vox = np.linalg.solve(np.asarray(affine, dtype=np.float64), np.c_[native, np.ones(len(native))].T)[:3]
    inside = np.all((vox > -0.5) & (vox < np.asarray(x.shape)[:, None] - 0.5), axis=0)
    in_view = float(inside.mean()) if len(inside) else 0.0
    sample = ndimage.map_coordinates(x, vox, order=1, mode="constant", cval=0.0)
    ref = template.t1[brain]
    sim = 0.0
    if sample.std() > 0 and ref.std() > 0:
        sim = abs(float(np.corrcoef(sample, ref)[0, 1]))
    scale = float(abs(np.linalg.det(matrix[:3, :3])))
    why = []
    if not math.isfinite(sim) or sim < MIN_SIMILARITY:
        why.append(f"similarity {sim:.2f} < {MIN_SIMILARITY}")
    if not 1 / MAX_VOLUME_SCALE <= scale <= MAX_VOLUME_SCALE:
        why.append(f"volume scale {scale:.2f} outside [{1 / MAX_VOLUME_SCALE:.2f}, {MAX_VOLUME_SCALE}]")
    if in_view < MIN_BRAIN_IN_VIEW:
        why.append(f"{100 * (1 - in_view):.1f}% of the brain outside the field of view")
    return Registration(matrix=matrix.tolist(), template=template.name, similarity=round(sim, 4),
                        brain_in_view=round(in_view, 4), volume_scale=round(scale, 4), metric=round(metric, 5),
                        seconds=round(seconds, 3), passed=not why, why="; ".join(why), method=method)


def resample(x: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: list[int], *,
             nearest: bool = False, channels_first: bool = False) -> np.ndarray:
    """Resample ``x`` (its voxels at ``src_affine``) onto ``dst_shape`` voxels at ``dst_affine``: linear
    (or nearest) interpolation, zero outside. One map through the affines, no intermediate grid."""
    from scipy import ndimage

    m = np.linalg.solve(np.asarray(src_affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64))
    arr = np.asarray(x)
    chans = arr if channels_first else arr[None]
    out = np.stack([ndimage.affine_transform(c.astype(np.float32) if not nearest else c, m[:3, :3], m[:3, 3],
                                             output_shape=tuple(int(s) for s in dst_shape), order=0 if nearest else 1,
                                             mode="constant", cval=0.0) for c in chans])
    return out if channels_first else out[0]


def to_template(x: np.ndarray, affine: np.ndarray, reg: Registration, grid_affine: np.ndarray,
                grid_shape: list[int], *, nearest: bool = False, channels_first: bool = False) -> np.ndarray:
    """A scan's array (or label map, ``nearest``) -> the template grid through ``reg``."""
    return resample(x, reg.registered_affine(affine), grid_affine, grid_shape, nearest=nearest,
                    channels_first=channels_first)


def to_native(y: np.ndarray, grid_affine: np.ndarray, reg: Registration, affine: np.ndarray,
              shape: list[int], *, nearest: bool = False, channels_first: bool = False) -> np.ndarray:
    """The inverse of :func:`to_template`: an array on the template grid -> the scan's own grid."""
    return resample(y, grid_affine, reg.registered_affine(affine), shape, nearest=nearest,
                    channels_first=channels_first)
