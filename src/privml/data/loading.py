"""Reading sites' files (CSV or Parquet) and checking them against each other and the schema."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from privml.config import ColumnSchema
from privml.errors import DataError

#: Strings read as a missing value in a CSV.
NA_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]
_MAX_LISTED = 5


def read_site_file(path: Path, *, site: str) -> pd.DataFrame:
    """Read one site's file. Every column is read as text-or-number; nothing is coerced silently."""
    if not path.exists():
        raise DataError(
            f"site {site!r}: file {str(path)!r} not found; fix data.sites path "
            "(relative paths are resolved against the config file's folder)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            from privml.extras import require

            require("parquet", f"site {site!r}: reading Parquet ({path.name})",
                    alternative="convert the file to CSV")
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".txt", ".gz"):
            df = pd.read_csv(path, na_values=NA_VALUES, keep_default_na=False, dtype=object)
        else:
            raise DataError(
                f"site {site!r}: {path.name!r} is neither CSV (.csv) nor Parquet (.parquet)"
            )
    except DataError:
        raise
    except pd.errors.EmptyDataError:
        raise DataError(
            f"site {site!r}: file {str(path)!r} is empty (no header, no rows)"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise DataError(f"site {site!r}: cannot read {str(path)!r}: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def numeric_values(values: pd.Series) -> pd.Series:
    """Values as float64; NaN where a value is missing, not a number, or not finite.

    ``inf`` and ``nan`` written in a file are refused like text: no bound can clip them into
    meaning, and silently turning them into the bound would hide a broken record.
    """
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(
        values.dtype
    ):
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    arr = np.where(np.isfinite(arr), arr, np.nan)
    return pd.Series(arr, index=values.index, name=values.name)


def _rows(mask: pd.Series) -> str:
    """``"row 8"`` or ``"rows 3, 8 and 2 more"`` for a boolean mask.

    Rows are numbered from 1 at the first data row (the header is not counted), so data row
    ``r`` of a CSV file is on line ``r + 1``.
    """
    mask = mask.astype(bool)
    idx = [int(i) + 1 for i in mask[mask].index[:_MAX_LISTED]]
    more = int(mask.sum()) - len(idx)
    word = "row" if len(idx) == 1 and more <= 0 else "rows"
    return f"{word} " + ", ".join(map(str, idx)) + (f" and {more} more" if more > 0 else "")


def check_columns_agree(
    frames: Mapping[str, pd.DataFrame],
    *,
    declared: Mapping[str, ColumnSchema],
    target: str,
    exclude: tuple[str, ...] = (),
) -> list[str]:
    """Problems with the sites' column sets, before any schema is inferred.

    Every site must have the same columns: each column of the declared schema, the target,
    and any undeclared column must be at every site (or listed in ``data.exclude``). A column
    present at some sites only is reported once, naming where it is and where it is not.
    """
    problems: list[str] = []
    names = list(frames)
    cols = {site: set(df.columns) - set(exclude) for site, df in frames.items()}
    for site in names:
        if len(frames[site]) == 0:
            continue
        if target not in cols[site]:
            shown = ", ".join(sorted(cols[site])[:10])
            problems.append(
                f"site {site!r}: target column {target!r} is missing (columns: {shown}); "
                "fix data.target or add the column to the file"
            )
        missing = [c for c in declared if c not in cols[site] and c != target]
        if missing:
            problems.append(
                f"site {site!r}: columns {missing} declared in [data.schema] are missing from "
                "the file; add them to the file, or remove them from [data.schema]"
            )
    seen: list[str] = []
    for site in names:
        seen += [c for c in frames[site].columns if c not in seen]
    for col in seen:
        if col in declared or col == target or col in exclude:
            continue
        have = [s for s in names if col in cols[s]]
        lack = [s for s in names if col not in cols[s]]
        if lack:
            problems.append(
                f"column {col!r} is at sites {have} but not at sites {lack}: every site needs "
                f"the same columns; add it where it is missing, or list it in data.exclude"
            )
    return problems


def check_sites(
    frames: Mapping[str, pd.DataFrame],
    *,
    schema: Mapping[str, ColumnSchema],
    target: str,
    exclude: tuple[str, ...] = (),
) -> list[str]:
    """Every problem in the sites' frames, as messages naming site, row and column.

    Checks: empty sites, the target column present, the same columns at every site as in the
    schema, numeric columns parse as numbers, categories and binary values are declared, and
    missing values only where the schema allows them.
    """
    problems: list[str] = []
    expected = set(schema) | {target}
    for site, df in frames.items():
        if len(df) == 0:
            problems.append(f"site {site!r}: no rows; remove the site or give it data")
            continue
        cols = set(df.columns) - set(exclude)
        if target not in cols:
            problems.append(
                f"site {site!r}: target column {target!r} is missing "
                f"(columns: {', '.join(sorted(cols)[:10])}); fix data.target or the file"
            )
        missing_cols = sorted(expected - cols - {target})
        extra_cols = sorted(cols - expected)
        if missing_cols:
            problems.append(
                f"site {site!r}: columns {missing_cols} of the schema are missing from the "
                "file; add them to the file, or remove them from [data.schema]"
            )
        if extra_cols:
            problems.append(
                f"site {site!r}: columns {extra_cols} are not in the schema nor at the other "
                "sites; declare them in [data.schema] or list them in data.exclude"
            )
        for col, spec in schema.items():
            if col not in df.columns:
                continue
            problems += _check_column(site, col, df[col], spec)
    return problems


def _check_column(site: str, col: str, values: pd.Series, spec: ColumnSchema) -> list[str]:
    out: list[str] = []
    na = values.isna()
    if na.any() and not spec.missing:
        out.append(
            f"site {site!r}, column {col!r}: missing values at {_rows(na)}; "
            f"set missing = true in [data.schema.{col}] to impute them"
        )
    present = values[~na]
    if spec.type == "numeric":
        num = numeric_values(present)
        bad = num.isna()
        if bad.any():
            first = present[bad].iloc[0]
            out.append(
                f"site {site!r}, column {col!r}: non-numeric value {str(first)!r} at "
                f"{_rows(bad.reindex(values.index, fill_value=False))}; "
                "fix the file or declare the column categorical"
            )
    elif spec.type == "categorical" and not spec.other:
        allowed = set(spec.values or [])
        bad = ~present.astype(str).isin(allowed)
        if bad.any():
            first = present[bad].iloc[0]
            out.append(
                f"site {site!r}, column {col!r}: value {str(first)!r} at "
                f"{_rows(bad.reindex(values.index, fill_value=False))} is not one of the "
                f"declared values {spec.values}; add it to values or set other = true"
            )
    elif spec.type == "binary":
        try:
            binary_codes(present, spec)
        except ValueError as exc:
            out.append(f"site {site!r}, column {col!r}: {exc}")
    return out


def binary_codes(values: pd.Series, spec: ColumnSchema) -> pd.Series:
    """Map a binary column's present values to 0.0/1.0 (raises ValueError naming bad rows)."""
    if spec.values is not None:
        neg, pos = spec.values
        s = values.astype(str)
        bad = ~s.isin([neg, pos])
        if bad.any():
            raise ValueError(
                f"value {str(values[bad].iloc[0])!r} at {_rows(bad)} is neither "
                f"{neg!r} nor {pos!r}"
            )
        return (s == pos).astype(float)
    low = values.astype(str).str.strip().str.lower()
    mapped = low.map({"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "true": 1.0, "false": 0.0})
    bad = mapped.isna()
    if bad.any():
        raise ValueError(
            f"value {str(values[bad].iloc[0])!r} at {_rows(bad)} is not 0/1/true/false; "
            "declare values = [negative, positive]"
        )
    return mapped.astype(float)
