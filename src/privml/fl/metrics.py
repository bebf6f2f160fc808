"""Evaluation of a flat parameter vector on encoded records: the one implementation of the
metrics every engine reports (simulation rounds, per-site results, private training, Flower).

Binary tasks: ``loss`` is the mean BCE with logits, ``auc`` the ROC AUC, ``f1`` of the positive
class. Multiclass: cross-entropy, one-vs-rest macro AUC, macro F1 over the classes that occur.
Tested equal to scikit-learn's ``roc_auc_score`` and ``f1_score`` (tests/fl/test_engine.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.data.federation import SiteData
from privml.models.nets import functional_forward


def predict_scores(model: nn.Module, params: torch.Tensor, X: np.ndarray) -> np.ndarray:
    """Probabilities: ``[n]`` of the positive class (binary) or ``[n, K]`` (multiclass)."""
    probs = _outputs(model, params, np.asarray(X, np.float32))[1]
    return probs


def _binary_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score_pos > score_neg) + P(equal) / 2, which is
    what sklearn's trapezoidal ROC AUC equals (tested against it)."""
    pos = scores[y == 1]
    neg = np.sort(scores[y != 1])
    below = np.searchsorted(neg, pos, side="left")
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (len(pos) * len(neg)))


def _metrics_from_outputs(
    logits: np.ndarray, probs: np.ndarray, y: np.ndarray, n_outputs: int
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 from precomputed model outputs; numpy only, so thousands of
    sites take milliseconds (tested equal to scikit-learn's metrics)."""
    n = len(y)
    if n == 0:
        return {"n": 0, "loss": None, "accuracy": None, "auc": None, "f1": None}
    if n_outputs == 1:
        z = logits[:, 0]
        loss = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
        pred = (probs >= 0.5).astype(np.int64)
        auc = _binary_auc(y, probs) if len(np.unique(y)) == 2 else None
        tp = int(((pred == 1) & (y == 1)).sum())
        denom = 2 * tp + int((pred != y).sum())
        f1 = 2 * tp / denom if denom else 0.0
    else:
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float64)
        loss = float(np.mean(lse - logits[np.arange(n), y]))
        pred = probs.argmax(axis=1)
        f1s = []
        for c in np.union1d(y, pred):
            tp = int(((pred == c) & (y == c)).sum())
            denom = 2 * tp + int(((pred == c) != (y == c)).sum())
            f1s.append(2 * tp / denom if denom else 0.0)
        f1 = float(np.mean(f1s))
        auc = (
            float(
                np.mean(
                    [_binary_auc((y == c).astype(np.int64), probs[:, c]) for c in range(n_outputs)]
                )
            )
            if len(np.unique(y)) == n_outputs
            else None
        )
    return {
        "n": int(n),
        "loss": loss,
        "accuracy": float((pred == y).mean()),
        "auc": auc,
        "f1": float(f1),
    }


def _outputs(
    model: nn.Module, params: torch.Tensor, X: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and probabilities of ``params`` on ``X`` (float64)."""
    with torch.no_grad():
        logits_t = functional_forward(model)(params, torch.from_numpy(X.astype(np.float32)))
        if logits_t.shape[1] == 1:
            probs = torch.sigmoid(logits_t[:, 0]).numpy().astype(np.float64)
        else:
            probs = torch.softmax(logits_t, dim=1).numpy().astype(np.float64)
    return logits_t.numpy().astype(np.float64), probs


def pooled_metrics(
    model: nn.Module, params: torch.Tensor, X: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 (macro for multiclass) of ``params`` on ``(X, y)``; auc is
    None when a class is absent. Numpy, not sklearn's per-call validation: milliseconds."""
    if len(y) == 0:
        return _metrics_from_outputs(np.zeros((0, 1)), np.zeros(0), np.asarray(y), 1)
    logits, probs = _outputs(model, params, X)
    return _metrics_from_outputs(logits, probs, np.asarray(y), logits.shape[1])


def per_site_metrics(
    model: nn.Module, params: torch.Tensor, sites: Sequence[SiteData]
) -> dict[str, dict[str, Any]]:
    """loss, accuracy, auc and f1 of ``params`` on each site's held-out records."""
    if not sites:
        return {}
    X = np.concatenate([s.X_test for s in sites])
    logits, probs = _outputs(model, params, X)
    n_out = logits.shape[1]
    out: dict[str, dict[str, Any]] = {}
    start = 0
    for s in sites:
        end = start + s.n_test
        out[s.name] = _metrics_from_outputs(
            logits[start:end], probs[start:end], np.asarray(s.y_test), n_out
        )
        start = end
    return out


def evaluate(
    model: nn.Module, params: torch.Tensor, X: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 (macro for multiclass); auc is None with a single class."""
    return pooled_metrics(model, params, np.asarray(X, np.float32), np.asarray(y))
