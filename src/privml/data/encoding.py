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
from privml.data.loading import _rows, binary_codes, numeric_values
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


def resolve_task(
    frames: Mapping[str, pd.DataFrame],
    *,
    target: str,
    positive: object | None,
    classes: list[str] | None,
) -> Task:
    """Decide the task from the config and check every site's labels against it."""
    seen: dict[str, str] = {}  # label -> first site having it
    where: dict[str, str] = {}  # label -> "site 'x', row r" of its first occurrence
    counts: dict[str, int] = {}
    problems: list[str] = []
    for site, df in frames.items():
        if target not in df.columns:
            continue
        col = df[target]
        na = col.isna()
        if na.any():
            problems.append(
                f"site {site!r}, target {target!r}: missing label at {_rows(na)}; "
                "drop those rows or fill them in"
            )
        labels_here = col[~na].map(_label_str)
        for v, k in labels_here.value_counts(sort=False).items():
            counts[str(v)] = counts.get(str(v), 0) + int(k)
        for v in pd.unique(labels_here):
            if str(v) not in seen:
                seen[str(v)] = site
                first = labels_here.index[(labels_here == v).to_numpy()][0]
                where[str(v)] = f"site {site!r}, row {int(first) + 1}"
    if problems:
        raise DataError(problems)
    labels = sorted(seen)
    if classes is not None:
        unknown = [v for v in labels if v not in classes]
        if unknown:
            raise DataError(
                f"target {target!r}: values {unknown} (first at {where[unknown[0]]}) are "
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
                f"the values are {labels[:10]}"
            )
        others = [v for v in labels if v != pos]
        if len(others) > 1:
            third = min(others, key=lambda v: counts[v])  # the rarest is the likeliest typo
            n3 = counts[third]
            raise DataError(
                f"target {target!r}: a binary task has two label values but found "
                f"{len(labels)}: {labels[:10]} (value {third!r} in {n3} record"
                f"{'s' if n3 > 1 else ''}, "
                f"first at {where[third]}); "
                "fix the files, or set data.classes for a multiclass task"
            )
        neg = others[0] if others else f"not {pos}"
        return Task("binary", target, (neg, pos))
    if set(labels) <= {"0", "1"}:
        return Task("binary", target, ("0", "1"))
    if {v.lower() for v in labels} <= {"true", "false"}:
        return Task("binary", target, ("false", "true"))
    raise DataError(
        f"target {target!r} has values {labels[:10]}: set data.positive to the positive "
        "class for a binary task (or data.classes for multiclass)"
    )


def encode_labels(values: pd.Series, task: Task) -> np.ndarray:
    """Class indices (int64): 0/1 for binary (1 = positive), 0..K-1 for multiclass."""
    s = values.map(_label_str)
    if task.kind == "binary" and task.classes == ("false", "true"):
        s = s.str.lower()
    if task.kind == "binary":
        return (s == task.classes[1]).to_numpy(dtype=np.int64)
    index = {c: i for i, c in enumerate(task.classes)}
    return s.map(index).to_numpy(dtype=np.int64)


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

    def transform(self, df: pd.DataFrame, *, site: str = "input") -> np.ndarray:
        """Encode a frame into a float32 ``[rows, n_features]`` array (raises DataError)."""
        self.fit_check()
        n = len(df)
        blocks: list[np.ndarray] = []
        problems: list[str] = []
        for col, spec in self.schema.items():
            if col not in df.columns:
                problems.append(f"site {site!r}: column {col!r} of the schema is missing")
                continue
            values = df[col]
            na = values.isna().to_numpy()
            if na.any() and not spec.missing:
                problems.append(
                    f"site {site!r}, column {col!r}: missing values at "
                    f"{_rows(pd.Series(na))}; set missing = true in [data.schema.{col}]"
                )
                continue
            if spec.type == "numeric":
                assert spec.min is not None and spec.max is not None
                num = numeric_values(values).to_numpy(dtype=np.float64)
                bad = np.isnan(num) & ~na
                if bad.any():
                    problems.append(
                        f"site {site!r}, column {col!r}: non-numeric value "
                        f"{str(values[bad].iloc[0])!r} at {_rows(pd.Series(bad))}; "
                        "fix the file or declare the column categorical"
                    )
                    continue
                impute = (
                    spec.impute
                    if isinstance(spec.impute, int | float)
                    else ((spec.min + spec.max) / 2)
                )
                num = np.where(na, float(impute), num)
                scaled = np.clip((num - spec.min) / (spec.max - spec.min), 0.0, 1.0)
                blocks.append(scaled[:, None])
            elif spec.type == "binary":
                codes = np.zeros(n)
                try:
                    codes[~na] = binary_codes(values[~na], spec).to_numpy()
                except ValueError as exc:
                    problems.append(f"site {site!r}, column {col!r}: {exc}")
                    continue
                if na.any() and spec.impute is not None:
                    codes[na] = binary_codes(pd.Series([spec.impute]), spec).iloc[0]
                blocks.append(codes[:, None])
            else:
                cats = list(spec.values or [])
                s = values.astype(str).to_numpy()
                onehot = np.zeros((n, len(cats) + int(spec.other)))
                for j, c in enumerate(cats):
                    onehot[:, j] = (s == c) & ~na
                unknown = ~na & ~np.isin(s, cats)
                if unknown.any():
                    if spec.other:
                        onehot[:, -1] = unknown
                    else:
                        problems.append(
                            f"site {site!r}, column {col!r}: value {s[unknown][0]!r} at "
                            f"{_rows(pd.Series(unknown))} is not one of the declared values "
                            f"{cats}; add it to values or set other = true"
                        )
                        continue
                if na.any() and isinstance(spec.impute, str) and spec.impute in cats:
                    onehot[na, cats.index(spec.impute)] = 1.0
                blocks.append(onehot)
            if spec.missing:
                blocks.append(na.astype(np.float64)[:, None])
        if problems:
            raise DataError(problems)
        if not blocks:
            return np.zeros((n, 0), dtype=np.float32)
        return np.hstack(blocks).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": {c: s.model_dump(exclude_defaults=True) for c, s in self.schema.items()},
            "feature_names": self.feature_names,
            "numeric_scaling": "x -> clip((x - min) / (max - min), 0, 1)",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Encoder:
        return cls({c: ColumnSchema(**s) for c, s in d["schema"].items()})
