"""Public schemas: inferring one for review, and writing it as TOML.

A schema is public metadata: column types, declared bounds, declared categories. Encoding and
every DP sensitivity use only the schema, so every site encodes identically without seeing the
others, and nothing about one patient leaks through a bound. A schema *inferred* from the data
(:func:`infer_schema`) is marked ``derived_from_data`` and must be reviewed by a person: its
bounds are the private data's own minimum and maximum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from privml.config import ColumnSchema
from privml.errors import SchemaError

if TYPE_CHECKING:
    from privml.data.loading import Pooled

#: A string column with at most this many distinct values is inferred as categorical.
MAX_INFERRED_CATEGORIES = 50

#: A column whose present values are numbers in at least this share, but not all, is taken
#: for a numeric column with stray text in it (a typo, a comment): an error naming the rows.
MOSTLY_NUMERIC = 0.9

_TRUE = {"true", "yes", "y", "t", "1"}
_FALSE = {"false", "no", "n", "f", "0"}


def _round_out(lo: float, hi: float) -> tuple[float, float]:
    """Widen [lo, hi] to 'nice' numbers so the inferred bounds are not the exact extremes.

    Always returns finite ``a < b`` with ``a <= lo``, ``hi <= b`` and a finite span, or raises
    ValueError when no such bounds exist (values spanning more than a float can hold)."""
    if lo == hi:
        pad = max(1.0, abs(lo) * 1e-6)
        a, b = lo - pad, hi + pad
    else:
        span = hi - lo
        if not math.isfinite(span):
            raise ValueError(f"its values span [{lo:g}, {hi:g}], more than a number can hold")
        step = 10.0 ** math.floor(math.log10(span)) / 10
        if step > 0 and math.isfinite(lo / step) and math.isfinite(hi / step):
            a, b = math.floor(lo / step) * step, math.ceil(hi / step) * step
        else:  # a span near the smallest float: no nicer numbers to round to
            a, b = lo, hi
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(b - a)):
        a, b = lo, hi  # no room to round out: keep the extremes
    if not (a <= lo and hi <= b and a < b and math.isfinite(b - a)):
        raise ValueError(f"no finite bounds around its values [{lo:g}, {hi:g}]")
    return a, b


def _median(x: np.ndarray) -> float:
    """The median without overflow (np.median averages the middle pair, which overflows to inf
    for two values near the largest float)."""
    x = np.sort(x)
    n = len(x)
    if n % 2:
        return float(x[n // 2])
    return float(x[n // 2 - 1] / 2 + x[n // 2] / 2)


def infer_column(values: pd.Series) -> ColumnSchema | None:
    """Infer one column's schema from its values (private data!). None if it looks like an id."""
    nonnull = values.dropna()
    missing = bool(values.isna().any())
    if len(nonnull) == 0:
        return None
    from privml.data.loading import numeric_values

    numeric = numeric_values(nonnull)
    if numeric.notna().all():
        uniq = np.unique(numeric.to_numpy(dtype=float))
        if len(uniq) <= 2 and set(uniq.tolist()) <= {0.0, 1.0}:
            return ColumnSchema(type="binary", missing=missing, derived_from_data=True)
        try:
            lo, hi = _round_out(float(uniq.min()), float(uniq.max()))
        except ValueError as exc:
            raise SchemaError(
                f"column {values.name!r}: {exc}; declare its bounds in [data.schema]"
            ) from None
        return ColumnSchema(
            type="numeric",
            min=lo,
            max=hi,
            missing=missing,
            derived_from_data=True,
            impute=_median(numeric.to_numpy(dtype=float)),
        )
    cats = sorted({str(v) for v in nonnull})
    if len(cats) == 2:
        low = {c.lower() for c in cats}
        if low <= _TRUE | _FALSE and low & _TRUE and low & _FALSE:
            cats = sorted(cats, key=lambda c: c.lower() in _TRUE)
        return ColumnSchema(type="binary", values=cats, missing=missing, derived_from_data=True)
    if len(cats) <= MAX_INFERRED_CATEGORIES:
        return ColumnSchema(
            type="categorical", values=cats, missing=missing, derived_from_data=True
        )
    return None


