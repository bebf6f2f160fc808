"""Tokens (hashed, revocable, shared by processes) and the shared state store (contexts, expiry,
quotas, rate limits), including several processes at once."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sqlite3
from pathlib import Path

import pytest

from privml.errors import UsageError
from privml.serve.store import ContextQuotaError, StateStore
from privml.serve.tokens import TOKEN_PREFIX, TokenStore
from tests.serve.conftest import StoreClock

TTL = 3600.0


def test_tokens_are_random_shown_once_and_stored_hashed(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    a, b = store.add("clinic-a"), store.add("clinic-b")
    assert a != b and a.startswith(TOKEN_PREFIX) and len(a) >= len(TOKEN_PREFIX) + 43
    text = (tmp_path / "tokens.json").read_text()
    assert a not in text and a[len(TOKEN_PREFIX):] not in text
    assert hashlib.sha256(a.encode()).hexdigest() in text
    assert (tmp_path / "tokens.json").stat().st_mode & 0o777 == 0o600
    assert store.verify(a) == "clinic-a" and store.verify(b) == "clinic-b"
    for bad in ("", a + "x", a[:-1], "privml_" + "A" * 43, "x" * 10_000):
        assert store.verify(bad) is None
    with pytest.raises(UsageError, match="active token named 'clinic-a'"):
        store.add("clinic-a")
    with pytest.raises(UsageError, match="'name'"):
        store.add("../etc")


def test_revocation_is_seen_by_other_processes_without_restart(tmp_path: Path) -> None:
    server_view, operator = TokenStore(tmp_path), TokenStore(tmp_path)
    token = operator.add("alice")
    assert server_view.verify(token) == "alice"
    operator.revoke("alice")
    assert server_view.verify(token) is None
    [info] = operator.list()
    assert info.name == "alice" and not info.active and info.revoked is not None
    with pytest.raises(UsageError, match="no active token"):
        operator.revoke("alice")
    again = operator.add("alice")  # a new token under the same name
    assert server_view.verify(again) == "alice" and server_view.verify(token) is None


def test_a_broken_token_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text("{nope")
    with pytest.raises(UsageError, match="not valid JSON"):
        TokenStore(tmp_path).list()
    (tmp_path / "tokens.json").write_text(json.dumps({"tokens": []}))
    with pytest.raises(UsageError, match="not a privml token file"):
        TokenStore(tmp_path).verify("x" * 20)


def test_contexts_register_lookup_expire_and_delete(tmp_path: Path) -> None:
    st = StateStore(tmp_path)
    kid = "ab" * 32
    rec, created = st.register("alice", kid, "ckks", b"context", max_per_owner=2, ttl_s=TTL)
    assert created and rec.size_bytes == 7
    assert st.read_blob(kid) == b"context"
    assert (tmp_path / "contexts" / f"{kid}.ctx").stat().st_mode & 0o777 == 0o600
    _, created = st.register("alice", kid, "ckks", b"context", max_per_owner=2, ttl_s=TTL)
    assert not created
    st.register("bob", kid, "ckks", b"context", max_per_owner=2, ttl_s=TTL)
    assert st.lookup("alice", kid, ttl_s=TTL) is not None
    assert st.lookup("carol", kid, ttl_s=TTL) is None
    assert st.lookup("alice", "../../etc/passwd", ttl_s=TTL) is None
    with pytest.raises(UsageError, match="64 hex"):
        st.register("alice", "../x", "ckks", b"", max_per_owner=2, ttl_s=TTL)
    # alice's row goes stale: lookups miss at once, the sweep deletes the row, not bob's file
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("UPDATE contexts SET last_used = last_used - 7200 WHERE owner='alice'")
    assert st.lookup("alice", kid, ttl_s=TTL) is None
    assert st.expire(ttl_s=TTL) == 1
    assert st.read_blob(kid) == b"context"
    assert st.delete("bob", kid) and not st.delete("bob", kid)
    assert st.read_blob(kid) is None  # no owner left: file removed
    # a stray file (a crash between write and commit) is swept too
    stray = tmp_path / "contexts" / f"{'cd' * 32}.ctx"
    stray.write_bytes(b"x")
    st.expire(ttl_s=TTL)
    assert not stray.exists()


def test_quota_and_owner_removal(tmp_path: Path) -> None:
    st = StateStore(tmp_path)
    ids = [f"{i:064x}" for i in range(3)]
    st.register("alice", ids[0], "ckks", b"a", max_per_owner=2, ttl_s=TTL)
    st.register("alice", ids[1], "ckks", b"b", max_per_owner=2, ttl_s=TTL)
    with pytest.raises(ContextQuotaError, match="already holds 2"):
        st.register("alice", ids[2], "ckks", b"c", max_per_owner=2, ttl_s=TTL)
    st.register("bob", ids[2], "ckks", b"c", max_per_owner=2, ttl_s=TTL)
    assert st.count("alice", ttl_s=TTL) == 2
    assert st.delete_owner("alice") == 2
    assert st.count("alice", ttl_s=TTL) == 0
    assert st.read_blob(ids[0]) is None and st.read_blob(ids[2]) == b"c"


def test_token_bucket(tmp_path: Path, store_clock: StoreClock) -> None:
    st = StateStore(tmp_path)
    assert st.take("alice", "patients", 8, rate=2.0, burst=10.0) == 0.0
    wait = st.take("alice", "patients", 8, rate=2.0, burst=10.0)
    assert wait == pytest.approx(3.0)  # 6 missing units at 2 per second
    store_clock.now += 1.0  # a second later: 2 + 2 units, still 2 s to wait
    assert st.take("alice", "patients", 8, rate=2.0, burst=10.0) == pytest.approx(2.0)
    assert st.take("bob", "patients", 8, rate=2.0, burst=10.0) == 0.0  # per token
    with sqlite3.connect(tmp_path / "state.db") as conn:  # 4 s more: 2 + 10 units, 10 kept
        conn.execute("UPDATE buckets SET updated = updated - 4 WHERE owner='alice'")
    assert st.take("alice", "patients", 8, rate=2.0, burst=10.0) == 0.0


def _register_many(args: tuple[str, int]) -> int:
    folder, worker = args
    st = StateStore(folder)
    ok = 0
    for i in range(10):
        kid = f"{worker:032x}{i:032x}"
        try:
            st.register("alice", kid, "ckks", os.urandom(64), max_per_owner=12, ttl_s=TTL)
            ok += 1
        except ContextQuotaError:
            pass
        st.take("alice", "requests", 1.0, rate=1e-6, burst=1e9)
    return ok


def test_worker_processes_share_one_quota(tmp_path: Path) -> None:
    with mp.get_context("spawn").Pool(4) as pool:
        done = pool.map(_register_many, [(str(tmp_path), w) for w in range(4)])
    st = StateStore(tmp_path)
    assert sum(done) == 12 == st.count("alice", ttl_s=TTL)  # never more than the quota
    assert len(list((tmp_path / "contexts").glob("*.ctx"))) == 12
    with sqlite3.connect(tmp_path / "state.db") as conn:
        (level,) = conn.execute("SELECT level FROM buckets WHERE owner='alice'").fetchone()
    assert level == pytest.approx(1e9 - 40, abs=0.01)  # all 40 takes counted, none lost
