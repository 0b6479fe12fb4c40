"""The :class:`Preprocess` configuration: a plain, JSON-able description of one model's input
preprocessing (dims, modalities, spacing, orientation, intensity percentiles, pad/crop), stored with
every trained model, and its validation helpers.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mrivq.utils.errors import MrivqError


@dataclass
class Preprocess:
    """Preprocessing of one model's inputs: plain, JSON-able, stored with the trained model."""

    dims: int = 3  # 2 or 3
    modalities: list[str] = field(default_factory=lambda: ["t1"])  # channels, in order
    spacing: list[float] | None = field(default_factory=lambda: [2.0, 2.0, 2.0])  # mm; None = keep
    orientation: str = "RAS"
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])  # -> [0, 1]
    clip: bool = True
    shape: list[int] | None = None  # crop/pad (centred) to this; None = pad up to a multiple
    divisible_by: int = 4  # the model's downsampling factor (2**levels)
    slice_axis: int = 2  # dims=2 on volumes: which axis to slice (after orientation)
    slices_per_volume: int = 1  # dims=2 on volumes: central slices per subject
    pool_modalities: bool = False  # each modality its own 1-channel image (not channels of one)
    # Preprocessing of scans (3D): bias field, alignment with a template, masks; all off unless a preset turns them on
    n4: bool = False  # N4 bias-field correction at a reduced resolution, before alignment
    register: str | None = None  # null | rigid | affine: align with `template`, resample into its box
    template: str = "auto"  # auto (phantom data: phantom, else icbm152) | icbm152 | phantom | a T1 NIfTI path
    skull_strip: bool = False  # keep the brain alone (the template's brain mask carried onto the scan)
    head_percentiles: bool = False  # intensity percentiles inside the head, not over the whole field of view
    qc: str = "stop"  # a subject failing the registration check: stop | skip | keep (training)

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict | None) -> Preprocess:
        """Build from a config's ``data`` section; keys that are not preprocessing are ignored."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        kw = {k: copy.deepcopy(v) for k, v in d.items() if k in known}
        if isinstance(kw.get("modalities"), str):
            kw["modalities"] = [kw["modalities"]]
        for k in ("modalities", "spacing", "percentiles", "shape"):
            if isinstance(kw.get(k), tuple):
                kw[k] = list(kw[k])
        return cls(**kw)

    def validate(self) -> None:
        """Raise :class:`MrivqError` naming the first bad value."""
        def bad(msg: str) -> MrivqError:
            return MrivqError(f"data config: {msg}")

        if self.dims not in (2, 3):
            raise bad(f"dims must be 2 or 3, not {self.dims!r}")
        if not self.modalities or not all(isinstance(m, str) and m for m in self.modalities):
            raise bad(f"modalities must be a non-empty list of names, not {self.modalities!r}")
        if len(set(self.modalities)) != len(self.modalities):
            raise bad(f"modalities {self.modalities} repeat a name")
        if not isinstance(self.divisible_by, int) or self.divisible_by < 1:
            raise bad(f"divisible_by must be a positive integer, not {self.divisible_by!r}")
        if self.spacing is not None:
            ok_len = (2, 3) if self.dims == 2 else (3,)
            if (not isinstance(self.spacing, (list, tuple)) or len(self.spacing) not in ok_len
                    or not all(_is_num(s) and s > 0 for s in self.spacing)):
                raise bad(f"spacing must be {' or '.join(map(str, ok_len))} positive numbers (mm) or null, "
                          f"not {self.spacing!r}")
        o = str(self.orientation).upper()
        if len(o) != 3 or sorted({_axis_of(c) for c in o}) != [0, 1, 2]:
            raise bad(f"orientation must be three axis codes like RAS or LPS, not {self.orientation!r}")
        p = self.percentiles
        if (not isinstance(p, (list, tuple)) or len(p) != 2 or not all(_is_num(v) for v in p)
                or not 0 <= p[0] < p[1] <= 100):
            raise bad(f"percentiles must be [lower, upper] with 0 <= lower < upper <= 100, not {p!r}")
        if self.shape is not None:
            if (not isinstance(self.shape, (list, tuple)) or len(self.shape) != self.dims
                    or not all(isinstance(s, int) and s > 0 for s in self.shape)):
                raise bad(f"shape must be {self.dims} positive integers or null, not {self.shape!r}")
            if any(s % self.divisible_by for s in self.shape):
                raise bad(f"shape {list(self.shape)} must be divisible by {self.divisible_by} "
                          f"(the model downsamples by that factor); e.g. "
                          f"{[_round_up(s, self.divisible_by) for s in self.shape]}")
        if self.slice_axis not in (0, 1, 2):
            raise bad(f"slice_axis must be 0, 1 or 2, not {self.slice_axis!r}")
        if not isinstance(self.slices_per_volume, int) or self.slices_per_volume < 1:
            raise bad(f"slices_per_volume must be a positive integer, not {self.slices_per_volume!r}")
        if not isinstance(self.pool_modalities, bool):
            raise bad(f"pool_modalities must be true or false, not {self.pool_modalities!r}")
        for k in ("n4", "skull_strip", "head_percentiles"):
            if not isinstance(getattr(self, k), bool):
                raise bad(f"{k} must be true or false, not {getattr(self, k)!r}")
        if self.register not in (None, "rigid", "affine"):
            raise bad(f"register must be rigid, affine or null, not {self.register!r}")
        if not isinstance(self.template, str) or not self.template:
            raise bad(f"template must be auto, icbm152, phantom or the path of a T1 NIfTI, not {self.template!r}")
        if self.qc not in ("stop", "skip", "keep"):
            raise bad(f"qc must be stop, skip or keep, not {self.qc!r}")
        if self.dims != 3 and (self.register or self.skull_strip or self.n4):
            raise bad("n4, register and skull_strip are for 3D models (dims: 3)")
        if self.skull_strip and not self.register:
            raise bad("skull_strip needs register (the brain mask comes from the template); set register: affine")
        if self.register and self.spacing is None:
            raise bad("register needs a spacing (the template's box is resampled at it)")

    @property
    def channels(self) -> int:
        """Input channels of a model trained with this preprocessing."""
        return 1 if self.pool_modalities else len(self.modalities)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _axis_of(code: str) -> int:
    return {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}.get(code, -1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k
