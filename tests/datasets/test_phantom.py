"""The built-in procedural head phantom: determinism, plausibility, geometry, files."""

from __future__ import annotations

import dataclasses
import io
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrivq.datasets import phantom
from mrivq.utils.errors import MrivqError
from mrivq.utils.progress import Progress

CSF, GM, WM, VENT, SCALP, SKULL = 3, 4, 5, 6, 1, 2


@pytest.fixture(scope="module")
def subject() -> dict:
    return phantom.generate_subject(3, seed=0)


def _means(sub: dict, mod: str) -> dict[int, float]:
    lab, img = sub["labels"], sub[mod]
    return {k: float(img[lab == k].mean()) for k in range(7)}


def test_deterministic_per_seed_and_index():
    kw = {"shape": (40, 44, 40), "spacing": 5.0}
    a = phantom.generate_subject(2, seed=7, **kw)
    b = phantom.generate_subject(2, seed=7, **kw)
    for key in ("labels", "t1", "t2", "pd", "affine"):
        assert a[key].tobytes() == b[key].tobytes(), key
    assert phantom.subject_covariates(2, seed=7) == phantom.subject_covariates(2, seed=7)
    other_seed = phantom.generate_subject(2, seed=8, **kw)
    other_index = phantom.generate_subject(3, seed=7, **kw)
    for other in (other_seed, other_index):
        assert not np.array_equal(a["labels"], other["labels"])
        assert not np.array_equal(a["t1"], other["t1"])


def test_modality_does_not_depend_on_what_else_is_requested(subject):
    only = phantom.generate_subject(3, seed=0, modalities=("pd",))
    assert set(only) == {"labels", "pd", "affine"}
    assert only["pd"].tobytes() == subject["pd"].tobytes()
    assert only["labels"].tobytes() == subject["labels"].tobytes()


def test_types_shapes_and_affine():
    shape, spacing = (40, 48, 36), 4.5
    sub = phantom.generate_subject(0, shape=shape, spacing=spacing)
    assert sub["labels"].dtype == np.uint8 and sub["labels"].shape == shape
    for mod in phantom.MODALITIES:
        assert sub[mod].dtype == np.float32 and sub[mod].shape == shape
        assert np.isfinite(sub[mod]).all() and sub[mod].min() >= 0
    aff = sub["affine"]
    assert aff.dtype == np.float64 and aff.shape == (4, 4)
    np.testing.assert_allclose(np.diag(aff), [spacing, spacing, spacing, 1.0])
    assert np.count_nonzero(aff[:3, :3] - np.diag(np.diag(aff[:3, :3]))) == 0
    centre = aff @ np.array([(n - 1) / 2 for n in shape] + [1.0])
    np.testing.assert_allclose(centre, [0, 0, 0, 1], atol=1e-9)


def test_all_tissue_classes_and_two_lateral_ventricles(subject):
    lab = subject["labels"]
    assert set(np.unique(lab).tolist()) == set(range(7))
    # Ventricles on both sides of the midline (x index is R/L), as at least two separate blobs.
    vent = lab == VENT
    half = lab.shape[0] // 2
    assert vent[:half].sum() > 20 and vent[half:].sum() > 20
    _, n_blobs = ndimage.label(vent)
    assert n_blobs >= 2
    # Nested: brain inside CSF inside skull inside scalp (check along the vertical through the centre).
    cx, cy = lab.shape[0] // 2, lab.shape[1] // 2
    column = lab[cx, cy, :]
    top = [int(v) for v in column[::-1] if v != 0]
    order = [v for i, v in enumerate(top) if i == 0 or v != top[i - 1]]
    assert order[:4] == [SCALP, SKULL, CSF, GM]


@pytest.mark.parametrize("index", [0, 1, 5])
def test_tissue_intensity_order(index):
    sub = phantom.generate_subject(index, seed=0)
    t1, t2, pd = (_means(sub, m) for m in ("t1", "t2", "pd"))
    # T1: WM > GM > CSF, fat/scalp bright, skull dark.
    assert t1[WM] > t1[GM] > t1[CSF]
    assert t1[GM] > t1[VENT]
    assert t1[SCALP] > t1[GM] and t1[SKULL] < t1[GM]
    # T2: CSF > GM > WM, skull dark.
    assert t2[CSF] > t2[GM] > t2[WM] and t2[VENT] > t2[GM]
    assert t2[SKULL] < t2[WM]
    # PD: CSF > GM > WM with a smaller spread than T2, skull dark.
    assert pd[CSF] > pd[GM] > pd[WM] and pd[VENT] > pd[GM]
    assert pd[SKULL] < pd[WM]
    assert (pd[VENT] - pd[WM]) / pd[VENT] < (t2[VENT] - t2[WM]) / t2[VENT]
    # Background is dark everywhere, and images are not piecewise constant.
    for means in (t1, t2, pd):
        assert means[0] < 0.1
    wm = ndimage.binary_erosion(sub["labels"] == WM, iterations=1)
    assert float(sub["t1"][wm].std()) > 0.01


def _interface_faces(mask: np.ndarray) -> int:
    return sum(int(np.count_nonzero(np.diff(mask.astype(np.int8), axis=ax))) for ax in range(3))


@pytest.mark.parametrize("index", [0, 3])
def test_cortex_is_folded(index):
    # The GM/WM boundary of the subject has much more area than the same head with folding off.
    anat = phantom._draw_anatomy(0, index)
    shape, spacing = (64, 64, 64), 3.0
    folded = phantom._labels(anat, shape, spacing)[0]
    smooth = phantom._labels(dataclasses.replace(anat, fold_depth=0.0), shape, spacing)[0]
    ratio = _interface_faces(folded == WM) / _interface_faces(smooth == WM)
    assert ratio > 1.25
    # Sulci: CSF reaches well below the outer brain surface.
    assert (folded == CSF).sum() > 1.2 * (smooth == CSF).sum()


