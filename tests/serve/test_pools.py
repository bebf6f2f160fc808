"""The server's answer pools: filled before the first query, refilled only while the server is
quiet (unless they run low), so a burst of requests never competes with its own refill."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from privml.serve.pools import PoolKeeper


class FakePool:
    """Counts elements; ``top_up(1)`` records whether a request was in flight meanwhile."""

    scheme = "fake"

    def __init__(self, target: int, ready: int = 0) -> None:
        self.target = target
        self.items = ready
        self.misses = 0
        self.made_while_busy = 0
        self.keeper: PoolKeeper | None = None

    def __len__(self) -> int:
        return self.items

    def deficit(self) -> int:
        return max(0, self.target - self.items)

    def below(self, fraction: float) -> bool:
        return self.items < fraction * self.target

    def top_up(self, limit: int | None = None) -> int:
        assert self.keeper is not None
        if self.keeper._inflight:
            self.made_while_busy += 1
        time.sleep(0.002)
        self.items += 1
        return 1

    def take(self) -> None:
        self.items -= 1


class FakeEvaluator:
    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    def make_pool(self, public: Any, **_: Any) -> FakePool:
        return self.pool


class FakePublic:
    scheme = "ckks"


def wait_for(cond: Any, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def keeper() -> Any:
    k = PoolKeeper(quiet_s=0.05)
    yield k
    k.stop()


def test_warm_fills_a_pool_before_any_request(keeper: PoolKeeper) -> None:
    pool = FakePool(10)
    pool.keeper = keeper
    loads = []

    def loader() -> tuple[Any, Any]:
        loads.append(threading.current_thread().name)
        return FakePublic(), FakeEvaluator(pool)

    keeper.warm("a" * 64, loader)
    assert wait_for(lambda: len(pool) == 10)
    assert loads == ["privml-pools"]  # parsed on the pool thread, not by the caller
    assert keeper.stats() == {"a" * 16: {"ready": 10, "misses": 0}}
    asked = threading.Event()

    def gone() -> None:  # a key deleted meanwhile
        asked.set()

    keeper.warm("b" * 64, gone)
    assert asked.wait(60)  # the thread looked the key up ...
    assert list(keeper.stats()) == ["a" * 16]  # ... and made no pool for it


def test_refills_wait_while_requests_are_in_flight(keeper: PoolKeeper) -> None:
    pool = FakePool(20, ready=20)
    pool.keeper = keeper
    keeper.get("a" * 64, FakePublic(), FakeEvaluator(pool))
    with keeper.serving():
        for _ in range(10):  # a burst that leaves half the pool
            pool.take()
            keeper.kick()
            time.sleep(0.02)
        assert len(pool) == 10 and pool.made_while_busy == 0
    assert wait_for(lambda: len(pool) == 20)  # refilled once quiet
    assert pool.made_while_busy == 0


def test_a_pool_running_low_is_refilled_even_while_busy(keeper: PoolKeeper) -> None:
    pool = FakePool(20, ready=20)
    pool.keeper = keeper
    keeper.get("a" * 64, FakePublic(), FakeEvaluator(pool))
    with keeper.serving():
        for _ in range(18):
            pool.take()
        keeper.kick()
        assert wait_for(lambda: len(pool) >= 5)  # back above the low-water mark (25 %)
        time.sleep(0.2)
        assert len(pool) <= 6  # ... and no further while the request runs
    assert pool.made_while_busy >= 3
    assert wait_for(lambda: len(pool) == 20)


def test_the_server_warms_pools_at_registration_lookup_and_start(
    tmp_path: Path, trained: Any, signing_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/contexts and GET /v1/contexts/{key_id} fill the key's pool before the first
    prediction; a restarted server warms the pools of the recently used keys by itself."""
    import base64

    from starlette.testclient import TestClient

    import privml.he as he
    from privml.serve.app import create_app
    from privml.serve.model import ServedModel
    from privml.serve.settings import ServeSettings
    from privml.serve.tokens import TokenStore
    from tests.serve.conftest import trusting

    with trusting(signing_key):
        served = ServedModel.load(trained.folder)
    state = tmp_path / "state"
    token = TokenStore(state).add("alice")
    auth = {"Authorization": f"Bearer {token}"}
    settings = ServeSettings(model_dir=served.folder, state_dir=state)
    keys = he.keygen(scheme="ckks", requirements=served.evaluators["ckks"].requirements)
    kid = keys.public.key_id
    app = create_app(settings, served=served)
    svc = app.state.service
    with TestClient(app, base_url="http://127.0.0.1") as http:
        r = http.post("/v1/contexts", headers=auth,
                      json={"context": base64.b64encode(keys.public.to_bytes()).decode()})
        assert r.status_code == 201
        assert wait_for(lambda: svc.pools.stats().get(kid[:16], {}).get("ready", 0) >= 32,
                        timeout=120)
    svc.pools.stop()
    app2 = create_app(settings, served=served)  # a restart: pools are per process
    svc2 = app2.state.service
    assert wait_for(lambda: svc2.pools.stats().get(kid[:16], {}).get("ready", 0) > 0,
                    timeout=120)
    svc2.pools.stop()
    from privml.serve.store import StateStore

    with monkeypatch.context() as m:  # as if the key had not been used recently
        m.setattr(StateStore, "records", lambda self: [])
        app3 = create_app(settings, served=served)
    svc3 = app3.state.service
    time.sleep(0.3)
    assert svc3.pools.stats() == {}
    with TestClient(app3, base_url="http://127.0.0.1") as http:
        assert http.get(f"/v1/contexts/{kid}", headers=auth).status_code == 200
        assert wait_for(lambda: svc3.pools.stats().get(kid[:16], {}).get("ready", 0) > 0,
                        timeout=120)
    svc3.pools.stop()
