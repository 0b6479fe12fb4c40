"""mrivq.data: manifest -> MONAI transforms -> datasets, and restore() back to an input's geometry.

Every image here is a real file written by the test (NIfTI with nibabel, gzip IDX, CIFAR pickle, PNG).
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
import struct
from pathlib import Path

import nibabel as nib  # noqa: E402
import numpy as np
import pytest
import torch

from mrivq.data.datasets import make_dataset
from mrivq.data.intensity import dataset_intensity_stats, intensity_range, synth_geometry, to_intensity
from mrivq.data.manifest import load_manifest, select_rows, split_subjects
from mrivq.data.preprocess import Preprocess
from mrivq.data.readers import ARRAYS
from mrivq.data.restore import preprocess_file, restore, slices_to_volume, to_input_dtype, volume_to_slices
from mrivq.data.transforms import central_slices
from mrivq.utils.errors import ImageReadError, MrivqError  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def oblique_lps_affine(spacing=(1.2, 0.9, 1.5), theta=0.3, origin=(10.0, -20.0, 5.0)) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = np.diag([-1, -1, 1]) @ rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def smooth_volume(shape, seed=0, scale=1000.0) -> np.ndarray:
    """A smooth, asymmetric blob pattern (distinct along each axis and direction)."""
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    v = np.zeros(shape)
    for _ in range(3):
        c = rng.uniform(-0.5, 0.5, 3)
        w = rng.uniform(2, 5)
        v += np.exp(-w * sum((gi - ci) ** 2 for gi, ci in zip(g, c, strict=True)))
    v += 0.3 * (g[0] + 1) + 0.1 * (g[1] + 1) ** 2  # a ramp, so flips show
    return (v / v.max() * scale).astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def stored(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def write_manifest(ds: Path, rows: list[dict]) -> None:
    cols = ["subject", "modality", "path"]
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(ds / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def make_volume_dataset(ds: Path, n=4, shape=(24, 22, 18), spacing=(2.0, 2.0, 2.0), modalities=("t1",)):
    ds.mkdir(parents=True, exist_ok=True)
    rows = []
    aff = np.diag(list(spacing) + [1.0])
    for i in range(n):
        for k, m in enumerate(modalities):
            rel = f"sub{i:02d}/{m}.nii.gz"
            write_nifti(ds / rel, smooth_volume(shape, seed=10 * i + k, scale=500 + 100 * i), aff)
            rows.append({"subject": f"sub{i:02d}", "modality": m, "path": rel, "site": "HH"})
    write_manifest(ds, rows)
    return rows


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    return float(10 * np.log10(peak**2 / np.mean((a - b) ** 2)))


# ----------------------------------------------------------------------------------------------------
# Preprocess config
# ----------------------------------------------------------------------------------------------------


def test_preprocess_dict_roundtrip_and_json():
    pre = Preprocess(dims=2, modalities=["t1", "t2"], spacing=[1.0, 1.0], shape=[64, 64], divisible_by=8)
    d = pre.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert Preprocess.from_dict(d) == pre
    # a config's data section carries other keys too (dataset limits): ignored, not an error
    assert Preprocess.from_dict({**d, "max_subjects": 3}) == pre
    assert Preprocess.from_dict({"modalities": "t2"}).modalities == ["t2"]


@pytest.mark.parametrize("kw, word", [
    ({"dims": 4}, "dims"),
    ({"shape": [30, 32, 32]}, "divisible"),
    ({"shape": [32, 32]}, "shape"),
    ({"spacing": [1.0, -1.0, 1.0]}, "spacing"),
    ({"percentiles": [99, 1]}, "percentiles"),
    ({"orientation": "RAR"}, "orientation"),
    ({"modalities": []}, "modalities"),
    ({"divisible_by": 0}, "divisible_by"),
])
def test_preprocess_validate_rejects(kw, word):
    with pytest.raises(MrivqError, match=word):
        Preprocess(**kw).validate()


# ----------------------------------------------------------------------------------------------------
# manifest, selection, split
# ----------------------------------------------------------------------------------------------------


def test_missing_manifest_says_fetch(tmp_path):
    with pytest.raises(MrivqError, match="mrivq fetch ixi"):
        load_manifest(tmp_path / "ixi")


def test_select_rows_lists_available_modalities(tmp_path):
    rows = make_volume_dataset(tmp_path / "ds", n=2, modalities=("t1", "pd"))
    with pytest.raises(MrivqError) as e:
        select_rows(rows, ["t2"])
    assert "t2" in str(e.value) and "pd" in str(e.value) and "t1" in str(e.value)


def test_select_rows_keeps_subjects_with_all_modalities(tmp_path):
    rows = [
        {"subject": "a", "modality": "t1", "path": "a1"}, {"subject": "a", "modality": "t2", "path": "a2"},
        {"subject": "b", "modality": "t1", "path": "b1"},
        {"subject": "c", "modality": "t2", "path": "c2"}, {"subject": "c", "modality": "t1", "path": "c1"},
    ]
    items = select_rows(rows, ["t2", "t1"])
    assert [it["subject"] for it in items] == ["a", "c"]
    assert [s["path"] for s in items[1]["sources"]] == ["c2", "c1"]  # in the requested order
    with pytest.raises(MrivqError, match="no subject has all"):
        select_rows(rows[2:3] + rows[3:4], ["t1", "t2"])


def test_split_by_subject_is_deterministic_and_disjoint():
    rows = [{"subject": f"s{i:03d}", "modality": m, "path": f"{i}{m}"} for i in range(50) for m in ("t1", "t2")]
    tr, va = split_subjects(rows, 0.2, seed=3)
    tr_s, va_s = {r["subject"] for r in tr}, {r["subject"] for r in va}
    assert not tr_s & va_s and len(tr_s | va_s) == 50 and len(va_s) == 10
    assert len(tr) + len(va) == len(rows)  # both modalities of a subject on the same side
    # deterministic, and independent of the order of the rows
    tr2, va2 = split_subjects(list(reversed(rows)), 0.2, seed=3)
    assert {r["subject"] for r in va2} == va_s
    assert {r["subject"] for r in split_subjects(rows, 0.2, seed=4)[1]} != va_s
    # tiny datasets still get one validation subject
    assert len(split_subjects(rows[:4], 0.1, seed=0)[1]) == 2


def test_split_uses_split_column():
    rows = [{"subject": f"i{i}", "modality": "digit", "path": "x", "index": str(i),
             "split": "train" if i < 6 else "test"} for i in range(8)]
    tr, va = split_subjects(rows, 0.5, seed=0)
    assert [r["subject"] for r in va] == ["i6", "i7"] and len(tr) == 6
    tr, va = split_subjects(rows, 0.5, seed=0, split_column=False)
    assert len(va) == 4


# ----------------------------------------------------------------------------------------------------
# 3D datasets
# ----------------------------------------------------------------------------------------------------


def test_dataset_items_divisible_and_in_unit_range(tmp_path):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=3, shape=(25, 22, 19), spacing=(1.5, 1.5, 1.5))
    pre = Preprocess(spacing=[2.0, 2.0, 2.0], divisible_by=8)
    dset = make_dataset(load_manifest(ds), ds, pre, cache="memory")
    assert len(dset) == 3
    for i in range(len(dset)):
        it = dset[i]
        assert it["subject"] == rows[i]["subject"] and "label" not in it
        x = it["image"]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.shape[0] == 1
        assert all(s % 8 == 0 for s in x.shape[1:])
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    # the uncached dataset gives the same items
    plain = make_dataset(rows, ds, pre, cache="none")
    assert torch.equal(plain[1]["image"], dset[1]["image"])
    # and a torch DataLoader batches them
    batch = next(iter(torch.utils.data.DataLoader(dset, batch_size=2)))
    assert batch["image"].shape[:2] == (2, 1) and batch["subject"] == ["sub00", "sub01"]


def test_orientation_lps_file_becomes_ras(tmp_path):
    vol = smooth_volume((20, 16, 12))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [19.0, 15.0, 0.0]
    path = write_nifti(tmp_path / "lps.nii.gz", vol, lps)
    x, ctx = preprocess_file(path, Preprocess(spacing=None, clip=False, percentiles=[0, 100]))
    aff = np.asarray(ctx["preprocessed_affine"])
    assert np.allclose(aff[:3, :3], np.eye(3))  # RAS, axes in order
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    canon = nib.as_closest_canonical(nib.load(str(path)))
    ref = np.asarray(canon.get_fdata())
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    assert x.shape == (1, 20, 16, 12)
    assert np.allclose(x[0].numpy(), ref, atol=1e-5)
    assert np.allclose(aff, canon.affine, atol=1e-5)


def test_spacing_resample_changes_shape(tmp_path):
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    path = write_nifti(tmp_path / "a.nii.gz", smooth_volume((40, 32, 10)), aff)
    x, ctx = preprocess_file(path, Preprocess(spacing=[2.0, 2.0, 2.0], divisible_by=1))
    # MONAI sizes the new grid by the extent between the outer voxel centres: (n - 1) * old / new + 1
    assert tuple(x.shape) == (1, 20, 16, 14)
    assert np.allclose(np.abs(np.diag(np.asarray(ctx["preprocessed_affine"]))[:3]), [2, 2, 2])
    x4, _ = preprocess_file(path, Preprocess(spacing=[2.0, 2.0, 2.0], divisible_by=4))
    assert tuple(x4.shape) == (1, 20, 16, 16)  # 14 padded to 16
    xs, _ = preprocess_file(path, Preprocess(spacing=[2.0, 2.0, 2.0], shape=[16, 16, 16]))
    assert tuple(xs.shape) == (1, 16, 16, 16)


@pytest.mark.parametrize("method", ["monai", "resample"])
def test_restore_round_trip_same_spacing(tmp_path, method):
    """Oblique LPS file, odd shape -> preprocess (RAS, padding) -> restore: original shape and
    affine exactly, voxels essentially unchanged (no resampling happened)."""
    shape = (37, 41, 23)
    path = write_nifti(tmp_path / "obl.nii.gz", smooth_volume(shape, scale=800), oblique_lps_affine(),
                       dtype=np.int16)
    vol, aff = stored(path)
    pre = Preprocess(spacing=None, clip=False, divisible_by=8)
    x, ctx = preprocess_file(path, pre)
    assert all(s % 8 == 0 for s in x.shape[1:]) and tuple(x.shape[1:]) != shape
    ctx = json.loads(json.dumps(ctx))  # JSON-able: can be stored inside codes.npz
    assert ctx["dtype"] == "int16"
    out, out_aff = restore(x, ctx, method=method)
    assert out.shape == shape and out.dtype == np.float32
    assert np.array_equal(out_aff, aff)
    assert psnr(out, vol, vol.max()) > 80
    assert np.array_equal(to_input_dtype(out, ctx), vol.astype(np.int16))


@pytest.mark.parametrize("method", ["monai", "resample"])
def test_restore_round_trip_with_resampling(tmp_path, method):
    shape = (37, 41, 23)
    path = write_nifti(tmp_path / "obl.nii.gz", smooth_volume(shape, scale=800), oblique_lps_affine())
    vol, aff = stored(path)
    pre = Preprocess(spacing=[1.0, 1.0, 1.0], clip=False)
    x, ctx = preprocess_file(path, pre)
    out, out_aff = restore(x, ctx, method=method)
    assert out.shape == shape and np.array_equal(out_aff, aff)
    assert psnr(out, vol, vol.max()) > 40
    # intensity scale is the input's, not [0, 1]
    assert abs(out.mean() - vol.mean()) < 0.01 * vol.max()
    # restoring with the crop/pad variant too
    x2, ctx2 = preprocess_file(path, Preprocess(spacing=[2.0, 2.0, 2.0], shape=[24, 24, 16], clip=False))
    assert tuple(x2.shape) == (1, 24, 24, 16)
    out2, aff2 = restore(x2[0], ctx2, method=method)  # a channel-less tensor is accepted
    assert out2.shape == shape and np.array_equal(aff2, aff)
    assert psnr(out2, vol, vol.max()) > 20  # the crop cut part of the head away


def test_restore_rejects_wrong_shape(tmp_path):
    path = write_nifti(tmp_path / "a.nii.gz", smooth_volume((12, 12, 12)), np.eye(4))
    x, ctx = preprocess_file(path, Preprocess(spacing=None))
    with pytest.raises(MrivqError, match="shape"):
        restore(torch.zeros(1, 8, 8, 8), ctx)


def test_clip_default_maps_percentiles_and_records_them(tmp_path):
    vol = smooth_volume((16, 16, 16), scale=1000)
    path = write_nifti(tmp_path / "a.nii.gz", vol, np.eye(4))
    x, ctx = preprocess_file(path, Preprocess(spacing=None))
    lo, hi = np.percentile(vol, [0.5, 99.5])
    assert np.isclose(ctx["lo"][0], lo, rtol=1e-4) and np.isclose(ctx["hi"][0], hi, rtol=1e-4)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0


# ----------------------------------------------------------------------------------------------------
# multi-contrast
# ----------------------------------------------------------------------------------------------------


def world_field(affine, shape, centres, widths=(8.0, 10.0, 12.0)) -> np.ndarray:
    """Sum of Gaussians (mm) sampled at the voxel centres of a grid: the same object on any grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    pairs = zip(centres, widths[: len(centres)], strict=True)
    v = sum(np.exp(-np.sum((xyz - np.asarray(c)) ** 2, 1) / (2 * w**2)) for c, w in pairs)
    return v.reshape(shape).astype(np.float32)


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def test_multi_contrast_channels_stacked_in_order(tmp_path):
    ds = tmp_path / "ds"
    aff1 = np.diag([2.0, 2.0, 2.0, 1.0])
    aff2 = np.diag([1.0, 1.0, 4.0, 1.0])  # t2 on another grid covering the same field of view
    f_c = [(8, 10, 12), (22, 20, 8)]  # "t1" object
    g_c = [(20, 8, 14), (10, 24, 6)]  # "t2" object, elsewhere
    rows = []
    for i in range(2):
        write_nifti(ds / f"s{i}/t1.nii.gz", 100 * world_field(aff1, (16, 16, 12), f_c), aff1)
        write_nifti(ds / f"s{i}/t2.nii.gz", 200 * world_field(aff2, (32, 32, 7), g_c) + 5, aff2)
        rows += [{"subject": f"s{i}", "modality": "t1", "path": f"s{i}/t1.nii.gz"},
                 {"subject": f"s{i}", "modality": "t2", "path": f"s{i}/t2.nii.gz"}]
    write_manifest(ds, rows)
    pre = Preprocess(modalities=["t1", "t2"], spacing=[2.0, 2.0, 2.0], percentiles=[0, 100])
    dset = make_dataset(load_manifest(ds), ds, pre, cache="none")
    x = dset[0]["image"]
    assert x.shape == (2, 16, 16, 12)
    alone = make_dataset(rows, ds, Preprocess(modalities=["t1"], spacing=[2.0, 2.0, 2.0], percentiles=[0, 100]),
                           cache="none")
    assert torch.equal(x[0], alone[0]["image"][0])
    # channel 1 is t2 resampled onto t1's grid: the t2 object, seen at t1's voxel centres
    g_on_t1 = world_field(aff1, (16, 16, 12), g_c)
    inside = (slice(None), slice(None), slice(0, 11))  # t2 covers z <= 24 mm, t1 reaches 22 mm
    assert corr(x[1][inside], g_on_t1[inside]) > 0.99
    assert corr(x[0], g_on_t1) < 0.5
    # modalities in the other order: channels swap, the first one's grid is the reference
    pre_sw = Preprocess(modalities=["t2", "t1"], spacing=[2.0, 2.0, 2.0], percentiles=[0, 100], divisible_by=1)
    xs, ctx = preprocess_file([ds / "s0/t2.nii.gz", ds / "s0/t1.nii.gz"], pre_sw)
    grid = np.asarray(ctx["preprocessed_affine"]), tuple(xs.shape[1:])
    assert corr(xs[0], world_field(*grid, g_c)) > 0.99
    assert corr(xs[1][:, :, :11], world_field(*grid, f_c)[:, :, :11]) > 0.99
    sw = make_dataset(rows, ds, pre_sw, cache="memory")
    assert torch.equal(sw[0]["image"], xs)
    # preprocess_file with one file per modality; restore gives channels last in t1's geometry
    xp, ctx = preprocess_file([ds / "s0/t1.nii.gz", ds / "s0/t2.nii.gz"], pre)
    assert torch.equal(xp, x)
    out, aff = restore(xp, ctx)
    assert out.shape == (16, 16, 12, 2) and np.array_equal(aff, stored(ds / "s0/t1.nii.gz")[1])
    assert np.allclose(out[..., 0], stored(ds / "s0/t1.nii.gz")[0], atol=1e-3)
    with pytest.raises(MrivqError, match="takes 2"):
        preprocess_file(ds / "s0/t1.nii.gz", pre)


