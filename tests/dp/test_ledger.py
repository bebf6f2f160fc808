"""The persistent budget ledger: admission, refusal, durability, concurrency, crashes."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from privml.dp.events import (
    GaussianDpEvent,
    PoissonSampledDpEvent,
    PureDpEvent,
    SelfComposedDpEvent,
    event_from_dict,
)
from privml.dp.ledger import DEFAULT_BUDGET, PrivacyLedger, Spend
from privml.errors import BudgetExceededError, UsageError

from . import ledger_workers


def _ledger(tmp_path: Path, **kw: float) -> PrivacyLedger:
    return PrivacyLedger(
        tmp_path / "runs" / "ledger.sqlite",
        dataset="heart",
        budget_epsilon=kw.get("budget_epsilon", 1.0),
        budget_delta=kw.get("budget_delta", 1e-6),
    )


def test_charges_until_the_budget_is_spent_then_refuses(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    for i in range(15):  # 15 x 1/15 fits exactly despite float rounding
        ledger.charge(site="a", epsilon=1 / 15, label=f"q{i}")
    assert ledger.spent("a").epsilon == pytest.approx(1.0)
    assert ledger.remaining("a").epsilon == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(BudgetExceededError) as info:
        ledger.charge(site="a", epsilon=0.01, label="one too many")
    message = str(info.value)
    assert "only 0 of 1 remains" in message and "privml budget set" in message
    assert "Nothing was spent" in message
    assert len(ledger.history("a")) == 15  # the refusal booked nothing
    # Other sites and datasets have their own budgets.
    ledger.charge(site="b", epsilon=0.5, label="q")
    other = PrivacyLedger(ledger.path, dataset="other", budget_epsilon=1.0, budget_delta=1e-6)
    assert other.spent("a").epsilon == 0.0 and other.history() == []


def test_delta_budget_is_enforced(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, budget_delta=1e-6)
    ledger.charge(site="a", epsilon=0.1, delta=6e-7, label="g1")
    with pytest.raises(BudgetExceededError, match=r"delta=6e-07 but only 4e-07 of 1e-06 remains"):
        ledger.charge(site="a", epsilon=0.1, delta=6e-7, label="g2")
    pure = PrivacyLedger(
        tmp_path / "pure.sqlite", dataset="heart", budget_epsilon=1.0, budget_delta=0.0
    )
    with pytest.raises(BudgetExceededError, match="delta"):
        pure.charge(site="z", epsilon=0.1, delta=1e-9, label="gaussian")
    pure.charge(site="z", epsilon=0.1, delta=0.0, label="laplace")


def test_check_spends_nothing(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    status = ledger.check(site="a", epsilon=0.9)
    assert status.remaining.epsilon == 1.0 and status.charges == 0
    with pytest.raises(BudgetExceededError, match="asked epsilon=1.5"):
        ledger.check(site="a", epsilon=1.5)
    assert ledger.history() == []


def test_persists_across_handles_and_the_budget_changes_only_deliberately(
    tmp_path: Path,
) -> None:
    first = _ledger(tmp_path)
    first.charge(site="a", epsilon=0.8, label="q1", metadata={"query": "mean(age)"})
    again = _ledger(tmp_path)
    assert again.spent("a").epsilon == pytest.approx(0.8)
    with pytest.raises(BudgetExceededError, match="privml budget set"):
        again.charge(site="a", epsilon=0.5, label="q2")
    # asking for a higher budget when opening is refused before anything is booked
    with pytest.raises(UsageError, match=r"budget_epsilon = 2.*privml budget set") as info:
        _ledger(tmp_path, budget_epsilon=2.0)
    assert info.value.exit_code == 2
    unspecified = PrivacyLedger(again.path, dataset="heart")  # None: the ledger's budget
    assert unspecified.budget.epsilon == 1.0 and unspecified.budget.delta == 1e-6
    change = unspecified.set_budget(epsilon=2.0, reason="ethics board approval 2024-17")
    assert (change.old_epsilon, change.epsilon, change.delta) == (1.0, 2.0, 1e-6)
    record = again.charge(site="a", epsilon=0.5, label="q2")  # the open handle sees it
    assert record.budget_epsilon == 2.0
    assert [r.label for r in again.history()] == ["q1", "q2"]
    assert again.history()[0].metadata == {"query": "mean(age)"}
    hist = _ledger(tmp_path, budget_epsilon=2.0).budget_history()
    assert [(h.old_epsilon, h.epsilon) for h in hist] == [(None, 1.0), (1.0, 2.0)]
    assert hist[1].reason == "ethics board approval 2024-17" and hist[1].created_at


def test_a_fresh_ledger_takes_the_default_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite", dataset="d")
    assert ledger.budget == DEFAULT_BUDGET == Spend(10.0, 1e-4)
    assert "defaults" in ledger.budget_history()[0].reason


def test_add_or_remove_costs_are_booked_as_replace_one_bounds(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, budget_epsilon=10.0, budget_delta=1e-3)
    rec = ledger.charge(site="a", epsilon=0.5, delta=1e-6, label="q", relation="add_or_remove")
    # group privacy: replace one = remove one + add one
    assert rec.epsilon == pytest.approx(1.0) and rec.relation == "replace_one"
    assert rec.delta == pytest.approx((1 + math.exp(0.5)) * 1e-6)
    assert rec.metadata["converted_from"]["epsilon"] == 0.5
    same = ledger.charge(
        site="a", epsilon=0.5, delta=1e-6, label="t",
        metadata={"neighboring_relation": "add_or_remove"},
    )  # fmt: skip
    assert same.epsilon == pytest.approx(1.0)
    booked = ledger.charge(site="a", epsilon=0.5, label="training", relation="replace_one")
    assert booked.epsilon == 0.5
    assert ledger.spent("a").epsilon == pytest.approx(2.5)
    assert {r.relation for r in ledger.history()} == {"replace_one"}
    with pytest.raises(UsageError, match="contradicts"):
        ledger.charge(
            site="a", epsilon=0.1, label="x", relation="replace_one",
            metadata={"neighboring_relation": "add_or_remove"},
        )  # fmt: skip
    with pytest.raises(UsageError, match="'relation'"):
        ledger.charge(site="a", epsilon=0.1, label="x", relation="bounded")


def test_events_are_stored_as_json(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    event = SelfComposedDpEvent(PoissonSampledDpEvent(0.01, GaussianDpEvent(1.1)), 100)
    ledger.charge(site="a", epsilon=0.3, delta=1e-7, label="round 1", event=event)
    ledger.charge(site="a", epsilon=0.1, label="q", event=PureDpEvent(0.1))
    stored = ledger.history("a")
    assert stored[0].event is not None and event_from_dict(stored[0].event) == event
    assert stored[1].event == {
        "module_name": "privml.dp.events",
        "class_name": "PureDpEvent",
        "epsilon": 0.1,
    }


def test_sqlite_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    ledger.charge(site="a", epsilon=0.1, label="q")
    conn = sqlite3.connect(ledger.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    with ledger._connect() as c:
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"epsilon": -0.1}, UsageError, "'epsilon' parameter of PrivacyLedger.charge must be >= 0"),
        ({"epsilon": float("nan")}, UsageError, "'epsilon'"),
        ({"epsilon": 0.1, "delta": 2.0}, UsageError, "'delta'"),
        ({"epsilon": "0.1"}, TypeError, "must be a real number"),
        ({"epsilon": 0.1, "site": ""}, UsageError, "'site'"),
        ({"epsilon": 0.1, "label": " "}, UsageError, "'label'"),
        ({"epsilon": 0.1, "metadata": {"x": object()}}, UsageError, "JSON-able"),
        ({"epsilon": 0.1, "event": 3}, TypeError, "DpEvent"),
    ],
)
def test_charge_validates_inputs(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    ledger = _ledger(tmp_path)
    args = {"site": "a", "label": "q", **kwargs}
    with pytest.raises(error, match=match):
        ledger.charge(**args)
    assert ledger.history() == []


def test_constructor_validates_budget(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="budget_epsilon"):
        PrivacyLedger(tmp_path / "l.sqlite", dataset="d", budget_epsilon=0.0, budget_delta=0.0)
    with pytest.raises(UsageError, match="budget_delta"):
        PrivacyLedger(tmp_path / "l.sqlite", dataset="d", budget_epsilon=1.0, budget_delta=1.0)
    with pytest.raises(UsageError, match="dataset"):
        PrivacyLedger(tmp_path / "l.sqlite", dataset="", budget_epsilon=1.0, budget_delta=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("per_record", [False, True])
def test_forty_concurrent_query_processes_cannot_overspend(
    tmp_path: Path, per_record: bool
) -> None:
    """40 processes race for a budget that fits 15 charges: exactly 15 are released.

    Per record: each process reads the same 200 records plus one of its own, so 40 new
    versions register concurrently; the 200 shared records decide."""
    path = str(tmp_path / "ledger.sqlite")
    PrivacyLedger(path, dataset="heart", budget_epsilon=1.5, budget_delta=0.0)  # create schema
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(40)
    results = ctx.Queue()
    shared = list(range(1000, 1200))
    procs = [
        ctx.Process(
            target=ledger_workers.query_worker,
            args=(path, i, barrier, results, [*shared, 5000 + i] if per_record else None),
        )
        for i in range(40)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    released = sorted(rid for _, rid in outcomes if rid is not None)
    assert len(released) == 15
    records = {"a": shared} if per_record else None
    ledger = PrivacyLedger(
        path, dataset="heart", budget_epsilon=1.5, budget_delta=0.0, records=records
    )
    history = ledger.history("a")
    assert sorted(r.id for r in history) == released  # every released one is listed
    assert ledger.spent("a").epsilon == pytest.approx(1.5)
    assert len({r.pid for r in history}) == 15


@pytest.mark.slow
def test_killed_process_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    """SIGKILL at arbitrary moments: the ledger never shows less than what was released."""
    path = str(tmp_path / "ledger.sqlite")
    released_path = tmp_path / "released.txt"
    ctx = mp.get_context("spawn")
    orphans: set[int] = set()
    for kill in range(3):
        proc = ctx.Process(target=ledger_workers.charge_forever, args=(path, str(released_path)))
        proc.start()
        deadline = time.monotonic() + 300  # ends when the worker has released enough
        target = 10 * (kill + 1) + kill * 7
        while time.monotonic() < deadline:
            if released_path.exists() and len(released_path.read_text().split()) >= target:
                break
            time.sleep(0.01)
        time.sleep(0.003 * kill)  # vary the moment of the kill
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
        ledger = PrivacyLedger(path, dataset="heart", budget_epsilon=1e6, budget_delta=0.0)
        booked = {r.id for r in ledger.history("a")}
        released = {int(x) for x in released_path.read_text().split()}
        assert released, "the worker released nothing before the kill"
        assert released <= booked  # the ledger never shows less than what was released
        # Each killed worker may leave one charge booked but not released: its last one,
        # committed just before the kill. The unreleased ones accumulate over the kills.
        new_orphans = (booked - released) - orphans
        assert len(new_orphans) <= 1, (kill, sorted(new_orphans))
        assert all(i == max(booked) for i in new_orphans)
        orphans |= new_orphans
        assert ledger.spent("a").epsilon == pytest.approx(0.01 * len(booked))
