"""Simulated Byzantine attacks: each attack's defining property, and robust rules vs FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from privml.errors import DataError, UsageError
from privml.fl.aggregate import AggregationContext, aggregate
from privml.fl.attacks import (
    ATTACK_KINDS,
    ATTACK_PARAMS,
    UPDATE_ATTACKS,
    alie_z,
    apply_attack,
    check_attack_params,
    flip_labels,
)

N, P = 10, 30
MASK = np.zeros(N, dtype=bool)
MASK[[3, 7]] = True


def _honest(seed: int, noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A stack of honest updates scattered around a common direction mu."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0.5, 0.2, size=P)
    return mu + rng.normal(0.0, noise, size=(N, P)), mu


def test_sign_flip_and_scale_rewrite_only_malicious_rows() -> None:
    honest, _ = _honest(0)
    before = honest.copy()
    flipped = apply_attack("sign_flip", honest, MASK, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(honest, before)  # input untouched
    np.testing.assert_allclose(flipped[MASK], -10.0 * honest[MASK])  # default x10
    np.testing.assert_array_equal(flipped[~MASK], honest[~MASK])
    one = apply_attack("sign_flip", honest, MASK, rng=np.random.default_rng(0), params={"scale": 1})
    np.testing.assert_allclose(one[MASK], -honest[MASK])
    scaled = apply_attack("scale", honest, MASK, rng=np.random.default_rng(0), params={"scale": 3})
    np.testing.assert_allclose(scaled[MASK], 3.0 * honest[MASK])
    np.testing.assert_array_equal(scaled[~MASK], honest[~MASK])


def test_gaussian_rows_follow_the_intended_normal() -> None:
    honest, _ = _honest(1)
    many = np.zeros(200, dtype=bool)
    many[:150] = True
    stack = np.vstack([honest] * 20)
    out = apply_attack("gaussian", stack, many, rng=np.random.default_rng(5), params={"sigma": 2.5})
    draws = out[many].ravel()
    # KS test against N(0, 2.5^2) at a fixed seed; and against a wrong sigma it must fail.
    assert stats.kstest(draws, "norm", args=(0.0, 2.5)).pvalue > 0.01
    assert stats.kstest(draws, "norm", args=(0.0, 1.0)).pvalue < 1e-6
    np.testing.assert_array_equal(out[~many], stack[~many])
    again = apply_attack(
        "gaussian", stack, many, rng=np.random.default_rng(5), params={"sigma": 2.5}
    )
    np.testing.assert_array_equal(out, again)  # reproducible from the generator


def test_alie_z_follows_the_paper_formula() -> None:
    # s = floor(n/2 + 1) - f; z = Phi^-1((n - s) / n), checked against scipy's normal ppf.
    for n, f in [(10, 2), (50, 12), (100, 20), (7, 1), (5, 2)]:
        s = int(np.floor(n / 2 + 1)) - f
        assert alie_z(n, f) == pytest.approx(stats.norm.ppf((n - s) / n), rel=1e-12)
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)
    with pytest.raises(UsageError, match="majority"):
        alie_z(10, 6)
    with pytest.raises(UsageError, match="n_malicious"):
        alie_z(10, 0)


def test_alie_stays_inside_the_coordinatewise_std_band() -> None:
    honest, _ = _honest(2, noise=0.3)
    out = apply_attack("alie", honest, MASK, rng=np.random.default_rng(0))
    good = honest[~MASK]
    mean, std = good.mean(axis=0), good.std(axis=0)
    z = alie_z(N, 2)
    np.testing.assert_allclose(out[MASK], np.tile(mean - z * std, (2, 1)))
    assert np.all(np.abs(out[MASK] - mean) <= std + 1e-12)  # within one std: hard to filter
    assert np.all(out[MASK] < mean)  # and consistently on one side of it
    custom = apply_attack("alie", honest, MASK, rng=np.random.default_rng(0), params={"z": 1.5})
    np.testing.assert_allclose(custom[MASK][0], mean - 1.5 * std)


def test_alie_update_is_chosen_by_krum() -> None:
    # The point of ALIE (Baruch et al. 2019): identical, close-to-mean attacker updates get
    # the best Krum scores, so Krum picks an attacker.
    for seed in range(5):
        honest, _ = _honest(seed, noise=0.3)
        out = apply_attack("alie", honest, MASK, rng=np.random.default_rng(seed))
        res = aggregate("krum", out, params={"f": 2})
        assert res.selected is not None and res.selected[MASK].any()


def test_ipm_inner_product_with_honest_mean_is_negative() -> None:
    honest, _ = _honest(3)
    out = apply_attack("ipm", honest, MASK, rng=np.random.default_rng(0))
    mean = honest[~MASK].mean(axis=0)
    np.testing.assert_allclose(out[MASK], np.tile(-0.1 * mean, (2, 1)))
    assert np.all(out[MASK] @ mean < 0)
    # epsilon > (n - f) / f = 4 turns even the FedAvg of the whole stack against the mean
    big = apply_attack("ipm", honest, MASK, rng=np.random.default_rng(0), params={"epsilon": 5})
    assert aggregate("fedavg", big).update @ mean < 0
    small = apply_attack("ipm", honest, MASK, rng=np.random.default_rng(0), params={"epsilon": 3})
    assert aggregate("fedavg", small).update @ mean > 0


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 2}),
        ("multi_krum", {"f": 2}),
        ("bulyan", {"f": 1}),
        ("fltrust", {}),
        ("centered_clip", {}),
    ],
)
def test_robust_rules_resist_sign_flip_x10_where_fedavg_collapses(name: str, params: dict) -> None:
    for seed in range(5):
        honest, mu = _honest(seed)
        attacked = apply_attack("sign_flip", honest, MASK, rng=np.random.default_rng(seed))
        target = honest[~MASK].mean(axis=0)
        scale = np.linalg.norm(target)
        ctx = AggregationContext(
            server_update=mu + np.random.default_rng(100 + seed).normal(0, 0.1, size=P)
        )
        fedavg_err = np.linalg.norm(aggregate("fedavg", attacked).update - target) / scale
        robust = aggregate(name, attacked, params=params, context=ctx).update
        robust_err = np.linalg.norm(robust - target) / scale
        # FedAvg lands at about -1.2x the honest mean (relative error ~2.2)
        assert fedavg_err > 2.0
        assert robust_err < 0.35, (name, seed, robust_err)
        assert robust @ target > 0


def test_no_malicious_client_leaves_the_stack_unchanged() -> None:
    honest, _ = _honest(4)
    for kind in UPDATE_ATTACKS:
        out = apply_attack(kind, honest, np.zeros(N, dtype=bool), rng=np.random.default_rng(0))
        np.testing.assert_array_equal(out, honest)


def test_flip_labels() -> None:
    np.testing.assert_array_equal(flip_labels(np.array([0, 1, 1, 0]), 2), [1, 0, 0, 1])
    np.testing.assert_array_equal(flip_labels([0, 1, 2, 3], 4), [3, 2, 1, 0])
    y = np.array([0.0, 1.0, 1.0], dtype=np.float32)
    out = flip_labels(y, 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(flip_labels(flip_labels([0, 2, 1], 3), 3), [0, 2, 1])
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        flip_labels([0, 2], 2)
    with pytest.raises(DataError):
        flip_labels([0.5, 1.0], 2)
    with pytest.raises(UsageError, match="n_classes"):
        flip_labels([0, 1], 1)


def test_attack_validation() -> None:
    honest, _ = _honest(5)
    rng = np.random.default_rng(0)
    with pytest.raises(UsageError, match="data attack"):
        apply_attack("label_flip", honest, MASK, rng=rng)
    with pytest.raises(UsageError, match="must be one of"):
        apply_attack("backdoor", honest, MASK, rng=rng)
    with pytest.raises(UsageError, match="'scale' parameter of the sign_flip attack"):
        apply_attack("sign_flip", honest, MASK, rng=rng, params={"scale": -2})
    with pytest.raises(UsageError, match="Unknown parameter 'sigma'"):
        apply_attack("ipm", honest, MASK, rng=rng, params={"sigma": 1.0})
    with pytest.raises(UsageError, match="malicious_mask"):
        apply_attack("ipm", honest, np.array([0, 1] * 5), rng=rng)
    with pytest.raises(UsageError, match="malicious_mask"):
        apply_attack("ipm", honest, MASK[:5], rng=rng)
    with pytest.raises(UsageError, match="rng"):
        apply_attack("gaussian", honest, MASK, rng=0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="every client is malicious"):
        apply_attack("ipm", honest, np.ones(N, dtype=bool), rng=rng)
    bad = honest.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError):
        apply_attack("scale", bad, MASK, rng=rng)
    assert (
        check_attack_params("gaussian", {"sigma": 0, "z": 1})
        and len(check_attack_params("gaussian", {"sigma": 0, "z": 1})) == 2
    )
    assert set(ATTACK_PARAMS) == set(ATTACK_KINDS)
    assert all(check_attack_params(k) == [] for k in ATTACK_KINDS)
