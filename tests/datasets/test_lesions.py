"""Lesion phantoms: where each kind goes, its contrast per modality, and that nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest

from mrivq.datasets.lesions import KINDS, MASK_VALUE, insert_lesion, lesion_kind_for
from mrivq.datasets.phantom import generate_subject
from mrivq.utils.errors import MrivqError


@pytest.fixture(scope="module")
def subject() -> dict:
    return generate_subject(0, shape=(48, 48, 48), spacing=4.0)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_its_mask_with_the_right_contrast(subject: dict, kind: str) -> None:
    vols = {m: subject[m] for m in ("t1", "t2", "pd")}
    out, mask, lesion = insert_lesion(vols, subject["labels"], 4.0, kind, np.random.default_rng(3))
    inside = mask > 0
    assert inside.any() and set(np.unique(mask)) == {0, MASK_VALUE[kind]}
    assert lesion.kind == kind and lesion.voxels == int(inside.sum()) and lesion.radius_mm > 0
    for m in vols:
        assert np.array_equal(out[m][~inside], vols[m][~inside])  # healthy voxels untouched
        assert not np.allclose(out[m][inside], vols[m][inside])
    if kind == "wmh":
        assert (subject["labels"][inside] == 5).all()  # white matter only
        assert out["t2"][inside].mean() > vols["t2"][inside].mean()  # bright on T2
        assert out["t1"][inside].mean() < vols["t1"][inside].mean()  # slightly dark on T1
    if kind == "tumour":
        assert np.isin(subject["labels"][inside], (3, 4, 5, 6)).all()  # in the brain
        assert out["t2"][inside].mean() > vols["t2"][inside].mean()
    if kind == "artefact":
        c = tuple(lesion.centre)
        assert out["t1"][c] < 0.1 * vols["t1"].max() and out["t2"][c] < 0.1 * vols["t2"].max()  # a void


def test_deterministic_and_cycling(subject: dict) -> None:
    a = insert_lesion({"t1": subject["t1"]}, subject["labels"], 4.0, "tumour", np.random.default_rng(1))
    b = insert_lesion({"t1": subject["t1"]}, subject["labels"], 4.0, "tumour", np.random.default_rng(1))
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0]["t1"], b[0]["t1"])
    assert [lesion_kind_for(i) for i in range(4)] == ["tumour", "wmh", "artefact", "tumour"]


def test_bad_kind_and_no_room(subject: dict) -> None:
    with pytest.raises(MrivqError, match="not one of"):
        insert_lesion({"t1": subject["t1"]}, subject["labels"], 4.0, "cyst", np.random.default_rng(0))
    with pytest.raises(MrivqError, match="no room"):
        insert_lesion({"t1": subject["t1"]}, np.zeros_like(subject["labels"]), 4.0, "wmh",
                      np.random.default_rng(0))
