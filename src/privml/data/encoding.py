"""Encoding that uses only the public schema, so every site encodes identically on its own.

* numeric: scaled by the declared bounds into [0, 1] and clipped there; a missing value is
  imputed with the declared default (midpoint of the bounds if none) and flagged in a
  ``COL__missing`` indicator column when the schema allows missing values;
* categorical: one-hot over the declared values (plus ``COL__other`` when ``other = true``);
* binary: one 0/1 column.

A column without declared bounds cannot be scaled: it is rejected by :meth:`Encoder.fit_check`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from privml.config import ColumnSchema
from privml.data.loading import (
    Located,
    Locator,
    binary_problem,
    binary_table,
    numeric_array,
    pool_frames,
    text_codes,
)
from privml.errors import DataError, SchemaError


@dataclass(frozen=True)
class Task:
    """What is predicted. ``classes[1]`` is the positive class of a binary task."""

    kind: str  # "binary" | "multiclass"
    target: str
    classes: tuple[str, ...]

    @property
    def n_outputs(self) -> int:
        return 1 if self.kind == "binary" else len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "classes": list(self.classes)}


def _label_str(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def label_codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Each label's canonical text (:func:`_label_str`) as a code into the distinct texts.

    Missing labels get code -1. Vectorized: only the distinct values are turned into text.
    """
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) not in (
        "string",
        "empty",
    ):
        # mixed Python objects (1, 1.0 and True hash alike): canonicalise each one
        na = values.isna().to_numpy()
        values = values.map(_label_str).where(~na, None)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    codes = np.asarray(codes, dtype=np.int64)
    texts = [_label_str(u) for u in uniques]
    distinct, remap = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    if len(distinct) == len(texts):
        return codes, texts
    remap = np.append(remap.astype(np.int64), -1)  # -1 stays -1
    return remap[codes], [str(t) for t in distinct]


def resolve_task(
    frames: Mapping[str, pd.DataFrame],
    *,
    target: str,
    positive: object | None,
    classes: list[str] | None,
) -> Task:
    """Decide the task from the config and check every site's labels against it."""
    with_target = {n: df[[target]] for n, df in frames.items() if target in df.columns}
    pooled = pool_frames(with_target)
    column = pooled.frame[target] if len(pooled.frame) else pd.Series([], dtype=object)
    return resolve_task_pooled(
        column, pooled.where, target=target, positive=positive, classes=classes
    )


def resolve_task_pooled(
    labels: pd.Series,
    where: Locator,
    *,
    target: str,
    positive: object | None,
    classes: list[str] | None,
) -> Task:
    """:func:`resolve_task` on every site's labels at once (site after site, as ``where`` says)."""
    codes, texts = label_codes(labels)
    na = codes < 0
    if na.any():
        raise DataError(
            [
                f"site {loc.name!r}, target {target!r}: missing label at {loc.rows}; "
                "drop those rows or fill them in"
                for loc in where.locate(na)
            ]
        )
    present, first_at, n_at = np.unique(codes, return_index=True, return_counts=True)
    seen = {texts[int(c)] for c in present}
    counts = {texts[int(c)]: int(n) for c, n in zip(present, n_at, strict=True)}
    firsts = {texts[int(c)]: int(p) for c, p in zip(present, first_at, strict=True)}

    def where_first(label: str) -> str:
        loc = where.locate_positions(np.array([firsts[label]]))[0]
        return f"site {loc.name!r}, {loc.rows}"

    labels_sorted = sorted(seen)
    if classes is not None:
        unknown = [v for v in labels_sorted if v not in classes]
        if unknown:
            raise DataError(
                f"target {target!r}: values {unknown} (first at {where_first(unknown[0])}) are "
                f"not in data.classes {classes}; add them or fix the files"
            )
        if len(classes) == 2:
            return Task("binary", target, (classes[0], classes[1]))
        return Task("multiclass", target, tuple(classes))
    if positive is not None:
        pos = _label_str(positive)
        if pos not in seen:
            raise DataError(
                f"target {target!r}: the positive value {pos!r} (data.positive) never occurs; "
                f"the values are {labels_sorted[:10]}"
            )
        others = [v for v in labels_sorted if v != pos]
        if len(others) > 1:
            third = min(others, key=lambda v: counts[v])  # the rarest is the likeliest typo
            n3 = counts[third]
            raise DataError(
                f"target {target!r}: a binary task has two label values but found "
                f"{len(labels_sorted)}: {labels_sorted[:10]} (value {third!r} in {n3} record"
                f"{'s' if n3 > 1 else ''}, "
                f"first at {where_first(third)}); "
                "fix the files, or set data.classes for a multiclass task"
            )
        neg = others[0] if others else f"not {pos}"
        return Task("binary", target, (neg, pos))
    if set(labels_sorted) <= {"0", "1"}:
        return Task("binary", target, ("0", "1"))
    if {v.lower() for v in labels_sorted} <= {"true", "false"}:
        return Task("binary", target, ("false", "true"))
    raise DataError(
        f"target {target!r} has values {labels_sorted[:10]}: set data.positive to the positive "
        "class for a binary task (or data.classes for multiclass)"
    )


