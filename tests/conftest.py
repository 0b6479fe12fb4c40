"""Shared fixtures: one intra-op thread, a real HTTP file server on 127.0.0.1, a fresh data root, and the
tiny phantom and the tiny run trained on it (built once per pytest run, copied into each module that uses
them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY, invoke
from tests.httpserver import FileServer


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add synchronisation (and stall on a shared CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    """A threaded file server on 127.0.0.1 (see tests/httpserver.py for its switches and counters)."""
    with FileServer() as srv:
        yield srv


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """An empty data root (``--root``) inside the test's temporary folder."""
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def pristine_phantom_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny phantom (6 subjects, 32³ at 6 mm) and one tiny run trained on it, built once per pytest
    run. Tests never use them directly: ``phantom_root`` and ``trained_run`` hand each test module
    its own copy, so a module that changes its run or data changes nobody else's."""

    root = tmp_path_factory.mktemp("pristine-data")
    res = invoke("fetch", "phantom", "--root", str(root), "--count", "6", "--shape", "32", "32", "32",
                 "--spacing", "6")
    assert res.exit_code == 0, res.output
    run = tmp_path_factory.mktemp("pristine-runs") / "r1"
    res = invoke("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--max-steps", "8", "--prior-max-steps", "6", *TINY)
    assert res.exit_code == 0, res.output
    return root, run


@pytest.fixture(scope="module")
def phantom_root(pristine_phantom_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own copy of the shared tiny phantom (``mrivq fetch phantom --count 6 --shape 32 32 32
    --spacing 6``)."""
    import shutil

    root = tmp_path_factory.mktemp("data")
    shutil.copytree(pristine_phantom_run[0], root, dirs_exist_ok=True)
    assert (root / "phantom" / "manifest.csv").is_file()
    return root



@pytest.fixture(scope="module")
def trained_run(phantom_root: Path, pristine_phantom_run: tuple[Path, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's own copy of the shared tiny run (8 VQ-VAE and 6 prior steps on the phantom),
    pointing at this module's ``phantom_root``, as if it had been trained there."""
    import shutil

    from mrivq.runs.folder import write_json

    run = tmp_path_factory.mktemp("runs") / "r1"
    shutil.copytree(pristine_phantom_run[1], run)
    info = json.loads((run / "run.json").read_text())
    assert info["data_dir"] == str(pristine_phantom_run[0] / "phantom")
    write_json(run / "run.json", {**info, "data_dir": str(phantom_root / "phantom")})
    return run
