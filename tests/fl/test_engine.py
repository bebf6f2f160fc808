"""The simulation engine: every aggregator and server optimizer wired in, sampling, dropouts and
stragglers, FedProx, validation of incoming updates, attacks, and config validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from privml.config import TrainingConfig, parse_config
from privml.data.federation import FederatedData, SiteData, load_federation
from privml.errors import ConfigError, UsageError
from privml.fl import aggregate as agg
from privml.fl.engine import simulate
from privml.fl.metrics import evaluate, per_site_metrics, pooled_metrics
from privml.fl.plan import init_params
from privml.fl.stages.aggregate import ServerPlan, aggregate_round, init_server_state
from privml.fl.stages.attack import attacker_indices
from privml.fl.stages.cohort import UniformCohort
from privml.fl.stages.local import LocalTraining
from privml.models.nets import ModelSpec, build_model, flat_params
from privml.models.training import Batch, MeanGradient
from privml.pipeline import model_spec

BASE_TRAINING = {"rounds": 4, "local_epochs": 2, "lr": 8.0, "batch_size": 32}


def _cfg(training: dict[str, Any] | None = None, attack: dict[str, Any] | None = None, **data: Any):
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid", **data},
        "training": {**BASE_TRAINING, **(training or {})},
    }
    if attack is not None:
        raw["attack"] = attack
    return parse_config(raw)


@pytest.fixture(scope="module")
def bc10() -> tuple[FederatedData, ModelSpec]:
    cfg = _cfg()
    fed = load_federation(cfg)
    return fed, model_spec(cfg, fed)


def _run(bc10: tuple[FederatedData, ModelSpec], training=None, attack=None, **kw: Any):
    fed, spec = bc10
    cfg = _cfg(training, attack)
    return simulate(fed, spec, cfg.training, attack=cfg.attack, **kw)


# --------------------------------------------------------------------------------------------
# Every aggregator and server optimizer runs in the engine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(agg.AGGREGATORS))
def test_each_aggregator_trains_a_useful_model(bc10, name: str) -> None:
    res = _run(bc10, {"aggregator": name, "rounds": 5})
    acc = res.metrics["accuracy"]
    # the majority class alone scores about 0.63 on these test records; after 5 rounds at
    # lr 8 the accuracy still swings by a few points from round to round, the AUC does not
    assert acc > 0.8 and res.metrics["auc"] > 0.95, (name, acc, res.metrics["auc"])
    assert res.extra["federation"]["aggregator"] == name
    assert len(res.history) == 5 and all(r.skipped is None for r in res.history)
    if name in ("krum", "multi_krum", "bulyan", "fltrust"):
        assert all(r.selected is not None and r.selected >= 1 for r in res.history)
    if name == "fltrust":
        root = res.extra["federation"]["fltrust_root"]
        assert root["records"] == 20
        fed, _ = bc10
        assert root["site"] == max(fed.sites, key=lambda s: s.n_train).name


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "yogi", "adagrad"])
def test_each_server_optimizer_trains(bc10, opt: str) -> None:
    # adaptive server optimizers step ~server_lr per coordinate: a gentler local lr suits them
    settings = {
        "sgd": {"server_lr": 1.0, "rounds": 6},
        "momentum": {"server_lr": 0.5, "server_optimizer_params": {"momentum": 0.5}, "rounds": 6},
    }.get(opt, {"server_lr": 1.0, "lr": 2.0, "rounds": 10})
    res = _run(bc10, {"server_optimizer": opt, **settings})
    assert res.metrics["accuracy"] > 0.85, (opt, res.metrics["accuracy"])
    used = res.extra["federation"]["server_optimizer"]
    assert used["kind"] == opt and used["lr"] == settings["server_lr"]


def test_fedavg_round_equals_the_weighted_mean_step(bc10) -> None:
    """One engine round = params + weighted mean of the sites' updates (server sgd, lr 1)."""
    fed, spec = bc10
    training = _cfg({"rounds": 1}).training
    res = simulate(fed, spec, training)
    model, p0 = init_params(spec, training.seed)
    local = LocalTraining(fed.sites, training, MeanGradient(model, spec, binary=True))
    ups = local(1, p0, np.arange(10))
    w = np.array([s.n_train for s in fed.sites], dtype=np.float64)
    expect = p0.numpy().astype(np.float64) + (w / w.sum()) @ ups
    np.testing.assert_allclose(res.params.numpy(), expect, rtol=0, atol=1e-6)