def test_4d_file_channels_selected_by_manifest(tmp_path):
    ds = tmp_path / "msd"
    vol = np.stack([smooth_volume((16, 16, 8), seed=s) for s in range(4)], -1)
    write_nifti(ds / "imagesTr/case1.nii.gz", vol, np.eye(4))
    rows = [{"subject": "case1", "modality": m, "path": "imagesTr/case1.nii.gz", "channel": str(c)}
            for c, m in enumerate(["flair", "t1", "t1gd", "t2"])]
    write_manifest(ds, rows)
    pre = Preprocess(modalities=["t2", "flair"], spacing=None, percentiles=[0, 100])
    x = make_dataset(load_manifest(ds), ds, pre, cache="none")[0]["image"]
    assert x.shape == (2, 16, 16, 8)
    for k, c in enumerate([3, 0]):
        ref = vol[..., c]
        assert np.allclose(x[k].numpy(), (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-5)
    # a whole 4D file through preprocess_file -> restore keeps channels last
    xs, ctx = preprocess_file(ds / "imagesTr/case1.nii.gz", Preprocess(modalities=list("abcd"), spacing=None,
                                                                           clip=False))
    out, _ = restore(xs, ctx)
    assert out.shape == (16, 16, 8, 4) and np.allclose(out, vol, atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# caches and errors
# ----------------------------------------------------------------------------------------------------


def test_persistent_disk_cache(tmp_path):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=3)
    cache = tmp_path / "cache"
    pre = Preprocess(spacing=[2.0, 2.0, 2.0])
    first = make_dataset(rows, ds, pre, cache="disk", cache_dir=cache)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 3
    mem = make_dataset(rows, ds, pre, cache="memory")
    again = make_dataset(rows, ds, pre, cache="disk", cache_dir=cache)
    assert sorted(cache.glob("*.pt")) == files  # served from the cache, nothing recomputed
    for i in range(3):
        assert torch.equal(first[i]["image"], mem[i]["image"])
        assert torch.equal(again[i]["image"], mem[i]["image"])
        assert again[i]["subject"] == mem[i]["subject"]
    # other preprocessing -> other cache entries (never a stale item)
    make_dataset(rows, ds, Preprocess(spacing=[4.0, 4.0, 4.0]), cache="disk", cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 6
    with pytest.raises(MrivqError, match="cache_dir"):
        make_dataset(rows, ds, pre, cache="disk")


def test_float16_cache_is_half_the_size_and_serves_float32(tmp_path):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=3)
    pre = Preprocess(spacing=[2.0, 2.0, 2.0])
    full = make_dataset(rows, ds, pre, cache="disk", cache_dir=tmp_path / "c32")
    half = make_dataset(rows, ds, pre, cache="disk", cache_dir=tmp_path / "c16", cache_dtype="float16")
    mem = make_dataset(rows, ds, pre, cache="memory", cache_dtype="float16")
    assert mem.base._cache[0]["image"].dtype == torch.float16  # what the memory cache holds
    for i in range(3):
        a, b, c = full[i]["image"], half[i]["image"], mem[i]["image"]
        assert b.dtype == torch.float32 and c.dtype == torch.float32
        assert float((a - b).abs().max()) < 2.5e-4 and torch.equal(b, c)
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).rglob("*.pt")) for k in ("c32", "c16")}
    assert size["c16"] < 0.6 * size["c32"]
    assert full.stats == half.stats  # intensity ranges are measured before the cast
    with pytest.raises(MrivqError, match="cache_dtype='int8' is not one of float32, float16"):
        make_dataset(rows, ds, pre, cache="memory", cache_dtype="int8")


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_corrupt_image_names_the_file(tmp_path, cache):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=2)
    bad = ds / rows[1]["path"]
    bad.write_bytes(gzip.compress(b"this is not a nifti file" * 10))
    with pytest.raises(ImageReadError) as e:
        dset = make_dataset(rows, ds, Preprocess(), cache=cache, cache_dir=tmp_path / "c")
        dset[1]
    assert str(bad) in str(e.value) or rows[1]["path"] in str(e.value)
    assert "\n" not in str(e.value)


