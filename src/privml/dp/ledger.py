"""A persistent, process-safe privacy budget ledger (SQLite, WAL mode).

A budget belongs to the records it protects, not to a file name or a config. Each site's
spending is keyed by the **fingerprint** of its data (:func:`privml.data.records.fingerprint`:
SHA-256 of the site's records' content hashes, sorted), so a renamed or copied config, another
working folder, or the same file under another site name spends from the same budget. The
default ledger is one file per user (:func:`default_ledger_path`, under ``$XDG_DATA_HOME``),
not per folder.

Lineages. Spending is summed over a site's *lineage*: the set of fingerprints budgeted
together. Without an explicit dataset id a lineage is one fingerprint, so a changed file (one
record added, removed or edited) is new data with a budget of its own. With an explicit id
(``[data] name``) every fingerprint a site has had under that id joins the lineage
``id:<name>/<site>``: the spend of earlier versions of the file carries over (conservative:
a grown file keeps the old records' spend), and a fingerprint bound to one id is refused under
another. Handles opened without fingerprints (the Python API) key sites by
``name:<dataset>/<site>``.

The budget ``(budget_epsilon, budget_delta)`` per lineage is given by the configuration
(``[privacy] budget_epsilon`` / ``budget_delta``) every time the ledger is opened, so raising the
budget in the config takes effect at once while the history of charges is kept.

Composition rule: *basic (sequential) composition* -- a site's spend is the sum of the
(epsilon, delta) of its charges. A charge is admitted only if the sums after it stay within the
budget (a relative slack of 1e-9 absorbs floating-point rounding, e.g. 15 charges of 1/15
against a budget of 1).

Safety properties:

* Check-then-commit is atomic: :meth:`PrivacyLedger.charge` sums the site's spend and inserts
  the new charge inside one ``BEGIN IMMEDIATE`` transaction (SQLite's write lock), so
  concurrent processes cannot jointly overspend; others wait up to ``timeout`` seconds.
* Durable before release: ``synchronous=FULL`` means the charge is on disk when ``charge``
  returns. Callers charge first and compute the noisy value after, so a process killed at any
  moment leaves the ledger showing at least what was released (never less).
* No data-dependent state: the ledger stores only costs, labels, privacy events and metadata,
  never data or released values.

This module imports only the standard library (and privml's errors), so a query process starts
fast; privacy events are serialized through :mod:`privml.dp.events` only when given.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sqlite3
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privml.errors import BudgetExceededError, UsageError

__all__ = ["BudgetStatus", "ChargeRecord", "PrivacyLedger", "Spend", "default_ledger_path"]

_SCHEMA_VERSION = 2
_SLACK = 1e-9
_SCHEMA = (
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
    fingerprint TEXT
)""",
    "CREATE INDEX IF NOT EXISTS charges_by_site ON charges (dataset, site)",
)
_SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS lineage (
    fingerprint TEXT PRIMARY KEY,
    lineage TEXT NOT NULL,
    site TEXT NOT NULL,
    dataset TEXT NOT NULL,
    created_at TEXT NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS lineage_by_lineage ON lineage (lineage)",
    "CREATE INDEX IF NOT EXISTS charges_by_fingerprint ON charges (fingerprint)",
)
_LEDGER_FILE = "privacy-ledger.sqlite"


def default_ledger_path() -> Path:
    """The per-user ledger: ``$XDG_DATA_HOME/privml/privacy-ledger.sqlite``.

    ``XDG_DATA_HOME`` defaults to ``~/.local/share`` (the XDG base directory specification;
    a relative value is ignored). ``[privacy] ledger`` in a config overrides it, e.g. for one
    ledger shared by a deployment.
    """
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "privml" / _LEDGER_FILE


