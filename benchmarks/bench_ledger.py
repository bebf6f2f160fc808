"""Admitting a charge on a 1,000,000-record site, per record: privml's ledger against the
straightforward per-version design, in one process.

Run:  .venv/bin/python benchmarks/bench_ledger.py [--records 1000000] [--reps 3] [--quick]

Both ledgers keep a budget per record and admit a charge on a record set R only if every
record r of R has spent(r) + cost <= budget, where spent(r) sums the charges of every dataset
version holding r; both are SQLite files in WAL mode with ``synchronous=FULL`` and do the
check and the insert in one ``BEGIN IMMEDIATE`` transaction, on the same keyed 8-byte record
hashes (privml's AES keying, timed on both sides).

* privml: :class:`privml.dp.ledger.PrivacyLedger` -- each record stored once with its class
  (the set of versions holding it); a known version is admitted from its classes alone, a new
  version registers its records once.
* anchor, "per-version record sets": the design as usually first written -- a table
  ``version_records(record, version)`` (primary key on both, and an index by version) holding
  every version's records, and at every charge the SQL join that sums, for each record of R,
  the charges of the versions holding it, then takes the maximum.

Work per repetition, on a fresh ledger for each variant: (1) the first charge on a file of N
records (registration), (2) ten more charges on the same file (a training run's rounds),
(3) one charge after one record is appended to the file (a new version sharing N records).
Reported: medians with min-max over the repetitions, the ratio anchor / privml per
repetition, and the ledger file's bytes per record. Tables go to docs/benchmarks_dp.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios, summarize  # noqa: E402

from privml.dp import ledger as L  # noqa: E402

ROUNDS = 10
BUDGET = 1e9  # the benchmark measures admission, never a refusal


class PerVersionLedger:
    """The anchor: every version's records in ``version_records``, a join per charge."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self.key = key
        conn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS versions (id INTEGER PRIMARY KEY, key TEXT UNIQUE);
            CREATE TABLE IF NOT EXISTS version_records (
                record INTEGER NOT NULL, version INTEGER NOT NULL,
                PRIMARY KEY (record, version)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS by_version ON version_records (version, record);
            CREATE TABLE IF NOT EXISTS charges (
                id INTEGER PRIMARY KEY, version INTEGER NOT NULL, epsilon REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS charges_by_version ON charges (version);
            """
        )
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def charge(self, raw: np.ndarray, epsilon: float) -> None:
        keyed = L._keyed_records(raw, L._subkey(self.key, "records"))
        vkey = str(hash(keyed.tobytes()))
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT id FROM versions WHERE key=?", (vkey,)).fetchone()
            if row is None:
                vid = int(conn.execute("INSERT INTO versions (key) VALUES (?)", (vkey,)).lastrowid)
                conn.execute(
                    "INSERT INTO version_records (record, version) "
                    "SELECT value, ? FROM json_each(?)",
                    (vid, json.dumps(keyed.tolist())),
                )
            else:
                vid = int(row[0])
            spent = conn.execute(
                "SELECT MAX(s) FROM (SELECT SUM(t.eps) AS s FROM version_records mine "
                "JOIN version_records vr ON vr.record = mine.record "
                "JOIN (SELECT version, SUM(epsilon) AS eps FROM charges GROUP BY version) t "
                "ON t.version = vr.version WHERE mine.version = ? GROUP BY mine.record)",
                (vid,),
            ).fetchone()[0]
            if (spent or 0.0) + epsilon > BUDGET:
                raise RuntimeError("refused")
            conn.execute("INSERT INTO charges (version, epsilon) VALUES (?, ?)", (vid, epsilon))
            conn.execute("COMMIT")
        finally:
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--records", type=int, default=None, help="default 1,000,000 (quick 2,000)")
    parser.add_argument("--reps", type=int, default=None, help="default 3 (quick 1)")
    args = parser.parse_args()
    n = args.records or (2_000 if args.quick else 1_000_000)
    reps = args.reps or (1 if args.quick else 3)
    bench = Bench("ledger", quick=args.quick, out=args.out,
                  params={"records": n, "reps": reps, "rounds": ROUNDS})  # fmt: skip
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, n, dtype=np.uint64)
    grown = np.concatenate([base, np.array([12345], dtype=np.uint64)])
    phases: dict[str, dict[str, list[float]]] = {}
    sizes: dict[str, list[float]] = {}

    def note(variant: str, phase: str, seconds: float) -> None:
        phases.setdefault(phase, {}).setdefault(variant, []).append(seconds)

    def run_privml() -> float:
        with tempfile.TemporaryDirectory(prefix="privml-bench-ledger-") as tmp:
            path = Path(tmp) / "ledger.sqlite"
            led = L.PrivacyLedger(path, dataset="bench", budget_epsilon=BUDGET, budget_delta=0.5,
                                  records={"site": base, "grown": grown})  # fmt: skip
            t0 = time.perf_counter()
            led.charge(site="site", epsilon=1.0, label="first")
            t1 = time.perf_counter()
            for i in range(ROUNDS):
                led.charge(site="site", epsilon=1.0, label=f"round {i}")
            t2 = time.perf_counter()
            led.charge(site="grown", epsilon=1.0, label="appended")
            t3 = time.perf_counter()
            sizes.setdefault("privml", []).append(_bytes(path) / n)
        note("privml", "first", t1 - t0)
        note("privml", "known", (t2 - t1) / ROUNDS)
        note("privml", "append", t3 - t2)
        return t3 - t0

    def run_anchor() -> float:
        with tempfile.TemporaryDirectory(prefix="privml-bench-ledger-") as tmp:
            path = Path(tmp) / "ledger.sqlite"
            led = PerVersionLedger(path, os.urandom(32))
            t0 = time.perf_counter()
            led.charge(base, 1.0)
            t1 = time.perf_counter()
            for _ in range(ROUNDS):
                led.charge(base, 1.0)
            t2 = time.perf_counter()
            led.charge(grown, 1.0)
            t3 = time.perf_counter()
            sizes.setdefault("anchor", []).append(_bytes(path) / n)
        note("anchor", "first", t1 - t0)
        note("anchor", "known", (t2 - t1) / ROUNDS)
        note("anchor", "append", t3 - t2)
        return t3 - t0

    variants: dict[str, Callable[[], float | None]] = {"privml": run_privml, "anchor": run_anchor}
    bench.interleave(variants, reps=reps, warmup=0, key="total_seconds")
    labels = {
        "first": "first charge on a new file (registers its records)",
        "known": "a charge on a file already seen (per charge, mean of 10)",
        "append": "a charge after one record is appended (new version)",
    }
    rows: list[list[Any]] = []
    results: dict[str, Any] = {}
    for phase, label in labels.items():
        ours, theirs = summarize(phases[phase]["privml"]), summarize(phases[phase]["anchor"])
        ratio = ratios(theirs, ours)
        results[phase] = {"privml": ours.to_dict(), "anchor": theirs.to_dict(),
                          "ratio_anchor_over_privml": ratio.to_dict()}  # fmt: skip
        rows.append([label, fmt_spread(ours, 1000, 1, "ms"), fmt_spread(theirs, 1000, 1, "ms"),
                     fmt_ratio(ratio)])  # fmt: skip
    bytes_row = [
        "ledger file, bytes per record (after the 12 charges)",
        f"{np.median(sizes['privml']):.1f}",
        f"{np.median(sizes['anchor']):.1f}",
        "--",
    ]
    rows.append(bytes_row)
    results["bytes_per_record"] = {k: list(v) for k, v in sizes.items()}
    bench.record("phases", results)
    bench.table(
        "admission",
        ["operation", "privml (record classes)", "per-version record sets (anchor)",
         "ratio anchor / privml"],
        rows,
        caption=f"Admission of a charge per record, {n:,} records, SQLite WAL with "
        "synchronous=FULL, keyed hashing included; medians (min-max) of "
        f"{reps} repetitions, variants interleaved.",
    )  # fmt: skip
    bench.write()


def _bytes(path: Path) -> float:
    total = 0
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            total += p.stat().st_size
    return float(total)


if __name__ == "__main__":
    main()
