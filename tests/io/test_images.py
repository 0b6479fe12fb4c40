"""Image readers and writers on real files written here: NIfTI, Analyze, DICOM (pydicom), PNG."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pydicom  # noqa: E402
import pytest

from mrivq.io.images import load_volume, read_dicom_series, save_nifti, save_png, to_uint8
from mrivq.utils.errors import ImageReadError
from tests.helpers import oblique_affine, quantised_volume, write_dicom_series

# ------------------------------------------------------------------------------------------ helpers


# -------------------------------------------------------------------------------------------- NIfTI

@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
def test_nifti_round_trip_keeps_data_and_affine(tmp_path, name):
    vol = np.random.default_rng(1).normal(size=(6, 7, 8)).astype(np.float32)
    aff = oblique_affine()
    out = save_nifti(vol, aff, tmp_path / name)
    arr, got = load_volume(out)
    assert arr.dtype == np.float32 and arr.shape == vol.shape
    np.testing.assert_array_equal(arr, vol)
    np.testing.assert_allclose(got, aff, atol=1e-5)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.float32
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_nifti_4d_is_channels_last(tmp_path):
    vol = np.random.default_rng(2).random((5, 6, 7, 3)).astype(np.float32)
    arr, _ = load_volume(save_nifti(vol, np.eye(4), tmp_path / "multi.nii.gz"))
    assert arr.shape == (5, 6, 7, 3)
    np.testing.assert_array_equal(arr[..., 2], vol[..., 2])


def test_nifti_integer_data_is_scaled_to_float32(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "i.nii.gz"))
    arr, _ = load_volume(tmp_path / "i.nii.gz")
    assert arr.dtype == np.float32
    np.testing.assert_allclose(arr, data * 2.0 + 10.0)


@pytest.mark.parametrize("keep", [-8, -4, 0.5, 0.1])
def test_truncated_nii_gz_is_refused(tmp_path, keep):
    vol = np.random.default_rng(3).random((16, 16, 16)).astype(np.float32)
    good = save_nifti(vol, np.eye(4), tmp_path / "good.nii.gz").read_bytes()
    cut = len(good) + keep if keep < 0 else int(len(good) * keep)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(good[:cut])  # -8 keeps all data and only loses the gzip CRC/size trailer
    with pytest.raises(ImageReadError, match=r"bad\.nii\.gz: is truncated"):
        load_volume(bad)


def test_truncated_uncompressed_nii_is_refused(tmp_path):
    good = save_nifti(np.ones((8, 8, 8), np.float32), np.eye(4), tmp_path / "good.nii").read_bytes()
    (tmp_path / "bad.nii").write_bytes(good[:-10])
    with pytest.raises(ImageReadError, match=r"bad\.nii: is truncated"):
        load_volume(tmp_path / "bad.nii")


def test_gzip_that_is_not_nifti_is_refused(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_bytes(gzip.compress(b"hello, this is not an image" * 20))
    with pytest.raises(ImageReadError, match="not a NIfTI"):
        load_volume(p)


def test_non_image_and_missing_files_are_refused(tmp_path):
    txt = tmp_path / "readme.txt"
    txt.write_text("not an image\n")
    with pytest.raises(ImageReadError, match=r"readme\.txt: not a NIfTI"):
        load_volume(txt)
    with pytest.raises(ImageReadError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")


def test_empty_folder_and_folder_without_dicom_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="empty: is empty"):
        load_volume(empty)
    (empty / "notes.txt").write_text("x")
    with pytest.raises(ImageReadError, match=r"holds 1 file\(s\) but no DICOM image"):
        load_volume(empty)


def test_error_messages_are_one_line(tmp_path):
    (tmp_path / "x.nii.gz").write_bytes(b"\x1f\x8b" + b"\n" * 50)
    with pytest.raises(ImageReadError) as e:
        load_volume(tmp_path / "x.nii.gz")
    assert "\n" not in str(e.value) and "x.nii.gz" in str(e.value)


# ------------------------------------------------------------------------------------------ Analyze

def test_analyze_pair_reads_from_either_file(tmp_path):
    vol = np.random.default_rng(4).random((6, 5, 4)).astype(np.float32)
    aff = np.diag([1.0, 1.0, 1.25, 1.0])
    img = nib.AnalyzeImage(vol, aff)
    nib.save(img, str(tmp_path / "scan.img"))
    for name in ("scan.img", "scan.hdr"):
        arr, got = load_volume(tmp_path / name)
        np.testing.assert_array_equal(arr, vol)
        np.testing.assert_allclose(got, nib.load(str(tmp_path / "scan.hdr")).affine)
    data = (tmp_path / "scan.img").read_bytes()
    (tmp_path / "scan.img").write_bytes(data[:-40])
    with pytest.raises(ImageReadError, match=r"scan\.img: is not a readable Analyze image"):
        load_volume(tmp_path / "scan.img")
    (tmp_path / "scan.img").unlink()
    with pytest.raises(ImageReadError, match="pair is incomplete"):
        load_volume(tmp_path / "scan.hdr")


# -------------------------------------------------------------------------------------------- DICOM

def test_dicom_series_matches_the_volume_it_was_written_from(tmp_path):
    vol = quantised_volume((7, 5, 6))
    aff = oblique_affine()
    nifti = save_nifti(vol, aff, tmp_path / "ref.nii.gz")
    uid = write_dicom_series(tmp_path / "series", vol, aff)
    (tmp_path / "series" / "notes.txt").write_text("not DICOM")  # ignored
    arr, got, meta = read_dicom_series(tmp_path / "series")
    ref, ref_aff = load_volume(nifti)
    assert arr.shape == ref.shape and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, ref)  # voxel order and slope/intercept
    np.testing.assert_allclose(got, ref_aff, atol=1e-4)
    assert meta["series_uid"] == uid and meta["patient_id"] == "P001" and meta["n_files"] == 6
    np.testing.assert_allclose(meta["spacing"], [0.9, 1.1, 2.5], atol=1e-4)
    # the same through load_volume, from the folder and from any one of its files
    a2, f2 = load_volume(tmp_path / "series")
    a3, f3 = load_volume(sorted((tmp_path / "series").glob("*.dcm"))[3])
    np.testing.assert_array_equal(a2, ref)
    np.testing.assert_array_equal(a3, ref)
    np.testing.assert_allclose(f3, ref_aff, atol=1e-4)


def test_dicom_affine_agrees_with_the_standard_pixel_position_formula(tmp_path):
    """World position of a pixel from its own file's tags (DICOM PS3.3 C.7.6.2.1.1) = affine @ ijk."""
    vol = quantised_volume((6, 4, 5), seed=5)
    write_dicom_series(tmp_path / "s", vol, oblique_affine())
    arr, aff, _ = read_dicom_series(tmp_path / "s")
    for f in sorted((tmp_path / "s").glob("*.dcm"))[:3]:
        ds = pydicom.dcmread(str(f))
        ipp = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = 2, 3  # row r, column c of this file's pixel array
        lps = ipp + iop[:3] * dc * c + iop[3:] * dr * r
        ras = lps * [-1, -1, 1]
        ijk = np.linalg.solve(aff[:3, :3], ras - aff[:3, 3])
        i, j, k = np.rint(ijk).astype(int)
        np.testing.assert_allclose(ijk, [i, j, k], atol=1e-3)
        assert (i, j) == (c, r)
        value = ds.pixel_array[r, c] * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert arr[i, j, k] == pytest.approx(value)


