"""Anomaly detection end to end: lesion phantoms (`fetch --lesions`), healing (`score --heal`) and
`eval --anomaly`, on tiny runs trained on healthy phantoms."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrivq.utils.errors import MrivqError
from tests.helpers import TINY, invoke


@pytest.fixture(scope="module")
def lesion_root(phantom_root: Path) -> Path:
    res = invoke("fetch", "phantom", "--lesions", "--root", str(phantom_root), "--count", "6", "--shape",
                 "32", "32", "32", "--spacing", "6", "--seed", "5")
    assert res.exit_code == 0, res.output
    return phantom_root


def test_fetch_lesions_writes_its_own_dataset_with_masks(lesion_root: Path) -> None:
    ddir = lesion_root / "phantom-lesions"
    rows = list(csv.DictReader((ddir / "manifest.csv").open()))
    assert rows and all(r["mask"] for r in rows)
    meta = json.loads((ddir / "phantom.json").read_text())
    assert meta["lesions"] is True
    kinds = {s["lesion"]["kind"] for s in meta["subjects"]}
    assert kinds == {"tumour", "wmh", "artefact"}
    for s in meta["subjects"]:
        mask = np.asarray(nib.load(ddir / s["subject"] / f"{s['subject']}_mask.nii.gz").dataobj)
        assert mask.shape == (32, 32, 32) and (mask > 0).sum() == s["lesion"]["voxels"] > 0
    # the healthy dataset is untouched and has an empty mask column
    healthy = list(csv.DictReader((lesion_root / "phantom" / "manifest.csv").open()))
    assert healthy and not any(r.get("mask") for r in healthy)
    # again: already complete; with other options: refused, nothing replaced
    again = invoke("fetch", "phantom", "--lesions", "--root", str(lesion_root), "--count", "6", "--shape",
                   "32", "32", "32", "--spacing", "6", "--seed", "5")
    assert again.exit_code == 0 and "already complete" in again.output


def test_fetch_name_and_lesions_bad_input(lesion_root: Path) -> None:
    res = invoke("fetch", "phantom", "--lesions", "--name", "Bad Name", "--root", str(lesion_root))
    assert res.exit_code == 2 and "lowercase" in res.output
    res = invoke("fetch", "mnist", "--lesions", "--root", str(lesion_root))
    assert res.exit_code == 2 and "--lesions" in res.output
    res = invoke("fetch", "phantom", "--lesions", "--name", "mylesions", "--root", str(lesion_root),
                 "--count", "3", "--shape", "32", "32", "32", "--spacing", "6")
    assert res.exit_code == 0, res.output
    assert (lesion_root / "mylesions" / "manifest.csv").is_file()


def _lesion_subject(root: Path, kind: str) -> tuple[Path, Path]:
    ddir = root / "phantom-lesions"
    meta = json.loads((ddir / "phantom.json").read_text())
    s = next(s for s in meta["subjects"] if s["lesion"]["kind"] == kind)
    sid = s["subject"]
    return ddir / sid / f"{sid}_t1.nii.gz", ddir / sid / f"{sid}_mask.nii.gz"


@pytest.fixture(scope="module")
def twin_root(lesion_root: Path) -> Path:
    """The lesion phantoms' healthy twins: the same seed and cohort without lesions."""
    from mrivq.datasets.phantom import LESION_COHORT, write_dataset

    write_dataset(lesion_root / "phantom-s5", count=6, shape=(32, 32, 32), spacing=6.0, seed=5,
                  modalities=("t1",), cohort=LESION_COHORT)
    return lesion_root


def _heal(run: Path, img: Path, out: Path, *extra: str) -> np.ndarray:
    # no smoothing (unless ``extra`` asks): at 6 mm the default sigma of 2 voxels blurs a tiny head away
    res = invoke("score", str(img), "-o", str(out), "--run", str(run), "--heal", "--device", "cpu",
                 "--threshold", "0.2", "--resamples", "2", "--smooth", "0", *extra)
    assert res.exit_code == 0, res.output
    assert "redrew" in res.output
    return np.asarray(nib.load(out).dataobj)


