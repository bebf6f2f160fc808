"""From a config to encoded per-site arrays: the data every engine trains on.

Each site's records are read, checked against the public schema and the other sites, split
into train and held-out test records at the site, and encoded with the schema alone.

The split is record-local (:func:`privml.data.records.held_out`): a record is held out or not
by a hash of its own content and ``data.seed``, so adding or removing a record never moves
another. Each site's data also gets a fingerprint (:func:`privml.data.records.fingerprint`), and a
private run keeps its records' hashes: the privacy ledger keeps each record's budget by them.

The work is done once over all sites' records pooled (site after site) rather than site by
site, so it grows linearly with records and sites: one vectorized check and one encoding pass
per column, the labels factorized once. The encoded records end in four contiguous
float32/int64 arrays (:class:`SitePool`); each site's arrays are views into them, so memory is
the encoded size plus a small object per site, and no per-site pandas frame is kept.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from privml.config import ColumnSchema, Config
from privml.data import datasets, partition, records
from privml.data.encoding import Encoder, Task, encode_labels, resolve_task_pooled
from privml.data.loading import (
    Locator,
    Pooled,
    check_columns_agree,
    check_values,
    pool_frames,
    read_site_file,
)
from privml.data.schema import infer_schema_pooled
from privml.errors import DataError, PrivacyLeakWarning


@dataclass(frozen=True, eq=False)
class SiteData:
    """One site's encoded records. Stays at the site; engines only read it there.

    ``pool`` and ``index``: the :class:`SitePool` whose arrays this site's arrays are views of,
    and the site's position in it (set by :func:`load_federation`; None for a site built any
    other way). Engines use them to take a run of consecutive sites without copying. Frozen:
    a site's arrays are never swapped for others (a poisoned site is a new ``SiteData``), so a
    pool's own site objects stay views of its arrays.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    pool: SitePool | None = field(default=None, repr=False, compare=False)
    index: int = field(default=-1, repr=False, compare=False)

    def in_pool(self, pool: SitePool) -> bool:
        """Whether this site's training arrays are still views into ``pool``'s."""
        return (
            self.pool is pool
            and self.X_train.base is pool.X_train.base
            and self.y_train.base is pool.y_train.base
        )

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)


@dataclass(frozen=True)
class SitePool:
    """Every site's encoded records in contiguous arrays, site after site.

    Site ``i``'s training records are ``X_train[train_offsets[i]:train_offsets[i + 1]]`` (and
    likewise for the test records); the :class:`SiteData` built with it hold views.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    train_offsets: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    test_offsets: np.ndarray
    sites: tuple[SiteData, ...]

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        X_train: np.ndarray,
        y_train: np.ndarray,
        train_offsets: np.ndarray,
        X_test: np.ndarray,
        y_test: np.ndarray,
        test_offsets: np.ndarray,
    ) -> SitePool:
        tr, te = train_offsets.tolist(), test_offsets.tolist()
        sites = tuple(
            SiteData(
                name,
                X_train[tr[i] : tr[i + 1]],
                y_train[tr[i] : tr[i + 1]],
                X_test[te[i] : te[i + 1]],
                y_test[te[i] : te[i + 1]],
            )
            for i, name in enumerate(names)
        )
        pool = cls(X_train, y_train, train_offsets, X_test, y_test, test_offsets, sites)
        for i, site in enumerate(sites):
            object.__setattr__(site, "pool", pool)
            object.__setattr__(site, "index", i)
        return pool

    def train_run(
        self, cohort: Sequence[SiteData]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The training arrays of ``cohort`` without a copy, when it is a run of consecutive
        sites of this pool still holding the pool's arrays: ``(X, y, offsets)``; else None."""
        if not cohort:
            return None
        first = cohort[0].index
        own = self.sites[first : first + len(cohort)] if first >= 0 else ()
        # the pool's own (frozen) site objects, in order: views of its arrays by construction
        if len(own) != len(cohort) or not all(map(operator.is_, cohort, own)):
            return None
        a, b = int(self.train_offsets[first]), int(self.train_offsets[first + len(cohort)])
        offsets = self.train_offsets[first : first + len(cohort) + 1] - a
        return self.X_train[a:b], self.y_train[a:b], offsets