def test_preprocess_file_missing_path(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        preprocess_file(tmp_path / "nope.nii.gz", Preprocess())


# ----------------------------------------------------------------------------------------------------
# intensity statistics and synthesis geometry
# ----------------------------------------------------------------------------------------------------


def test_intensity_stats_median_of_subjects(tmp_path):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=3)
    pre = Preprocess(spacing=None)
    dset = make_dataset(rows, ds, pre, cache="memory")
    his = sorted(preprocess_file(ds / r["path"], pre)[1]["hi"][0] for r in rows)
    st = dset.stats
    assert st["n"] == 3 and np.isclose(st["hi"][0], his[1])
    st2 = dataset_intensity_stats(rows, ds, pre)
    assert np.allclose(st2["hi"], st["hi"]) and np.allclose(st2["lo"], st["lo"])
    json.dumps(st)
    lo, hi = intensity_range(st)
    out = to_intensity(torch.ones(1, 2, 2, 2), st)
    assert np.allclose(out, hi[0])


def test_synth_geometry_is_centred_ras():
    aff = synth_geometry(Preprocess(spacing=[2.0, 1.5, 3.0]), (32, 40, 20))
    assert np.allclose(np.diag(aff), [2.0, 1.5, 3.0, 1.0])
    centre = aff @ np.array([31 / 2, 39 / 2, 19 / 2, 1.0])
    assert np.allclose(centre[:3], 0.0)
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    aff2 = synth_geometry(Preprocess(dims=2, spacing=None), (28, 28))
    assert np.allclose(np.diag(aff2), 1.0) and np.allclose(aff2 @ [13.5, 13.5, 0, 1], [0, 0, 0, 1])


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
def test_synth_geometry_follows_the_training_orientation(tmp_path, orientation):
    """A volume preprocessed in ``orientation`` and written with ``synth_geometry`` puts the anatomy
    where it was: a blob on the subject's right, front and top stays right, front and top."""
    vol = np.zeros((20, 16, 12), np.float32)
    vol[15:18, 11:14, 8:10] = 1.0  # RAS file: high x = right, high y = anterior, high z = superior
    vol += 0.01 * smooth_volume(vol.shape)
    path = write_nifti(tmp_path / "ras.nii.gz", vol, np.eye(4))
    pre = Preprocess(spacing=None, clip=False, percentiles=[0, 100], orientation=orientation)
    x, _ = preprocess_file(path, pre)
    aff = synth_geometry(pre, x.shape[1:])
    assert "".join(nib.aff2axcodes(aff)) == orientation
    out = write_nifti(tmp_path / "synth.nii.gz", x[0].numpy(), aff)
    canon = np.asarray(nib.as_closest_canonical(nib.load(str(out))).get_fdata())
    assert canon.shape == vol.shape
    assert np.unravel_index(np.argmax(canon), canon.shape) == np.unravel_index(np.argmax(vol), vol.shape)
    centre = aff @ np.array([*(np.asarray(x.shape[1:]) - 1) / 2, 1.0])
    assert np.allclose(centre[:3], 0.0)


