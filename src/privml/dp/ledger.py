"""A persistent, process-safe privacy budget ledger (SQLite, WAL mode), kept per record.

A budget belongs to the records it protects, not to a file, a config or a folder, and every
record has its own. A charge pays for a *dataset version* -- the set of records a query or a
training run read -- and is admitted only if, for **every** record r of that set,

    spent(r) + cost <= budget,    spent(r) = the sum of the charges of every version holding r.

So appending, removing, shuffling or duplicating rows, editing one record, or splitting or
merging sites' files leaves every unchanged record's spend in place: only a record the ledger
has never seen starts at zero. A record is known by a keyed hash of its content
(:func:`privml.data.records.record_hashes`, then AES-256 under the ledger's key): the key is
a random 256-bit secret in a file beside the ledger (``<ledger>.key``, created with mode 0600),
so the ledger file alone does not let anyone test whether a guessed record is in it.

Storage. Each record is stored once, as an 8-byte keyed hash with its *class*: the set of
versions that hold it (records with the same set share a class). ``spent(r)`` is then the
spend of r's class, and admitting a charge on a version that has been seen before is a
question about its few classes, not about its records: one SQL query over classes and
charges, inside the ``BEGIN IMMEDIATE`` transaction that books the charge. A new version
(a file with a record added, say) is registered once, in that same transaction: its records
are looked up and, where the set of versions holding them changes, moved to a new class
(a class whose records all join the version is relabelled in place).

The budget ``(epsilon, delta)`` is the same for every record and is a property of the ledger:
fixed at its first use (from the config or the Python caller, or the defaults epsilon 10,
delta 1e-4), changed only by :meth:`PrivacyLedger.set_budget` (``privml budget set``), which
records the old and new values with the time in the ledger's budget history. A handle opened
with a different budget is refused (:class:`~privml.errors.UsageError`, exit 2) before
anything is booked or computed.

One relation. Every charge is a cost under the **replace-one** neighbouring relation (one
record replaced by another; the relation that holds when the number of records is public,
as privml's results publish it). A caller with an add/remove cost passes
``relation="add_or_remove"`` and the ledger books its replace-one bound by group privacy
(replace = remove + add): ``(2 epsilon, (1 + e^epsilon) delta)``, keeping the original in the
charge's metadata. The sums are therefore of like with like.

Composition rule: *basic (sequential) composition* per record; a relative slack of 1e-9
absorbs floating-point rounding (15 charges of 1/15 fit a budget of 1).

Safety properties:

* Check-then-commit is atomic (SQLite's write lock, ``BEGIN IMMEDIATE``): concurrent
  processes cannot jointly overspend; others wait up to ``timeout`` seconds.
* Durable before release: ``synchronous=FULL``; callers charge first and release after, so a
  process killed at any moment leaves the ledger showing at least what was released.
* No data in the ledger: costs, labels, privacy events, metadata and keyed record hashes.

Handles opened without records (the Python API's ``PrivacyLedger(path, dataset=...)``) keep
a budget per ``(dataset, site)`` name instead, with no record-level protection.

This module imports only the standard library at import time (numpy and ``cryptography`` are
imported when records are given), so a query process starts fast.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import math
import numbers
import os
import secrets
import sqlite3
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privml.errors import BudgetExceededError, UsageError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "DEFAULT_BUDGET",
    "RELATION",
    "BudgetChange",
    "BudgetStatus",
    "ChargeRecord",
    "PrivacyLedger",
    "Spend",
    "default_ledger_path",
    "key_path",
    "replace_one_cost",
]

_SCHEMA_VERSION = 3
_SLACK = 1e-9
_LEDGER_FILE = "privacy-ledger.sqlite"
_KEY_BYTES = 32
#: The neighbouring relation every charge in the ledger is booked under.
RELATION = "replace_one"
_RELATIONS = {
    "replace_one": "replace_one",
    "replace": "replace_one",
    "add_or_remove": "add_or_remove",
    "add_or_remove_one": "add_or_remove",
    "add_remove": "add_or_remove",
}

_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    site TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0),
    delta REAL NOT NULL CHECK (delta >= 0 AND delta <= 1),
    label TEXT NOT NULL,
    event TEXT,
    metadata TEXT NOT NULL,
    created_at TEXT NOT NULL,
    pid INTEGER NOT NULL,
    budget_epsilon REAL NOT NULL,
    budget_delta REAL NOT NULL,
    fingerprint TEXT,
    version INTEGER,
    relation TEXT NOT NULL DEFAULT 'replace_one'
)""",
    """CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('records', 'name', 'fingerprint', 'legacy')),
    dataset TEXT NOT NULL,
    site TEXT NOT NULL,
    n_records INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
)""",
    "CREATE TABLE IF NOT EXISTS records (record INTEGER PRIMARY KEY, class INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS classes (
    id INTEGER PRIMARY KEY,
    members TEXT NOT NULL UNIQUE,
    n_records INTEGER NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS class_versions (
    version INTEGER NOT NULL,
    class INTEGER NOT NULL,
    PRIMARY KEY (version, class)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS pending (
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (key, version)
) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS budget_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    epsilon REAL NOT NULL,
    delta REAL NOT NULL,
    old_epsilon REAL,
    old_delta REAL,
    reason TEXT NOT NULL,
    pid INTEGER NOT NULL
)""",
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS charges_by_site ON charges (dataset, site)",
    "CREATE INDEX IF NOT EXISTS charges_by_version ON charges (version)",
    "CREATE INDEX IF NOT EXISTS class_versions_by_class ON class_versions (class, version)",
)
# schema 2's lineage table: kept only to migrate schema 1 files through it
_LINEAGE_V2 = """CREATE TABLE IF NOT EXISTS lineage (
    fingerprint TEXT PRIMARY KEY,
    lineage TEXT NOT NULL,
    site TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created_at TEXT NOT NULL
)"""


def default_ledger_path() -> Path:
    """The per-user ledger: ``$XDG_DATA_HOME/privml/privacy-ledger.sqlite``.

    ``XDG_DATA_HOME`` defaults to ``~/.local/share`` (the XDG base directory specification;
    a relative value is ignored). ``[privacy] ledger`` in a config overrides it, e.g. for one
    ledger shared by a deployment.
    """
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "privml" / _LEDGER_FILE


def key_path(ledger: str | os.PathLike[str]) -> Path:
    """The ledger's secret key file: ``<ledger>.key`` beside it (mode 0600)."""
    p = Path(ledger)
    return p.with_name(p.name + ".key")


@dataclass(frozen=True)
class Spend:
    """An (epsilon, delta) amount under basic composition: epsilon in nats, delta in [0, 1]."""

    epsilon: float
    delta: float


