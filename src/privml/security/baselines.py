"""Trivial baselines and the degenerate-model check every audit figure is read against.

A robust accuracy of 0.72 means nothing until one knows that predicting the majority class
everywhere also scores 0.72. This module computes, for a model on labelled records (clean or
adversarial):

* accuracy beside the **majority-class accuracy** (the constant predictor's),
* **balanced accuracy** (mean per-class recall; 1 / n_classes for a constant predictor),
* **ROC AUC** of the model's scores (binary: the positive-class probability; multiclass:
  macro one-vs-rest), whose chance level is 0.5,

computed by :func:`privml.fl.metrics.metrics_from_logits` (the metrics every engine reports),

and calls a model **degenerate** when it is (near-)constant -- one class predicted for at least
:data:`NEAR_CONSTANT_SHARE` of the records, or its scores spread over less than
:data:`MIN_SCORE_SPREAD` -- or when its AUC or balanced accuracy on clean records is below
:data:`DEGENERATE_BELOW`. A defence whose model is degenerate has not made the model robust;
it has made it useless, and attacks against a constant model "fail" trivially.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEGENERATE_BELOW",
    "MIN_SCORE_SPREAD",
    "NEAR_CONSTANT_SHARE",
    "ModelQuality",
    "majority_accuracy",
    "model_quality",
]

DEGENERATE_BELOW = 0.55
"""AUC or balanced accuracy below this on clean records: the model is degenerate."""

NEAR_CONSTANT_SHARE = 0.99
"""One predicted class for at least this share of the records: (near-)constant model."""

MIN_SCORE_SPREAD = 0.05
"""Binary models whose positive-class probabilities span less than this are (near-)constant
(5th to 95th percentile)."""


def majority_accuracy(y: Any) -> float:
    """Accuracy of predicting the most frequent label of ``y`` for every record."""
    arr = np.asarray(y)
    if arr.size == 0:
        return float("nan")
    _, counts = np.unique(arr, return_counts=True)
    return float(counts.max() / arr.size)


def _logits(model: nn.Module, X: Any) -> np.ndarray:
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float32))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = torch.cat([model(Xt[i : i + 4096]) for i in range(0, Xt.shape[0], 4096)])
    finally:
        model.train(was)
    return out.double().numpy()


@dataclass(frozen=True)
class ModelQuality:
    """A model's figures on some labelled records, beside the trivial baselines.

    Attributes:
        accuracy: share of records labelled correctly.
        balanced_accuracy: mean per-class recall (``1 / n_classes`` for a constant model).
        auc: ROC AUC of the scores (None when ``y`` has one class only); chance 0.5.
        majority_accuracy: the constant majority-class predictor's accuracy on these records.
        top_class_share: share of records given the model's most frequent prediction.
        score_spread: binary models: 5th-95th percentile range of the positive-class
            probability; multiclass: that of the top-class probability.
        n: records.
        degenerate: see the module docstring (meaningful on clean records).
        reason: why it is degenerate, else None.
    """

    accuracy: float
    balanced_accuracy: float
    auc: float | None
    majority_accuracy: float
    top_class_share: float
    score_spread: float
    n: int
    degenerate: bool
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def model_quality(
    model: nn.Module,
    X: Any,
    y: Any,
    *,
    classes: Any = None,
) -> ModelQuality:
    """Accuracy, balanced accuracy and AUC of ``model`` on ``(X, y)`` with the baselines and
    the degenerate check.

    Args:
        model: torch module mapping ``[n, F]`` records to logits.
        X: records (clean or adversarial) ``[n, F]``.
        y: their true labels ``[n]``.
        classes: class names, for the reason text (default the indices).
    """
    from privml.fl.metrics import metrics_from_logits

    yy = np.asarray(y).astype(np.int64)
    z = _logits(model, X)
    m = metrics_from_logits(z, yy)  # the metrics every engine reports, one implementation
    n = int(len(yy))
    if z.shape[1] == 1:
        pred = (z[:, 0] > 0).astype(np.int64)
        s = 1.0 / (1.0 + np.exp(-z[:, 0]))
    else:
        pred = z.argmax(axis=1)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        s = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
    acc = float(m["accuracy"]) if n else float("nan")
    bal = float(m["balanced_accuracy"]) if n else float("nan")
    auc = m["auc"]
    vals, counts = np.unique(pred, return_counts=True)
    top = int(vals[counts.argmax()]) if n else 0
    share = float(counts.max() / n) if n else float("nan")
    spread = float(np.quantile(s, 0.95) - np.quantile(s, 0.05)) if n else 0.0
    name = str(classes[top]) if classes is not None and top < len(classes) else str(top)
    reasons = []
    if share >= NEAR_CONSTANT_SHARE:
        reasons.append(f"predicts {name!r} for {share:.1%} of records")
    elif z.shape[1] == 1 and spread < MIN_SCORE_SPREAD:
        reasons.append(f"near-constant scores (5-95% range {spread:.3f})")
    if auc is not None and auc < DEGENERATE_BELOW:
        reasons.append(f"AUC {auc:.3f} < {DEGENERATE_BELOW}")
    if bal < DEGENERATE_BELOW:
        reasons.append(f"balanced accuracy {bal:.3f} < {DEGENERATE_BELOW}")
    return ModelQuality(
        accuracy=acc, balanced_accuracy=bal, auc=auc,
        majority_accuracy=float(m["majority_baseline"]) if n else float("nan"),
        top_class_share=share, score_spread=spread, n=n, degenerate=bool(reasons),
        reason="; ".join(reasons) or None,
    )  # fmt: skip
