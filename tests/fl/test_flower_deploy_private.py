"""Private training over a real Flower deployment on 127.0.0.1: one SuperLink (TLS, SuperNode
and SuperExec authentication) and three ``privml flower supernode`` processes, each with its
own config file naming its own ledger.

Two sets of SuperNodes take turns on the SuperLink: sample-level DP with a simulated attacker
(sign flip) under the median rule, and client-level DP under Paillier secure aggregation. Every
process runs with the test-only reproducible-noise switch, so the deployment's model and
epsilon can be compared with the simulation's. A rogue coordinator replays a round against a
site until the site's budget refuses it. Every process started here is stopped by a finalizer.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privml.config import load_config
from privml.dp.cli import ledger_from_config
from privml.dp.randomness import ENV_VAR
from privml.fl.flower.certs import DeploymentKeys, generate_certificates
from privml.fl.flower.processes import (
    free_port,
    start_process,
    stop_process,
    stop_processes,
    superlink_command,
    wait_for_port,
)
from tests.fl.test_flower_deploy import SITES, _privml

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::privml.errors.InsecureOptionWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

SETUPS = {
    "sample+attack": """
[privacy]
mode = "sample"
epsilon = 3.0
budget_epsilon = 12.0
ledger = "LEDGER"

[attack]
kind = "sign_flip"
sites = ["hospital_b"]
""",
    "client+paillier": """
[privacy]
mode = "client"
epsilon = 3.0
ledger = "LEDGER"
""",
}
TRAINING = {
    "sample+attack": 'aggregator = "median"\n',
    "client+paillier": 'lr = 2.0\nsecure_aggregation = "paillier"\n'
    "secure_aggregation_key_bits = 2048\n",
}


@dataclass
class Link:
    root: Path
    keys: DeploymentKeys
    superlink: str
    home: Path
    logs: Path
    setup: str | None = None
    nodes: list[Any] = field(default_factory=list)

    def config(self, setup: str, party: str) -> Path:
        """The config file of ``party`` (a site, or the coordinator) for ``setup``."""
        demo = (Path(__file__).parents[2] / "src/privml/data/demo/demo.toml").read_text()
        text = demo.replace("rounds = 20", "rounds = 3").replace(
            "encrypted = true", "encrypted = false"
        )
        text = text.replace("lr = 8.0\n", "lr = 8.0\n" if "lr" not in TRAINING[setup] else "")
        text = text.replace("seed = 0\n", "seed = 0\n" + TRAINING[setup])
        ledger = self.root / setup / f"ledger-{party}.sqlite"
        ledger.parent.mkdir(exist_ok=True)
        path = self.root / setup / f"{party}.toml"
        path.write_text(text + SETUPS[setup].replace("LEDGER", str(ledger)))
        return path

    def stop_nodes(self) -> None:
        stop_processes(self.nodes)
        self.nodes = []

    def use(self, setup: str) -> None:
        """Serve ``setup``'s sites: one SuperNode per site, each with its own config."""
        if self.setup == setup:
            return
        self.stop_nodes()
        for site in SITES:
            args = ["flower", "supernode", "--site", site, "--config",
                    str(self.config(setup, site)), "--superlink", self.superlink,
                    "--root-certificates", str(self.keys.ca_cert), "--auth-key",
                    str(self.keys.supernode_keys[site][0]), "--home", str(self.home)]  # fmt: skip
            log = (self.logs / f"{setup}-{site}.log").open("wb")
            self.nodes.append(start_process(_privml(*args), home=self.home, log=log))
        self.setup = setup

    def text(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.logs.iterdir()))  # fmt: skip


@pytest.fixture(scope="module")
def link(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Link]:
    root = tmp_path_factory.mktemp("flower-private")
    logs = root / "logs"
    logs.mkdir()
    keys = generate_certificates(root / "certs", sites=SITES)
    home = root / "flwr-home"
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, "1")  # every process of the deployment, and this one
        sl = start_process(
            superlink_command(port=port, certs=keys.folder, enable_supernode_auth=True),
            home=home, log=(logs / "superlink.log").open("wb"),
        )  # fmt: skip
        out = Link(root, keys, superlink, home, logs)

        def stop_all() -> None:
            out.stop_nodes()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sl.pid, signal.SIGTERM)
            stop_process(sl)

        request.addfinalizer(stop_all)
        wait_for_port("127.0.0.1", port, timeout=300, proc=sl)
        from privml.fl.flower.run import register_supernode

        for site in SITES:
            register_supernode(
                keys.supernode_keys[site][1], superlink=superlink, root_certificates=keys.ca_cert
            )
        yield out


def _deployment(link: Link) -> Any:
    from privml.fl.flower.run import Deployment

    return Deployment(link.superlink, link.keys.ca_cert, link.keys.superexec_secret)


def _history(cfg_path: Path, site: str) -> list[tuple[str, float, float]]:
    """What ``site`` booked in its own ledger (label, epsilon, delta)."""
    from privml.fl.flower.site import SiteRuntime

    rt = SiteRuntime(load_config(cfg_path), site)
    fps, hashes = rt._records()
    ledger = ledger_from_config(rt.config, fingerprints=fps, records=hashes)
    return [(h.label, h.epsilon, h.delta) for h in ledger.history(site)]


