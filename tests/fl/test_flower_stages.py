"""The round engine's stages on Flower: a simulated attacker and secure aggregation run at the
SuperNodes (over the in-memory grid) and give the simulation's model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from privml.config import load_config, parse_config
from privml.data.federation import load_federation
from privml.fl.engine import simulate
from privml.fl.flower.client_app import make_client_app
from privml.fl.flower.server_app import Coordinator
from privml.fl.flower.site import SiteRuntime, site_names
from privml.pipeline import model_spec
from tests.fl.fake_grid import FakeGrid

pytestmark = pytest.mark.filterwarnings("ignore::privml.errors.InsecureOptionWarning")


@pytest.fixture(autouse=True)
def task_identity() -> Iterable[None]:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 42, 0
    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None  # type: ignore[assignment]


def _config(training: dict[str, Any], attack: dict[str, Any] | None = None) -> Any:
    raw = load_config(None).resolved()
    raw["training"].update({"rounds": 3, **training})
    raw["inference"]["encrypted"] = False
    if attack is not None:
        raw["attack"] = attack
    return parse_config(raw)


def _flower(cfg: Any) -> tuple[Any, FakeGrid]:
    nodes = {}
    for i, name in enumerate(site_names(cfg)):
        rt = SiteRuntime(cfg, name)
        app = make_client_app(lambda _ctx, _rt=rt: _rt)
        nodes[100 + i] = (app, Context(42, 100 + i, {"site": name}, RecordDict(), {}))
    grid = FakeGrid(nodes)
    return Coordinator(grid, cfg).run().result, grid


def _simulate(cfg: Any) -> Any:
    fed = load_federation(cfg)
    return simulate(fed, model_spec(cfg, fed), cfg.training, attack=cfg.attack)


@pytest.mark.parametrize(
    "attack",
    [{"kind": "sign_flip", "sites": ["hospital_b"], "scale": 4.0},
     {"kind": "gaussian", "sites": [2]},
     {"kind": "label_flip", "sites": ["hospital_a"]}],
)  # fmt: skip
def test_a_simulated_attacker_attacks_from_its_own_supernode(attack: dict[str, Any]) -> None:
    cfg = _config({"aggregator": "median"}, attack)
    flower, _ = _flower(cfg)
    sim = _simulate(cfg)
    np.testing.assert_allclose(flower.params.numpy(), sim.params.numpy(), rtol=0, atol=1e-5)
    assert [r.malicious for r in flower.history] == [r.malicious for r in sim.history] == [1] * 3
    assert flower.extra["attack"]["sites"] == sim.extra["attack"]["sites"]
    clean = _simulate(_config({"aggregator": "median"}))
    assert float((clean.params - sim.params).abs().max()) > 1e-3  # the attack did something


@pytest.mark.parametrize("scheme", ["paillier", "ckks"])
def test_secure_aggregation_over_flower_messages(scheme: str) -> None:
    cfg = _config({"secure_aggregation": scheme, "secure_aggregation_key_bits": 2048,
                   "max_update_norm": 5.0, "key_holder": "hospital_b"})  # fmt: skip
    flower, grid = _flower(cfg)
    sim = _simulate(cfg)
    np.testing.assert_allclose(flower.params.numpy(), sim.params.numpy(), rtol=0,
                               atol=1e-5 if scheme == "paillier" else 2e-4)  # fmt: skip
    info = flower.extra["federation"]["secure_aggregation"]
    assert info["scheme"] == scheme and info["key_holder"] == "hospital_b"
    # what the server received from the sites: ciphertexts, never an update
    replies = [m for m in _replies(grid) if m.metadata.message_type == "train"]
    assert len(replies) == 9
    for m in replies:
        result = m.content.config_records["result"]
        assert "update" not in result and "update" not in m.content.array_records
    # only the key holder was asked to decrypt, once per round, sums of 3
    asks = [m for m in grid.sent if m.metadata.message_type == "query"]
    decrypts = [m for m in asks if m.content.config_records["settings"].get("service") == "decrypt"]
    assert len(decrypts) == 3 and {m.metadata.dst_node_id for m in decrypts} == {101}
    assert all(m.content.config_records["settings"]["n"] == 3 for m in decrypts)


def _replies(grid: FakeGrid) -> list[Message]:
    return list(grid.delivered)
