"""DICOM series out (`synth/reconstruct/decode --format dicom`): tags, geometry and intensities read
back with pydicom, mrivq's reader and MONAI's LoadImage, against the NIfTI output."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrivq.io.dicom_out import PATIENT_NAME, save_dicom_series
from mrivq.io.images import read_dicom_series
from mrivq.utils.errors import MrivqError
from tests.helpers import invoke, oblique_affine


def _monai(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(str(folder))  # its default reader for a DICOM folder
    return np.asarray(img), np.asarray(img.affine)


def _same(folder: Path, vol: np.ndarray, affine: np.ndarray) -> None:
    """The series holds ``vol`` within its 16-bit quantisation, at ``affine`` within 1e-3 mm."""
    step = (float(vol.max()) - float(vol.min())) / 65535
    arr, aff, _ = read_dicom_series(folder)
    assert arr.shape == vol.shape and np.abs(arr - vol).max() <= step / 2 + 1e-4 * max(1.0, np.abs(vol).max())
    assert np.abs(aff - affine).max() < 1e-3
    m_arr, m_aff = _monai(folder)
    assert m_arr.shape == vol.shape and np.abs(m_arr - vol).max() <= step / 2 + 1e-4 * max(1.0, np.abs(vol).max())
    assert np.abs(m_aff - affine).max() < 1e-3


def test_series_tags_geometry_and_intensities(tmp_path: Path) -> None:
    import pydicom

    vol = (np.random.default_rng(0).normal(size=(9, 7, 5)) * 300 + 500).astype(np.float32)
    aff = oblique_affine()
    save_dicom_series(vol, aff, tmp_path / "a", description="test")
    save_dicom_series(vol, aff, tmp_path / "b")
    files = sorted((tmp_path / "a").glob("*.dcm"))
    assert len(files) == 5
    ds = [pydicom.dcmread(f) for f in files]
    d0 = ds[0]
    assert d0.SOPClassUID == pydicom.uid.MRImageStorage and d0.Modality == "MR"
    assert list(d0.ImageType) == ["DERIVED", "SECONDARY"] and d0.SyntheticData == "YES"
    assert str(d0.PatientName) == PATIENT_NAME and "SYNTHETIC" in d0.PatientID
    assert d0.BitsAllocated == 16 and d0.PixelRepresentation == 0 and float(d0.RescaleSlope) > 0
    assert len({d.SeriesInstanceUID for d in ds}) == 1 and len({d.FrameOfReferenceUID for d in ds}) == 1
    assert len({d.SOPInstanceUID for d in ds}) == 5
    assert len({d.ImageOrientationPatient[0] for d in ds}) == 1  # shared orientation
    assert pydicom.dcmread(next((tmp_path / "b").glob("*.dcm"))).SeriesInstanceUID != d0.SeriesInstanceUID
    # voxel (i, j, k) at IPP_k + i * col spacing * row direction + j * row spacing * column direction (LPS)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    for k, d in enumerate(sorted(ds, key=lambda d: int(d.InstanceNumber))):
        np.testing.assert_allclose([float(v) for v in d.ImagePositionPatient], lps[:3, 3] + k * lps[:3, 2], atol=1e-4)
    np.testing.assert_allclose(float(d0.SliceThickness), np.linalg.norm(aff[:3, 2]), atol=1e-5)
    _same(tmp_path / "a", vol, aff)


def test_bad_series_outputs(tmp_path: Path) -> None:
    vol = np.zeros((4, 4, 3), np.float32)
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(MrivqError, match="not perpendicular"):
        save_dicom_series(vol, sheared, tmp_path / "s")
    with pytest.raises(MrivqError, match="one 3D volume"):
        save_dicom_series(np.zeros((4, 4, 3, 2)), np.eye(4), tmp_path / "s")
    save_dicom_series(vol, np.eye(4), tmp_path / "s")
    with pytest.raises(MrivqError, match="not empty"):
        save_dicom_series(vol, np.eye(4), tmp_path / "s")
    save_dicom_series(vol + 1, np.eye(4), tmp_path / "s", overwrite=True)  # a series replaces a series
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(MrivqError, match="other than a DICOM series"):
        save_dicom_series(vol, np.eye(4), tmp_path / "s", overwrite=True)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    (tmp_path / "f").write_text("x")
    with pytest.raises(MrivqError, match="not a folder"):
        save_dicom_series(vol, np.eye(4), tmp_path / "f")
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


@pytest.mark.slow
def test_synth_reconstruct_decode_write_dicom_like_nifti(trained_run: Path, phantom_root: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "synth"
    res = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(out), "--format", "both",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    for i in range(2):
        nii = nib.load(out / f"synth_{i:04d}.nii.gz")
        _same(out / f"synth_{i:04d}", np.asarray(nii.dataobj, np.float32), nii.affine)
    again = invoke("synth", "--run", str(trained_run), "--count", "2", "--out", str(out), "--format", "both",
                   "--device", "cpu")
    assert again.exit_code == 0 and "already complete" in again.output
    img = next((phantom_root / "phantom").glob("sub-*/sub-*_t1.nii.gz"))
    rec_nii, rec_dcm = tmp_path / "rec.nii.gz", tmp_path / "rec"
    for o, fmt in ((rec_nii, "nifti"), (rec_dcm, "dicom")):
        res = invoke("reconstruct", str(img), "-o", str(o), "--run", str(trained_run), "--format", fmt,
                     "--device", "cpu")
        assert res.exit_code == 0, res.output
    nii = nib.load(rec_nii)
    _same(rec_dcm, np.asarray(nii.dataobj, np.float32), nii.affine)
    codes = tmp_path / "c.npz"
    assert invoke("encode", str(img), "-o", str(codes), "--run", str(trained_run), "--device", "cpu").exit_code == 0
    res = invoke("decode", str(codes), "-o", str(tmp_path / "dec"), "--run", str(trained_run), "--format", "dicom",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    _same(tmp_path / "dec", np.asarray(nii.dataobj, np.float32), nii.affine)
    # bad input: one line, exit 2
    res = invoke("reconstruct", str(img), "-o", str(rec_dcm), "--run", str(trained_run), "--format", "dicom")
    assert res.exit_code == 2 and "not empty" in res.output
    res = invoke("reconstruct", str(img), "-o", str(tmp_path / "x"), "--run", str(trained_run), "--format", "png")
    assert res.exit_code == 2 and "--format" in res.output
    res = invoke("synth", "--run", str(trained_run), "--count", "1", "--out", str(out), "--format", "tiff")
    assert res.exit_code == 2 and "--format" in res.output
    res = invoke("reconstruct", str(img), "-o", str(trained_run / "d"), "--run", str(trained_run), "--format", "dicom")
    assert res.exit_code == 2 and "inside run folder" in res.output
