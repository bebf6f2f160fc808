"""Aggregation rules: hand-computed cases, Flower 1.42 on random inputs, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.server.strategy import aggregate as flower
from scipy import stats

from privml.errors import DataError, UsageError
from privml.fl.aggregate import (
    AGGREGATORS,
    AggregateResult,
    AggregationContext,
    aggregate,
    bulyan,
    centered_clip,
    check_params,
    coordinate_median,
    fedavg,
    fltrust,
    krum,
    min_clients,
    multi_krum,
    norm_bound,
    trimmed_mean,
)

# ------------------------------------------------------------------ helpers for Flower


def _flower_results(stack: np.ndarray, counts: np.ndarray | None = None):
    """Flower's input: a list of (list of layer arrays, num_examples); two uneven layers."""
    n, p = stack.shape
    cut = p // 3
    counts = np.ones(n, dtype=int) if counts is None else counts
    return [([stack[i, :cut].reshape(-1), stack[i, cut:]], int(counts[i])) for i in range(n)]


def _flat(layers) -> np.ndarray:
    return np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in layers])


def _random_cases(seed: int, count: int = 25):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        n = int(rng.integers(7, 18))
        p = int(rng.integers(2, 40))
        scale = rng.uniform(0.01, 10.0)
        yield rng, rng.normal(scale=scale, size=(n, p))


# ------------------------------------------------------------------ hand-computed cases


def test_fedavg_hand_case() -> None:
    stack = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(fedavg(stack), [2.0, 3.0])
    np.testing.assert_allclose(fedavg(stack, [1, 3]), [2.5, 3.5])


def test_median_hand_case_odd_and_even() -> None:
    np.testing.assert_allclose(
        coordinate_median([[1.0, 9.0], [5.0, 0.0], [2.0, 4.0]]).update, [2, 4]
    )
    np.testing.assert_allclose(coordinate_median([[1.0], [2.0], [10.0], [4.0]]).update, [3.0])


def test_trimmed_mean_hand_case() -> None:
    stack = np.array([[1.0, -100.0], [2.0, 5.0], [3.0, 6.0], [4.0, 7.0], [100.0, 8.0]])
    res = trimmed_mean(stack, beta=0.2)
    np.testing.assert_allclose(res.update, [3.0, 6.0])
    assert res.info["trimmed_each_end"] == 1
    np.testing.assert_allclose(trimmed_mean(stack, beta=0.0).update, stack.mean(axis=0))


def test_krum_and_multi_krum_hand_case() -> None:
    # n=5, f=1 -> each score sums squared distances to the n-f-2 = 2 nearest others:
    # 0: 1 + 6.25 = 7.25; 1: 1 + 2.25 = 3.25; 2.5: 2.25 + 6.25 = 8.5; 10: 1 + 56.25; 11: 1 + 72.25
    stack = np.array([[0.0], [1.0], [2.5], [10.0], [11.0]])
    res = krum(stack, f=1)
    np.testing.assert_allclose(res.update, [1.0])
    np.testing.assert_array_equal(res.selected, [False, True, False, False, False])
    np.testing.assert_allclose(res.info["scores"], [7.25, 3.25, 8.5, 57.25, 73.25])
    res2 = multi_krum(stack, f=1, m=2)
    np.testing.assert_allclose(res2.update, [0.5])
    np.testing.assert_array_equal(res2.selected, [True, True, False, False, False])
    res3 = multi_krum(stack, f=1, m=3)
    np.testing.assert_allclose(res3.update, [3.5 / 3])
    # default m = n - f = 4: drops only the worst (11)
    np.testing.assert_allclose(multi_krum(stack, f=1).update, [13.5 / 4])


def test_bulyan_hand_case() -> None:
    # n=7, f=1: theta = 5 selected by repeated Krum (the five honest values), beta = 3.
    # Median of {0, 1.5, 2, 3, 7} is 2; the 3 closest are 2, 1.5, 3 -> mean 6.5 / 3.
    stack = np.array([[0.0], [1.5], [2.0], [3.0], [7.0], [100.0], [-60.0]])
    res = bulyan(stack, f=1)
    np.testing.assert_array_equal(res.selected, [True] * 5 + [False] * 2)
    np.testing.assert_allclose(res.update, [6.5 / 3])
    assert (res.info["theta"], res.info["beta"]) == (5, 3)


