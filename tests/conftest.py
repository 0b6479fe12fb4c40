"""Shared fixtures: a real HTTP file server on 127.0.0.1 and a fresh data root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.httpserver import FileServer


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
    """The tiny phantom (6 subjects, 32³ at 6 mm) and one tiny run trained on it, built once per test
    session. Tests never use them directly: ``phantom_root`` and ``trained_run`` hand each test module
    its own copy, so a module that changes its run or data changes nobody else's."""
    from tests.test_train_cli import TINY, invoke

    root = tmp_path_factory.mktemp("pristine-data")
    res = invoke("fetch", "phantom", "--root", str(root), "--count", "6", "--shape", "32", "32", "32",
                 "--spacing", "6")
    assert res.exit_code == 0, res.output
    run = tmp_path_factory.mktemp("pristine-runs") / "r1"
    res = invoke("train", "--dataset", "phantom", "--root", str(root), "--preset", "vqvae3d-cpu",
                 "--out", str(run), "--device", "cpu", "--max-steps", "8", "--prior-max-steps", "6", *TINY)
    assert res.exit_code == 0, res.output
    return root, run
