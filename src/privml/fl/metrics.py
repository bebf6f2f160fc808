"""Evaluation of a flat parameter vector on encoded records: the one implementation of the
metrics every engine reports (simulation rounds, per-site results, private training, Flower).

Binary tasks: ``loss`` is the mean BCE with logits, ``auc`` the ROC AUC, ``f1`` of the positive
class. Multiclass: cross-entropy, one-vs-rest macro AUC, macro F1 over the classes that occur.
Every metric comes with what a model that learned nothing scores on the same records:
``balanced_accuracy`` (mean recall over the classes present; 0.5 binary for a constant guess),
``prevalence`` (share of the positive class, binary) and ``majority_baseline`` (accuracy of
always predicting the most frequent class), and ``confusion`` (counts, ``[true][predicted]``).
Tested equal to scikit-learn's metrics (tests/fl/test_engine.py, tests/fl/test_metrics.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.baselines import baseline_warning, class_balance
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


EMPTY_METRICS: dict[str, Any] = {
    "n": 0, "loss": None, "accuracy": None, "auc": None, "f1": None,
    "balanced_accuracy": None, "prevalence": None, "majority_baseline": None, "confusion": None,
}  # fmt: skip
"""The metrics of an empty test set (a site without held-out records)."""

ROUND_KEYS = ("loss", "accuracy", "auc")
"""What rounds[].per_site records for each site (the learning curves of the report)."""

__all__ = [
    "EMPTY_METRICS", "MAX_SITES_PER_ROUND", "ROUND_KEYS", "baseline_warning", "class_balance",
    "curves", "evaluate", "per_site_metrics", "pooled_metrics", "predict_scores", "round_metrics",
]  # fmt: skip

MAX_SITES_PER_ROUND = 50
"""rounds[].per_site is recorded for federations of at most this many sites (keeps results.json
small for simulations of thousands of sites; the final per-site metrics are always there)."""


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y.astype(np.int64) * k + pred, minlength=k * k).reshape(k, k)


def _metrics_from_outputs(
    logits: np.ndarray, probs: np.ndarray, y: np.ndarray, n_outputs: int
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 from precomputed model outputs; numpy only, so thousands of
    sites take milliseconds (tested equal to scikit-learn's metrics)."""
    n = len(y)
    if n == 0:
        return dict(EMPTY_METRICS)
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
    confusion = _confusion(y, pred, 2 if n_outputs == 1 else n_outputs)
    return {
        "n": int(n),
        "loss": loss,
        "accuracy": float((pred == y).mean()),
        "auc": auc,
        "f1": float(f1),
        **class_balance(confusion),
        "confusion": confusion.tolist(),
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


def metrics_from_logits(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The reported metrics from a model's logits ``[n, outputs]`` on records labelled ``y``
    (for callers that already ran the model, e.g. on adversarial records)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[1] == 1:
        probs = 1.0 / (1.0 + np.exp(-z[:, 0]))
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
    return _metrics_from_outputs(z, probs, np.asarray(y).astype(np.int64), z.shape[1])


def pooled_metrics(
    model: nn.Module, params: torch.Tensor, X: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 (macro for multiclass) of ``params`` on ``(X, y)``; auc is
    None when a class is absent. Numpy, not sklearn's per-call validation: milliseconds."""
    if len(y) == 0:
        return _metrics_from_outputs(np.zeros((0, 1)), np.zeros(0), np.asarray(y), 1)
    logits, probs = _outputs(model, params, X)
    return _metrics_from_outputs(logits, probs, np.asarray(y), logits.shape[1])


def round_metrics(
    model: nn.Module,
    params: torch.Tensor,
    X: np.ndarray,
    y: np.ndarray,
    sites: Sequence[tuple[str, int]],
) -> dict[str, Any]:
    """:func:`pooled_metrics` plus ``per_site``: site -> ``loss``, ``accuracy``, ``auc`` on its
    own records, from the same forward pass. ``X``, ``y`` are the sites' test records
    concatenated in the order of ``sites`` (name, number of records), as
    :meth:`~privml.data.federation.FederatedData.pooled_test` makes them. ``per_site`` is
    None for more than :data:`MAX_SITES_PER_ROUND` sites."""
    y = np.asarray(y)
    if len(y) == 0:
        return {**dict(EMPTY_METRICS), "per_site": None}
    logits, probs = _outputs(model, params, X)
    n_out = logits.shape[1]
    out = _metrics_from_outputs(logits, probs, y, n_out)
    if len(sites) > MAX_SITES_PER_ROUND or sum(n for _, n in sites) != len(y):
        out["per_site"] = None
        return out
    sizes = np.array([n for _, n in sites], dtype=np.int64)
    rows = segment_metrics(logits, probs, y, sizes, n_out)
    out["per_site"] = {
        name: {k: m[k] for k in ROUND_KEYS} for (name, _), m in zip(sites, rows, strict=True)
    }
    return out


def curves(
    model: nn.Module, params: torch.Tensor, X: np.ndarray, y: np.ndarray, *, max_points: int = 200,
    bins: int = 10,
) -> dict[str, Any] | None:
    """ROC curve and calibration of the final model on held-out records, for the report.

    Binary: ``roc`` (``fpr``, ``tpr``: at most ``max_points`` corners of scikit-learn's ROC
    curve) and ``calibration`` (``bins`` equal-width bins of the predicted probability:
    ``predicted`` mean, ``observed`` positive share, ``count``; empty bins omitted).
    Multiclass: ``roc`` is None and calibration is of the top class's probability against
    whether it was right. None without records.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(y)
    if len(y) == 0:
        return None
    _, probs = _outputs(model, params, np.asarray(X, np.float32))
    if probs.ndim == 1:
        conf, hit = probs, (y == 1).astype(np.float64)
        roc = None
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, probs)
            if len(fpr) > max_points:
                keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
                fpr, tpr = fpr[keep], tpr[keep]
            roc = {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}
    else:
        pred = probs.argmax(axis=1)
        conf, hit = probs[np.arange(len(y)), pred], (pred == y).astype(np.float64)
        roc = None
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    pred_mean = np.bincount(idx, weights=conf, minlength=bins)
    obs = np.bincount(idx, weights=hit, minlength=bins)
    used = count > 0
    return {
        "roc": roc,
        "calibration": {
            "of": "positive class" if probs.ndim == 1 else "top class (was it right?)",
            "predicted": [float(v) for v in pred_mean[used] / count[used]],
            "observed": [float(v) for v in obs[used] / count[used]],
            "count": [int(v) for v in count[used]],
        },
    }


def per_site_metrics(
    model: nn.Module, params: torch.Tensor, sites: Sequence[SiteData]
) -> dict[str, dict[str, Any]]:
    """loss, accuracy, auc and f1 of ``params`` on each site's held-out records."""
    if not sites:
        return {}
    X = np.concatenate([s.X_test for s in sites])
    y = np.concatenate([np.asarray(s.y_test) for s in sites])
    sizes = np.fromiter((s.n_test for s in sites), dtype=np.int64, count=len(sites))
    logits, probs = _outputs(model, params, X)
    rows = segment_metrics(logits, probs, y, sizes, logits.shape[1])
    return {s.name: m for s, m in zip(sites, rows, strict=True)}


def segment_metrics(
    logits: np.ndarray, probs: np.ndarray, y: np.ndarray, sizes: np.ndarray, n_outputs: int
) -> list[dict[str, Any]]:
    """:func:`_metrics_from_outputs` of every segment (site) of the records at once.

    The records are the sites' records one site after another, ``sizes[i]`` of site ``i``.
    Every metric is a segment reduction (``bincount`` over the site index; the AUCs from one
    sort of (site, score)), so a hundred thousand sites cost a few array passes instead of a
    Python call each; the results equal the per-site function's (tested).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    S = len(sizes)
    y = np.asarray(y).astype(np.int64)
    seg = np.repeat(np.arange(S), sizes)
    n = sizes.astype(np.float64)
    safe_n = np.maximum(n, 1.0)
    k = 2 if n_outputs == 1 else n_outputs

    def per_site(values: np.ndarray) -> np.ndarray:
        return np.bincount(seg, weights=values, minlength=S)

    if n_outputs == 1:
        z = logits[:, 0]
        loss = per_site(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))) / safe_n
        pred = (probs >= 0.5).astype(np.int64)
    else:
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))).astype(np.float64)
        loss = per_site(lse - logits[np.arange(len(y)), y]) / safe_n
        pred = probs.argmax(axis=1)
    confusion = np.bincount(seg * k * k + y * k + pred, minlength=S * k * k).reshape(S, k, k)
    accuracy = np.trace(confusion, axis1=1, axis2=2) / safe_n
    support = confusion.sum(axis=2)  # records of each true class
    predicted = confusion.sum(axis=1)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    if n_outputs == 1:
        wrong = (support[:, 0] + support[:, 1]) - tp[:, 0] - tp[:, 1]
        denom = 2 * tp[:, 1] + wrong
        f1 = np.where(denom > 0, 2 * tp[:, 1] / np.maximum(denom, 1), 0.0)
        has_auc = (support > 0).all(axis=1)
        auc = _segment_auc(seg, (y == 1), probs, S, has_auc)
    else:
        in_union = (support > 0) | (predicted > 0)
        denom = 2 * tp + (support - tp) + (predicted - tp)
        f1_c = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        f1 = (f1_c * in_union).sum(axis=1) / np.maximum(in_union.sum(axis=1), 1)
        has_auc = (support > 0).all(axis=1)
        auc = np.zeros(S)
        for c in range(n_outputs):
            auc += _segment_auc(seg, (y == c), probs[:, c], S, has_auc)
        auc /= n_outputs
    present = support > 0
    recall = np.where(present, tp / np.maximum(support, 1), 0.0)
    balanced = recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
    # plain Python numbers once for the whole array (a numpy scalar per site is slow)
    L = {
        "n": sizes.tolist(),
        "loss": loss.tolist(),
        "accuracy": accuracy.tolist(),
        "auc": auc.tolist(),
        "has_auc": has_auc.tolist(),
        "f1": np.asarray(f1, dtype=np.float64).tolist(),
        "balanced": balanced.tolist(),
        "pos": support[:, 1].tolist() if k == 2 else [0] * S,
        "majority": support.max(axis=1).tolist(),
        "confusion": confusion.tolist(),
    }
    out: list[dict[str, Any]] = []
    for i in range(S):
        ni = L["n"][i]
        if ni == 0:
            out.append(dict(EMPTY_METRICS))
            continue
        out.append(
            {
                "n": ni,
                "loss": L["loss"][i],
                "accuracy": L["accuracy"][i],
                "auc": L["auc"][i] if L["has_auc"][i] else None,
                "f1": L["f1"][i],
                "balanced_accuracy": L["balanced"][i],
                "prevalence": L["pos"][i] / ni if k == 2 else None,
                "majority_baseline": L["majority"][i] / ni,
                "confusion": L["confusion"][i],
            }
        )
    return out


def _segment_auc(
    seg: np.ndarray, positive: np.ndarray, scores: np.ndarray, S: int, wanted: np.ndarray
) -> np.ndarray:
    """Each segment's ROC AUC (Mann-Whitney, ties count half), as :func:`_binary_auc` gives it
    for the segments in ``wanted`` (0 elsewhere)."""
    out = np.zeros(S)
    if not wanted.any():
        return out
    keep = wanted[seg]
    sg, pos, sc = seg[keep], positive[keep], np.asarray(scores, dtype=np.float64)[keep]
    order = np.lexsort((sc, sg))
    sg, pos, sc = sg[order], pos[order], sc[order]
    neg = (~pos).astype(np.int64)
    # ties: runs of equal (segment, score); negatives before the run and inside it
    new = np.ones(len(sg), dtype=bool)
    new[1:] = (sg[1:] != sg[:-1]) | (sc[1:] != sc[:-1])
    run = np.cumsum(new) - 1
    start = np.flatnonzero(new)
    cum = np.concatenate([[0], np.cumsum(neg)])
    seg_start = np.searchsorted(sg, sg, side="left")  # first position of each record's segment
    below = cum[start][run] - cum[seg_start]  # negatives of the segment before the run
    tied = np.add.reduceat(neg, start)[run] if len(start) else np.zeros(0, np.int64)
    score2 = np.bincount(sg, weights=np.where(pos, 2 * below + tied, 0), minlength=S)
    n_pos = np.bincount(sg, weights=pos, minlength=S)
    n_neg = np.bincount(sg, weights=~pos, minlength=S)
    ok = wanted & (n_pos > 0) & (n_neg > 0)
    out[ok] = 0.5 * score2[ok] / (n_pos[ok] * n_neg[ok])
    return out


def evaluate(
    model: nn.Module, params: torch.Tensor, X: np.ndarray, y: np.ndarray
) -> dict[str, Any]:
    """loss, accuracy, auc and f1 (macro for multiclass); auc is None with a single class."""
    return pooled_metrics(model, params, np.asarray(X, np.float32), np.asarray(y))
