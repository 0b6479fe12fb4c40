"""Continuous covariates (``data.covariates: [age]``) for a conditional prior.

Each subject's values come from manifest columns. They are standardised with the training subjects'
mean and standard deviation: the prior sees z-scores, and sampling maps a user's ``age=40`` the same
way. A missing value (IXI has subjects without an age) is imputed with the training mean, i.e. a
z-score of 0, and counted, so the run records how many it imputed. A non-numeric value is an error that
points to ``data.condition_on``, which is the option for categories (sex, site).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mrivq.utils.errors import MrivqError


def _number(v: object) -> float | None:
    """``v`` as a finite float; None when it is empty or missing; ValueError when it is text."""
    s = str(v if v is not None else "").strip()
    if s == "" or s.lower() in ("nan", "na", "n/a", "none"):
        return None
    f = float(s)
    if not math.isfinite(f):
        return None
    return f


def subject_covariates(rows: Sequence[Mapping], columns: Sequence[str]) -> dict[str, list[float | None]]:
    """Raw values ``{subject: [value or None per column]}`` read from the manifest rows."""
    columns = [str(c) for c in columns]
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    absent = [c for c in columns if c not in present]
    if absent:
        have = ", ".join(sorted(k for k in present if k not in ("path", "subject", "modality"))) or "none"
        raise MrivqError(f"data.covariates: the manifest has no column {absent[0]!r}; columns: {have}")
    out: dict[str, list[float | None]] = {}
    for r in rows:
        vals = []
        for c in columns:
            try:
                vals.append(_number(r.get(c)))
            except ValueError:
                raise MrivqError(f"data.covariates: column {c!r} is not numeric (subject {r.get('subject')} has "
                                 f"{r.get(c)!r}); for categories use --set data.condition_on={c}") from None
        out[str(r["subject"])] = vals
    return out


def fit_covariates(values: Mapping[str, Sequence[float | None]], columns: Sequence[str]) -> dict:
    """Standardisation of the training subjects' ``values``: ``{"columns", "mean", "std", "missing"}``.

    ``std`` is the population standard deviation (1 when it is 0, so a constant column maps to 0);
    ``missing`` counts the subjects imputed per column.
    """
    columns = [str(c) for c in columns]
    mean, std, missing = [], [], {}
    for j, c in enumerate(columns):
        col = [v[j] for v in values.values() if v[j] is not None]
        if not col:
            raise MrivqError(f"data.covariates: no training subject has a value in column {c!r}")
        m = sum(col) / len(col)
        s = math.sqrt(sum((x - m) ** 2 for x in col) / len(col))
        mean.append(m)
        std.append(s if s > 0 else 1.0)
        missing[c] = len(values) - len(col)
    return {"columns": columns, "mean": mean, "std": std, "missing": missing}


def standardise(spec: Mapping, values: Sequence[float | None]) -> list[float]:
    """z-scores of one subject's ``values`` under ``spec`` (a missing value -> 0, the training mean)."""
    return [0.0 if v is None else (float(v) - m) / s
            for v, m, s in zip(values, spec["mean"], spec["std"], strict=True)]


def parse_covariates(spec: Mapping | None, given: Mapping[str, float] | None, run_name: str) -> dict[str, float]:
    """The raw covariate values to condition on: ``given`` (``--covariate age=40``) completed with the
    training means; errors name unknown columns or a run whose prior takes no covariates."""
    given = dict(given or {})
    if not spec:
        if given:
            raise MrivqError(f"run {run_name} has no covariates; drop --covariate")
        return {}
    unknown = [k for k in given if k not in spec["columns"]]
    if unknown:
        raise MrivqError(f"--covariate {unknown[0]} is not a covariate of run {run_name}; "
                         f"it has: {', '.join(spec['columns'])}")
    bad = [k for k, v in given.items() if not math.isfinite(float(v))]
    if bad:
        raise MrivqError(f"--covariate {bad[0]}={given[bad[0]]} is not a finite number; give a value such as "
                         f"{bad[0]}=40")
    return {c: float(given.get(c, m)) for c, m in zip(spec["columns"], spec["mean"], strict=True)}
