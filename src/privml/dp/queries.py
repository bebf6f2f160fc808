"""Bounded DP queries on one site's data, with sensitivities from declared bounds only.

Queries: ``count``, ``sum``, ``mean``, ``variance``, ``histogram`` over declared categories,
``quantile`` (exponential mechanism) and group-by over a declared categorical column, as
functions on arrays (``bounded_*``) and as short expressions on a site's DataFrame
(:func:`answer_query`, :func:`parse_query`)::

    count()                      count(age)            sum(income)
    mean(age)                    variance(age)         histogram(sex)
    quantile(age, 0.9)           median(age)           mean(age) by sex

Privacy model. epsilon and delta are per record, per query, and charged to the site's ledger
*before* anything is computed. They hold under the **replace-one** relation (neighbouring
datasets differ in one record's values), the relation the ledger books every charge under:
privml's results publish the sites' sizes, and replace-one is what protects a record when
the number of records is public. Each query's noise is calibrated so that its replace-one
cost is exactly the epsilon (and delta) asked for, from its own sensitivities (below). A
record whose value is missing counts as a record: replacing it by one with a value is a
neighbour too, which the sensitivities cover. ``relation="add_or_remove"`` on the
``bounded_*`` functions gives the add/remove calibration instead (not what privml books).

With ``delta == 0`` queries use (discrete) Laplace noise and are epsilon-DP; with
``delta > 0`` they use (discrete) Gaussian noise and are (epsilon, delta)-DP (quantiles are
always pure epsilon-DP and book delta = 0).

Bounds. Numeric columns must declare ``min`` and ``max`` in the schema; values are clamped
into [min, max] and sensitivities follow from the declared bounds alone -- never from the data
(a sensitivity measured on the data leaks it). Undeclared bounds are refused with a
:class:`~privml.errors.SchemaError` that shows the config lines to add. Bounds marked
``derived_from_data`` are refused unless ``allow_data_derived_bounds=True``, which warns with
:class:`~privml.errors.PrivacyLeakWarning`. Missing values (NaN / None) are dropped, a
per-record transformation that keeps the guarantee; so are categorical values outside the
declared categories.

Replace-one sensitivities and costs (E, D the epsilon and delta asked for; h = (max - min) / 2;
s the fixed-point step of :func:`exact_sum`, about 2^-30 of the bound):

* count: 1 (a replaced record changes a count by at most 1; a plain ``count()`` not at all),
  noise for E: cost E, as under add/remove.
* sum over [a, b]: max(b - a, max(|a|, |b|)) + s (two values swapped, or a value and a
  missing one) instead of add/remove's max(|a|, |b|): noise for E with that sensitivity.
* mean: c + S / N with c the bounds' midpoint, S the noisy sum of (x - c) and N the noisy
  count. Laplace, S with scale (h + s) / (E/2), N with scale 1 / (E/2): a replacement either
  keeps N and moves S by at most 2h + s (loss <= E), or moves N by 1 and S by at most h (loss
  <= E/2 + E/2): cost E, no more noise than add/remove's calibration. Gaussian: S calibrated
  for sensitivity 2h + s at (E/2, D/2), N for 1 at (E/2, D/2): cost (E, D).
* variance: N, S and Q (the centred sum of squares, values in [0, h^2]), a third each.
  Laplace as calibrated for add/remove (S: h + s, Q: h^2 + s, N: 1; E/3 each): a replacement
  keeps N and moves S by 2h + s and Q by h^2 + s (loss <= 2E/3 + E/3), or moves all three by
  at most their add/remove sensitivities (loss <= E): cost E. Gaussian: S calibrated for
  2h + s, each part at (E/3, D/3): cost (E, D).
* histogram: a replaced record leaves one bin and enters another: L1 sensitivity 2 (discrete
  Laplace for E) or, Gaussian, two bins each at (E/2, D/2): cost (E, D).
* quantile: utility -|#{x < c} - q n| changes by at most 1 when a record is replaced (at most
  max(q, 1 - q) when a value becomes missing), so the exponential mechanism uses
  sensitivity 1 (add/remove's was max(q, 1 - q)): cost E.
* group-by: a replaced record can leave one group and enter another, so each group's
  aggregate gets (E/2, D/2): leaving and entering cost at most its add/remove cost (at most
  its replace-one cost, E/2) each, and a replacement within a group at most E/2.

Sums are accumulated exactly in fixed point (:func:`exact_sum`, 2^-30 of the bound), so no
floating-point error accumulates over rows (Casacuberta et al. 2022); sensitivities carry
the resulting 2^-30 relative excess. Estimators: mean and variance are clamped into [min,
max] and [0, h^2]; the equal split of the mean's epsilon minimises its worst-case variance;
quantile candidates are ``quantile_candidates`` evenly spaced public points in [min, max].
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from privml.dp import mechanisms as mech
from privml.dp import samplers
from privml.dp.events import (
    ComposedDpEvent,
    DiscreteGaussianDpEvent,
    DiscreteLaplaceDpEvent,
    DpEvent,
    LaplaceDpEvent,
    PureDpEvent,
)
from privml.errors import DataError, PrivacyLeakWarning, SchemaError, UsageError

if TYPE_CHECKING:
    import pandas as pd

    from privml.dp.ledger import ChargeRecord, PrivacyLedger

__all__ = [
    "QueryResult",
    "QuerySpec",
    "answer_query",
    "bounded_count",
    "bounded_histogram",
    "bounded_mean",
    "bounded_quantile",
    "bounded_sum",
    "bounded_variance",
    "declared_bounds",
    "exact_sum",
    "sum_sensitivity",
    "replace_sum_sensitivity",
    "declared_categories",
    "parse_query",
]

_OPS = ("count", "sum", "mean", "variance", "histogram", "quantile")
_ALIASES = {"var": "variance", "hist": "histogram", "avg": "mean", "median": "quantile"}
_FORMS = (
    "count(), count(col), sum(col), mean(col), variance(col), histogram(col), "
    "quantile(col, q), median(col), each optionally followed by 'by col'"
)


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class QuerySpec:
    """A parsed query. ``str(spec)`` is its canonical text (used as the ledger label)."""

    op: str
    column: str | None = None
    q: float | None = None
    by: str | None = None

    def __str__(self) -> str:
        def name(col: str) -> str:
            return col if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", col) else json_quote(col)

        args = "" if self.column is None else name(self.column)
        if self.op == "quantile":
            args += f", {self.q!r}"
        text = f"{self.op}({args})"
        if self.by is not None:
            text += f" by {name(self.by)}"
        return text


def json_quote(text: str) -> str:
    """Double-quotes a column name for canonical query text."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<ident>[A-Za-z_][A-Za-z0-9_.\-]*)
      | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<punct>[(),])
    )""",
    re.VERBOSE,
)


def _tokenize(text: str) -> list[tuple[str, str, int]]:
    tokens: list[tuple[str, str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            col = len(text[:pos]) + len(text[pos:]) - len(text[pos:].lstrip())
            raise UsageError(
                f"Cannot parse query {text!r}: unexpected character {text[col]!r} at position "
                f"{col}. Valid forms: {_FORMS}."
            )
        kind = m.lastgroup or ""
        value = m.group(kind)
        if kind == "string":
            value = value[1:-1] if value[0] == "`" else re.sub(r"\\(.)", r"\1", value[1:-1])
        tokens.append((kind, value, m.start(kind)))
        pos = m.end()
    return tokens


def parse_query(text: str) -> QuerySpec:
    """Parses a query expression (see the module docstring) into a :class:`QuerySpec`.

    Function names and ``by`` are case-insensitive; column names are identifiers
    (letters, digits, ``_ . -``) or quoted with ``"``, ``'`` or backticks.

    Raises:
        UsageError: the text is not one of the valid forms (the message lists them).
    """
    if not isinstance(text, str):
        raise TypeError(f"A query must be a string. Got {type(text).__name__} instead.")
    tokens = _tokenize(text)
    i = 0

    def fail(why: str) -> UsageError:
        return UsageError(f"Cannot parse query {text!r}: {why}. Valid forms: {_FORMS}.")

    def take(kind: str, value: str | None = None) -> str:
        nonlocal i
        if i >= len(tokens):
            raise fail(f"expected {value or kind} at the end")
        k, v, pos = tokens[i]
        if k != kind or (value is not None and v != value):
            raise fail(f"expected {value or kind} at position {pos}, found {v!r}")
        i += 1
        return v

    def column() -> str:
        nonlocal i
        if i < len(tokens) and tokens[i][0] in ("ident", "string"):
            i += 1
            name = tokens[i - 1][1]
            if not name:
                raise fail("empty column name")
            return name
        found = repr(tokens[i][1]) if i < len(tokens) else "the end"
        raise fail(f"expected a column name, found {found}")

    if not tokens:
        raise fail("the query is empty")
    func = take("ident").lower()
    op = _ALIASES.get(func, func)
    if op not in _OPS:
        raise fail(f"unknown function {func!r}")
    take("punct", "(")
    col: str | None = None
    q: float | None = None
    if op == "count":
        if i < len(tokens) and tokens[i][1] != ")":
            col = column()
    else:
        col = column()
        if op == "quantile":
            if func == "median":
                q = 0.5
            else:
                take("punct", ",")
                raw = take("number")
                q = float(raw)
                if not 0 < q < 1:
                    raise UsageError(
                        f"The quantile level in {text!r} must be in (0, 1). Got {raw} instead."
                    )
    take("punct", ")")
    by: str | None = None
    if i < len(tokens):
        kind, value, pos = tokens[i]
        if kind != "ident" or value.lower() != "by":
            raise fail(f"unexpected {value!r} at position {pos}")
        i += 1
        by = column()
    if i < len(tokens):
        raise fail(f"unexpected {tokens[i][1]!r} at position {tokens[i][2]}")
    return QuerySpec(op=op, column=col, q=q, by=by)


# ----------------------------------------------------------------------------- schema


def _attr(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _declare_hint(column: str, kind: str) -> str:
    if kind == "numeric":
        return (
            f'declare public bounds in the config:\n  [data.schema.{column}]\n  type = "numeric"'
            "\n  min = <smallest possible value>\n  max = <largest possible value>\n"
            "Use bounds known in advance (e.g. from the data dictionary), never ones read off "
            "the private data."
        )
    return (
        f'declare its categories in the config:\n  [data.schema.{column}]\n  type = "categorical"'
        '\n  values = ["...", "..."]'
    )


def _column_schema(schema: Mapping[str, Any], column: str, kind: str) -> Any:
    if not isinstance(schema, Mapping):
        raise TypeError(
            f"The 'schema' parameter must be a mapping column -> column schema. "
            f"Got {type(schema).__name__} instead."
        )
    if column not in schema:
        raise SchemaError(
            f"Column {column!r} is not declared in the schema; " + _declare_hint(column, kind)
        )
    return schema[column]


def _check_derived(column: str, col_schema: Any, allow: bool) -> None:
    if bool(_attr(col_schema, "derived_from_data")):
        if not allow:
            raise SchemaError(
                f"The bounds/categories of column {column!r} were derived from the private data "
                "(derived_from_data = true, as `privml schema infer` writes them); using them "
                "for DP leaks the data. Replace them with public values and set "
                f"derived_from_data = false in [data.schema.{column}]; or "
                + _declare_hint(
                    column,
                    "numeric" if _attr(col_schema, "type") != "categorical" else "categorical",
                )
                + "\nTo accept the leak instead, set privacy.allow_data_derived_bounds = true in "
                "the config (Python: allow_data_derived_bounds=True)."
            )
        warnings.warn(
            f"Column {column!r} uses bounds derived from the private data; the DP guarantee "
            "does not cover what those bounds reveal.",
            PrivacyLeakWarning,
            stacklevel=4,
        )


def declared_bounds(
    schema: Mapping[str, Any], column: str, *, allow_data_derived_bounds: bool = False
) -> tuple[float, float]:
    """The declared public (min, max) of a numeric or binary column.

    A binary column without explicit bounds has bounds (0, 1).

    Raises:
        SchemaError: the column is undeclared, categorical, lacks finite ``min < max``, or
            its bounds were derived from data (unless ``allow_data_derived_bounds``).
    """
    col_schema = _column_schema(schema, column, "numeric")
    kind = _attr(col_schema, "type")
    if kind == "categorical":
        raise SchemaError(
            f"Column {column!r} is categorical; numeric queries need a numeric column. Use "
            f"histogram({column}) or group by it."
        )
    lo, hi = _attr(col_schema, "min"), _attr(col_schema, "max")
    if kind == "binary" and lo is None and hi is None:
        lo, hi = 0.0, 1.0
    problems = []
    for name, val in (("min", lo), ("max", hi)):
        if val is None:
            problems.append(f"no declared '{name}'")
        elif isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            problems.append(f"'{name}' = {val!r} is not a finite number")
    if not problems and not float(lo) < float(hi):
        problems.append(f"min ({lo}) must be < max ({hi})")
    if problems:
        raise SchemaError(
            f"Column {column!r} has {' and '.join(problems)}; " + _declare_hint(column, "numeric")
        )
    _check_derived(column, col_schema, allow_data_derived_bounds)
    return float(lo), float(hi)


def declared_categories(
    schema: Mapping[str, Any], column: str, *, allow_data_derived_bounds: bool = False
) -> list[Any]:
    """The declared categories of a categorical (or binary) column, in declared order.

    Raises:
        SchemaError: the column is undeclared or declares no categories.
    """
    col_schema = _column_schema(schema, column, "categorical")
    values = _attr(col_schema, "values")
    kind = _attr(col_schema, "type")
    if not values and kind == "binary":
        values = [0, 1]
    if not values:
        raise SchemaError(
            f"Column {column!r} declares no categories; " + _declare_hint(column, "categorical")
        )
    cats = list(values)
    if len({repr(c) for c in cats}) != len(cats):
        raise SchemaError(f"Column {column!r} declares duplicate categories: {cats!r}.")
    _check_derived(column, col_schema, allow_data_derived_bounds)
    return cats


# ----------------------------------------------------------------------------- bounded queries


def _clean(values: Any, func: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise DataError(f"{func} needs numeric values: {exc}") from exc
    return arr[~np.isnan(arr)]


def _parsed(frame: pd.DataFrame, spec: QuerySpec, site: str | None) -> pd.DataFrame:
    """``frame`` with the query's numeric column parsed to float64, before anything is charged.

    Raises:
        DataError: naming the column and rows of values that are neither missing nor finite
            numbers (nothing has been charged yet).
    """
    import pandas as pd

    col = spec.column
    if col is None or spec.op in ("count", "histogram"):
        return frame
    values = frame[col]
    num = pd.to_numeric(values, errors="coerce").astype(np.float64)
    bad = (~np.isfinite(num.to_numpy()) & values.notna().to_numpy()).nonzero()[0]
    if len(bad):
        rows = ", ".join(str(int(r) + 1) for r in bad[:5]) + (" ..." if len(bad) > 5 else "")
        where = f"site {site!r}, " if site else ""
        raise DataError(
            f"{where}column {col!r}: {len(bad)} value(s) are not finite numbers (e.g. "
            f"{str(values.iloc[int(bad[0])])!r}, data rows {rows}); fix the data. The query "
            "was not answered and nothing was charged."
        )
    out = frame.copy(deep=False)
    out[col] = num.to_numpy()
    return out


def _check_bounds(lower: float, upper: float, func: str) -> tuple[float, float]:
    lo = mech._real("lower", func, lower)
    hi = mech._real("upper", func, upper)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UsageError(
            f"The 'lower' and 'upper' parameters of {func} must be finite with lower < upper. "
            f"Got lower={lower!r}, upper={upper!r} instead."
        )
    return lo, hi


def _check_query_delta(delta: object, func: str) -> float:
    d = mech._real("delta", func, delta)
    if not 0 <= d < 1:
        raise UsageError(
            f"The 'delta' parameter of {func} must be in [0, 1) (0: pure DP with Laplace noise). "
            f"Got {delta!r} instead."
        )
    return d


def _noisy_real(
    value: float, *, epsilon: float, delta: float, sensitivity: float, rng: Any
) -> mech.Release[Any]:
    if delta > 0:
        return mech.gaussian(value, epsilon=epsilon, delta=delta, sensitivity=sensitivity, rng=rng)
    return mech.laplace(value, epsilon=epsilon, sensitivity=sensitivity, rng=rng)


def _noisy_count(n: int, *, epsilon: float, delta: float, rng: Any) -> mech.Release[Any]:
    if delta > 0:
        return mech.discrete_gaussian(n, epsilon=epsilon, delta=delta, sensitivity=1, rng=rng)
    return mech.discrete_laplace(n, epsilon=epsilon, sensitivity=1, rng=rng)


_SUM_BITS = 30


def _sum_step(bound: float) -> float:
    """Fixed-point step for summing values with |x| <= bound: a power of two ~ bound / 2^30."""
    return math.ldexp(1.0, math.ceil(math.log2(bound)) - _SUM_BITS)


def sum_sensitivity(bound: float) -> float:
    """Sensitivity of :func:`exact_sum` for values with |x| <= ``bound`` (add/remove one).

    Each value is rounded to the fixed-point grid, which can move it by half a step, so the
    sensitivity is ``bound + step`` -- a relative excess of at most 2^-29.
    """
    return bound + _sum_step(bound)


def replace_sum_sensitivity(lower: float, upper: float) -> float:
    """Sensitivity of :func:`exact_sum` of values in [lower, upper] under replace-one.

    One value swapped for another moves the sum by at most ``upper - lower``, a value swapped
    for a missing one (dropped) by at most ``max(|lower|, |upper|)``; the rounding to the
    fixed-point grid (step of the bound ``max(|lower|, |upper|)``) adds at most one step.
    """
    bound = max(abs(lower), abs(upper))
    return max(upper - lower, bound) + _sum_step(bound)


def _check_relation(relation: object, func: str) -> str:
    name = str(relation).strip().lower().replace("-", "_")
    if name in ("replace_one", "replace"):
        return "replace_one"
    if name in ("add_or_remove", "add_remove", "add_or_remove_one"):
        return "add_or_remove"
    raise UsageError(
        f"The 'relation' parameter of {func} must be 'replace_one' or 'add_or_remove'. "
        f"Got {relation!r} instead."
    )


def exact_sum(values: np.ndarray, bound: float) -> float:
    """Sum of ``values`` (all |x| <= ``bound``) accumulated exactly in fixed point.

    Values are rounded to multiples of a power-of-two step ~ bound / 2^30 and added as 64-bit
    integers (in chunks, into a Python int), so the result does not depend on the order of
    the rows and carries no accumulated floating-point error -- naive float summation can
    exceed the declared sensitivity (Casacuberta et al. 2022). The only rounding left is the
    final conversion to float (exact below 2^53 steps, e.g. up to 8 million rows at the
    bound).
    """
    step = _sum_step(bound)
    units = np.rint(np.asarray(values, dtype=np.float64) / step).astype(np.int64)
    total = 0
    chunk = 1 << 22  # 2^22 rows * 2^31 per row stays below 2^63
    for start in range(0, units.size, chunk):
        total += int(units[start : start + chunk].sum())
    return float(total) * step


def _centred_sensitivity(half: float, delta: float, relation: str) -> float:
    """Calibration sensitivity of the centred sum of values in [-half, half] in the mean and
    the variance: add/remove's half + step, except Gaussian noise under replace-one, which
    is calibrated for the replace-one sensitivity 2 half + step (see the module docstring)."""
    if relation == "replace_one" and delta > 0:
        return replace_sum_sensitivity(-half, half)
    return sum_sensitivity(half)


def _real_event(epsilon: float, delta: float, sensitivity: float) -> DpEvent:
    if delta > 0:
        _, grid_sens = mech.gaussian_grid(sensitivity)
        return DiscreteGaussianDpEvent(mech._dg_sigma(epsilon, delta, grid_sens), grid_sens)
    scale = samplers.certified_laplace_scale(sensitivity=sensitivity, epsilon=epsilon)
    return LaplaceDpEvent(scale / sensitivity)


def _count_event(epsilon: float, delta: float) -> DpEvent:
    if delta > 0:
        return DiscreteGaussianDpEvent(mech._dg_sigma(epsilon, delta, 1), 1)
    scale = samplers.certified_laplace_scale(sensitivity=1.0, epsilon=epsilon, integer=True)
    return DiscreteLaplaceDpEvent(noise_parameter=1.0 / scale, sensitivity=1)


def _combine(value: Any, parts: Sequence[mech.Release[Any]], name: str) -> mech.Release[Any]:
    event = parts[0].event if len(parts) == 1 else ComposedDpEvent([p.event for p in parts])
    return mech.Release(
        value,
        math.fsum(p.epsilon for p in parts),
        math.fsum(p.delta for p in parts),
        event,
        name,
        parts[0].sampler,
        parts[0].scale,
    )


def bounded_count(
    n: int,
    *,
    epsilon: float,
    delta: float = 0.0,
    rng: np.random.Generator | None = None,
    relation: str = "replace_one",
) -> mech.Release[int]:
    """Noisy count of ``n`` records (sensitivity 1 under either relation): discrete Laplace, or
    discrete Gaussian if ``delta > 0``. The value is the unbiased noisy integer (it can be
    negative)."""
    func = "bounded_count"
    _check_relation(relation, func)
    eps = mech.check_epsilon(epsilon, func)
    d = _check_query_delta(delta, func)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise UsageError(f"The 'n' parameter of {func} must be an int >= 0. Got {n!r} instead.")
    release = _noisy_count(int(n), epsilon=eps, delta=d, rng=rng)
    return _combine(release.value, [release], "count")


def bounded_sum(
    values: Any,
    *,
    lower: float,
    upper: float,
    epsilon: float,
    delta: float = 0.0,
    rng: np.random.Generator | None = None,
    relation: str = "replace_one",
) -> mech.Release[float]:
    """Noisy sum of ``values`` clamped into the public [lower, upper].

    Sensitivity :func:`replace_sum_sensitivity` (about max(upper - lower, max(|lower|,
    |upper|))) under replace-one, :func:`sum_sensitivity` of max(|lower|, |upper|) under
    ``relation="add_or_remove"``. NaNs are dropped.
    """
    func = "bounded_sum"
    rel = _check_relation(relation, func)
    eps = mech.check_epsilon(epsilon, func)
    d = _check_query_delta(delta, func)
    lo, hi = _check_bounds(lower, upper, func)
    x = np.clip(_clean(values, func), lo, hi)
    bound = max(abs(lo), abs(hi))
    sens = replace_sum_sensitivity(lo, hi) if rel == "replace_one" else sum_sensitivity(bound)
    release = _noisy_real(exact_sum(x, bound), epsilon=eps, delta=d, sensitivity=sens, rng=rng)
    return _combine(float(release.value), [release], "sum")


def bounded_mean(
    values: Any,
    *,
    lower: float,
    upper: float,
    epsilon: float,
    delta: float = 0.0,
    rng: np.random.Generator | None = None,
    relation: str = "replace_one",
) -> mech.Release[float]:
    """Noisy mean of ``values`` clamped into [lower, upper] (count not assumed public).

    ``c + S / max(N, 1)`` with c = (lower + upper) / 2, S the noisy sum of (x - c)
    (add/remove sensitivity (upper - lower) / 2) and N the noisy count (sensitivity 1), each
    with half of epsilon and of delta; the result is clamped into [lower, upper]. Its error is
    about (L_S - (mean - c) L_N) / n for the two noises L_S, L_N. NaNs are dropped. Laplace
    noise costs epsilon under both relations (see the module docstring); Gaussian noise under
    replace-one calibrates S for the replace-one sensitivity upper - lower.
    """
    func = "bounded_mean"
    rel = _check_relation(relation, func)
    eps = mech.check_epsilon(epsilon, func)
    d = _check_query_delta(delta, func)
    lo, hi = _check_bounds(lower, upper, func)
    x = np.clip(_clean(values, func), lo, hi)
    center, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    xc = np.clip(x - center, -half, half)
    s = _noisy_real(
        exact_sum(xc, half),
        epsilon=eps / 2,
        delta=d / 2,
        sensitivity=_centred_sensitivity(half, d, rel),
        rng=rng,
    )
    n = _noisy_count(int(x.size), epsilon=eps / 2, delta=d / 2, rng=rng)
    value = min(hi, max(lo, center + float(s.value) / max(float(n.value), 1.0)))
    return _combine(value, [s, n], "mean")


def bounded_variance(
    values: Any,
    *,
    lower: float,
    upper: float,
    epsilon: float,
    delta: float = 0.0,
    rng: np.random.Generator | None = None,
    relation: str = "replace_one",
) -> mech.Release[float]:
    """Noisy (population) variance of ``values`` clamped into [lower, upper].

    Noisy count N, centred sum S (add/remove sensitivity h = (upper - lower) / 2) and
    centred sum of squares Q (sensitivity h^2), each with a third of epsilon and delta;
    returns Q / N - (S / N)^2 clamped into [0, h^2]. NaNs are dropped. Laplace noise costs
    epsilon under both relations; Gaussian noise under replace-one calibrates S for 2h.
    """
    func = "bounded_variance"
    rel = _check_relation(relation, func)
    eps = mech.check_epsilon(epsilon, func)
    d = _check_query_delta(delta, func)
    lo, hi = _check_bounds(lower, upper, func)
    x = np.clip(_clean(values, func), lo, hi)
    center, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    xc = np.clip(x - center, -half, half)
    sq = np.clip(xc * xc, 0.0, half * half)
    n = _noisy_count(int(x.size), epsilon=eps / 3, delta=d / 3, rng=rng)
    s = _noisy_real(
        exact_sum(xc, half),
        epsilon=eps / 3,
        delta=d / 3,
        sensitivity=_centred_sensitivity(half, d, rel),
        rng=rng,
    )
    q = _noisy_real(
        exact_sum(sq, half * half),
        epsilon=eps / 3,
        delta=d / 3,
        sensitivity=sum_sensitivity(half * half),
        rng=rng,
    )
    count = max(float(n.value), 1.0)
    var = float(q.value) / count - (float(s.value) / count) ** 2
    return _combine(min(half * half, max(0.0, var)), [n, s, q], "variance")


def bounded_quantile(
    values: Any,
    *,
    lower: float,
    upper: float,
    q: float,
    epsilon: float,
    candidates: int = 1001,
    rng: np.random.Generator | None = None,
    relation: str = "replace_one",
) -> mech.Release[float]:
    """The ``q``-quantile of ``values`` by the exponential mechanism; epsilon-DP.

    Candidates are ``candidates`` evenly spaced public points in [lower, upper]; the utility
    of c is -|#{x < c} - q n|, with sensitivity 1 under replace-one (max(q, 1 - q) under
    add/remove). NaNs are dropped and values clamped.
    """
    func = "bounded_quantile"
    rel = _check_relation(relation, func)
    eps = mech.check_epsilon(epsilon, func)
    lo, hi = _check_bounds(lower, upper, func)
    level = mech._real("q", func, q)
    if not 0 < level < 1:
        raise UsageError(f"The 'q' parameter of {func} must be in (0, 1). Got {q!r} instead.")
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise UsageError(
            f"The 'candidates' parameter of {func} must be an int >= 2. Got {candidates!r}."
        )
    x = np.clip(_clean(values, func), lo, hi)
    grid = np.linspace(lo, hi, candidates)
    # below[j] = #{x < grid[j]}: x < grid[j] iff (number of grid points <= x) <= j.
    idx = np.searchsorted(grid, x, side="right")
    below = np.cumsum(np.bincount(idx, minlength=candidates + 1))[:candidates]
    scores = -np.abs(below - level * x.size)
    release = mech.exponential_mechanism(
        [float(g) for g in grid],
        scores,
        epsilon=eps,
        sensitivity=1.0 if rel == "replace_one" else max(level, 1 - level),
        rng=rng,
    )
    return _combine(float(release.value), [release], "quantile")


def bounded_histogram(
    values: Any,
    *,
    categories: Sequence[Any],
    epsilon: float,
    delta: float = 0.0,
    rng: np.random.Generator | None = None,
    relation: str = "replace_one",
) -> mech.Release[dict[str, int]]:
    """Noisy counts of each declared category (values outside them are dropped).

    A replaced record leaves one bin and enters another: discrete Laplace with L1 sensitivity
    2, or per-bin discrete Gaussian at (epsilon / 2, delta / 2) when ``delta > 0``. Under
    ``relation="add_or_remove"`` one record changes one count, so sensitivity 1 and the full
    (epsilon, delta) per bin. Keys are ``str(category)``; counts are unbiased noisy integers
    (can be negative).
    """
    func = "bounded_histogram"
    rel = _check_relation(relation, func)
    eps = mech.check_epsilon(epsilon, func)
    d = _check_query_delta(delta, func)
    cats = list(categories)
    if not cats:
        raise UsageError(f"The 'categories' parameter of {func} must be non-empty.")
    counts = _category_counts(values, cats)
    moved = 2 if rel == "replace_one" else 1  # bins one neighbour changes
    if d > 0:
        parts = [
            _noisy_count(int(c), epsilon=eps / moved, delta=d / moved, rng=rng) for c in counts
        ]
        noisy = [int(p.value) for p in parts]
        release = parts[0]
        if moved > 1:
            release = _combine(release.value, [release] * moved, "histogram")
    else:
        release = mech.discrete_laplace(counts, epsilon=eps, sensitivity=moved, rng=rng)
        noisy = [int(v) for v in release.value]
    value = {str(c): v for c, v in zip(cats, noisy, strict=True)}
    return _combine(value, [release], "histogram")


def _category_codes(values: Any, cats: Sequence[Any]) -> np.ndarray:
    """Index of each value's declared category, -1 for missing or undeclared values.

    Numbers match numerically (1 == 1.0 == True); anything else matches by ``str``.
    """
    import pandas as pd

    series = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    codes = np.full(len(series), -1, dtype=np.int64)
    present = series.notna().to_numpy()
    numeric = pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)
    as_float = series.to_numpy(dtype=np.float64, na_value=np.nan) if numeric else None
    as_str: np.ndarray | None = None
    for j, cat in enumerate(cats):
        if numeric and isinstance(cat, (bool, int, float, np.bool_, np.integer, np.floating)):
            assert as_float is not None
            hit = as_float == float(cat)
        else:
            if as_str is None:
                as_str = series.astype(str).to_numpy()
            hit = as_str == str(cat)
        codes[present & hit & (codes < 0)] = j
    return codes


def _category_counts(values: Any, cats: Sequence[Any]) -> np.ndarray:
    codes = _category_codes(values, cats)
    return np.bincount(codes[codes >= 0], minlength=len(cats)).astype(np.int64)


# ----------------------------------------------------------------------------- frame queries


@dataclass(frozen=True)
class QueryResult:
    """A released query answer.

    Attributes:
        query: canonical query text.
        site: the site queried (None without a ledger).
        value: float (count: int), or dict category -> value for histograms and group-bys.
        epsilon, delta: what the query cost and was charged.
        event: the query's privacy event (parallel parts of a group-by count once).
        mechanism: ``"laplace"`` family, ``"gaussian"`` family or ``"exponential"``.
        sampler: ``"opendp"`` or ``"numpy-insecure"``.
        charge: the ledger record, if a ledger was charged.
        relation: the neighbouring relation ``epsilon``/``delta`` hold for (replace-one).
    """

    query: str
    site: str | None
    value: Any
    epsilon: float
    delta: float
    event: DpEvent
    mechanism: str
    sampler: str
    charge: ChargeRecord | None
    relation: str = "replace_one"


@dataclass(frozen=True)
class _Plan:
    """A query's cost and event (the whole query, replace-one) and how to run it on one
    frame (on each group's records for a group-by, whose ``unit_event`` is one group's)."""

    epsilon: float
    delta: float
    event: DpEvent
    mechanism: str
    run: Callable[[pd.DataFrame], mech.Release[Any]]
    unit_event: DpEvent | None = None
    derivation: str = ""


def _plan(
    spec: QuerySpec,
    schema: Mapping[str, Any],
    *,
    epsilon: float,
    delta: float,
    allow: bool,
    rng: Any,
    quantile_candidates: int,
) -> _Plan:
    """Resolves bounds and the replace-one cost of ``spec`` without touching any data."""
    if spec.by is None:
        return _plan_one(
            spec, schema, epsilon=epsilon, delta=delta, allow=allow, rng=rng,
            quantile_candidates=quantile_candidates,
        )  # fmt: skip
    # a replaced record can leave one group and enter another: half of the cost for each
    one = _plan_one(
        spec, schema, epsilon=epsilon / 2, delta=delta / 2, allow=allow, rng=rng,
        quantile_candidates=quantile_candidates,
    )  # fmt: skip
    return _Plan(
        2 * one.epsilon,
        2 * one.delta,
        ComposedDpEvent([one.event, one.event]),
        one.mechanism,
        one.run,
        one.event,
        f"group-by: each group's {one.derivation or spec.op} at half the cost; a replaced "
        "record leaves one group and enters another",
    )


def _plan_one(
    spec: QuerySpec,
    schema: Mapping[str, Any],
    *,
    epsilon: float,
    delta: float,
    allow: bool,
    rng: Any,
    quantile_candidates: int,
) -> _Plan:
    col = spec.column
    mechanism = "gaussian" if delta > 0 else "laplace"
    if spec.op == "count":

        def run_count(df: pd.DataFrame) -> mech.Release[Any]:
            n = len(df) if col is None else int(df[col].notna().sum())
            return bounded_count(n, epsilon=epsilon, delta=delta, rng=rng)

        return _Plan(
            epsilon, delta, _count_event(epsilon, delta), mechanism, run_count,
            derivation="count: sensitivity 1",
        )  # fmt: skip
    assert col is not None
    if spec.op == "histogram":
        cats = declared_categories(schema, col, allow_data_derived_bounds=allow)

        def run_histogram(df: pd.DataFrame) -> mech.Release[Any]:
            return bounded_histogram(
                df[col], categories=cats, epsilon=epsilon, delta=delta, rng=rng
            )

        if delta > 0:
            half = _count_event(epsilon / 2, delta / 2)
            event: DpEvent = ComposedDpEvent([half, half])
            how = "histogram: two bins change, each at half the cost"
        else:
            scale = samplers.certified_laplace_scale(sensitivity=2.0, epsilon=epsilon, integer=True)
            event = DiscreteLaplaceDpEvent(noise_parameter=1.0 / scale, sensitivity=2)
            how = "histogram: L1 sensitivity 2"
        return _Plan(epsilon, delta, event, mechanism, run_histogram, derivation=how)
    lo, hi = declared_bounds(schema, col, allow_data_derived_bounds=allow)
    half = (hi - lo) / 2.0
    if spec.op == "sum":

        def run_sum(df: pd.DataFrame) -> mech.Release[Any]:
            return bounded_sum(df[col], lower=lo, upper=hi, epsilon=epsilon, delta=delta, rng=rng)

        sens = replace_sum_sensitivity(lo, hi)
        return _Plan(
            epsilon, delta, _real_event(epsilon, delta, sens), mechanism, run_sum,
            derivation=f"sum: sensitivity max(b - a, max(|a|, |b|)) = {sens:.6g}",
        )  # fmt: skip
    centred = _centred_sensitivity(half, delta, "replace_one")
    if spec.op == "mean":

        def run_mean(df: pd.DataFrame) -> mech.Release[Any]:
            return bounded_mean(df[col], lower=lo, upper=hi, epsilon=epsilon, delta=delta, rng=rng)

        event = ComposedDpEvent(
            [
                _real_event(epsilon / 2, delta / 2, centred),
                _count_event(epsilon / 2, delta / 2),
            ]
        )
        return _Plan(
            epsilon, delta, event, mechanism, run_mean,
            derivation="mean: noisy centred sum and count, half each; a replacement moves "
            "the sum by 2h or the sum by h and the count by 1",
        )  # fmt: skip
    if spec.op == "variance":

        def run_variance(df: pd.DataFrame) -> mech.Release[Any]:
            return bounded_variance(
                df[col], lower=lo, upper=hi, epsilon=epsilon, delta=delta, rng=rng
            )

        e3, d3 = epsilon / 3, delta / 3
        event = ComposedDpEvent(
            [
                _count_event(e3, d3),
                _real_event(e3, d3, centred),
                _real_event(e3, d3, sum_sensitivity(half * half)),
            ]
        )
        return _Plan(
            epsilon, delta, event, mechanism, run_variance,
            derivation="variance: count, centred sum and sum of squares, a third each; a "
            "replacement moves the sum by 2h and the squares by h^2, or all three by one "
            "record's add/remove sensitivity",
        )  # fmt: skip
    assert spec.op == "quantile" and spec.q is not None
    level = spec.q

    def run_quantile(df: pd.DataFrame) -> mech.Release[Any]:
        return bounded_quantile(
            df[col],
            lower=lo,
            upper=hi,
            q=level,
            epsilon=epsilon,
            candidates=quantile_candidates,
            rng=rng,
        )

    return _Plan(
        epsilon, 0.0, PureDpEvent(epsilon), "exponential", run_quantile,
        derivation="quantile: exponential mechanism, utility sensitivity 1",
    )  # fmt: skip


def answer_query(
    frame: pd.DataFrame,
    query: str | QuerySpec,
    *,
    schema: Mapping[str, Any],
    epsilon: float,
    delta: float = 0.0,
    ledger: PrivacyLedger | None = None,
    site: str | None = None,
    allow_data_derived_bounds: bool = False,
    quantile_candidates: int = 1001,
    rng: np.random.Generator | None = None,
) -> QueryResult:
    """Answers one query on a site's DataFrame, charging the ledger before releasing.

    Order of work: parse and validate the query, the privacy parameters and the schema (bad
    input spends nothing); compute the query's (epsilon, delta) and privacy event from the
    declared bounds alone; ``ledger.charge`` (refusal raises
    :class:`~privml.errors.BudgetExceededError` and spends nothing); only then read the data
    and add noise.

    Args:
        frame: the site's records, one row per individual.
        query: an expression such as ``"mean(age) by sex"`` or a :class:`QuerySpec`.
        schema: mapping column -> schema object with ``type``, ``min``, ``max``, ``values``
            (and optionally ``derived_from_data``), e.g. privml.config's ``ColumnSchema``.
        epsilon: epsilon > 0 (nats) for the whole query, per record, under replace-one (what
            the ledger books; see the module docstring for each query's calibration).
        delta: 0 (default, pure DP, Laplace) or in (0, 1) (Gaussian noise).
        ledger: the budget ledger to charge; ``site`` is then required.
        site: the site's name in the ledger.
        allow_data_derived_bounds: accept schema bounds derived from the private data, with a
            PrivacyLeakWarning.
        quantile_candidates: number of public quantile candidates in [min, max].
        rng: INSECURE numpy sampler for simulations (see :mod:`privml.dp.mechanisms`).
    """
    func = "answer_query"
    spec = parse_query(query) if isinstance(query, str) else query
    if not isinstance(spec, QuerySpec):
        raise TypeError(f"The 'query' parameter of {func} must be a str or QuerySpec.")
    eps = mech.check_epsilon(epsilon, func)
    d = _check_query_delta(delta, func)
    if ledger is not None and (not isinstance(site, str) or not site):
        raise UsageError(f"The 'site' parameter of {func} is required when a ledger is given.")
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"The 'frame' parameter of {func} must be a pandas DataFrame. "
            f"Got {type(frame).__name__} instead."
        )
    plan = _plan(
        spec,
        schema,
        epsilon=eps,
        delta=d,
        allow=allow_data_derived_bounds,
        rng=rng,
        quantile_candidates=quantile_candidates,
    )
    groups: list[Any] | None = None
    if spec.by is not None:
        groups = declared_categories(
            schema, spec.by, allow_data_derived_bounds=allow_data_derived_bounds
        )
    needed = [c for c in (spec.column, spec.by) if c is not None]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError([f"column {c!r} is not in the site's data" for c in missing])
    frame = _parsed(frame, spec, site)  # a value that does not parse fails here, uncharged
    charge = None
    if ledger is not None:
        assert site is not None
        charge = ledger.charge(
            site=site,
            epsilon=plan.epsilon,
            delta=plan.delta,
            label=str(spec),
            event=plan.event,
            relation="replace_one",
            metadata={
                "query": str(spec),
                "mechanism": plan.mechanism,
                "kind": "query",
                "neighboring_relation": "replace_one",
                "cost": plan.derivation,
            },
        )
    if groups is None:
        release = plan.run(frame)
        value = release.value
        sampler = release.sampler
    else:
        codes = _category_codes(frame[spec.by], groups)
        value = {}
        sampler = samplers.SECURE_SAMPLER if rng is None else samplers.INSECURE_SAMPLER
        for j, g in enumerate(groups):
            value[str(g)] = plan.run(frame[codes == j]).value
    return QueryResult(
        query=str(spec),
        site=site,
        value=value,
        epsilon=plan.epsilon,
        delta=plan.delta,
        event=plan.event,
        mechanism=plan.mechanism,
        sampler=sampler,
        charge=charge,
    )
