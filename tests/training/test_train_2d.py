"""2D path end to end: an MNIST-like IDX dataset from a user card, a class-conditional prior, PNG synth."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import invoke


def _idx(path: Path, arr: np.ndarray) -> None:
    magic = {3: 0x00000803, 1: 0x00000801}[arr.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 images of a bar whose orientation encodes the class (0-3): learnable, tiny."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    yy, xx = np.mgrid[:28, :28] - 13.5
    imgs = []
    for c in labels:
        ang = c * np.pi / 4 + rng.normal(0, 0.05)
        d = np.abs(-np.sin(ang) * xx + np.cos(ang) * yy)
        imgs.append(np.clip(255 * (1.5 - d), 0, 255) * (np.hypot(xx, yy) < 11))
    return np.stack(imgs), labels


@pytest.fixture(scope="module")
def mini_mnist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("src")
    files = []
    for split, n, seed in (("train", 48, 0), ("t10k", 16, 1)):
        x, y = _digits(n, seed)
        for kind, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            name = f"{split}-{kind}.gz"
            _idx(src / name, arr)
            md5 = hashlib.md5((src / name).read_bytes()).hexdigest()
            files.append(f"  - url: http://127.0.0.1:9/{name}\n    md5: {md5}\n")
    card = src / "minimnist.yaml"
    card.write_text(
        "name: minimnist\ntitle: tiny MNIST-like set\ndescription: test data\nlicence: CC0\ncitation: none\n"
        "homepage: http://127.0.0.1/\naccess: open\nlayout: idx\ndims: 2\nmodalities: [image]\nfiles:\n"
        + "".join(files))
    root = tmp_path_factory.mktemp("root")
    res = invoke("fetch", str(card), "--root", str(root), "--from", str(src))
    assert res.exit_code == 0, res.output
    return root, card


def test_2d_train_and_synth_pngs(mini_mnist: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = mini_mnist
    run = tmp_path / "run2d"
    res = invoke("train", "--dataset", "minimnist", "--root", str(root), "--dims", "2", "--preset", "vqvae2d-mnist",
                 "--out", str(run), "--device", "cpu", "--max-steps", "6", "--prior-max-steps", "4",
                 "--set", "model.channels=[8,16]", "--set", "model.num_res_channels=[8,16]",
                 "--set", "train.batch_size=8", "--set", "train.val_every=3", "--set", "train.warmup_steps=1",
                 "--set", "prior.model.channels=8", "--set", "prior.model.num_layers=2",
                 "--set", "prior.model.num_classes=4", "--set", "prior.train.batch_size=8",
                 "--set", "prior.train.val_every=2", "--set", "prior.train.warmup_steps=1")
    assert res.exit_code == 0, res.output
    out = tmp_path / "png"
    res = invoke("synth", "--run", str(run), "--count", "3", "--out", str(out), "--class", "2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    img = np.asarray(Image.open(out / "synth_0000.png"))
    assert img.shape[:2] == (28, 28)
    assert (out / "grid.png").is_file()
    res = invoke("synth", "--run", str(run), "--count", "1", "--out", str(tmp_path / "bad"), "--class", "7",
                 "--device", "cpu")
    assert res.exit_code == 2 and "--class 7" in res.output
