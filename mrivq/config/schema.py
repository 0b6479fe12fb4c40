"""The config's schema: every key of every section, its type and range, checked before any work.

A preset, a ``--config`` file and ``--set`` overrides all end up in one nested dict; :func:`validate`
refuses (one line naming the dotted key) an unknown key, with the closest known one as a "did you
mean", and a value of the wrong type or out of range (``train.batch_size=0``, ``model.channels=abc``,
``train.lr=-1``). The data section's cross-field rules stay in :meth:`mrivq.data.preprocess.Preprocess.validate`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any

from mrivq.utils.errors import MrivqError

Check = Callable[[Any], str | None]  # None = fine, else what the value should be


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
        return None if ok else "an integer" + (f" >= {lo}" if lo is not None else "") + \
            (f" and <= {hi}" if hi is not None else "")
    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Check:
    def check(v: Any) -> str | None:
        ok = _num(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
            (hi is None or (v < hi if hi_open else v <= hi))
        lo_s = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
        hi_s = "" if hi is None else f"{' and' if lo_s else ''} {'<' if hi_open else '<='} {hi}"
        return None if ok else f"a number{lo_s}{hi_s}"
    return check


def choice(*options: Any) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "one of " + ", ".join("null" if o is None else str(o) for o in options)
    return check


def optional(inner: Check) -> Check:
    def check(v: Any) -> str | None:
        why = None if v is None else inner(v)
        return None if why is None else f"{why} or null"
    return check


def either(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        whys = [c(v) for c in checks]
        return None if any(w is None for w in whys) else " or ".join(w for w in whys if w)
    return check


def int_list(lo: int = 1, min_len: int = 1) -> Check:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (list, tuple)) and len(v) >= min_len and all(integer(lo)(x) is None for x in v)
        return None if ok else f"a list of integers >= {lo}"
    return check


def string() -> Check:
    return lambda v: None if isinstance(v, str) and v else "a non-empty string"


def anything() -> Check:  # checked where it is used (e.g. Preprocess.validate, covariate columns)
    return lambda v: None


BOOL = choice(True, False)
POS = integer(1)
NONNEG = integer(0)

_TRAIN_COMMON: dict[str, Check] = {
    "batch_size": POS, "lr": number(0, lo_open=True), "max_steps": optional(POS), "epochs": optional(POS),
    "warmup_steps": NONNEG, "min_lr_ratio": number(0, 1), "weight_decay": number(0), "grad_clip": number(0),
    "val_every": POS, "ckpt_every": POS, "log_every": POS, "amp": choice("auto", "bf16", "fp16", "off"),
    "seed": integer(),
}

SCHEMA: dict[str, Any] = {
    "preset": string(), "prior_preset": string(), "base": string(),
    "data": {
        "dims": choice(2, 3), "modalities": anything(), "spacing": anything(), "orientation": string(),
        "percentiles": anything(), "clip": BOOL, "shape": anything(), "divisible_by": POS,
        "slice_axis": choice(0, 1, 2), "slices_per_volume": POS, "pool_modalities": BOOL,
        "condition_on": optional(string()), "covariates": anything(), "max_subjects": optional(POS),
        "max_val_subjects": optional(POS),
        "n4": BOOL, "register": choice(None, "rigid", "affine"), "template": string(), "skull_strip": BOOL,
        "head_percentiles": BOOL, "qc": choice("stop", "skip", "keep"),
    },
    "model": {
        "spatial_dims": choice(2, 3), "in_channels": POS, "out_channels": optional(POS), "channels": int_list(),
        "num_res_layers": NONNEG, "num_res_channels": either(POS, int_list()), "num_embeddings": integer(2),
        "embedding_dim": POS, "commitment_cost": number(0), "decay": number(0, 1, hi_open=True),
        "epsilon": number(0, lo_open=True), "init": choice("kmeans", "sample", "random"),
        "dead_code_threshold": number(0), "restart_every": NONNEG, "restart_window": POS,
        "restart_from": choice("error", "data"), "decay_warmup": BOOL, "usage_window": POS, "use_cosine": BOOL,
        "act": anything(), "dropout": number(0, 1, hi_open=True), "output_act": anything(), "ddp_sync": BOOL,
        "checkpointing": BOOL, "quantizer": choice("ema", "fsq"), "fsq_levels": optional(int_list()),
    },
    "train": {
        **_TRAIN_COMMON, "preview_every": optional(POS), "val_fraction": number(0, 1, lo_open=True, hi_open=True),
        "cache": choice("memory", "disk", "none"), "recon_loss": choice("mse", "l1"), "threads": optional(POS),
        "workers": either(choice("auto"), NONNEG), "cache_dtype": choice("float32", "float16"),
        "cache_workers": either(choice("auto"), POS), "adversarial_weight": number(0),
        "adversarial_start": NONNEG, "disc_channels": POS, "disc_layers": POS,
        "disc_lr": optional(number(0, lo_open=True)),
    },
    "prior": {
        "model": {
            "spatial_dims": choice(2, 3), "num_embeddings": integer(2), "channels": POS, "num_layers": POS,
            "kernel_size": POS, "num_classes": optional(POS), "num_covariates": NONNEG, "cond_dim": POS,
            "latent_shape": optional(int_list()), "positions": choice(None, "none", "axes", "grid"),
            "position_dim": POS, "attention_every": NONNEG, "attention_heads": POS,
            "dropout": number(0, 1, hi_open=True),
            # the parallel-decoding family (mrivq.models.maskgit)
            "family": choice("pixelcnn", "maskgit"), "num_blocks": POS, "dilations": int_list(),
            "decode_steps": POS, "choice_temperature": number(0),
        },
        "train": dict(_TRAIN_COMMON),
    },
}


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(known))}"


def validate(cfg: dict, schema: dict = SCHEMA, prefix: str = "") -> None:
    """Raise :class:`MrivqError` for the first unknown key or bad value of ``cfg`` (dotted key named)."""
    if not isinstance(cfg, dict):
        raise MrivqError(f"config section {prefix.rstrip('.') or '(top)'} must be a mapping, not {cfg!r}")
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            where = f"section {prefix.rstrip('.')}" if prefix else "the config"
            raise MrivqError(f"{dotted} is not a key of {where}; {_suggest(str(key), list(schema))}")
        if isinstance(spec, dict):
            if value is None:
                continue
            validate(value, spec, f"{dotted}.")
            continue
        why = spec(value)
        if why is not None:
            raise MrivqError(f"{dotted}={value!r} is not valid: it must be {why}")
