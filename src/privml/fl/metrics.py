"""Evaluation of a flat parameter vector on encoded records."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

from privml.fl.local import per_sample_loss
from privml.models.nets import functional_forward


def predict_scores(model: nn.Module, params: torch.Tensor, X: np.ndarray) -> np.ndarray:
    """Probabilities: ``[n]`` of the positive class (binary) or ``[n, K]`` (multiclass)."""
    with torch.no_grad():
        logits = functional_forward(model)(params, torch.from_numpy(np.asarray(X, np.float32)))
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0]).numpy().astype(np.float64)
        return torch.softmax(logits, dim=1).numpy().astype(np.float64)


def evaluate(
    model: nn.Module, params: torch.Tensor, X: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 (macro for multiclass); auc is None with a single class."""
    n = len(y)
    if n == 0:
        return {"n": 0, "loss": None, "accuracy": None, "auc": None, "f1": None}
    with torch.no_grad():
        logits = functional_forward(model)(params, torch.from_numpy(np.asarray(X, np.float32)))
        binary = logits.shape[1] == 1
        loss = per_sample_loss(binary)(logits, torch.from_numpy(y)).mean().item()
    scores = predict_scores(model, params, X)
    if binary:
        pred = (scores >= 0.5).astype(np.int64)
        auc = float(roc_auc_score(y, scores)) if len(np.unique(y)) == 2 else None
        f1 = float(f1_score(y, pred, zero_division=0))
    else:
        pred = scores.argmax(axis=1)
        present = np.unique(y)
        try:
            auc = (
                float(
                    roc_auc_score(y, scores, multi_class="ovr", labels=np.arange(scores.shape[1]))
                )
                if len(present) == scores.shape[1]
                else None
            )
        except ValueError:
            auc = None
        f1 = float(f1_score(y, pred, average="macro", zero_division=0))
    return {
        "n": int(n),
        "loss": float(loss),
        "accuracy": float((pred == y).mean()),
        "auc": auc,
        "f1": f1,
    }