def test_norm_bound_hand_case() -> None:
    stack = np.array([[3.0, 4.0], [0.0, 1.0]])
    res = norm_bound(stack, max_norm=1.0)
    np.testing.assert_allclose(res.update, [0.3, 0.9])
    assert res.info["n_clipped"] == 1
    np.testing.assert_allclose(norm_bound(stack, [1, 3], max_norm=1.0).update, [0.15, 0.95])
    # default bound: median norm of the round = (5 + 1) / 2 = 3
    res_auto = norm_bound(stack)
    assert res_auto.info["max_norm"] == 3.0
    np.testing.assert_allclose(res_auto.update, [(1.8 + 0) / 2, (2.4 + 1) / 2])


def test_fltrust_hand_case() -> None:
    g0 = np.array([1.0, 0.0])
    stack = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]])
    res = fltrust(stack, server_update=g0)
    # trust: cos = 1, 0, 1/sqrt2, -1 -> ReLU -> 1, 0, 1/sqrt2, 0; rescaled to ||g0|| = 1
    r = 1 / math.sqrt(2)
    expected = (1.0 * np.array([1.0, 0.0]) + r * np.array([r, r])) / (1 + r)
    np.testing.assert_allclose(res.update, expected)
    np.testing.assert_allclose(res.info["trust_scores"], [1.0, 0.0, r, 0.0])
    np.testing.assert_array_equal(res.selected, [True, False, True, False])


def test_fltrust_magnitude_normalisation_bounds_a_scaled_update() -> None:
    g0 = np.array([0.5, 0.5])
    stack = np.array([[1.0, 1.0], [1000.0, 1000.0]])
    res = fltrust(stack, server_update=g0)
    np.testing.assert_allclose(res.update, g0)


def test_fltrust_no_trusted_client_gives_zero_update() -> None:
    res = fltrust(np.array([[-1.0, 0.0], [0.0, 0.0]]), server_update=[1.0, 0.0])
    np.testing.assert_array_equal(res.update, [0.0, 0.0])
    assert res.info["all_untrusted"] is True
    assert not res.selected.any()


def test_centered_clip_hand_case() -> None:
    stack = np.array([[0.0], [1.0], [10.0]])
    # one iteration from 0 with tau 2: clipped diffs 0, 1, 2 -> v = 1
    np.testing.assert_allclose(centered_clip(stack, tau=2.0, n_iter=1).update, [1.0])
    # second iteration from 1: diffs -1, 0, 9 -> -1, 0, 2 -> v = 1 + 1/3
    np.testing.assert_allclose(centered_clip(stack, tau=2.0, n_iter=2).update, [4.0 / 3])
    # centred at the previous aggregate 10 with tau 1: diffs -10, -9, 0 -> -1, -1, 0
    res = centered_clip(stack, tau=1.0, n_iter=1, center=[10.0])
    np.testing.assert_allclose(res.update, [10.0 - 2.0 / 3])
    assert res.info["n_clipped_last_iter"] == 2


def test_centered_clip_auto_radius_is_median_distance() -> None:
    stack = np.array([[0.0], [1.0], [10.0]])
    res = centered_clip(stack, n_iter=1)
    assert res.info["tau"] == [1.0]
    np.testing.assert_allclose(res.update, [(0 + 1 + 1) / 3])


def test_centered_clip_without_clipping_is_the_mean() -> None:
    stack = np.random.default_rng(3).normal(size=(6, 4))
    np.testing.assert_allclose(centered_clip(stack, tau=1e6, n_iter=3).update, stack.mean(axis=0))


# ------------------------------------------------------------------ against Flower 1.42


def test_fedavg_matches_flower_weighted() -> None:
    for rng, stack in _random_cases(1):
        counts = rng.integers(1, 500, size=stack.shape[0])
        expected = _flat(flower.aggregate(_flower_results(stack, counts)))
        np.testing.assert_allclose(fedavg(stack, counts), expected, rtol=1e-12, atol=1e-12)


def test_median_matches_flower() -> None:
    for _, stack in _random_cases(2):
        expected = _flat(flower.aggregate_median(_flower_results(stack)))
        np.testing.assert_array_equal(coordinate_median(stack).update, expected)


def test_trimmed_mean_matches_flower_and_scipy() -> None:
    for rng, stack in _random_cases(3):
        n = stack.shape[0]
        beta = float(rng.uniform(1.0 / n, 0.49))
        expected = _flat(flower.aggregate_trimmed_avg(_flower_results(stack), beta))
        ours = trimmed_mean(stack, beta=beta).update
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours, stats.trim_mean(stack, beta, axis=0), rtol=1e-12)


