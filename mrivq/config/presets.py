"""Run configuration: presets (``configs/*.yaml``), config files and ``key=value`` overrides.

A config is a plain nested dict with sections ``data`` (the preprocessing, see
:class:`mrivq.data.preprocess.Preprocess`), ``model`` (VQ-VAE arguments), ``train`` (stage-1 loop) and ``prior``
(``model`` and ``train`` of stage 2). Presets may name a base (``base: other-preset``) and a stage-1
preset may name the prior preset that goes with it (``prior_preset: prior3d-cpu``).
Overrides are dotted ``key=value`` pairs parsed as YAML scalars, as in nanoGPT's configurator:
``--set train.lr=1e-3 --set model.channels=[16,32]``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from mrivq.utils.errors import MrivqError
from mrivq.utils.limits import read_yaml_file
from mrivq.utils.paths import configs_dir


def list_presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    if not path.exists():
        raise MrivqError(f"{what} {path} does not exist; check the path")
    data = read_yaml_file(path, f"{what} {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MrivqError(f"{what} {path} must be a YAML mapping of sections (data, model, train, prior)")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """Load a shipped preset by name, resolving ``base:`` chains."""
    path = configs_dir() / f"{name}.yaml"
    if not path.is_file():
        raise MrivqError(f"unknown preset {name!r}; choose one of: {', '.join(list_presets())}")
    return _resolve_base(_read_yaml(path, "preset"), _seen + (name,))


def load_config_file(path: str | Path) -> dict:
    """Load a user's config file (same schema as a preset; may name a ``base`` preset)."""
    return _resolve_base(_read_yaml(Path(path), "config file"), ())


def _resolve_base(cfg: dict, seen: tuple[str, ...]) -> dict:
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    if base in seen:
        raise MrivqError(f"preset {base!r} includes itself via 'base'; fix the chain {' -> '.join(seen)}")
    return deep_merge(load_preset(base, seen), cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=1e-3'`` -> (['train', 'lr'], 0.001)."""
    if "=" not in text:
        raise MrivqError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-3")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise MrivqError(f"override {text!r} has an empty key; use section.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    # YAML reads 1e-3 as a string; numbers written that way are still numbers to a user.
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return parts, parsed


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key=value`` overrides to a copy of ``cfg``."""
    out = copy.deepcopy(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            if not isinstance(node.setdefault(p, {}), dict):
                raise MrivqError(f"override {text!r}: {p!r} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def default_preset(dataset: str, dims: int, device: str) -> str:
    """The preset used when ``--preset`` is not given."""
    if dims == 2:
        if dataset in ("cifar10",):
            return "vqvae2d-cifar"
        return "vqvae2d-mnist"
    return "vqvae3d-t1" if device == "cuda" else "vqvae3d-cpu"
