"""Reading sites' files (CSV or Parquet) and checking them against each other and the schema."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from privml.config import ColumnSchema
from privml.errors import DataError

#: Strings read as a missing value in a CSV.
NA_VALUES = ["", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?"]
_MAX_LISTED = 5


#: Largest site file read (uncompressed bytes; a gzip file is stopped when it inflates past it).
MAX_SITE_FILE_BYTES = 16 * 1024**3
_MAX_HEADER_BYTES = 4 * 1024**2


class _Bounded(io.RawIOBase):
    """A read-only stream that fails (DataError) once more than ``limit`` bytes were read."""

    def __init__(self, inner: IO[bytes], limit: int, what: str) -> None:
        self._inner, self._left, self._what = inner, limit, what

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._inner.read(min(len(b), self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise DataError(
                f"{self._what} is larger than {MAX_SITE_FILE_BYTES:,} bytes uncompressed; "
                "split it or raise the limit"
            )
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._inner.close()
        super().close()


def _open_text_source(path: Path, *, site: str) -> IO[bytes]:
    """The file's bytes (decompressed for .gz), read with the size limit."""
    import gzip

    from privml.safe_io import open_regular

    raw = open_regular(path, what=f"site {site!r}: file", error=DataError)
    inner: Any = gzip.GzipFile(fileobj=raw) if path.suffix.lower() == ".gz" else raw
    what = f"site {site!r}: file {str(path)!r}"
    return io.BufferedReader(_Bounded(inner, MAX_SITE_FILE_BYTES, what), 1 << 20)


def _header_names(path: Path, *, site: str) -> list[str]:
    """The CSV header row as written (pandas renames repeated names, so read it ourselves)."""
    import csv

    with _open_text_source(path, site=site) as f:
        line = f.readline(_MAX_HEADER_BYTES + 1)
    if len(line) > _MAX_HEADER_BYTES:
        raise DataError(
            f"site {site!r}: the header row of {str(path)!r} is longer than "
            f"{_MAX_HEADER_BYTES:,} bytes; is it a CSV file?"
        )
    text = line.decode("utf-8-sig").rstrip("\r\n")
    try:
        rows = list(csv.reader([text], skipinitialspace=True))
    except csv.Error as exc:
        raise DataError(
            f"site {site!r}: cannot read the header row of {str(path)!r}: {exc}"
        ) from None
    return rows[0] if rows else []


def check_header(names: Sequence[Any], *, site: str, path: Path) -> list[str]:
    """Column names with surrounding spaces removed; refuses empty and repeated names.

    ``outcome, age`` reads as ``outcome`` and ``age``; ``outcome,outcome `` is refused (the
    same name twice once the space is removed), as is ``a,,b`` (a column without a name).
    """
    stripped = [str(c).strip() for c in names]
    empty = [i + 1 for i, c in enumerate(stripped) if not c]
    if empty:
        raise DataError(
            f"site {site!r}: column {empty[0]} of {str(path)!r} has no name in the header row; "
            "name every column (or delete the empty one)"
        )
    seen: dict[str, list[str]] = {}
    for raw, name in zip(names, stripped, strict=True):
        seen.setdefault(name, []).append(str(raw))
    dup = {n: v for n, v in seen.items() if len(v) > 1}
    if dup:
        shown = "; ".join(f"{n!r} ({', '.join(map(repr, v))})" for n, v in list(dup.items())[:5])
        raise DataError(
            f"site {site!r}: {str(path)!r} names a column more than once (surrounding spaces "
            f"ignored): {shown}; give every column a distinct name"
        )
    return stripped


