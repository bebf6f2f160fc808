"""Private training end to end: calibration, booking, refusals, client level, features."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting import NeighboringRelation
from dp_accounting.pld import PLDAccountant

from privml.cli import main
from privml.config import load_config, parse_config
from privml.data.federation import load_federation
from privml.dp.cli import ledger_from_config
from privml.dp.events import event_from_dict
from privml.dp.features import HogFeatures
from privml.dp.ledger import PrivacyLedger
from privml.dp.planning import check_dp_schema, dp_fedavg_aggregate
from privml.errors import BudgetExceededError, ConfigError, PrivacyLeakWarning, SchemaError
from privml.fl import training as tr
from privml.fl.metrics import evaluate
from privml.fl.stages.private import fold_shift
from privml.fl.training import train as train_private
from privml.models.nets import ModelSpec, build_model, flat_params, functional_forward
from privml.pipeline import model_spec, run


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Any:
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 2, "partition": "hospitals"},
        "model": {"kind": "logistic"},
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 64, "lr": 2.0},
        "privacy": {"mode": "sample", "epsilon": 1.0, "ledger": str(tmp_path / "l.sqlite")},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_config(raw)


def _ledger(cfg: Any) -> PrivacyLedger:
    """The ledger the run books in, keyed by the fingerprints of the sites' records."""
    return ledger_from_config(cfg)


def _train(cfg: Any) -> tr.Trained:
    fed = load_federation(cfg)
    return train_private(cfg, fed, model_spec(cfg, fed))


def test_calibrated_run_ends_within_one_percent_below_target_and_is_booked(
    tmp_path: Path,
) -> None:
    cfg = _config(tmp_path)
    out = _train(cfg)
    priv = out.privacy
    assert priv["mode"] == "sample" and priv["accountant"] == "pld" and priv["delta"] == 1e-5
    ledger = _ledger(cfg)
    for site, eps in priv["epsilon_per_site"].items():
        assert 0.99 <= eps <= 1.0
        hist = ledger.history(site)
        # centring epoch + one charge per round, booked in order; delta exactly once
        assert [h.label for h in hist] == [
            "dp-sgd input centring",
            "dp-sgd round 1",
            "dp-sgd round 2",
        ]
        assert math.fsum(h.epsilon for h in hist) == pytest.approx(eps, rel=1e-12)
        assert [h.delta for h in hist] == [1e-5, 0.0, 0.0]
        ps = priv["per_site"][site]
        assert sum(h.metadata["steps"] for h in hist) == ps["steps"]
        assert all(h.metadata["noise_multiplier"] == ps["noise_multiplier"] for h in hist)
    assert priv["epsilon"] == max(priv["epsilon_per_site"].values())
    assert out.result.metrics["accuracy"] > 0.6


def test_epsilon_is_replace_one_and_dp_accounting_recomputes_it(tmp_path: Path) -> None:
    """The relation results.json states is the one its epsilon is for: dp-accounting's PLD
    accountant with REPLACE_ONE, fed the per-site (q, sigma, steps) of results.json and the
    events booked in the ledger, gives the reported epsilon within 1%."""
    cfg = _config(tmp_path, privacy={"noise_multiplier": 3.0, "epsilon": None})
    out = _train(cfg)
    priv = out.privacy
    assert priv["relation"] == "replace_one" and "site's size" in priv["relation_reason"]
    for site, eps in priv["epsilon_per_site"].items():
        ps = priv["per_site"][site]
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                ps["sampling_rate"], dp_accounting.GaussianDpEvent(ps["noise_multiplier"])
            ),
            ps["steps"],
        )
        replace = PLDAccountant(
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            value_discretization_interval=1e-4,
        )
        replace.compose(event)
        assert eps == pytest.approx(replace.get_epsilon(priv["delta"]), rel=0.01)
        # the booked events are the same steps
        booked = PLDAccountant(
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            value_discretization_interval=1e-4,
        )
        for h in _ledger(cfg).history(site):
            assert h.metadata["neighboring_relation"] == "replace_one"
            booked.compose(event_from_dict(h.event))
        assert eps == pytest.approx(booked.get_epsilon(priv["delta"]), rel=0.01)
        # and it is larger than add/remove would claim for the same noise
        add_remove = PLDAccountant(value_discretization_interval=1e-4)
        add_remove.compose(event)
        assert eps > 1.3 * add_remove.get_epsilon(priv["delta"])


def test_rdp_cannot_account_replace_one_and_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='accountant = "pld"'):  # when the config loads
        _config(tmp_path, privacy={"accountant": "rdp"})
    assert _ledger(_config(tmp_path)).sites() == []