def test_same_anatomy_across_spacings():
    fine = phantom.generate_subject(4, shape=(96, 112, 96), spacing=2.0, modalities=("t1",))
    coarse = phantom.generate_subject(4, shape=(48, 56, 48), spacing=4.0, modalities=("t1",))

    def volume_ml(sub, spacing, classes):
        return np.isin(sub["labels"], classes).sum() * spacing**3 / 1000.0

    for classes in ([GM, WM, VENT], [CSF, GM, WM, VENT], [SCALP, SKULL, CSF, GM, WM, VENT]):
        v_fine, v_coarse = volume_ml(fine, 2.0, classes), volume_ml(coarse, 4.0, classes)
        assert abs(v_fine - v_coarse) / v_fine < 0.10, (classes, v_fine, v_coarse)
    assert 500 < volume_ml(fine, 2.0, [GM, WM, VENT]) < 1500


def test_subjects_vary_with_covariates():
    subs = [phantom.generate_subject(i, shape=(48, 48, 48), spacing=4.0, modalities=("t1",))
            for i in range(8)]
    brain = [np.isin(s["labels"], [GM, WM, VENT]).sum() for s in subs]
    assert len(set(brain)) == len(brain)
    vent = np.array([(s["labels"] == VENT).sum() for s in subs], dtype=float)
    cov = [phantom.subject_covariates(i) for i in range(8)]
    ages = np.array([c["age"] for c in cov])
    assert all(c["sex"] in ("F", "M") for c in cov) and ((ages >= 20) & (ages <= 85)).all()
    assert len({c["sex"] for c in cov}) == 2
    assert np.corrcoef(ages, vent)[0, 1] > 0.5  # older heads have larger ventricles


def test_write_dataset(tmp_path):
    out = tmp_path / "phantom"
    stream = io.StringIO()
    shape, spacing = (32, 36, 32), 6.0
    with Progress(enabled=True, stream=stream) as prog:
        rows = phantom.write_dataset(out, count=2, shape=shape, spacing=spacing, seed=1,
                                     modalities=("t1", "t2"), progress=prog)
    assert "phantom" in stream.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == ["phantom"]  # nothing written outside out_dir
    assert sorted(p.name for p in out.iterdir()) == ["phantom.json", "sub-0000", "sub-0001"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left

    assert [(r["subject"], r["modality"]) for r in rows] == [
        ("sub-0000", "t1"), ("sub-0000", "t2"), ("sub-0001", "t1"), ("sub-0001", "t2")]
    expected = phantom.generate_subject(1, seed=1, shape=shape, spacing=spacing, modalities=("t1", "t2"))
    for row in rows:
        assert set(row) >= {"subject", "modality", "path", "sex", "age"}
        assert row["path"] == f"{row['subject']}/{row['subject']}_{row['modality']}.nii.gz"
        assert row["sex"] in ("F", "M") and 20 <= float(row["age"]) <= 85
        img = nib.load(out / row["path"])
        assert img.shape == shape and img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, expected["affine"])
        np.testing.assert_allclose(img.get_qform(), expected["affine"])
        np.testing.assert_allclose(img.get_sform(), expected["affine"])
        hdr = img.header
        assert int(hdr["qform_code"]) > 0 and int(hdr["sform_code"]) > 0
        np.testing.assert_allclose(hdr.get_zooms(), (spacing,) * 3)
        assert hdr.get_xyzt_units() == ("mm", "sec")
        if row["subject"] == "sub-0001":
            assert np.asanyarray(img.dataobj).tobytes() == expected[row["modality"]].tobytes()
            cov = phantom.subject_covariates(1, seed=1)
            assert (row["sex"], float(row["age"])) == (cov["sex"], cov["age"])
    lab = nib.load(out / "sub-0001" / "sub-0001_labels.nii.gz")
    assert lab.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(lab.dataobj), expected["labels"])

    meta = json.loads((out / "phantom.json").read_text())
    assert meta["count"] == 2 and meta["shape"] == list(shape) and meta["spacing"] == spacing
    assert meta["seed"] == 1 and meta["modalities"] == ["t1", "t2"]
    assert [s["subject"] for s in meta["subjects"]] == ["sub-0000", "sub-0001"]


@pytest.mark.parametrize("kwargs", [
    {"shape": (64, 64)}, {"shape": (64, 64, 64, 1)}, {"shape": (8, 64, 64)}, {"shape": (64.5, 64, 64)},
    {"shape": "64"}, {"shape": None}, {"spacing": 0}, {"spacing": -2.0}, {"spacing": float("nan")},
    {"spacing": "wide"}, {"modalities": ("t1", "flair")}, {"modalities": ()}, {"modalities": ("t1", "t1")},
])
def test_bad_options_are_one_line_errors(tmp_path, kwargs):
    with pytest.raises(MrivqError) as err:
        phantom.generate_subject(0, **kwargs)
    assert "\n" not in str(err.value) and "phantom" in str(err.value)
    with pytest.raises(MrivqError):
        phantom.write_dataset(tmp_path / "out", count=1, **kwargs)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_bad_index_and_count(tmp_path):
    with pytest.raises(MrivqError):
        phantom.generate_subject(-1)
    with pytest.raises(MrivqError):
        phantom.write_dataset(tmp_path / "out", count=0)
    assert not (tmp_path / "out").exists()
