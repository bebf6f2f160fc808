"""Ledgers written by earlier privml versions open, migrated in place, with every charge kept.

The old files are built here with the old schemas' own SQL (schema 1: charges by dataset and
site name; schema 2: charges by plain fingerprints, with lineages).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from privml.data.records import fingerprint, record_hashes
from privml.dp.ledger import PrivacyLedger, key_path
from privml.errors import BudgetExceededError
from tests.data.sites import patient_frame

V1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE charges (
    id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, site TEXT NOT NULL,
    epsilon REAL NOT NULL CHECK (epsilon >= 0),
    delta REAL NOT NULL CHECK (delta >= 0 AND delta <= 1), label TEXT NOT NULL, event TEXT,
    metadata TEXT NOT NULL, created_at TEXT NOT NULL, pid INTEGER NOT NULL,
    budget_epsilon REAL NOT NULL, budget_delta REAL NOT NULL)""",
    "CREATE INDEX charges_by_site ON charges (dataset, site)",
)
V2_EXTRA = (
    "ALTER TABLE charges ADD COLUMN fingerprint TEXT",
    """CREATE TABLE lineage (fingerprint TEXT PRIMARY KEY, lineage TEXT NOT NULL,
    site TEXT NOT NULL, dataset TEXT NOT NULL, created_at TEXT NOT NULL)""",
    "CREATE INDEX lineage_by_lineage ON lineage (lineage)",
    "CREATE INDEX charges_by_fingerprint ON charges (fingerprint)",
)


def _old_ledger(path: Path, version: int, charges: list[tuple], lineage: list[tuple]) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in V1 + (V2_EXTRA if version == 2 else ()):
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    cols = "dataset, site, epsilon, delta, label, event, metadata, created_at, pid, "
    cols += "budget_epsilon, budget_delta" + (", fingerprint" if version == 2 else "")
    for row in charges:
        marks = ", ".join("?" * len(row))
        conn.execute(f"INSERT INTO charges ({cols}) VALUES ({marks})", row)
    for row in lineage:
        conn.execute("INSERT INTO lineage VALUES (?, ?, ?, ?, '2024-01-01')", row)
    conn.commit()
    conn.close()


def _bytes(path: Path) -> bytes:
    wal = Path(f"{path}-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def _charge(site: str, eps: float, delta: float, meta: dict, fp: str | None) -> tuple:
    row = ("heart", site, eps, delta, "q", None, json.dumps(meta), "2024-01-01", 1, 3.0, 1e-4)
    return row + ((fp,) if fp is not None else ())


def test_a_schema_2_ledger_is_migrated_with_its_spend_per_record(tmp_path: Path) -> None:
    h, g_old, g_new = patient_frame(100, seed=1), patient_frame(60, seed=2), patient_frame(9, 3)
    hh = record_hashes(h)
    fp_h = fingerprint(hh, h.columns)
    fp_g = fingerprint(record_hashes(g_old), g_old.columns)
    query = {"kind": "query", "query": "mean(age)"}  # booked add/remove, before
    training = {"neighboring_relation": "replace_one", "mode": "sample"}
    path = tmp_path / "ledger.sqlite"
    _old_ledger(
        path,
        2,
        [
            _charge("h", 0.3, 0.0, query, fp_h),
            _charge("h", 0.5, 1e-5, training, fp_h),
            _charge("g", 0.4, 0.0, query, fp_g),
            _charge("z", 0.2, 0.0, query, "name:heart/z"),
        ],
        [
            (fp_h, fp_h, "h", "heart"),
            (fp_g, "id:heart/g", "g", "heart"),
            ("name:heart/z", "name:heart/z", "z", "heart"),
        ],
    )
    assert fp_h[7:].encode() in _bytes(path)
    ledger = PrivacyLedger(
        path,
        dataset="heart",
        records={"h": hh, "g": record_hashes(g_new)},
        fingerprints={"h": fp_h, "g": fingerprint(record_hashes(g_new), g_new.columns)},
    )
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    # the plain fingerprints (hashes of the records) are gone from the files
    blob = _bytes(path)
    assert fp_h[7:].encode() not in blob and fp_g[7:].encode() not in blob
    assert key_path(path).exists()
    # the budget in force at the last charge is the ledger's
    assert ledger.budget.epsilon == 3.0 and ledger.budget.delta == 1e-4
    assert "migration" in ledger.budget_history()[0].reason
    # one relation: the query's add/remove 0.3 is booked as its replace-one bound 0.6
    st = ledger.status("h")
    assert st.spent.epsilon == pytest.approx(0.6 + 0.5) and st.spent.delta == pytest.approx(1e-5)
    hist = ledger.history("h")
    assert {r.relation for r in hist} == {"replace_one"}
    assert hist[0].metadata["converted_from"]["epsilon"] == 0.3 and hist[0].epsilon == 0.6
    assert "converted_from" not in hist[1].metadata and hist[1].epsilon == 0.5
    # g's file changed before the upgrade: the lineage's spend joins the records privml
    # sees next under the same dataset and site (conservative)
    assert ledger.status("g").spent.epsilon == pytest.approx(0.8)
    ledger.charge(site="g", epsilon=0.1, label="q2")
    assert ledger.status("g").spent.epsilon == pytest.approx(0.9)
    # charging h registers its records; the legacy spend stays on them, in any file
    ledger.charge(site="h", epsilon=1.0, label="q3")
    subset = PrivacyLedger(path, dataset="other", records={"s": hh[:10]})
    with pytest.raises(BudgetExceededError, match="only 0.9 of 3 remains"):
        subset.charge(site="s", epsilon=1.0, label="q4")
    # name-keyed charges stay name-keyed, converted too
    assert PrivacyLedger(path, dataset="heart").spent("z").epsilon == pytest.approx(0.4)


def test_a_schema_1_ledger_is_migrated_through_schema_2(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    meta = {"neighboring_relation": "replace_one"}
    _old_ledger(path, 1, [_charge("a", 0.25, 0.0, meta, None)] * 4, [])
    ledger = PrivacyLedger(path, dataset="heart", budget_epsilon=3.0, budget_delta=1e-4)
    assert ledger.spent("a").epsilon == pytest.approx(1.0)
    assert [r.fingerprint for r in ledger.history("a")] == ["name:heart/a"] * 4
    again = PrivacyLedger(path, dataset="heart")  # opening twice migrates once
    assert again.spent("a").epsilon == pytest.approx(1.0)


def test_an_empty_old_ledger_takes_the_budget_of_its_first_use(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    _old_ledger(path, 2, [], [])
    ledger = PrivacyLedger(path, dataset="d", budget_epsilon=5.0, budget_delta=1e-5)
    assert (ledger.budget.epsilon, ledger.budget.delta) == (5.0, 1e-5)
    rec = ledger.charge(site="a", epsilon=1.0, label="q")
    assert rec.relation == "replace_one" and np.isclose(rec.budget_epsilon, 5.0)