#: The budget a new ledger gets when neither the config nor the caller names one.
DEFAULT_BUDGET = Spend(10.0, 1e-4)


def replace_one_cost(epsilon: float, delta: float) -> Spend:
    """The replace-one cost of an (epsilon, delta) add/remove guarantee, by group privacy.

    Replacing a record is removing it and adding another: two add/remove steps, so
    ``P[M(D) in S] <= e^2eps P[M(D') in S] + (1 + e^eps) delta``.
    """
    eps = float(epsilon)
    d = float(delta)
    if d == 0:
        return Spend(2 * eps, 0.0)
    return Spend(2 * eps, 1.0 if eps > 700 else min(1.0, (1.0 + math.exp(eps)) * d))


@dataclass(frozen=True)
class ChargeRecord:
    """One committed charge.

    Attributes:
        id: increasing row id (commit order).
        dataset, site: the dataset label and site name the charge was made for.
        epsilon, delta: the amount booked, under ``relation`` (always replace-one).
        label: what the charge paid for (e.g. the canonical query ``"mean(age)"``).
        event: the privacy event as a JSON-able dict (see :func:`privml.dp.events.event_to_dict`),
            or None.
        metadata: free JSON-able details given by the caller (an add/remove cost converted
            by the ledger is kept under ``"converted_from"``).
        created_at: UTC timestamp, ISO 8601.
        pid: the process that committed it.
        budget_epsilon, budget_delta: the ledger's budget when it was admitted.
        fingerprint: the key of the dataset version that paid (``set:...``, a keyed digest
            of its records; ``name:<dataset>/<site>`` for handles without records;
            ``legacy:...`` for charges booked before per-record accounting).
        relation: the neighbouring relation of ``epsilon``/``delta`` (``"replace_one"``).
    """

    id: int
    dataset: str
    site: str
    epsilon: float
    delta: float
    label: str
    event: dict[str, Any] | None
    metadata: dict[str, Any]
    created_at: str
    pid: int
    budget_epsilon: float
    budget_delta: float
    fingerprint: str | None = None
    relation: str = RELATION

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the record."""
        return {
            "id": self.id,
            "fingerprint": self.fingerprint,
            "dataset": self.dataset,
            "site": self.site,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "relation": self.relation,
            "label": self.label,
            "event": self.event,
            "metadata": self.metadata,
            "created_at": self.created_at,
            "pid": self.pid,
            "budget_epsilon": self.budget_epsilon,
            "budget_delta": self.budget_delta,
        }


@dataclass(frozen=True)
class BudgetStatus:
    """A site's budget, spend and remainder.

    With records, ``spent`` is the spend of the site's most-spent record (the one that
    decides what is admitted) and ``charges`` counts every charge that touched any of its
    records. ``lineage`` is kept for compatibility and is always None.
    """

    dataset: str
    site: str
    budget: Spend
    spent: Spend
    remaining: Spend
    charges: int = field(default=0)
    fingerprint: str | None = None
    lineage: str | None = None
    records: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the status."""
        return {
            "dataset": self.dataset,
            "site": self.site,
            "fingerprint": self.fingerprint,
            "records": self.records,
            "relation": RELATION,
            "budget_epsilon": self.budget.epsilon,
            "budget_delta": self.budget.delta,
            "spent_epsilon": self.spent.epsilon,
            "spent_delta": self.spent.delta,
            "remaining_epsilon": self.remaining.epsilon,
            "remaining_delta": self.remaining.delta,
            "charges": self.charges,
        }


@dataclass(frozen=True)
class BudgetChange:
    """One entry of the ledger's budget history (its first value, or a deliberate change)."""

    id: int
    created_at: str
    epsilon: float
    delta: float
    old_epsilon: float | None
    old_delta: float | None
    reason: str
    pid: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": self.created_at,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "old_epsilon": self.old_epsilon,
            "old_delta": self.old_delta,
            "reason": self.reason,
            "pid": self.pid,
        }


