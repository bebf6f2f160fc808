"""A persistent, process-safe privacy budget ledger (SQLite, WAL mode).

One ledger file can hold several datasets; each (dataset, site) pair has its own budget
``(budget_epsilon, budget_delta)``, given by the configuration (``[privacy] budget_epsilon`` /
``budget_delta``) every time the ledger is opened, so raising the budget in the config takes
effect at once while the history of charges is kept.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privml.errors import BudgetExceededError, UsageError

__all__ = ["BudgetStatus", "ChargeRecord", "PrivacyLedger", "Spend"]

_SCHEMA_VERSION = 1
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
    budget_delta REAL NOT NULL
)""",
    "CREATE INDEX IF NOT EXISTS charges_by_site ON charges (dataset, site)",
)


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
        dataset, site: whose budget was charged.
        epsilon, delta: the amount charged.
        label: what the charge paid for (e.g. the canonical query ``"mean(age)"``).
        event: the privacy event as a JSON-able dict (see :func:`privml.dp.events.event_to_dict`),
            or None.
        metadata: free JSON-able details given by the caller.
        created_at: UTC timestamp, ISO 8601.
        pid: the process that committed it.
        budget_epsilon, budget_delta: the budget in force when it was admitted.
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the record."""
        return {
            "id": self.id,
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
    """A site's budget, spend and remainder (basic composition)."""

    dataset: str
    site: str
    budget: Spend
    spent: Spend
    remaining: Spend
    charges: int = field(default=0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the status."""
        return {
            "dataset": self.dataset,
            "site": self.site,
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
    """Persistent per-(dataset, site) privacy budget ledger in a SQLite file.

    Args:
        path: the SQLite file (created with its parent folders if missing).
        dataset: identifier of the dataset whose sites' budgets this handle manages.
        budget_epsilon: total epsilon each site may spend (> 0, nats).
        budget_delta: total delta each site may spend, in [0, 1) (0 allows pure DP only).
        timeout: seconds to wait for another process's write lock (busy timeout).

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
                elif int(row[0]) != _SCHEMA_VERSION:
                    raise UsageError(
                        f"The ledger at {self.path} has schema version {row[0]}; this privml "
                        f"reads version {_SCHEMA_VERSION}."
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger({str(self.path)!r}, dataset={self.dataset!r}, "
            f"budget_epsilon={self.budget.epsilon!r}, budget_delta={self.budget.delta!r})"
        )

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

    def _spent(self, conn: sqlite3.Connection, site: str) -> tuple[Spend, int]:
        rows = conn.execute(
            "SELECT epsilon, delta FROM charges WHERE dataset=? AND site=?", (self.dataset, site)
        ).fetchall()
        eps = math.fsum(r[0] for r in rows)
        delta = math.fsum(r[1] for r in rows)
        return Spend(eps, delta), len(rows)

    def _status(self, spent: Spend, site: str, n: int) -> BudgetStatus:
        remaining = Spend(
            max(0.0, self.budget.epsilon - spent.epsilon), max(0.0, self.budget.delta - spent.delta)
        )
        return BudgetStatus(self.dataset, site, self.budget, spent, remaining, n)

    def status(self, site: str) -> BudgetStatus:
        """Budget, spend and remainder of ``site``."""
        site = _name("site", "PrivacyLedger.status", site)
        with self._connect() as conn:
            spent, n = self._spent(conn, site)
        return self._status(spent, site, n)

    def spent(self, site: str) -> Spend:
        """Total (epsilon, delta) charged to ``site`` (basic composition)."""
        return self.status(site).spent

    def remaining(self, site: str) -> Spend:
        """Budget left for ``site``: budget minus spend, floored at 0."""
        return self.status(site).remaining

    def sites(self) -> list[str]:
        """Sites of this dataset that have at least one charge, sorted."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT site FROM charges WHERE dataset=? ORDER BY site", (self.dataset,)
            ).fetchall()
        return [r[0] for r in rows]

    def history(self, site: str | None = None) -> list[ChargeRecord]:
        """All charges of this dataset (or of one ``site``), in commit order."""
        sql = "SELECT * FROM charges WHERE dataset=?"
        args: tuple[Any, ...] = (self.dataset,)
        if site is not None:
            sql += " AND site=?"
            args += (_name("site", "PrivacyLedger.history", site),)
        with self._connect() as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(sql + " ORDER BY id", args).fetchall()
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
            f"privacy budget exceeded for site {site!r} of dataset {self.dataset!r}: asked "
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
            spent, n = self._spent(conn, site)
        message = self._refusal(site, spent, eps, d)
        if message:
            raise BudgetExceededError(message)
        return self._status(spent, site, n)

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
                spent, _ = self._spent(conn, site)
                message = self._refusal(site, spent, eps, d)
                if message:
                    raise BudgetExceededError(message)
                cur = conn.execute(
                    "INSERT INTO charges (dataset, site, epsilon, delta, label, event, metadata, "
                    "created_at, pid, budget_epsilon, budget_delta) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        )
