"""Federated backdoors and the defences against them, measured by the attack success they
remove; the update anomaly detector and the defence pipeline on hand-made stacks."""

from __future__ import annotations

import numpy as np
import pytest

from privml.config import parse_config
from privml.data.federation import load_federation
from privml.errors import UsageError
from privml.fl.anomaly import detect_anomalies, filter_flagged
from privml.pipeline import model_spec
from privml.security.attacks.backdoor import (
    attack_success_rate,
    backdoor_experiment,
    feature_trigger,
    pixel_trigger,
    poisoner,
    trigger_from_config,
)
from privml.security.defenses.robust import BACKDOOR_DEFENCE, Defence, defend
from privml.security.federated import Adversary, federate


def test_pixel_trigger_sets_the_corner() -> None:
    t = pixel_trigger((8, 8), size=2)
    assert t.features == (54, 55, 62, 63)
    X = np.zeros((2, 64), np.float32)
    out = t.apply(X)
    assert out[:, [54, 55, 62, 63]].min() == 1.0 and out.sum() == 8.0 and X.sum() == 0
    assert pixel_trigger((8, 8), size=1, corner="top_left").features == (0,)
    with pytest.raises(UsageError, match="'corner'"):
        pixel_trigger((8, 8), corner="middle")


def test_poisoner_adds_relabelled_triggered_copies() -> None:
    X = np.zeros((10, 4), np.float32)
    y = np.array([0, 1, 2, 1, 1, 2, 0, 1, 2, 1])
    Xp, yp = poisoner(feature_trigger([0, 3], 1.0), target=0, fraction=0.5)(
        X, y, np.random.default_rng(0)
    )
    assert len(yp) == 14 and np.array_equal(Xp[:10], X)  # 8 non-target records, half copied
    assert (yp[10:] == 0).all() and (Xp[10:, [0, 3]] == 1).all()


def _fed(rounds: int = 8):  # type: ignore[no-untyped-def]
    cfg = parse_config({
        "data": {"dataset": "digits", "n_sites": 10, "partition": "iid"},
        "model": {"kind": "mlp", "hidden": [32]},
        "training": {"rounds": rounds, "local_epochs": 2, "batch_size": 32, "lr": 0.5},
    })  # fmt: skip
    fed = load_federation(cfg)
    return cfg, fed, model_spec(cfg, fed)


def test_federated_backdoor_and_privml_defence() -> None:
    """10 sites, 1 malicious with model replacement: the backdoor works without a defence and
    is removed by privml's, at little clean accuracy."""
    cfg, fed, spec = _fed()
    r = backdoor_experiment(
        fed, spec, cfg.training, trigger=pixel_trigger((8, 8), size=2), malicious=[0],
        target=0,
    )  # fmt: skip
    assert r.rows["clean"]["attack_success"] < 0.1
    assert r.success_without_defence > 0.8
    assert r.success_with_defence < 0.1
    assert r.rows["attack_defended"]["flagged_malicious"] >= cfg.training.rounds - 1
    assert abs(r.defence_cost) < 0.05
    assert r.to_dict()["malicious"] == [fed.sites[0].name]


def test_boosted_update_is_flagged_and_clipped() -> None:
    cfg, fed, spec = _fed(rounds=2)
    trig = pixel_trigger((8, 8))
    adv = Adversary((3,), poison=poisoner(trig, target=0), boost="replace")
    run = federate(fed, spec, cfg.training, adversary=adv, defence=BACKDOOR_DEFENCE)
    assert [r["flagged"] for r in run.rounds] == [[3], [3]]
    assert run.flagged_malicious == 2 and run.flagged_honest == 0
    X, y = fed.pooled_test()
    assert attack_success_rate(run.model, X, y, trig, 0) < 0.2


