"""Built-in procedural head phantom: the embedded default dataset (quick start, tests, benchmarks).

Each subject is a labelled head drawn from ``numpy.random.default_rng([seed, index])``: scalp (with
a subcutaneous fat layer and a neck), skull (with diploic marrow), CSF, a gyrified cortex, white
matter, deep grey nuclei, two lateral ventricles, a cerebellum with folia and a brainstem. The
anatomy is defined in millimetres in a RAS world frame centred on the volume, so the same subject
sampled at another ``spacing`` is the same head at another resolution. T1, T2 and PD images are
synthesised from the label map with tissue values in the usual order, a little partial-volume blur,
a smooth multiplicative bias field and Rician noise; intensities are roughly in ``[0, 1]``.

Everything is numpy (plus ``scipy.ndimage`` for the blur): a 64^3 subject takes a fraction of a
second. Same ``(seed, index, shape, spacing)`` gives byte-identical arrays, and a modality's image
does not depend on which other modalities were asked for.

Label values (``LABELS``): 0 background, 1 scalp (extracranial soft tissue), 2 skull, 3 CSF,
4 grey matter (cortex and deep nuclei), 5 white matter (and brainstem), 6 ventricles (the two
lateral ones, plus a thin third and a small fourth).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mrivq.datasets.lesions import MASK_VALUE, insert_lesion, lesion_kind_for
from mrivq.utils.errors import MrivqError

if TYPE_CHECKING:
    from mrivq.utils.progress import Progress

__all__ = ["LABELS", "MODALITIES", "generate_subject", "subject_covariates", "subject_id", "write_dataset"]

MODALITIES = ("t1", "t2", "pd")
LABELS = {0: "background", 1: "scalp", 2: "skull", 3: "csf", 4: "grey_matter", 5: "white_matter",
          6: "ventricles"}
FORMAT_VERSION = 1

# Separate, fixed random streams per modality: a modality's noise/bias never depends on which other
# modalities were requested.
_MOD_STREAM = {"t1": 101, "t2": 102, "pd": 103}

# Tissue signal per modality (arbitrary units ~[0, 1], 3T-like ordering).
#   T1: WM > GM > CSF, fat bright, bone dark.  T2: CSF > GM > WM.  PD: CSF > GM > WM, small spread.
_TISSUE = {
    #            fat   muscle  bone  marrow  csf   gm    wm    deep-gm
    "t1": dict(fat=0.92, muscle=0.38, bone=0.05, marrow=0.55, csf=0.12, gm=0.47, wm=0.72, deep=0.55),
    "t2": dict(fat=0.60, muscle=0.20, bone=0.04, marrow=0.36, csf=1.00, gm=0.62, wm=0.42, deep=0.55),
    "pd": dict(fat=0.84, muscle=0.58, bone=0.06, marrow=0.50, csf=0.96, gm=0.80, wm=0.67, deep=0.76),
}


@dataclass(frozen=True)
class _Anatomy:
    """One subject's shape parameters (all lengths in mm)."""

    sex: str
    age: float
    scale: tuple[float, float, float]  # per-axis size factor of the nominal head (x, y, z)
    rotation: tuple[tuple[float, ...], ...]  # 3x3, head frame -> world
    centre: tuple[float, float, float]  # brain centre in world mm
    scalp: float  # thicknesses
    skull: float
    csf: float
    cortex: float
    fold_depth: float  # sulcal depth
    sulcus_width: float  # half-width of a sulcus' CSF at the surface
    fold_k: tuple[tuple[float, float, float], ...]  # wave vectors (rad/mm) of the folding pattern
    fold_phase: tuple[float, ...]
    depth_k: tuple[tuple[float, float, float], ...]  # slower pattern: deep and shallow sulci
    depth_phase: tuple[float, ...]
    ventricles: float  # ventricle size factor
    folia_phase: float
    texture_k: tuple[tuple[float, float, float], ...]  # shared tissue texture (separable waves)
    texture_phase: tuple[tuple[float, float, float], ...]


# --------------------------------------------------------------------------------------------------
# Validation and small public helpers


def subject_id(index: int, cohort: int = 0) -> str:
    """Folder/file stem of subject ``index``: ``sub-0000``, ``sub-0001``, ...; lesion phantoms
    (:data:`LESION_COHORT`) ``sub-les0000``, ..., so their ids never meet a healthy phantom's."""
    return f"sub-{int(index):04d}" if cohort == 0 else f"sub-les{int(index):04d}"


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise MrivqError(f"phantom {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_shape(shape: Any) -> tuple[int, int, int]:
    try:
        items = tuple(shape)
    except TypeError:
        items = ()
    ok = len(items) == 3 and all(
        not isinstance(v, bool) and isinstance(v, numbers.Integral) and int(v) >= 16 for v in items)
    if not ok:
        raise MrivqError(f"phantom shape must be 3 integers >= 16 (a 3D volume, e.g. 64,64,64), got {shape!r}")
    return tuple(int(v) for v in items)  # type: ignore[return-value]


def _check_spacing(spacing: Any) -> float:
    try:
        value = float(spacing)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(spacing, bool) or not math.isfinite(value) or value <= 0:
        raise MrivqError(f"phantom spacing must be a positive number of millimetres, got {spacing!r}")
    return value


def _check_modalities(modalities: Any) -> tuple[str, ...]:
    if isinstance(modalities, str):
        modalities = (modalities,)
    mods = tuple(str(m).lower() for m in modalities)
    bad = [m for m in mods if m not in MODALITIES]
    if not mods or bad or len(set(mods)) != len(mods):
        raise MrivqError(f"phantom modalities must be distinct values from {', '.join(MODALITIES)}, "
                         f"got {tuple(modalities)!r}")
    return mods


def _affine(shape: Sequence[int], spacing: float) -> np.ndarray:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * spacing for n in shape]
    return aff


