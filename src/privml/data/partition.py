"""Partitioners that split one pooled dataset into simulated sites (index arrays)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def _check(n_sites: int, n: int) -> None:
    if n_sites < 1:
        raise ValueError(f"The 'n_sites' parameter must be >= 1. Got {n_sites} instead.")
    if n < n_sites:
        raise ValueError(f"cannot split {n} records into {n_sites} sites")


def iid(n: int, n_sites: int, *, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal records into ``n_sites`` sites of (almost) equal size."""
    _check(n_sites, n)
    return [np.sort(p) for p in np.array_split(rng.permutation(n), n_sites)]


def sizes(n: int, fractions: list[float], *, rng: np.random.Generator) -> list[np.ndarray]:
    """Random split into sites of the given relative sizes (e.g. unequal hospitals)."""
    f = np.asarray(fractions, dtype=float)
    if (f <= 0).any():
        raise ValueError(f"site fractions must be > 0; got {fractions}")
    cuts = np.round(np.cumsum(f / f.sum())[:-1] * n).astype(int)
    return [np.sort(p) for p in np.split(rng.permutation(n), cuts)]


def dirichlet(
    labels: np.ndarray,
    n_sites: int,
    *,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label skew: each class is spread over sites with proportions ~ Dirichlet(alpha).

    Small ``alpha`` gives sites dominated by few classes (Hsu et al. 2019). Resamples until
    every site holds at least ``min_size`` records (or fewer if the data cannot allow it).
    """
    if alpha <= 0:
        raise ValueError(f"The 'alpha' parameter must be > 0. Got {alpha} instead.")
    _check(n_sites, len(labels))
    min_size = min(min_size, len(labels) // n_sites)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_sites, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s] += chunk.tolist()
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"could not draw a Dirichlet(alpha={alpha}) split with >= {min_size} records per site "
        f"in {max_tries} tries; raise alpha or lower n_sites"
    )


def by_column(values: np.ndarray, n_sites: int | None = None) -> list[np.ndarray]:
    """One site per distinct value of a column (or values grouped round-robin into n_sites)."""
    uniq = sorted({str(v) for v in values})
    s = np.asarray([str(v) for v in values])
    groups = [np.flatnonzero(s == u) for u in uniq]
    if n_sites is None or n_sites >= len(groups):
        return groups
    merged: list[list[int]] = [[] for _ in range(n_sites)]
    for i, g in enumerate(groups):
        merged[i % n_sites] += g.tolist()
    return [np.sort(np.asarray(m, dtype=np.int64)) for m in merged]


def train_test_split(
    frame: pd.DataFrame, test_fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One site's held-out split, record by record (:func:`privml.data.records.held_out`).

    A record is held out by a hash of its own content and ``seed``; adding or removing a
    record never moves another. Returns the training and held-out row positions (ascending).
    """
    from privml.data.records import held_out, record_hashes

    mask = held_out(record_hashes(frame), test_fraction, seed)
    return np.flatnonzero(~mask), np.flatnonzero(mask)
