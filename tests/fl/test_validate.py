"""Validation of incoming client updates: one test per rejection reason, and the plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privml.errors import UsageError
from privml.fl.validate import REJECTION_REASONS, stack_accepted, validate_updates

P = 5


def _good(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=0.1, size=P)


def _only_rejection(update: object, **kw: object) -> tuple[int, str]:
    res = validate_updates([_good(), update, _good(1)], n_params=P, **kw)  # type: ignore[arg-type]
    assert res.accepted_indices == [0, 2]
    assert len(res.rejected) == 1
    return res.rejected[0]


def test_all_good_updates_are_accepted() -> None:
    ups = [_good(i) for i in range(4)] + [_good(9).astype(np.float32)]
    res = validate_updates(ups, n_params=P, max_norm=10.0)
    assert res.accepted_indices == [0, 1, 2, 3, 4]
    assert res.rejected == []
    assert res.counts() == {
        "accepted": 5,
        "rejected": 0,
        "by_reason": dict.fromkeys(REJECTION_REASONS, 0),
    }


@pytest.mark.parametrize("bad", [[0.1] * P, (0.1,) * P, None, "0.1", 3.0])
def test_non_array_is_rejected_as_type(bad: object) -> None:
    assert _only_rejection(bad) == (1, "type")


@pytest.mark.parametrize(
    "bad",
    [
        np.arange(P),  # int64
        np.zeros(P, dtype=bool),
        np.zeros(P, dtype=np.complex128),
        np.array(["a"] * P),
        np.array([0.1] * P, dtype=object),
    ],
)
def test_non_float_dtype_is_rejected(bad: np.ndarray) -> None:
    assert _only_rejection(bad) == (1, "dtype")


@pytest.mark.parametrize("shape", [(P - 1,), (P + 1,), (1, P), (P, 1), (), (0,)])
def test_wrong_shape_is_rejected(shape: tuple[int, ...]) -> None:
    assert _only_rejection(np.zeros(shape)) == (1, "shape")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_is_rejected(value: float) -> None:
    bad = _good()
    bad[2] = value
    assert _only_rejection(bad) == (1, "non_finite")
    assert _only_rejection(bad, max_norm=1.0) == (1, "non_finite")  # not reported as norm


def test_norm_beyond_bound_is_rejected_and_bound_is_inclusive() -> None:
    big = np.zeros(P)
    big[0] = 3.0
    big[1] = 4.0  # norm 5
    assert _only_rejection(big, max_norm=4.99) == (1, "norm")
    res = validate_updates([big], n_params=P, max_norm=5.0)
    assert res.accepted_indices == [0]
    assert validate_updates([big * 1e6], n_params=P).accepted_indices == [0]  # no bound: no check
    # float32 overflow-free: the norm is computed in float64
    f32 = np.full(P, 3e30, dtype=np.float32)
    assert validate_updates([f32], n_params=P, max_norm=1e31).accepted_indices == [0]


def test_counts_details_and_stack() -> None:
    bad_nan = _good(3)
    bad_nan[0] = np.nan
    ups: list[object] = [_good(0), np.arange(P), bad_nan, _good(1) * 100, np.zeros(3), _good(2)]
    res = validate_updates(ups, n_params=P, max_norm=1.0)
    assert res.accepted_indices == [0, 5]
    assert res.rejected == [(1, "dtype"), (2, "non_finite"), (3, "norm"), (4, "shape")]
    counts = res.counts()
    assert counts["accepted"] == 2 and counts["rejected"] == 4
    assert counts["by_reason"] == {
        "type": 0,
        "dtype": 1,
        "shape": 1,
        "non_finite": 1,
        "norm": 1,
        "weight": 0,
    }
    json.dumps(counts)
    assert "shape (3,)" in res.details[4] and "int64" in res.details[1]
    stack = stack_accepted(ups, res)
    assert stack.dtype == np.float64 and stack.shape == (2, P)
    np.testing.assert_array_equal(stack, np.vstack([ups[0], ups[5]]))


def test_nothing_accepted_gives_an_empty_stack_of_the_right_width() -> None:
    res = validate_updates([np.zeros(2), None], n_params=P)
    assert res.accepted_indices == []
    assert stack_accepted([np.zeros(2), None], res).shape == (0, P)


def test_stack_accepted_refuses_a_foreign_result() -> None:
    res = validate_updates([_good(), _good(1)], n_params=P)
    with pytest.raises(UsageError, match="does not belong"):
        stack_accepted([_good()], res)
    with pytest.raises(UsageError, match="does not belong"):
        stack_accepted([np.zeros(3), np.zeros(3)], res)


def test_parameter_validation() -> None:
    with pytest.raises(UsageError, match="'n_params'"):
        validate_updates([_good()], n_params=0)
    with pytest.raises(UsageError, match="'n_params'"):
        validate_updates([_good()], n_params=5.0)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(UsageError, match="'max_norm'"):
            validate_updates([_good()], n_params=P, max_norm=bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="'updates_list'"):
        validate_updates((_good() for _ in range(2)), n_params=P)  # type: ignore[arg-type]
    # a 2-D array is a sequence of rows
    stack = np.vstack([_good(0), _good(1)])
    assert validate_updates(stack, n_params=P).accepted_indices == [0, 1]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "10", None, True])
def test_bad_self_reported_weight_is_rejected(bad: object) -> None:
    assert _only_rejection(_good(5), weights=[10, bad, 3]) == (1, "weight")
    ok = validate_updates([_good(), _good(1)], n_params=P, weights=[0, np.int64(4)])
    assert ok.accepted_indices == [0, 1]
    with pytest.raises(UsageError, match="'weights'"):
        validate_updates([_good(), _good(1)], n_params=P, weights=[1])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 30),
    seed=st.integers(0, 2**31),
    bound=st.one_of(st.none(), st.floats(0.5, 3.0)),
    with_weights=st.booleans(),
)
def test_whole_stack_checks_equal_update_by_update_checks(
    n: int, seed: int, bound: float | None, with_weights: bool
) -> None:
    """Thousands of engine updates are checked as one array: same verdicts, same messages."""
    rng = np.random.default_rng(seed)
    ups = rng.normal(0, 1, size=(n, 5))
    kinds = rng.integers(0, 5, n)
    ups[kinds == 1, 0] = np.nan
    ups[kinds == 2, 3] = np.inf
    ups[kinds == 3] *= 10
    w = rng.integers(0, 50, n).astype(np.float64)
    w[kinds == 4] = -1.0
    weights = w if with_weights else None
    fast = validate_updates(ups, n_params=5, max_norm=bound, weights=weights)
    rows = list(ups)
    fast_rows = validate_updates(rows, n_params=5, max_norm=bound, weights=weights)
    slow = validate_updates(  # a list of Python floats for weights: checked one by one
        rows, n_params=5, max_norm=bound, weights=None if weights is None else list(w)
    )
    for got in (fast, fast_rows):
        assert got.accepted_indices == slow.accepted_indices
        assert got.rejected == slow.rejected and got.details == slow.details
    np.testing.assert_array_equal(stack_accepted(rows, fast), stack_accepted(rows, slow))