# --------------------------------------------------------------------------------------------------
# Per-subject parameters


#: the random stream of lesion phantoms' healthy anatomy: a cohort of its own, so that no lesion subject
#: is, outside its lesion, a healthy phantom subject of any seed (a model trained on the healthy phantom
#: would otherwise be tested on its own training subjects)
LESION_COHORT = 1


def _entropy(seed: int, index: int, cohort: int, *stream: int) -> list[int]:
    """The seed sequence of one subject's draws: cohort 0 keeps the healthy phantom's ``[seed, index, ...]``."""
    return [seed, index, *stream] if cohort == 0 else [seed, index, *stream, 0, cohort]


def _draw_anatomy(seed: int, index: int, cohort: int = 0) -> _Anatomy:
    rng = np.random.default_rng(_entropy(seed, index, cohort))
    # Always the same draws in the same order: the anatomy never depends on shape or spacing.
    sex = "F" if rng.random() < 0.5 else "M"
    age = round(float(rng.uniform(20.0, 85.0)), 1)
    size = float(np.clip(rng.normal(1.0, 0.025), 0.95, 1.05)) * (1.02 if sex == "M" else 0.98)
    scale = tuple(float(size * s) for s in rng.uniform(0.97, 1.03, 3))
    yaw, pitch, roll = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * np.array([6.0, 8.0, 5.0]))
    cz, sz = math.cos(yaw), math.sin(yaw)
    cx, sx = math.cos(pitch), math.sin(pitch)
    cy, sy = math.cos(roll), math.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot = rz @ rx @ ry
    centre = np.array([0.0, -2.0, -2.0]) + rng.uniform(-3.0, 3.0, 3)
    atrophy = (age - 20.0) / 65.0  # 0 at 20 y, 1 at 85 y
    scalp = float(rng.uniform(4.5, 6.5))
    skull = float(rng.uniform(5.0, 7.0))
    csf = float(rng.uniform(1.8, 2.8) + 1.2 * atrophy)
    cortex = float(rng.uniform(3.4, 4.2) - 0.5 * atrophy)
    fold_depth = float(rng.uniform(9.0, 14.0))
    sulcus_width = float(rng.uniform(1.3, 1.8) + 0.6 * atrophy)

    def waves(n: int, wavelength: float) -> tuple[np.ndarray, np.ndarray]:
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return dirs * (2 * math.pi / wavelength), rng.uniform(0, 2 * math.pi, n)

    fold_k, fold_phase = waves(20, float(rng.uniform(19.0, 24.0)))
    depth_k, depth_phase = waves(6, 80.0)
    ventricles = float(rng.uniform(0.85, 1.15) * (1.0 + 0.6 * atrophy))
    folia_phase = float(rng.uniform(0, 2 * math.pi))
    n_tex = 6
    texture_k = 2 * math.pi / rng.uniform(12.0, 40.0, (n_tex, 3))
    texture_phase = rng.uniform(0, 2 * math.pi, (n_tex, 3))
    return _Anatomy(
        sex=sex, age=age, scale=scale, rotation=tuple(map(tuple, rot.tolist())),
        centre=tuple(centre.tolist()), scalp=scalp, skull=skull, csf=csf, cortex=cortex,
        fold_depth=fold_depth, sulcus_width=sulcus_width, fold_k=tuple(map(tuple, fold_k.tolist())),
        fold_phase=tuple(fold_phase.tolist()), depth_k=tuple(map(tuple, depth_k.tolist())),
        depth_phase=tuple(depth_phase.tolist()), ventricles=ventricles, folia_phase=folia_phase,
        texture_k=tuple(map(tuple, texture_k.tolist())),
        texture_phase=tuple(map(tuple, texture_phase.tolist())),
    )


def subject_covariates(index: int, *, seed: int = 0, cohort: int = 0) -> dict[str, Any]:
    """Deterministic ``{"sex": "F"|"M", "age": years}`` of a phantom subject (they shape its anatomy:
    male heads are slightly larger; older subjects have larger ventricles, more CSF, thinner cortex)."""
    a = _draw_anatomy(_check_int("seed", seed, 0), _check_int("index", index, 0), cohort)
    return {"sex": a.sex, "age": a.age}


# --------------------------------------------------------------------------------------------------
# Geometry: signed depths (mm, positive inside) of the head's parts, then a label map


# Nominal cerebrum (mm, head frame x=R, y=A, z=S, origin at the brain centre).
_CEREBRUM = dict(a=60.0, b_ant=72.0, b_post=76.0, c_sup=56.0, c_inf=34.0)
_CEREBELLUM = dict(centre=(0.0, -45.0, -34.0), axes=(47.0, 28.0, 21.0))
# Brainstem and cord: (x, y, z, radius) centre line, plus the pons as an ellipsoid.
_BRAINSTEM = dict(line=((0.0, -8.0, -4.0, 10.0), (0.0, -13.0, -30.0, 10.5), (0.0, -19.0, -52.0, 7.5),
                        (0.0, -22.0, -75.0, 5.5), (0.0, -24.0, -140.0, 5.5)),
                  pons=(0.0, -10.0, -30.0), pons_axes=(13.0, 11.0, 12.0))
_NECK = dict(centre=(0.0, -20.0), axes=(44.0, 42.0), top=-28.0)
_FACE = dict(centre=(0.0, 34.0, -46.0), axes=(42.0, 46.0, 36.0), nose=(0.0, 76.0, -42.0), nose_axes=(7.0, 10.0, 15.0))