# ----------------------------------------------------------------------------------------------------
# 2D: IDX, CIFAR, PNG, slices of volumes
# ----------------------------------------------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", s) for s in arr.shape)
    path.write_bytes(gzip.compress(head + arr.tobytes()))


def test_idx_items(tmp_path, monkeypatch):
    ds = tmp_path / "mnist"
    ds.mkdir()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    write_idx(ds / "train-images-idx3-ubyte.gz", imgs)
    rows = [{"subject": f"train-{i}", "modality": "digit", "path": "train-images-idx3-ubyte.gz",
             "index": str(i), "label": str(i % 10), "split": "train" if i < 3 else "test"} for i in range(4)]
    write_manifest(ds, rows)
    import mrivq.datasets.layouts.idx as idx_mod

    calls = []
    real = idx_mod.read_idx
    monkeypatch.setattr(idx_mod, "read_idx", lambda p: calls.append(p) or real(p))
    ARRAYS.clear()
    pre = Preprocess(dims=2, modalities=["digit"], spacing=None)
    tr, va = split_subjects(select_rows(load_manifest(ds), pre.modalities))
    dtr = make_dataset(tr, ds, pre)
    dva = make_dataset(va, ds, pre)
    assert len(dtr) == 3 and len(dva) == 1
    for i in range(3):
        it = dtr[i]
        assert it["image"].shape == (1, 28, 28) and it["label"] == i % 10
        assert torch.allclose(it["image"][0], torch.from_numpy(imgs[i]).float() / 255)
    assert dva[0]["subject"] == "train-3"
    assert len(calls) == 1  # the file was read once, not per item
    assert dtr.stats["lo"] == [0.0] and dtr.stats["hi"] == [255.0]
    # padding up to a multiple of 8 (28 -> 32), centred
    p8 = make_dataset(tr, ds, Preprocess(dims=2, modalities=["digit"], spacing=None, divisible_by=8))
    x = p8[0]["image"]
    assert x.shape == (1, 32, 32)
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(imgs[0]).float() / 255)
    assert float(x[0, :2].abs().sum()) == 0.0
    with pytest.raises(MrivqError, match="dims=2"):
        make_dataset(tr, ds, Preprocess(dims=3, modalities=["digit"]))