def test_fedprox_pulls_local_models_towards_the_global_one(bc10) -> None:
    fed, spec = bc10
    model, p0 = init_params(spec, 0)
    rule = MeanGradient(model, spec, binary=True)
    norms = []
    for mu in (None, 0.01, 0.05):  # lr 8: lr * mu must stay < 2
        strategy = {"strategy": "fedprox", "prox_mu": mu} if mu else {}
        training = _cfg({"local_epochs": 5, **strategy}).training
        ups = LocalTraining(fed.sites, training, rule)(1, p0, np.arange(10))
        norms.append(np.linalg.norm(ups, axis=1).mean())
    assert norms[0] > norms[1] > norms[2]
    assert norms[2] < 0.6 * norms[0]
    res = _run(bc10, {"strategy": "fedprox", "prox_mu": 0.005, "rounds": 8})
    assert res.extra["federation"]["prox_mu"] == 0.005
    assert res.metrics["accuracy"] > 0.85
    assert _run(bc10, {"strategy": "fedprox"}).extra["federation"]["prox_mu"] == 0.01


# --------------------------------------------------------------------------------------------
# Sampling, dropouts, stragglers
# --------------------------------------------------------------------------------------------


def _cohort(n: int, t: TrainingConfig) -> UniformCohort:
    return UniformCohort.from_training(n, t)


def test_clients_per_round_and_fraction_sample_that_many_sites() -> None:
    t = TrainingConfig(clients_per_round=4, seed=3)
    seen: set[int] = set()
    for rnd in range(1, 41):
        p = _cohort(10, t)(rnd)
        assert len(p.sampled) == 4 and len(set(p.sampled.tolist())) == 4
        assert list(p.sampled) == sorted(p.sampled)
        np.testing.assert_array_equal(p.participants, p.sampled)
        np.testing.assert_array_equal(p.sampled, _cohort(10, t)(rnd).sampled)  # seeded
        seen |= set(p.sampled.tolist())
    assert seen == set(range(10))  # every site gets its turn over 40 rounds
    assert len(_cohort(10, TrainingConfig(fraction=0.25))(1).sampled) == 3  # round(2.5)
    assert len(_cohort(10, TrainingConfig(fraction=0.01))(1).sampled) == 1
    assert len(_cohort(3, TrainingConfig(clients_per_round=50))(1).sampled) == 3
    other = TrainingConfig(clients_per_round=4, seed=4)
    assert any(
        not np.array_equal(
            _cohort(10, t)(r).sampled,
            _cohort(10, other)(r).sampled,
        )
        for r in range(1, 6)
    )


def test_dropouts_and_stragglers_follow_their_probabilities() -> None:
    t = TrainingConfig(dropout=0.3, straggler=0.2, seed=1)
    n, rounds = 50, 200
    drops = strag = 0
    for rnd in range(1, rounds + 1):
        p = _cohort(n, t)(rnd)
        assert not set(p.dropped.tolist()) & set(p.stragglers.tolist())
        part = set(p.participants.tolist())
        assert part == set(p.sampled.tolist()) - set(p.dropped.tolist()) - set(
            p.stragglers.tolist()
        )
        drops += len(p.dropped)
        strag += len(p.stragglers)
    # binomial tests: dropouts ~ Bin(n*rounds, 0.3); stragglers ~ Bin(remaining, 0.2)
    assert stats.binomtest(drops, n * rounds, 0.3).pvalue > 0.01
    assert stats.binomtest(strag, n * rounds - drops, 0.2).pvalue > 0.01
    assert stats.binomtest(drops, n * rounds, 0.4).pvalue < 1e-6


def test_engine_counts_dropouts_and_stragglers_and_skips_empty_rounds(bc10) -> None:
    res = _run(bc10, {"clients_per_round": 3, "dropout": 0.5, "straggler": 0.5, "rounds": 12})
    h = res.history
    assert all(r.sampled == 3 and r.clients == 3 - r.dropped - r.stragglers for r in h)
    up = res.extra["updates"]
    assert up["dropped"] == sum(r.dropped for r in h) > 0
    assert up["stragglers"] == sum(r.stragglers for r in h) > 0
    empty = [r.round for r in h if r.clients == 0]
    assert [r.round for r in h if r.skipped == "no_updates"] == empty
    assert up["skipped_rounds"].get("no_updates", []) == empty