# Lateral ventricle centre line for the right side (x > 0): (x, y, z, radius), mirrored for left.
_VENTRICLE = (
    (9.0, 37.0, -3.0, 2.5), (7.5, 29.0, 0.0, 4.5), (7.5, 16.0, 3.0, 4.0), (9.5, 2.0, 4.0, 4.0),
    (13.0, -10.0, 3.0, 4.5), (17.0, -19.0, -1.0, 6.0), (16.0, -32.0, -2.0, 3.0), (14.0, -41.0, -2.0, 1.2),
)
_TEMPORAL_HORN = ((16.0, -19.0, -1.0, 5.0), (23.0, -13.0, -12.0, 3.5), (27.0, -2.0, -19.0, 2.8),
                  (28.0, 9.0, -21.0, 1.5))
_THIRD_VENTRICLE = ((0.0, -11.0), (13.0, 7.0))  # midline slit: (y, z) centre, (y, z) semi-axes
_FOURTH_VENTRICLE = ((0.0, -25.0, -31.0), (5.0, 3.5, 7.0))
# Deep grey nuclei, right side: centre (x, y, z) and semi-axes.
_NUCLEI = (
    ((11.0, 24.0, 2.0), (5.5, 9.0, 7.0)),  # caudate head
    ((9.5, -5.0, -5.0), (8.0, 12.0, 8.0)),  # thalamus
    ((22.0, 9.0, -4.0), (5.5, 15.0, 9.0)),  # lentiform nucleus
)


def _ellipsoid_depth(x, y, z, a, b, c):
    """Approximate signed distance (mm, >0 inside) to an ellipsoid with per-point semi-axes."""
    u, v, w = x / a, y / b, z / c
    rho = np.sqrt(u * u + v * v + w * w)
    gx, gy, gz = u / a, v / b, w / c
    grad = np.sqrt(gx * gx + gy * gy + gz * gz) / np.maximum(rho, 1e-6)
    return (1.0 - rho) / np.maximum(grad, 1e-6), rho


def _capsule_chain_depth(px, py, pz, points) -> np.ndarray:
    """Depth (mm, >0 inside) in a chain of cone-capsules through ``points`` = (x, y, z, r) rows."""
    best = np.full(px.shape, -1e9, dtype=np.float32)
    for (ax, ay, az, ar), (bx, by, bz, br) in zip(points[:-1], points[1:], strict=True):
        dx, dy, dz = bx - ax, by - ay, bz - az
        t = ((px - ax) * dx + (py - ay) * dy + (pz - az) * dz) / (dx * dx + dy * dy + dz * dz)
        t = np.clip(t, 0.0, 1.0)
        ex, ey, ez = px - (ax + t * dx), py - (ay + t * dy), pz - (az + t * dz)
        depth = (ar + t * (br - ar)) - np.sqrt(ex * ex + ey * ey + ez * ez)
        np.maximum(best, depth, out=best)
    return best


def _fold_field(anat: _Anatomy, sx, sy, sz, nx, ny, nz):
    """Cortical folding at surface points ``s`` (mm) with unit normals ``n``.

    Sulci are the zero lines of a random field (a sum of plane waves of one wavelength in random
    directions: a labyrinth). Returns the distance (mm, along the surface) to the nearest sulcus,
    ``|N| / |tangential grad N|``, and a depth factor in [0.45, 1] from a slower field.
    """
    f32 = np.float32
    val = np.zeros(sx.shape, dtype=f32)
    gx, gy, gz = np.zeros_like(val), np.zeros_like(val), np.zeros_like(val)
    for (kx, ky, kz), ph in zip(anat.fold_k, anat.fold_phase, strict=True):
        arg = sx * f32(kx) + sy * f32(ky) + sz * f32(kz) + f32(ph)
        val += np.cos(arg)
        sn = np.sin(arg)
        gx -= sn * f32(kx)
        gy -= sn * f32(ky)
        gz -= sn * f32(kz)
    gn = gx * nx + gy * ny + gz * nz
    gt2 = gx * gx + gy * gy + gz * gz - gn * gn
    k2 = sum(kx * kx + ky * ky + kz * kz for kx, ky, kz in anat.fold_k)
    dist = np.abs(val) / np.sqrt(np.maximum(gt2, f32(1e-3 * k2)))
    slow = np.zeros_like(val)
    for (kx, ky, kz), ph in zip(anat.depth_k, anat.depth_phase, strict=True):
        slow += np.cos(sx * f32(kx) + sy * f32(ky) + sz * f32(kz) + f32(ph))
    depth = f32(0.725) + f32(0.275) * np.tanh(slow * f32(1.5 / math.sqrt(len(anat.depth_k) / 2.0)))
    return dist, depth


