"""Robust aggregation in the engine: under 2 of 10 Byzantine sites, the robust rules keep a
useful model where FedAvg collapses."""

from __future__ import annotations

from typing import Any

import pytest

from privml.config import parse_config
from privml.data.federation import FederatedData, load_federation
from privml.fl.engine import TrainingResult, simulate
from privml.models.nets import ModelSpec
from privml.pipeline import model_spec

ROBUST = [
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "norm_bound",
    "fltrust",
    "centered_clip",
]


@pytest.fixture(scope="module")
def bc10() -> tuple[FederatedData, ModelSpec]:
    cfg = parse_config({"data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid"}})
    fed = load_federation(cfg)
    return fed, model_spec(cfg, fed)


def _run(bc10, aggregator: str, attack: dict[str, Any] | None) -> TrainingResult:
    fed, spec = bc10
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid"},
        "training": {"rounds": 10, "local_epochs": 5, "lr": 8.0, "aggregator": aggregator},
    }
    if attack is not None:
        raw["attack"] = attack
    cfg = parse_config(raw)
    return simulate(fed, spec, cfg.training, attack=cfg.attack)


@pytest.fixture(scope="module")
def fedavg_under_sign_flip(bc10) -> float:
    res = _run(bc10, "fedavg", {"kind": "sign_flip", "fraction": 0.2})
    return float(res.metrics["accuracy"])


def test_fedavg_collapses_under_sign_flip(bc10, fedavg_under_sign_flip: float) -> None:
    clean = _run(bc10, "fedavg", None).metrics["accuracy"]
    assert clean > 0.9
    # two sites sending -10x their update turn the average into gradient ascent
    assert fedavg_under_sign_flip < 0.75


@pytest.mark.parametrize("name", ROBUST)
def test_robust_rule_beats_fedavg_under_sign_flip(
    bc10, fedavg_under_sign_flip: float, name: str
) -> None:
    res = _run(bc10, name, {"kind": "sign_flip", "fraction": 0.2})
    acc = res.metrics["accuracy"]
    assert acc > 0.87, (name, acc)
    assert acc > fedavg_under_sign_flip + 0.15, (name, acc, fedavg_under_sign_flip)
    if name in ("krum", "multi_krum", "fltrust"):
        # these selecting rules keep the flipped updates out (Krum's default f = 3 >= 2
        # attackers; FLTrust's trust score of a reversed update is 0). Bulyan's default
        # f = (10 - 3) // 4 = 1 is below the 2 attackers: it lets some in, yet holds.
        assert sum(r.malicious_selected or 0 for r in res.history) == 0, name


@pytest.mark.parametrize("kind", ["scale", "gaussian"])
def test_median_and_multi_krum_hold_under_scale_and_gaussian(bc10, kind: str) -> None:
    attack = {"kind": kind, "fraction": 0.2, **({"sigma": 5.0} if kind == "gaussian" else {})}
    fedavg = _run(bc10, "fedavg", attack).metrics["accuracy"]
    for name in ("median", "multi_krum"):
        acc = _run(bc10, name, attack).metrics["accuracy"]
        assert acc > 0.9 and acc >= fedavg, (kind, name, acc, fedavg)