def test_fixed_noise_above_target_is_a_config_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path, privacy={"noise_multiplier": 0.5})
    with pytest.raises(ConfigError, match="above the target epsilon"):
        _train(cfg)
    assert _ledger(cfg).sites() == []


def test_overspend_stops_before_training_and_spends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path, privacy={"budget_epsilon": 3.0})
    ledger = _ledger(cfg)
    ledger.charge(site="hospital_b", epsilon=2.5, label="earlier query")

    def no_training(*a: Any, **k: Any) -> Any:
        raise AssertionError("training started")

    import privml.fl.stages.local as local

    monkeypatch.setattr(local, "train_cohort", no_training)
    with pytest.raises(BudgetExceededError, match="hospital_b") as info:
        _train(cfg)
    assert "hospital_a" not in str(info.value)  # only the site that cannot pay is named
    assert "spent nothing" in str(info.value)
    assert [h.label for h in ledger.history()] == ["earlier query"]


def _write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_cli_overspend_exits_3_and_spends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = tmp_path / "ledger.sqlite"
    cfg = _write_toml(
        tmp_path / "c.toml",
        f"""
[data]
dataset = "breast_cancer"
n_sites = 2
[training]
rounds = 2
batch_size = 64
[privacy]
mode = "sample"
epsilon = 2.0
budget_epsilon = 1.0
ledger = "{ledger}"
""",
    )
    with pytest.raises(SystemExit) as info:
        main(["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert info.value.code == 3
    assert "privacy budget exceeded" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert _ledger(load_config(cfg)).sites() == []


def _csv_sites(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        df = pd.DataFrame(
            {
                "age": rng.uniform(20, 80, 60),
                "weight": rng.uniform(50, 100, 60),
                "sex": rng.choice(["F", "M"], 60),
            }
        )
        df["y"] = np.where(df["age"] + rng.normal(0, 10, 60) > 50, "yes", "no")
        p = tmp_path / f"{name}.csv"
        df.to_csv(p, index=False)
        paths.append(p)
    return paths


def test_cli_missing_bounds_with_dp_exits_2_naming_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _csv_sites(tmp_path)
    cfg = _write_toml(
        tmp_path / "c.toml",
        f"""
[data]
target = "y"
positive = "yes"
sites = [{{name = "a", path = "{a}"}}, {{name = "b", path = "{b}"}}]
[data.schema.weight]
type = "numeric"
min = 40
max = 120
[privacy]
mode = "sample"
epsilon = 1.0
ledger = "{tmp_path / "l.sqlite"}"
""",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyLeakWarning)
        with pytest.raises(SystemExit) as info:
            main(["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'age'" in err and "'sex'" in err and "'weight'" not in err
    assert "not declared in [data.schema]" in err


def test_derived_bounds_opt_in_warns(tmp_path: Path) -> None:
    a, b = _csv_sites(tmp_path)
    raw = {
        "data": {
            "target": "y",
            "positive": "yes",
            "sites": [{"name": "a", "path": str(a)}, {"name": "b", "path": str(b)}],
        },
        "privacy": {"mode": "sample", "epsilon": 1.0, "allow_data_derived_bounds": True},
    }
    cfg = parse_config(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrivacyLeakWarning)
        fed = load_federation(cfg)
    with pytest.warns(PrivacyLeakWarning, match="allow_data_derived_bounds"):
        assert check_dp_schema(cfg, fed) == ["age", "sex", "weight"]
    strict = parse_config({**raw, "privacy": {"mode": "sample", "epsilon": 1.0}})
    with pytest.raises(SchemaError, match="weight"):
        check_dp_schema(strict, fed)


@pytest.mark.slow
def test_pipeline_results_json_privacy_section(tmp_path: Path) -> None:
    """What a DP run publishes: the accounting that recomputes its epsilon, the relation, and
    every release that is not accounted listed beside it; no per-record statistic."""
    cfg = _config(tmp_path, audit={"enabled": True})
    out = run(cfg, out_dir=tmp_path / "run")
    assert out.out_dir is not None
    text = (out.out_dir / "results.json").read_text()
    results = json.loads(text, parse_constant=lambda t: pytest.fail(f"non-strict JSON {t}"))
    res = results["privacy"]
    for key in ("mode", "epsilon", "epsilon_per_site", "delta", "noise_multiplier",
                "sampling_rate", "steps", "clip", "accountant", "ledger", "relation", "unit",
                "noise", "reproducible_noise", "not_accounted"):  # fmt: skip
        assert key in res
    assert res["relation"] == "replace_one" and res["reproducible_noise"] is False
    site = res["per_site"]["hospital_a"]
    # Anyone can recompute a site's epsilon from these fields with dp-accounting.
    acc = PLDAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                site["sampling_rate"], dp_accounting.GaussianDpEvent(site["noise_multiplier"])
            ),
            site["steps"],
        )
    )
    assert acc.get_epsilon(res["delta"]) == pytest.approx(site["epsilon"], rel=0.01)
    listed = " | ".join(res["not_accounted"])
    for what in ("test metrics", "site sizes", "hyper-parameters", "quick membership audit"):
        assert what in listed
    # the quick audit publishes aggregates only: no threshold (one record's loss), no losses
    membership = results["audit"]["membership"]
    assert "threshold" not in membership["bound"]
    assert not any("loss" in k for k in membership)
    assert {"auc", "tpr_at_fpr", "empirical_epsilon"} <= set(membership)


def test_shift_folds_exactly_into_the_first_layer() -> None:
    spec = ModelSpec("mlp", 5, 3, hidden=(4,))
    model = build_model(spec)
    params = flat_params(model) + 0.1
    c = np.random.default_rng(0).random(5)
    X = torch.rand(9, 5)
    f = functional_forward(model)
    shifted = f(params, X - torch.from_numpy(c).float())
    folded = f(fold_shift(model, params, c), X)
    torch.testing.assert_close(shifted, folded, atol=1e-5, rtol=1e-5)


def test_dp_fedavg_aggregate_bounds_each_client_and_adds_calibrated_noise() -> None:
    rng = np.random.default_rng(0)
    U = rng.normal(size=(5, 3))
    U[2] *= 1e6  # a huge update
    U[4, 0] = np.nan  # a broken one
    g = torch.Generator().manual_seed(0)
    r = dp_fedavg_aggregate(U, clip=0.5, noise_multiplier=0.0, expected_clients=4.0, generator=g)
    assert r.rejected == 1
    without = U[[0, 1, 3]]
    r2 = dp_fedavg_aggregate(
        without, clip=0.5, noise_multiplier=0.0, expected_clients=4.0, generator=g
    )
    assert np.linalg.norm((r.update - r2.update) * 4.0) == pytest.approx(0.5, rel=1e-9)
    draws = np.stack(
        [
            dp_fedavg_aggregate(
                np.zeros((0, 50)),
                clip=2.0,
                noise_multiplier=1.5,
                expected_clients=10.0,
                generator=torch.Generator().manual_seed(i),
            ).update
            for i in range(40)
        ]
    )
    assert draws.std() == pytest.approx(1.5 * 2.0 / 10.0, rel=0.05)
    frac = dp_fedavg_aggregate(
        np.ones((10, 2)) * np.arange(1, 11)[:, None] / 10,
        clip=0.5,
        noise_multiplier=1.0,
        expected_clients=10.0,
        generator=torch.Generator().manual_seed(0),
        count_stddev=1e-9,
    ).unclipped_fraction
    assert frac == pytest.approx(0.3, abs=1e-6)  # norms 0.14, 0.28, 0.42 <= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True])
def test_client_level_dp_fedavg(tmp_path: Path, adaptive: bool) -> None:
    cfg = parse_config(
        {
            "data": {"dataset": "synthetic", "n_sites": 200, "rows": 20, "n_features": 6},
            "training": {"rounds": 3, "clients_per_round": 50, "lr": 1.0, "batch_size": 8},
            "privacy": {
                "mode": "client",
                "epsilon": 4.0,
                "clip": 0.5,
                "adaptive_clip": adaptive,
                "ledger": str(tmp_path / "l.sqlite"),
            },
        }
    )
    out = _train(cfg)
    priv = out.privacy
    assert 0.99 * 4.0 <= priv["epsilon"] <= 4.0
    assert priv["sampling_rate"] == 0.25 and priv["steps"] == 3
    ledger = _ledger(cfg)
    assert len(ledger.sites()) == 200
    (charge,) = ledger.history("site_007")
    assert charge.epsilon == priv["epsilon"] and charge.delta == 1e-5
    if adaptive:
        ad = priv["adaptive_clip"]
        assert priv["update_noise_multiplier"] > priv["noise_multiplier"]
        assert ad["clip_per_round"][0] == 0.5 and ad["final_clip"] != 0.5
    else:
        assert priv["adaptive_clip"] is None
        assert priv["update_noise_multiplier"] == priv["noise_multiplier"]


def test_client_level_refuses_robust_aggregators(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="client-level DP calibrates its noise"):
        parse_config(
            {
                "data": {"dataset": "synthetic", "n_sites": 10, "rows": 20},
                "training": {"aggregator": "median"},
                "privacy": {"mode": "client", "epsilon": 1.0,
                            "ledger": str(tmp_path / "l.sqlite")},
            }
        )  # fmt: skip


def test_hog_features_are_fixed_unit_norm_and_centrable() -> None:
    fmap = HogFeatures((8, 8), scale=3.0)
    assert list(fmap.parameters()) == []
    X = torch.rand(5, 64)
    F = fmap(X)
    assert F.shape == (5, fmap.n_features) == (5, 8 * 16)
    torch.testing.assert_close(F.norm(dim=1), torch.full((5,), 3.0))
    torch.testing.assert_close(fmap(X[:2]), F[:2])  # per-record: no batch statistics
    H = fmap.histograms(X)
    torch.testing.assert_close(H.norm(dim=1), torch.ones(5))  # what the private mean sums
    fmap.set_center(H.mean(0).numpy())
    G = fmap(X)
    torch.testing.assert_close(G.norm(dim=1), torch.full((5,), 3.0))
    torch.testing.assert_close(G / 3.0, (H - H.mean(0)) / (H - H.mean(0)).norm(dim=1, keepdim=True))
    # Rotating an image by 180 degrees turns every gradient around: the bins shift by half.
    img = torch.zeros(1, 8, 8)
    img[0, 2:6, 3] = 1.0
    h = HogFeatures((8, 8)).histograms(img.reshape(1, 64)).reshape(4, 4, 8)
    h_rot = HogFeatures((8, 8)).histograms(img.flip(1, 2).reshape(1, 64)).reshape(4, 4, 8)
    torch.testing.assert_close(h_rot, h.flip(0, 1).roll(4, dims=2), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_digits_with_hog_features_trains_a_linear_head(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "data": {"dataset": "digits", "n_sites": 1, "partition": "iid"},
            "model": {"kind": "logistic", "features": "hog", "image_shape": [8, 8]},
            "training": {"rounds": 3, "local_epochs": 1, "batch_size": 256, "lr": 4.0},
            "privacy": {
                "mode": "sample",
                "epsilon": 3.0,
                "max_grad_norm": 0.5,
                "ledger": str(tmp_path / "l.sqlite"),
            },
        }
    )
    fed = load_federation(cfg)
    out = train_private(cfg, fed, model_spec(cfg, fed))
    assert out.result.spec.n_features == 128 and out.features is not None
    assert out.features["center"] is not None
    X, y = fed.pooled_test()
    # The returned model (feature map + head) evaluates raw encoded records.
    ev = evaluate(out.result.model, out.result.params, X, y)
    assert ev["accuracy"] == pytest.approx(out.result.metrics["accuracy"])
    assert ev["accuracy"] > 0.8


def test_client_level_dp_bounds_what_a_scaling_attacker_moves_the_sum_by() -> None:
    """DP-FedAvg's combine step against a site sending a boosted update: with max_update_norm
    the update is rejected before clipping; without it, it is clipped to the clip like any
    other (norm_bound's smaller max_norm then clips every update to that)."""
    from types import SimpleNamespace

    from privml.fl.rounds import Received
    from privml.fl.stages.private import ClippedSum, ClipState

    rng = np.random.default_rng(0)
    honest = rng.normal(size=(3, 8)) * 0.1  # norms well under the clip
    attack = np.full((1, 8), 1e6)
    rows = np.vstack([honest, attack])
    received = Received(np.arange(4), rows, np.ones(4), np.array([False, False, False, True]))
    state = SimpleNamespace(params=np.zeros(8))

    out = ClippedSum(ClipState(1.0), max_update_norm=5.0)(state, received, 1)  # type: ignore[arg-type]
    assert out.rejected == [(3, "norm")] and list(out.accepted) == [0, 1, 2]
    assert np.allclose(out.update, honest.sum(axis=0))

    out = ClippedSum(ClipState(1.0))(state, received, 1)  # type: ignore[arg-type]
    assert np.allclose(out.update - honest.sum(axis=0), attack[0] / np.linalg.norm(attack[0]))

    out = ClippedSum(ClipState(1.0), norm_bound=0.01)(state, received, 1)  # type: ignore[arg-type]
    assert np.linalg.norm(out.update) <= 4 * 0.01 + 1e-12