def infer_schema(
    frames: Mapping[str, pd.DataFrame], *, target: str | None = None, exclude: tuple[str, ...] = ()
) -> tuple[dict[str, ColumnSchema], list[str]]:
    """Infer a schema over all sites' frames together.

    Returns ``(schema, skipped)`` where ``skipped`` lists columns that look like identifiers
    (many distinct strings) and are left out; they should be listed in ``data.exclude``.
    Every inferred column is marked ``derived_from_data``.

    Raises :class:`~privml.errors.SchemaError` for columns that are numbers except for a few
    text values (at least ``MOSTLY_NUMERIC`` of the present values parse as numbers), naming
    the site, rows and value, rather than guessing a type for them.
    """
    if not frames:
        return {}, []
    from privml.data.loading import pool_frames

    return infer_schema_pooled(pool_frames(frames), target=target, exclude=exclude)


def infer_schema_pooled(
    pooled: Pooled, *, target: str | None = None, exclude: tuple[str, ...] = ()
) -> tuple[dict[str, ColumnSchema], list[str]]:
    """:func:`infer_schema` on every site's records at once (one pass per column)."""
    schema: dict[str, ColumnSchema] = {}
    skipped: list[str] = []
    problems: list[str] = []
    for col in pooled.frame.columns:
        if col == target or col in exclude:
            continue
        problems += _stray_text(pooled, col)
        if problems:
            continue
        series = pooled.frame[col]
        has = pooled.present(col)
        if has is not None:
            series = series[has].reset_index(drop=True)
        spec = infer_column(series)
        if spec is None:
            skipped.append(col)
        else:
            schema[col] = spec
    if problems:
        raise SchemaError(problems)
    return schema, skipped


def _stray_text(pooled: Pooled, col: str) -> list[str]:
    """Messages for text values in a column that is otherwise numeric (one per site)."""
    from privml.data.loading import numeric_values

    values = pooled.frame[col]
    has = pooled.present(col)
    present = values.notna().to_numpy()
    is_num = numeric_values(values).notna().to_numpy()
    if has is not None:
        present &= has
        is_num &= has
    n_present, n_numeric = int(present.sum()), int(is_num.sum())
    bad = present & ~is_num
    if not bad.any() or n_present == 0 or n_numeric / n_present < MOSTLY_NUMERIC:
        return []
    share = f"{n_numeric} of {n_present} values"
    return [
        f"site {loc.name!r}, column {col!r}: non-numeric value {str(values.iloc[loc.first])!r} "
        f"at {loc.rows} in a column of numbers ({share} are numbers); fix the file, or declare "
        f'the column in [data.schema.{_toml_key(col)}] (type = "categorical", values = [...])'
        for loc in pooled.where.locate(bad)
    ]


_TOML_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(s: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped."""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return _toml_string(str(v))


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_\-]+", k) else _toml_value(k)


IMPUTE_MARK = "  # median of the private data: replace or delete (midpoint of min..max)"
"""Comment `privml schema infer` puts on an inferred impute value (it is private too)."""


def schema_to_toml(schema: Mapping[str, ColumnSchema], *, header: str | None = None) -> str:
    """Render a schema as ``[data.schema.COL]`` tables, ready to paste into a config."""
    lines: list[str] = []
    if header:
        lines += [f"# {h}" if h else "#" for h in header.splitlines()]
        lines.append("")
    for col, spec in schema.items():
        lines.append(f"[data.schema.{_toml_key(col)}]")
        lines.append(f'type = "{spec.type}"')
        for key, val in spec.model_dump(exclude_defaults=True).items():
            if key != "type" and val is not None:
                line = f"{key} = {_toml_value(val)}"
                if spec.derived_from_data and key == "impute":
                    # a statistic of the private records, like the bounds: marked as such
                    line += IMPUTE_MARK
                elif spec.derived_from_data and key in ("min", "max", "values"):
                    line += "  # read off the private data"
                lines.append(line)
        lines.append("")
    return "\n".join(lines)
