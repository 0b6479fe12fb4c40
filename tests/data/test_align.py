"""Alignment with a template: registration recovers a known transform, the way back restores the input's
geometry, labels follow their scans, registrations are cached, the quality check is enforced, and bad
input is one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrivq.data import align
from mrivq.data.preprocess import Preprocess
from mrivq.data.restore import preprocess_file, restore
from mrivq.datasets import phantom as ph
from tests.helpers import TINY, invoke, mrivq_main

SPACING = 4.0
PRE = dict(dims=3, spacing=[6.0, 6.0, 6.0], shape=[32, 40, 32], register="affine", template="phantom",
           head_percentiles=True)


def _varied(index: int, spacing: float = SPACING, seed: int = 0) -> dict:
    shape, centre = ph.site_geometry(ph.site_of(index), spacing)
    pose = ph.draw_pose(seed, index)
    sub = ph.generate_subject(index, seed=seed, shape=shape, spacing=spacing, modalities=("t1",), pose=pose,
                              centre=centre)
    sub["truth"] = ph.head_to_world(index, seed=seed, pose=pose)
    return sub


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return path


def _mean_error(a: np.ndarray, b: np.ndarray, tpl: align.Template) -> float:
    pts = np.argwhere(tpl.brain > 0.5) @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    pa = pts @ a[:3, :3].T + a[:3, 3]
    pb = pts @ b[:3, :3].T + b[:3, 3]
    return float(np.linalg.norm(pa - pb, axis=1).mean())


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_known_pose_is_recovered_within_a_voxel(index: int) -> None:
    sub = _varied(index)
    tpl = align.load_template("phantom")
    reg = align.register(sub["t1"], sub["affine"], tpl, resolution_mm=SPACING)
    assert reg.passed, reg.why
    # the truth maps the phantom's head frame (the template's world) to the scan's world
    assert _mean_error(reg.array, sub["truth"], tpl) < SPACING
    # a wrong transform is far off by the same measure (the check can fail)
    shifted = sub["truth"].copy()
    shifted[:3, 3] += 10.0
    assert _mean_error(shifted, sub["truth"], tpl) > SPACING


def test_the_varied_phantom_records_each_subjects_true_transform(data_root: Path) -> None:
    res = invoke("fetch", "phantom", "--varied", "--root", str(data_root), "--count", "3", "--spacing", "8",
                 "--modality", "t1")
    assert res.exit_code == 0, res.output
    ddir = data_root / "phantom-varied"
    meta = json.loads((ddir / "phantom.json").read_text())
    assert meta["varied"] and meta["max_rotation_deg"] == 15.0 and meta["max_shift_mm"] == 25.0
    sites = set()
    nominal = ph.phantom_template(8.0)
    tv = np.argwhere(nominal["labels"] == 6) @ nominal["affine"][:3, :3].T + nominal["affine"][:3, 3]
    for s in meta["subjects"]:
        img = nib.load(ddir / s["subject"] / f"{s['subject']}_t1.nii.gz")
        lab = np.asarray(nib.load(ddir / s["labels"]).dataobj)
        site = ph.SITES[s["site"]]
        assert img.shape == ph.site_geometry(s["site"], 8.0)[0]
        # the field of view is centred where the site puts it
        centre = img.affine[:3, :3] @ ((np.asarray(img.shape) - 1) / 2) + img.affine[:3, 3]
        np.testing.assert_allclose(centre, site["centre"], atol=1e-6)
        # the recorded truth puts the ventricles' centre where the label map has them
        vox = np.argwhere(lab == 6)
        seen = (vox @ img.affine[:3, :3].T + img.affine[:3, 3]).mean(0)
        h2w = np.asarray(s["head_to_world"])
        assert np.linalg.norm(h2w[:3, :3] @ tv.mean(0) + h2w[:3, 3] - seen) < 8.0
        rot = np.asarray(s["pose"])[:3, :3]
        assert np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))) <= 15.0 + 1e-6
        sites.add(s["site"])
    assert sites == set(ph.SITES)


def test_preprocess_then_restore_gives_back_the_inputs_geometry(tmp_path: Path) -> None:
    sub = _varied(1)
    lps = sub["affine"].copy()  # the same scan stored LPS (flipped x and y axes), as DICOM converters write
    lps[:, 0] *= -1
    lps[:, 1] *= -1
    lps[:3, 3] = sub["affine"][:3, 3] + sub["affine"][:3, 0] * (sub["t1"].shape[0] - 1) \
        + sub["affine"][:3, 1] * (sub["t1"].shape[1] - 1)
    arr = sub["t1"][::-1, ::-1]
    path = _save(arr, lps, tmp_path / "lps.nii.gz")
    pre = Preprocess(**PRE)
    x, ctx = preprocess_file(path, pre)
    assert list(x.shape[1:]) == PRE["shape"] and ctx["registration"]["passed"]
    grid, _ = align.template_grid(align.load_template("phantom"), pre.spacing, pre.shape)
    np.testing.assert_allclose(ctx["preprocessed_affine"], grid)
    y, aff = restore(x, ctx)
    assert y.shape == arr.shape
    np.testing.assert_array_equal(aff, lps)
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    # and the content is the input's, not a shifted copy: high correlation inside the head
    head = align.head_mask(arr)
    assert np.corrcoef(y[head], arr[head])[0, 1] > 0.8
    # a map that is not an image (NLL, anomaly) goes back the same way
    m, _ = restore(np.ones((1, *PRE["shape"]), np.float32), ctx, intensity=False)
    assert m.shape == arr.shape


def test_a_lesion_mask_carried_through_labels_and_back_is_the_same_mask(tmp_path: Path) -> None:
    sub = _varied(2)
    g = np.argwhere(np.isin(sub["labels"], (5,)))
    centre = g.mean(0).round().astype(int)
    mask = np.zeros(sub["t1"].shape, np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in mask.shape], indexing="ij"), -1)
    mask[((grid - centre) ** 2).sum(-1) <= 4 ** 2] = 1  # a 16 mm-radius lesion
    scan = _save(sub["t1"], sub["affine"], tmp_path / "scan.nii.gz")
    lab = _save(mask, sub["affine"], tmp_path / "scan_lesion.nii.gz")
    out = tmp_path / "out"
    res = mrivq_main("preprocess", "--preset", "vqvae3d-cpu", "--set", "data.template=phantom", str(scan),
                     "--labels", str(lab), "-o", str(out))
    assert res.returncode == 0, res.stderr
    rec = json.loads((out / "scan.json").read_text())
    moved = nib.load(out / "scan_lesion.nii.gz")
    assert set(np.unique(np.asarray(moved.dataobj))) <= {0.0, 1.0}
    back = align.to_native(np.asarray(moved.dataobj), moved.affine, align.Registration.from_dict(rec["registration"]),
                           sub["affine"], list(mask.shape), nearest=True)
    inter = float((back.astype(bool) & mask.astype(bool)).sum())
    dice = 2 * inter / (back.astype(bool).sum() + mask.sum())
    assert dice > 0.8, dice
    np.testing.assert_allclose(np.argwhere(back > 0).mean(0), np.argwhere(mask > 0).mean(0), atol=1.0)
    for ext in (".nii.gz", ".json", ".png"):
        assert (out / f"scan{ext}").is_file()
    assert rec["registration"]["similarity"] > align.MIN_SIMILARITY


def test_the_disk_cache_keeps_each_registration(tmp_path: Path) -> None:
    from mrivq.data.datasets import make_dataset

    rows = []
    for i in range(3):
        sub = _varied(i, spacing=6.0)
        p = _save(sub["t1"], sub["affine"], tmp_path / f"s{i}.nii.gz")
        rows.append({"subject": f"s{i}", "modality": "t1", "path": str(p)})
    pre = Preprocess(**PRE)
    before = align.REGISTRATIONS["count"]
    ds = make_dataset(rows, tmp_path, pre, cache="disk", cache_dir=tmp_path / "cache", num_workers=2)
    assert align.REGISTRATIONS["count"] - before == 3
    first = ds[0]["image"].clone()
    again = make_dataset(rows, tmp_path, pre, cache="disk", cache_dir=tmp_path / "cache", num_workers=2)
    assert align.REGISTRATIONS["count"] - before == 3  # the second run registers nothing
    assert np.array_equal(again[0]["image"].numpy(), first.numpy())


def test_a_datasets_registrations_are_kept_for_every_later_use(tmp_path: Path) -> None:
    from mrivq.data.datasets import make_dataset

    rows = []
    for i in range(2):
        sub = _varied(i, spacing=6.0)
        (tmp_path / f"s{i}").mkdir()
        _save(sub["t1"], sub["affine"], tmp_path / f"s{i}" / "t1.nii.gz")
        rows.append({"subject": f"s{i}", "modality": "t1", "path": f"s{i}/t1.nii.gz"})
    (tmp_path / "manifest.csv").write_text("subject,modality,path\n" + "".join(
        f"{r['subject']},t1,{r['path']}\n" for r in rows))
    pre = Preprocess(**PRE)
    before = align.REGISTRATIONS["count"]
    first = make_dataset(rows, tmp_path, pre, cache="memory")[1]["image"].clone()
    assert align.REGISTRATIONS["count"] - before == 2
    assert len(list((tmp_path / ".mrivq" / "registrations").glob("*.json"))) == 2
    # another process (eval, --stage prior, preprocess) with the in-memory cache: nothing registered again
    again = make_dataset(rows, tmp_path, pre, cache="none")[1]["image"]
    x, _ = preprocess_file(tmp_path / "s1" / "t1.nii.gz", pre)
    assert align.REGISTRATIONS["count"] - before == 2
    assert np.array_equal(again.numpy(), first.numpy()) and np.array_equal(x.numpy(), first.numpy())
    # a changed scan is registered again
    img = nib.load(tmp_path / "s1" / "t1.nii.gz")
    _save(np.asarray(img.dataobj) * 1.01, img.affine, tmp_path / "s1" / "t1.nii.gz")
    preprocess_file(tmp_path / "s1" / "t1.nii.gz", pre)
    assert align.REGISTRATIONS["count"] - before == 3


@pytest.mark.slow
def test_the_quality_check_stops_skips_or_keeps_a_failed_subject(tmp_path: Path) -> None:
    from mrivq.data.datasets import make_dataset
    from mrivq.utils.errors import MrivqError

    rows = []
    for i in range(2):
        sub = _varied(i, spacing=6.0)
        rows.append({"subject": f"s{i}", "modality": "t1",
                     "path": str(_save(sub["t1"], sub["affine"], tmp_path / f"s{i}.nii.gz"))})
    rng = np.random.default_rng(0)
    noise = rng.random((30, 30, 30)).astype(np.float32)  # not a head: the check must fail it
    rows.append({"subject": "noise", "modality": "t1",
                 "path": str(_save(noise, np.diag([8.0, 8.0, 8.0, 1.0]), tmp_path / "noise.nii.gz"))})
    with pytest.raises(MrivqError, match=r"1 subject fails the registration check: noise \(.*data.qc=skip"):
        make_dataset(rows, tmp_path, Preprocess(**PRE), cache="memory")
    with pytest.warns(UserWarning, match="left out"):
        ds = make_dataset(rows, tmp_path, Preprocess(**PRE, qc="skip"), cache="memory")
    assert ds.subjects == ["s0", "s1"] and len(ds) == 2
    with pytest.warns(UserWarning, match="kept as they are"):
        ds = make_dataset(rows, tmp_path, Preprocess(**PRE, qc="keep"), cache="memory")
    assert len(ds) == 3


def _tiny_scan(tmp_path: Path) -> Path:
    sub = _varied(0, spacing=6.0)
    return _save(sub["t1"], sub["affine"], tmp_path / "scan.nii.gz")


@pytest.mark.parametrize("case", ["template", "labels", "image2d", "labels-count"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    scan = _tiny_scan(tmp_path)
    out = tmp_path / "out"
    args = ["preprocess", "--preset", "vqvae3d-cpu", "--set", "data.template=phantom", str(scan), "-o", str(out)]
    if case == "template":
        args[4] = f"data.template={tmp_path / 'missing.nii.gz'}"
        want = "missing.nii.gz does not exist"
    elif case == "labels":
        other = _save(np.zeros((5, 6, 7), np.uint8), np.eye(4), tmp_path / "other.nii.gz")
        args += ["--labels", str(other)]
        want = "is [5, 6, 7] voxels but its scan"
    elif case == "labels-count":
        args += ["--labels", str(scan), "--labels", str(scan)]
        want = "2 label map(s) for 1 input(s)"
    else:
        from PIL import Image

        png = tmp_path / "slice.png"
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(png)
        args[5] = str(png)
        want = "is a 2D image but the model is 3D"
    res = mrivq_main(*args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert want in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_failing_registration_is_reported_by_name(tmp_path: Path) -> None:
    noise = _save(np.random.default_rng(1).random((30, 30, 30)).astype(np.float32), np.diag([8.0, 8.0, 8.0, 1.0]),
                  tmp_path / "noise.nii.gz")
    res = mrivq_main("preprocess", "--preset", "vqvae3d-cpu", "--set", "data.template=phantom", str(noise), "-o",
                     str(tmp_path / "out"))
    assert res.returncode == 0
    assert "noise  similarity" in res.stdout and "FAILS the check" in res.stdout
    assert "1 of 1 fail the registration check: noise" in res.stderr


@pytest.mark.slow
def test_a_registered_run_trains_synthesizes_in_template_space_and_maps_back(data_root: Path, tmp_path: Path) -> None:
    assert invoke("fetch", "phantom", "--varied", "--root", str(data_root), "--count", "6", "--spacing", "6",
                  "--modality", "t1").exit_code == 0
    run = tmp_path / "run"
    res = invoke("train", "--dataset", "phantom-varied", "--root", str(data_root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--max-steps", "4", "--prior-max-steps", "3", *TINY,
                 "--set", "data.shape=[32,40,32]", "--set", "data.register=affine", "--set", "data.n4=true",
                 "--set", "data.head_percentiles=true", "--set", "data.skull_strip=true")
    assert res.exit_code == 0, res.output
    info = json.loads((run / "run.json").read_text())
    pre = info["preprocess"]
    assert pre["register"] == "affine" and pre["template"] == "phantom"  # auto resolved and recorded
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    img = nib.load(tmp_path / "s" / "synth_0000.nii.gz")
    grid, _ = align.template_grid(align.load_template("phantom"), pre["spacing"], pre["shape"])
    np.testing.assert_allclose(img.affine, grid, atol=1e-4)
    side = json.loads((tmp_path / "s" / "synth_0000.json").read_text())
    assert side["space"] == "template" and side["template"] == "phantom"
    scan = data_root / "phantom-varied" / "sub-0001" / "sub-0001_t1.nii.gz"
    rec = tmp_path / "rec.nii.gz"
    assert invoke("reconstruct", str(scan), "-o", str(rec), "--run", str(run), "--device", "cpu").exit_code == 0
    src, back = nib.load(scan), nib.load(rec)
    assert back.shape == src.shape and np.allclose(back.affine, src.affine)
    nll = tmp_path / "nll.nii.gz"
    assert invoke("score", str(scan), "-o", str(nll), "--run", str(run), "--device", "cpu").exit_code == 0
    assert nib.load(nll).shape[:3] == src.shape


@pytest.mark.slow
def test_training_stops_on_a_subject_that_fails_the_check(data_root: Path) -> None:
    from mrivq.datasets.phantom import write_dataset

    ddir = data_root / "mixed"
    rows = write_dataset(ddir, count=5, shape=(32, 32, 32), spacing=6.0, modalities=("t1",))
    noise = np.random.default_rng(2).random((32, 32, 32)).astype(np.float32)
    _save(noise, np.diag([6.0, 6.0, 6.0, 1.0]), ddir / rows[0]["path"])  # sub-0000 is not a head any more
    (ddir / "manifest.csv").write_text("subject,modality,path\n" + "".join(
        f"{r['subject']},t1,{r['path']}\n" for r in rows))
    args = ["train", "--dataset", "mixed", "--root", str(data_root), "--preset", "vqvae3d-cpu", "--device", "cpu",
            "--max-steps", "2", "--prior-max-steps", "2", *TINY, "--set", "data.register=affine",
            "--set", "data.template=phantom", "--set", "train.val_fraction=0.4"]
    res = mrivq_main(*args, "--out", str(data_root / "r1"))
    assert res.returncode == 2, res.stdout + res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "sub-0000" in err[0] and "data.qc=skip" in err[0], res.stderr
    res = mrivq_main(*args, "--set", "data.qc=skip", "--out", str(data_root / "r2"))
    assert res.returncode == 0, res.stderr
    assert "left out (data.qc=skip)" in res.stderr


@pytest.mark.slow
def test_the_shipped_template_recovers_a_known_affine_of_itself() -> None:
    """ICBM152 2009a moved by a known rotation, shift and scaling, resampled onto a 3 mm grid of its own
    (as a scan would be): the registration with the shipped template undoes it within a voxel."""
    from tests.helpers import rotation

    tpl = align.load_template("icbm152")
    truth = np.eye(4)  # template world -> scan world
    truth[:3, :3] = rotation([0.3, 1.0, 0.2], np.deg2rad(12.0)) @ np.diag([1.05, 0.97, 1.02])
    truth[:3, 3] = [8.0, -15.0, 12.0]
    grid = np.diag([3.0, 3.0, 3.0, 1.0])
    grid[:3, 3] = [-105.0, -140.0, -90.0]
    scan = align.resample(tpl.t1, tpl.affine, np.linalg.solve(truth, grid), [72, 84, 72])  # scan(p) = t1(truth^-1 p)
    assert scan.max() > 0.5
    reg = align.register(scan * 900.0, grid, tpl, resolution_mm=3.0)
    assert reg.passed, reg.why
    assert _mean_error(reg.array, truth, tpl) < 3.0


def test_preprocess_refuses_to_replace_its_outputs_without_overwrite(tmp_path: Path) -> None:
    scan = _tiny_scan(tmp_path)
    out = tmp_path / "out"
    args = ["preprocess", "--preset", "vqvae3d-cpu", "--set", "data.template=phantom", str(scan), "-o", str(out)]
    assert mrivq_main(*args).returncode == 0
    before = (out / "scan.nii.gz").stat().st_mtime_ns
    res = mrivq_main(*args)
    assert res.returncode == 2 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert (out / "scan.nii.gz").stat().st_mtime_ns == before
    assert mrivq_main(*args, "--overwrite").returncode == 0
