"""Built-in datasets, loaded offline, as per-site frames with a declared public schema.

* ``breast_cancer``: scikit-learn's Wisconsin diagnostic data (569 patients, 30 features).
  Bounds come from the summary-statistics table published with the dataset (its DESCR), not
  from a computation on the records.
* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images); pixel bounds [0, 16] are
  the sensor's range.
* ``synthetic``: patient-like records with a known ground-truth logistic model, for any number
  of sites and rows (scale tests); bounds are the generator's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from privml.config import ColumnSchema


@dataclass
class BuiltinData:
    """A built-in dataset: one pooled frame, its public schema, target and classes."""

    frame: pd.DataFrame
    schema: dict[str, ColumnSchema]
    target: str
    classes: list[str]
    truth: dict[str, object] | None = None


def _bc_name(descr_name: str) -> str:
    m = re.fullmatch(r"(.+) \((mean|standard error|worst)\)", descr_name.strip())
    if not m:
        raise ValueError(descr_name)
    base, kind = m.group(1).replace(" ", "_"), m.group(2)
    return {"mean": f"mean_{base}", "standard error": f"{base}_error", "worst": f"worst_{base}"}[
        kind
    ]


def breast_cancer() -> BuiltinData:
    """Breast cancer Wisconsin (diagnostic); positive class ``malignant``."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    bounds: dict[str, tuple[float, float]] = {}
    for line in bunch.DESCR.splitlines():
        m = re.match(r"^([a-z ]+\((?:mean|standard error|worst)\)):\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            bounds[_bc_name(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    cols = [c.replace(" error", "_error").replace(" ", "_") for c in bunch.feature_names]
    if set(cols) != set(bounds):
        raise RuntimeError("scikit-learn's breast cancer description changed; update privml")
    df = pd.DataFrame(bunch.data, columns=cols)
    df["diagnosis"] = np.where(bunch.target == 0, "malignant", "benign")
    schema = {c: ColumnSchema(type="numeric", min=bounds[c][0], max=bounds[c][1]) for c in cols}
    return BuiltinData(df, schema, "diagnosis", ["benign", "malignant"])


def digits() -> BuiltinData:
    """8x8 digits; 64 pixel columns in [0, 16]; ten classes ``"0"``..``"9"``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    cols = [f"px{i:02d}" for i in range(64)]
    df = pd.DataFrame(bunch.data, columns=cols)
    df["digit"] = bunch.target.astype(str)
    schema = {c: ColumnSchema(type="numeric", min=0.0, max=16.0) for c in cols}
    return BuiltinData(df, schema, "digit", [str(i) for i in range(10)])


def synthetic(*, n_rows: int, n_features: int = 10, seed: int = 0, n_sites: int = 1) -> BuiltinData:
    """Records from a known logistic model: ``P(y=1|x) = sigmoid(x . w + b)``.

    The records come site after site (column ``_site``, ascending).

    Features: ``n_features - 2`` standard-normal numeric columns clipped to [-4, 4] with a
    per-site mean shift (covariate shift across sites), an ``age`` in [18, 90] and a
    categorical ``smoker`` in {never, former, current}.

    ``truth`` holds the model in the space of the *encoded* features (numeric columns scaled
    into [0, 1] by the declared bounds, ``smoker`` one-hot), so a trained model's weights can be
    compared with it directly: ``coef`` (feature name -> weight; the one-hot ``smoker``
    weights are relative to ``smoker=never`` = 0), ``intercept``, ``weights`` (the raw
    generator weights of ``x0..``), and ``bayes_accuracy`` (the true model's accuracy on
    these records).
    """
    rng = np.random.default_rng(seed)
    n_num = max(n_features - 2, 1)
    site = rng.integers(0, n_sites, size=n_rows)
    shift = rng.normal(0, 0.3, size=(n_sites, n_num))
    # The records are stored site after site (each site's records in the order they were
    # drawn), so that splitting the frame into sites reads it sequentially. The draws are made
    # in blocks (the same draws as one call) and each block is written to its records' places:
    # no full-size temporary, memory stays about the size of the frame itself.
    perm = np.argsort(site, kind="stable")
    dest = np.empty_like(perm)
    dest[perm] = np.arange(n_rows)
    x = np.empty((n_rows, n_num))
    for a, b in _blocks(n_rows):
        block = rng.normal(size=(b - a, n_num))
        block += shift[site[a:b]]
        np.clip(block, -4, 4, out=block)
        x[dest[a:b]] = block
    del dest
    age = np.clip(rng.normal(55, 15, size=n_rows), 18, 90)[perm]
    levels = ["never", "former", "current"]
    smoker = rng.choice(len(levels), p=[0.5, 0.3, 0.2], size=n_rows).astype(np.int8)[perm]
    w = rng.normal(0, 1.5, size=n_num) / np.sqrt(n_num) * 2
    w_age, w_smoke = 1.5, {"never": 0.0, "former": 0.5, "current": 1.2}
    smoke_w = np.array([w_smoke[v] for v in levels])
    u = rng.random(n_rows)[perm]
    site = site[perm]
    del perm
    logit = np.empty(n_rows)
    for a, b in _blocks(n_rows):
        logit[a:b] = (
            ((x[a:b] + 4) / 8) @ w * 4
            - 2 * w.sum()
            + w_age * (age[a:b] - 18) / 72
            + smoke_w[smoker[a:b]]
            - 1.2
        )
    y = u < 1 / (1 + np.exp(-logit))
    cols = [f"x{i}" for i in range(n_num)]
    df = pd.DataFrame(x, columns=cols, copy=False)
    df["age"] = age
    # category dtypes: one byte per record instead of a Python string object
    df["smoker"] = pd.Categorical.from_codes(smoker, pd.Index(levels))
    df["outcome"] = pd.Categorical.from_codes(y.astype(np.int8), pd.Index(["none", "event"]))
    df["_site"] = site
    schema: dict[str, ColumnSchema] = {
        c: ColumnSchema(type="numeric", min=-4.0, max=4.0) for c in cols
    }
    schema["age"] = ColumnSchema(type="numeric", min=18.0, max=90.0)
    schema["smoker"] = ColumnSchema(type="categorical", values=["never", "former", "current"])
    # logit = 0.5 x.w + ... ; on the encoded feature e = (x + 4) / 8 that is 4 w.e - 2 sum(w)
    coef: dict[str, float] = {c: float(4 * wi) for c, wi in zip(cols, w, strict=True)}
    coef["age"] = w_age
    coef.update({f"smoker={k}": v for k, v in w_smoke.items()})
    truth = {
        "coef": coef,
        "intercept": float(-2 * w.sum() - 1.2),
        "weights": w.tolist(),
        "bayes_accuracy": float(np.mean((logit > 0) == y)),
    }
    return BuiltinData(df, schema, "outcome", ["none", "event"], truth)


def _blocks(n: int, size: int = 1 << 20) -> list[tuple[int, int]]:
    return [(a, min(n, a + size)) for a in range(0, n, size)]