def test_krum_matches_flower() -> None:
    for rng, stack in _random_cases(4):
        n = stack.shape[0]
        f = int(rng.integers(0, (n - 3) // 2 + 1))
        expected = _flat(flower.aggregate_krum(_flower_results(stack), f, 0))
        np.testing.assert_array_equal(krum(stack, f=f).update, expected)


def test_multi_krum_matches_flower_with_equal_counts() -> None:
    for rng, stack in _random_cases(5):
        n = stack.shape[0]
        f = int(rng.integers(0, (n - 3) // 2 + 1))
        m = int(rng.integers(1, n + 1))
        expected = _flat(flower.aggregate_krum(_flower_results(stack), f, m))
        np.testing.assert_allclose(multi_krum(stack, f=f, m=m).update, expected, rtol=1e-12)


def test_multi_krum_ignores_sample_counts_unlike_flower() -> None:
    # Documented difference: Flower weights the kept updates by num_examples, the paper
    # (and privml) does not, because counts are self-reported.
    stack = np.array([[0.0], [1.0], [2.0], [1.5], [50.0]])
    counts = np.array([1, 1, 1, 100, 1])
    ours = aggregate("multi_krum", stack, weights=counts, params={"f": 1, "m": 4}).update
    flwr_res = _flat(flower.aggregate_krum(_flower_results(stack, counts), 1, 4))
    np.testing.assert_allclose(ours, [(0 + 1 + 2 + 1.5) / 4])
    assert not np.allclose(ours, flwr_res)


def test_bulyan_matches_flower() -> None:
    for rng, stack in _random_cases(6):
        n = stack.shape[0]
        f = int(rng.integers(0, (n - 3) // 4 + 1))
        # Flower pops from its input list; give it its own copy.
        expected = _flat(
            flower.aggregate_bulyan(_flower_results(stack), f, flower.aggregate_krum, to_keep=0)
        )
        np.testing.assert_allclose(bulyan(stack, f=f).update, expected, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ dispatcher and registry


def test_registry_names_are_the_config_names() -> None:
    assert set(AGGREGATORS) == {
        "fedavg", "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
        "norm_bound", "fltrust", "centered_clip",
    }  # fmt: skip


def test_dispatcher_runs_every_rule_and_labels_the_result() -> None:
    rng = np.random.default_rng(7)
    stack = rng.normal(size=(11, 5))
    ctx = AggregationContext(center=np.zeros(5), server_update=stack.mean(axis=0))
    for name in AGGREGATORS:
        res = aggregate(name, stack, weights=np.arange(1, 12), context=ctx)
        assert isinstance(res, AggregateResult)
        assert res.update.shape == (5,) and res.update.dtype == np.float64
        assert res.info["aggregator"] == name
        assert res.selected is None or res.selected.shape == (11,)


def test_dispatcher_matches_direct_calls() -> None:
    stack = np.random.default_rng(8).normal(size=(9, 4))
    np.testing.assert_array_equal(
        aggregate("krum", stack, params={"f": 2}).update, krum(stack, f=2).update
    )
    np.testing.assert_array_equal(
        aggregate("trimmed_mean", stack, params={"beta": 0.3}).update,
        trimmed_mean(stack, beta=0.3).update,
    )
    center = np.ones(4)
    np.testing.assert_array_equal(
        aggregate(
            "centered_clip", stack, params={"tau": 0.5}, context=AggregationContext(center=center)
        ).update,
        centered_clip(stack, tau=0.5, center=center).update,
    )


def test_weights_only_change_weighted_rules() -> None:
    stack = np.random.default_rng(9).normal(size=(9, 3))
    w = np.arange(1, 10)
    assert not np.allclose(aggregate("fedavg", stack, weights=w).update, stack.mean(axis=0))
    for name in ("median", "trimmed_mean", "krum", "multi_krum", "bulyan"):
        assert not AGGREGATORS[name].uses_weights
        np.testing.assert_array_equal(
            aggregate(name, stack, weights=w).update, aggregate(name, stack).update
        )


# ------------------------------------------------------------------ validation


def test_nan_update_is_refused() -> None:
    stack = np.ones((4, 3))
    stack[2, 1] = np.nan
    with pytest.raises(DataError, match=r"rows \[2\]"):
        aggregate("median", stack)
    stack[2, 1] = np.inf
    with pytest.raises(DataError):
        fedavg(stack)


@pytest.mark.parametrize("bad", [np.ones(3), np.ones((0, 3)), np.ones((3, 0)), [["a", "b"]]])
def test_bad_stack_shapes_are_refused(bad: object) -> None:
    with pytest.raises(UsageError, match="updates"):
        aggregate("fedavg", bad)


@pytest.mark.parametrize("weights", [[1, 2], [1, -1, 1], [0, 0, 0], [1, np.nan, 1]])
def test_bad_weights_are_refused(weights: list[float]) -> None:
    with pytest.raises(UsageError, match="'weights'"):
        aggregate("fedavg", np.ones((3, 2)), weights=weights)


@pytest.mark.parametrize("beta", [0.5, -0.1, 1.0, "0.1", True, float("nan")])
def test_trimmed_mean_beta_domain(beta: object) -> None:
    with pytest.raises(UsageError, match="'beta' parameter of trimmed_mean"):
        trimmed_mean(np.ones((10, 2)), beta=beta)  # type: ignore[arg-type]


def test_trimmed_mean_that_trims_nobody_is_an_error() -> None:
    with pytest.raises(UsageError, match="no defence"):
        trimmed_mean(np.ones((4, 2)), beta=0.2)
    trimmed_mean(np.ones((5, 2)), beta=0.2)


def test_krum_f_too_large_names_the_bound() -> None:
    with pytest.raises(UsageError, match=r"n >= 2f \+ 3.*f=3 with n=8.*at most 2"):
        krum(np.ones((8, 2)), f=3)
    with pytest.raises(UsageError, match="at least 3"):
        krum(np.ones((2, 2)))
    with pytest.raises(UsageError, match="'f' parameter of krum"):
        krum(np.ones((8, 2)), f=1.5)  # type: ignore[arg-type]


def test_multi_krum_m_too_large() -> None:
    with pytest.raises(UsageError, match="'m' parameter of multi_krum"):
        multi_krum(np.ones((7, 2)), f=1, m=8)


def test_bulyan_requires_4f_plus_3() -> None:
    with pytest.raises(UsageError, match=r"n >= 4f \+ 3"):
        bulyan(np.ones((10, 2)), f=2)
    assert bulyan(np.ones((11, 2)), f=2).info["beta"] == 3


def test_norm_bound_and_centered_clip_parameter_domains() -> None:
    with pytest.raises(UsageError, match="'max_norm'"):
        norm_bound(np.ones((3, 2)), max_norm=0.0)
    with pytest.raises(UsageError, match="'tau'"):
        centered_clip(np.ones((3, 2)), tau=-1.0)
    with pytest.raises(UsageError, match="'n_iter'"):
        centered_clip(np.ones((3, 2)), n_iter=0)
    with pytest.raises(UsageError, match="'center'"):
        centered_clip(np.ones((3, 2)), center=np.zeros(3))


def test_fltrust_needs_a_server_update() -> None:
    with pytest.raises(UsageError, match="server_update"):
        aggregate("fltrust", np.ones((3, 2)))
    with pytest.raises(UsageError, match=r"shape \(2,\)"):
        fltrust(np.ones((3, 2)), server_update=np.ones(3))
    with pytest.raises(DataError):
        fltrust(np.ones((3, 2)), server_update=[np.nan, 1.0])


def test_unknown_names_and_params_are_all_reported() -> None:
    with pytest.raises(UsageError, match="must be one of"):
        aggregate("mean", np.ones((3, 2)))
    problems = check_params("multi_krum", {"f": -1, "m": 0, "beta": 0.1})
    assert len(problems) == 3
    assert any("'beta'" in p for p in problems)
    with pytest.raises(UsageError, match="Unknown parameter 'tau'"):
        aggregate("krum", np.ones((5, 2)), params={"tau": 1.0})
    assert check_params("centered_clip", {"tau": 2.0, "n_iter": 3}) == []
    assert check_params("nope") and "must be one of" in check_params("nope")[0]


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("fedavg", {}, 1),
        ("krum", {"f": 2}, 7),
        ("krum", {}, 3),
        ("multi_krum", {"f": 1, "m": 9}, 9),
        ("bulyan", {"f": 2}, 11),
        ("trimmed_mean", {"beta": 0.2}, 5),
        ("trimmed_mean", {}, 5),
        ("trimmed_mean", {"beta": 0.1}, 10),
        ("trimmed_mean", {"beta": 0.3}, 4),
        ("trimmed_mean", {"beta": 0.0}, 1),
    ],
)
def test_min_clients_is_tight(name: str, params: dict, expected: int) -> None:
    assert min_clients(name, params) == expected
    stack = np.random.default_rng(0).normal(size=(expected, 3))
    aggregate(name, stack, params=params)
    if expected > 1:
        with pytest.raises(UsageError):
            aggregate(name, stack[:-1], params=params)