def _run_both(link: Link, setup: str, tmp_path: Path) -> tuple[Any, Any]:
    from privml.fl.flower.run import run_flower
    from privml.pipeline import run as run_simulation

    link.use(setup)
    cfg = load_config(link.config(setup, "coordinator"))
    try:
        flower = run_flower(cfg, deployment=_deployment(link), out_dir=tmp_path / "run",
                            wait_for_sites=300, round_timeout=120)  # fmt: skip
    except Exception:
        print(link.text())
        raise
    sim = run_simulation(load_config(link.config(setup, "simulation")), write=False)
    return flower, sim


def _check_equal(flower: Any, sim: Any) -> None:
    np.testing.assert_allclose(flower.training.result.params.numpy(),
                               sim.training.params.numpy(), rtol=1e-5, atol=1e-5)  # fmt: skip
    fp, sp = flower.results["privacy"], sim.results["privacy"]
    assert fp["mode"] == sp["mode"] and fp["reproducible_noise"]
    assert fp["epsilon"] == pytest.approx(sp["epsilon"], rel=1e-9)
    assert fp["epsilon_per_site"] == pytest.approx(sp["epsilon_per_site"], rel=1e-9)
    assert [r["accuracy"] for r in flower.results["rounds"]] == [
        r["accuracy"] for r in sim.results["rounds"]
    ]


def test_sample_level_dp_with_an_attacker_equals_the_simulation(link: Link, tmp_path: Path) -> None:
    flower, sim = _run_both(link, "sample+attack", tmp_path)
    _check_equal(flower, sim)
    assert (
        flower.results["privacy"]["epsilon_by_round"] == sim.results["privacy"]["epsilon_by_round"]
    )
    assert flower.results["attack"]["sites"] == ["hospital_b"]
    assert [r["malicious"] for r in flower.results["rounds"]] == [1, 1, 1]
    # each site booked in its own ledger what the simulation booked for it; nobody else did
    sim_cfg = link.config("sample+attack", "simulation")
    for site in SITES:
        mine = _history(link.config("sample+attack", site), site)
        assert [h[0] for h in mine] == ["dp-sgd input centring"] + [
            f"dp-sgd round {r}" for r in (1, 2, 3)
        ]
        theirs = _history(sim_cfg, site)
        assert [(h[0], h[2]) for h in mine] == [(h[0], h[2]) for h in theirs]
        assert [h[1] for h in mine] == pytest.approx([h[1] for h in theirs], rel=1e-12)
    assert not (link.root / "sample+attack" / "ledger-coordinator.sqlite").exists()


class _Refused(Exception):
    def __init__(self, answers: list[Any]) -> None:
        super().__init__("the site refused")
        self.answers = answers


def test_a_rogue_coordinator_cannot_spend_beyond_a_sites_budget(
    link: Link, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator sets up a run, then replays round 1 against one site until the site's
    own budget refuses; the refused round books nothing and sends no update."""
    from flwr.app import MessageType

    from privml.fl.flower import run as flower_run
    from privml.fl.flower.server_app import Coordinator

    class Rogue(Coordinator):
        def run(self, **_: Any) -> Any:
            sites, _encoder, _task = self.handshake()
            self.ask_all(sites, "private")
            target = sites[0]
            params = np.zeros(31, dtype=np.float32)
            answers = []
            for i in range(60):
                content = self._request(params, round=1, evaluate=False, asked=3)
                msg = self._message(target.node_id, MessageType.TRAIN, content, f"rogue-{i}")
                reply = self.exchange([msg], timeout=120)[target.node_id]
                answers.append(reply.error.reason if reply.has_error() else
                               reply.content.config_records["result"]["epsilon"])  # fmt: skip
                if reply.has_error():
                    assert not reply.has_content()
                    raise _Refused(answers)
            raise AssertionError(f"the site never refused: {answers[-3:]}")

    link.use("sample+attack")
    cfg_path = link.config("sample+attack", SITES[0])
    monkeypatch.setattr(flower_run, "Coordinator", Rogue)
    with pytest.raises(_Refused) as refused:
        coordinator = load_config(link.config("sample+attack", "coordinator"))
        flower_run.run_flower(coordinator, deployment=_deployment(link), write=False,
                              wait_for_sites=300)  # fmt: skip
    answers = refused.value.answers
    *booked, reason = answers
    assert len(booked) >= 2 and "BudgetExceededError" in reason and "hospital_a" in reason
    assert booked == sorted(booked)  # each replay was booked again: epsilon kept growing
    history = _history(cfg_path, SITES[0])
    spent = sum(e for _, e, _ in history)
    assert spent <= 12.0 + 1e-9  # never beyond the site's budget
    # the refused round left no trace: the last charge is the last answered replay
    assert history[-1][0] == "dp-sgd round 1"
    assert sum(1 for h in history if h[0] == "dp-sgd round 1") >= len(booked)


def test_client_level_dp_under_paillier_equals_the_simulation(link: Link, tmp_path: Path) -> None:
    flower, sim = _run_both(link, "client+paillier", tmp_path)
    _check_equal(flower, sim)
    assert flower.results["federation"]["secure_aggregation"]["scheme"] == "paillier"
    assert flower.results["federation"]["aggregator"] == "dp-fedavg"
    for site in SITES:
        assert [h[0] for h in _history(link.config("client+paillier", site), site)] == [
            "dp-fedavg run (client level)"
        ]
