"""Churn: a minimum of sites per round, and a run that says which sites missed which rounds.

The settings (``[training] min_sites_per_round``, ``round_timeout``, ``wait_for_sites``) are
checked strictly; the simulation stops a round short of sites (its dropouts are seeded: a retry
would draw the same ones); results.json and the summary list the sites that missed rounds and
the test records the metrics cover, and a degraded run ends with a warning. The Flower engine's
side runs through the in-memory grid of test_flower_coordinator.py; the live deployment under
churn is tests/fl/test_flower_churn.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from privml.cli import _summary
from privml.config import load_config
from privml.errors import ConfigError
from privml.fl.flower.server_app import Coordinator, flower_results
from privml.fl.flower.site import SiteRuntime
from privml.fl.rounds import TooFewSites
from tests.fl.test_flower_coordinator import (  # noqa: F401 (fixtures)
    _config,
    _grid,
    demo_runtimes,
    one_torch_thread,
    task_identity,
)
from tests.test_cli import cli
from tests.test_output_safety import _no_partial, _study


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("min_sites_per_round=0", "greater than 0"),
        ("min_sites_per_round=true", "true/false is not one"),
        ("min_sites_per_round=2.0", "whole number"),
        ("min_sites_per_round=4", "more than the 3 sites this config samples"),
        ("round_timeout=0", "greater than 0"),
        ("round_timeout=inf", "finite"),
        ('round_timeout="60"', "not text"),
        ("wait_for_sites=-1", "greater than 0"),
        ("wait_for_sites=nan", "finite"),
        ("wait_for_sites=1e300", "less than or equal"),
    ],
)
def test_churn_settings_are_checked(setting: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        load_config(None, overrides=[f"training.{setting}"])
    assert setting.split("=")[0] in str(exc.value)


def test_churn_settings_are_accepted() -> None:
    cfg = load_config(
        None,
        overrides=[
            "training.min_sites_per_round=2",
            "training.round_timeout=30",
            "training.wait_for_sites=2.5",
        ],
    )
    t = cfg.training
    assert (t.min_sites_per_round, t.round_timeout, t.wait_for_sites) == (2, 30.0, 2.5)


def test_simulation_stops_a_round_short_of_sites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        "[training]\nrounds = 4\nlocal_epochs = 1\ndropout = 0.5\nmin_sites_per_round = 3\n"
        "[audit]\nenabled = false\n[output]\nhtml = false\n"
    )
    config = _study(tmp_path, extra)
    code, _, err = cli(capsys, "run", "-c", config, "--out", tmp_path / "run")
    assert code == 2 and "Traceback" not in err, err
    flat = " ".join(err.split())
    assert "fewer than training.min_sites_per_round = 3" in flat, flat
    assert "dropped: sites" in flat and "drawn from the seed" in flat, flat
    assert not (tmp_path / "run").exists()
    _no_partial(tmp_path)


def test_simulation_records_who_missed_which_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        "[training]\nrounds = 6\nlocal_epochs = 1\ndropout = 0.3\nstraggler = 0.2\n"
        "min_sites_per_round = 1\n[audit]\nenabled = false\n[output]\nhtml = false\n"
    )
    config = _study(tmp_path, extra)
    code, out, err = cli(capsys, "run", "-c", config, "--out", tmp_path / "run")
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    names = [s["name"] for s in res["sites"]]
    expect: dict[str, dict[str, list[int]]] = {}
    for r in res["rounds"]:
        for cause, ids in r["missed"].items():
            for i in ids:
                expect.setdefault(names[i], {}).setdefault(cause, []).append(r["round"])
        assert r["dropped"] == len(r["missed"].get("dropped", []))
        assert r["stragglers"] == len(r["missed"].get("straggler", []))
        assert r["attempts"] == 1
    part = res["participation"]
    assert expect and part["missed"] == expect
    assert res["updates"]["dropped"] == sum(r["dropped"] for r in res["rounds"]) > 0
    # simulated by the config: reported, not a degraded run
    assert part["metrics_cover"] == {"n": res["metrics"]["n"], "of": res["metrics"]["n"],
                                     "not_evaluated": []}  # fmt: skip
    assert not part["degraded"] and "degraded" not in err
    assert "rounds missed (of 6" in " ".join(out.split())
    assert res["federation"]["min_sites_per_round"] == 1


def _silent(site: str, rounds: set[int], *, final: bool = False) -> Any:
    """A tamper: ``site`` sends no reply to the train messages of ``rounds`` (and, with
    ``final``, to the final evaluation)."""

    def tamper(name: str, received: Message, reply: Message) -> Message | None:
        if name != site:
            return reply
        group = received.metadata.group_id
        if received.metadata.message_type == "train" and group.isdigit() and int(group) in rounds:
            return None
        if final and group == "final":
            return None
        return reply

    return tamper


def test_flower_run_says_which_sites_missed_which_rounds(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = next(iter(demo_runtimes.values())).config
    grid = _grid(demo_runtimes, tamper=_silent("hospital_c", {2}, final=True))
    training = Coordinator(grid, cfg, round_timeout=0.3).run()
    res = json.loads(json.dumps(flower_results(cfg, training), default=str))
    rounds = res["rounds"]
    assert [r["missed"] for r in rounds] == [{}, {"timed_out": [2]}, {}]
    assert [r["dropped"] for r in rounds] == [0, 1, 0]
    assert res["updates"]["dropped"] == 1 == res["updates"]["timed_out"]
    part = res["participation"]
    assert part["missed"] == {"hospital_c": {"timed_out": [2]}}
    n_c = next(s["n_test"] for s in res["sites"] if s["name"] == "hospital_c")
    total = sum(s["n_test"] for s in res["sites"])
    assert part["metrics_cover"] == {"n": total - n_c, "of": total,
                                     "not_evaluated": ["hospital_c"]}  # fmt: skip
    assert part["degraded"]
    _summary(res, None)
    out, err = capsys.readouterr()
    flat_out, flat_err = " ".join(out.split()), " ".join(err.split())
    assert f"{total - n_c} of {total}" in flat_out and "(not evaluated)" in flat_out
    assert "hospital_c 1/3" in flat_out
    assert "site hospital_c missed 1 round(s) (timed_out): 2" in flat_err
    assert f"cover {total - n_c} of {total} test records" in flat_err
    from privml.report.html import render_report

    page = render_report(res)
    assert "Degraded run:" in page and "site hospital_c missed 1 round(s)" in page


def test_flower_round_short_of_sites_stops_when_they_do_not_come_back(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
) -> None:
    cfg = _config(rounds=3, min_sites_per_round=3)
    grid = _grid(demo_runtimes, tamper=_silent("hospital_b", {2, 3}))
    with pytest.raises(TooFewSites, match=r"round 2: only 2 site update.*min_sites_per_round = 3"):
        Coordinator(grid, cfg, round_timeout=0.3, wait_for_sites=0.5).run()


def test_flower_round_short_of_sites_is_sent_again(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
) -> None:
    """A site silent once answers the round's second request: the round closes with every
    site, and the model is the one of a run without the hiccup."""
    cfg = _config(rounds=3, min_sites_per_round=3)
    calls: dict[int, int] = {}

    def once(name: str, received: Message, reply: Message) -> Message | None:
        if name == "hospital_b" and received.metadata.message_type == "train":
            rnd = int(received.metadata.group_id)
            calls[rnd] = calls.get(rnd, 0) + 1
            if rnd == 2 and calls[rnd] == 1:
                return None
        return reply

    got = Coordinator(_grid(demo_runtimes, tamper=once), cfg, round_timeout=0.3).run().result
    clean = Coordinator(_grid(demo_runtimes), cfg).run().result
    assert [r.attempts for r in got.history] == [1, 2, 1]
    assert all(r.clients == 3 for r in got.history)
    np.testing.assert_allclose(got.params.numpy(), clean.params.numpy(), rtol=0, atol=1e-6)


def simulate_missing(cfg: Any, missed: dict[int, set[int]]) -> Any:
    """The simulation of ``cfg`` in which sites ``missed[r]`` (config order) miss round ``r``:
    the reference a run under churn must equal."""
    from privml.data.federation import load_federation
    from privml.fl.engine import run_simulation
    from privml.fl.plan import build_run
    from privml.fl.rounds import Cohort
    from privml.pipeline import model_spec

    fed = load_federation(cfg)
    run = build_run(fed, model_spec(cfg, fed), cfg.training)
    base = run.plan.cohort

    def cohort(rnd: int) -> Cohort:
        c = base(rnd)
        gone = np.array(sorted(missed.get(rnd, ())), dtype=np.int64)
        dropped = np.union1d(c.dropped, np.intersect1d(gone, c.sampled)).astype(np.int64)
        return Cohort(c.sampled, dropped, np.setdiff1d(c.stragglers, dropped).astype(np.int64))

    run.plan.cohort = cohort
    return run_simulation(run)


def test_a_restarted_supernode_takes_its_site_back(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
) -> None:
    """hospital_b's SuperNode dies during round 2 (no reply, offline) and comes back under a
    new node id: it is asked which site it serves, checked, and trains again from round 3;
    the model equals the simulation in which hospital_b missed round 2."""
    from flwr.app import Context, RecordDict

    cfg = _config(rounds=3)
    grid_box: list[Any] = []

    def crash_b(name: str, received: Message, reply: Message) -> Message | None:
        grid = grid_box[0]
        node = received.metadata.dst_node_id
        if node == 101 and 101 in grid.offline:
            return None  # a dead process does not answer
        if name == "hospital_b" and node == 101 and received.metadata.group_id == "2":
            grid.offline.add(101)
            app, _ = grid.nodes[101]
            grid.nodes[201] = (app, Context(42, 201, {"site": "hospital_b"}, RecordDict(), {}))
            return None
        return reply

    grid = _grid(demo_runtimes, tamper=crash_b)
    grid_box.append(grid)
    coordinator = Coordinator(grid, cfg, round_timeout=600, liveness_interval=0.05)
    training = coordinator.run()
    res = training.result
    assert [r.clients for r in res.history] == [3, 2, 3]
    assert [r.missed for r in res.history] == [{}, {"timed_out": [1]}, {}]
    assert coordinator.rejoins == [
        {"site": "hospital_b", "before_round": 3, "node_id": 201, "previous_node_id": 101}
    ]
    assert next(s.node_id for s in training.sites if s.name == "hospital_b") == 201
    sim = simulate_missing(cfg, {2: {1}})
    np.testing.assert_allclose(res.params.numpy(), sim.params.numpy(), rtol=0, atol=1e-5)
    assert res.metrics["accuracy"] == pytest.approx(sim.metrics["accuracy"], abs=1e-12)
    doc = flower_results(cfg, training)
    assert doc["deployment"]["rejoins"] == coordinator.rejoins


def test_a_rejoining_supernode_with_another_config_is_not_used(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
) -> None:
    from flwr.app import Context, RecordDict

    from privml.fl.flower.client_app import make_client_app

    cfg = _config(rounds=3)
    other = SiteRuntime(_config(rounds=3, lr=1.0), "hospital_b")
    grid_box: list[Any] = []

    def crash_b(name: str, received: Message, reply: Message) -> Message | None:
        grid = grid_box[0]
        if received.metadata.dst_node_id == 101 and 101 in grid.offline:
            return None
        if received.metadata.dst_node_id == 101 and received.metadata.group_id == "1":
            grid.offline.add(101)
            app = make_client_app(lambda _ctx: other)
            grid.nodes[201] = (app, Context(42, 201, {"site": "hospital_b"}, RecordDict(), {}))
            return None
        return reply

    grid = _grid(demo_runtimes, tamper=crash_b)
    grid_box.append(grid)
    coordinator = Coordinator(grid, cfg, round_timeout=600, liveness_interval=0.05)
    res = coordinator.run().result
    assert coordinator.rejoins == []
    assert [r.missed for r in res.history] == [{"timed_out": [1]}] * 3


class _FakeDeployment:
    """``run_flower`` with its SuperLink calls replaced: every submission gets a new run id,
    and the run is coordinated over the in-memory grid (``lose_at``: the SuperLink is lost,
    once, when round ``lose_at``'s train messages go out)."""

    def __init__(self, runtimes: dict[str, SiteRuntime], lose_at: int | None = None,
                 fail_at: int | None = None) -> None:  # fmt: skip
        self.runtimes = runtimes
        self.lose_at = lose_at
        self.fail_at = fail_at
        self.submitted: list[int] = []
        self.resumed: list[bool] = []

    def start_run(self, config: Any, dep: Any, **_kw: Any) -> int:
        self.submitted.append(1000 + len(self.submitted))
        return self.submitted[-1]

    def serve_run(self, config: Any, dep: Any, run_id: int, **kw: Any) -> Any:
        from privml.errors import UsageError
        from privml.fl.flower.server_app import SuperLinkLost

        self.resumed.append(kw["resume"])

        def tamper(name: str, received: Message, reply: Message) -> Message | None:
            group = received.metadata.group_id
            if received.metadata.message_type == "train" and group == str(self.lose_at):
                self.lose_at = None
                raise SuperLinkLost("the SuperLink no longer knows this run (it restarted)")
            if received.metadata.message_type == "train" and group == str(self.fail_at):
                self.fail_at = None
                raise UsageError("the coordinator's machine is shutting down")
            return reply

        coordinator = Coordinator(_grid(self.runtimes, tamper=tamper), config)
        return coordinator.run(checkpoint_dir=kw["checkpoint_dir"], resume=kw["resume"])


def _fake(monkeypatch: pytest.MonkeyPatch, fake: _FakeDeployment) -> None:
    import privml.fl.flower.run as run_mod

    monkeypatch.setattr(run_mod, "start_run", fake.start_run)
    monkeypatch.setattr(run_mod, "serve_run", fake.serve_run)


def test_a_lost_superlink_is_reconnected_and_the_run_continues_from_its_checkpoint(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from privml.fl.flower.run import Deployment, run_flower

    cfg = _config(rounds=3)
    fake = _FakeDeployment(demo_runtimes, lose_at=3)
    _fake(monkeypatch, fake)
    out = run_flower(cfg, deployment=Deployment(insecure=True), out_dir=tmp_path / "run")
    clean = Coordinator(_grid(demo_runtimes), cfg).run().result
    np.testing.assert_allclose(out.training.result.params.numpy(), clean.params.numpy(),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert fake.submitted == [1000, 1001] and fake.resumed == [False, True]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["federation"]["resumed_after_round"] == 2
    assert [r["round"] for r in res["rounds"]] == [1, 2, 3]
    # round 2's evaluation was to ride on round 3's messages: asked again after the restart
    assert all(r["accuracy"] is not None for r in res["rounds"])
    assert res["deployment"]["run_id"] == "1001"
    assert not (tmp_path / "run.partial").exists()


def test_flower_resume_continues_an_interrupted_run_and_refuses_a_tampered_checkpoint(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from privml.errors import UsageError
    from privml.fl.flower.run import Deployment, run_flower

    cfg = _config(rounds=3)
    _fake(monkeypatch, _FakeDeployment(demo_runtimes, fail_at=3))
    run_dir = tmp_path / "run"
    with pytest.raises(UsageError, match="shutting down") as exc:
        run_flower(cfg, deployment=Deployment(insecure=True), out_dir=run_dir)
    assert "privml run --engine flower --resume" in "".join(getattr(exc.value, "__notes__", []))
    state = tmp_path / "run.partial" / "checkpoint" / "state.signed"
    good = state.read_bytes()
    # a checkpoint altered in one byte: refused before anything runs (exit 4), nothing written
    bad = bytearray(good)
    bad[-10] ^= 1
    state.write_bytes(bytes(bad))
    code, _, err = cli(capsys, "run", "--engine", "flower", "--resume", run_dir, "--insecure")
    assert code == 4 and "Traceback" not in err and "state.signed" in err, err
    assert not run_dir.exists()
    # the run as it was: continues after round 2 and ends with the uninterrupted model
    state.write_bytes(good)
    fake = _FakeDeployment(demo_runtimes)
    _fake(monkeypatch, fake)
    out = run_flower(cfg, deployment=Deployment(insecure=True), resume=run_dir)
    assert fake.resumed == [True]
    clean = Coordinator(_grid(demo_runtimes), cfg).run().result
    np.testing.assert_allclose(out.training.result.params.numpy(), clean.params.numpy(),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert out.results["federation"]["resumed_after_round"] == 2
    assert all(r["accuracy"] is not None for r in out.results["rounds"])
    assert (run_dir / "results.json").is_file() and not (tmp_path / "run.partial").exists()


def test_a_supernode_back_under_its_node_id_is_checked_again(
    demo_runtimes: dict[str, SiteRuntime],  # noqa: F811
) -> None:
    """With SuperNode authentication a restarted site keeps its node id: hospital_b's node
    goes offline during round 1 and comes back under the same id with another config; it is
    asked again which site it serves, fails the check, and is never sent a round again."""
    from flwr.app import Context, RecordDict

    from privml.fl.flower.client_app import make_client_app

    cfg = _config(rounds=3)
    other = SiteRuntime(_config(rounds=3, lr=1.0), "hospital_b")
    grid_box: list[Any] = []

    def restart_b(name: str, received: Message, reply: Message) -> Message | None:
        grid = grid_box[0]
        if received.metadata.dst_node_id == 101 and received.metadata.group_id == "1":
            grid.offline.add(101)  # killed: no reply, then back with another config
            return None
        return reply

    grid = _grid(demo_runtimes, tamper=restart_b)
    grid_box.append(grid)
    coordinator = Coordinator(grid, cfg, round_timeout=600, liveness_interval=0.05)
    original = coordinator.rejoin

    def rejoin(sites: Any, rnd: int, *, wait: float = 5.0) -> None:
        original(sites, rnd, wait=wait)
        if 101 in grid.offline and rnd >= 2:  # it was seen offline: now it is back
            grid.offline.discard(101)
            ctx = Context(42, 101, {"site": "hospital_b"}, RecordDict(), {})
            grid.nodes[101] = (make_client_app(lambda _ctx: other), ctx)
            original(sites, rnd, wait=wait)

    coordinator.rejoin = rejoin  # type: ignore[method-assign]
    res = coordinator.run().result
    assert coordinator.refused == {101} and coordinator.rejoins == []
    # refused while round 1 still waited for it: that round counts it as failed too
    assert [r.missed for r in res.history] == [{"site_error": [1]}] * 3
    assert not [m for m in grid.sent
                if m.metadata.dst_node_id == 101 and m.metadata.group_id in ("2", "3")]  # fmt: skip


def test_flower_run_flags_override_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import privml.fl.flower.run as run_mod
    from privml.fl.flower.cli import flower_run

    seen: list[tuple[Any, Any]] = []

    def fake_run_flower(cfg: Any, **kw: Any) -> Any:
        seen.append((kw["wait_for_sites"], kw["round_timeout"]))
        raise ConfigError("stop here")

    monkeypatch.setattr(run_mod, "run_flower", fake_run_flower)
    for flags, expect in (({}, (None, None)),
                          ({"wait_for_sites": 7.0, "round_timeout": 9.0}, (7.0, 9.0))):  # fmt: skip
        with pytest.raises(ConfigError):
            flower_run(None, insecure=True, **flags)  # type: ignore[arg-type]
        assert seen[-1] == expect
    # None: the coordinator takes the config's values
    cfg = load_config(None, overrides=["training.round_timeout=33", "training.wait_for_sites=44"])
    c = Coordinator(_grid({}), cfg)
    assert (c.round_timeout, c.wait_for_sites) == (33.0, 44.0)
    c = Coordinator(_grid({}), cfg, round_timeout=5, wait_for_sites=6)
    assert (c.round_timeout, c.wait_for_sites) == (5.0, 6.0)
