"""What a model that learned nothing scores, and when a model is no better: numpy only, so the
command line and the report can say it without importing torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["baseline_warning", "class_balance"]


def class_balance(confusion: np.ndarray) -> dict[str, Any]:
    """Balanced accuracy, prevalence and majority baseline from a ``[true, pred]`` count matrix
    (binary: 2 x 2, class 1 positive). Shared by every engine, Flower's included."""
    c = np.asarray(confusion, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        return {"balanced_accuracy": None, "prevalence": None, "majority_baseline": None}
    support = c.sum(axis=1)
    present = support > 0
    recall = np.diag(c)[present] / support[present]
    return {
        "balanced_accuracy": float(recall.mean()),
        "prevalence": float(support[1] / n) if c.shape[0] == 2 else None,
        "majority_baseline": float(support.max() / n),
    }


def baseline_warning(
    metrics: Mapping[str, Any], classes: Sequence[str] | None = None
) -> str | None:
    """Says why a model is no better than one that learned nothing, or None when it is.

    Degenerate: accuracy at or below the majority baseline (predicting the most frequent class
    for everyone), balanced accuracy within 0.05 of chance (1 / number of classes), or an AUC
    within 0.05 of 0.5.
    """
    acc, base = metrics.get("accuracy"), metrics.get("majority_baseline")
    if acc is None:
        return None
    confusion = metrics.get("confusion")
    k = len(confusion) if confusion else (len(classes) if classes else 2)
    majority = ""
    if confusion and classes and len(classes) == k:
        majority = f" '{classes[int(np.argmax(np.sum(confusion, axis=1)))]}'"
    if base is not None and acc <= base + 1e-12:
        return (
            f"accuracy {acc:.3f} is no better than predicting the majority class{majority} for "
            f"everyone ({base:.3f}); read balanced accuracy and F1 instead"
        )
    bal = metrics.get("balanced_accuracy")
    if bal is not None and bal <= 1 / k + 0.05:
        return (
            f"balanced accuracy {bal:.3f} is at chance level ({1 / k:.3f}): the model is degenerate"
        )
    auc = metrics.get("auc")
    if auc is not None and auc <= 0.55:
        return (
            f"AUC {auc:.3f} is at chance level (0.5): the model does not rank positive cases "
            "above negative ones"
        )
    return None
