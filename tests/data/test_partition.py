"""Partitioners for simulation (IID, Dirichlet label skew, by column) and per-site splits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_train_test_split_is_stratified_and_disjoint() -> None:
    y = np.array([0] * 80 + [1] * 20)
    tr, te = partition.train_test_split(y, 0.25, rng=np.random.default_rng(0))
    assert not set(tr) & set(te) and len(tr) + len(te) == 100
    assert len(te) == 25 and y[te].sum() == 5  # 25 % of each class
    tr2, te2 = partition.train_test_split(y, 0.25, rng=np.random.default_rng(0))
    assert np.array_equal(te, te2)


def test_train_test_split_tiny_sites_keep_training_records() -> None:
    for n in (1, 2, 3):
        y = np.arange(n) % 2
        tr, te = partition.train_test_split(y, 0.5, rng=np.random.default_rng(0))
        assert len(tr) >= 1 and len(tr) + len(te) == n


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=25),
    n_classes=st.integers(1, 4),
    fraction=st.sampled_from([0.05, 0.2, 0.5, 0.75, 0.9]),
    seed=st.integers(0, 2**31),
    block=st.sampled_from([7, 64, 1 << 20]),
)
def test_split_sites_is_each_site_splitting_alone(
    sizes: list[int], n_classes: int, fraction: float, seed: int, block: int
) -> None:
    """All sites at once give exactly what each site's own train_test_split gives."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    y = np.random.default_rng(seed).integers(0, n_classes, offsets[-1])
    old, partition._BLOCK = partition._BLOCK, block
    try:
        held = partition.split_sites(y, offsets, fraction, seed=seed)
    finally:
        partition._BLOCK = old
    for i, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        if a == b:
            continue
        _, test = partition.train_test_split(
            y[a:b], fraction, rng=np.random.default_rng([seed, i])
        )
        np.testing.assert_array_equal(np.flatnonzero(held[a:b]), test)
