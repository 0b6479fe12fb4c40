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