def _nonneg(name: str, func: str, value: object, *, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"The '{name}' parameter of {func} must be a real number. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = float(value)
    if not (v >= 0 and math.isfinite(v)) or (upper is not None and v > upper):
        bound = f" and <= {upper}" if upper is not None else ""
        raise UsageError(
            f"The '{name}' parameter of {func} must be >= 0{bound} and finite. "
            f"Got {value!r} instead."
        )
    return v


def _budget(func: str, epsilon: object, delta: object) -> tuple[float | None, float | None]:
    eps = None if epsilon is None else _nonneg("budget_epsilon", func, epsilon)
    if eps is not None and eps <= 0:
        raise UsageError(
            f"The 'budget_epsilon' parameter of {func} must be > 0. Got {epsilon!r} instead; "
            "set [privacy] budget_epsilon in the config."
        )
    d = None if delta is None else _nonneg("budget_delta", func, delta, upper=1.0)
    if d is not None and d >= 1:
        raise UsageError(f"The 'budget_delta' parameter of {func} must be < 1. Got {delta!r}.")
    return eps, d


def _name(name: str, func: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(
            f"The '{name}' parameter of {func} must be a non-empty string. Got {value!r} instead."
        )
    return value


def _relation(func: str, relation: object) -> str:
    name = _RELATIONS.get(str(relation).strip().lower().replace("-", "_"))
    if name is None:
        raise UsageError(
            f"The 'relation' parameter of {func} must be 'replace_one' or 'add_or_remove'. "
            f"Got {relation!r} instead."
        )
    return name


def _event_json(event: object) -> str | None:
    if event is None:
        return None
    if isinstance(event, Mapping):
        return json.dumps(dict(event), sort_keys=True)
    if hasattr(event, "to_named_tuple"):
        from privml.dp.events import event_to_json

        return event_to_json(event)  # type: ignore[arg-type]
    raise TypeError(
        "The 'event' parameter of PrivacyLedger.charge must be a dp_accounting DpEvent, a dict "
        f"from event_to_dict, or None. Got {type(event).__name__} instead."
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b))


# ----------------------------------------------------------------------------- the key


def _read_key(path: Path) -> bytes | None:
    """The key in ``path`` (None if there is none); refuses links, odd files, loose modes."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"The ledger's key {str(path)!r} is a symbolic link; privml reads the key "
                "only from a regular file beside the ledger."
            ) from None
        raise UsageError(f"The ledger's key {str(path)!r} cannot be read: {exc}.") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"The ledger's key {str(path)!r} is not a regular file.")
        if st.st_mode & 0o077:
            raise UsageError(
                f"The ledger's key {str(path)!r} can be read by other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}); with it, anyone holding the ledger can test "
                f"guesses of records. Run: chmod 600 {path}"
            )
        data = os.read(fd, 2 * _KEY_BYTES)
    finally:
        os.close(fd)
    if len(data) != _KEY_BYTES:
        raise UsageError(
            f"The ledger's key {str(path)!r} is damaged ({len(data)} bytes, expected "
            f"{_KEY_BYTES}); restore it from a backup."
        )
    return data


def _create_key(path: Path) -> bytes:
    """A fresh random key written to ``path`` (mode 0600), never replacing an existing one."""
    key = secrets.token_bytes(_KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic, and fails if a key appeared meanwhile
    except FileExistsError:
        existing = _read_key(path)
        assert existing is not None
        return existing
    finally:
        os.unlink(tmp)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass
    return key


def _subkey(key: bytes, label: str) -> bytes:
    return hmac.new(key, b"privml-ledger/" + label.encode(), hashlib.sha256).digest()


def _key_check(key: bytes) -> str:
    return _subkey(key, "key-check").hex()[:32]


def _keyed_records(raw: object, aes_key: bytes) -> np.ndarray:
    """Sorted distinct keyed hashes (int64) of the records whose plain hashes are ``raw``.

    Each record's 64-bit hash, padded with a constant to one 16-byte block, is encrypted with
    AES-256 under the ledger's record key (a pseudorandom permutation of blocks, i.e. a
    pseudorandom function of the record); the first 8 bytes are its keyed hash.
    """
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    arr = np.asarray(raw)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise UsageError(
            "The 'records' of PrivacyLedger must map each site to a 1-D array of integer record "
            "hashes (privml.data.records.record_hashes). Got an array of shape "
            f"{arr.shape} and dtype {arr.dtype}."
        )
    if arr.dtype.kind == "i":
        arr = arr.astype(np.int64).view(np.uint64)
    blocks = np.empty((arr.size, 2), dtype="<u8")
    blocks[:, 0] = arr
    blocks[:, 1] = 0x7072_6976_6D6C_7265  # "privmlre": the block's fixed half
    enc = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
    out = np.sort(np.frombuffer(enc.update(blocks.tobytes()) + enc.finalize(), dtype="<i8")[::2])
    if out.size > 1:  # distinct values (np.unique is ~50x slower here in numpy 2.4)
        out = out[np.concatenate(([True], out[1:] != out[:-1]))]
    return out


@dataclass
class _Site:
    name: str
    kind: str  # 'records', 'fingerprint' or 'name'
    key: str
    keyed: Any = None  # sorted distinct int64 keyed hashes ('records')
    pending_keys: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- the ledger


class PrivacyLedger:
    """Persistent privacy budget ledger in a SQLite file, kept per record.

    Args:
        path: the SQLite file (created with its parent folders if missing); its key is
            :func:`key_path` (created beside it on first use).
        dataset: label of the dataset these sites belong to (recorded with each charge).
        budget_epsilon, budget_delta: the budget each record may spend. A new ledger takes
            them (or :data:`DEFAULT_BUDGET` where None); an existing ledger keeps its own, and
            a value given here that differs from it is refused with
            :class:`~privml.errors.UsageError` naming :meth:`set_budget` /
            ``privml budget set``. None: whatever the ledger has.
        timeout: seconds to wait for another process's write lock (busy timeout).
        fingerprints: site name -> :func:`privml.data.records.fingerprint` of its records.
            Used with ``records`` to attach charges booked before per-record accounting; alone
            (no ``records``), a site's budget is that of the whole set (coarse: one changed
            record makes a new set).
        dataset_id: accepted for compatibility; recorded as the dataset label when given.
        records: site name -> its records' hashes (:func:`privml.data.records.record_hashes`):
            the site's budget is kept per record (see the module docstring). What every privml
            command passes.
        budget_source: what asked for ``budget_epsilon``/``budget_delta`` (e.g. a config's
            path), for messages and the budget history.

    Without ``records`` or ``fingerprints``, sites are keyed by ``(dataset, site)`` names.

    Usage::

        ledger = PrivacyLedger("ledger.sqlite", dataset="heart", records={"a": hashes})
        ledger.charge(site="a", epsilon=0.5, delta=0.0, label="mean(age)")  # first ...
        value = compute_noisy_mean(...)                                      # ... then release

    Each method opens its own short-lived connection, so one object can be shared by threads
    and survives ``fork``; separate processes may open the same file concurrently.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dataset: str,
        budget_epsilon: float | None = None,
        budget_delta: float | None = None,
        timeout: float = 60.0,
        fingerprints: Mapping[str, str] | None = None,
        dataset_id: str | None = None,
        records: Mapping[str, Any] | None = None,
        budget_source: str | None = None,
    ) -> None:
        func = "PrivacyLedger"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"The 'path' parameter of {func} must be a path. Got {path!r}.")
        self.path = Path(path)
        self.dataset = _name("dataset", func, dataset)
        asked = _budget(func, budget_epsilon, budget_delta)
        self.timeout = _nonneg("timeout", func, timeout)
        self.fingerprints = {
            _name("fingerprints", func, k): _name("fingerprints", func, v)
            for k, v in (fingerprints or {}).items()
        }
        self.records = {_name("records", func, k): v for k, v in (records or {}).items()}
        self.dataset_id = None if dataset_id is None else _name("dataset_id", func, dataset_id)
        self._sites: dict[str, _Site] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # pragma: no cover - e.g. unsupported filesystem
                raise UsageError(f"SQLite refused WAL mode for the ledger at {self.path}.")
            conn.execute("BEGIN IMMEDIATE")
            migrated = False
            try:
                version = self._schema_version(conn)
                self._key = self._open_key(conn)
                if version is None:
                    self._create(conn)
                elif version in (1, 2):
                    conn.execute("PRAGMA secure_delete=ON")  # erase what migration replaces
                    if version == 1:
                        _migrate_v1(conn)
                    _migrate_v2(conn, self._key)
                    migrated = True
                elif version != _SCHEMA_VERSION:
                    raise UsageError(
                        f"The ledger at {self.path} has schema version {version}; this privml "
                        f"reads versions 1 to {_SCHEMA_VERSION}."
                    )
                self.budget = self._fix_budget(conn, asked, budget_source)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if migrated:  # the replaced pages leave the write-ahead log too
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def __repr__(self) -> str:
        keyed = "record" if self.records else "fingerprint" if self.fingerprints else "name"
        return (
            f"PrivacyLedger({str(self.path)!r}, dataset={self.dataset!r}, "
            f"budget_epsilon={self.budget.epsilon!r}, budget_delta={self.budget.delta!r}, "
            f"sites kept by {keyed})"
        )

    # ------------------------------------------------------------------------- opening

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA temp_store=MEMORY")
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one read transaction: a consistent snapshot of the ledger."""
        with self._connect() as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int | None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchone()
        if has_meta is None:
            return None
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        for statement in (*_TABLES, *_INDEXES):
            conn.execute(statement)
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
            (str(_SCHEMA_VERSION),),
        )

    def _open_key(self, conn: sqlite3.Connection) -> bytes:
        """The ledger's key: read, checked against the ledger, or created for a new ledger."""
        kpath = key_path(self.path)
        check = None
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
            row = conn.execute("SELECT value FROM meta WHERE key='key_check'").fetchone()
            check = None if row is None else str(row[0])
        key = _read_key(kpath)
        if key is None:
            if check is not None:
                raise UsageError(
                    f"The ledger's key {str(kpath)!r} is missing. Without it privml cannot "
                    "recognise the records this ledger has charged, so it books nothing: "
                    "restore the key file from a backup (it is created once, beside the ledger)."
                )
            key = _create_key(kpath)
        elif check is not None and not hmac.compare_digest(check, _key_check(key)):
            raise UsageError(
                f"The key {str(kpath)!r} does not belong to the ledger {str(self.path)!r}; "
                "restore the ledger's own key file."
            )
        if check is None:
            conn.execute(_TABLES[0])
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('key_check', ?)",
                (_key_check(key),),
            )
        return key

    # ------------------------------------------------------------------------- the budget

    @staticmethod
    def _current_budget(conn: sqlite3.Connection) -> Spend | None:
        row = conn.execute(
            "SELECT epsilon, delta FROM budget_history ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return None if row is None else Spend(float(row[0]), float(row[1]))

    def _fix_budget(
        self,
        conn: sqlite3.Connection,
        asked: tuple[float | None, float | None],
        source: str | None,
    ) -> Spend:
        current = self._current_budget(conn)
        eps, delta = asked
        if current is None:
            new = Spend(
                DEFAULT_BUDGET.epsilon if eps is None else eps,
                DEFAULT_BUDGET.delta if delta is None else delta,
            )
            how = source or "the caller"
            if eps is None and delta is None:
                how = "the defaults"
            _insert_budget(conn, new, None, f"first use: budget from {how}")
            return new
        differs = []
        if eps is not None and not _close(eps, current.epsilon):
            differs.append(f"budget_epsilon = {eps:g}")
        if delta is not None and not _close(delta, current.delta):
            differs.append(f"budget_delta = {delta:g}")
        if differs:
            first = conn.execute(
                "SELECT created_at FROM budget_history ORDER BY id DESC LIMIT 1"
            ).fetchone()[0]
            raise UsageError(
                f"{source or 'this handle'} asks for {' and '.join(differs)}, but the ledger "
                f"{str(self.path)!r} has a budget of epsilon = {current.epsilon:g}, delta = "
                f"{current.delta:g} per record (set {first}). A ledger's budget is changed only "
                "deliberately, with its history kept: run `privml budget set --epsilon E "
                f"--delta D --ledger {self.path}` (or `--config` with your config), or remove "
                "budget_epsilon / budget_delta from [privacy] to use the ledger's. Nothing was "
                "computed or spent."
            )
        return current

    def set_budget(
        self,
        *,
        epsilon: float | None = None,
        delta: float | None = None,
        reason: str = "privml budget set",
    ) -> BudgetChange:
        """Changes the ledger's budget (per record), recording the old and new values.

        Lowering it below what records have spent is allowed: they get no more charges.
        """
        func = "PrivacyLedger.set_budget"
        eps, d = _budget(func, epsilon, delta)
        if eps is None and d is None:
            raise UsageError(f"{func} needs epsilon, delta or both.")
        reason = _name("reason", func, reason)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = self._current_budget(conn)
                base = old or DEFAULT_BUDGET
                new = Spend(base.epsilon if eps is None else eps, base.delta if d is None else d)
                row_id, created = _insert_budget(conn, new, old, reason)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self.budget = new
        return BudgetChange(
            row_id, created, new.epsilon, new.delta,
            None if old is None else old.epsilon, None if old is None else old.delta,
            reason, os.getpid(),
        )  # fmt: skip

    def budget_history(self) -> list[BudgetChange]:
        """Every value the ledger's budget has had, oldest first."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, created_at, epsilon, delta, old_epsilon, old_delta, reason, pid "
                "FROM budget_history ORDER BY id"
            ).fetchall()
        return [BudgetChange(*r) for r in rows]

    def max_spent(self) -> Spend:
        """The largest spend of any record (or name) in the whole ledger."""
        with self._connect() as conn:
            eps, delta = 0.0, 0.0
            for _, e, d in conn.execute(
                "SELECT cv.class, TOTAL(c.epsilon), TOTAL(c.delta) FROM classes k "
                "JOIN class_versions cv ON cv.class = k.id JOIN charges c ON c.version = "
                "cv.version WHERE k.n_records > 0 GROUP BY cv.class"
            ):
                eps, delta = max(eps, e), max(delta, d)
            for e, d in conn.execute(
                "SELECT TOTAL(c.epsilon), TOTAL(c.delta) FROM charges c JOIN versions v ON "
                "v.id = c.version WHERE v.kind IN ('name', 'fingerprint') GROUP BY v.id"
            ):
                eps, delta = max(eps, e), max(delta, d)
        return Spend(eps, delta)

    # ------------------------------------------------------------------------- sites

    def _site(self, site: str) -> _Site:
        got = self._sites.get(site)
        if got is not None:
            return got
        if self.records or self.fingerprints:
            if site in self.records:
                keyed = _keyed_records(self.records[site], _subkey(self._key, "records"))
                digest = hmac.new(
                    _subkey(self._key, "versions"), keyed.tobytes(), hashlib.sha256
                ).hexdigest()[:40]
                pend = [f"label:{self.dataset}/{site}"]
                if site in self.fingerprints:
                    pend.insert(0, self._fingerprint_key(self.fingerprints[site]))
                got = _Site(site, "records", f"set:{digest}", keyed, tuple(pend))
            elif site in self.fingerprints:
                fkey = self._fingerprint_key(self.fingerprints[site])
                got = _Site(site, "fingerprint", fkey, None, (fkey,))
            else:
                known = sorted(set(self.records) | set(self.fingerprints))
                raise UsageError(
                    f"Unknown site {site!r} for this ledger handle; its sites are "
                    f"{', '.join(known) or 'none'}."
                )
        else:
            got = _Site(site, "name", f"name:{self.dataset}/{site}")
        self._sites[site] = got
        return got

    def _fingerprint_key(self, fp: str) -> str:
        return "fp:" + hmac.new(
            _subkey(self._key, "fingerprints"), fp.encode(), hashlib.sha256
        ).hexdigest()[:40]

    def key(self, site: str) -> str:
        """The key ``site``'s charges are stored under: its version's keyed digest (or name)."""
        return self._site(site).key

    def _version(self, conn: sqlite3.Connection, site: str, *, bind: bool) -> int | None:
        """The id of the version ``site`` pays with; ``bind`` registers it (in a write txn)."""
        s = self._site(site)
        if s.kind == "fingerprint":  # a pre-record-accounting set, when still unmatched
            row = conn.execute(
                "SELECT version FROM pending WHERE key=? ORDER BY version LIMIT 1", (s.key,)
            ).fetchone()
            if row is not None:
                return int(row[0])
        row = conn.execute("SELECT id FROM versions WHERE key=?", (s.key,)).fetchone()
        if row is not None:
            return int(row[0])
        if not bind:
            return None
        n = 0 if s.keyed is None else int(s.keyed.size)
        cur = conn.execute(
            "INSERT INTO versions (key, kind, dataset, site, n_records, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (s.key, s.kind, self.dataset, site, n, _now()),
        )
        vid = int(cur.lastrowid or 0)
        if s.kind == "records":
            legacy = self._pending(conn, s)
            groups = _load_incoming(conn, s.keyed)
            _add_records(conn, {vid, *legacy}, groups)
            if legacy:
                conn.executemany(
                    "DELETE FROM pending WHERE version=?", [(v,) for v in sorted(legacy)]
                )
        return vid

    @staticmethod
    def _pending(conn: sqlite3.Connection, s: _Site) -> set[int]:
        """Versions of charges booked before per-record accounting that these records join."""
        if not s.pending_keys:
            return set()
        marks = ", ".join("?" * len(s.pending_keys))
        rows = conn.execute(
            f"SELECT DISTINCT version FROM pending WHERE key IN ({marks})", s.pending_keys
        ).fetchall()
        return {int(r[0]) for r in rows}

    # ------------------------------------------------------------------------- spending

    def _site_spend(self, conn: sqlite3.Connection, site: str) -> tuple[Spend, list[int], int]:
        """(spend of the site's most-spent record, versions whose charges touch it, records)."""
        s = self._site(site)
        vid = self._version(conn, site, bind=False)
        if s.kind != "records":
            if vid is None:
                return Spend(0.0, 0.0), [], 0
            return Spend(*_version_spend(conn, vid)), [vid], 0
        n = int(s.keyed.size)
        if vid is not None:
            classes = [
                int(r[0])
                for r in conn.execute(
                    "SELECT cv.class FROM class_versions cv JOIN classes k ON k.id = cv.class "
                    "WHERE cv.version=? AND k.n_records > 0",
                    (vid,),
                )
            ]
            spends = _class_spends(conn, classes)
            versions = _class_members(conn, classes)
            eps = max((e for e, _ in spends.values()), default=0.0)
            delta = max((d for _, d in spends.values()), default=0.0)
            return Spend(eps, delta), versions, n
        # not registered yet: look its records up without writing anything
        legacy = self._pending(conn, s)
        extra = {v: _version_spend(conn, v) for v in legacy}
        groups = _load_incoming(conn, s.keyed)
        classes = [c for c, _ in groups if c is not None]
        spends = _class_spends(conn, classes)
        members = {c: set(_class_members(conn, [c])) for c in classes}
        eps, delta = 0.0, 0.0
        for c, cnt in groups:
            if cnt == 0:
                continue
            e, d = spends.get(c, (0.0, 0.0)) if c is not None else (0.0, 0.0)
            held = members.get(c, set()) if c is not None else set()
            e += math.fsum(x[0] for v, x in extra.items() if v not in held)
            d += math.fsum(x[1] for v, x in extra.items() if v not in held)
            eps, delta = max(eps, e), max(delta, d)
        versions = sorted(set(_class_members(conn, classes)) | legacy)
        return Spend(eps, delta), versions, n

    def _status(
        self, conn: sqlite3.Connection, site: str, budget: Spend
    ) -> tuple[BudgetStatus, list[int]]:
        spent, versions, n = self._site_spend(conn, site)
        charges = 0
        if versions:
            marks = ", ".join("?" * len(versions))
            charges = int(
                conn.execute(
                    f"SELECT COUNT(*) FROM charges WHERE version IN ({marks})", versions
                ).fetchone()[0]
            )
        remaining = Spend(
            max(0.0, budget.epsilon - spent.epsilon), max(0.0, budget.delta - spent.delta)
        )
        s = self._site(site)
        status = BudgetStatus(
            self.dataset, site, budget, spent, remaining, charges, s.key, None,
            n if s.kind == "records" else None,
        )  # fmt: skip
        return status, versions

    def _read_budget(self, conn: sqlite3.Connection) -> Spend:
        budget = self._current_budget(conn) or self.budget
        self.budget = budget
        return budget

    def status(self, site: str) -> BudgetStatus:
        """Budget, spend and remainder of ``site`` (its most-spent record's)."""
        site = _name("site", "PrivacyLedger.status", site)
        with self._reading() as conn:
            status, _ = self._status(conn, site, self._read_budget(conn))
        return status

    def spent(self, site: str) -> Spend:
        """The spend of ``site``'s most-spent record (basic composition)."""
        return self.status(site).spent

    def remaining(self, site: str) -> Spend:
        """Budget left for ``site``'s most-spent record: budget minus spend, floored at 0."""
        return self.status(site).remaining

    def sites(self) -> list[str]:
        """Sites of this handle whose records have at least one charge, sorted.

        Without records or fingerprints: the sites charged under this dataset name.
        """
        if self.records or self.fingerprints:
            names = sorted(set(self.records) | set(self.fingerprints))
            return [s for s in names if self.status(s).charges]
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT v.site FROM versions v JOIN charges c ON c.version = v.id "
                "WHERE v.kind = 'name' AND v.key = 'name:' || ? || '/' || v.site ORDER BY v.site",
                (self.dataset,),
            ).fetchall()
        return [r[0] for r in rows]

    def history(self, site: str | None = None) -> list[ChargeRecord]:
        """Charges that touched the records of this handle's sites (or of one ``site``), in
        commit order."""
        if site is not None:
            sites = [_name("site", "PrivacyLedger.history", site)]
        elif self.records or self.fingerprints:
            sites = sorted(set(self.records) | set(self.fingerprints))
        else:
            sites = self.sites()
        with self._reading() as conn:
            versions: set[int] = set()
            for s in sites:
                versions.update(self._site_spend(conn, s)[1])
            if not versions:
                return []
            conn.row_factory = sqlite3.Row
            marks = ", ".join("?" * len(versions))
            rows = conn.execute(
                f"SELECT * FROM charges WHERE version IN ({marks}) ORDER BY id", sorted(versions)
            ).fetchall()
        return [self._record(r) for r in rows]

    @staticmethod
    def _record(row: sqlite3.Row) -> ChargeRecord:
        return ChargeRecord(
            id=int(row["id"]),
            dataset=row["dataset"],
            site=row["site"],
            epsilon=float(row["epsilon"]),
            delta=float(row["delta"]),
            label=row["label"],
            event=json.loads(row["event"]) if row["event"] is not None else None,
            metadata=json.loads(row["metadata"]),
            created_at=row["created_at"],
            pid=int(row["pid"]),
            budget_epsilon=float(row["budget_epsilon"]),
            budget_delta=float(row["budget_delta"]),
            fingerprint=row["fingerprint"],
            relation=row["relation"],
        )

    # ------------------------------------------------------------------------- admitting

    def _refusal(
        self, site: str, budget: Spend, spent: Spend, epsilon: float, delta: float
    ) -> str | None:
        b = budget
        over_eps = spent.epsilon + epsilon > b.epsilon * (1 + _SLACK)
        over_delta = spent.delta + delta > b.delta * (1 + _SLACK)
        if not (over_eps or over_delta):
            return None
        rem_eps = max(0.0, b.epsilon - spent.epsilon)
        rem_delta = max(0.0, b.delta - spent.delta)
        asked = []
        if over_eps:
            asked.append(f"epsilon={epsilon:g} but only {rem_eps:g} of {b.epsilon:g} remains")
        if over_delta:
            asked.append(f"delta={delta:g} but only {rem_delta:g} of {b.delta:g} remains")
        whose = (
            "for the most-spent of its records, whatever config, file or folder spent it"
            if self._site(site).kind == "records"
            else "for its name"
        )
        return (
            f"privacy budget exceeded for site {site!r} of dataset {self.dataset!r} ({whose}): "
            f"asked {' and '.join(asked)} (spent epsilon={spent.epsilon:g}, "
            f"delta={spent.delta:g}, replace-one). Nothing was spent. Ask for less; the "
            "ledger's budget changes only with `privml budget set` (recorded in its history)."
        )

    def _convert(
        self, func: str, epsilon: float, delta: float, relation: str | None, meta: dict[str, Any]
    ) -> tuple[float, float]:
        stated = meta.get("neighboring_relation")
        if relation is None:
            relation = stated if isinstance(stated, str) else RELATION
        rel = _relation(func, relation)
        if isinstance(stated, str) and _RELATIONS.get(stated) not in (None, rel):
            raise UsageError(
                f"The 'relation' parameter of {func} ({relation!r}) contradicts the metadata's "
                f"neighboring_relation ({stated!r})."
            )
        if rel == RELATION:
            return epsilon, delta
        cost = replace_one_cost(epsilon, delta)
        meta["converted_from"] = {
            "relation": rel,
            "epsilon": epsilon,
            "delta": delta,
            "rule": "group privacy: replace one = remove one + add one",
        }
        return cost.epsilon, cost.delta

    def check(
        self, *, site: str, epsilon: float, delta: float = 0.0, relation: str | None = None
    ) -> BudgetStatus:
        """Raises :class:`~privml.errors.BudgetExceededError` if the spend would not fit.

        Spends nothing and writes nothing. Use it to stop a training run before it starts;
        the authoritative check is the one inside :meth:`charge`. ``relation`` as in
        :meth:`charge`.
        """
        func = "PrivacyLedger.check"
        site = _name("site", func, site)
        eps = _nonneg("epsilon", func, epsilon)
        d = _nonneg("delta", func, delta, upper=1.0)
        eps, d = self._convert(func, eps, d, relation, {})
        with self._reading() as conn:
            budget = self._read_budget(conn)
            status, _ = self._status(conn, site, budget)
        message = self._refusal(site, budget, status.spent, eps, d)
        if message:
            raise BudgetExceededError(message)
        return status

    def charge(
        self,
        *,
        site: str,
        epsilon: float,
        delta: float = 0.0,
        label: str,
        event: object = None,
        metadata: Mapping[str, Any] | None = None,
        relation: str | None = None,
    ) -> ChargeRecord:
        """Books a spend of (``epsilon``, ``delta``) on ``site``'s records or refuses it.

        Inside one ``BEGIN IMMEDIATE`` transaction: registers the site's record set if it is
        new, finds the spend of its most-spent record, raises
        :class:`~privml.errors.BudgetExceededError` (writing nothing) if the new charge does
        not fit, else inserts it and commits with ``synchronous=FULL`` before returning.
        Release the noisy result only after this returns.

        Args:
            site: the site whose records pay.
            epsilon: epsilon >= 0 to book (nats).
            delta: delta in [0, 1] to book.
            label: what it pays for (e.g. ``"mean(age)"`` or ``"round 3"``).
            event: the DpEvent behind the spend (a dp_accounting DpEvent, or a dict from
                :func:`privml.dp.events.event_to_dict`), stored as JSON.
            metadata: JSON-able details (e.g. accountant, round number).
            relation: the neighbouring relation ``epsilon``/``delta`` hold for:
                ``"replace_one"`` (booked as is) or ``"add_or_remove"`` (booked as its
                replace-one bound, :func:`replace_one_cost`). Default: the metadata's
                ``neighboring_relation`` if it names one, else replace-one.

        Returns:
            The committed :class:`ChargeRecord` (its amount is the replace-one cost booked).
        """
        func = "PrivacyLedger.charge"
        site = _name("site", func, site)
        eps = _nonneg("epsilon", func, epsilon)
        d = _nonneg("delta", func, delta, upper=1.0)
        label = _name("label", func, label)
        event_json = _event_json(event)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(
                f"The 'metadata' parameter of {func} must be a mapping. "
                f"Got {type(metadata).__name__} instead."
            )
        meta = dict(metadata or {})
        eps, d = self._convert(func, eps, d, relation, meta)
        try:
            metadata_json = json.dumps(meta, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"The 'metadata' parameter of {func} must be JSON-able: {exc}"
            ) from exc
        created = _now()
        key = self.key(site)
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                budget = self._read_budget(conn)
                vid = self._version(conn, site, bind=True)
                spent, _, _ = self._site_spend(conn, site)
                message = self._refusal(site, budget, spent, eps, d)
                if message:
                    raise BudgetExceededError(message)
                cur = conn.execute(
                    "INSERT INTO charges (dataset, site, epsilon, delta, label, event, metadata, "
                    "created_at, pid, budget_epsilon, budget_delta, fingerprint, version, "
                    "relation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.dataset, site, eps, d, label, event_json, metadata_json, created,
                        os.getpid(), budget.epsilon, budget.delta, key, vid, RELATION,
                    ),
                )  # fmt: skip
                row_id = int(cur.lastrowid or 0)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return ChargeRecord(
            id=row_id,
            dataset=self.dataset,
            site=site,
            epsilon=eps,
            delta=d,
            label=label,
            event=json.loads(event_json) if event_json else None,
            metadata=json.loads(metadata_json),
            created_at=created,
            pid=os.getpid(),
            budget_epsilon=budget.epsilon,
            budget_delta=budget.delta,
            fingerprint=key,
            relation=RELATION,
        )


