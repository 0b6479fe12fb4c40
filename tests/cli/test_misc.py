"""Where data lives, preset choice, --config/--epochs, devices, TensorBoard, and the built wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mrivq.config import presets as C
from mrivq.utils.device import resolve_device
from mrivq.utils.errors import MrivqError
from mrivq.utils.paths import default_root, resolve_root
from tests.helpers import TINY, invoke

REPO = Path(__file__).resolve().parents[2]


def test_data_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MRIVQ_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "mrivq"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root() == tmp_path / "home" / ".local" / "share" / "mrivq"
    monkeypatch.setenv("MRIVQ_DATA", str(tmp_path / "env"))
    assert resolve_root(None) == tmp_path / "env"
    assert resolve_root(tmp_path / "flag") == tmp_path / "flag"  # --root wins


@pytest.mark.slow
def test_fetch_uses_mrivq_data(tmp_path: Path) -> None:
    env = {**os.environ, "MRIVQ_DATA": str(tmp_path / "env-root")}
    proc = subprocess.run([sys.executable, "-m", "mrivq", "fetch", "phantom", "--count", "2", "--shape", "16", "16",
                           "16", "--spacing", "12"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "env-root" / "phantom" / "manifest.csv").is_file()


def test_default_preset_choice() -> None:
    assert C.default_preset("ixi", 3, "cpu") == "vqvae3d-cpu"
    assert C.default_preset("ixi", 3, "cuda") == "vqvae3d-t1"
    assert C.default_preset("mnist", 2, "cpu") == "vqvae2d-mnist"
    assert C.default_preset("cifar10", 2, "cuda") == "vqvae2d-cifar"
    for name in ("vqvae3d-cpu", "vqvae3d-t1", "vqvae2d-mnist", "vqvae2d-cifar"):
        assert C.load_preset(name)["model"]["num_embeddings"] >= 64


def test_cuda_without_a_gpu_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MrivqError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(MrivqError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_config_file_and_epochs(phantom_root: Path, tmp_path: Path) -> None:
    """--config merges over the preset, --set over both; --epochs sets the step count from the data."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("train:\n  batch_size: 3\n  lr: 0.0005\nmodel:\n  num_embeddings: 16\n")
    run = tmp_path / "r"
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--config", str(cfg), "--out", str(run), "--device", "cpu", "--stage", "vqvae", "--epochs", "2",
                 *TINY, "--set", "train.batch_size=1")
    assert res.exit_code == 0, res.output
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 0.0005 and saved["train"]["batch_size"] == 1  # --set beats --config
    assert saved["model"]["num_embeddings"] == 32  # TINY's --set beats the file's 16
    assert saved["train"]["epochs"] == 2 and saved["train"]["max_steps"] is None
    info = json.loads((run / "run.json").read_text())
    step = torch.load(run / "checkpoints" / "vqvae_last.pt", weights_only=True)["step"]
    assert step == 2 * info["n_train"]  # batch 1: one step per training subject per epoch
    # both lengths at once: refused, not decided silently (neither wins)
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--preset", "vqvae3d-cpu",
                 "--out", str(tmp_path / "both"), "--device", "cpu", "--epochs", "2", "--max-steps", "5", *TINY)
    assert res.exit_code == 2 and "--max-steps and --epochs" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "both" / "checkpoints").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    res = invoke("train", "--dataset", "phantom", "--root", str(phantom_root), "--config", str(bad),
                 "--out", str(tmp_path / "r2"))
    assert res.exit_code == 2 and "bad.yaml" in res.output


def test_tensorboard_events(trained_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((trained_run / "tb").rglob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert any("vqvae" in t and "loss" in t for t in tags), tags
    assert any("val_psnr" in t for t in tags), tags


def test_wheel_ships_cards_and_presets(tmp_path: Path) -> None:
    """`pip install .` then `mrivq datasets` from anywhere: the cards and presets are in the wheel."""
    from hatchling.builders.wheel import WheelBuilder

    wheel = Path(next(WheelBuilder(str(REPO)).build(directory=str(tmp_path / "dist"), versions=["standard"])))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mrivq/_cards/ixi.yaml" in names and "mrivq/_configs/vqvae3d-cpu.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import mrivq.utils.paths as p, mrivq.datasets.catalog as c, mrivq.config.presets as k; "
            "print(p.cards_dir()); print(len(c.list_cards())); print(k.load_preset('vqvae3d-cpu')['data']['dims'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, n, dims = proc.stdout.split()
    assert Path(where) == site / "mrivq" / "_cards" and int(n) == len(list((REPO / "datasets").glob("*.yaml")))
    assert dims == "3"


def test_1mm_presets_build_with_their_code_grid() -> None:
    from mrivq.models.factory import build_prior, build_vqvae

    cfg = C.load_preset("vqvae3d-t1-1mm")
    assert cfg["data"]["spacing"] == [1.0, 1.0, 1.0] and cfg["prior_preset"] == "prior3d-t1-1mm"
    vq = build_vqvae(cfg, 1)
    assert vq.checkpointing and vq.latent_shape(cfg["data"]["shape"]) == (20, 24, 20)
    prior_cfg = {"prior": C.load_preset(cfg["prior_preset"])["prior"]}
    prior = build_prior(prior_cfg, 3, vq.num_embeddings, (20, 24, 20))
    assert prior.config["attention_every"] == 6 and tuple(prior.config["latent_shape"]) == (20, 24, 20)
