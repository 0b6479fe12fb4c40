"""The config of a ``mrivq train`` call: assembled for a new run, checked and updated for an existing one.

A new run's config is the preset (by dataset, dims and device unless named), a user's config file on
top, the prior preset it names, the modalities (``t1`` by default, else the dataset's only one) and the
``--set`` overrides. An existing run's config is fixed at creation: continuing it may only change how long
and how often it trains and logs (:data:`RESUMABLE`); anything else given again must agree with the run,
or the call is refused with the command that would do what was meant.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrivq.config import presets as C
from mrivq.config.schema import validate
from mrivq.runs.folder import new_run_dir, read_config, read_run_info
from mrivq.utils.errors import MrivqError, RunError

#: ``--set`` keys an existing run accepts: they change the schedule's length, logging or speed, not
#: what is learned from which data (the learning-rate schedule follows the new length).
RESUMABLE = {f"{section}.{key}" for section in ("train", "prior.train")
             for key in ("max_steps", "epochs", "val_every", "ckpt_every", "log_every", "preview_every",
                         "threads", "amp", "cache", "workers", "cache_workers")}


@dataclass
class TrainRequest:
    """What ``mrivq train`` was asked for; ``None`` means not given on the command line."""

    dataset: str | None = None
    modalities: list[str] | None = None
    dims: int | None = None
    preset: str | None = None
    config: Path | None = None
    overrides: list[str] | None = None


def default_modality(data_dir: Path) -> str:
    """``t1`` when the dataset has it, else its only modality; several others -> ask."""
    with open(data_dir / "manifest.csv", newline="") as f:
        mods = sorted({row.get("modality", "") for row in csv.DictReader(f)} - {""})
    if "t1" in mods or not mods:
        return "t1"
    if len(mods) == 1:
        return mods[0]
    raise MrivqError(f"{data_dir.name} has modalities {', '.join(mods)}; choose with --modality")


def new_run_config(req: TrainRequest, data_root: Path, device_type: str) -> tuple[dict, Path]:
    """The resolved config of a new run and its dataset folder."""
    dataset = req.dataset or "ixi"
    dims = 3 if req.dims is None else int(req.dims)
    if dims not in (2, 3):
        raise MrivqError(f"--dims {dims} is not supported; use 2 or 3")
    data_dir = Path(data_root) / dataset
    if not (data_dir / "manifest.csv").is_file():
        raise MrivqError(f"dataset {dataset!r} is not fetched under {data_dir.parent}; run `mrivq fetch "
                         f"{dataset}` first, or try `--dataset phantom` after `mrivq fetch phantom`")
    modalities = list(req.modalities) if req.modalities else [default_modality(data_dir)]
    name = req.preset or C.default_preset(dataset, dims, device_type)
    cfg = C.load_preset(name)
    if req.config:
        cfg = C.deep_merge(cfg, C.load_config_file(req.config))
    prior_name = cfg.pop("prior_preset", None)
    if prior_name and "prior" not in cfg:
        cfg["prior"] = C.load_preset(prior_name).get("prior", {})
    cfg.setdefault("data", {})
    cfg["data"]["modalities"] = modalities
    if cfg["data"].get("dims", dims) != dims:
        raise MrivqError(f"preset {name!r} is for {cfg['data']['dims']}D data but --dims {dims} was given; "
                         f"pick a {dims}D preset (see configs/)")
    cfg["data"]["dims"] = dims
    cfg = C.apply_overrides(cfg, req.overrides or [])
    cfg["preset"] = name
    validate(cfg)
    return cfg, data_dir


def new_run_folder(cfg: dict, dataset: str | None, base: Path = Path("runs")) -> Path:
    """``runs/<dataset>-<modalities>-<dims>d-<timestamp>``."""
    return new_run_dir(base, dataset or "ixi", "+".join(cfg["data"]["modalities"]), int(cfg["data"]["dims"]))


def run_meta(cfg: dict, dataset: str | None) -> dict:
    """What run.json records of the request: the modalities used, not the raw ``--modality``."""
    return {"dataset": dataset or "ixi", "modalities": list(cfg["data"]["modalities"]),
            "dims": int(cfg["data"]["dims"])}


def continued_config(run_dir: Path, req: TrainRequest) -> tuple[dict, list[str]]:
    """An existing run's config with the resumable ``--set`` overrides applied, and their keys.

    Refuses (one line naming the option) what cannot change on a run: another preset, config file,
    dataset, modality or dims, or a ``--set`` of a model, data or optimisation key."""
    cfg = read_config(run_dir)
    info = read_run_info(run_dir)
    fix = f"leave it out to continue {run_dir}, or start a new run with another --out"
    if req.config is not None:
        changes = _changes(cfg, C.load_config_file(req.config))
        if changes:
            raise RunError(f"--config {req.config} would change {changes[0]} of an existing run ({run_dir}); {fix}")
    checks = (("--preset", req.preset, cfg.get("preset")),
              ("--dataset", req.dataset, info.get("dataset")),
              ("--modality", req.modalities or None, cfg.get("data", {}).get("modalities")),
              ("--dims", req.dims, cfg.get("data", {}).get("dims")))
    for option, given, used in checks:
        if given is not None and used is not None and given != used:
            shown = ",".join(given) if isinstance(given, list) else given
            was = ",".join(used) if isinstance(used, list) else used
            raise RunError(f"{option} {shown} differs from the run's {was}: a run's {option[2:]} is fixed; {fix}")
    validate(C.apply_overrides(cfg, req.overrides or []))  # unknown keys and bad values first
    keys = []
    for text in req.overrides or []:
        parts, value = C.parse_override(text)
        key = ".".join(parts)
        if _get(cfg, parts) == value:  # the same command again with --resume: nothing changes
            continue
        if key not in RESUMABLE:
            raise RunError(f"--set {key} cannot change on an existing run ({run_dir}): only "
                           f"{', '.join(sorted(RESUMABLE))} can; {fix}")
        keys.append(key)
    return C.apply_overrides(cfg, req.overrides or []), keys


_MISSING = object()


def _get(cfg: dict, parts: list[str]) -> Any:
    node: Any = cfg
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return _MISSING
        node = node[p]
    return node


def _changes(cfg: dict, over: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose value in ``over`` differs from ``cfg``'s (``prior_preset`` names the run's prior)."""
    out = []
    for k, v in over.items():
        if not prefix and k == "prior_preset":
            continue
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            out += _changes(cfg[k], v, f"{prefix}{k}.")
        elif cfg.get(k, _MISSING) != v:
            out.append(f"{prefix}{k}")
    return out


