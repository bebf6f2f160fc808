"""State shared by all worker processes: registered public contexts and per-token rate limits.

Layout of the state folder (mode 0700)::

    tokens.json              hashed bearer tokens (privml.serve.tokens)
    state.db                 SQLite (WAL): who registered which context, when it was last used,
                             and each token's rate-limit buckets
    contexts/<key_id>.ctx    the public contexts themselves, named by their SHA-256 key id

Every change happens inside one SQLite write transaction (``BEGIN IMMEDIATE``): registering
writes the context file (temporary file, fsync, rename) and inserts its row while holding the
lock, and expiry deletes rows and the files no row refers to any more under the same lock, so
two workers can never lose a context between them. A crash leaves at worst an unreferenced
file, which the next expiry sweep deletes. Contexts are public material (the client keeps the
secret key), so nothing here is secret except the token digests; the files are still private
to the server's user.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from privml.errors import UsageError
from privml.serve.tokens import write_private_atomic

KEY_ID = re.compile(r"^[0-9a-f]{64}$")
#: A context's last use is written at most this often (seconds), to keep predictions read-only.
TOUCH_EVERY_S = 60.0
#: Expired contexts are swept at most this often by a running server (seconds).
SWEEP_EVERY_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    owner TEXT NOT NULL,
    key_id TEXT NOT NULL,
    scheme TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    PRIMARY KEY (owner, key_id)
);
CREATE INDEX IF NOT EXISTS contexts_last_used ON contexts (last_used);
CREATE TABLE IF NOT EXISTS buckets (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    level REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (owner, kind)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT PRIMARY KEY,
    patients INTEGER NOT NULL,
    requests INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""


class BudgetExhaustedError(UsageError):
    """A token's lifetime budget in patients does not cover the request."""


class ContextQuotaError(UsageError):
    """A token already holds as many registered contexts as the server allows."""


@dataclass(frozen=True)
class ContextRecord:
    owner: str
    key_id: str
    scheme: str
    size_bytes: int
    created: float
    last_used: float

    def expires_at(self, ttl_s: float) -> float:
        return self.last_used + ttl_s