def test_dicom_reader_agrees_with_monai(tmp_path):
    monai_data = pytest.importorskip("monai.data")
    vol = quantised_volume((7, 5, 6), seed=6)
    # MONAI orders slices by InstanceNumber (we use positions), so number them in position order here.
    write_dicom_series(tmp_path / "s", vol, oblique_affine(), scramble_instances=False)
    arr, aff, _ = read_dicom_series(tmp_path / "s")
    reader = monai_data.PydicomReader()
    data, meta = reader.get_data(reader.read(str(tmp_path / "s")))
    np.testing.assert_allclose(np.asarray(data), arr, atol=1e-4)
    np.testing.assert_allclose(np.asarray(meta["affine"]), aff, atol=1e-3)


def test_folder_with_several_series_asks_to_pick_one(tmp_path):
    aff = oblique_affine()
    uid1 = write_dicom_series(tmp_path / "mixed", quantised_volume((4, 4, 3), seed=1), aff, prefix="A",
                              desc="T1 axial")
    uid2 = write_dicom_series(tmp_path / "mixed", quantised_volume((4, 4, 5), seed=2), aff, prefix="B",
                              desc="T2 axial")
    with pytest.raises(ImageReadError, match=r"holds 2 DICOM series .*series_uid="):
        load_volume(tmp_path / "mixed")
    a1, _ = load_volume(tmp_path / "mixed", series_uid=uid1)
    a2, _ = load_volume(tmp_path / "mixed", series_uid=uid2)
    assert a1.shape == (4, 4, 3) and a2.shape == (4, 4, 5)
    with pytest.raises(ImageReadError, match="has no DICOM series 1.2.3"):
        load_volume(tmp_path / "mixed", series_uid="1.2.3")


def test_dicom_time_series_becomes_channels_last(tmp_path):
    vol = quantised_volume((4, 3, 5, 2), seed=7)
    write_dicom_series(tmp_path / "t", vol, oblique_affine(), time_points=2)
    arr, _, meta = read_dicom_series(tmp_path / "t")
    assert arr.shape == (4, 3, 5, 2)
    np.testing.assert_array_equal(arr, vol)


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    write_dicom_series(tmp_path / "s", quantised_volume((4, 4, 6)), oblique_affine(), shuffle=False)
    (tmp_path / "s" / "IM0003.dcm").unlink()
    with pytest.raises(ImageReadError, match="unevenly spaced slices"):
        load_volume(tmp_path / "s")


# ---------------------------------------------------------------------------------------------- PNG

def test_save_png_scales_to_uint8(tmp_path):
    from PIL import Image

    grey = np.linspace(-3.0, 5.0, 40 * 30).reshape(40, 30)
    p = save_png(grey, tmp_path / "g.png")
    back = np.asarray(Image.open(p))
    assert back.dtype == np.uint8 and back.shape == (40, 30)
    assert back.min() == 0 and back.max() == 255
    rgb = np.zeros((8, 9, 3))
    rgb[..., 0] = 0.5  # already in [0, 1]: mapped as [0, 1], not stretched
    back = np.asarray(Image.open(save_png(rgb, tmp_path / "c.png")))
    assert back.shape == (8, 9, 3) and back[0, 0, 0] == 128 and back[0, 0, 1] == 0
    assert sorted(q.name for q in tmp_path.iterdir()) == ["c.png", "g.png"]


def test_to_uint8_edge_cases():
    assert to_uint8(np.full((2, 2), 7.0)).max() == 0  # constant image
    assert to_uint8(np.array([[np.nan, 1.0], [2.0, 3.0]]))[0, 0] == 0
    np.testing.assert_array_equal(to_uint8(np.array([0, 10, 20]), vmin=0, vmax=10), [0, 255, 255])
    u = np.array([[1, 2]], np.uint8)
    assert to_uint8(u) is u