def test_heal_finds_an_inserted_lesion_and_leaves_a_healthy_scan_nearly_unchanged(
        trained_run: Path, twin_root: Path, tmp_path: Path) -> None:
    _, ref_mask = _lesion_subject(twin_root, "tumour")
    twin = twin_root / "phantom-s5" / ref_mask.parent.name / ref_mask.name.replace("_mask", "_t1")
    # a bright mass in the middle of the healthy twin's brain: far outside what an 8-step model has seen,
    # so the test does not depend on where a phantom's own lesion happens to fall
    t = nib.load(twin)
    x0 = np.asarray(t.dataobj, np.float32)
    g = np.stack(np.meshgrid(*[np.arange(n) - n / 2 for n in x0.shape], indexing="ij"))
    mask = (g ** 2).sum(0) <= 3.5 ** 2
    img, mask_path = tmp_path / "sick_t1.nii.gz", tmp_path / "sick_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.where(mask, 2.5 * np.percentile(x0, 99), x0).astype(np.float32), t.affine), img)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), t.affine), mask_path)
    # raw residuals: an 8-step model's healthy reference is too rough to normalize by
    sick = _heal(trained_run, img, tmp_path / "sick.nii.gz", "--no-normalize")
    healthy = _heal(trained_run, twin, tmp_path / "healthy.nii.gz", "--no-normalize")
    for name in ("sick_healed.nii.gz", "sick_nll.nii.gz"):
        f = nib.load(tmp_path / name)
        assert f.shape == nib.load(img).shape and np.allclose(f.affine, nib.load(img).affine)
    # the lesion lights the map up inside its mask, well above the rest of the head and the twin's
    assert sick[mask].mean() > 2 * sick[~mask].mean()
    assert sick[mask].mean() > 1.5 * healthy[mask].mean()  # (an 8-step model: its healthy map is not flat)
    assert (healthy == 0).mean() > 0.3  # background and the head's edge stay dark
    # healing a healthy scan changes it about as little as reconstructing it
    recon = tmp_path / "recon.nii.gz"
    assert invoke("reconstruct", str(twin), "-o", str(recon), "--run", str(trained_run),
                  "--device", "cpu").exit_code == 0
    x = np.asarray(nib.load(twin).dataobj, np.float32)
    healed = np.asarray(nib.load(tmp_path / "healthy_healed.nii.gz").dataobj, np.float32)
    rec = np.asarray(nib.load(recon).dataobj, np.float32)
    assert np.abs(healed - x).mean() < 1.25 * np.abs(rec - x).mean()
    # same seed, same map; a brain mask zeroes the map outside it
    again = _heal(trained_run, img, tmp_path / "again.nii.gz", "--no-normalize")
    assert np.array_equal(again, sick)
    brain = tmp_path / "brain.nii.gz"
    half = np.zeros(mask.shape, np.uint8)
    half[:16] = 1
    nib.save(nib.Nifti1Image(half, nib.load(img).affine), brain)
    masked = _heal(trained_run, img, tmp_path / "masked.nii.gz", "--brain-mask", str(brain), "--no-normalize")
    assert (masked[16:] == 0).all() and np.allclose(masked[:16], sick[:16])


def test_heal_bad_input(trained_run: Path, lesion_root: Path, phantom_root: Path, tmp_path: Path) -> None:
    img, _ = _lesion_subject(lesion_root, "wmh")
    out = tmp_path / "m.nii.gz"

    def bad(*args: str, match: str) -> None:
        res = invoke("score", str(img), "-o", str(out), "--run", str(trained_run), "--heal", "--device", "cpu",
                     *args)
        assert res.exit_code == 2 and match in res.output, res.output
        assert not out.exists()

    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), other)
    bad("--brain-mask", str(other), match="8x8x8 but the input is 32x32x32")
    empty = tmp_path / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.uint8), np.eye(4)), empty)
    bad("--brain-mask", str(empty), match="is empty")
    bad("--brain-mask", str(tmp_path / "nope.nii.gz"), match="does not exist")
    bad("--threshold", "1.5", match="probability")
    bad("--resamples", "0", match="resamples")
    bad("--healed", str(out), match="--healed")
    bad("--healed", str(tmp_path / "h.npz"), match="must end in")
    res = invoke("score", str(img), "-o", str(out), "--run", str(trained_run), "--brain-mask", str(other))
    assert res.exit_code == 2 and "go with --heal" in res.output
    # a run without a prior
    run = tmp_path / "vq"
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--stage", "vqvae", "--max-steps", "2", *TINY)
    assert res.exit_code == 0, res.output
    res = invoke("score", str(img), "-o", str(out), "--run", str(run), "--heal", "--device", "cpu")
    assert res.exit_code == 2 and "no trained prior" in res.output
    res = invoke("eval", "--anomaly", "--run", str(run), "--dataset", "phantom-lesions", "--root", str(lesion_root))
    assert res.exit_code == 2 and "no trained prior" in res.output