def encode_labels(values: pd.Series, task: Task) -> np.ndarray:
    """Class indices (int64): 0/1 for binary (1 = positive), 0..K-1 for multiclass."""
    codes, texts = label_codes(values)
    if task.kind == "binary":
        lower = task.classes == ("false", "true")
        table = [int((t.lower() if lower else t) == task.classes[1]) for t in texts]
        lut = np.asarray([*table, 0], dtype=np.int64)  # a missing label: 0 (as before)
    else:
        index = {c: i for i, c in enumerate(task.classes)}
        if any(t not in index for t in texts) or (codes < 0).any():
            # an unknown or missing label has no class index (pandas gave NaN here before)
            raise ValueError(f"labels outside the task's classes {list(task.classes)}")
        lut = np.asarray([index[t] for t in texts] + [0], dtype=np.int64)
    return lut[codes]


#: Rows encoded at a time (bounds the temporaries of a column to a few megabytes).
_ROWS = 1 << 18


def _encode_column(
    values: pd.Series, spec: ColumnSchema, block: np.ndarray
) -> dict[str, np.ndarray]:
    """Encode one column's values into ``block`` (its float32 output columns).

    Returns the problems as masks over the values: ``missing`` (not allowed by the schema),
    ``bad`` (not a number, not a declared category or binary value), ``impute`` (the declared
    binary impute value is not one of the values).
    """
    na = values.isna().to_numpy()
    if na.any() and not spec.missing:
        return {"missing": na}
    if spec.type == "numeric":
        assert spec.min is not None and spec.max is not None
        num = numeric_array(values)
        bad = np.isnan(num) & ~na
        if bad.any():
            return {"bad": bad}
        impute = spec.impute if isinstance(spec.impute, int | float) else (spec.min + spec.max) / 2
        if na.any():
            num[na] = float(impute)
        num -= spec.min
        num /= spec.max - spec.min
        np.clip(num, 0.0, 1.0, out=num)
        block[:, 0] = num
    elif spec.type == "binary":
        codes, texts = text_codes(values)
        mapped = binary_table(texts, spec)[codes]
        bad = np.isnan(mapped) & ~na
        if bad.any():
            return {"bad": bad}
        mapped[na] = 0.0
        if na.any() and spec.impute is not None:
            imp = binary_table([str(spec.impute)], spec)[0]
            if np.isnan(imp):
                return {"impute": na}
            mapped[na] = imp
        block[:, 0] = mapped
    else:
        cats = list(spec.values or [])
        codes, texts = text_codes(values)
        slot = np.array([cats.index(t) if t in cats else -1 for t in texts], np.int64)
        col_of = slot[codes] if len(slot) else np.full(len(values), -1, np.int64)
        unknown = (col_of < 0) & ~na
        if unknown.any():
            if not spec.other:
                return {"bad": unknown}
            block[unknown, len(cats)] = 1.0
        hit = np.flatnonzero((col_of >= 0) & ~na)
        block[hit, col_of[hit]] = 1.0
        if na.any() and isinstance(spec.impute, str) and spec.impute in cats:
            block[na, cats.index(spec.impute)] = 1.0
    if spec.missing:
        block[:, -1] = na
    return {}


def _sites(where: Locator) -> str:
    names = where.names
    if len(names) == 1:
        return f"site {names[0]!r}"
    return f"sites {names[:3]}{' and more' if len(names) > 3 else ''}"