# ----------------------------------------------------------------------------- record classes


def _insert_budget(
    conn: sqlite3.Connection, new: Spend, old: Spend | None, reason: str
) -> tuple[int, str]:
    created = _now()
    cur = conn.execute(
        "INSERT INTO budget_history (created_at, epsilon, delta, old_epsilon, old_delta, reason, "
        "pid) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            created, new.epsilon, new.delta, None if old is None else old.epsilon,
            None if old is None else old.delta, reason, os.getpid(),
        ),
    )  # fmt: skip
    return int(cur.lastrowid or 0), created


def _load_incoming(conn: sqlite3.Connection, keyed: np.ndarray) -> list[tuple[int | None, int]]:
    """Fills ``temp.incoming`` with the records and their current class (NULL: unseen);
    returns ``[(class, number of the records in it), ...]``."""
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS incoming (record INTEGER PRIMARY KEY, class INTEGER)"
    )
    conn.execute("DELETE FROM temp.incoming")
    if keyed.size:
        conn.execute(
            "INSERT INTO temp.incoming (record, class) SELECT j.value, r.class FROM json_each(?) j "
            "LEFT JOIN main.records r ON r.record = j.value",
            (json.dumps(keyed.tolist()),),
        )
    rows = conn.execute("SELECT class, COUNT(*) FROM temp.incoming GROUP BY class").fetchall()
    return [(None if c is None else int(c), int(n)) for c, n in rows]


