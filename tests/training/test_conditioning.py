"""Class-conditional priors on a manifest column (``data.condition_on``: site, sex, modality...)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest

from mrivq.data.items import item_label
from mrivq.data.manifest import condition_items, load_manifest, pool_rows
from mrivq.data.preprocess import Preprocess
from mrivq.utils.errors import MrivqError
from tests.helpers import TINY, invoke


def test_condition_items_maps_values_to_ids() -> None:
    items = [{"subject": "a", "site": "IOP"}, {"subject": "b", "site": "Guys"}, {"subject": "c", "site": "HH"},
             {"subject": "d", "site": "Guys"}]
    out, names = condition_items(items, "site")
    assert names == ["Guys", "HH", "IOP"]
    assert [it["label"] for it in out] == ["2", "0", "1", "0"]
    assert [item_label(it) for it in out] == [2, 0, 1, 0]
    _, names = condition_items([{"m": "t2"}, {"m": "t1"}], "m", order=["t2", "t1", "pd"])
    assert names == ["t2", "t1"]  # the given order first; absent values dropped
    _, names = condition_items([{"x": "10"}, {"x": "2"}], "x")
    assert names == ["2", "10"]


def test_condition_items_needs_a_value_everywhere() -> None:
    with pytest.raises(MrivqError, match=r"condition_on=site: 1 of 2 images have no 'site'.*sex"):
        condition_items([{"site": "HH", "sex": "F"}, {"sex": "M"}], "site")


def test_pool_rows_gives_one_item_per_modality() -> None:
    rows = [{"subject": s, "modality": m, "path": f"{s}-{m}.nii.gz"} for s in ("a", "b") for m in ("t1", "t2")]
    items = pool_rows(rows, ["t1", "t2"])
    assert sorted((it["subject"], it["modality"], len(it["sources"])) for it in items) == [
        ("a", "t1", 1), ("a", "t2", 1), ("b", "t1", 1), ("b", "t2", 1)]
    assert Preprocess(modalities=["t1", "t2"], pool_modalities=True).channels == 1
    assert Preprocess(modalities=["t1", "t2"]).channels == 2


def _train(root: Path, run: Path, *extra: str) -> None:
    res = invoke("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--max-steps", "4", "--prior-max-steps", "3", *TINY, *extra)
    assert res.exit_code == 0, res.output


def test_prior_conditioned_on_modality(phantom_root: Path, tmp_path: Path) -> None:
    """One 1-channel VQ-VAE over T1 and T2 images; a prior with one class per modality; synth by name."""
    run = tmp_path / "run"
    _train(phantom_root, run, "--modality", "t1", "--modality", "t2", "--set", "data.pool_modalities=true",
           "--set", "data.condition_on=modality")
    info = json.loads((run / "run.json").read_text())
    assert info["classes"] == {"column": "modality", "names": ["t1", "t2"]}
    assert info["in_channels"] == 1 and info["model_config"]["prior"]["num_classes"] == 2
    assert info["n_train"] + info["n_val"] == 12  # 6 subjects x 2 modalities
    out = tmp_path / "synth"
    res = invoke("synth", "--run", str(run), "--count", "2", "--out", str(out), "--class", "t2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    side = json.loads((out / "synth_0000.json").read_text())
    assert side["class"] == 1 and side["class_name"] == "t2"
    assert nib.load(out / "synth_0001.nii.gz").shape == (32, 32, 32)
    by_mod = info["intensity"]["by_modality"]
    assert sorted(by_mod) == ["t1", "t2"] and by_mod["t1"]["hi"] != by_mod["t2"]["hi"]
    vals = nib.load(out / "synth_0000.nii.gz").get_fdata()
    assert vals.max() <= by_mod["t2"]["hi"][0] + 1e-3 and vals.min() >= by_mod["t2"]["lo"][0] - 1e-3
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "bad"), "--class", "flair",
                 "--device", "cpu")
    assert res.exit_code == 2 and "--class flair is not a class" in res.output and "1 (t2)" in res.output
    # without --class the samples cycle through the classes
    res = invoke("synth", "--run", str(run), "--count", "2", "--out", str(tmp_path / "cyc"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    names = [json.loads((tmp_path / "cyc" / f"synth_000{i}.json").read_text())["class_name"] for i in (0, 1)]
    assert names == ["t1", "t2"]
    # eval reports each modality on its own as well as the mix
    res = invoke("eval", "--run", str(run), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "per class" in res.output and "t2" in res.output
    ev = json.loads((run / "eval_val.json").read_text())
    assert sorted(ev["by_class"]) == ["t1", "t2"]
    assert sum(m["n_images"] for m in ev["by_class"].values()) == ev["n_images"] == info["n_val"]
    assert ev["by_class"]["t1"]["psnr"] != ev["by_class"]["t2"]["psnr"]


def test_prior_conditioned_on_a_manifest_column(phantom_root: Path, tmp_path: Path) -> None:
    """The phantom's ``sex`` column stands in for IXI's ``site``: any manifest column works."""
    rows = load_manifest(phantom_root / "phantom")
    want = sorted({r["sex"] for r in rows})
    run = tmp_path / "run"
    _train(phantom_root, run, "--set", "data.condition_on=sex")
    info = json.loads((run / "run.json").read_text())
    assert info["classes"] == {"column": "sex", "names": want}
    assert info["model_config"]["prior"]["num_classes"] == len(want)
    img = sorted((phantom_root / "phantom").rglob("*t1*.nii.gz"))[0]
    res = invoke("score", str(img), "-o", str(tmp_path / "nll.nii.gz"), "--run", str(run), "--class", want[0],
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = invoke("score", str(img), "-o", str(tmp_path / "nll2.nii.gz"), "--run", str(run), "--device", "cpu")
    assert res.exit_code == 2 and "pass --class" in res.output and want[0] in res.output


def test_condition_on_modality_needs_pooling(phantom_root: Path, tmp_path: Path) -> None:
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(tmp_path / "r"), "--device", "cpu", "--max-steps", "2", *TINY,
                 "--modality", "t1", "--modality", "t2", "--set", "data.condition_on=modality")
    assert res.exit_code == 2 and "data.pool_modalities=true" in res.output


def test_num_classes_must_match_the_column(phantom_root: Path, tmp_path: Path) -> None:
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(tmp_path / "r"), "--device", "cpu", "--max-steps", "2", "--prior-max-steps", "2",
                 *TINY, "--set", "data.condition_on=sex", "--set", "prior.model.num_classes=5")
    assert res.exit_code == 2 and "num_classes is 5" in res.output
