"""The anchor of ``bench_data_scale.py``: privml's previous, site-by-site data loader.

A frozen copy of how ``load_federation`` loaded the built-in synthetic dataset before the data
layer was vectorized: the straightforward pandas implementation most simulators have. Each site
gets its own frame (``frame.iloc``), the labels are checked site by site (``value_counts``,
``map`` and ``unique`` per site), the pooled frame is encoded into float64 blocks stacked and
cast to float32, and every site splits and copies its own arrays. The generator is the previous
one too (labels and categories as Python strings, records in drawing order). It computes the
same sites as :func:`privml.data.load_federation` (the benchmark checks that at its smallest
size) and is kept only as the reference it is measured against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from privml.config import ColumnSchema, Config
from privml.data import partition
from privml.data.federation import SiteData
from privml.data.loading import numeric_values


def synthetic(*, n_rows: int, n_features: int, seed: int, n_sites: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    n_num = max(n_features - 2, 1)
    site = rng.integers(0, n_sites, size=n_rows)
    shift = rng.normal(0, 0.3, size=(n_sites, n_num))
    x = np.clip(rng.normal(size=(n_rows, n_num)) + shift[site], -4, 4)
    age = np.clip(rng.normal(55, 15, size=n_rows), 18, 90)
    smoker = rng.choice(["never", "former", "current"], p=[0.5, 0.3, 0.2], size=n_rows)
    w = rng.normal(0, 1.5, size=n_num) / np.sqrt(n_num) * 2
    w_age, w_smoke = 1.5, {"never": 0.0, "former": 0.5, "current": 1.2}
    logit = (
        ((x + 4) / 8) @ w * 4
        - 2 * w.sum()
        + w_age * (age - 18) / 72
        + np.vectorize(w_smoke.get)(smoker)
        - 1.2
    )
    y = rng.random(n_rows) < 1 / (1 + np.exp(-logit))
    cols = [f"x{i}" for i in range(n_num)]
    df = pd.DataFrame(x, columns=cols)
    df["age"] = age
    df["smoker"] = smoker
    df["outcome"] = np.where(y, "event", "none")
    df["_site"] = site
    schema: dict[str, ColumnSchema] = {
        c: ColumnSchema(type="numeric", min=-4.0, max=4.0) for c in cols
    }
    schema["age"] = ColumnSchema(type="numeric", min=18.0, max=90.0)
    schema["smoker"] = ColumnSchema(type="categorical", values=["never", "former", "current"])
    return df, schema, "outcome", ["none", "event"]


def _label_str(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def resolve_labels(frames: dict[str, pd.DataFrame], target: str, classes: list[str]) -> None:
    """The previous per-site label check (the task is given by the built-in classes)."""
    seen: dict[str, str] = {}
    counts: dict[str, int] = {}
    for site, df in frames.items():
        col = df[target]
        na = col.isna()
        if na.any():
            raise ValueError(f"site {site!r}: missing labels")
        labels_here = col[~na].map(_label_str)
        for v, k in labels_here.value_counts(sort=False).items():
            counts[str(v)] = counts.get(str(v), 0) + int(k)
        for v in pd.unique(labels_here):
            if str(v) not in seen:
                seen[str(v)] = site
    unknown = [v for v in seen if v not in classes]
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes")


def encode(df: pd.DataFrame, schema: dict[str, ColumnSchema]) -> np.ndarray:
    """The previous encoder (numeric and categorical columns): float64 blocks, then float32."""
    n = len(df)
    blocks: list[np.ndarray] = []
    for col, spec in schema.items():
        values = df[col]
        na = values.isna().to_numpy()
        if spec.type == "numeric":
            assert spec.min is not None and spec.max is not None
            num = numeric_values(values).to_numpy(dtype=np.float64)
            num = np.where(na, (spec.min + spec.max) / 2, num)
            blocks.append(np.clip((num - spec.min) / (spec.max - spec.min), 0.0, 1.0)[:, None])
        else:
            cats = list(spec.values or [])
            s = values.astype(str).to_numpy()
            onehot = np.zeros((n, len(cats) + int(spec.other)))
            for j, c in enumerate(cats):
                onehot[:, j] = (s == c) & ~na
            blocks.append(onehot)
        if spec.missing:
            blocks.append(na.astype(np.float64)[:, None])
    return np.hstack(blocks).astype(np.float32)


def load_synthetic(config: Config) -> list[SiteData]:
    """The previous ``load_federation`` for ``dataset = "synthetic"``, site by site."""
    d = config.data
    frame, schema, target, classes = synthetic(
        n_rows=d.rows * d.n_sites, n_features=d.n_features, seed=d.seed, n_sites=d.n_sites
    )
    groups = frame.groupby("_site").indices
    parts = [np.asarray(groups.get(i, []), dtype=np.int64) for i in range(d.n_sites)]
    frame = frame.drop(columns="_site")
    width = max(3, len(str(d.n_sites - 1)))
    names = [f"site_{i:0{width}d}" for i in range(d.n_sites)]
    frames = {n: frame.iloc[p].reset_index(drop=True) for n, p in zip(names, parts, strict=True)}
    resolve_labels(frames, target, classes)
    X_all = encode(frame, schema)
    y_all = (frame[target].map(_label_str) == classes[1]).to_numpy(dtype=np.int64)
    sites = []
    for i, name in enumerate(frames):
        X, y = X_all[parts[i]], y_all[parts[i]]
        # the record-local split, site by site on the site's own frame
        tr, te = partition.train_test_split(frames[name], d.test_fraction, seed=d.seed)
        sites.append(SiteData(name, X[tr], y[tr], X[te], y[te]))
    return sites