@pytest.mark.slow
def test_eval_anomaly_table_json_pictures_and_bad_input(trained_run: Path, lesion_root: Path,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    args = ["eval", "--anomaly", "--run", str(trained_run), "--root", str(lesion_root), "--device", "cpu",
            "--threshold", "0.2", "--resamples", "2"]
    res = invoke(*args, "--dataset", "phantom-lesions:val", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "healed" in res.output and "residual" in res.output and "per lesion kind" in res.output
    m = json.loads(out.read_text())
    assert m["n_subjects"] == 3 and m["n_calibration"] == 3  # half measured, half for the threshold
    assert m["heal"]["calibrate"] is True  # the run has an intensity calibration: healing uses it by default
    for key in ("auprc", "auroc", "best_dice", "dice"):
        assert 0 <= m[key] <= 1
    for meth in ("healed", "residual", "nll"):
        t = m["methods"][meth]
        assert set(t["pooled"]) >= {"auprc", "auroc", "best_dice", "dice"} and t["threshold"] is not None
        kinds = {s["kind"] for s in t["subjects"].values()}
        assert len(t["subjects"]) == 3 and kinds <= {"tumour", "wmh", "artefact"}
        assert sum(k["n_subjects"] for k in t["kinds"].values()) == 3
        assert sum(k["n_subjects"] for k in t["sizes"].values()) == 3
    assert m["methods"]["healed"]["pooled"]["auprc"] == m["auprc"]
    pictures = sorted((tmp_path / "a_pictures").glob("*.png"))
    assert [p.stem for p in pictures] == sorted(m["methods"]["healed"]["subjects"])
    # :all has no calibration split, hence no calibrated Dice
    res = invoke(*args, "--dataset", "phantom-lesions:all", "--json", str(tmp_path / "all.json"))
    assert res.exit_code == 0, res.output
    m_all = json.loads((tmp_path / "all.json").read_text())
    assert m_all["n_subjects"] == 6 and m_all["dice"] is None
    # bad input: one line, exit 2, nothing overwritten
    before = out.read_bytes()
    for extra, match in ((["--dataset", "phantom-lesions:val", "--json", str(out)], "already exists"),
                         (["--dataset", "phantom"], "no lesion masks"),
                         (["--dataset", "phantom-lesions:test"], "not one of"),
                         (["--dataset", "nosuch"], "not fetched"),
                         (["--dataset", "phantom-lesions", "--samples", str(tmp_path)], "separate")):
        res = invoke(*args, *extra)
        assert res.exit_code == 2 and match in res.output, (extra, res.output)
    assert out.read_bytes() == before


def test_head_mask_keeps_voids_inside_the_head_and_drops_the_edge() -> None:
    import torch

    from mrivq.inference.heal import HealOptions, erode_mask, fill_mask_holes

    head = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    head[0, 0, 2:10, 2:10, 2:10] = True
    head[0, 0, 5:7, 5:7, 5:7] = False  # a signal void inside
    filled = fill_mask_holes(head)
    assert filled[0, 0, 5:7, 5:7, 5:7].all() and filled.sum() == 8 ** 3
    eroded = erode_mask(filled, 1)
    assert eroded.sum() == 6 ** 3 and eroded[0, 0, 2].sum() == 0
    import mrivq.cli.common as cli

    assert (cli.HEAL_THRESHOLD, cli.HEAL_SMOOTH) == (HealOptions().threshold, HealOptions().smooth)  # one default
    for bad in ({"threshold": 0.0}, {"resamples": 0}, {"temperature": 0.0}, {"background": 1.0}, {"erode": -1}):
        with pytest.raises(MrivqError):
            HealOptions(**bad).validate()


def test_zscore_flagging_and_smoothing(trained_run: Path, lesion_root: Path, tmp_path: Path) -> None:
    import torch

    from mrivq.inference.heal import nll_reference, smooth_map
    from mrivq.runs.folder import load_codes
    from mrivq.runs.run import load_run

    img, _ = _lesion_subject(lesion_root, "tumour")
    plain = _heal(trained_run, img, tmp_path / "p.nii.gz")
    z = _heal(trained_run, img, tmp_path / "z.nii.gz", "--zscore", "1")
    smooth = _heal(trained_run, img, tmp_path / "s.nii.gz", "--zscore", "1", "--smooth", "1")
    assert z.shape == plain.shape and z.max() > 0 and smooth.max() < z.max()  # blurred peaks are lower
    # the reference: per-position mean and SD of the training codes' NLL
    r = load_run(trained_run, need_prior=True)
    codes = load_codes(trained_run / "codes" / "codes.pt")["train"].long()
    mean, std = nll_reference(r.prior, codes)
    assert mean.shape == codes.shape[1:] and (std > 0).all()
    # a Gaussian blur keeps the total and spreads a point evenly along every axis
    t = torch.zeros(1, 1, 9, 9, 9)
    t[0, 0, 4, 4, 4] = 1
    b = smooth_map(t, 1.0)
    assert abs(float(b.sum()) - 1) < 1e-5 and float(b[0, 0, 4, 4, 4]) < 1
    assert torch.allclose(b[0, 0, 3, 4, 4], b[0, 0, 4, 3, 4]) and torch.allclose(b[0, 0, 4, 3, 4], b[0, 0, 4, 4, 5])
    res = invoke("score", str(img), "-o", str(tmp_path / "bad.nii.gz"), "--run", str(trained_run), "--heal",
                 "--zscore", "-1")
    assert res.exit_code == 2 and "--zscore" in res.output


class _Halving(__import__("torch").nn.Module):
    """A stand-in VQ-VAE whose "codes" are the input and whose decoder halves them: its residual
    ``|x - D(E(x))|`` is ``|x| / 2``, known by hand."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # a device to decode on

    def encode_indices(self, x):  # noqa: ANN001, ANN201
        return x

    def decode_indices(self, i):  # noqa: ANN001, ANN201
        return i * 0.5


def test_residual_reference_is_the_per_voxel_mean_and_sd_of_healthy_residuals() -> None:
    import torch

    from mrivq.inference.heal import MIN_RESIDUAL_STD, residual_reference

    g = torch.Generator().manual_seed(0)
    vols = torch.rand(5, 2, 4, 5, 6, generator=g)
    vols[:, :, 0] = 0.3  # one plane the same in every scan: its SD is floored
    mean, std = residual_reference(_Halving(), [vols[:2], vols[2:3], vols[3:]])  # batches of any size
    r = (vols / 2).mean(1, keepdim=True)
    assert mean.shape == std.shape == (1, 1, 4, 5, 6)
    assert torch.allclose(mean[0], r.mean(0), atol=1e-6)
    assert torch.allclose(std[0, :, 1:], r.std(0)[:, 1:].clamp_min(MIN_RESIDUAL_STD), atol=1e-6)
    assert torch.all(std[0, 0, 0] == MIN_RESIDUAL_STD)
    with pytest.raises(MrivqError, match="at least 2"):
        residual_reference(_Halving(), [vols[:1]])
    with pytest.raises(MrivqError, match="one grid"):
        residual_reference(_Halving(), [vols[:2], torch.rand(1, 2, 4, 5, 7)])


@pytest.mark.slow
def test_normalized_healing_scores_residuals_against_healthy_scans(
        trained_run: Path, lesion_root: Path, tmp_path: Path) -> None:
    import shutil
    from dataclasses import replace

    import torch

    from mrivq.inference.files import RESIDUAL_REFERENCE_FILE, prepare_input, resolve_heal, run_residual_reference
    from mrivq.inference.heal import HealOptions, heal
    from mrivq.runs.run import load_run

    img, mask_path = _lesion_subject(lesion_root, "tumour")
    plain = _heal(trained_run, img, tmp_path / "p.nii.gz", "--no-normalize")
    norm = _heal(trained_run, img, tmp_path / "n.nii.gz", "--normalize")
    mask = np.asarray(nib.load(mask_path).dataobj) > 0
    assert norm.shape == plain.shape and not np.allclose(norm, plain) and norm.min() >= 0
    assert norm[mask].mean() > norm[~mask].mean()
    # the default: normalized, as the run's dataset is there
    assert np.array_equal(_heal(trained_run, img, tmp_path / "d.nii.gz"), norm)
    r = load_run(trained_run, need_prior=True)
    assert resolve_heal(r, HealOptions()).normalize is True
    assert resolve_heal(r, HealOptions(normalize=False)).normalize is False
    # the reference: the run's validation scans, once per loaded run and calibration setting, kept in the run
    opts = resolve_heal(r, HealOptions())
    mean, std = run_residual_reference(r, opts)
    assert run_residual_reference(r, opts)[0] is mean and (std > 0).all()
    stored = torch.load(trained_run / RESIDUAL_REFERENCE_FILE, weights_only=True)
    assert stored["vqvae_sha256"] == r.checkpoints["vqvae"] and torch.equal(stored["calibrated"]["mean"], mean)
    # a copy of the run without its dataset: the stored reference still serves; without it the default is off
    # and an explicit --normalize is a one-line error
    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    info = json.loads((moved / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps({**info, "data_dir": str(tmp_path / "gone")}))
    m = load_run(moved, need_prior=True)
    assert torch.equal(run_residual_reference(m, resolve_heal(m, HealOptions()))[1], std)
    (moved / RESIDUAL_REFERENCE_FILE).write_bytes(b"not a reference")
    assert resolve_heal(load_run(moved, need_prior=True), HealOptions()).normalize is False
    assert np.array_equal(_heal(moved, img, tmp_path / "m.nii.gz"), plain)
    res = invoke("score", str(img), "-o", str(tmp_path / "x.nii.gz"), "--run", str(moved), "--heal", "--normalize")
    assert res.exit_code == 2 and "--no-normalize" in res.output and "Traceback" not in res.output
    # by hand: against mean 0 and SD 1 the normative residual is the raw one; against its own residual
    # as the mean, 0; the plain baseline stays raw either way
    x, _ = prepare_input(r, img, torch.device("cpu"))
    o = HealOptions(smooth=0, resamples=1, threshold=0.2)
    raw = heal(r.vqvae, r.prior, x, o)
    assert "normative_residual" not in raw
    raw = raw["recon_residual"]
    unit = heal(r.vqvae, r.prior, x, o, residual_ref=(torch.zeros_like(mean), torch.ones_like(std)))
    assert torch.allclose(unit["normative_residual"], raw) and torch.equal(unit["recon_residual"], raw)
    own = heal(r.vqvae, r.prior, x, replace(o, normalize=True), residual_ref=(raw, torch.ones_like(std)))
    assert float(own["normative_residual"].max()) == 0
    with pytest.raises(MrivqError, match="healthy scans"):
        heal(r.vqvae, r.prior, torch.zeros(1, 1, *mean.shape[2:]), HealOptions(normalize=True))
    with pytest.raises(MrivqError, match="grid"):
        heal(r.vqvae, r.prior, torch.zeros(1, 1, *mean.shape[2:]), HealOptions(normalize=True),
             residual_ref=(mean[..., :-1], std[..., :-1]))
    # `eval --anomaly` records it and measures the normative residual beside the plain baseline
    js = {}
    for flag in ("--normalize", "--no-normalize"):
        out = tmp_path / f"an{flag}.json"
        res = invoke("eval", "--anomaly", "--run", str(trained_run), "--dataset", "phantom-lesions:all",
                     "--root", str(lesion_root), flag, "--smooth", "0", "--threshold", "0.2",
                     "--resamples", "1", "--device", "cpu", "--json", str(out))
        assert res.exit_code == 0, res.output
        js[flag] = json.loads(out.read_text())
    assert js["--normalize"]["heal"]["normalize"] is True and js["--no-normalize"]["heal"]["normalize"] is False
    assert set(js["--normalize"]["methods"]) == {"healed", "residual", "nll", "normative"}
    assert "normative" not in js["--no-normalize"]["methods"]
    assert js["--normalize"]["methods"]["residual"] == js["--no-normalize"]["methods"]["residual"]


def test_lesion_phantoms_are_never_training_subjects(trained_run: Path, lesion_root: Path,
                                                     tmp_path: Path) -> None:
    """Lesion phantoms are a cohort of their own (ids ``sub-les*``, anatomy from another stream, for any
    seed); `eval --anomaly` refuses subjects that are, by id or healthy anatomy, in the run's split (a
    lesion dataset made with the healthy phantom's seed and stream) unless --allow-overlap."""
    import shutil

    from mrivq.datasets.phantom import LESION_COHORT, generate_subject
    from mrivq.evaluate.anomaly import overlapping_subjects
    from mrivq.runs.run import load_run

    ddir = lesion_root / "phantom-lesions"
    meta = json.loads((ddir / "phantom.json").read_text())
    assert meta["cohort"] == LESION_COHORT and all(s["subject"].startswith("sub-les") for s in meta["subjects"])
    healthy = generate_subject(0, seed=0, shape=(16, 16, 16), spacing=12.0, modalities=("t1",))["t1"]
    for seed in (0, 5):
        les = generate_subject(0, seed=seed, shape=(16, 16, 16), spacing=12.0, modalities=("t1",), cohort=1)["t1"]
        assert not np.allclose(les, healthy)
    r = load_run(trained_run, need_prior=True)
    assert overlapping_subjects(r, ddir, [s["subject"] for s in meta["subjects"]]) == []
    assert overlapping_subjects(r, ddir, ["sub-0000"]) == ["sub-0000"]  # an id of the run's split
    old = lesion_root / "phantom-lesions-old"
    shutil.copytree(ddir, old)
    (old / "phantom.json").write_text(json.dumps({**meta, "seed": 0, "cohort": 0}))
    args = ["eval", "--anomaly", "--run", str(trained_run), "--root", str(lesion_root), "--device", "cpu",
            "--dataset", "phantom-lesions-old:all", "--threshold", "0.2", "--resamples", "1",
            "--json", str(tmp_path / "o.json")]
    res = invoke(*args)
    assert res.exit_code == 2 and "6 subject(s) of phantom-lesions-old" in res.output
    assert "--allow-overlap" in res.output and not (tmp_path / "o.json").exists()
    res = invoke(*args, "--allow-overlap")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o.json").read_text())
    assert m["overlap"] == {"subjects": sorted(s["subject"] for s in meta["subjects"]), "allowed": True}


def test_zscore_reference_is_the_validation_codes(trained_run: Path) -> None:
    import torch

    from mrivq.inference.files import RESIDUAL_REFERENCE_MIN, run_nll_reference
    from mrivq.inference.heal import nll_reference
    from mrivq.runs.run import load_run

    r = load_run(trained_run, need_prior=True)
    codes = torch.load(trained_run / "codes" / "codes.pt", weights_only=True)
    val = codes["val"]
    want = torch.cat([val, codes["train"][:max(0, RESIDUAL_REFERENCE_MIN - len(val))]])
    mean, std = run_nll_reference(r)
    ref_mean, ref_std = nll_reference(r.prior, want.long())
    assert torch.allclose(mean, ref_mean) and torch.allclose(std, ref_std)
    train_mean, _ = nll_reference(r.prior, codes["train"].long())
    assert not torch.allclose(mean, train_mean)
