"""Partitioners for simulation (IID, Dirichlet label skew, by column) and per-site splits."""

from __future__ import annotations

import numpy as np
import pytest

from privml.data import partition


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    allidx = np.concatenate(parts)
    return len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_deals_equal_shares() -> None:
    parts = partition.iid(569, 100, rng=np.random.default_rng(0))
    assert len(parts) == 100 and _is_partition(parts, 569)
    assert {len(p) for p in parts} == {5, 6}
    again = partition.iid(569, 100, rng=np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_iid_keeps_label_balance() -> None:
    y = np.random.default_rng(1).integers(0, 2, 4000)
    parts = partition.iid(len(y), 4, rng=np.random.default_rng(0))
    shares = [y[p].mean() for p in parts]
    assert max(shares) - min(shares) < 0.08


def test_sizes_are_proportional() -> None:
    parts = partition.sizes(600, [3.0, 2.0, 1.0], rng=np.random.default_rng(0))
    assert [len(p) for p in parts] == [300, 200, 100] and _is_partition(parts, 600)
    with pytest.raises(ValueError, match="must be > 0"):
        partition.sizes(10, [1.0, 0.0], rng=np.random.default_rng(0))


def _mean_label_skew(y: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    k = int(y.max()) + 1
    glob = np.bincount(y, minlength=k) / len(y)
    tv = [0.5 * np.abs(np.bincount(y[p], minlength=k) / len(p) - glob).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_small_alpha_skews_labels_more() -> None:
    y = np.repeat(np.arange(10), 200)
    skews = {}
    for alpha in (0.1, 1.0, 100.0):
        parts = partition.dirichlet(y, 10, alpha=alpha, rng=np.random.default_rng(3))
        assert _is_partition(parts, len(y))
        assert min(len(p) for p in parts) >= 10
        skews[alpha] = _mean_label_skew(y, parts)
    iid = partition.iid(len(y), 10, rng=np.random.default_rng(3))
    assert skews[0.1] > 0.5 > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.1 and _mean_label_skew(y, iid) < 0.1


def test_dirichlet_refuses_bad_alpha_and_impossible_splits() -> None:
    y = np.zeros(30, dtype=np.int64)
    with pytest.raises(ValueError, match="'alpha' parameter must be > 0"):
        partition.dirichlet(y, 3, alpha=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="cannot split 30 records into 40 sites"):
        partition.dirichlet(y, 40, alpha=1.0, rng=np.random.default_rng(0))


def test_by_column_one_site_per_value_or_grouped() -> None:
    values = np.array(["x", "y", "x", "z", "y", "x"])
    parts = partition.by_column(values)
    assert [p.tolist() for p in parts] == [[0, 2, 5], [1, 4], [3]]
    two = partition.by_column(values, 2)
    assert len(two) == 2 and _is_partition(two, 6)
    assert two[0].tolist() == [0, 2, 3, 5]  # x and z
    for p in two:  # a value never spans two sites
        for q in two:
            if p is not q:
                assert not set(values[p]) & set(values[q])