def test_cifar_items(tmp_path):
    ds = tmp_path / "cifar10"
    (ds / "cifar-10-batches-py").mkdir(parents=True)
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    batch = {b"data": hwc.transpose(0, 3, 1, 2).reshape(5, 3072), b"labels": [3, 1, 4, 1, 5],
             b"batch_label": b"training batch 1 of 5"}
    with open(ds / "cifar-10-batches-py/data_batch_1", "wb") as f:
        pickle.dump(batch, f)
    rows = [{"subject": f"train-{i}", "modality": "rgb", "path": "cifar-10-batches-py/data_batch_1",
             "index": str(i), "label": str(batch[b"labels"][i]), "split": "train"} for i in range(5)]
    write_manifest(ds, rows)
    pre = Preprocess(dims=2, modalities=["rgb"], spacing=None)
    dset = make_dataset(load_manifest(ds), ds, pre)
    assert len(dset) == 5
    it = dset[2]
    assert it["image"].shape == (3, 32, 32) and it["label"] == 4
    assert torch.allclose(it["image"], torch.from_numpy(hwc[2]).permute(2, 0, 1).float() / 255)
    batch_ = next(iter(torch.utils.data.DataLoader(dset, batch_size=5)))
    assert batch_["image"].shape == (5, 3, 32, 32) and batch_["label"].tolist() == [3, 1, 4, 1, 5]