@dataclass
class Encoder:
    """Schema-only feature encoder. Build it from the public schema; never fit it on data."""

    schema: dict[str, ColumnSchema]
    feature_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        names: list[str] = []
        for col, spec in self.schema.items():
            if spec.type == "numeric" or spec.type == "binary":
                names.append(col)
            else:
                names += [f"{col}={v}" for v in spec.values or []]
                if spec.other:
                    names.append(f"{col}__other")
            if spec.missing:
                names.append(f"{col}__missing")
        self.feature_names = names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def unbounded_columns(self) -> list[str]:
        return [c for c, s in self.schema.items() if s.type == "numeric" and not s.bounded]

    def fit_check(self) -> None:
        """Raise SchemaError listing every numeric column that lacks declared bounds."""
        cols = self.unbounded_columns()
        if cols:
            raise SchemaError(
                f"numeric columns {cols} have no declared bounds; declare them, e.g. "
                f'[data.schema.{cols[0]}] type = "numeric" min = ... max = ...'
            )

    def column_widths(self) -> list[int]:
        """How many encoded features each schema column gives, in schema order."""
        out = []
        for spec in self.schema.values():
            if spec.type in ("numeric", "binary"):
                w = 1
            else:
                w = len(spec.values or []) + int(spec.other)
            out.append(w + int(spec.missing))
        return out

    def transform(self, df: pd.DataFrame, *, site: str = "input") -> np.ndarray:
        """Encode a frame into a float32 ``[rows, n_features]`` array (raises DataError)."""
        return self.encode(df, Locator.single(site, df.index))

    def encode(
        self,
        df: pd.DataFrame,
        where: Locator,
        *,
        order: np.ndarray | None = None,
        located: np.ndarray | None = None,
    ) -> np.ndarray:
        """Encode ``df`` (rows ``order`` of it, in that order, when given) into float32.

        ``where`` locates the records (sites and row numbers) for the messages of the
        DataError raised when values do not fit the schema: output row ``r`` is record
        ``located[r]`` of ``where`` (default: ``order[r]``, or ``r``). Column by column and
        in blocks of rows, written straight into the float32 result: no per-row Python and
        temporaries of one block only.
        """
        self.fit_check()
        n = len(df) if order is None else len(order)
        out = np.zeros((n, self.n_features), dtype=np.float32)
        problems: list[str] = []
        columns: list[tuple[str, ColumnSchema, int, int]] = []
        j = 0
        for (col, spec), width in zip(self.schema.items(), self.column_widths(), strict=True):
            if col not in df.columns:
                problems.append(f"{_sites(where)}: column {col!r} of the schema is missing")
            else:
                columns.append((col, spec, j, j + width))
            j += width
        found: dict[tuple[str, str], list[np.ndarray]] = {}
        for a in range(0, n, _ROWS):
            b = min(n, a + _ROWS)
            rows = slice(a, b) if order is None else order[a:b]
            for col, spec, j0, j1 in columns:
                raw = df[col]
                # indexing, not take(): numpy's take copies a strided column whole first
                values = pd.Series(raw.array[rows], copy=False)
                for kind, mask in _encode_column(values, spec, out[a:b, j0:j1]).items():
                    found.setdefault((col, kind), []).append(np.flatnonzero(mask) + a)
        for col, spec, _, _ in columns:
            missing = found.get((col, "missing"))
            if missing:
                problems += [
                    f"site {loc.name!r}, column {col!r}: missing values at {loc.rows}; "
                    f"set missing = true in [data.schema.{col}]"
                    for loc, _ in self._at(df, col, missing, where, order, located)
                ]
                continue
            if (col, "impute") in found:
                problems.append(
                    f"{_sites(where)}, column {col!r}: "
                    + binary_problem(spec.impute, "the declared impute", spec)
                )
            bad = found.get((col, "bad"))
            if not bad:
                continue
            for loc, value in self._at(df, col, bad, where, order, located):
                head = f"site {loc.name!r}, column {col!r}: "
                if spec.type == "numeric":
                    problems.append(
                        f"{head}non-numeric value {value!r} at {loc.rows}; "
                        "fix the file or declare the column categorical"
                    )
                elif spec.type == "binary":
                    problems.append(head + binary_problem(value, loc.rows, spec))
                else:
                    problems.append(
                        f"{head}value {value!r} at {loc.rows} is not one of the declared "
                        f"values {list(spec.values or [])}; add it to values or set other = true"
                    )
        if problems:
            raise DataError(problems)
        return out

    @staticmethod
    def _at(
        df: pd.DataFrame,
        col: str,
        chunks: list[np.ndarray],
        where: Locator,
        order: np.ndarray | None,
        located: np.ndarray | None,
    ) -> list[tuple[Located, str]]:
        """Each site with a record among output rows ``chunks``, with its first value."""
        pos = np.concatenate(chunks)
        if located is None:
            located = order
        locs = where.locate_positions(pos if located is None else located[pos])
        out = []
        for loc in locs:
            r = int(pos[loc.index])
            out.append((loc, str(df[col].iloc[r if order is None else int(order[r])])))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": {c: s.model_dump(exclude_defaults=True) for c, s in self.schema.items()},
            "feature_names": self.feature_names,
            "numeric_scaling": "x -> clip((x - min) / (max - min), 0, 1)",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Encoder:
        return cls({c: ColumnSchema(**s) for c, s in d["schema"].items()})