def read_site_file(path: Path, *, site: str) -> pd.DataFrame:
    """Read one site's file. Every column is read as text-or-number; nothing is coerced silently.

    Refused with a :class:`DataError` naming the site and the file: a missing file, a folder, a
    FIFO, a device or a symbolic-link loop (before anything is opened), a file larger than
    :data:`MAX_SITE_FILE_BYTES` (uncompressed), a damaged or truncated gzip file, text that is
    not UTF-8, and a header with empty or repeated column names.
    """
    import os
    import zlib

    from privml.safe_io import check_regular_file

    path = Path(path)
    if not os.path.lexists(path):
        raise DataError(
            f"site {site!r}: file {str(path)!r} not found; fix data.sites path "
            "(relative paths are resolved against the config file's folder)"
        )
    st = check_regular_file(path, what=f"site {site!r}: file", error=DataError)
    if st.st_size > MAX_SITE_FILE_BYTES:
        raise DataError(
            f"site {site!r}: file {str(path)!r} is larger than {MAX_SITE_FILE_BYTES:,} bytes"
        )
    suffix = path.suffix.lower()
    arrow_errors: tuple[type[Exception], ...] = ()
    try:
        if suffix in (".parquet", ".pq"):
            from privml.extras import require

            require("parquet", f"site {site!r}: reading Parquet ({path.name})",
                    alternative="convert the file to CSV")
            import pyarrow as pa

            arrow_errors = (pa.ArrowException,)
            df = pd.read_parquet(path)
            names = list(df.columns)
        elif suffix in (".csv", ".txt", ".gz"):
            names = _header_names(path, site=site)
            with _open_text_source(path, site=site) as f:
                df = pd.read_csv(
                    f, na_values=NA_VALUES, keep_default_na=False, dtype=object,
                    skipinitialspace=True, encoding="utf-8",
                )  # fmt: skip
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
    except (EOFError, zlib.error) as exc:
        raise DataError(
            f"site {site!r}: {str(path)!r} is a damaged or truncated compressed file ({exc})"
        ) from None
    except UnicodeDecodeError:
        raise DataError(
            f"site {site!r}: {str(path)!r} is not UTF-8 text; save it as UTF-8 CSV"
        ) from None
    except (pd.errors.ParserError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"site {site!r}: cannot read {str(path)!r}: {exc}") from None
    except Exception as exc:
        if not isinstance(exc, arrow_errors):
            raise
        raise DataError(f"site {site!r}: cannot read {str(path)!r}: {exc}") from None
    if len(names) != len(df.columns):
        names = list(df.columns)  # the header row was not the first line pandas read
    df.columns = check_header(names, site=site, path=path)
    return df


def numeric_values(values: pd.Series) -> pd.Series:
    """Values as float64; NaN where a value is missing, not a number, or not finite.

    ``inf`` and ``nan`` written in a file are refused like text: no bound can clip them into
    meaning, and silently turning them into the bound would hide a broken record.
    """
    return pd.Series(numeric_array(values), index=values.index, name=values.name)


def numeric_array(values: pd.Series) -> np.ndarray:
    """:func:`numeric_values` as a new, writable float64 array."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(
        values.dtype
    ):
        arr = values.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        arr = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(arr), arr, np.nan)


def text_codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Each value's text as a code into a list of distinct texts (vectorized ``astype(str)``).

    ``codes[i]`` indexes ``texts`` with ``str(values[i])``; missing values get a code too (their
    text is whatever ``str`` gives), so callers mask them themselves. Only the distinct values
    are turned into text, so this costs one hashing pass over the column.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in values.cat.categories]
        codes = values.cat.codes.to_numpy().astype(np.int64)
        texts = [*cats, "nan"]
        return np.where(codes < 0, len(cats), codes), texts
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) not in (
        "string",
        "empty",
    ):
        # mixed Python objects (1, 1.0 and True compare equal): stringify before hashing
        values = values.astype(str)
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    texts = [str(u) for u in uniques]
    codes = np.asarray(codes, dtype=np.int64)
    if (codes < 0).any():
        codes = np.where(codes < 0, len(texts), codes)
        texts.append("nan")
    return codes, texts


def _rows(mask: pd.Series) -> str:
    """``"row 8"`` or ``"rows 3, 8 and 2 more"`` for a boolean mask.

    Rows are numbered from 1 at the first data row (the header is not counted), so data row
    ``r`` of a CSV file is on line ``r + 1``.
    """
    mask = mask.astype(bool)
    idx = [int(i) + 1 for i in mask[mask].index[:_MAX_LISTED]]
    more = int(mask.sum()) - len(idx)
    return _rows_text(idx, more)


def _rows_text(rows: Sequence[int], more: int) -> str:
    word = "row" if len(rows) == 1 and more <= 0 else "rows"
    return f"{word} " + ", ".join(map(str, rows)) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Located:
    """The records of one site picked by a mask: for a message naming site and rows."""

    site: int  # position of the site
    name: str
    rows: str  # "row 3" / "rows 3, 8 and 2 more" (numbered from 1 within the site)
    first: int  # position of the first such record in the pooled frame
    index: int  # where that position is in the array given to locate_positions


class Locator:
    """Where each record of a pooled frame comes from: sites are consecutive blocks of rows.

    ``offsets[i]:offsets[i + 1]`` are the rows of site ``names[i]``; ``labels`` (optional) are
    the row labels to print (0-based), default the position within the site.
    """

    def __init__(
        self, names: Sequence[str], offsets: np.ndarray, labels: np.ndarray | None = None
    ) -> None:
        self.names = list(names)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.labels = labels
        if len(self.offsets) != len(self.names) + 1:
            raise ValueError("offsets must have one entry more than names")

    @classmethod
    def single(cls, name: str, index: pd.Index) -> Locator:
        """One site's frame; rows are numbered by its index labels (a RangeIndex: positions)."""
        labels = None
        if not isinstance(index, pd.RangeIndex) or index.start != 0 or index.step != 1:
            labels = np.asarray(index, dtype=np.int64)
        return cls([name], np.array([0, len(index)]), labels)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def site_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def locate(self, mask: np.ndarray | pd.Series) -> list[Located]:
        """The sites having a record in ``mask`` (pooled positions), in site order."""
        pos = np.flatnonzero(np.asarray(mask, dtype=bool))
        return self.locate_positions(pos)

    def locate_positions(self, positions: np.ndarray) -> list[Located]:
        """:meth:`locate` for an array of positions (any order)."""
        if len(positions) == 0:
            return []
        sort = np.argsort(positions, kind="stable")
        pos = np.asarray(positions)[sort]
        site = self.site_of(pos)
        starts = np.flatnonzero(np.r_[True, site[1:] != site[:-1]])
        ends = np.r_[starts[1:], len(pos)]
        out = []
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            s = int(site[a])
            shown = pos[a : min(b, a + _MAX_LISTED)]
            if self.labels is not None:
                rows = [int(r) + 1 for r in self.labels[shown]]
            else:
                rows = [int(p - self.offsets[s]) + 1 for p in shown]
            text = _rows_text(rows, b - a - len(rows))
            out.append(Located(s, self.names[s], text, int(pos[a]), int(sort[a])))
        return out