def _grid(shape, spacing):
    return [((np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * spacing) for n in shape]


def _head_coords(anat: _Anatomy, shape, spacing):
    """Nominal head-frame coordinates (mm) of every voxel, float32 arrays of ``shape``."""
    gx, gy, gz = _grid(shape, spacing)
    wx = (gx - anat.centre[0])[:, None, None]
    wy = (gy - anat.centre[1])[None, :, None]
    wz = (gz - anat.centre[2])[None, None, :]
    r = np.asarray(anat.rotation)
    out = []
    for i in range(3):  # head = R^T (world - centre), then undo the subject's size
        col = r[:, i] / anat.scale[i]
        out.append((wx * col[0] + wy * col[1] + wz * col[2]).astype(np.float32))
    return out


def _labels(anat: _Anatomy, shape, spacing):
    """Label map, fat fraction of scalp voxels, marrow fraction of skull voxels, deep-GM mask."""
    x, y, z = _head_coords(anat, shape, spacing)
    mm = float(np.mean(anat.scale))  # nominal -> real mm for depths
    f32 = np.float32

    # Cerebrum: an egg (narrower in front, flat underneath) with the cerebellum carved out.
    c = _CEREBRUM
    b = np.where(y > 0, f32(c["b_ant"]), f32(c["b_post"]))
    a = f32(c["a"]) * (f32(1.0) - f32(0.06) * y / b)
    # Underneath, the temporal lobes hang lower than the midline where the brainstem leaves.
    notch = f32(1.0) - f32(0.3) * np.exp(-(x / f32(20.0)) ** 2 - ((y - f32(2.0)) / f32(28.0)) ** 2)
    cz = np.where(z > 0, f32(c["c_sup"]), f32(c["c_inf"]) * notch)
    d_cer, rho_cer = _ellipsoid_depth(x, y, z, a, b, cz)

    cb = _CEREBELLUM
    ccx, ccy, ccz = cb["centre"]
    d_cb, rho_cb = _ellipsoid_depth(x - f32(ccx), y - f32(ccy), z - f32(ccz), *map(f32, cb["axes"]))

    bs = _BRAINSTEM
    d_bs = _capsule_chain_depth(x, y, z, bs["line"])
    px, py, pz = bs["pons"]
    d_pons, _ = _ellipsoid_depth(x - f32(px), y - f32(py), z - f32(pz), *map(f32, bs["pons_axes"]))
    d_bs = np.maximum(d_bs, d_pons)

    # Fissures that cut into the cerebrum: interhemispheric (above the corpus callosum and in front
    # of / behind it all the way down), and the two Sylvian fissures down to the insula. Keep each
    # surface's depth: the cortex is folded along the surface a voxel is closest to.
    ax_ = np.abs(x)
    callosal = (((y - f32(10.0)) / f32(33.0)) ** 2 + ((z + f32(8.0)) / f32(19.0)) ** 2 < 1.0) | (
        (np.abs(y - f32(10.0)) < 33.0) & (z < -8.0))
    d_mid = np.where(callosal, f32(1e3), ax_ - f32(0.6))
    z_syl = f32(-9.0) - f32(0.28) * (y - f32(10.0))
    syl_wall = np.abs(z - z_syl) - f32(1.0)
    syl_floor = f32(37.0) - ax_
    d_syl = np.maximum(np.maximum(syl_wall, syl_floor), np.maximum(y - f32(22.0), f32(-22.0) - y))
    d_tent = -(d_cb + f32(2.5))  # tentorium: CSF/dura between cerebrum and cerebellum
    surfaces = np.stack([d_cer, d_tent, d_mid, d_syl])
    nearest = np.argmin(surfaces, axis=0).astype(np.uint8)
    d_cer = np.min(surfaces, axis=0)
    del surfaces

    depth = np.maximum(np.maximum(d_cer, d_cb), d_bs) * f32(mm)  # whole brain, real mm

    labels = np.zeros(shape, dtype=np.uint8)
    # Envelope layers outward from the brain surface; the neck is extracranial soft tissue.
    skin_depth = depth + f32(anat.csf + anat.skull + anat.scalp)
    n = _NECK
    na_, nb_ = n["axes"]
    u, v = x / f32(na_), (y - f32(n["centre"][1])) / f32(nb_)
    rn = np.sqrt(u * u + v * v)
    neck_depth = np.where(z < n["top"], (f32(1.0) - rn) * f32(min(na_, nb_) * mm), f32(-1e3))
    fcx, fcy, fcz = _FACE["centre"]
    face_depth, _ = _ellipsoid_depth(x - f32(fcx), y - f32(fcy), z - f32(fcz), *map(f32, _FACE["axes"]))
    ncx, ncy, ncz = _FACE["nose"]
    nose_depth, _ = _ellipsoid_depth(x - f32(ncx), y - f32(ncy), z - f32(ncz), *map(f32, _FACE["nose_axes"]))
    face_depth = np.maximum(face_depth, nose_depth) * f32(mm)
    # Smoothly round the neck and face into the head (blend where two are close).
    for part in (neck_depth, face_depth):
        skin_depth = np.maximum(np.maximum(skin_depth, part), (skin_depth + part) * f32(0.5) + f32(5.0))
    labels[skin_depth > 0] = 1
    skull_in = depth > -f32(anat.csf)
    skull_out = depth > -f32(anat.csf + anat.skull)
    labels[skull_out] = 2
    labels[skull_in] = 3

    # Brain: each voxel belongs to the part it is deepest in.
    in_cer = (d_cer > 0) & (d_cer >= d_cb) & (d_cer >= d_bs)
    in_cb = (d_cb > 0) & (d_cb > d_cer) & (d_cb >= d_bs)
    in_bs = (d_bs > 0) & (d_bs > d_cer) & (d_bs > d_cb)

    # Cortex: a folding pattern evaluated at the point of the nearest surface (so sulci run
    # perpendicular to it). Sulci (CSF) are narrow and gyri broad; the GM/WM boundary follows the
    # same pattern with wider troughs so grey matter lines the sulcal walls.
    idx = np.flatnonzero(in_cer & (d_cer * mm < anat.fold_depth + anat.cortex + 1.0))
    delta = d_cer.ravel()[idx] * f32(mm)
    which = nearest.ravel()[idx]
    px, py, pz = x.ravel()[idx], y.ravel()[idx], z.ravel()[idx]
    rr = np.maximum(rho_cer.ravel()[idx], f32(1e-3))
    rc = np.maximum(rho_cb.ravel()[idx], f32(1e-3))
    on_floor = syl_floor.ravel()[idx] >= syl_wall.ravel()[idx]
    sx = np.select([which == 0, which == 1, which == 2, on_floor],
                   [px / rr, (px - f32(ccx)) / rc + f32(ccx), f32(0.0), np.sign(px) * f32(37.0)], px)
    sy = np.select([which == 0, which == 1], [py / rr, (py - f32(ccy)) / rc + f32(ccy)], py)
    sz = np.select([which == 0, which == 1, (which == 3) & ~on_floor],
                   [pz / rr, (pz - f32(ccz)) / rc + f32(ccz), z_syl.ravel()[idx]], pz)
    # Unit normals of the nearest surface at those points.
    ea, eb, ec = a.ravel()[idx], b.ravel()[idx], cz.ravel()[idx]
    cba, cbb, cbc = cb["axes"]
    one, zero = f32(1.0), f32(0.0)
    wall = (which == 3) & ~on_floor
    nx = np.select([which == 0, which == 1, wall], [sx / (ea * ea), (sx - f32(ccx)) / f32(cba ** 2), zero],
                   one)
    ny = np.select([which == 0, which == 1, wall], [sy / (eb * eb), (sy - f32(ccy)) / f32(cbb ** 2),
                                                   f32(0.28)], zero)
    nz = np.select([which == 0, which == 1, wall], [sz / (ec * ec), (sz - f32(ccz)) / f32(cbc ** 2), one],
                   zero)
    nn = np.sqrt(nx * nx + ny * ny + nz * nz) + f32(1e-12)
    dist, dfac = _fold_field(anat, sx.astype(f32), sy.astype(f32), sz.astype(f32), nx / nn, ny / nn, nz / nn)
    dist *= f32(mm)
    sulc = f32(anat.fold_depth) * dfac
    w, t = f32(anat.sulcus_width), f32(anat.cortex)
    pial = sulc * np.clip(one - (dist / w) ** 2, 0.0, 1.0)  # CSF slit of the sulcus
    white = t + sulc * np.clip(one - (np.maximum(dist - t, zero) / w) ** 2, 0.0, 1.0)
    lab = np.where(delta < pial, 3, np.where(delta < white, 4, 5)).astype(np.uint8)
    labels[in_cer] = 5
    labels.ravel()[idx] = lab

    # Cerebellum: transverse folia (fissures radiating in the sagittal plane), a GM cortex and a
    # branching WM core (arbor vitae).
    idx = np.flatnonzero(in_cb)
    cx_, cy_, cz_ = (x.ravel()[idx], y.ravel()[idx] - f32(ccy), z.ravel()[idx] - f32(ccz))
    theta = np.arctan2(cz_, cy_)
    folia = np.cos(theta * f32(18.0) + f32(anat.folia_phase) + f32(0.08) * np.abs(cx_))
    dcb = d_cb.ravel()[idx] * f32(mm)
    rcb = rho_cb.ravel()[idx]
    core = (rcb < 0.42 + 0.06 * (np.abs(cx_) > 8)) | ((rcb < 0.72) & (folia < -0.55))
    fissure = f32(3.0) + f32(5.0) * (np.cos(theta * f32(4.5) + f32(2 * anat.folia_phase)) > 0.6)
    lab = np.where((folia > 0.6) & (dcb < fissure), 3, np.where(core, 5, 4)).astype(np.uint8)
    labels.ravel()[idx] = lab
    labels[in_bs] = 5

    # Deep grey nuclei and the lateral ventricles, evaluated in a box around them only.
    deep = np.flatnonzero((in_cer | in_bs | in_cb) & (ax_ < 40) & (y > -50) & (y < 45) & (z > -45)
                          & (z < 20))
    px, py, pz = x.ravel()[deep], y.ravel()[deep], z.ravel()[deep]
    apx = np.abs(px)
    nuc = np.zeros(deep.shape, dtype=bool)
    for (ncx, ncy, ncz), (na, nb, nc) in _NUCLEI:
        nuc |= ((apx - ncx) / na) ** 2 + ((py - ncy) / nb) ** 2 + ((pz - ncz) / nc) ** 2 < 1.0
    vs = anat.ventricles
    spread = 1.0 + 0.3 * (vs - 1.0)  # larger ventricles also sit further from the midline
    chain = tuple((vx * spread, vy, vz, vr * vs) for vx, vy, vz, vr in _VENTRICLE)
    horn = tuple((vx * spread, vy, vz, vr * vs ** 0.5) for vx, vy, vz, vr in _TEMPORAL_HORN)
    d_v = np.maximum(_capsule_chain_depth(apx, py, pz, chain), _capsule_chain_depth(apx, py, pz, horn))
    # Septum pellucidum between the two (kept at least about a voxel wide so sampling never drops it).
    vent = (d_v > 0) & (apx > max(1.5, 0.6 * spacing / mm))
    (tcy, tcz), (tb, tc) = _THIRD_VENTRICLE
    vent |= (apx < 1.6 * vs ** 0.5) & (((py - tcy) / tb) ** 2 + ((pz - tcz) / tc) ** 2 < 1.0)
    (fcx, fcy, fcz), (fa, fb, fc) = _FOURTH_VENTRICLE
    vent |= ((px - fcx) / fa) ** 2 + ((py - fcy) / fb) ** 2 + ((pz - fcz) / fc) ** 2 < vs
    sub = labels.ravel()[deep]
    sub[nuc & (sub == 5)] = 4
    sub[vent] = 6
    labels.ravel()[deep] = sub
    deep_gm = np.zeros(shape, dtype=bool)
    deep_gm.ravel()[deep[nuc & ~vent]] = True

    # Scalp: skin, subcutaneous fat, then muscle (galea, neck muscles) deeper down.
    fat = np.clip((f32(8.0) - skin_depth) / f32(3.0), 0.0, 1.0) * np.clip(skin_depth, 0.0, 1.0)
    fat = np.where(labels == 1, fat, f32(0.0)).astype(np.float32)
    # Skull: dense tables on both sides of the diploe (marrow).
    t = (depth + f32(anat.csf)) / f32(-anat.skull)  # 0 inner table .. 1 outer table
    marrow = np.clip(f32(1.6) - f32(3.2) * np.abs(t - f32(0.5)) - f32(0.3), 0.0, 1.0)
    marrow = np.where(labels == 2, marrow * f32(0.6), f32(0.0)).astype(np.float32)
    return labels, fat, marrow, deep_gm


# --------------------------------------------------------------------------------------------------
# Contrasts


def _texture(anat: _Anatomy, shape, spacing) -> np.ndarray:
    """Smooth multiplicative tissue texture (~±4%), shared by all modalities; separable waves."""
    gx, gy, gz = _grid(shape, spacing)
    acc = np.zeros(shape, dtype=np.float32)
    for (kx, ky, kz), (px, py, pz) in zip(anat.texture_k, anat.texture_phase, strict=True):
        fx = np.cos(kx * gx + px).astype(np.float32)[:, None, None]
        fy = np.cos(ky * gy + py).astype(np.float32)[None, :, None]
        fz = np.cos(kz * gz + pz).astype(np.float32)[None, None, :]
        acc += fx * fy * fz
    acc *= np.float32(0.04 * 2.0 / math.sqrt(len(anat.texture_k)))
    acc += np.float32(1.0)
    return acc


def _bias(rng: np.random.Generator, shape, spacing) -> np.ndarray:
    """Smooth multiplicative bias field: exp of a random quadratic in world mm (about ±15%)."""
    gx, gy, gz = (g / 100.0 for g in _grid(shape, spacing))
    c = rng.uniform(-1.0, 1.0, 9) * np.array([0.08, 0.08, 0.08, 0.05, 0.05, 0.05, 0.04, 0.04, 0.04])
    lx = c[0] * gx + c[3] * gx * gx
    ly = c[1] * gy + c[4] * gy * gy
    lz = c[2] * gz + c[5] * gz * gz
    log = (lx[:, None, None] + ly[None, :, None] + lz[None, None, :]
           + c[6] * (gx[:, None, None] * gy[None, :, None])
           + c[7] * (gy[None, :, None] * gz[None, None, :])
           + c[8] * (gx[:, None, None] * gz[None, None, :]))
    return np.exp(log).astype(np.float32)


def _synthesise(mod: str, seed: int, index: int, spacing: float, labels, fat, marrow, deep_gm,
                texture, cohort: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(_entropy(seed, index, cohort, _MOD_STREAM[mod]))
    tv = {k: v * float(rng.uniform(0.97, 1.03)) for k, v in _TISSUE[mod].items()}
    lut = np.zeros(7, dtype=np.float32)
    lut[3], lut[4], lut[5], lut[6] = tv["csf"], tv["gm"], tv["wm"], tv["csf"]
    img = lut[labels]
    img += fat * np.float32(tv["fat"]) + (labels == 1) * (np.float32(1.0) - fat) * np.float32(tv["muscle"])
    img += (labels == 2) * (marrow * np.float32(tv["marrow"]) + (1 - marrow) * np.float32(tv["bone"]))
    img[deep_gm] = np.float32(tv["deep"])
    img *= texture
    img = gaussian_filter(img, sigma=0.6, mode="nearest", truncate=3.0)  # partial volume / PSF
    img *= _bias(rng, labels.shape, spacing)
    sigma = np.float32(rng.uniform(0.015, 0.03))
    n1 = rng.standard_normal(labels.shape, dtype=np.float32)
    n2 = rng.standard_normal(labels.shape, dtype=np.float32)
    img += sigma * n1
    n2 *= sigma
    return np.sqrt(img * img + n2 * n2).astype(np.float32)  # Rician magnitude


# --------------------------------------------------------------------------------------------------
# Public API


def generate_subject(index: int, *, seed: int = 0, shape=(64, 64, 64), spacing: float = 3.0,
                     modalities=("t1", "t2", "pd"), cohort: int = 0, pose: np.ndarray | None = None,
                     centre: Sequence[float] | None = None) -> dict:
    """One phantom subject: ``{"labels": uint8, <mod>: float32 ..., "affine": 4x4 float64}``.

    Arrays are indexed (x, y, z) = (R, A, S); the affine has ``spacing`` on the diagonal and puts the
    volume's centre at 0 mm (or at ``centre``, a field of view placed elsewhere on the body). ``pose``
    (4x4, rigid) moves the head in the world: a point of the aligned head at ``p`` lies at
    ``pose @ p``. The subject's sex and age come from :func:`subject_covariates`. ``cohort``
    picks an independent stream of subjects (0: the healthy phantom; :data:`LESION_COHORT`: lesion
    phantoms), so two cohorts never share a subject whatever their seeds.
    """
    index = _check_int("index", index, 0)
    seed = _check_int("seed", seed, 0)
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    mods = _check_modalities(modalities)
    anat = _posed(_draw_anatomy(seed, index, cohort), pose, centre)
    labels, fat, marrow, deep_gm = _labels(anat, shape, spacing)
    out: dict[str, Any] = {"labels": labels}
    texture = _texture(anat, shape, spacing)
    for mod in mods:
        out[mod] = _synthesise(mod, seed, index, spacing, labels, fat, marrow, deep_gm, texture, cohort)
    out["affine"] = _affine(shape, spacing)
    if centre is not None:
        out["affine"][:3, 3] += np.asarray(centre, dtype=np.float64)
    return out


#: the fields of view of three sites (extent in mm, centre in mm): a tall one with the neck, a wide one,
#: one placed higher; every pose of :func:`draw_pose` keeps the brain inside each of them
SITES = {
    "site-a": {"extent": (240.0, 240.0, 240.0), "centre": (0.0, 0.0, 0.0)},
    "site-b": {"extent": (250.0, 260.0, 300.0), "centre": (0.0, -10.0, -40.0)},
    "site-c": {"extent": (236.0, 256.0, 232.0), "centre": (6.0, 6.0, 8.0)},
}
#: the varied phantom's largest head rotation (degrees, about any axis) and displacement (mm)
MAX_ROTATION_DEG = 15.0
MAX_SHIFT_MM = 25.0


def draw_pose(seed: int, index: int, cohort: int = 0, *, max_deg: float = MAX_ROTATION_DEG,
              max_mm: float = MAX_SHIFT_MM) -> np.ndarray:
    """A rigid head pose (4x4): a rotation by up to ``max_deg`` about a random axis through the brain's
    centre, then a shift of up to ``max_mm``; its own random stream, so the anatomy stays the aligned
    subject's."""
    rng = np.random.default_rng(_entropy(seed, index, cohort, 11))
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(float(rng.uniform(-max_deg, max_deg)))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)  # Rodrigues
    shift = rng.normal(size=3)
    shift *= float(rng.uniform(0.0, max_mm)) / np.linalg.norm(shift)
    centre = np.asarray(_draw_anatomy(seed, index, cohort).centre)
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = centre - rot @ centre + shift
    return pose


def site_of(index: int) -> str:
    """The varied phantom's site of subject ``index`` (the sites in turn)."""
    return list(SITES)[index % len(SITES)]


def site_geometry(site: str, spacing: float) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape, centre) of a site's field of view at ``spacing`` mm."""
    s = SITES[site]
    shape = tuple(int(math.ceil(e / spacing)) for e in s["extent"])
    return shape, tuple(s["centre"])  # type: ignore[return-value]


