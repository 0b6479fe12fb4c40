"""Build the brain template shipped in ``mrivq/data/templates/`` from the ICBM 2009a symmetric files that
nilearn bundles (``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``).

    python scripts/make_template.py --nilearn-data PATH/TO/nilearn/datasets/data

Writes, at 2 mm (2x2x2 block means of the 1 mm files), uint8 scaled to 0-255:
``icbm152_2009a_t1_2mm.nii.gz`` (the skull-stripped T1), ``icbm152_2009a_gm_2mm.nii.gz``,
``icbm152_2009a_wm_2mm.nii.gz`` (tissue probabilities) and ``icbm152_2009a_brain_2mm.nii.gz`` (brain mask
probability: GM + WM > 0.5 at 1 mm, holes filled (ventricles), closed by 3 mm (sulci)).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

NAME = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
OUT = Path(__file__).resolve().parents[1] / "mrivq" / "data" / "templates"


def _half(a: np.ndarray) -> np.ndarray:
    pad = [(0, s % 2) for s in a.shape]
    a = np.pad(a.astype(np.float64), pad)
    x, y, z = (s // 2 for s in a.shape)
    return a.reshape(x, 2, y, 2, z, 2).mean(axis=(1, 3, 5))


def _save(arr01: np.ndarray, affine: np.ndarray, name: str) -> None:
    img = nib.Nifti1Image(np.clip(np.rint(arr01 * 255), 0, 255).astype(np.uint8), affine)
    img.set_qform(affine, code=4)  # MNI152
    img.set_sform(affine, code=4)
    img.header.set_xyzt_units("mm")
    nib.save(img, OUT / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nilearn-data", type=Path, required=True)
    a = ap.parse_args()
    imgs = {k: nib.load(a.nilearn_data / NAME.format(k)) for k in ("t1", "gm", "wm")}
    aff1 = imgs["t1"].affine
    arrs = {k: np.asarray(v.get_fdata(), dtype=np.float64) / 255.0 for k, v in imgs.items()}
    brain = ndimage.binary_fill_holes((arrs["gm"] + arrs["wm"]) > 0.5)
    ball = np.linalg.norm(np.mgrid[-3:4, -3:4, -3:4], axis=0) <= 3
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(brain, ball, iterations=1))
    aff2 = aff1.copy()
    aff2[:3, :3] *= 2
    aff2[:3, 3] += 0.5 * np.diag(aff1[:3, :3])  # centre of each 2x2x2 block
    OUT.mkdir(parents=True, exist_ok=True)
    for k in ("t1", "gm", "wm"):
        _save(_half(arrs[k]), aff2, f"icbm152_2009a_{k}_2mm.nii.gz")
    _save(_half(brain.astype(np.float64)), aff2, "icbm152_2009a_brain_2mm.nii.gz")


if __name__ == "__main__":
    main()