class StateStore:
    """Registered contexts and rate-limit buckets of one state folder (process- and thread-safe).

    Each process opens its own SQLite connection on first use (forked or spawned workers never
    share one).
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.blobs = self.dir / "contexts"
        self.db_path = self.dir / "state.db"
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs.mkdir(exist_ok=True, mode=0o700)
        conn = sqlite3.connect(
            self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(_SCHEMA)
        with contextlib.suppress(OSError):  # e.g. a read-only mount, where nothing is written
            os.chmod(self.db_path, 0o600)
        self._conn, self._pid = conn, os.getpid()
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connect()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def check(self) -> None:
        """Raise if the state folder cannot be read and written (the readiness probe)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('ready_check', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (time.time(),),
            )

    def _blob_path(self, key_id: str) -> Path:
        if not KEY_ID.match(key_id):  # the key id becomes a file name: never a path
            raise UsageError(f"The 'key_id' must be 64 hex digits. Got {key_id[:80]!r} instead.")
        return self.blobs / f"{key_id}.ctx"

    # -- contexts ---------------------------------------------------------------------------

    def register(
        self, owner: str, key_id: str, scheme: str, blob: bytes, *, max_per_owner: int,
        ttl_s: float,
    ) -> tuple[ContextRecord, bool]:
        """Store ``blob`` for ``owner``; returns ``(record, created)``.

        Registering the same context again refreshes its last use and returns ``created=False``.
        Raises :class:`ContextQuotaError` when ``owner`` already holds ``max_per_owner`` live
        contexts.
        """
        path = self._blob_path(key_id)
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT scheme, size_bytes, created FROM contexts WHERE owner=? AND key_id=?",
                (owner, key_id),
            ).fetchone()
            if row is not None and path.is_file():
                conn.execute(
                    "UPDATE contexts SET last_used=? WHERE owner=? AND key_id=?",
                    (now, owner, key_id),
                )
                return ContextRecord(owner, key_id, row[0], row[1], row[2], now), False
            (live,) = conn.execute(
                "SELECT COUNT(*) FROM contexts WHERE owner=? AND last_used>=? AND key_id!=?",
                (owner, now - ttl_s, key_id),
            ).fetchone()
            if live >= max_per_owner:
                raise ContextQuotaError(
                    f"token {owner!r} already holds {live} registered contexts, the limit of "
                    "this server; delete one (DELETE /v1/contexts/{key_id}) or reuse a key"
                )
            if not path.is_file():
                write_private_atomic(path, blob)
            conn.execute(
                "INSERT INTO contexts (owner, key_id, scheme, size_bytes, created, last_used) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(owner, key_id) DO UPDATE SET "
                "last_used=excluded.last_used",
                (owner, key_id, scheme, len(blob), now, now),
            )
            return ContextRecord(owner, key_id, scheme, len(blob), now, now), True

    def lookup(self, owner: str, key_id: str, *, ttl_s: float) -> ContextRecord | None:
        """The live record of ``key_id`` for ``owner`` (None if unknown, expired or another
        token's); refreshes its last use at most every :data:`TOUCH_EVERY_S` seconds."""
        if not KEY_ID.match(key_id):
            return None
        now = time.time()
        with self._lock:
            row = self._connect().execute(
                "SELECT scheme, size_bytes, created, last_used FROM contexts "
                "WHERE owner=? AND key_id=?",
                (owner, key_id),
            ).fetchone()
        if row is None or row[3] < now - ttl_s:
            return None
        rec = ContextRecord(owner, key_id, row[0], row[1], row[2], row[3])
        if now - rec.last_used > TOUCH_EVERY_S:
            with self._write() as conn:
                conn.execute(
                    "UPDATE contexts SET last_used=? WHERE owner=? AND key_id=?",
                    (now, owner, key_id),
                )
            rec = ContextRecord(owner, key_id, rec.scheme, rec.size_bytes, rec.created, now)
        return rec

    def read_blob(self, key_id: str) -> bytes | None:
        try:
            return self._blob_path(key_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, owner: str, key_id: str) -> bool:
        """Forget ``owner``'s registration of ``key_id``; True if there was one."""
        if not KEY_ID.match(key_id):
            return False
        with self._write() as conn:
            cur = conn.execute(
                "DELETE FROM contexts WHERE owner=? AND key_id=?", (owner, key_id)
            )
            self._drop_orphans(conn, [key_id])
            return cur.rowcount > 0

    def delete_owner(self, owner: str) -> int:
        """Forget every context of ``owner`` (when its token is revoked)."""
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT key_id FROM contexts WHERE owner=?", (owner,)
            )]
            conn.execute("DELETE FROM contexts WHERE owner=?", (owner,))
            conn.execute("DELETE FROM buckets WHERE owner=?", (owner,))
            self._drop_orphans(conn, ids)
            return len(ids)

    def count(self, owner: str, *, ttl_s: float) -> int:
        with self._lock:
            (n,) = self._connect().execute(
                "SELECT COUNT(*) FROM contexts WHERE owner=? AND last_used>=?",
                (owner, time.time() - ttl_s),
            ).fetchone()
        return int(n)

    def records(self) -> list[ContextRecord]:
        with self._lock:
            rows = self._connect().execute(
                "SELECT owner, key_id, scheme, size_bytes, created, last_used FROM contexts "
                "ORDER BY owner, created"
            ).fetchall()
        return [ContextRecord(*r) for r in rows]

    def expire(self, *, ttl_s: float, force: bool = True) -> int:
        """Delete contexts unused for ``ttl_s`` seconds and files no row refers to.

        With ``force=False`` it runs only if no sweep happened in the last
        :data:`SWEEP_EVERY_S` seconds (any process). Returns the number of rows deleted.
        """
        now = time.time()
        if not force:
            with self._lock:
                row = self._connect().execute(
                    "SELECT value FROM meta WHERE key='last_sweep'"
                ).fetchone()
            if row is not None and now - row[0] < SWEEP_EVERY_S:
                return 0
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT key_id FROM contexts WHERE last_used<?", (now - ttl_s,)
            )]
            conn.execute("DELETE FROM contexts WHERE last_used<?", (now - ttl_s,))
            referenced = {r[0] for r in conn.execute("SELECT DISTINCT key_id FROM contexts")}
            stray = [
                p.stem for p in self.blobs.glob("*.ctx")
                if p.stem not in referenced and KEY_ID.match(p.stem)
            ]
            self._drop_orphans(conn, set(ids) | set(stray))
            for tmp in self.blobs.glob(".*.ctx.*"):  # temporary files of an interrupted write
                if now - tmp.stat().st_mtime > 3600:
                    tmp.unlink(missing_ok=True)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('last_sweep', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (now,),
            )
            return len(ids)

    def _drop_orphans(self, conn: sqlite3.Connection, key_ids: list[str] | set[str]) -> None:
        for kid in key_ids:
            (n,) = conn.execute("SELECT COUNT(*) FROM contexts WHERE key_id=?", (kid,)).fetchone()
            if n == 0:
                self._blob_path(kid).unlink(missing_ok=True)

    # -- lifetime budgets -------------------------------------------------------------------

    def spend(self, owner: str, patients: int, *, budget: int | None) -> int:
        """Count ``patients`` against ``owner``'s lifetime budget, in one write transaction
        (so concurrent workers never overspend); returns the patients used so far.

        Raises :class:`BudgetExhaustedError` (nothing counted) when ``budget`` would be
        exceeded. Counted before the answer is computed: a request that then fails still
        counts (its ciphertexts were accepted)."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT patients FROM usage WHERE owner=?", (owner,)).fetchone()
            used = int(row[0]) if row else 0
            if budget is not None and used + patients > budget:
                raise BudgetExhaustedError(
                    f"token {owner!r} has used {used} of its {budget} patients; this request "
                    f"counts {patients}. Ask the server's operator for a new budget"
                )
            conn.execute(
                "INSERT INTO usage (owner, patients, requests, updated) VALUES (?, ?, 1, ?) "
                "ON CONFLICT(owner) DO UPDATE SET patients=patients+excluded.patients, "
                "requests=requests+1, updated=excluded.updated",
                (owner, patients, now),
            )
            return used + patients

    def usage(self, owner: str) -> int:
        """Patients counted so far for ``owner``."""
        with self._lock:
            row = self._connect().execute(
                "SELECT patients FROM usage WHERE owner=?", (owner,)
            ).fetchone()
        return int(row[0]) if row else 0

    # -- rate limits ------------------------------------------------------------------------

    def take(self, owner: str, kind: str, cost: float, *, rate: float, burst: float) -> float:
        """Token-bucket rate limit shared by all processes.

        Takes ``cost`` units from ``owner``'s ``kind`` bucket (capacity ``burst``, refilled at
        ``rate`` units per second). Returns 0.0 when allowed, else the seconds to wait before
        the same request would be allowed (nothing is taken then).
        """
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                "SELECT level, updated FROM buckets WHERE owner=? AND kind=?", (owner, kind)
            ).fetchone()
            level = burst if row is None else min(burst, row[0] + (now - row[1]) * rate)
            if cost > level:
                return max((cost - level) / rate, 0.001)
            conn.execute(
                "INSERT INTO buckets (owner, kind, level, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(owner, kind) DO UPDATE SET level=excluded.level, "
                "updated=excluded.updated",
                (owner, kind, level - cost, now),
            )
            return 0.0
