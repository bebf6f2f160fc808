"""The baselines beside every metric (balanced accuracy, prevalence, majority baseline, the
confusion matrix), the per-site round metrics and the report's curves, against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from privml.data.federation import SiteData
from privml.fl.metrics import (
    MAX_SITES_PER_ROUND,
    curves,
    per_site_metrics,
    pooled_metrics,
    predict_scores,
    round_metrics,
)
from privml.models.nets import ModelSpec, build_model, flat_params


def _model(n_outputs: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelSpec("logistic", 5, n_outputs))
    return model, flat_params(model) * 3


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_baselines_equal_sklearn(n_outputs: int) -> None:
    rng = np.random.default_rng(n_outputs)
    model, params = _model(n_outputs)
    k = max(2, n_outputs)
    X = rng.random((300, 5)).astype(np.float32)
    y = rng.choice(k, size=300, p=[0.8] + [0.2 / (k - 1)] * (k - 1)).astype(np.int64)
    m = pooled_metrics(model, params, X, y)
    scores = predict_scores(model, params, X)
    pred = (scores >= 0.5).astype(int) if n_outputs == 1 else scores.argmax(axis=1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["confusion"] == confusion_matrix(y, pred, labels=list(range(k))).tolist()
    assert m["majority_baseline"] == pytest.approx(np.bincount(y).max() / len(y))
    if n_outputs == 1:
        assert m["prevalence"] == pytest.approx(y.mean())
    else:
        assert m["prevalence"] is None


def test_constant_model_scores_its_baseline() -> None:
    """A model that predicts the majority class for everyone: accuracy equals the baseline and
    balanced accuracy is 0.5 -- the numbers the headline warning compares."""
    model, params = _model(1)
    params = torch.zeros_like(params)
    params[-1] = -5.0  # bias only: always "negative"
    X = np.random.default_rng(0).random((200, 5)).astype(np.float32)
    y = (np.arange(200) < 10).astype(np.int64)  # 5 % positive
    m = pooled_metrics(model, params, X, y)
    assert m["accuracy"] == pytest.approx(0.95) == m["majority_baseline"]
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["f1"] == 0.0


def test_round_metrics_per_site_from_one_pass() -> None:
    rng = np.random.default_rng(1)
    model, params = _model(1)
    sites = []
    for i, n in enumerate([0, 5, 30, 12]):
        X = rng.random((n, 5)).astype(np.float32)
        sites.append(SiteData(f"s{i}", X, rng.integers(0, 2, n), X, rng.integers(0, 2, n)))
    X = np.concatenate([s.X_test for s in sites])
    y = np.concatenate([s.y_test for s in sites])
    got = round_metrics(model, params, X, y, [(s.name, s.n_test) for s in sites])
    want = per_site_metrics(model, params, sites)
    assert got["accuracy"] == pooled_metrics(model, params, X, y)["accuracy"]
    assert set(got["per_site"]) == {s.name for s in sites}
    for s in sites:
        for key in ("loss", "accuracy", "auc"):
            assert got["per_site"][s.name][key] == want[s.name][key]
    many = [(f"x{i}", 1) for i in range(MAX_SITES_PER_ROUND + 1)]
    Xm = rng.random((len(many), 5)).astype(np.float32)
    assert round_metrics(model, params, Xm, np.zeros(len(many), np.int64), many)["per_site"] is None


def test_curves() -> None:
    rng = np.random.default_rng(2)
    model, params = _model(1)
    X = rng.random((500, 5)).astype(np.float32)
    y = rng.integers(0, 2, 500)
    c = curves(model, params, X, y, max_points=50)
    assert c is not None and c["roc"] is not None
    fpr, tpr = np.array(c["roc"]["fpr"]), np.array(c["roc"]["tpr"])
    assert len(fpr) <= 50 and fpr[0] == 0 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    full_fpr, full_tpr, _ = roc_curve(y, predict_scores(model, params, X))
    assert np.trapezoid(full_tpr, full_fpr) == pytest.approx(
        roc_auc_score(y, predict_scores(model, params, X))
    )
    cal = c["calibration"]
    assert sum(cal["count"]) == 500
    assert all(0 <= v <= 1 for v in cal["predicted"] + cal["observed"])
    multi = curves(*_model(3), X, rng.integers(0, 3, 500))
    assert multi is not None and multi["roc"] is None and sum(multi["calibration"]["count"]) == 500
    assert curves(model, params, X[:0], y[:0]) is None


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=15),
    n_outputs=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
)
def test_segment_metrics_equal_each_site_alone(
    sizes: list[int], n_outputs: int, seed: int, ties: bool
) -> None:
    """Every site's metrics from one vectorized pass equal the per-site computation."""
    from privml.fl.metrics import _metrics_from_outputs, segment_metrics

    rng = np.random.default_rng(seed)
    n = sum(sizes)
    logits = rng.normal(size=(n, n_outputs))
    if ties:
        logits = np.round(logits)  # equal scores: ties in the AUC and the argmax
    if n_outputs == 1:
        probs = 1 / (1 + np.exp(-logits[:, 0]))
        y = rng.integers(0, 2, n)
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        y = rng.integers(0, n_outputs, n)
    got = segment_metrics(logits, probs, y, np.array(sizes), n_outputs)
    start = 0
    for m, k in zip(got, sizes, strict=True):
        want = _metrics_from_outputs(
            logits[start : start + k], probs[start : start + k], y[start : start + k], n_outputs
        )
        start += k
        assert set(m) == set(want)
        for key, v in want.items():
            if isinstance(v, float):
                assert m[key] == pytest.approx(v, rel=1e-12, abs=1e-12), key
            else:
                assert m[key] == v, key