def _members(conn: sqlite3.Connection, cls: int) -> tuple[list[int], int]:
    row = conn.execute("SELECT members, n_records FROM classes WHERE id=?", (cls,)).fetchone()
    return [int(v) for v in str(row[0]).split(",")], int(row[1])


def _class_id(conn: sqlite3.Connection, members: Iterable[int]) -> int:
    ids = sorted(set(members))
    text = ",".join(str(v) for v in ids)
    row = conn.execute("SELECT id FROM classes WHERE members=?", (text,)).fetchone()
    if row is not None:
        return int(row[0])
    cid = int(
        conn.execute(
            "INSERT INTO classes (members, n_records) VALUES (?, 0)", (text,)
        ).lastrowid
        or 0
    )
    conn.executemany(
        "INSERT INTO class_versions (version, class) VALUES (?, ?)", [(v, cid) for v in ids]
    )
    return cid


def _add_records(
    conn: sqlite3.Connection, targets: set[int], groups: Sequence[tuple[int | None, int]]
) -> None:
    """Adds the records in ``temp.incoming`` to every version in ``targets``.

    Unseen records go to the class of exactly ``targets``; a class whose records all come
    in is relabelled (its members gain ``targets``); a class only partly in moves its
    incoming records to the class of its members plus ``targets``.
    """
    moves: dict[int, int] = {}
    counts: dict[int, int] = {}
    for cls, n in groups:
        if cls is None:
            new = _class_id(conn, targets)
            conn.execute(
                "INSERT INTO main.records (record, class) SELECT record, ? FROM temp.incoming "
                "WHERE class IS NULL",
                (new,),
            )
            counts[new] = counts.get(new, 0) + n
            continue
        members, total = _members(conn, cls)
        if targets <= set(members):
            continue
        wanted = sorted(set(members) | targets)
        text = ",".join(str(v) for v in wanted)
        exists = conn.execute("SELECT id FROM classes WHERE members=?", (text,)).fetchone()
        if n == total and exists is None:  # every record of the class comes in: relabel
            conn.execute("UPDATE classes SET members=? WHERE id=?", (text, cls))
            conn.executemany(
                "INSERT INTO class_versions (version, class) VALUES (?, ?)",
                [(v, cls) for v in sorted(targets - set(members))],
            )
            continue
        new = _class_id(conn, wanted)
        moves[cls] = new
        counts[new] = counts.get(new, 0) + n
        counts[cls] = counts.get(cls, 0) - n
    if moves:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS moves (old INTEGER PRIMARY KEY, new INTEGER)")
        conn.execute("DELETE FROM temp.moves")
        conn.executemany("INSERT INTO temp.moves (old, new) VALUES (?, ?)", moves.items())
        conn.execute(
            "UPDATE main.records SET class = (SELECT m.new FROM temp.moves m WHERE m.old = "
            "records.class) WHERE record IN (SELECT i.record FROM temp.incoming i JOIN "
            "temp.moves m ON m.old = i.class)"
        )
    conn.executemany(
        "UPDATE classes SET n_records = n_records + ? WHERE id=?",
        [(n, c) for c, n in counts.items()],
    )
    empty = [int(r[0]) for r in conn.execute("SELECT id FROM classes WHERE n_records <= 0")]
    if empty:
        conn.executemany("DELETE FROM class_versions WHERE class=?", [(c,) for c in empty])
        conn.executemany("DELETE FROM classes WHERE id=?", [(c,) for c in empty])