def test_cohort_training_only_stacks_the_sampled_clients(bc10) -> None:
    """Memory follows the cohort: the local rule only ever sees [cohort, P] parameters."""
    fed, spec = bc10
    model = build_model(spec)
    inner = MeanGradient(model, spec, binary=True)
    shapes: set[tuple[int, ...]] = set()

    def rule(params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        shapes.add(tuple(params.shape))
        return inner(params, batch, step)

    cfg = _cfg({"clients_per_round": 2})
    simulate(fed, spec, cfg.training, rule=rule)
    assert {s[0] for s in shapes} == {2}


# --------------------------------------------------------------------------------------------
# Validation of incoming updates
# --------------------------------------------------------------------------------------------


def _plan(**training: Any) -> ServerPlan:
    return ServerPlan.from_training(TrainingConfig(**training))


def test_aggregate_round_rejects_bad_updates_and_never_averages_them() -> None:
    plan = _plan(max_update_norm=5.0)
    state = init_server_state(np.zeros(4, dtype=np.float32), plan)
    good = [np.array([1.0, 0, 0, 0]), np.array([0.0, 2, 0, 0])]
    nan = np.array([np.nan, 0, 0, 0])
    big = np.array([100.0, 0, 0, 0])
    ups: list[object] = [good[0], nan, big, np.zeros(3), good[1], np.arange(4), [1.0] * 4, good[0]]
    weights: list[object] = [1, 1, 1, 1, 3, 1, 1, -2]
    out = aggregate_round(state, ups, weights, plan=plan)
    assert out.accepted == [0, 4]
    assert dict(out.rejected) == {
        1: "non_finite",
        2: "norm",
        3: "shape",
        5: "dtype",
        6: "type",
        7: "weight",
    }
    assert out.counts["by_reason"] == {
        "type": 1,
        "dtype": 1,
        "shape": 1,
        "non_finite": 1,
        "norm": 1,
        "weight": 1,
    }
    np.testing.assert_allclose(out.state.params, [0.25, 1.5, 0, 0])  # (1*g0 + 3*g1) / 4
    assert out.state.round == 1 and out.skipped is None
    everything_bad = aggregate_round(out.state, [nan, big], [1, 1], plan=plan)
    assert everything_bad.skipped == "all_rejected"
    np.testing.assert_array_equal(everything_bad.state.params, out.state.params)
    assert everything_bad.state.round == 2
    assert aggregate_round(state, [], [], plan=plan).skipped == "no_updates"
    with pytest.raises(UsageError, match="'weights'"):
        aggregate_round(state, good, [1], plan=plan)


def test_aggregate_round_skips_rounds_the_rule_cannot_aggregate() -> None:
    plan = _plan(aggregator="krum", aggregator_params={"f": 1})
    assert plan.min_updates == 5
    state = init_server_state(np.zeros(3, dtype=np.float32), plan)
    ups = np.random.default_rng(0).normal(size=(4, 3))
    out = aggregate_round(state, ups, np.ones(4), plan=plan)
    assert out.skipped == "too_few_updates" and out.update is None
    out5 = aggregate_round(state, np.vstack([ups, ups[:1]]), np.ones(5), plan=plan)
    assert out5.skipped is None and out5.selected is not None and len(out5.selected) == 1
    fl = _plan(aggregator="fltrust")
    with pytest.raises(UsageError, match="server_update"):
        aggregate_round(
            init_server_state(np.zeros(3, dtype=np.float32), fl), ups, np.ones(4), plan=fl
        )


def test_engine_rejects_nan_and_oversized_updates_and_counts_them(bc10) -> None:
    """A rule that makes site 0's update NaN, and scale-x50 attackers over max_update_norm."""
    fed, spec = bc10
    model = build_model(spec)
    inner = MeanGradient(model, spec, binary=True)

    def poisoned(params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        g = inner(params, batch, step)
        if params.shape[0] == 10:  # whole federation: site 0 is row 0
            g[0] = float("nan")
        return g

    cfg = _cfg({"max_update_norm": 20.0}, attack={"kind": "scale", "sites": [3, 7], "scale": 50})
    res = simulate(fed, spec, cfg.training, attack=cfg.attack, rule=poisoned)
    up = res.extra["updates"]
    assert up["by_reason"]["non_finite"] == 4  # site 0, each of 4 rounds
    assert up["by_reason"]["norm"] == 8  # two attackers x 4 rounds
    assert up["rejected"] == 12 == res.rejected_updates and up["accepted"] == 4 * 7
    assert all(r.rejected == 3 for r in res.history)
    assert np.isfinite(res.params.numpy()).all()
    assert res.metrics["accuracy"] > 0.85


# --------------------------------------------------------------------------------------------
# Attacks
# --------------------------------------------------------------------------------------------


def test_attack_section_and_attacker_choice(bc10) -> None:
    fed, _ = bc10
    names = [s.name for s in fed.sites]
    res = _run(bc10, attack={"kind": "sign_flip", "fraction": 0.2, "scale": 3})
    a = res.extra["attack"]
    assert a["kind"] == "sign_flip" and a["type"] == "update" and a["n_malicious"] == 2
    assert a["params"] == {"scale": 3.0} and set(a["sites"]) <= set(names)
    assert all(r.malicious == 2 for r in res.history)
    cfg = _cfg(attack={"kind": "alie", "sites": [names[4], 1]})
    assert attacker_indices(cfg.attack, names, 0).tolist() == [1, 4]
    assert _run(bc10, attack={"kind": "alie", "sites": [1, 4]}).extra["attack"]["params"] == {
        "z": None
    }
    with pytest.raises(ConfigError, match="no site named 'nope'"):
        attacker_indices(_cfg(attack={"kind": "ipm", "sites": ["nope"]}).attack, names, 0)
    with pytest.raises(ConfigError, match="rounds to no attacker"):
        attacker_indices(_cfg(attack={"kind": "ipm", "fraction": 0.01}).attack, names, 0)


def test_label_flip_poisons_only_the_attackers_training_labels(bc10) -> None:
    fed, spec = bc10
    y_before = [s.y_train.copy() for s in fed.sites]
    clean = _run(bc10, {"rounds": 6})
    # 4 of 10 sites flipping every label drag the model well below the clean one
    flipped = _run(bc10, {"rounds": 6}, attack={"kind": "label_flip", "sites": [0, 1, 2, 3]})
    for s, y in zip(fed.sites, y_before, strict=True):
        np.testing.assert_array_equal(s.y_train, y)  # the caller's data is untouched
    assert flipped.extra["attack"]["type"] == "data"
    assert flipped.metrics["accuracy"] < clean.metrics["accuracy"] - 0.05
    # the flipped sites' per-site evaluation still uses their true test labels
    assert flipped.metrics["per_site"][fed.sites[0].name]["n"] == fed.sites[0].n_test


# --------------------------------------------------------------------------------------------
# Config validation (collected into one ConfigError)
# --------------------------------------------------------------------------------------------


def _problems(raw_training: dict[str, Any], attack: dict[str, Any] | None = None, **data: Any):
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid", **data},
        "training": raw_training,
    }
    if attack is not None:
        raw["attack"] = attack
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    return str(exc.value)


def test_config_collects_every_federation_problem() -> None:
    msg = _problems(
        {
            "aggregator": "trimmed_mean",
            "aggregator_params": {"beta": 0.7, "f": 1},
            "clients_per_round": 3,
            "fraction": 0.5,
            "prox_mu": 0.1,
            "server_optimizer": "adam",
            "server_optimizer_params": {"beta_1": 2.0},
        }
    )
    for needle in (
        "'beta'",
        "Unknown parameter 'f'",
        "clients_per_round or fraction",
        "prox_mu is used only",
        "'beta_1'",
    ):
        assert needle in msg, needle
    assert "one of" in _problems({"aggregator": "avg"})
    assert "server_lr" in _problems({"server_optimizer_params": {"lr": 1.0}})
    assert "diverges" in _problems({"strategy": "fedprox", "prox_mu": 0.5, "lr": 8.0})
    assert "root_size" in _problems(
        {"aggregator": "fltrust", "aggregator_params": {"root_size": 0}}
    )
    # krum with f = 2 needs 7 clients per round; this config samples 5
    assert "needs at least 7" in _problems(
        {"aggregator": "krum", "aggregator_params": {"f": 2}, "clients_per_round": 5}
    )
    assert "needs at least 5" in _problems({"aggregator": "trimmed_mean"}, n_sites=3)
    amsg = _problems({}, attack={"kind": "sign_flip", "sites": [1], "fraction": 0.2, "sigma": 1})
    assert "exactly one" in amsg and "Unknown parameter 'sigma'" in amsg
    assert "> 0" in _problems({}, attack={"kind": "scale", "fraction": 0.2, "scale": -1})
    assert "outside" in _problems({}, attack={"kind": "scale", "sites": [12]})
    assert "omniscient attacker" in _problems(
        {"engine": "flower"}, attack={"kind": "ipm", "fraction": 0.2}
    )
    ok = _cfg({"aggregator": "fltrust", "aggregator_params": {"root_size": 10, "root_site": "x"}})
    plan = ServerPlan.from_training(ok.training)
    assert plan.aggregator_params == {} and plan.server_data == {"root_size": 10, "root_site": "x"}


def test_fltrust_root_settings_are_checked_against_the_data(bc10) -> None:
    fed, _ = bc10
    with pytest.raises(ConfigError, match="more than 500"):
        _run(bc10, {"aggregator": "fltrust", "aggregator_params": {"root_size": 500}})
    name = fed.sites[2].name
    with pytest.raises(ConfigError, match="simulated attacker"):
        _run(
            bc10,
            {"aggregator": "fltrust", "aggregator_params": {"root_site": name}},
            attack={"kind": "sign_flip", "sites": [2]},
        )
    res = _run(bc10, {"aggregator": "fltrust", "aggregator_params": {"root_site": name}})
    assert res.extra["federation"]["fltrust_root"] == {"site": name, "records": 20}


# --------------------------------------------------------------------------------------------
# Per-site evaluation
# --------------------------------------------------------------------------------------------


def _sklearn_metrics(model, params, X, y) -> dict:
    """Independent reference: torch losses and scikit-learn's AUC and F1."""
    import torch.nn.functional as F
    from sklearn.metrics import f1_score, roc_auc_score

    from privml.models.nets import functional_forward

    if len(y) == 0:
        return {"n": 0, "loss": None, "accuracy": None, "auc": None, "f1": None}
    with torch.no_grad():
        logits = functional_forward(model)(params, torch.from_numpy(X))
    yt = torch.from_numpy(y)
    if logits.shape[1] == 1:
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], yt.float()).item()
        scores = torch.sigmoid(logits[:, 0]).numpy()
        pred = (scores >= 0.5).astype(np.int64)
        auc = roc_auc_score(y, scores) if len(np.unique(y)) == 2 else None
        f1 = f1_score(y, pred, zero_division=0)
    else:
        loss = F.cross_entropy(logits, yt).item()
        scores = torch.softmax(logits, dim=1).numpy()
        pred = scores.argmax(axis=1)
        k = scores.shape[1]
        auc = (
            roc_auc_score(y, scores, multi_class="ovr", labels=np.arange(k))
            if len(np.unique(y)) == k
            else None
        )
        f1 = f1_score(y, pred, average="macro", zero_division=0)
    return {"n": len(y), "loss": loss, "accuracy": float((pred == y).mean()), "auc": auc,
            "f1": float(f1)}