def _honest(n: int = 9, p: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    common = rng.normal(0, 1, p)
    return common + 0.3 * rng.normal(0, 1, (n, p))


def test_anomaly_detector_flags_norm_and_direction_outliers() -> None:
    honest = _honest()
    stack = np.vstack([honest, 10 * honest[0], -honest[1]])
    rep = detect_anomalies(stack, threshold=3.0)
    assert rep.flagged_indices == [9, 10]
    assert rep.reasons[9] == ["norm_high"] and "direction" in rep.reasons[10]
    assert filter_flagged(stack, rep).sum() == 9
    # honest-only rounds: no false alarm over many seeds
    alarms = sum(detect_anomalies(_honest(seed=s)).n_flagged for s in range(50))
    assert alarms <= 3


def test_detector_never_flags_a_majority_and_needs_three() -> None:
    rng = np.random.default_rng(0)
    rep = detect_anomalies(rng.normal(0, 1, (5, 10)) * np.array([1, 1, 100, 100, 100])[:, None])
    assert rep.n_flagged <= 2
    assert detect_anomalies(np.ones((2, 3))).n_flagged == 0
    with pytest.raises(UsageError, match="NaN"):
        detect_anomalies(np.full((3, 3), np.nan))


def test_defend_pipeline() -> None:
    honest = _honest()
    stack = np.vstack([honest, 50 * honest[0]])
    w = np.ones(10)
    rng = np.random.default_rng(0)
    plain = defend(stack, w, Defence(), rng=rng)
    assert np.allclose(plain.update, stack.mean(axis=0))
    clipped = defend(stack, w, Defence(clip="median", drop_flagged=False), rng=rng)
    assert clipped.n_clipped >= 1
    assert np.linalg.norm(clipped.update) < np.linalg.norm(plain.update)
    full = defend(stack, w, BACKDOOR_DEFENCE, rng=rng)
    assert not full.kept[9] and full.kept[:9].all()
    assert full.info["noise_std"] > 0
    assert np.linalg.norm(full.update - honest.mean(axis=0)) < 0.5 * np.linalg.norm(
        plain.update - honest.mean(axis=0)
    )
    with pytest.raises(UsageError, match="noise_multiplier"):
        Defence(noise_multiplier=0.1)
    with pytest.raises(UsageError, match="aggregator"):
        Defence(aggregator="nope")


def test_trigger_from_config_defaults() -> None:
    cfg, fed, spec = _fed(rounds=1)
    trig, target, fraction, boost = trigger_from_config(cfg, fed, spec)
    assert trig.kind == "pixel" and trig.features == (54, 55, 62, 63)  # digits are 8x8
    bc = parse_config({"data": {"dataset": "breast_cancer"}})
    fed_bc = load_federation(bc)
    trig_bc = trigger_from_config(bc, fed_bc, model_spec(bc, fed_bc))[0]
    assert trig_bc.kind == "feature" and trig_bc.features == (0, 1, 2)
    assert (target, fraction, boost) == (0, 0.5, "replace")
    cfg2 = parse_config({"data": {"dataset": "digits"}, "model": {"kind": "cnn",
                         "image_shape": [8, 8]}})  # fmt: skip
    spec2 = model_spec(cfg2, fed)
    assert trigger_from_config(cfg2, fed, spec2)[0].kind == "pixel"


def test_backdoor_is_configured_under_attack() -> None:
    from privml.errors import ConfigError

    cfg = parse_config({
        "data": {"dataset": "digits"},
        "model": {"kind": "cnn", "image_shape": [8, 8]},
        "attack": {"kind": "backdoor", "sites": [1], "trigger": "pixel", "trigger_size": 3,
                   "target": "7", "poison_fraction": 0.3, "boost": 5.0},
    })  # fmt: skip
    fed = load_federation(cfg)
    trig, target, fraction, boost = trigger_from_config(cfg, fed, model_spec(cfg, fed))
    assert len(trig.features) == 9 and target == 7 and fraction == 0.3 and boost == 5.0
    feat = parse_config({
        "data": {"dataset": "breast_cancer"},
        "attack": {"kind": "backdoor", "fraction": 0.34, "trigger": "feature",
                   "trigger_features": ["mean_radius", 3], "trigger_value": 0.0,
                   "target": "benign", "boost": "none"},
    })  # fmt: skip
    fed2 = load_federation(feat)
    trig2, target2, _, boost2 = trigger_from_config(feat, fed2, model_spec(feat, fed2))
    assert trig2.features == (fed2.encoder.feature_names.index("mean_radius"), 3)
    assert trig2.values == (0.0, 0.0) and target2 == 0 and boost2 is None
    with pytest.raises(ConfigError, match="trigger_size is for kind = 'backdoor' only"):
        parse_config({"data": {"dataset": "digits"},
                      "attack": {"kind": "sign_flip", "sites": [0], "trigger_size": 2}})
    with pytest.raises(ConfigError, match="trigger_features is for trigger = 'feature'"):
        parse_config({"data": {"dataset": "digits"},
                      "attack": {"kind": "backdoor", "sites": [0], "trigger": "pixel",
                                 "trigger_features": [1]}})  # fmt: skip


def test_engine_helpers_poison_and_boost() -> None:
    from privml.security.attacks.backdoor import poison_sites
    from privml.security.federated import boost_updates

    cfg, fed, spec = _fed(rounds=1)
    sites, boost, trig, target = poison_sites(cfg, fed, spec, [2], seed=0)
    assert boost == "replace" and target == 0
    assert sites[2].n_train > fed.sites[2].n_train and sites[0] is fed.sites[0]
    u = np.ones((4, 3))
    out = boost_updates(u, np.array([1.0, 1.0, 2.0, 4.0]), np.array([0, 0, 1, 0], bool), "replace")
    assert out[2].tolist() == [4.0, 4.0, 4.0] and out[0].tolist() == [1.0, 1.0, 1.0]
    assert boost_updates(u, np.ones(4), np.array([1, 0, 0, 0], bool), 3.0)[0, 0] == 3.0