def _class_spends(
    conn: sqlite3.Connection, classes: Sequence[int]
) -> dict[int, tuple[float, float]]:
    """Each class's spend: the sum of the charges of every version it belongs to.

    SQL finds the classes' versions and their charges; the sums are exact (``math.fsum``),
    so 15 charges of 1/15 add up to 1.
    """
    if not classes:
        return {}
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (id INTEGER PRIMARY KEY)")
    conn.execute("DELETE FROM temp.wanted")
    conn.executemany("INSERT OR IGNORE INTO temp.wanted (id) VALUES (?)", [(c,) for c in classes])
    members: dict[int, list[int]] = {}
    for c, v in conn.execute(
        "SELECT cv.class, cv.version FROM temp.wanted w JOIN class_versions cv ON cv.class = w.id"
    ):
        members.setdefault(int(c), []).append(int(v))
    amounts: dict[int, tuple[list[float], list[float]]] = {}
    for v, e, d in conn.execute(
        "SELECT c.version, c.epsilon, c.delta FROM charges c WHERE c.version IN "
        "(SELECT DISTINCT cv.version FROM temp.wanted w JOIN class_versions cv ON cv.class = w.id)"
    ):
        got = amounts.setdefault(int(v), ([], []))
        got[0].append(float(e))
        got[1].append(float(d))
    out = {}
    for c, vs in members.items():
        out[c] = (
            math.fsum(x for v in vs for x in amounts.get(v, ((), ()))[0]),
            math.fsum(x for v in vs for x in amounts.get(v, ((), ()))[1]),
        )
    return out


