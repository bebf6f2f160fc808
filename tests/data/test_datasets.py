"""Built-in datasets: offline, declared schemas, and a synthetic generator whose truth is
recoverable by (federated) training."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from privml.config import parse_config
from privml.data import datasets, load_federation
from privml.data.encoding import Encoder
from privml.fl.engine import simulate
from privml.pipeline import model_spec


def test_breast_cancer_bounds_hold_every_record() -> None:
    d = datasets.breast_cancer()
    assert d.frame.shape == (569, 31) and d.target == "diagnosis"
    assert d.classes == ["benign", "malignant"]
    assert (d.frame["diagnosis"] == "malignant").sum() == 212
    assert len(d.schema) == 30
    for col, spec in d.schema.items():
        assert spec.min is not None and spec.max is not None
        values = d.frame[col].to_numpy()
        # bounds are the published min/max (rounded as printed), so they hold to print precision
        assert values.min() >= spec.min - 1e-3 and values.max() <= spec.max + 1e-3, col
    X = Encoder(d.schema).transform(d.frame)
    assert X.shape == (569, 30) and X.min() >= 0 and X.max() <= 1


def test_digits() -> None:
    d = datasets.digits()
    assert d.frame.shape == (1797, 65) and d.classes == [str(i) for i in range(10)]
    X = Encoder(d.schema).transform(d.frame)
    np.testing.assert_allclose(X * 16, d.frame.drop(columns="digit").to_numpy(), atol=1e-5)


def test_synthetic_is_deterministic_and_its_truth_explains_the_labels() -> None:
    a = datasets.synthetic(n_rows=3000, n_features=6, seed=5, n_sites=3)
    b = datasets.synthetic(n_rows=3000, n_features=6, seed=5, n_sites=3)
    assert a.frame.equals(b.frame)
    assert set(a.frame["_site"]) == {0, 1, 2}
    enc = Encoder(a.schema)
    X = enc.transform(a.frame)
    assert a.truth is not None
    coef = np.array([a.truth["coef"][n] for n in enc.feature_names])
    logit = X @ coef + a.truth["intercept"]
    y = (a.frame["outcome"] == "event").to_numpy()
    assert np.mean((logit > 0) == y) == pytest.approx(a.truth["bayes_accuracy"])
    # the labels are Bernoulli(sigmoid(logit)): calibration in deciles of the true probability
    p = 1 / (1 + np.exp(-logit))
    bins = np.quantile(p, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 9)
    for k in range(10):
        sel = which == k
        assert abs(y[sel].mean() - p[sel].mean()) < 0.09


def _relative_to_never(names: list[str], w: np.ndarray) -> np.ndarray:
    """One-hot smoker weights are identified only up to a shift: report them relative to never."""
    w = w.copy()
    idx = [i for i, n in enumerate(names) if n.startswith("smoker=")]
    w[idx] -= w[names.index("smoker=never")]
    return w


def test_synthetic_truth_is_recovered_by_centralized_maximum_likelihood() -> None:
    d = datasets.synthetic(n_rows=40_000, n_features=6, seed=2)
    enc = Encoder(d.schema)
    X = enc.transform(d.frame)
    y = (d.frame["outcome"] == "event").to_numpy()
    fit = LogisticRegression(C=1e6, max_iter=2000).fit(X, y)
    names = enc.feature_names
    est = _relative_to_never(names, fit.coef_[0])
    assert d.truth is not None
    truth = np.array([d.truth["coef"][n] for n in names])
    np.testing.assert_allclose(est, truth, atol=0.35)


def test_synthetic_truth_is_recovered_by_federated_training() -> None:
    cfg = parse_config(
        {
            "data": {"dataset": "synthetic", "n_sites": 3, "rows": 1000, "n_features": 6},
            # large local batches: little SGD noise, so the last round sits at the optimum
            "training": {"rounds": 20, "local_epochs": 10, "lr": 4.0, "batch_size": 512},
        }
    )
    fed = load_federation(cfg)
    assert [s.name for s in fed.sites] == ["site_000", "site_001", "site_002"]
    result = simulate(fed, model_spec(cfg, fed), cfg.training)
    names = fed.encoder.feature_names
    w = result.params.numpy()
    est = _relative_to_never(names, w[:-1])
    assert fed.truth is not None
    truth = np.array([fed.truth["coef"][n] for n in names])
    # 2,400 training records pin the large weights only roughly: compare direction and size
    assert np.corrcoef(est, truth)[0, 1] > 0.97
    assert np.linalg.norm(est - truth) / np.linalg.norm(truth) < 0.3
    assert np.sign(est[np.abs(truth) > 1]).tolist() == np.sign(truth[np.abs(truth) > 1]).tolist()
    # on the held-out records, as good as the true model itself
    X, y = fed.pooled_test()
    logit = X @ truth + fed.truth["intercept"]
    true_acc = np.mean((logit > 0) == y)
    true_loss = np.mean(np.logaddexp(0, logit) - y * logit)
    assert result.metrics["accuracy"] >= true_acc - 0.03
    assert result.metrics["loss"] <= true_loss + 0.02