def test_png_preprocess_matches_dataset_and_restores(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(30, 26), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "digit.png")
    pre = Preprocess(dims=2, modalities=["digit"], spacing=None, divisible_by=4)
    x, ctx = preprocess_file(tmp_path / "digit.png", pre)
    assert x.shape == (1, 32, 28)
    write_idx(tmp_path / "one-idx3-ubyte.gz", img[None])
    rows = [{"subject": "s", "modality": "digit", "path": "one-idx3-ubyte.gz", "index": "0"}]
    assert torch.equal(make_dataset(rows, tmp_path, pre)[0]["image"], x)  # same padding as MONAI's
    for method in ("monai", "resample"):
        out, aff = restore(x, json.loads(json.dumps(ctx)), method=method)
        assert out.shape == (30, 26) and np.array_equal(aff, np.eye(4))
        assert np.array_equal(to_input_dtype(out, {"dtype": "uint8"}), img)


def test_slices_of_volumes_for_2d_models(tmp_path):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=2, shape=(22, 26, 20), spacing=(1.0, 1.0, 2.0))
    pre = Preprocess(dims=2, spacing=[2.0, 2.0], slices_per_volume=3, divisible_by=4)
    dset = make_dataset(rows, ds, pre, cache="memory")
    assert len(dset) == 6
    shapes = {tuple(dset[i]["image"].shape) for i in range(6)}
    assert shapes == {(1, 12, 16)}  # 11x13 in-plane at 2 mm, padded to multiples of 4
    assert [dset[i]["subject"] for i in range(6)] == ["sub00"] * 3 + ["sub01"] * 3
    assert not torch.equal(dset[0]["image"], dset[1]["image"])
    # the whole volume of one file for a 2D model: slices -> volume -> restore
    x, ctx = preprocess_file(ds / rows[0]["path"], pre)
    assert x.shape == (1, 12, 16, 20) and ctx["slice_axis"] == 2
    s = volume_to_slices(x, ctx["slice_axis"])
    assert s.shape == (20, 1, 12, 16)
    assert torch.equal(s[10], dset[1]["image"])  # the central slice
    assert torch.equal(slices_to_volume(s, 2), x)
    out, aff = restore(x, ctx)
    assert out.shape == (22, 26, 20) and np.array_equal(aff, stored(ds / rows[0]["path"])[1])