@dataclass
class Pooled:
    """Every site's records in one frame, site after site, and where each row comes from."""

    frame: pd.DataFrame
    where: Locator
    has_column: dict[str, np.ndarray] = field(default_factory=dict)  # column -> row mask

    def present(self, col: str) -> np.ndarray | None:
        """Rows of the sites that have ``col`` (None: every site has it)."""
        return self.has_column.get(col)


def pool_frames(frames: Mapping[str, pd.DataFrame]) -> Pooled:
    """Concatenate the sites' frames (one pass); a column some sites lack is marked per row."""
    names = list(frames)
    sizes = np.array([len(df) for df in frames.values()], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if not names:
        return Pooled(pd.DataFrame(), Locator([], offsets))
    first_cols = list(next(iter(frames.values())).columns)
    same = all(list(df.columns) == first_cols for df in frames.values())
    non_empty = [df for df in frames.values() if len(df)]
    if len(non_empty) == 1:
        frame = non_empty[0].reset_index(drop=True)
    elif non_empty:
        frame = pd.concat(non_empty, ignore_index=True)
    else:
        frame = pd.DataFrame(columns=first_cols)
    has: dict[str, np.ndarray] = {}
    if not same:
        for col in frame.columns:
            site_has = np.array([col in df.columns for df in frames.values()])
            if not site_has.all():
                has[col] = np.repeat(site_has, sizes)
    return Pooled(frame, Locator(names, offsets), has)


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
    missing values only where the schema allows them. The values are checked in one pass over
    all sites' records (:func:`check_values`); messages come site by site.
    """
    found: list[tuple[int, int, str]] = []  # (site, order within the site, message)
    expected = set(schema) | {target}
    verdicts: dict[tuple[str, ...], list[str]] = {}
    for i, (site, df) in enumerate(frames.items()):
        if len(df) == 0:
            found.append((i, -1, f"site {site!r}: no rows; remove the site or give it data"))
            continue
        key = tuple(df.columns)
        if key not in verdicts:
            verdicts[key] = _column_problems(set(key) - set(exclude), expected, target)
        found += [(i, -1, f"site {site!r}: {msg}") for msg in verdicts[key]]
    found += check_values(pool_frames(frames), schema)
    found.sort(key=lambda t: (t[0], t[1]))
    return [msg for _, _, msg in found]


def _column_problems(cols: set[str], expected: set[str], target: str) -> list[str]:
    """What is wrong with a site having these columns (each message follows ``site 'x': ``)."""
    out = []
    if target not in cols:
        out.append(
            f"target column {target!r} is missing (columns: {', '.join(sorted(cols)[:10])}); "
            "fix data.target or the file"
        )
    missing_cols = sorted(expected - cols - {target})
    extra_cols = sorted(cols - expected)
    if missing_cols:
        out.append(
            f"columns {missing_cols} of the schema are missing from the file; add them to the "
            "file, or remove them from [data.schema]"
        )
    if extra_cols:
        out.append(
            f"columns {extra_cols} are not in the schema nor at the other sites; declare them "
            "in [data.schema] or list them in data.exclude"
        )
    return out


def check_values(pooled: Pooled, schema: Mapping[str, ColumnSchema]) -> list[tuple[int, int, str]]:
    """Value problems of every site at once: ``(site position, column position, message)``.

    One vectorized pass per column over the pooled records; a message per site with a problem
    (the first offending value and its rows within that site).
    """
    out: list[tuple[int, int, str]] = []
    frame, where = pooled.frame, pooled.where
    for j, (col, spec) in enumerate(schema.items()):
        if col not in frame.columns:
            continue
        values = frame[col]
        has = pooled.present(col)
        isna = values.isna().to_numpy()
        na = isna if has is None else isna & has
        present = ~isna if has is None else ~isna & has
        if na.any() and not spec.missing:
            out += [
                (loc.site, j, f"site {loc.name!r}, column {col!r}: missing values at "
                 f"{loc.rows}; set missing = true in [data.schema.{col}] to impute them")
                for loc in where.locate(na)
            ]  # fmt: skip
        if spec.type == "numeric":
            bad = np.isnan(numeric_array(values)) & present
            out += [
                (loc.site, j, f"site {loc.name!r}, column {col!r}: non-numeric value "
                 f"{str(values.iloc[loc.first])!r} at {loc.rows}; "
                 "fix the file or declare the column categorical")
                for loc in where.locate(bad)
            ]  # fmt: skip
        elif spec.type == "categorical" and not spec.other:
            codes, texts = text_codes(values)
            allowed = np.isin(np.asarray(texts, dtype=object), list(spec.values or []))
            bad = ~allowed[codes] & present
            out += [
                (loc.site, j, f"site {loc.name!r}, column {col!r}: value "
                 f"{str(values.iloc[loc.first])!r} at {loc.rows} is not one of the declared "
                 f"values {spec.values}; add it to values or set other = true")
                for loc in where.locate(bad)
            ]  # fmt: skip
        elif spec.type == "binary":
            codes, texts = text_codes(values)
            bad = np.isnan(binary_table(texts, spec)[codes]) & present
            out += [
                (loc.site, j, f"site {loc.name!r}, column {col!r}: "
                 + binary_problem(values.iloc[loc.first], loc.rows, spec))
                for loc in where.locate(bad)
            ]  # fmt: skip
    return out


_BINARY_TEXT = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0, "true": 1.0, "false": 0.0}


def binary_table(texts: Sequence[str], spec: ColumnSchema) -> np.ndarray:
    """0.0/1.0 for each text of a binary column, NaN for a text that is neither value."""
    if spec.values is not None:
        neg, pos = spec.values
        table = [1.0 if t == pos else 0.0 if t == neg else np.nan for t in texts]
    else:
        table = [_BINARY_TEXT.get(t.strip().lower(), np.nan) for t in texts]
    return np.asarray(table, dtype=np.float64)


def binary_problem(value: object, rows: str, spec: ColumnSchema) -> str:
    if spec.values is not None:
        neg, pos = spec.values
        return f"value {str(value)!r} at {rows} is neither {neg!r} nor {pos!r}"
    return (
        f"value {str(value)!r} at {rows} is not 0/1/true/false; "
        "declare values = [negative, positive]"
    )


def binary_codes(values: pd.Series, spec: ColumnSchema) -> pd.Series:
    """Map a binary column's present values to 0.0/1.0 (raises ValueError naming bad rows)."""
    codes, texts = text_codes(values)
    mapped = binary_table(texts, spec)[codes]
    bad = np.isnan(mapped)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            binary_problem(values.iloc[first], _rows(pd.Series(bad, index=values.index)), spec)
        )
    return pd.Series(mapped, index=values.index, name=values.name)
