"""A cohort of real brain anatomy with a known population: the ICBM152 2009a T1 (Fonov et al. 2011, shipped
with mrivq at 2 mm), deformed per subject and placed in the scanner as scans arrive.

Each subject gets, from its own random stream: a smooth random displacement (control points every ~28 mm,
sd 3 mm), a radial displacement about the point between the lateral ventricles (Gaussian weight, sd 22 mm;
up to 30% of the distance either way), a global
anisotropic scale (0.92-1.08), a rigid pose in the NIfTI affine (up to 10 degrees and 12 mm), a smooth bias
field (about +-15%), a gain, a gamma and Rician-like noise. The scans are skull-stripped, as the template is.
The folder becomes a dataset through the ``nifti-folder`` layout (``mrivq fetch CARD --from``), so the
benchmarks train and evaluate on it exactly as on a user's own scans:

    python benchmarks/anatomy_cohort.py --out bench/anatomy/cohort --count 64
    mrivq fetch bench/anatomy/cohort/icbm-cohort.yaml --from bench/anatomy/cohort/scans --root bench/anatomy/data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from scipy import ndimage

from mrivq.data.align import load_template

VENTRICLE_CENTRE_MM = np.array([0.0, -12.0, 15.0])  # MNI: between the bodies of the lateral ventricles
VENTRICLE_SIGMA_MM = 22.0


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def subject(t1: np.ndarray, affine: np.ndarray, index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One deformed, posed, biased and noisy copy of ``t1`` -> (image, its NIfTI affine)."""
    rng = np.random.default_rng([seed, index])
    shape = t1.shape
    vox = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3] @ vox + affine[:3, 3:]
    # where each output point takes its anatomy from (a pull-back map, in template mm)
    coarse = rng.normal(0.0, 3.0, (3, 7, 8, 7))
    disp = np.stack([ndimage.zoom(c, np.array(shape) / c.shape, order=3) for c in coarse]).reshape(3, -1)
    r = world - VENTRICLE_CENTRE_MM[:, None]
    weight = np.exp(-(r ** 2).sum(0) / (2 * VENTRICLE_SIGMA_MM ** 2))
    grow = rng.uniform(-0.30, 0.35)  # > 0: the region is drawn from nearer its centre
    scale = rng.uniform(0.92, 1.08, 3)[:, None]
    src = (world - grow * r * weight) / scale + disp
    src_vox = np.linalg.solve(affine[:3, :3], src - affine[:3, 3:])
    img = ndimage.map_coordinates(t1.astype(np.float32), src_vox, order=1, cval=0.0).reshape(shape)
    brain = img > 0.05 * t1.max()
    low = rng.normal(0.0, 1.0, (4, 4, 4))
    bias = np.exp(0.15 * ndimage.zoom(low, np.array(shape) / low.shape, order=3))
    img = np.clip(img / t1.max(), 0, None) ** rng.uniform(0.85, 1.15) * bias * rng.uniform(0.8, 1.2) * 1000.0
    sd = 0.02 * np.percentile(img[brain], 99)
    img = np.sqrt((img + rng.normal(0, sd, shape)) ** 2 + rng.normal(0, sd, shape) ** 2)
    pose = np.eye(4)
    pose[:3, :3] = _rotation(rng, 10.0)
    pose[:3, 3] = rng.uniform(-12.0, 12.0, 3)
    return img.astype(np.float32), pose @ affine


def write_cohort(out: Path, count: int, seed: int = 0) -> Path:
    """Write ``count`` subjects to ``out/scans`` and a card ``out/icbm-cohort.yaml``; return the card's path."""
    tpl = load_template("icbm152")
    scans = out / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = scans / f"sub-{i:03d}_T1.nii.gz"
        if not path.is_file():
            img, aff = subject(tpl.t1, tpl.affine, i, seed)
            nib.save(nib.Nifti1Image(img, aff), path)
    card = out / "icbm-cohort.yaml"
    card.write_text(yaml.safe_dump({
        "name": "icbm-cohort", "title": "Deformed ICBM152 2009a T1 cohort (benchmarks/anatomy_cohort.py)",
        "access": "manual", "layout": "nifti-folder", "dims": 3, "modalities": ["t1"], "files": [],
        "options": {"modality_from_name": "_(T1)"},
        "instructions": "Write it with python benchmarks/anatomy_cohort.py, then pass its scans folder with --from.",
    }, sort_keys=False))
    return card


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_cohort(a.out, a.count, a.seed))


if __name__ == "__main__":
    main()