def test_central_slices():
    assert central_slices(10, 1) == [5]
    assert central_slices(10, 3) == [4, 5, 6]
    assert central_slices(2, 4) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------------
# geometry-only restore, labels that are not classes, DICOM series
# ----------------------------------------------------------------------------------------------------


def test_restore_geometry_only_for_maps(tmp_path):
    ds = tmp_path / "ds"
    aff = oblique_lps_affine()
    write_nifti(ds / "t1.nii.gz", smooth_volume((21, 19, 13)), aff)
    write_nifti(ds / "t2.nii.gz", smooth_volume((21, 19, 13), seed=5), aff)
    pre = Preprocess(modalities=["t1", "t2"], spacing=[2.0, 2.0, 2.0])
    x, ctx = preprocess_file([ds / "t1.nii.gz", ds / "t2.nii.gz"], pre)
    nll = torch.full((1, *x.shape[1:]), 3.5)  # one channel, not an image: no intensity mapping
    for method in ("monai", "resample"):
        out, out_aff = restore(nll, ctx, intensity=False, method=method)
        assert out.shape == (21, 19, 13) and np.array_equal(out_aff, stored(ds / "t1.nii.gz")[1])
        assert np.allclose(out, 3.5, atol=1e-4)
    with pytest.raises(MrivqError, match="channel"):
        restore(nll, ctx)  # an image restore needs the input's channel count