def _version_spend(conn: sqlite3.Connection, version: int) -> tuple[float, float]:
    rows = conn.execute("SELECT epsilon, delta FROM charges WHERE version=?", (version,))
    eps, delta = [], []
    for e, d in rows:
        eps.append(float(e))
        delta.append(float(d))
    return math.fsum(eps), math.fsum(delta)


def _class_members(conn: sqlite3.Connection, classes: Sequence[int]) -> list[int]:
    if not classes:
        return []
    marks = ", ".join("?" * len(classes))
    rows = conn.execute(
        f"SELECT DISTINCT version FROM class_versions WHERE class IN ({marks})", list(classes)
    ).fetchall()
    return sorted(int(r[0]) for r in rows)


# ----------------------------------------------------------------------------- migrations


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Schema 1 (charges keyed by dataset name and site) to 2 (fingerprints and lineages)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(charges)")}
    if "fingerprint" not in cols:
        conn.execute("ALTER TABLE charges ADD COLUMN fingerprint TEXT")
    conn.execute(
        "UPDATE charges SET fingerprint = 'name:' || dataset || '/' || site "
        "WHERE fingerprint IS NULL"
    )
    conn.execute(_LINEAGE_V2)
    conn.execute(
        "INSERT OR IGNORE INTO lineage (fingerprint, lineage, site, dataset, created_at) "
        "SELECT fingerprint, fingerprint, MIN(site), MIN(dataset), MIN(created_at) FROM charges "
        "GROUP BY fingerprint"
    )
    conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")


