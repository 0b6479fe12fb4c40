"""Continuous covariates of the prior (``data.covariates=[age]``): reading, standardising, training,
sampling and scoring with ``--covariate age=70``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mrivq.data.covariates import fit_covariates, parse_covariates, standardise, subject_covariates
from mrivq.data.manifest import load_manifest
from mrivq.models.pixelcnn import GatedPixelCNN
from mrivq.utils.errors import MrivqError
from tests.helpers import TINY, invoke


def test_values_are_read_standardised_and_imputed() -> None:
    rows = [{"subject": "a", "age": "20"}, {"subject": "b", "age": "40.0"}, {"subject": "c", "age": ""},
            {"subject": "d", "age": "NaN"}]
    raw = subject_covariates(rows, ["age"])
    assert raw == {"a": [20.0], "b": [40.0], "c": [None], "d": [None]}
    spec = fit_covariates(raw, ["age"])
    assert spec == {"columns": ["age"], "mean": [30.0], "std": [10.0], "missing": {"age": 2}}
    assert standardise(spec, [50.0]) == [2.0]
    assert standardise(spec, [None]) == [0.0]  # imputed with the training mean
    const = fit_covariates({"a": [5.0], "b": [5.0]}, ["x"])
    assert const["std"] == [1.0] and standardise(const, [5.0]) == [0.0]


def test_bad_columns_are_one_line_errors() -> None:
    rows = [{"subject": "a", "sex": "F", "age": "20"}]
    with pytest.raises(MrivqError, match=r"column 'sex' is not numeric .*'F'.*data.condition_on=sex"):
        subject_covariates(rows, ["sex"])
    with pytest.raises(MrivqError, match=r"no column 'weight'; columns: age, sex"):
        subject_covariates(rows, ["weight"])
    with pytest.raises(MrivqError, match="no training subject has a value in column 'age'"):
        fit_covariates({"a": [None]}, ["age"])


def test_parse_fills_training_means_and_rejects_unknown_names() -> None:
    spec = {"columns": ["age", "tiv"], "mean": [50.0, 1400.0], "std": [10.0, 100.0]}
    assert parse_covariates(spec, {"age": 70}, "r") == {"age": 70.0, "tiv": 1400.0}
    assert parse_covariates(spec, None, "r") == {"age": 50.0, "tiv": 1400.0}
    with pytest.raises(MrivqError, match="--covariate bmi is not a covariate of run r; it has: age, tiv"):
        parse_covariates(spec, {"bmi": 1.0}, "r")
    assert parse_covariates(None, None, "r") == {}
    with pytest.raises(MrivqError, match="run r has no covariates; drop --covariate"):
        parse_covariates(None, {"age": 3.0}, "r")


def test_prior_learns_a_covariate_dependence() -> None:
    """Position 0 has no context: only the covariate can tell the prior which code comes first."""
    torch.manual_seed(0)
    prior = GatedPixelCNN(spatial_dims=2, num_embeddings=4, channels=16, num_layers=2, num_covariates=1)
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    cov = torch.tensor([[1.0], [-1.0]]).repeat(8, 1)
    tokens = torch.where(cov[:, 0] > 0, 3, 1)[:, None, None].expand(-1, 4, 4).contiguous()
    for _ in range(60):
        loss = F.cross_entropy(prior(tokens, {"covariates": cov}), tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p0 = prior(tokens[:2], {"covariates": cov[:2]}).softmax(1)[:, :, 0, 0]
    assert p0[0, 3] > 0.9 and p0[1, 1] > 0.9


def _train(root: Path, run: Path, *extra: str):
    return invoke("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu", "--out",
                  str(run), "--device", "cpu", "--max-steps", "4", "--prior-max-steps", "3", *TINY, *extra)


def test_train_synth_and_score_with_an_age_covariate(phantom_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = _train(phantom_root, run, "--set", "data.covariates=[age]")
    assert res.exit_code == 0, res.output
    info = json.loads((run / "run.json").read_text())
    assert info["model_config"]["prior"]["num_covariates"] == 1
    cov = info["covariates"]
    # fitted on the training subjects only, in the order the code cache holds them
    codes = torch.load(run / "codes" / "codes.pt", weights_only=True)
    ages = {r["subject"]: float(r["age"]) for r in load_manifest(phantom_root / "phantom")}
    train_ages = [ages[s] for s in codes["train_subjects"]]
    assert cov["columns"] == ["age"] and cov["missing"] == {"age": 0}
    assert math.isclose(cov["mean"][0], sum(train_ages) / len(train_ages), rel_tol=1e-9)
    assert set(codes["val_subjects"]).isdisjoint(codes["train_subjects"])

    out = tmp_path / "synth"
    res = invoke("synth", "--run", str(run), "--count", "2", "--out", str(out), "--covariate", "age=70",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "synth_0001.json").read_text())["covariates"] == {"age": 70.0}
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s2"), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s2" / "synth_0000.json").read_text())["covariates"] == {"age": cov["mean"][0]}
    for bad, msg in (("weight=3", "--covariate weight is not a covariate"),
                     ("age", "--covariate 'age' is not NAME=NUMBER"), ("age=old", "is not NAME=NUMBER")):
        res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "bad"), "--covariate",
                     bad, "--device", "cpu")
        assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "bad").exists()  # rejected before anything was created

    img = sorted((phantom_root / "phantom").rglob("*t1*.nii.gz"))[0]
    nll = []
    for age in ("25", "80"):
        res = invoke("score", str(img), "-o", str(tmp_path / f"nll{age}.nii.gz"), "--run", str(run),
                     "--covariate", f"age={age}", "--device", "cpu")
        assert res.exit_code == 0, res.output
        nll.append(float(res.output.split("mean NLL ")[1].split()[0]))
    assert nll[0] != nll[1]  # the covariate reaches the prior


def test_covariate_errors_at_train_time(phantom_root: Path, tmp_path: Path) -> None:
    res = _train(phantom_root, tmp_path / "a", "--set", "data.covariates=[sex]")
    assert res.exit_code == 2 and "not numeric" in res.output and "data.condition_on=sex" in res.output
    res = _train(phantom_root, tmp_path / "b", "--set", "prior.model.num_covariates=2")
    assert res.exit_code == 2 and "data.covariates is not" in res.output
    res = _train(phantom_root, tmp_path / "c", "--set", "data.covariates=[age]",
                 "--set", "prior.model.num_covariates=3")
    assert res.exit_code == 2 and "num_covariates is 3" in res.output


def test_unconditional_run_rejects_covariates(phantom_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(phantom_root, run).exit_code == 0
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "s"), "--covariate", "age=3",
                 "--device", "cpu")
    assert res.exit_code == 2 and "has no covariates; drop --covariate" in res.output


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_covariate_is_refused(value: float) -> None:
    """``--covariate age=nan`` is refused: nothing is conditioned on NaN and no NaN reaches the JSON sidecar."""
    spec = {"columns": ["age"], "mean": [50.0], "std": [10.0], "missing": {"age": 0}}
    with pytest.raises(MrivqError, match="is not a finite number"):
        parse_covariates(spec, {"age": value}, "run")