def head_to_world(index: int, *, seed: int = 0, cohort: int = 0, pose: np.ndarray | None = None) -> np.ndarray:
    """4x4: the nominal head frame (mm, origin at the brain's centre) -> world mm of the written scan;
    the truth a registration of that scan is measured against."""
    anat = _posed(_draw_anatomy(seed, index, cohort), pose, None)
    m = np.eye(4)
    m[:3, :3] = np.asarray(anat.rotation) * np.asarray(anat.scale)[None, :]
    m[:3, 3] = anat.centre
    return m


#: the phantom's template: a subject of a stream of its own (no dataset subject), drawn in its head frame
TEMPLATE_COHORT = 2
#: the part of the phantom counted as brain: cerebrum, cerebellum and brainstem above this head-frame
#: height (mm); the cord below continues out of any field of view
BRAIN_FLOOR_MM = -65.0


def phantom_template(spacing: float = 2.0) -> dict:
    """The phantom's template: one subject with the nominal pose, size and centre (its head frame is
    the world: the brain's centre at 0 mm, unit scale), T1 and a brain mask (CSF, grey and white
    matter and ventricles above :data:`BRAIN_FLOOR_MM`, holes filled). Registering a phantom scan with
    it recovers :func:`head_to_world` (the truth). ``{"t1", "brain", "labels", "affine"}``."""
    from dataclasses import replace

    from scipy import ndimage

    spacing = _check_spacing(spacing)
    anat = replace(_draw_anatomy(0, 0, TEMPLATE_COHORT), rotation=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
                   centre=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0))
    shape = tuple(int(math.ceil(e / spacing)) for e in (200.0, 240.0, 220.0))
    labels, fat, marrow, deep_gm = _labels(anat, shape, spacing)
    t1 = _synthesise("t1", 0, 0, spacing, labels, fat, marrow, deep_gm, _texture(anat, shape, spacing),
                     TEMPLATE_COHORT)
    z = _grid(shape, spacing)[2][None, None, :]
    brain = ndimage.binary_fill_holes(np.isin(labels, (3, 4, 5, 6)) & (z > BRAIN_FLOOR_MM))
    return {"t1": t1, "brain": brain, "labels": labels, "affine": _affine(shape, spacing)}