@dataclass
class FederatedData:
    """Every site's encoded data, the shared encoder and the task.

    ``inferred_columns`` lists the columns whose schema came from the private data (inferred
    at load time, or declared with ``derived_from_data = true``); ``truth`` is the generator's
    ground truth for the synthetic dataset. ``pool`` holds the sites' records contiguously when
    :func:`load_federation` built them (see :meth:`train_arrays`). ``fingerprints`` maps each
    site to the fingerprint of its records (train and test) and ``record_hashes`` to its
    records' hashes (:func:`privml.data.records.record_hashes`; kept for private runs only),
    by which the ledger keeps each record's budget; both stay at the sites' side and are
    never published.
    """

    sites: list[SiteData]
    encoder: Encoder
    task: Task
    inferred_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    truth: dict[str, Any] | None = None
    pool: SitePool | None = field(default=None, repr=False, compare=False)
    fingerprints: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    record_hashes: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_features(self) -> int:
        return self.encoder.n_features

    def _pool(self) -> SitePool | None:
        """The pool, if ``sites`` are still the pool's own (a replaced site voids it)."""
        p = self.pool
        if p is None or len(p.sites) != len(self.sites):
            return None
        if not all(a is b for a, b in zip(self.sites, p.sites, strict=True)):
            return None
        return p

    def train_arrays(
        self, ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training records of sites ``ids`` (all by default) concatenated, and their offsets.

        Without copying when all sites are asked for and the pool is intact.
        """
        p = self._pool()
        if ids is None and p is not None:
            return p.X_train, p.y_train, p.train_offsets
        sites = self.sites if ids is None else [self.sites[int(i)] for i in ids]
        return _concat([s.X_train for s in sites], [s.y_train for s in sites], self.n_features)

    def pooled_test(self) -> tuple[np.ndarray, np.ndarray]:
        p = self._pool()
        if p is not None:
            return p.X_test, p.y_test
        X, y, _ = _concat(
            [s.X_test for s in self.sites], [s.y_test for s in self.sites], self.n_features
        )
        return X, y

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        X, y, _ = self.train_arrays()
        return X, y


def _concat(
    Xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.fromiter((len(y) for y in ys), dtype=np.int64, count=len(ys))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if not Xs:
        return np.zeros((0, n_features), np.float32), np.zeros(0, np.int64), offsets
    return np.concatenate(Xs), np.concatenate(ys), offsets


def _site_names(n: int, hospitals: bool) -> list[str]:
    if hospitals and n <= 26:
        return [f"hospital_{chr(ord('a') + i)}" for i in range(n)]
    width = max(3, len(str(n - 1)))
    return [f"site_{i:0{width}d}" for i in range(n)]


@dataclass
class BuiltinSites:
    """A built-in dataset split into simulated sites.

    ``order`` lists the pooled frame's rows site after site; site ``i`` holds rows
    ``order[offsets[i]:offsets[i + 1]]`` (ascending).
    """

    data: datasets.BuiltinData
    names: list[str]
    order: np.ndarray
    offsets: np.ndarray

    def frames(self) -> dict[str, pd.DataFrame]:
        """Each site's own frame (for code that runs at one site: DP queries)."""
        off = self.offsets.tolist()
        frame = self.data.frame
        return {
            name: frame.iloc[self.order[off[i] : off[i + 1]]].reset_index(drop=True)
            for i, name in enumerate(self.names)
        }


def builtin_sites(config: Config) -> BuiltinSites:
    """The built-in dataset of ``config`` and its partition into sites."""
    d = config.data
    rng = np.random.default_rng(d.seed)
    if d.dataset == "synthetic":
        data = datasets.synthetic(
            n_rows=d.rows * d.n_sites, n_features=d.n_features, seed=d.seed, n_sites=d.n_sites
        )
        site = data.frame["_site"].to_numpy()
        order = np.argsort(site, kind="stable")
        sizes = np.bincount(site, minlength=d.n_sites)
        data.frame = data.frame.drop(columns="_site")
    else:
        data = datasets.breast_cancer() if d.dataset == "breast_cancer" else datasets.digits()
        frame = data.frame
        y = frame[data.target].to_numpy()
        if d.partition == "hospitals":
            parts = partition.sizes(
                len(frame), [float(d.n_sites - i) for i in range(d.n_sites)], rng=rng
            )
        elif d.partition == "iid":
            parts = partition.iid(len(frame), d.n_sites, rng=rng)
        elif d.partition == "dirichlet":
            parts = partition.dirichlet(y, d.n_sites, alpha=d.alpha, rng=rng)
        else:
            col = d.partition_column
            if col not in frame.columns:
                raise DataError(f"data.partition_column {col!r} is not a column of {d.dataset}")
            parts = partition.by_column(frame[col].to_numpy(), d.n_sites)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        order = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    names = _site_names(len(sizes), d.partition == "hospitals")
    return BuiltinSites(data, names, order, offsets)


def site_names(config: Config) -> list[str]:
    """The sites' names, in config order (no file is read, no frame built per site)."""
    if config.data.sites is not None:
        return [s.name for s in config.data.sites]
    return builtin_sites(config).names


def declared_schema(config: Config) -> dict[str, ColumnSchema]:
    """The public schema as declared: a built-in dataset's own, overridden by [data.schema].

    Nothing is inferred from the data here; this is what DP queries may rely on.
    """
    declared = dict(config.data.schema)
    if config.data.dataset is not None:
        builtin = {
            "breast_cancer": datasets.breast_cancer,
            "digits": datasets.digits,
        }.get(config.data.dataset)
        base = (
            builtin().schema
            if builtin is not None
            else datasets.synthetic(n_rows=10, n_features=config.data.n_features).schema
        )
        declared = {**base, **declared}
    return declared


def load_site_frames(config: Config) -> dict[str, pd.DataFrame]:
    """Raw records of every site (for code that runs at the sites: training, DP queries)."""
    if config.data.dataset is not None:
        return builtin_sites(config).frames()
    assert config.data.sites is not None
    frames: dict[str, pd.DataFrame] = {}
    problems: list[str] = []
    for s in config.data.sites:
        try:
            frames[s.name] = read_site_file(s.path, site=s.name)
        except DataError as exc:
            problems += exc.problems
    if problems:
        raise DataError(problems)
    return frames


def site_fingerprints(config: Config) -> dict[str, str]:
    """Each site's data fingerprint, from the raw records."""
    return site_records(config)[0]


def site_records(config: Config) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Each site's fingerprint and its records' hashes (what the ledger keeps budgets by)."""
    if config.data.dataset is not None:
        built = builtin_sites(config)
        _, fps, hashes = _builtin_split(
            built, config.data.test_fraction, config.data.seed, keep_hashes=True
        )
        return fps, hashes
    frames = load_site_frames(config)
    hashes = {name: records.record_hashes(df) for name, df in frames.items()}
    return {n: records.fingerprint(h, frames[n].columns) for n, h in hashes.items()}, hashes


def _builtin_split(
    built: BuiltinSites, test_fraction: float, seed: int, *, keep_hashes: bool = False
) -> tuple[np.ndarray, dict[str, str], dict[str, np.ndarray]]:
    """Held-out mask (site after site), fingerprints and (``keep_hashes``) record hashes of a
    built-in dataset's sites.

    Blocks of whole sites of about a million records keep the temporaries small.
    """
    frame, offsets = built.data.frame, built.offsets
    n_sites = len(built.names)
    held = np.zeros(int(offsets[-1]), dtype=bool)
    fps: dict[str, str] = {}
    kept: dict[str, np.ndarray] = {}
    cols = [str(c) for c in frame.columns]
    lo = 0
    while lo < n_sites:
        hi = int(np.searchsorted(offsets, offsets[lo] + (1 << 20), side="right")) - 1
        hi = min(n_sites, max(hi, lo + 1))
        a, b = int(offsets[lo]), int(offsets[hi])
        h = records.record_hashes(frame, rows=built.order[a:b])
        held[a:b] = records.held_out(h, test_fraction, seed)
        for i in range(lo, hi):
            mine = h[int(offsets[i]) - a : int(offsets[i + 1]) - a]
            fps[built.names[i]] = records.fingerprint(mine, cols)
            if keep_hashes:
                kept[built.names[i]] = mine.copy()
        lo = hi
    return held, fps, kept


def resolve_schema(
    config: Config, frames: dict[str, pd.DataFrame] | Pooled
) -> tuple[dict[str, ColumnSchema], list[str]]:
    """The declared schema, completed by inference for undeclared columns (marked, warned)."""
    d = config.data
    target = d.target
    declared = dict(config.data.schema)
    inferred_cols: list[str] = []
    pooled = frames if isinstance(frames, Pooled) else pool_frames(frames)
    undeclared = [
        c for c in pooled.frame.columns if c not in declared and c != target and c not in d.exclude
    ]
    if undeclared:
        if not d.allow_inferred_schema:
            raise DataError(
                f"columns {sorted(undeclared)} have no declared schema and "
                "data.allow_inferred_schema = false; declare them in [data.schema] "
                "(privml schema infer writes a draft)"
            )
        sub = Pooled(pooled.frame[undeclared], pooled.where, pooled.has_column)
        inferred, skipped = infer_schema_pooled(sub, target=target, exclude=tuple(d.exclude))
        if skipped:
            raise DataError(
                f"columns {skipped} look like identifiers (many distinct text values); "
                "list them in data.exclude or declare them in [data.schema]"
            )
        declared.update(inferred)
        inferred_cols = list(inferred)
        warnings.warn(
            f"schema of {len(inferred_cols)} column(s) {inferred_cols[:8]}"
            f"{'...' if len(inferred_cols) > 8 else ''} was inferred from the private data: "
            "their bounds and categories reveal the data. Review `privml schema infer` output "
            "and declare them in [data.schema].",
            PrivacyLeakWarning,
            stacklevel=2,
        )
    return declared, inferred_cols


def load_federation(config: Config) -> FederatedData:
    """Read, check, split and encode every site's data as the config says."""
    d = config.data
    truth = None
    inferred: list[str] = []
    private = config.privacy.mode != "none"  # the ledger keeps budgets by the record hashes
    if d.dataset is not None:
        built = builtin_sites(config)
        frame, names = built.data.frame, built.names
        order, offsets = built.order, built.offsets
        target = built.data.target
        held, fingerprints, kept = _builtin_split(
            built, d.test_fraction, d.seed, keep_hashes=private
        )
        schema = {**built.data.schema, **config.data.schema}
        labels = pd.Series(frame[target].array.take(order), copy=False)
        task = resolve_task_pooled(
            labels,
            Locator(names, offsets),
            target=target,
            positive=None,
            classes=d.classes or built.data.classes,
        )
        truth = built.data.truth
        del built
    else:
        frames = load_site_frames(config)
        assert d.target is not None
        target = d.target
        problems = [
            f"site {n!r}: no rows; remove the site or give it data"
            for n, df in frames.items()
            if len(df) == 0
        ]
        if problems:
            raise DataError(problems)
        problems = check_columns_agree(
            frames, declared=d.schema, target=target, exclude=tuple(d.exclude)
        )
        if problems:
            raise DataError(problems)
        hashes = {name: records.record_hashes(df) for name, df in frames.items()}
        fingerprints = {
            name: records.fingerprint(h, frames[name].columns) for name, h in hashes.items()
        }
        held = np.concatenate(
            [records.held_out(h, d.test_fraction, d.seed) for h in hashes.values()]
        )
        kept = hashes if private else {}
        del hashes
        pooled = pool_frames(frames)
        del frames  # the pooled frame holds every record; no per-site frame is kept
        schema, inferred = resolve_schema(config, pooled)
        _warn_reviewed(schema, inferred)
        value_problems = check_values(pooled, schema)
        if value_problems:
            value_problems.sort(key=lambda t: (t[0], t[1]))
            raise DataError([m for _, _, m in value_problems])
        frame, names, offsets = pooled.frame, pooled.where.names, pooled.where.offsets
        order = np.arange(len(frame), dtype=np.int64)
        labels = frame[target]
        task = resolve_task_pooled(
            labels, pooled.where, target=target, positive=d.positive, classes=d.classes
        )
        del pooled
    schema = _features_only(schema, target, d.exclude)
    encoder = Encoder(schema)
    encoder.fit_check()
    # labels site after site; each record held out or not by its own content (record-local)
    y = encode_labels(labels, task)
    del labels
    n_held = np.concatenate([[0], np.cumsum(held, dtype=np.int64)])
    n_test = n_held[offsets[1:]] - n_held[offsets[:-1]]
    n_train = np.diff(offsets) - n_test
    del n_held
    # every site's training records, site after site, then every site's held-out records
    placed = np.argsort(held, kind="stable")
    del held
    y = y[placed]
    if d.dataset is not None:
        # built-in records: no value can fail, the dataset is named in any message
        rows = order[placed]
        del placed, order
        X = encoder.encode(frame, Locator.single(str(d.dataset), frame.index), order=rows)
        del rows
    else:
        X = encoder.encode(frame, Locator(names, offsets), order=placed)
        del placed
    del frame
    k = int(n_train.sum())
    pool = SitePool.build(
        names,
        X[:k],
        y[:k],
        np.concatenate([[0], np.cumsum(n_train)]).astype(np.int64),
        X[k:],
        y[k:],
        np.concatenate([[0], np.cumsum(n_test)]).astype(np.int64),
    )
    notes = []
    if inferred:
        notes.append(f"schema inferred from private data for columns: {', '.join(inferred)}")
    derived = [c for c, spec in schema.items() if spec.derived_from_data]
    return FederatedData(
        list(pool.sites), encoder, task, derived, notes, truth, pool, fingerprints, kept
    )


def _features_only(
    schema: dict[str, ColumnSchema], target: str, exclude: Sequence[str]
) -> dict[str, ColumnSchema]:
    """The schema of the model's inputs: never the target, never an excluded column.

    A ``[data.schema]`` entry for the target is for DP queries on it (declared bounds); the
    model never sees the target as a feature.
    """
    return {c: s for c, s in schema.items() if c != target and c not in exclude}


def _warn_reviewed(schema: dict[str, ColumnSchema], inferred: list[str]) -> None:
    """Warn about declared columns still marked as derived from the private data."""
    marked = [c for c, spec in schema.items() if spec.derived_from_data and c not in inferred]
    if marked:
        warnings.warn(
            f"the schema of column(s) {marked[:8]}{'...' if len(marked) > 8 else ''} is marked "
            "derived_from_data = true: its bounds and categories were read off the private "
            "data. Review them, replace them with public knowledge, and set "
            "derived_from_data = false.",
            PrivacyLeakWarning,
            stacklevel=3,
        )
