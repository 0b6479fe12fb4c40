"""The internal-anatomy measure tells a brain-shaped blob from real anatomy: per-class tissue Dice with
the real mean map and the lateral ventricles' volume, known answers on phantoms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mrivq.datasets.phantom import generate_subject
from mrivq.evaluate.realism import anatomy_reference, internal_anatomy

pytestmark = pytest.mark.slow  # 18 phantoms at 4 mm and three mixtures: about 25 s


def _set(start: int, n: int) -> np.ndarray:
    vols = [generate_subject(i, shape=(48, 56, 48), spacing=4.0, modalities=("t1",))["t1"]
            for i in range(start, start + n)]
    return np.clip(np.stack(vols)[:, None], 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def sets() -> tuple[np.ndarray, np.ndarray]:
    return _set(0, 10), _set(10, 8)


def test_real_scans_have_their_ventricles_and_tissue_maps(sets) -> None:
    real, other = sets
    ref = anatomy_reference(real, voxel_mm=4.0)
    res = internal_anatomy(other, ref)
    assert res["ventricles_present"] >= 0.75
    assert res["tissue_dice_gap"] <= 0.05
    assert min(res["tissue_dice_real"].values()) > 0.5
    lo, hi = res["ventricles_real_ml"]
    assert 0 < lo <= hi


def test_a_smooth_blob_has_no_ventricles_and_fails_the_tissue_maps(sets) -> None:
    real, other = sets
    ref = anatomy_reference(real, voxel_mm=4.0)
    mean = real.mean(0)[0]
    blobs = np.stack([ndimage.gaussian_filter(mean, 2.5 + 0.1 * i) for i in range(8)])[:, None]
    res = internal_anatomy(blobs.astype(np.float32), ref)
    assert res["ventricles_present"] <= 0.25
    assert res["tissue_dice_gap"] > 0.1
    # the same blobs pass neither; the real scans pass both (the measure can fail and can pass)
    assert internal_anatomy(other, ref)["tissue_dice_gap"] < res["tissue_dice_gap"]


def test_a_template_brain_mask_places_the_measure(sets) -> None:
    real, other = sets
    brain = np.zeros(real.shape[2:], bool)
    brain[8:40, 10:46, 10:40] = True
    ref = anatomy_reference(real, voxel_mm=4.0, brain=brain)
    res = internal_anatomy(other, ref)
    assert res["brain_from"] == "template"
    assert ref["brain"].sum() == brain.sum()
