"""Where things live: the data root and the packaged cards and presets."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent.parent


def default_root() -> Path:
    """Data root: ``$MRIVQ_DATA``, else ``$XDG_DATA_HOME/mrivq``, else ``~/.local/share/mrivq``."""
    env = os.environ.get("MRIVQ_DATA")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "mrivq"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``--root`` if given, else :func:`default_root`."""
    return Path(root).expanduser() if root else default_root()


def _packaged(wheel_name: str, repo_name: str) -> Path:
    # Installed wheel: copies inside the package. Source checkout / editable install: repo folder.
    inside = _PKG / wheel_name
    if inside.is_dir():
        return inside
    return _PKG.parent / repo_name


def cards_dir() -> Path:
    """Folder holding the shipped dataset cards (``datasets/*.yaml``)."""
    return _packaged("_cards", "datasets")


def configs_dir() -> Path:
    """Folder holding the shipped presets (``configs/*.yaml``)."""
    return _packaged("_configs", "configs")
