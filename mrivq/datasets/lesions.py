"""Lesions with known masks, inserted into healthy volumes: the ground truth that unsupervised anomaly
detection is measured against.

Three kinds, each with contrasts that follow the modality as on real scans:

- ``tumour``: a mass (an ellipsoid of 6 to 20 mm radius, slightly lumpy) with a shell of oedema
  (1.3 to 1.8 times its radius) in the brain. The core is dark on T1 (or bright, as after contrast, in
  a third of them), bright on T2 and PD; the oedema is dark on T1, bright on T2 and PD.
- ``wmh``: 3 to 8 small white-matter hyperintensities (1.5 to 5 mm radius) as in multiple sclerosis:
  bright on T2 and PD, slightly dark on T1, confined to the white matter.
- ``artefact``: a susceptibility signal void (a sphere of 4 to 12 mm radius, near zero signal on every
  modality with a bright rim), anywhere in the brain (as near the sinuses, or a
  dropout of the receive coil).

:func:`insert_lesion` works on any volume with a tissue label map; the phantom uses its own labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mrivq.utils.errors import MrivqError

KINDS = ("tumour", "wmh", "artefact")
#: mask values: 0 healthy, then one per kind (the oedema counts as the tumour's)
MASK_VALUE = {k: i + 1 for i, k in enumerate(KINDS)}

# signal relative to the subject's own white matter, per modality: (core, oedema)
_TUMOUR = {"t1": (0.45, 0.75), "t2": (1.9, 1.6), "pd": (1.35, 1.25)}
_TUMOUR_ENHANCING_T1 = 1.45
_WMH = {"t1": 0.8, "t2": 1.8, "pd": 1.3}


@dataclass
class Lesion:
    """What was inserted: its kind, centre (voxel indices), radius (mm, the largest of its parts) and
    size in voxels, for per-kind and per-size tables."""

    kind: str
    centre: list[int]
    radius_mm: float
    voxels: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ellipsoid(shape: tuple[int, ...], centre: np.ndarray, radii_vox: np.ndarray, rng: np.random.Generator,
               lumpy: float = 0.0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    d = ((grid - centre) / radii_vox) ** 2
    r = np.sqrt(d.sum(-1))
    if lumpy:
        ang = np.arctan2(grid[..., 1] - centre[1], grid[..., 0] - centre[0])
        phase = rng.uniform(0, 2 * np.pi, 2)
        r = r * (1 + lumpy * (np.sin(3 * ang + phase[0]) + 0.5 * np.sin(5 * ang + phase[1])) / 1.5)
    return r <= 1.0


def _white_matter_mean(vol: np.ndarray, wm: np.ndarray) -> float:
    return float(vol[wm].mean()) if wm.any() else float(np.percentile(vol, 90))


def insert_lesion(volumes: dict[str, np.ndarray], labels: np.ndarray, spacing: float, kind: str,
                  rng: np.random.Generator, *, brain: tuple[int, ...] = (3, 4, 5, 6), white_matter: int = 5
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, Lesion]:
    """Insert one lesion of ``kind`` into every modality of ``volumes`` (same shape as ``labels``).

    Returns the new volumes, the mask (uint8, :data:`MASK_VALUE` of the kind) and a :class:`Lesion`.
    ``brain`` and ``white_matter`` are the label values where tumours and hyperintensities may go."""
    if kind not in KINDS:
        raise MrivqError(f"lesion kind {kind!r} is not one of {', '.join(KINDS)}")
    shape = labels.shape
    in_brain = np.isin(labels, brain)
    wm = labels == white_matter
    where = {"tumour": in_brain, "wmh": wm, "artefact": in_brain}[kind]
    if where.sum() < 10:
        raise MrivqError(f"the volume has no room for a {kind} (its label map has too little tissue)")
    cand = np.argwhere(where)
    out = {m: v.astype(np.float32, copy=True) for m, v in volumes.items()}
    mask = np.zeros(shape, np.uint8)
    wm_mean = {m: _white_matter_mean(v, wm) for m, v in volumes.items()}
    if kind == "tumour":
        radius = float(rng.uniform(6, 20))
        centre = cand[rng.integers(len(cand))].astype(np.float32)
        radii = radius / spacing * rng.uniform(0.8, 1.2, 3)
        core = _ellipsoid(shape, centre, np.maximum(radii, 0.8), rng, lumpy=0.15) & in_brain
        shell = _ellipsoid(shape, centre, np.maximum(radii * rng.uniform(1.3, 1.8), 1.2), rng, lumpy=0.2)
        oedema = shell & in_brain & ~core
        enhancing = rng.random() < 1 / 3
        for m, v in out.items():
            c, e = _TUMOUR.get(m, _TUMOUR["t2"])
            if m == "t1" and enhancing:
                c = _TUMOUR_ENHANCING_T1
            v[oedema] = 0.5 * v[oedema] + 0.5 * e * wm_mean[m]
            v[core] = c * wm_mean[m] * (1 + 0.05 * rng.standard_normal(int(core.sum())))
        mask[core | oedema] = MASK_VALUE[kind]
        lesion_radius = radius * 1.5
    elif kind == "wmh":
        lesion_radius = 0.0
        for _ in range(int(rng.integers(3, 9))):
            r = float(rng.uniform(1.5, 5))
            centre = cand[rng.integers(len(cand))].astype(np.float32)
            blob = _ellipsoid(shape, centre, np.maximum(r / spacing * rng.uniform(0.7, 1.3, 3), 0.6), rng) & wm
            for m, v in out.items():
                v[blob] = _WMH.get(m, _WMH["t2"]) * wm_mean[m] * (1 + 0.05 * rng.standard_normal(int(blob.sum())))
            mask[blob] = MASK_VALUE[kind]
            lesion_radius = max(lesion_radius, r)
        centre = np.argwhere(mask).mean(0) if mask.any() else centre
    else:
        radius = float(rng.uniform(4, 12))
        centre = cand[rng.integers(len(cand))].astype(np.float32)
        void = _ellipsoid(shape, centre, np.full(3, max(radius / spacing, 0.8)), rng)
        rim = _ellipsoid(shape, centre, np.full(3, max(radius / spacing, 0.8) + 0.6), rng) & ~void
        for m, v in out.items():
            v[rim] = np.maximum(v[rim], 1.3 * wm_mean[m])
            v[void] = 0.03 * wm_mean[m]
        mask[void | rim] = MASK_VALUE[kind]
        lesion_radius = radius
    if not mask.any():  # a lesion smaller than a voxel at this spacing: say so rather than write none
        raise MrivqError(f"a {kind} of {lesion_radius:.1f} mm fell between voxels at {spacing} mm; use a finer "
                         "spacing")
    return out, mask, Lesion(kind, [int(round(c)) for c in centre], round(lesion_radius, 2), int((mask > 0).sum()))


def lesion_kind_for(index: int, kinds: Any = KINDS) -> str:
    """The kind of subject ``index``'s lesion: the kinds in turn, so every kind is in a small set."""
    kinds = list(kinds)
    return kinds[index % len(kinds)]