def _migrate_v2(conn: sqlite3.Connection, key: bytes) -> None:
    """Schema 2 (budgets per fingerprint lineage, mixed relations) to 3 (per record).

    * A name-keyed lineage (``name:<dataset>/<site>``) becomes a name version.
    * Any other lineage becomes a *legacy* version holding its charges, whose records are not
      known yet. The first record set privml sees with one of the lineage's fingerprints or,
      failing that, under its dataset label and site name, joins it: those records carry the
      legacy spend from then on.
    * The plain fingerprints (hashes of the records) are replaced by keyed digests and the
      lineage table is dropped (with ``secure_delete`` on, their bytes are overwritten).
    * Charges not booked under replace-one (queries, before) are converted to their
      replace-one bound by group privacy, the original kept in the metadata.
    * The budget in force at the last charge becomes the ledger's budget.
    """
    cols = {r[1] for r in conn.execute("PRAGMA table_info(charges)")}
    if "version" not in cols:
        conn.execute("ALTER TABLE charges ADD COLUMN version INTEGER")
    if "relation" not in cols:
        conn.execute(
            "ALTER TABLE charges ADD COLUMN relation TEXT NOT NULL DEFAULT 'replace_one'"
        )
    for statement in _TABLES:
        conn.execute(statement)
    conn.execute(_LINEAGE_V2)
    fp_key = _subkey(key, "fingerprints")
    lineages: dict[str, list[tuple[str, str, str]]] = {}
    for fp, lin, site, dataset in conn.execute(
        "SELECT fingerprint, lineage, site, dataset FROM lineage ORDER BY created_at"
    ).fetchall():
        lineages.setdefault(str(lin), []).append((str(fp), str(site), str(dataset)))
    for fp, site, dataset in conn.execute(
        "SELECT fingerprint, MIN(site), MIN(dataset) FROM charges WHERE fingerprint IS NOT NULL "
        "AND fingerprint NOT IN (SELECT fingerprint FROM lineage) GROUP BY fingerprint"
    ).fetchall():
        lineages.setdefault(str(fp), []).append((str(fp), str(site), str(dataset)))
    now = _now()
    for n, (lin, members) in enumerate(sorted(lineages.items())):
        _, site, dataset = members[0]
        if lin.startswith("name:"):
            vkey, kind = lin, "name"
        else:
            vkey, kind = f"legacy:{n + 1}", "legacy"
        vid = int(
            conn.execute(
                "INSERT INTO versions (key, kind, dataset, site, n_records, created_at) "
                "VALUES (?, ?, ?, ?, 0, ?)",
                (vkey, kind, dataset, site, now),
            ).lastrowid
            or 0
        )
        fps = [fp for fp, _, _ in members]
        if kind == "legacy":
            pend = {
                "fp:" + hmac.new(fp_key, fp.encode(), hashlib.sha256).hexdigest()[:40]
                for fp in fps
                if not fp.startswith("name:")
            }
            pend |= {f"label:{d}/{s}" for _, s, d in members}
            conn.executemany(
                "INSERT OR IGNORE INTO pending (key, version) VALUES (?, ?)",
                [(k, vid) for k in sorted(pend)],
            )
        conn.executemany(
            "UPDATE charges SET version=?, fingerprint=? WHERE fingerprint=?",
            [(vid, vkey, fp) for fp in fps],
        )
    for cid, eps, delta, meta_text in conn.execute(
        "SELECT id, epsilon, delta, metadata FROM charges ORDER BY id"
    ).fetchall():
        try:
            meta = json.loads(meta_text)
        except ValueError:
            meta = {"unreadable_metadata": str(meta_text)}
        stated = meta.get("neighboring_relation") if isinstance(meta, dict) else None
        if _RELATIONS.get(str(stated)) == RELATION:
            conn.execute("UPDATE charges SET relation=? WHERE id=?", (RELATION, cid))
            continue
        cost = replace_one_cost(float(eps), float(delta))
        if not isinstance(meta, dict):
            meta = {"metadata": meta}
        meta["converted_from"] = {
            "relation": "add_or_remove",
            "epsilon": float(eps),
            "delta": float(delta),
            "rule": "group privacy: replace one = remove one + add one (schema 3 migration)",
        }
        conn.execute(
            "UPDATE charges SET epsilon=?, delta=?, relation=?, metadata=? WHERE id=?",
            (cost.epsilon, cost.delta, RELATION, json.dumps(meta, sort_keys=True), cid),
        )
    conn.execute("DROP TABLE lineage")
    conn.execute("DROP INDEX IF EXISTS charges_by_fingerprint")
    for statement in _INDEXES:
        conn.execute(statement)
    last = conn.execute(
        "SELECT budget_epsilon, budget_delta FROM charges ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if last is not None and conn.execute("SELECT COUNT(*) FROM budget_history").fetchone()[0] == 0:
        _insert_budget(
            conn,
            Spend(float(last[0]), float(last[1])),
            None,
            "schema 3 migration: the budget in force at the ledger's last charge",
        )
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(_SCHEMA_VERSION),))
