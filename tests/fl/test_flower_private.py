"""Private training on the Flower engine, over the in-memory grid (every message through
Flower's own serialization): each site plans, checks, books in its own ledger and draws its
own noise; the model and the epsilon equal the simulation's under the reproducible switch;
a coordinator cannot make a site spend more than its budget."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from privml.config import load_config, parse_config
from privml.dp.cli import ledger_from_config
from privml.dp.randomness import reproducible_noise
from privml.fl.flower import protocol as P
from privml.fl.flower.client_app import make_client_app
from privml.fl.flower.server_app import Coordinator, SiteFailure
from privml.fl.flower.site import SiteRuntime
from privml.pipeline import run as run_simulation
from tests.fl.fake_grid import FakeGrid, roundtrip

pytestmark = pytest.mark.filterwarnings("ignore::privml.errors.InsecureOptionWarning")

SITES = ("hospital_a", "hospital_b", "hospital_c")


@pytest.fixture(autouse=True)
def task_identity() -> Iterable[None]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None  # type: ignore[assignment]


def _config(ledger: Path, mode: str, *, training: dict[str, Any] | None = None,
            attack: dict[str, Any] | None = None, **privacy: Any) -> Any:  # fmt: skip
    raw = load_config(None).resolved()
    raw["training"].update({"rounds": 3, **(training or {})})
    raw["inference"]["encrypted"] = False
    raw["privacy"].update({"mode": mode, "epsilon": 3.0, "ledger": str(ledger), **privacy})
    if attack is not None:
        raw["attack"] = attack
    return parse_config(raw)


def _runtimes(tmp_path: Path, mode: str, **kw: Any) -> dict[str, SiteRuntime]:
    """One runtime per site, each with its own ledger file (the config is otherwise the same)."""
    return {
        name: SiteRuntime(_config(tmp_path / f"{name}.sqlite", mode, **kw), name) for name in SITES
    }


def _grid(runtimes: dict[str, SiteRuntime]) -> FakeGrid:
    nodes = {}
    for i, (name, rt) in enumerate(runtimes.items()):
        app = make_client_app(lambda _ctx, _rt=rt: _rt)
        nodes[100 + i] = (app, Context(42, 100 + i, {"site": name}, RecordDict(), {}))
    return FakeGrid(nodes)


def _history(rt: SiteRuntime) -> list[Any]:
    fps, hashes = rt._records()
    return ledger_from_config(rt.config, fingerprints=fps, records=hashes).history(rt.name)


CASES = {
    "sample": ("sample", {}),
    "client": ("client", {"training": {"lr": 2.0}}),
    "sample+paillier": ("sample", {"training": {
        "secure_aggregation": "paillier", "secure_aggregation_key_bits": 2048,
        "max_update_norm": 5.0}}),
    "client+paillier": ("client", {"training": {
        "secure_aggregation": "paillier", "secure_aggregation_key_bits": 2048, "lr": 2.0}}),
    "sample+secagg+": ("sample", {"training": {
        "secure_aggregation": "secagg+", "max_update_norm": 5.0}}),
    "sample+attack": ("sample", {"training": {"aggregator": "median"},
                                 "attack": {"kind": "sign_flip", "sites": ["hospital_b"]}}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_private_training_on_flower_equals_the_simulation(case: str, tmp_path: Path) -> None:
    mode, kw = CASES[case]
    with reproducible_noise():
        runtimes = _runtimes(tmp_path, mode, **kw)
        cfg = _config(tmp_path / "coordinator.sqlite", mode, **kw)
        grid = _grid(runtimes)
        flower = Coordinator(grid, cfg).run().result
        sim = run_simulation(_config(tmp_path / "sim.sqlite", mode, **kw), write=False)
    # SecAgg+: both engines quantize (2**22 steps of the clip range), with their own rounding
    tol = 1e-4 if "secagg" in case else 1e-5
    np.testing.assert_allclose(flower.params.numpy(), sim.training.params.numpy(),
                               rtol=tol, atol=tol)  # fmt: skip
    fp, sp = flower.extra["privacy"], sim.results["privacy"]
    assert fp["epsilon"] == pytest.approx(sp["epsilon"], rel=1e-9)
    assert fp["epsilon_per_site"] == pytest.approx(sp["epsilon_per_site"], rel=1e-9)
    if mode == "sample":
        assert fp["epsilon_by_round"] == sp["epsilon_by_round"]
    assert [r.accuracy for r in flower.history] == [r["accuracy"] for r in sim.results["rounds"]]
    # every site booked in its own ledger what the simulation booked for it
    sim_ledger = ledger_from_config(_config(tmp_path / "sim.sqlite", mode, **kw))
    for name, rt in runtimes.items():
        mine = [(h.label, round(h.epsilon, 12), h.delta) for h in _history(rt)]
        theirs = [(h.label, round(h.epsilon, 12), h.delta) for h in sim_ledger.history(name)]
        assert mine == theirs and mine
    assert not (tmp_path / "coordinator.sqlite").exists()  # the coordinator books nothing
    if "paillier" in case or "secagg" in case:  # the server received no plain update
        for m in grid.delivered:
            if m.metadata.message_type == MessageType.TRAIN:
                assert P.UPDATE not in m.content.config_records.get("result", {})
                assert P.UPDATE not in m.content.array_records
                assert not any(len(a) for a in m.content.array_records.values())
    if case == "sample+attack":
        assert [r.malicious for r in flower.history] == [1, 1, 1]


def _ask(app: Any, ctx: Context, rt: SiteRuntime, kind: str, **settings: Any) -> Message:
    values = {"fingerprint": json.dumps(rt.fingerprint), **settings}
    content: dict[str, Any] = {}
    if kind == MessageType.TRAIN:
        params = np.zeros(rt.n_params, dtype=np.float32)
        content = P.pack(values, P.PARAMS, params)
    content[P.SETTINGS] = ConfigRecord(values)
    msg = Message(RecordDict(content), ctx.node_id, kind, group_id="x")
    msg.metadata.__dict__["_message_id"] = msg.object_id
    received = roundtrip(msg)
    try:  # as a SuperNode answers: the exception's type and message, nothing else
        return app(received, ctx)  # type: ignore[no-any-return]
    except Exception as exc:
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                       reply_to=received)  # fmt: skip


def test_a_coordinator_cannot_spend_more_than_a_sites_budget(tmp_path: Path) -> None:
    # the run plans epsilon 3 per site; the site's budget allows about one run and a half
    cfg = _config(tmp_path / "a.sqlite", "sample", budget_epsilon=4.5)
    rt = SiteRuntime(cfg, "hospital_a")
    app = make_client_app(lambda _ctx: rt)
    ctx = Context(42, 100, {"site": "hospital_a"}, RecordDict(), {})
    # a round before the site set up its private training is refused: nothing computed
    refused = _ask(app, ctx, rt, MessageType.TRAIN, round=1)
    assert refused.has_error() and "not set up" in refused.error.reason
    setup = _ask(app, ctx, rt, MessageType.QUERY, service="private")
    assert not setup.has_error()
    # the rogue coordinator asks for round 1 again and again (a new release each time)
    answered = 0
    for _ in range(20):
        before = _history(rt)
        reply = _ask(app, ctx, rt, MessageType.TRAIN, round=1)
        if reply.has_error():
            assert "BudgetExceededError" in reply.error.reason
            assert not reply.has_content()  # no update left the site
            assert _history(rt) == before  # the refused round booked nothing
            break
        assert len(_history(rt)) == len(before) + 1  # booked before it left
        answered += 1
    else:
        raise AssertionError("the site never refused")
    assert answered >= 3  # it did answer the rounds it could afford
    spent = sum(h.epsilon for h in _history(rt))
    assert spent <= 4.5 + 1e-9
    # a new run whose whole plan no longer fits is refused at set-up, before anything is spent
    before = _history(rt)
    again = _ask(app, ctx, rt, MessageType.QUERY, service="private")
    assert again.has_error() and "BudgetExceededError" in again.error.reason
    assert _history(rt) == before


def test_client_level_sites_answer_each_round_once(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "a.sqlite", "client")
    rt = SiteRuntime(cfg, "hospital_a")
    app = make_client_app(lambda _ctx: rt)
    ctx = Context(42, 100, {"site": "hospital_a"}, RecordDict(), {})
    assert not _ask(app, ctx, rt, MessageType.QUERY, service="private").has_error()
    booked = _history(rt)
    assert [h.label for h in booked] == ["dp-fedavg run (client level)"]  # the whole run, once
    assert not _ask(app, ctx, rt, MessageType.TRAIN, round=2).has_error()
    replay = _ask(app, ctx, rt, MessageType.TRAIN, round=2)
    assert replay.has_error() and "already released" in replay.error.reason
    assert _history(rt) == booked


def test_a_site_that_cannot_afford_the_run_stops_it_before_round_1(tmp_path: Path) -> None:
    runtimes = {n: SiteRuntime(_config(tmp_path / f"{n}.sqlite", "sample",
                                       budget_epsilon=2.0 if n == "hospital_c" else None), n)
                for n in SITES}  # fmt: skip
    cfg = _config(tmp_path / "coordinator.sqlite", "sample")
    grid = _grid(runtimes)
    with pytest.raises(SiteFailure, match="hospital_c.*refused the private request.*budget"):
        Coordinator(grid, cfg).run()
    assert _history(runtimes["hospital_c"]) == []
    assert not any(m.metadata.message_type == MessageType.TRAIN for m in grid.sent)


def test_sites_refuse_a_coordinator_with_other_privacy_settings(tmp_path: Path) -> None:
    runtimes = _runtimes(tmp_path, "sample")
    cfg = _config(tmp_path / "coordinator.sqlite", "sample", epsilon=30.0)
    with pytest.raises(SiteFailure, match=r"differs from this site.s in \[.privacy.\]"):
        Coordinator(_grid(runtimes), cfg).run()
    assert all(_history(rt) == [] for rt in runtimes.values())


def test_a_restarted_site_sets_up_its_private_training_again(tmp_path: Path) -> None:
    """hospital_b's SuperNode dies during round 2 and comes back as a new process (a fresh
    runtime, nothing in memory): it sets up its private training again (checked against its
    own budget, no second private mean), takes the run's input centre, and trains round 3;
    its ledger holds both sessions' charges."""
    runtimes = _runtimes(tmp_path, "sample")
    cfg = _config(tmp_path / "coordinator.sqlite", "sample")
    restarted = SiteRuntime(_config(tmp_path / "hospital_b.sqlite", "sample"), "hospital_b")
    box: list[FakeGrid] = []

    def crash_b(name: str, received: Message, reply: Message) -> Message | None:
        grid, node = box[0], received.metadata.dst_node_id
        if node == 101 and 101 in grid.offline:
            return None
        if node == 101 and received.metadata.group_id == "2":
            grid.offline.add(101)
            app = make_client_app(lambda _ctx: restarted)
            grid.nodes[201] = (app, Context(42, 201, {"site": "hospital_b"}, RecordDict(), {}))
            return None
        return reply

    grid = _grid(runtimes)
    grid.tamper = crash_b
    box.append(grid)
    with reproducible_noise():
        coordinator = Coordinator(grid, cfg, round_timeout=600, liveness_interval=0.05)
        res = coordinator.run().result
    assert [r.clients for r in res.history] == [3, 2, 3]
    assert [r["site"] for r in coordinator.rejoins] == ["hospital_b"]
    labels = [h.label for h in _history(restarted)]
    # first process: centre, rounds 1 and 2 (its round-2 update was lost with it);
    # the restarted process: round 3 only, on the run's centre
    assert labels == ["dp-sgd input centring", "dp-sgd round 1", "dp-sgd round 2",
                      "dp-sgd round 3"]  # fmt: skip
    assert restarted.private is not None and restarted.private.centre is None
    assert restarted.data is not restarted.raw  # shifted by the run's centre
    a = runtimes["hospital_a"]
    np.testing.assert_allclose(restarted.raw.X_train[0] - restarted.data.X_train[0],
                               a.raw.X_train[0] - a.data.X_train[0], rtol=0, atol=1e-6)  # fmt: skip