@pytest.mark.parametrize("n_outputs", [1, 4])
def test_per_site_metrics_equal_evaluate(n_outputs: int) -> None:
    rng = np.random.default_rng(n_outputs)
    spec = ModelSpec("logistic", 6, n_outputs)
    torch.manual_seed(0)
    model = build_model(spec)
    params = flat_params(model) * 3
    k = max(n_outputs, 2)
    sites = []
    for i, n in enumerate([0, 1, 7, 40, 40, 25]):
        X = rng.random((n, 6)).astype(np.float32)
        y = rng.integers(0, k, size=n).astype(np.int64)
        if i == 5:
            y[:] = 0  # a single class: no AUC
        sites.append(SiteData(f"s{i}", X, y, X, y))
    got = per_site_metrics(model, params, sites)
    X_all = np.concatenate([s.X_test for s in sites])
    y_all = np.concatenate([s.y_test for s in sites])
    got["pooled"] = pooled_metrics(model, params, X_all, y_all)
    pooled = SiteData("pooled", X_all, y_all, X_all, y_all)
    for s in [*sites, pooled]:
        want = _sklearn_metrics(model, params, s.X_test, s.y_test)
        assert evaluate(model, params, s.X_test, s.y_test)["accuracy"] == want["accuracy"]
        g = got[s.name]
        assert g["n"] == want["n"] and g["accuracy"] == want["accuracy"], s.name
        for key in ("loss", "auc", "f1"):
            if want[key] is None:
                assert g[key] is None, (s.name, key)
            else:
                assert g[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (s.name, key)
