"""Partitioners that split one pooled dataset into simulated sites (index arrays)."""

from __future__ import annotations

import numpy as np


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
    labels: np.ndarray, test_fraction: float, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-site held-out split, stratified by label where each class has >= 2 records."""
    n = len(labels)
    test: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction)) if len(idx) >= 2 else 0
        test += idx[:k].tolist()
    if not test and n >= 2:
        test = [int(rng.integers(n))]
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    if mask.all():
        mask[rng.integers(n)] = False
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def split_sites(
    labels: np.ndarray, offsets: np.ndarray, test_fraction: float, *, seed: int
) -> np.ndarray:
    """Every site's :func:`train_test_split` at once: a held-out mask over all sites' records.

    Site ``i`` holds ``labels[offsets[i]:offsets[i + 1]]`` and draws from the generator seeded
    ``(seed, i)``, exactly as ``train_test_split(site_labels, test_fraction,
    rng=np.random.default_rng([seed, i]))`` does, so a site splitting its own records alone
    gets the same split. The grouping by class is one vectorized sort over all records; what
    remains per site is the site's own generator (a few draws).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), dtype=bool)
    # blocks of whole sites of about a million records: temporaries stay small
    n_sites = len(offsets) - 1
    lo = 0
    while lo < n_sites:
        hi = int(np.searchsorted(offsets, offsets[lo] + _BLOCK, side="right")) - 1
        hi = min(n_sites, max(hi, lo + 1))
        a, b = int(offsets[lo]), int(offsets[hi])
        mask[a:b] = _split_block(labels[a:b], offsets[lo : hi + 1] - a, test_fraction, seed, lo)
        lo = hi
    return mask


_BLOCK = 1 << 20


def _split_block(
    labels: np.ndarray, offsets: np.ndarray, test_fraction: float, seed: int, first_site: int
) -> np.ndarray:
    n_sites = len(offsets) - 1
    sizes = np.diff(offsets)
    n = len(labels)
    site = np.repeat(np.arange(n_sites, dtype=np.int32), sizes)
    # records grouped by (site, class), ascending positions within a group (flatnonzero order)
    order = np.lexsort((labels, site))
    lab_sorted, site_sorted = labels[order], site[order]
    del site
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (lab_sorted[1:] != lab_sorted[:-1]) | (site_sorted[1:] != site_sorted[:-1])
    del lab_sorted
    g_start = np.flatnonzero(new_group)
    g_size = np.diff(np.append(g_start, n))
    g_site = site_sorted[g_start]
    del site_sorted, new_group
    g_take = np.where(g_size >= 2, np.round(g_size * test_fraction), 0).astype(np.int64)
    per_site = np.bincount(g_site, weights=g_take, minlength=n_sites).astype(np.int64)
    # the rare sites that draw once more after their permutations (train_test_split's rules)
    none_held = (per_site == 0) & (sizes >= 2)
    all_held = (per_site == sizes) & (sizes > 0)
    extra = (none_held | all_held).tolist()
    first_group = np.searchsorted(g_site, np.arange(n_sites + 1)).tolist()
    g_sizes = g_size.tolist()
    perms: list[np.ndarray] = []
    draws: dict[int, int] = {}
    default_rng = np.random.default_rng
    for i in range(n_sites):
        a, b = first_group[i], first_group[i + 1]
        if a == b:
            continue
        rng = default_rng([seed, first_site + i])
        for g in range(a, b):
            perms.append(rng.permutation(g_sizes[g]))
        if extra[i]:
            draws[i] = int(rng.integers(int(sizes[i])))
    # rank of each record in its group's permutation; held out when rank < the group's quota
    mask = np.zeros(n, dtype=bool)
    if n:
        starts = np.repeat(g_start, g_size)
        rank = np.empty(n, dtype=np.int64)
        rank[np.concatenate(perms) + starts] = np.arange(n) - starts
        mask[order] = rank < np.repeat(g_take, g_size)
    for i, r in draws.items():
        # no class could spare a record: hold out one; everything held out: keep one
        mask[offsets[i] + r] = bool(none_held[i])
    return mask