def _posed(anat: _Anatomy, pose: np.ndarray | None, centre: Sequence[float] | None) -> _Anatomy:
    """The anatomy moved by ``pose`` and expressed about a field of view centred at ``centre`` (the
    voxels are drawn in a frame centred on the volume; the affine then adds ``centre`` back)."""
    if pose is None and centre is None:
        return anat
    from dataclasses import replace

    p = np.eye(4) if pose is None else np.asarray(pose, dtype=np.float64)
    rot = p[:3, :3] @ np.asarray(anat.rotation)
    c = p[:3, :3] @ np.asarray(anat.centre) + p[:3, 3]
    if centre is not None:
        c = c - np.asarray(centre, dtype=np.float64)
    return replace(anat, rotation=tuple(map(tuple, rot.tolist())), centre=tuple(c.tolist()))


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, is_label: bool) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    if is_label:
        hdr.set_intent("label")
    # Write under a temporary name in the same folder, then rename: never a half-written file.
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp.nii.gz")
    try:
        nib.save(img, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dataset(out_dir: Path, *, count: int = 16, shape=(64, 64, 64), spacing: float = 3.0,
                  seed: int = 0, modalities=("t1", "t2", "pd"), lesions: bool = False,
                  progress: Progress | None = None, cohort: int | None = None, varied: bool = False) -> list[dict]:
    """Write ``count`` phantom subjects under ``out_dir`` and return their manifest rows.

    Files: ``sub-XXXX/sub-XXXX_<mod>.nii.gz`` (float32) and ``sub-XXXX/sub-XXXX_labels.nii.gz``
    (uint8), qform = sform = the RAS affine of :func:`generate_subject`, units mm; then
    ``phantom.json`` with the options, the label names and each subject's covariates. Writes only
    inside ``out_dir`` (created if needed); existing files of the same names are replaced.

    One row per subject and modality: ``subject``, ``modality``, ``path`` (POSIX, relative to
    ``out_dir``), ``sex`` (``"F"``/``"M"``), ``age`` (years, as text like other layouts' rows) and
    ``labels`` (the subject's label map, relative path).

    With ``lesions``, every subject gets one lesion (:mod:`mrivq.datasets.lesions`: tumour, white-matter
    hyperintensities and artefact in turn) in all its modalities, its ground truth in
    ``sub-XXXX/sub-XXXX_mask.nii.gz`` (uint8, the kind's value) and the manifest's ``mask`` column, and
    what was inserted under the subject in ``phantom.json``. ``cohort`` (default: :data:`LESION_COHORT`
    with ``lesions``, else 0) picks the stream of subjects (:func:`generate_subject`); the lesion cohort
    without ``lesions`` gives the lesion subjects' healthy twins.

    With ``varied``, every subject's head has its own pose (:func:`draw_pose`: up to 15 degrees and
    25 mm) and each site of :data:`SITES` in turn gives its field of view (``shape`` is then the site's,
    at ``spacing``; one of them shows the neck), as real scans arrive; ``phantom.json`` records per
    subject its ``site``, ``pose`` and ``head_to_world`` (the truth for registration error).
    """
    out_dir = Path(out_dir)
    count = _check_int("count", count, 1)
    seed = _check_int("seed", seed, 0)
    shape = _check_shape(shape)
    spacing = _check_spacing(spacing)
    mods = _check_modalities(modalities)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    subjects: list[dict] = []
    bar = progress.task("phantom subjects", total=count, unit="subject") if progress is not None else nullcontext()
    cohort = (LESION_COHORT if lesions else 0) if cohort is None else _check_int("cohort", cohort, 0)
    with bar as task:
        for index in range(count):
            geo: dict[str, Any] = {}
            if varied:
                site = site_of(index)
                sub_shape, fov_centre = site_geometry(site, spacing)
                pose = draw_pose(seed, index, cohort)
                sub = generate_subject(index, seed=seed, shape=sub_shape, spacing=spacing, modalities=mods,
                                       cohort=cohort, pose=pose, centre=fov_centre)
                geo = {"site": site, "pose": np.round(pose, 8).tolist(),
                       "head_to_world": np.round(head_to_world(index, seed=seed, cohort=cohort, pose=pose),
                                                 8).tolist()}
            else:
                sub = generate_subject(index, seed=seed, shape=shape, spacing=spacing, modalities=mods,
                                       cohort=cohort)
            affine = sub["affine"]
            cov = subject_covariates(index, seed=seed, cohort=cohort)
            sid = subject_id(index, cohort)
            (out_dir / sid).mkdir(exist_ok=True)
            extra: dict[str, Any] = {}
            if lesions:
                rng = np.random.default_rng(_entropy(seed, index, cohort, 7))
                vols, mask, lesion = insert_lesion({m: sub[m] for m in mods}, sub["labels"], spacing,
                                                   lesion_kind_for(index), rng)
                sub.update(vols)
                mask_rel = f"{sid}/{sid}_mask.nii.gz"
                _save_nifti(out_dir / mask_rel, mask, affine, is_label=True)
                extra = {"mask": mask_rel}
                subjects_lesion = {**lesion.to_dict(), "mask_value": MASK_VALUE[lesion.kind]}
            label_rel = f"{sid}/{sid}_labels.nii.gz"
            _save_nifti(out_dir / label_rel, sub["labels"], affine, is_label=True)
            age = f"{cov['age']:.1f}"
            for mod in mods:
                rel = f"{sid}/{sid}_{mod}.nii.gz"
                _save_nifti(out_dir / rel, sub[mod], affine, is_label=False)
                rows.append({"subject": sid, "modality": mod, "path": rel, "sex": cov["sex"], "age": age,
                             "labels": label_rel, **extra})
            subjects.append({"subject": sid, "index": index, "sex": cov["sex"], "age": cov["age"],
                             "labels": label_rel, **({"lesion": subjects_lesion} if lesions else {}), **geo})
            if task is not None:
                task.advance(1)
    meta = {
        "generator": "mrivq.phantom",
        "format": FORMAT_VERSION,
        "count": count,
        "shape": list(shape),
        "spacing": spacing,
        "seed": seed,
        "cohort": cohort,
        "modalities": list(mods),
        "lesions": bool(lesions),
        **({"varied": True, "max_rotation_deg": MAX_ROTATION_DEG, "max_shift_mm": MAX_SHIFT_MM,
            "sites": SITES} if varied else {}),
        "labels": {str(k): v for k, v in LABELS.items()},
        "subjects": subjects,
    }
    tmp = out_dir / ".phantom.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / "phantom.json")
    return rows
