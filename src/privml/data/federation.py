"""From a config to encoded per-site arrays: the data every engine trains on.

Each site's records are read, checked against the public schema and the other sites, split
into train and held-out test records at the site, and encoded with the schema alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from privml.config import ColumnSchema, Config
from privml.data import datasets, partition
from privml.data.encoding import Encoder, Task, encode_labels, resolve_task
from privml.data.loading import check_columns_agree, check_sites, read_site_file
from privml.data.schema import infer_schema
from privml.errors import DataError, PrivacyLeakWarning


@dataclass
class SiteData:
    """One site's encoded records. Stays at the site; engines only read it there."""

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)


@dataclass
class FederatedData:
    """Every site's encoded data, the shared encoder and the task.

    ``inferred_columns`` lists the columns whose schema came from the private data (inferred
    at load time, or declared with ``derived_from_data = true``); ``truth`` is the generator's
    ground truth for the synthetic dataset.
    """

    sites: list[SiteData]
    encoder: Encoder
    task: Task
    inferred_columns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    truth: dict[str, Any] | None = None

    @property
    def n_features(self) -> int:
        return self.encoder.n_features

    def pooled_test(self) -> tuple[np.ndarray, np.ndarray]:
        X = np.concatenate([s.X_test for s in self.sites])
        y = np.concatenate([s.y_test for s in self.sites])
        return X, y

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        X = np.concatenate([s.X_train for s in self.sites])
        y = np.concatenate([s.y_train for s in self.sites])
        return X, y


def _site_names(n: int, hospitals: bool) -> list[str]:
    if hospitals and n <= 26:
        return [f"hospital_{chr(ord('a') + i)}" for i in range(n)]
    width = max(3, len(str(n - 1)))
    return [f"site_{i:0{width}d}" for i in range(n)]


def _builtin(
    config: Config,
) -> tuple[dict[str, pd.DataFrame], datasets.BuiltinData, list[np.ndarray]]:
    """Per-site frames of a built-in dataset, the dataset, and each site's row indices."""
    d = config.data
    rng = np.random.default_rng(d.seed)
    if d.dataset == "synthetic":
        data = datasets.synthetic(
            n_rows=d.rows * d.n_sites, n_features=d.n_features, seed=d.seed, n_sites=d.n_sites
        )
        groups = data.frame.groupby("_site").indices
        parts = [np.asarray(groups.get(i, []), dtype=np.int64) for i in range(d.n_sites)]
        frame = data.frame.drop(columns="_site")
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
    names = _site_names(len(parts), d.partition == "hospitals")
    frames = {n: frame.iloc[p].reset_index(drop=True) for n, p in zip(names, parts, strict=True)}
    data.frame = frame
    return frames, data, parts


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
        return _builtin(config)[0]
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


def resolve_schema(
    config: Config, frames: dict[str, pd.DataFrame]
) -> tuple[dict[str, ColumnSchema], list[str]]:
    """The declared schema, completed by inference for undeclared columns (marked, warned)."""
    d = config.data
    target = d.target
    declared = dict(config.data.schema)
    inferred_cols: list[str] = []
    undeclared = {
        name: df[
            [c for c in df.columns if c not in declared and c != target and c not in d.exclude]
        ]
        for name, df in frames.items()
    }
    if any(len(df.columns) for df in undeclared.values()):
        if not d.allow_inferred_schema:
            cols = sorted({c for df in undeclared.values() for c in df.columns})
            raise DataError(
                f"columns {cols} have no declared schema and data.allow_inferred_schema = false; "
                "declare them in [data.schema] (privml schema infer writes a draft)"
            )
        inferred, skipped = infer_schema(undeclared, target=target, exclude=tuple(d.exclude))
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
    if d.dataset is not None:
        frames, builtin, parts = _builtin(config)
        target = builtin.target
        schema = {**builtin.schema, **config.data.schema}
        inferred: list[str] = []
        task = resolve_task(
            frames, target=target, positive=None, classes=d.classes or builtin.classes
        )
        truth = builtin.truth
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
        schema, inferred = resolve_schema(config, frames)
        _warn_reviewed(schema, inferred)
        problems = check_sites(frames, schema=schema, target=target, exclude=tuple(d.exclude))
        if problems:
            raise DataError(problems)
        task = resolve_task(frames, target=target, positive=d.positive, classes=d.classes)
    encoder = Encoder(schema)
    encoder.fit_check()
    sites: list[SiteData] = []
    problems = []
    pooled: tuple[np.ndarray, np.ndarray] | None = None
    if d.dataset is not None:
        # Encoding is record by record from the schema alone, so encoding the pooled built-in
        # data once and slicing it gives every site exactly what encoding its own rows gives.
        pooled = (
            encoder.transform(builtin.frame, site=d.dataset),
            encode_labels(builtin.frame[target], task),
        )
    for i, (name, df) in enumerate(frames.items()):
        rng = np.random.default_rng([d.seed, i])
        if pooled is not None:
            X, y = pooled[0][parts[i]], pooled[1][parts[i]]
        else:
            try:
                X = encoder.transform(df, site=name)
            except DataError as exc:
                problems += exc.problems
                continue
            y = encode_labels(df[target], task)
        tr, te = partition.train_test_split(y, d.test_fraction, rng=rng)
        sites.append(SiteData(name, X[tr], y[tr], X[te], y[te]))
    if problems:
        raise DataError(problems)
    notes = []
    if inferred:
        notes.append(f"schema inferred from private data for columns: {', '.join(inferred)}")
    derived = [c for c, spec in schema.items() if spec.derived_from_data]
    return FederatedData(sites, encoder, task, derived, notes, truth)


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