@dataclass
class TrainTarget:
    """Where a ``mrivq train`` call trains: the run folder and, for a new run, its config, data folder
    and what run.json records of the request (all None when an existing run is continued)."""

    run_dir: Path
    cfg: dict | None = None
    data_dir: Path | None = None
    meta: dict | None = None

    @property
    def new(self) -> bool:
        return self.cfg is not None


def train_target(req: TrainRequest, stage: str, run: Path | None, out_dir: Path | None, resume: bool,
                 data_root: Path, device_type: str) -> TrainTarget:
    """The run a ``train`` call continues (``--resume`` or ``--stage prior``: ``--run``/``--out`` or the
    latest run) or the new run it starts (``--out`` or a new folder under ``runs/``). Under torchrun
    rank 0 decides and every rank gets its answer, so all train into one folder."""
    from mrivq.runs.folder import check_run_folder, is_run, resolve_run
    from mrivq.utils import distributed as ddp

    run_dir = run or out_dir
    if resume or stage == "prior":  # continue a run: the folder must be one (or the latest under runs/)
        run_dir = resolve_run(run_dir)
    # rank 0 decides (the others could otherwise see the run folder rank 0 has just begun)
    if ddp.broadcast(run_dir is not None and is_run(Path(run_dir))):
        return TrainTarget(Path(run_dir))
    cfg, data_dir = new_run_config(req, data_root, device_type)
    run_dir = ddp.broadcast(run_dir or new_run_folder(cfg, req.dataset))  # one folder for all ranks
    if ddp.is_main():
        check_run_folder(Path(run_dir))
    return TrainTarget(Path(run_dir), cfg, data_dir, run_meta(cfg, req.dataset))

