"""Layout parsers on dataset folders the tests build: real NIfTI/DICOM/IDX/pickle/xls files."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from mrivq.datasets.layouts import KNOWN, get_layout
from mrivq.datasets.layouts.cifar import read_cifar_batch
from mrivq.datasets.layouts.idx import read_idx
from mrivq.datasets.layouts.ixi import demographics_from_rows
from mrivq.io.images import load_volume, save_nifti
from mrivq.utils.errors import CardError, ImageReadError, MrivqError


def card(layout: str, modalities=(), **options) -> SimpleNamespace:
    """Stand-in for mrivq.datasets.catalog.Card with the attributes the layouts read."""
    return SimpleNamespace(name=f"test-{layout}", layout=layout, modalities=tuple(modalities), dims=3,
                           files=(), options=options, access="open")


def tiny_nifti(path: Path, shape=(4, 4, 4), value: float = 1.0) -> Path:
    return save_nifti(np.full(shape, value, np.float32), np.eye(4), path)


def scan(layout: str, root: Path, c: SimpleNamespace) -> list[dict[str, str]]:
    return get_layout(layout).scan(root, c)


def test_every_known_layout_has_a_scan():
    for name in KNOWN:
        assert callable(get_layout(name).scan)


# ---------------------------------------------------------------------------------------------- IXI

def make_ixi(root: Path) -> None:
    part = root / "IXI-T1.tar"
    tiny_nifti(part / "IXI002-Guys-0828-T1.nii.gz")
    tiny_nifti(part / "IXI012-HH-1211-T1.nii.gz")
    tiny_nifti(part / "._IXI002-Guys-0828-T1.nii.gz")  # macOS resource fork: hidden, ignored
    tiny_nifti(root / "IXI-T2.tar" / "IXI002-Guys-0828-T2.nii.gz")
    for d in (1, 0, 10):
        tiny_nifti(root / "IXI-DTI.tar" / f"IXI002-Guys-0828-DTI-{d:02d}.nii.gz")
    tiny_nifti(root / ".staging-123" / "IXI099-IOP-0001-T1.nii.gz")  # unfinished fetch: ignored
    (root / ".mrivq").mkdir()
    (root / ".mrivq" / "IXI098-IOP-0002-T1.nii.gz").write_bytes(b"")


def test_ixi_rows_from_file_names(tmp_path):
    make_ixi(tmp_path)
    rows = scan("ixi", tmp_path, card("ixi", ["t1", "t2", "pd", "mra", "dti"]))
    assert [(r["subject"], r["modality"], r["volume"]) for r in rows] == [
        ("IXI002-Guys-0828", "dti", "0"), ("IXI002-Guys-0828", "dti", "1"), ("IXI002-Guys-0828", "dti", "10"),
        ("IXI002-Guys-0828", "t1", ""), ("IXI002-Guys-0828", "t2", ""), ("IXI012-HH-1211", "t1", "")]
    t1 = rows[3]
    assert t1["path"] == "IXI-T1.tar/IXI002-Guys-0828-T1.nii.gz"
    assert t1["site"] == "Guys" and t1["ixi_id"] == "2" and t1["sex"] == "" and t1["age"] == ""
    assert rows[5]["site"] == "HH" and rows[5]["ixi_id"] == "12"
    assert set(rows[0]) == {"subject", "modality", "path", "site", "ixi_id", "volume", "sex", "age"}
    arr, _ = load_volume(tmp_path / t1["path"])
    assert arr.shape == (4, 4, 4)


def test_ixi_restricts_to_card_modalities(tmp_path):
    make_ixi(tmp_path)
    rows = scan("ixi", tmp_path, card("ixi", ["t1"]))
    assert {r["modality"] for r in rows} == {"t1"} and len(rows) == 2


IXI_HEADER = ["IXI_ID", "SEX_ID (1=m, 2=f)", "HEIGHT", "WEIGHT", "ETHNIC_ID", "DOB", "STUDY_DATE", "AGE"]
IXI_ROWS = [
    [2.0, 2.0, 164.0, 58.0, 1.0, "", "", 35.8001369],
    [12.0, 1.0, 175.0, 70.0, 1.0, "", "", 38.78],
    [12.0, 1.0, 175.0, 70.0, 1.0, "", "", ""],  # duplicate IXI_ID without an age
    [13.0, 1.0, 180.0, 80.0, 1.0, "", "", ""],  # duplicate whose first row lacks the age ...
    [13.0, 1.0, 180.0, 80.0, 1.0, "", "", 46.5],  # ... and the second has it: prefer this one
]


def test_ixi_demographics_from_rows_deduplicates():
    demo = demographics_from_rows(IXI_HEADER, IXI_ROWS)
    assert demo == {2: {"sex": "F", "age": "35.80"}, 12: {"sex": "M", "age": "38.78"},
                    13: {"sex": "M", "age": "46.50"}}
    with pytest.raises(ValueError, match="IXI_ID"):
        demographics_from_rows(["ID", "AGE"], [])


def test_ixi_xls_adds_sex_and_age(tmp_path):
    import xlwt  # test extra: writes the legacy .xls the layout reads back with xlrd
    make_ixi(tmp_path)
    book = xlwt.Workbook()
    sheet = book.add_sheet("Table")
    for i, row in enumerate([IXI_HEADER, *IXI_ROWS]):
        for j, v in enumerate(row):
            sheet.write(i, j, v)
    book.save(str(tmp_path / "IXI.xls"))
    rows = scan("ixi", tmp_path, card("ixi", ["t1"]))
    got = {r["subject"]: (r["sex"], r["age"]) for r in rows}
    assert got == {"IXI002-Guys-0828": ("F", "35.80"), "IXI012-HH-1211": ("M", "38.78")}


def test_ixi_corrupt_xls_is_reported(tmp_path):
    make_ixi(tmp_path)
    (tmp_path / "IXI.xls").write_bytes(b"this is not a spreadsheet")
    with pytest.raises(MrivqError, match=r"IXI\.xls: cannot be read"):
        scan("ixi", tmp_path, card("ixi", ["t1"]))


# ---------------------------------------------------------------------------------------------- MSD

def make_msd(root: Path) -> Path:
    task = root / "Task01_BrainTumour.tar" / "Task01_BrainTumour"
    vol = np.stack([np.full((3, 4, 5), c, np.float32) for c in range(4)], axis=-1)
    for i in (1, 2):
        save_nifti(vol + 10 * i, np.eye(4), task / "imagesTr" / f"BRATS_{i:03d}.nii.gz")
        tiny_nifti(task / "labelsTr" / f"BRATS_{i:03d}.nii.gz", (3, 4, 5), 0)
    save_nifti(vol, np.eye(4), task / "imagesTs" / "BRATS_100.nii.gz")
    meta = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "training": [{"image": f"./imagesTr/BRATS_{i:03d}.nii.gz", "label": f"./labelsTr/BRATS_{i:03d}.nii.gz"}
                         for i in (1, 2)],
            "test": ["./imagesTs/BRATS_100.nii.gz"]}
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


def test_msd_split_channels(tmp_path):
    make_msd(tmp_path)
    rows = scan("msd", tmp_path, card("msd", ["flair", "t1w", "t1gd", "t2w"]))
    assert len(rows) == 12
    first = rows[0]
    assert first["subject"] == "BRATS_001" and first["modality"] == "flair" and first["channel"] == "0"
    assert first["path"] == "Task01_BrainTumour.tar/Task01_BrainTumour/imagesTr/BRATS_001.nii.gz"
    assert first["label"] == "Task01_BrainTumour.tar/Task01_BrainTumour/labelsTr/BRATS_001.nii.gz"
    assert first["split"] == "train"
    test_rows = [r for r in rows if r["split"] == "test"]
    assert len(test_rows) == 4 and all(r["label"] == "" for r in test_rows)
    t1gd = next(r for r in rows if r["subject"] == "BRATS_002" and r["modality"] == "t1gd")
    arr, _ = load_volume(tmp_path / t1gd["path"])
    assert arr.shape == (3, 4, 5, 4)
    assert np.all(arr[..., int(t1gd["channel"])] == 22.0)


def test_msd_channel_selection_and_card_filter(tmp_path):
    make_msd(tmp_path)
    rows = scan("msd", tmp_path, card("msd", [], channels=["T2w", "flair"]))
    assert sorted({(r["modality"], r["channel"]) for r in rows}) == [("flair", "0"), ("t2w", "3")]
    rows = scan("msd", tmp_path, card("msd", ["t1w"]))
    assert {r["modality"] for r in rows} == {"t1w"} and len(rows) == 3
    with pytest.raises(CardError, match="'channels' names 'adc'"):
        scan("msd", tmp_path, card("msd", [], channels=["adc"]))


def test_msd_kept_as_multichannel(tmp_path):
    make_msd(tmp_path)
    rows = scan("msd", tmp_path, card("msd", ["flair", "t1w", "t1gd", "t2w"], split_channels=False))
    assert len(rows) == 3
    assert {r["modality"] for r in rows} == {"multi"}
    assert rows[0]["channels"] == "FLAIR;T1w;t1gd;T2w" and rows[0]["channel"] == ""
    with pytest.raises(CardError, match="split_channels: true"):
        scan("msd", tmp_path, card("msd", [], split_channels=False, channels=["flair"]))


def test_msd_single_channel_task_and_missing_files(tmp_path):
    task = tmp_path / "Task04_Hippocampus"
    tiny_nifti(task / "imagesTr" / "hippocampus_001.nii.gz")
    meta = {"modality": {"0": "MRI"}, "training": [{"image": "./imagesTr/hippocampus_001.nii.gz",
                                                     "label": "./labelsTr/hippocampus_001.nii.gz"}]}
    (task / "dataset.json").write_text(json.dumps(meta))
    rows = scan("msd", tmp_path, card("msd", ["mri"]))
    assert [(r["subject"], r["modality"], r["channel"], r["label"]) for r in rows] == [
        ("hippocampus_001", "mri", "", "")]
    # the shipped card calls the only channel t1 (dataset.json says MRI): a full list renames
    rows = scan("msd", tmp_path, card("msd", ["t1"], channels=["t1"]))
    assert [(r["subject"], r["modality"]) for r in rows] == [("hippocampus_001", "t1")]
    meta["training"].append({"image": "./imagesTr/hippocampus_002.nii.gz"})
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(MrivqError, match="1 listed image"):
        scan("msd", tmp_path, card("msd", ["mri"]))


# ---------------------------------------------------------------------------------------------- IDX

def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    code = {np.uint8: 0x08, np.int16: 0x0B, np.float32: 0x0D}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_mnist(root: Path, n_train=5, n_test=3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train, dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz" / "train-images-idx3-ubyte.gz", imgs)
    write_idx(root / "train-labels-idx1-ubyte.gz" / "train-labels-idx1-ubyte.gz", labels)
    write_idx(root / "t10k" / "t10k-images-idx3-ubyte.gz", imgs[:n_test])
    write_idx(root / "t10k" / "t10k-labels-idx1-ubyte.gz", labels[:n_test])
    return imgs, labels


def test_read_idx_round_trip_and_dtypes(tmp_path):
    a = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 5
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.idx", a, compress=False)), a)
    f = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    got = read_idx(write_idx(tmp_path / "f.idx.gz", f))
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, f)


def test_read_idx_refuses_bad_magic_and_truncation(tmp_path):
    imgs = np.zeros((4, 28, 28), np.uint8)
    good = write_idx(tmp_path / "ok.gz", imgs).read_bytes()
    raw = gzip.decompress(good)
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x08\x08" + raw[2:]))
    with pytest.raises(ImageReadError, match=r"magic\.gz: is not an IDX file"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ImageReadError, match="data bytes but its header"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "cut.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageReadError, match="truncated or not valid gzip"):
        read_idx(tmp_path / "cut.gz")


def test_idx_scan_rows(tmp_path):
    imgs, labels = make_mnist(tmp_path)
    rows = scan("idx", tmp_path, card("idx", ["image"]))
    assert len(rows) == 8
    assert [r["subject"] for r in rows[:4]] == ["test-00000", "test-00001", "test-00002", "train-00000"]
    r = next(r for r in rows if r["subject"] == "train-00003")
    assert r == {"subject": "train-00003", "modality": "image",
                 "path": "train-images-idx3-ubyte.gz/train-images-idx3-ubyte.gz", "index": "3",
                 "label": str(int(labels[3])), "split": "train"}
    np.testing.assert_array_equal(read_idx(tmp_path / r["path"])[int(r["index"])], imgs[3])


def test_idx_label_count_mismatch(tmp_path):
    make_mnist(tmp_path)
    write_idx(tmp_path / "t10k" / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    with pytest.raises(MrivqError, match="2 labels for 3 images"):
        scan("idx", tmp_path, card("idx", ["image"]))


# -------------------------------------------------------------------------------------------- CIFAR

def write_cifar_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # protocol 2 with bytes keys, like the published batches
        pickle.dump({b"batch_label": b"batch", b"labels": labels, b"data": data,
                     b"filenames": [b"x.png"] * n}, fh, protocol=2)
    return data, labels


def test_read_cifar_batch_layout(tmp_path):
    data, labels = write_cifar_batch(tmp_path / "data_batch_1", 3, 0)
    imgs, labs = read_cifar_batch(tmp_path / "data_batch_1")
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    assert labs.tolist() == labels
    # pixel (row 1, col 2) of image 0: red at 32*1+2, green 1024 later, blue 2048 later
    assert imgs[0, 1, 2].tolist() == [data[0, 34], data[0, 1024 + 34], data[0, 2048 + 34]]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ImageReadError, match=r"data_batch_1: is not a plain CIFAR batch .*refused"):
        read_cifar_batch(p)
    assert not (tmp_path / "PWNED").exists()
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros(3)}, protocol=2)[:-5])
    with pytest.raises(ImageReadError, match="not a readable CIFAR batch"):
        read_cifar_batch(tmp_path / "test_batch")


def test_cifar_scan_rows(tmp_path):
    folder = tmp_path / "cifar-10-python.tar.gz" / "cifar-10-batches-py"
    for b in (1, 2):
        write_cifar_batch(folder / f"data_batch_{b}", 3, b)
    _, test_labels = write_cifar_batch(folder / "test_batch", 2, 9)
    (folder / "batches.meta").write_bytes(b"meta")
    rows = scan("cifar", tmp_path, card("cifar", ["image"]))
    assert len(rows) == 8
    train = [r for r in rows if r["split"] == "train"]
    assert [r["subject"] for r in train] == [f"train-{i:05d}" for i in range(6)]
    assert train[4]["path"].endswith("cifar-10-batches-py/data_batch_2") and train[4]["index"] == "1"
    tests = [r for r in rows if r["split"] == "test"]
    assert [r["label"] for r in tests] == [str(v) for v in test_labels]


# ------------------------------------------------------------------------------------- nifti-folder

def test_nifti_folder_flat(tmp_path):
    tiny_nifti(tmp_path / "data" / "a.nii.gz")
    tiny_nifti(tmp_path / "data" / "b.nii")
    (tmp_path / "data" / "notes.txt").write_text("x")
    rows = scan("nifti-folder", tmp_path, card("nifti-folder", ["t1"]))
    assert [(r["subject"], r["modality"], r["path"]) for r in rows] == [
        ("a", "t1", "data/a.nii.gz"), ("b", "t1", "data/b.nii")]


def test_nifti_folder_ixi_tiny_images_and_labels(tmp_path):
    base = tmp_path / "ixi_tiny.zip" / "ixi_tiny"
    for s in ("IXI002-Guys-0828", "IXI012-HH-1211"):
        tiny_nifti(base / "image" / f"{s}_image.nii.gz")
        tiny_nifti(base / "label" / f"{s}_label.nii.gz")
    tiny_nifti(base / "image" / "IXI013-HH-1212_image.nii.gz")  # no label
    rows = scan("nifti-folder", tmp_path, card("nifti-folder", ["t1"], images_dir="image", labels_dir="label"))
    assert [(r["subject"], r["label"]) for r in rows] == [
        ("IXI002-Guys-0828", "ixi_tiny.zip/ixi_tiny/label/IXI002-Guys-0828_label.nii.gz"),
        ("IXI012-HH-1211", "ixi_tiny.zip/ixi_tiny/label/IXI012-HH-1211_label.nii.gz"),
        ("IXI013-HH-1212", "")]
    # the shipped card's spelling: image_dir/label_dir + a subject pattern whose groups become columns
    rows = scan("nifti-folder", tmp_path, card(
        "nifti-folder", ["t1"], image_dir="image", label_dir="label", image_suffix="_image",
        label_suffix="_label",
        subject_pattern=r"^(?P<subject>IXI\d{3})-(?P<site>Guys|HH|IOP)-(?P<session>\d{4})_(?:image|label)"))
    assert [(r["subject"], r["site"], r["session"], r["label"] != "") for r in rows] == [
        ("IXI002", "Guys", "0828", True), ("IXI012", "HH", "1211", True), ("IXI013", "HH", "1212", False)]


def test_nifti_folder_modality_from_name_and_duplicates(tmp_path):
    for s in ("sub01", "sub02"):
        for m in ("T1", "T2"):
            tiny_nifti(tmp_path / s / f"{s}_{m}.nii.gz")
    tiny_nifti(tmp_path / "sub02" / "sub02_dwi.nii.gz")  # no match: left out
    rows = scan("nifti-folder", tmp_path, card("nifti-folder", ["t1", "t2"], modality_from_name=r"_(T1|T2)\."))
    assert [(r["subject"], r["modality"]) for r in rows] == [
        ("sub01", "t1"), ("sub01", "t2"), ("sub02", "t1"), ("sub02", "t2")]
    # equally named files in nested folders get their relative path as subject
    tiny_nifti(tmp_path / "x" / "anat" / "T1w.nii.gz")
    tiny_nifti(tmp_path / "y" / "anat" / "T1w.nii.gz")
    rows = scan("nifti-folder", tmp_path / "x" / "..", card("nifti-folder", ["t1"], image="anat/T1w.nii.gz"))
    assert [r["subject"] for r in rows] == ["x/anat/T1w", "y/anat/T1w"]


def test_nifti_folder_bad_regex_is_a_card_error(tmp_path):
    tiny_nifti(tmp_path / "a.nii.gz")
    with pytest.raises(CardError, match="modality_from_name"):
        scan("nifti-folder", tmp_path, card("nifti-folder", ["t1"], modality_from_name="(unclosed"))


# -------------------------------------------------------------------------------------------- DICOM

def test_dicom_layout_one_row_per_series(tmp_path):
    from tests.helpers import oblique_affine, quantised_volume, write_dicom_series

    aff = oblique_affine()
    uid_t1 = write_dicom_series(tmp_path / "part" / "P001" / "study" / "s1", quantised_volume((4, 4, 3)), aff,
                                desc="T1 MPRAGE", patient="P001")
    uid_t2 = write_dicom_series(tmp_path / "part" / "P001" / "study" / "s1", quantised_volume((4, 4, 5)), aff,
                                desc="T2 TSE", patient="P001", prefix="B")
    write_dicom_series(tmp_path / "part" / "P002" / "loc", quantised_volume((4, 4, 2)), aff, desc="Localizer",
                       patient="")
    rows = scan("dicom", tmp_path, card("dicom", ["t1", "t2"], series_modalities={"t1": "t1", "t2": "t2"},
                                        skip_series=["localizer"]))
    assert [(r["subject"], r["modality"], r["series_uid"]) for r in rows] == [
        ("P001", "t1", uid_t1), ("P001", "t2", uid_t2)]
    assert rows[0]["path"] == "part/P001/study/s1" and rows[0]["n_images"] == "3"
    arr, _ = load_volume(tmp_path / rows[1]["path"], series_uid=rows[1]["series_uid"])
    assert arr.shape == (4, 4, 5)
    # without a mapping: every series gets the card's first modality; no PatientID -> folder name
    rows = scan("dicom", tmp_path, card("dicom", ["t1"]))
    assert [(r["subject"], r["modality"]) for r in rows] == [("P001", "t1"), ("P001", "t1"), ("loc", "t1")]


# ------------------------------------------------------------------------------------------ phantom

def test_phantom_layout_rows_labels_and_covariates(tmp_path):
    for s in ("sub-0000", "sub-0001"):
        for m in ("t1", "t2"):
            tiny_nifti(tmp_path / s / f"{s}_{m}.nii.gz")
        tiny_nifti(tmp_path / s / f"{s}_labels.nii.gz")
    (tmp_path / "phantom.json").write_text(json.dumps(
        {"seed": 0, "subjects": [{"subject": "sub-0000", "sex": "F", "age": 42.5}]}))
    (tmp_path / "sub-0001" / "sub-0001.json").write_text(json.dumps({"sex": "M", "age": 61.0}))
    rows = scan("phantom", tmp_path, card("phantom", ["t1", "t2", "pd"]))
    assert [(r["subject"], r["modality"], r["sex"], r["age"]) for r in rows] == [
        ("sub-0000", "t1", "F", "42.5"), ("sub-0000", "t2", "F", "42.5"),
        ("sub-0001", "t1", "M", "61.0"), ("sub-0001", "t2", "M", "61.0")]
    assert rows[0]["label"] == "sub-0000/sub-0000_labels.nii.gz"
    assert rows[0]["path"] == "sub-0000/sub-0000_t1.nii.gz"
    assert len(scan("phantom", tmp_path, card("phantom", ["t2"]))) == 2


def test_phantom_layout_reads_what_write_dataset_writes(tmp_path):
    import mrivq.datasets.phantom as phantom
    if not hasattr(phantom, "write_dataset"):
        raise AssertionError("mrivq.datasets.phantom.write_dataset is missing")
    import inspect

    params = inspect.signature(phantom.write_dataset).parameters
    kwargs = {k: v for k, v in {"count": 2, "shape": (16, 16, 16), "spacing": 6.0}.items() if k in params}
    phantom.write_dataset(tmp_path, **kwargs)
    rows = scan("phantom", tmp_path, card("phantom", []))
    assert {r["subject"] for r in rows} == {"sub-0000", "sub-0001"}
    assert all(r["label"] and r["sex"] in ("M", "F") and r["age"] for r in rows)
    arr, _ = load_volume(tmp_path / rows[0]["path"])
    assert arr.ndim == 3


# -------------------------------------------------------------------------------------------- OASIS

def test_oasis_layout(tmp_path):
    for sid, sess in (("0001", 1), ("0002", 1), ("0002", 2)):
        name = f"OAS1_{sid}_MR{sess}"
        folder = tmp_path / "disc1.tar.gz" / "disc1" / name / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        img = nib.AnalyzeImage(np.full((4, 5, 3), float(sess), np.float32), np.eye(4))
        nib.save(img, str(folder / f"{name}_mpr_n4_anon_111_t88_masked_gfc.img"))
        nib.save(img, str(folder / f"{name}_mpr_n4_anon_111_t88_gfc.img"))  # unmasked variant: not used
        seg = tmp_path / "disc1.tar.gz" / "disc1" / name / "FSL_SEG"
        seg.mkdir(parents=True)
        nib.save(img, str(seg / f"{name}_mpr_n4_anon_111_t88_masked_gfc_fseg.img"))
    (tmp_path / "oasis_cross-sectional.csv").write_text(
        "ID,M/F,Hand,Age,Educ\nOAS1_0001_MR1,F,R,74,2\nOAS1_0002_MR1,M,R,55,4\n")
    rows = scan("oasis", tmp_path, card("oasis", ["t1"]))
    assert [(r["subject"], r["session"], r["sex"], r["age"]) for r in rows] == [
        ("OAS1_0001", "MR1", "F", "74"), ("OAS1_0002", "MR1", "M", "55"), ("OAS1_0002", "MR2", "", "")]
    assert rows[0]["path"].endswith("T88_111/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img")
    assert rows[0]["label"].endswith("FSL_SEG/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc_fseg.img")
    arr, _ = load_volume(tmp_path / rows[2]["path"])
    assert arr.shape == (4, 5, 3) and arr.max() == 2.0
    rows = scan("oasis", tmp_path, card("oasis", ["t1"], variant="t88"))
    assert all(r["path"].endswith("_t88_gfc.img") for r in rows)


# --------------------------------------------------------------------------------------- MNI / BraTS

def test_mni152_layout(tmp_path):
    base = tmp_path / "mni.zip" / "mni_icbm152_nlin_sym_09a"
    for kind in ("t1", "t2", "pd", "gm", "t1_tal_nlin_sym_09a_mask"):
        name = f"mni_icbm152_{kind}_tal_nlin_sym_09a.nii" if "mask" not in kind else f"mni_icbm152_{kind}.nii"
        tiny_nifti(base / name)
    rows = scan("mni152", tmp_path, card("mni152", ["t1", "t2", "pd"]))
    assert [(r["subject"], r["modality"]) for r in rows] == [("mni152", "pd"), ("mni152", "t1"), ("mni152", "t2")]
    assert all(r["mask"].endswith("mni_icbm152_t1_tal_nlin_sym_09a_mask.nii") for r in rows)


def test_brats_layout(tmp_path):
    for case in ("BraTS2021_00000", "BraTS2021_00002"):
        for m in ("t1", "t1ce", "t2", "flair", "seg"):
            tiny_nifti(tmp_path / "train" / case / f"{case}_{m}.nii.gz")
    for m in ("t1n", "t1c", "t2w", "t2f", "seg"):  # BraTS 2023 naming
        tiny_nifti(tmp_path / "2023" / "BraTS-GLI-00001-000" / f"BraTS-GLI-00001-000-{m}.nii.gz")
    rows = scan("brats", tmp_path, card("brats", ["t1", "t1ce", "t2", "flair"]))
    assert len(rows) == 12
    by = {(r["subject"], r["modality"]): r for r in rows}
    assert by[("BraTS2021_00000", "t1ce")]["path"] == "train/BraTS2021_00000/BraTS2021_00000_t1ce.nii.gz"
    assert by[("BraTS2021_00000", "t1ce")]["label"] == "train/BraTS2021_00000/BraTS2021_00000_seg.nii.gz"
    assert by[("BraTS-GLI-00001-000", "flair")]["path"].endswith("BraTS-GLI-00001-000-t2f.nii.gz")
    assert len(scan("brats", tmp_path, card("brats", ["flair"]))) == 3


def test_idx_and_cifar_follow_file_names_given_by_the_card(tmp_path):
    make_mnist(tmp_path / "m")
    splits = {"train": {"images": "train-images-idx3-ubyte.gz", "labels": "train-labels-idx1-ubyte.gz"}}
    rows = scan("idx", tmp_path / "m", card("idx", ["image"], splits=splits))
    assert {r["split"] for r in rows} == {"train"} and len(rows) == 5 and rows[0]["label"] != ""
    folder = tmp_path / "c" / "cifar-10-batches-py"
    write_cifar_batch(folder / "data_batch_1", 2, 1)
    write_cifar_batch(folder / "data_batch_2", 2, 2)
    rows = scan("cifar", tmp_path / "c", card("cifar", ["image"], train_batches={"data_batch_2": "0" * 32}))
    assert [r["path"].rsplit("/", 1)[1] for r in rows] == ["data_batch_2"] * 2


# ----------------------------------------------------------------- the shipped cards' own options

def _tree_for(name: str, root: Path) -> None:
    if name == "ixi":
        make_ixi(root)
    elif name == "ixi-tiny":
        for s in ("IXI002-Guys-0828", "IXI012-HH-1211"):
            tiny_nifti(root / "ixi_tiny" / "image" / f"{s}_image.nii.gz")
            tiny_nifti(root / "ixi_tiny" / "label" / f"{s}_label.nii.gz")
    elif name == "msd-brain-tumour":
        make_msd(root)
    elif name == "msd-hippocampus":
        task = root / "Task04_Hippocampus"
        tiny_nifti(task / "imagesTr" / "hippocampus_001.nii.gz")
        tiny_nifti(task / "labelsTr" / "hippocampus_001.nii.gz")
        (task / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "training": [
            {"image": "./imagesTr/hippocampus_001.nii.gz", "label": "./labelsTr/hippocampus_001.nii.gz"}]}))
    elif name in ("mnist", "fashion-mnist"):
        make_mnist(root)
    elif name == "cifar10":
        write_cifar_batch(root / "cifar-10-batches-py" / "data_batch_1", 2, 0)
        write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", 2, 1)
    elif name == "mni152":
        for k in ("t1", "t2", "pd"):
            tiny_nifti(root / "mni_icbm152_nlin_sym_09a" / f"mni_icbm152_{k}_tal_nlin_sym_09a.nii")
    elif name == "brats":
        for m in ("t1", "t1ce", "t2", "flair", "seg"):
            tiny_nifti(root / "BraTS2021_00000" / f"BraTS2021_00000_{m}.nii.gz")
    elif name == "oasis1":
        folder = root / "disc1" / "OAS1_0001_MR1" / "PROCESSED" / "MPRAGE" / "T88_111"
        folder.mkdir(parents=True)
        nib.save(nib.AnalyzeImage(np.ones((3, 3, 3), np.float32), np.eye(4)),
                 str(folder / "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img"))
    elif name == "phantom":
        for m in ("t1", "t2", "pd", "labels"):
            tiny_nifti(root / "sub-0000" / f"sub-0000_{m}.nii.gz")


SHIPPED = ["ixi", "ixi-tiny", "msd-brain-tumour", "msd-hippocampus", "mnist", "fashion-mnist", "cifar10",
           "mni152", "brats", "oasis1", "phantom"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cards_options_work_with_their_layout(tmp_path, name):
    import mrivq.datasets.catalog as catalog
    c = catalog.get_card(name)
    _tree_for(name, tmp_path)
    rows = get_layout(c.layout).scan(tmp_path, c)
    assert rows, f"{name}: no rows"
    mods = {r["modality"] for r in rows}
    assert mods <= set(c.modalities), (name, mods, c.modalities)
    for r in rows:
        assert (tmp_path / r["path"]).exists() and not r["path"].startswith("/")