def test_msd_segmentation_label_is_not_a_class(tmp_path):
    ds = tmp_path / "msd"
    write_nifti(ds / "imagesTr/a.nii.gz", smooth_volume((12, 12, 8)), np.eye(4))
    write_nifti(ds / "imagesTr/b.nii.gz", smooth_volume((12, 12, 8), seed=1), np.eye(4))
    rows = [{"subject": s, "modality": "mri", "path": f"imagesTr/{s}.nii.gz", "channel": "",
             "label": f"labelsTr/{s}.nii.gz", "split": "train"} for s in ("a", "b")]
    dset = make_dataset(rows, ds, Preprocess(modalities=["mri"], spacing=None), cache="none")
    assert "label" not in dset[0] and dset[0]["image"].shape == (1, 12, 12, 8)


def test_dicom_series_folder_round_trip(tmp_path):
    from tests.helpers import oblique_affine, quantised_volume, write_dicom_series
    ds = tmp_path / "dicom"
    aff = oblique_affine()
    vol1 = quantised_volume((20, 18, 9), seed=1)
    uid1 = write_dicom_series(ds / "P001", vol1, aff, prefix="A", desc="T1")
    write_dicom_series(ds / "P001", quantised_volume((20, 18, 7), seed=2), aff, prefix="B", desc="T2")
    write_dicom_series(ds / "P002", quantised_volume((20, 18, 9), seed=3), aff, desc="T1")
    from mrivq.io.images import load_volume

    ref, ref_aff = load_volume(ds / "P002")
    # a folder holding one series goes through preprocess_file / restore like a NIfTI file
    x, ctx = preprocess_file(ds / "P002", Preprocess(spacing=None, clip=False))
    out, out_aff = restore(x, ctx)
    assert out.shape == ref.shape and np.allclose(out_aff, ref_aff) and np.allclose(out, ref, atol=1e-2)
    # the manifest's series_uid picks one series of a folder holding several
    rows = [{"subject": "P001", "modality": "t1", "path": "P001", "series_uid": uid1},
            {"subject": "P002", "modality": "t1", "path": "P002"}]
    dset = make_dataset(rows, ds, Preprocess(spacing=None, divisible_by=1), cache="memory")
    assert dset[0]["image"].shape[1:] == load_volume(ds / "P001", series_uid=uid1)[0].shape


def test_memory_cache_with_threads_reports_progress(tmp_path):
    import io

    from mrivq.utils.progress import Progress

    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=3)
    out = io.StringIO()
    with Progress(enabled=True, stream=out) as progress:
        dset = make_dataset(rows, ds, Preprocess(), cache="memory", num_workers=2, progress=progress)
    assert "preprocessing ds: 3" in out.getvalue()
    ref = make_dataset(rows, ds, Preprocess(), cache="none")
    assert all(torch.equal(dset[i]["image"], ref[i]["image"]) for i in range(3))


@pytest.mark.parametrize("cache", ["memory", "disk", "none"])
def test_datasets_pickle_for_spawned_workers(tmp_path, cache):
    ds = tmp_path / "ds"
    rows = make_volume_dataset(ds, n=2)
    dset = make_dataset(rows, ds, Preprocess(), cache=cache, cache_dir=tmp_path / "c")
    again = pickle.loads(pickle.dumps(dset))
    assert torch.equal(again[1]["image"], dset[1]["image"])
