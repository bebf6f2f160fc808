"""What a record is, to the privacy ledger and to the train/test split: a hash of its content.

* :func:`record_hashes` -- one 64-bit hash per record (row) of a frame, computed from the
  record's own values only: columns in name order, each value canonicalized (a number that
  parses is its float64 value, so ``"1"``, ``"1.0"`` and ``1`` agree and CSV and Parquet files
  of the same records agree; text is its exact string; a missing value is one marker).
* :func:`held_out` -- the record-local train/test split: a record is held out when a keyed mix
  of its hash with the split seed falls below ``test_fraction``. A record's side depends on
  that record alone, so adding or removing a record never moves another one.
* :func:`fingerprint` -- a site's data fingerprint: SHA-256 over its records' hashes, sorted
  (the multiset of records: row order and file format do not matter). The ledger keys a
  site's budget by it.

The 64-bit mix is splitmix64's finalizer (Steele et al. 2014), a non-cryptographic mixer: it
needs to spread records uniformly, not to resist an adversary. A collision of two different
sites' fingerprints would merge their budgets (the safe direction); a different fingerprint
for the same records is impossible, since the hash is a function of the records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

__all__ = ["fingerprint", "held_out", "record_hashes"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NA = np.uint64(0x7FF8_0000_DEAD_0001)  # a NaN payload no finite number has
_BLOCK = 1 << 20
FINGERPRINT_VERSION = "privml-records/1"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _text_word(text: str, salt: bytes = b"") -> int:
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=b"privml-text")
    if salt:
        h.update(salt)
    return int.from_bytes(h.digest(), "little")


def _texts(values: Sequence[object] | np.ndarray) -> np.ndarray:
    return np.fromiter((_text_word(str(v)) for v in values), dtype=np.uint64, count=len(values))


def _numbers(arr: np.ndarray) -> np.ndarray:
    """Words of float64 values: finite -> their bits (-0 as 0), NaN -> NA, +-inf -> text."""
    a = np.where(arr == 0, 0.0, arr)  # -0.0 == 0.0
    words = a.view(np.uint64).copy()
    words[np.isnan(a)] = _NA
    inf = np.isinf(a)
    if inf.any():
        words[inf & (a > 0)] = np.uint64(_text_word("inf"))
        words[inf & (a < 0)] = np.uint64(_text_word("-inf"))
    return words


def _words(col: pd.Series) -> np.ndarray:
    """One uint64 per value of ``col``, a function of the value alone (see the module doc)."""
    dtype = col.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy()
        cats = _words(pd.Series(np.asarray(col.cat.categories, dtype=object)))
        out = np.full(len(col), _NA, dtype=np.uint64)
        ok = codes >= 0
        out[ok] = cats[codes[ok]]
        return out
    if pd.api.types.is_bool_dtype(dtype):
        values = col.to_numpy(dtype=object)
        out = np.full(len(col), _NA, dtype=np.uint64)
        na = pd.isna(col).to_numpy()
        out[~na] = _texts(values[~na])
        return out
    if pd.api.types.is_numeric_dtype(dtype):
        return _numbers(col.to_numpy(dtype=np.float64, na_value=np.nan))
    # text-or-number (a CSV column): numbers by value, the rest as exact text
    na = pd.isna(col).to_numpy()
    num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    out = _numbers(num)
    out[na] = _NA
    text = np.isnan(num) & ~na | np.isinf(num)
    if text.any():
        codes, uniques = pd.factorize(col[text])
        out[text] = _texts(list(uniques))[codes]
    return out


def record_hashes(frame: pd.DataFrame, rows: np.ndarray | None = None) -> np.ndarray:
    """A uint64 hash of each record of ``frame`` (or of ``frame.iloc[rows]``, in that order).

    Depends on the records' values and column names only (not on row positions, the other
    records, the index or the file format); columns are taken in name order.
    """
    n = len(frame) if rows is None else len(rows)
    h = np.full(n, _GOLDEN, dtype=np.uint64)
    for name in sorted(str(c) for c in frame.columns):
        col = frame[name]
        if rows is not None:
            col = col.iloc[rows]
        salt = np.uint64(_text_word(name, b"column"))
        w = _words(col.reset_index(drop=True))
        w ^= salt
        h += _mix(w)
        _mix(h)
    return h


def held_out(hashes: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """The record-local split: True for the records held out for testing.

    A record is held out when ``mix(hash xor key(seed)) / 2^64 < test_fraction``: about
    ``test_fraction`` of the records, each decided by its own content and the seed.
    """
    key = np.uint64(_text_word(str(int(seed)), b"split"))
    out = np.empty(len(hashes), dtype=bool)
    for a in range(0, len(hashes), _BLOCK):
        x = hashes[a : a + _BLOCK] ^ key
        _mix(x)
        out[a : a + _BLOCK] = (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < test_fraction
    return out


def fingerprint(hashes: np.ndarray, columns: Iterable[object] = ()) -> str:
    """``"sha256:<hex>"`` of a site's records: their hashes sorted, with the column names."""
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\x00")
    h.update("\x1f".join(sorted(str(c) for c in columns)).encode() + b"\x00")
    h.update(np.sort(np.asarray(hashes, dtype=np.uint64)).astype("<u8").tobytes())
    return "sha256:" + h.hexdigest()