@dataclass(frozen=True)
class Spend:
    """An (epsilon, delta) amount under basic composition: epsilon in nats, delta in [0, 1]."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class ChargeRecord:
    """One committed charge.

    Attributes:
        id: increasing row id (commit order).
        dataset, site: whose budget was charged (the config's dataset label and site name).
        epsilon, delta: the amount charged.
        label: what the charge paid for (e.g. the canonical query ``"mean(age)"``).
        event: the privacy event as a JSON-able dict (see :func:`privml.dp.events.event_to_dict`),
            or None.
        metadata: free JSON-able details given by the caller.
        created_at: UTC timestamp, ISO 8601.
        pid: the process that committed it.
        budget_epsilon, budget_delta: the budget in force when it was admitted.
        fingerprint: the fingerprint of the site's records that paid (or ``name:...`` for
            handles without fingerprints).
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the record."""
        return {
            "id": self.id,
            "fingerprint": self.fingerprint,
            "dataset": self.dataset,
            "site": self.site,
            "epsilon": self.epsilon,
            "delta": self.delta,
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
    """A site's budget, spend and remainder (basic composition over its lineage)."""

    dataset: str
    site: str
    budget: Spend
    spent: Spend
    remaining: Spend
    charges: int = field(default=0)
    fingerprint: str | None = None
    lineage: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the status."""
        return {
            "dataset": self.dataset,
            "site": self.site,
            "fingerprint": self.fingerprint,
            "lineage": self.lineage,
            "budget_epsilon": self.budget.epsilon,
            "budget_delta": self.budget.delta,
            "spent_epsilon": self.spent.epsilon,
            "spent_delta": self.spent.delta,
            "remaining_epsilon": self.remaining.epsilon,
            "remaining_delta": self.remaining.delta,
            "charges": self.charges,
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


def _name(name: str, func: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(
            f"The '{name}' parameter of {func} must be a non-empty string. Got {value!r} instead."
        )
    return value


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


class PrivacyLedger:
    """Persistent privacy budget ledger in a SQLite file, keyed by the sites' data.

    Args:
        path: the SQLite file (created with its parent folders if missing).
        dataset: label of the dataset whose sites' budgets this handle manages (recorded with
            each charge; the key is the fingerprint when ``fingerprints`` are given).
        budget_epsilon: total epsilon each site may spend (> 0, nats).
        budget_delta: total delta each site may spend, in [0, 1) (0 allows pure DP only).
        timeout: seconds to wait for another process's write lock (busy timeout).
        fingerprints: site name -> fingerprint of its records
            (:func:`privml.data.records.fingerprint`); a site's budget is that of its
            records' lineage. Without them, sites are keyed by ``(dataset, site)``.
        dataset_id: an explicit dataset id (``[data] name``): each site's fingerprint is bound
            to the lineage ``id:<dataset_id>/<site>`` (see the module docstring).

    Usage::

        ledger = PrivacyLedger("runs/privml-ledger.sqlite", dataset="heart",
                               budget_epsilon=3.0, budget_delta=1e-6)
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
        budget_epsilon: float,
        budget_delta: float,
        timeout: float = 60.0,
        fingerprints: Mapping[str, str] | None = None,
        dataset_id: str | None = None,
    ) -> None:
        func = "PrivacyLedger"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"The 'path' parameter of {func} must be a path. Got {path!r}.")
        self.path = Path(path)
        self.dataset = _name("dataset", func, dataset)
        eps = _nonneg("budget_epsilon", func, budget_epsilon)
        if eps <= 0:
            raise UsageError(
                f"The 'budget_epsilon' parameter of {func} must be > 0. Got {budget_epsilon!r} "
                "instead; set [privacy] budget_epsilon in the config."
            )
        self.budget = Spend(eps, _nonneg("budget_delta", func, budget_delta, upper=1.0))
        if self.budget.delta >= 1:
            raise UsageError(
                f"The 'budget_delta' parameter of {func} must be < 1. Got {budget_delta!r}."
            )
        self.timeout = _nonneg("timeout", func, timeout)
        self.fingerprints = {
            _name("fingerprints", func, k): _name("fingerprints", func, v)
            for k, v in (fingerprints or {}).items()
        }
        self.dataset_id = None if dataset_id is None else _name("dataset_id", func, dataset_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # pragma: no cover - e.g. unsupported filesystem
                raise UsageError(f"SQLite refused WAL mode for the ledger at {self.path}.")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO meta(key, value) VALUES ('schema_version', ?)",
                        (str(_SCHEMA_VERSION),),
                    )
                elif int(row[0]) == 1:
                    _migrate_v1(conn)
                elif int(row[0]) != _SCHEMA_VERSION:
                    raise UsageError(
                        f"The ledger at {self.path} has schema version {row[0]}; this privml "
                        f"reads version {_SCHEMA_VERSION}."
                    )
                for statement in _SCHEMA_V2:
                    conn.execute(statement)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger({str(self.path)!r}, dataset={self.dataset!r}, "
            f"budget_epsilon={self.budget.epsilon!r}, budget_delta={self.budget.delta!r}, "
            f"sites keyed by {'fingerprint' if self.fingerprints else 'name'})"
        )

    # ------------------------------------------------------------------------- keys

    def key(self, site: str) -> str:
        """The key ``site``'s charges are stored under: its records' fingerprint (or name)."""
        if self.fingerprints:
            fp = self.fingerprints.get(site)
            if fp is None:
                raise UsageError(
                    f"Unknown site {site!r} for this ledger handle; its sites are "
                    f"{', '.join(sorted(self.fingerprints)) or 'none'}."
                )
            return fp
        return f"name:{self.dataset}/{site}"

    def _lineage(self, conn: sqlite3.Connection, site: str, *, bind: bool) -> str:
        """The lineage whose spend ``site`` pays from; ``bind`` records it (in a write txn)."""
        key = self.key(site)
        wanted = (
            f"id:{self.dataset_id}/{site}" if self.dataset_id and self.fingerprints else None
        )
        row = conn.execute("SELECT lineage FROM lineage WHERE fingerprint=?", (key,)).fetchone()
        if row is not None:
            lin = str(row[0])
            if wanted is None or lin == wanted:
                return lin
            if lin != key:
                raise UsageError(
                    f"site {site!r}: these records (fingerprint {key[:19]}...) are already "
                    f"budgeted under {_describe(lin)}; a budget belongs to the records, so they "
                    f"cannot start another under [data] name = {self.dataset_id!r}. Use the "
                    "same name as before, or remove [data] name."
                )
            if bind:  # first use under an explicit id: the records' spend moves with them
                conn.execute("UPDATE lineage SET lineage=? WHERE fingerprint=?", (wanted, key))
            return wanted
        lin = wanted or key
        if bind:
            if wanted is not None:
                n = conn.execute(
                    "SELECT COUNT(*) FROM lineage WHERE lineage=?", (wanted,)
                ).fetchone()[0]
                if n:
                    warnings.warn(
                        f"site {site!r}: its data changed since {_describe(wanted)} was last "
                        f"charged (new fingerprint {key[:19]}...); the spend of the earlier "
                        "version(s) carries over to this one.",
                        UserWarning,
                        stacklevel=4,
                    )
            conn.execute(
                "INSERT INTO lineage (fingerprint, lineage, site, dataset, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (key, lin, site, self.dataset, _now()),
            )
        return lin

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    # ------------------------------------------------------------------------- reading

    def _spent(self, conn: sqlite3.Connection, lineage: str) -> tuple[Spend, int]:
        rows = conn.execute(
            "SELECT epsilon, delta FROM charges WHERE fingerprint IN "
            "(SELECT fingerprint FROM lineage WHERE lineage=?)",
            (lineage,),
        ).fetchall()
        eps = math.fsum(r[0] for r in rows)
        delta = math.fsum(r[1] for r in rows)
        return Spend(eps, delta), len(rows)

    def _status(self, spent: Spend, site: str, n: int, lineage: str | None = None) -> BudgetStatus:
        remaining = Spend(
            max(0.0, self.budget.epsilon - spent.epsilon), max(0.0, self.budget.delta - spent.delta)
        )
        return BudgetStatus(
            self.dataset, site, self.budget, spent, remaining, n, self.key(site), lineage
        )

    def status(self, site: str) -> BudgetStatus:
        """Budget, spend and remainder of ``site`` (over its records' lineage)."""
        site = _name("site", "PrivacyLedger.status", site)
        with self._connect() as conn:
            lin = self._lineage(conn, site, bind=False)
            spent, n = self._spent(conn, lin)
        return self._status(spent, site, n, lin)

    def spent(self, site: str) -> Spend:
        """Total (epsilon, delta) charged to ``site`` (basic composition)."""
        return self.status(site).spent

    def remaining(self, site: str) -> Spend:
        """Budget left for ``site``: budget minus spend, floored at 0."""
        return self.status(site).remaining

    def sites(self) -> list[str]:
        """Sites of this handle that have at least one charge, sorted.

        With fingerprints: the handle's sites whose lineage has charges; without: the sites
        charged under this dataset name.
        """
        if self.fingerprints:
            return [s for s in sorted(self.fingerprints) if self.status(s).charges]
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT site FROM charges WHERE dataset=? AND "
                "fingerprint = 'name:' || dataset || '/' || site ORDER BY site",
                (self.dataset,),
            ).fetchall()
        return [r[0] for r in rows]

    def history(self, site: str | None = None) -> list[ChargeRecord]:
        """Charges of this handle's sites' lineages (or of one ``site``), in commit order."""
        if site is not None:
            sites = [_name("site", "PrivacyLedger.history", site)]
        elif self.fingerprints:
            sites = sorted(self.fingerprints)
        else:
            sites = self.sites()
        with self._connect() as conn:
            lineages = sorted({self._lineage(conn, s, bind=False) for s in sites})
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT * FROM charges WHERE fingerprint IN (SELECT fingerprint FROM lineage "
                f"WHERE lineage IN ({', '.join('?' * len(lineages))})) ORDER BY id",
                lineages,
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
        )

    # ------------------------------------------------------------------------- admitting

    def _refusal(self, site: str, spent: Spend, epsilon: float, delta: float) -> str | None:
        b = self.budget
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
        return (
            f"privacy budget exceeded for site {site!r} of dataset {self.dataset!r} (its records'"
            f" budget, whatever config or folder spends it): asked "
            f"{' and '.join(asked)} (spent epsilon={spent.epsilon:g}, delta={spent.delta:g}). "
            "Nothing was spent. Ask for less, or raise [privacy] budget_epsilon / budget_delta "
            "in the config (the new budget applies to the whole history)."
        )

    def check(self, *, site: str, epsilon: float, delta: float = 0.0) -> BudgetStatus:
        """Raises :class:`~privml.errors.BudgetExceededError` if the spend would not fit.

        Spends nothing. Use it to stop a training run before it starts; the authoritative
        check is the one inside :meth:`charge`.
        """
        func = "PrivacyLedger.check"
        site = _name("site", func, site)
        eps = _nonneg("epsilon", func, epsilon)
        d = _nonneg("delta", func, delta, upper=1.0)
        with self._connect() as conn:
            lin = self._lineage(conn, site, bind=False)
            spent, n = self._spent(conn, lin)
        message = self._refusal(site, spent, eps, d)
        if message:
            raise BudgetExceededError(message)
        return self._status(spent, site, n, lin)

    def charge(
        self,
        *,
        site: str,
        epsilon: float,
        delta: float = 0.0,
        label: str,
        event: object = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> ChargeRecord:
        """Books a spend of (``epsilon``, ``delta``) for ``site`` or refuses it.

        Inside one ``BEGIN IMMEDIATE`` transaction: sums the site's charges, raises
        :class:`~privml.errors.BudgetExceededError` (spending nothing) if the new charge does
        not fit, else inserts it and commits with ``synchronous=FULL`` before returning.
        Release the noisy result only after this returns.

        Args:
            site: the site whose budget pays.
            epsilon: epsilon >= 0 to book (nats).
            delta: delta in [0, 1] to book.
            label: what it pays for (e.g. ``"mean(age)"`` or ``"round 3"``).
            event: the DpEvent behind the spend (a dp_accounting DpEvent, or a dict from
                :func:`privml.dp.events.event_to_dict`), stored as JSON.
            metadata: JSON-able details (e.g. accountant, round number).

        Returns:
            The committed :class:`ChargeRecord`.
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
        try:
            metadata_json = json.dumps(dict(metadata or {}), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise UsageError(
                f"The 'metadata' parameter of {func} must be JSON-able: {exc}"
            ) from exc
        created = datetime.now(UTC).isoformat(timespec="microseconds")
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                lin = self._lineage(conn, site, bind=True)
                spent, _ = self._spent(conn, lin)
                message = self._refusal(site, spent, eps, d)
                if message:
                    raise BudgetExceededError(message)
                cur = conn.execute(
                    "INSERT INTO charges (dataset, site, epsilon, delta, label, event, metadata, "
                    "created_at, pid, budget_epsilon, budget_delta, fingerprint) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.dataset,
                        site,
                        eps,
                        d,
                        label,
                        event_json,
                        metadata_json,
                        created,
                        os.getpid(),
                        self.budget.epsilon,
                        self.budget.delta,
                        self.key(site),
                    ),
                )
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
            budget_epsilon=self.budget.epsilon,
            budget_delta=self.budget.delta,
            fingerprint=self.key(site),
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _describe(lineage: str) -> str:
    if lineage.startswith("id:"):
        name, _, site = lineage[3:].rpartition("/")
        return f"dataset id {name!r} (site {site!r})"
    return f"the fingerprint {lineage[:19]}..."


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Schema 1 (charges keyed by dataset name and site) to 2 (fingerprints and lineages)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(charges)")}
    if "fingerprint" not in cols:
        conn.execute("ALTER TABLE charges ADD COLUMN fingerprint TEXT")
    conn.execute(
        "UPDATE charges SET fingerprint = 'name:' || dataset || '/' || site "
        "WHERE fingerprint IS NULL"
    )
    for statement in _SCHEMA_V2:
        conn.execute(statement)
    conn.execute(
        "INSERT OR IGNORE INTO lineage (fingerprint, lineage, site, dataset, created_at) "
        "SELECT fingerprint, fingerprint, MIN(site), MIN(dataset), MIN(created_at) FROM charges "
        "GROUP BY fingerprint"
    )
    conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(_SCHEMA_VERSION),))
