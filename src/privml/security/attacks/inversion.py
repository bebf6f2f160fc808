"""Gradient inversion: reconstructing a site's records from the update it sends.

A curious server that sees one site's update of a federated round can try to recover the
records behind it. The threat is real for small batches (Zhu, Liu and Han 2019, "Deep leakage
from gradients"; Geiping et al. 2020, "Inverting gradients -- how easy is it to break privacy
in federated learning?"). privml measures it on its own models in three views:

* ``site``: the server sees the site's exact gradient (FedSGD: one local step, so the update
  is ``-lr * gradient``; :func:`site_gradient`);
* ``dp``: the site ran DP-SGD: each record's gradient clipped to ``max_grad_norm`` and Gaussian
  noise of standard deviation ``noise_multiplier * max_grad_norm`` added to the sum
  (:func:`dp_site_gradient`);
* ``secure_aggregation``: the server only learns the sum of the updates of ``n_sites`` sites
  (what secure aggregation reveals), and must find the target site's records in it.

Two attacks (:func:`invert_gradient`):

* ``optimize`` -- Geiping et al.: start from random records in the feature box and minimise
  ``1 - cos(grad(x'), grad*)`` with Adam, projecting onto the box after every step, with
  several random restarts (the restart whose gradient matches best wins). Labels are inferred
  from the gradient of the last layer's bias (Zhao et al. 2020, iDLG: with cross-entropy the
  true class is the one whose bias gradient is negative) unless given.
* ``analytic`` -- for models whose first layer is ``Linear`` with a bias (logistic regression,
  privml's MLP), one record is recovered exactly from ``dL/dW_i / dL/db_i`` (Phong et al.
  2017); with several records it returns a gradient-weighted average of them.

The error is the mean squared error per feature between each true record and its matched
reconstruction (optimal one-to-one matching, Hungarian algorithm), on privml's encoded [0, 1]
features; ``baseline_mse`` is the error of guessing the constant 0.5 for every feature, so a
ratio near 1 means nothing was learnt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from privml.errors import UsageError
from privml.models.nets import functional_forward
from privml.security._checks import (
    as_features,
    as_labels,
    check_choice,
    check_float,
    check_int,
    n_classes_of,
)
from privml.security.attacks.evasion import logits_loss

__all__ = [
    "VIEWS",
    "InversionResult",
    "dp_site_gradient",
    "gradient_inversion",
    "infer_labels",
    "invert_gradient",
    "reconstruction_error",
    "site_gradient",
]

VIEWS: tuple[str, ...] = ("site", "dp", "secure_aggregation")
METHODS: tuple[str, ...] = ("optimize", "analytic")


def _flat_params(model: nn.Module, params: Any) -> torch.Tensor:
    n = sum(p.numel() for p in model.parameters())
    p = torch.as_tensor(params, dtype=torch.float32).detach().reshape(-1)
    if p.numel() != n:
        raise UsageError(
            f"The 'params' parameter must hold the model's {n} parameters (flat). "
            f"Got {p.numel()} values instead."
        )
    return p


def site_gradient(model: nn.Module, params: Any, X: Any, y: Any) -> torch.Tensor:
    """The gradient of the mean training loss over ``(X, y)`` at ``params`` (flat ``[P]``).

    This is what a site sends in FedSGD (up to the factor ``-lr``).
    """
    p = _flat_params(model, params)
    Xt = as_features(X, "X", "site_gradient")
    f = functional_forward(model)
    n_out = int(f(p, Xt[:1]).shape[1])
    yt = as_labels(y, Xt.shape[0], n_classes_of(n_out), "y", "site_gradient")
    with torch.enable_grad():
        q = p.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(logits_loss(f(q, Xt), yt).mean(), q)
    return g.detach()


def dp_site_gradient(
    model: nn.Module,
    params: Any,
    X: Any,
    y: Any,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DP-SGD's released gradient for one batch (Abadi et al. 2016).

    Each record's gradient is clipped to L2 norm ``max_grad_norm``; the clipped gradients are
    summed, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added
    to every coordinate, and the result is divided by the batch size.
    """
    where = "dp_site_gradient"
    c = check_float(max_grad_norm, "max_grad_norm", where, low=0.0, low_open=True)
    z = check_float(noise_multiplier, "noise_multiplier", where, low=0.0)
    p = _flat_params(model, params)
    Xt = as_features(X, "X", where)
    ya = np.asarray(y)
    rows = [site_gradient(model, p, Xt[i : i + 1], ya[i : i + 1]) for i in range(len(Xt))]
    g = torch.stack(rows)
    norms = torch.linalg.vector_norm(g, dim=1, keepdim=True)
    g = g * torch.clamp(c / norms.clamp_min(1e-12), max=1.0)
    noise = torch.randn(p.shape, generator=generator) * (z * c)
    return (g.sum(dim=0) + noise) / len(Xt)


def infer_labels(model: nn.Module, gradient: torch.Tensor, n_records: int) -> np.ndarray:
    """Labels of the records behind ``gradient`` from the last layer's bias gradient (iDLG).

    With cross-entropy the bias gradient of class ``c`` is ``mean(p_c - 1[y = c])``: negative
    exactly for classes present in the batch (for a confident model). The ``n_records``
    most negative entries are taken, repeating the most negative ones when fewer classes are
    negative. One-logit binary: label 1 if the bias gradient is negative, else 0.
    """
    last_bias = list(model.parameters())[-1]
    n_out = last_bias.numel()
    gb = gradient[-n_out:].numpy()
    if n_out == 1:
        return np.full(n_records, 1 if gb[0] < 0 else 0, dtype=np.int64)
    order = np.argsort(gb)
    neg = [int(c) for c in order if gb[c] < 0] or [int(order[0])]
    # share the records among the negative classes in proportion to their bias gradient
    weights = -gb[neg] / (-gb[neg]).sum() if len(neg) > 1 else np.ones(1)
    counts = np.floor(weights * n_records).astype(int)
    while counts.sum() < n_records:
        counts[int(np.argmax(weights * n_records - counts))] += 1
    return np.repeat(np.array(neg, dtype=np.int64), counts)[:n_records]


def _cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-12)


def _analytic(model: nn.Module, gradient: torch.Tensor, n_features: int) -> np.ndarray:
    first = list(model.parameters())[:2]
    if (
        len(first) < 2
        or first[0].ndim != 2
        or first[0].shape[1] != n_features
        or first[1].ndim != 1
        or first[1].shape[0] != first[0].shape[0]
    ):
        raise UsageError(
            "The analytic gradient inversion needs a model whose first layer is Linear with a "
            "bias (kind 'logistic' or 'mlp'); use method='optimize' for this model."
        )
    out = first[0].shape[0]
    gW = gradient[: out * n_features].reshape(out, n_features)
    gb = gradient[out * n_features : out * n_features + out]
    i = int(torch.argmax(gb.abs()))
    if float(gb[i].abs()) < 1e-12:
        return np.full((1, n_features), 0.5, dtype=np.float32)
    return (gW[i] / gb[i]).reshape(1, -1).numpy().astype(np.float32)


def invert_gradient(
    model: nn.Module,
    params: Any,
    gradient: Any,
    *,
    n_records: int,
    labels: Any = None,
    method: str = "optimize",
    iterations: int = 400,
    lr: float = 0.1,
    restarts: int = 2,
    clip: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reconstruct ``n_records`` records from a gradient of the mean loss at ``params``.

    Args:
        model: the architecture (its own parameter values are not used).
        params: the global flat parameters the gradient was taken at (the server knows them).
        gradient: the observed flat gradient ``[P]`` (for an update ``u`` of one SGD step of
            size ``lr``: ``-u / lr``; the scale does not matter to the cosine objective).
        n_records: how many records to reconstruct, >= 1.
        labels: their labels if known; default inferred by :func:`infer_labels`.
        method: ``"optimize"`` (Geiping et al.) or ``"analytic"`` (first Linear layer).
        iterations: Adam steps per restart.
        lr: Adam's step size, in feature units.
        restarts: random starts; the best gradient match is kept.
        clip: the feature box the reconstructions are kept in.
        seed: seed of the random starts.

    Returns:
        ``(X_rec [n_records, F], labels [n_records], info)``; ``info`` has the final gradient
        cosine distance.
    """
    where = "invert_gradient"
    check_choice(method, "method", where, METHODS)
    k = check_int(n_records, "n_records", where, low=1)
    its = check_int(iterations, "iterations", where, low=1)
    step = check_float(lr, "lr", where, low=0.0, low_open=True)
    r = check_int(restarts, "restarts", where, low=1)
    p = _flat_params(model, params)
    g_true = torch.as_tensor(gradient, dtype=torch.float32).detach().reshape(-1)
    if g_true.shape != p.shape:
        raise UsageError(
            f"The 'gradient' parameter of {where} must have the model's {p.numel()} values. "
            f"Got {g_true.numel()} instead."
        )
    n_features = _n_features(model)
    if method == "analytic":
        rec = np.clip(_analytic(model, g_true, n_features), clip[0], clip[1])
        rec = np.repeat(rec, k, axis=0)
        return rec, infer_labels(model, g_true, k), {"method": "analytic"}
    f = functional_forward(model)
    n_out = int(f(p, torch.zeros(1, n_features)).shape[1])
    y = (
        infer_labels(model, g_true, k)
        if labels is None
        else as_labels(labels, k, n_classes_of(n_out), "labels", where).numpy()
    )
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(int(seed))
    best: tuple[float, torch.Tensor] | None = None
    for _ in range(r):
        x = (clip[0] + (clip[1] - clip[0]) * torch.rand(k, n_features, generator=gen))
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=step)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(its * 0.5), int(its * 0.75)], gamma=0.1
        )
        for _ in range(its):
            opt.zero_grad()
            with torch.enable_grad():
                q = p.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(
                    logits_loss(f(q, x), yt).mean(), q, create_graph=True
                )
                loss = _cosine_loss(g, g_true)
                loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(clip[0], clip[1])
        with torch.enable_grad():
            q = p.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(logits_loss(f(q, x.detach()), yt).mean(), q)
        final = float(_cosine_loss(g, g_true))
        if best is None or final < best[0]:
            best = (final, x.detach().clone())
    assert best is not None
    return best[1].numpy(), y, {"method": "optimize", "gradient_cosine_distance": best[0]}


def _n_features(model: nn.Module) -> int:
    """Input size of a privml model: a CNN starts with its reshape, the others with Linear."""
    for mod in model.modules():
        shape = getattr(mod, "shape", None)
        if isinstance(shape, tuple) and len(shape) == 3 and not isinstance(mod, nn.Linear):
            return int(np.prod(shape))
        if isinstance(mod, nn.Linear):
            return int(mod.in_features)
    raise UsageError(
        "cannot tell the input size of this model; pass a model built by "
        "privml.models.nets.build_model"
    )


def reconstruction_error(X_true: Any, X_rec: Any) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean squared error per feature after optimal one-to-one matching.

    Returns ``(mse, per_record_mse [n_true], match [n_true])``: ``match[i]`` is the index of
    the reconstruction matched to true record ``i``. With fewer reconstructions than true
    records the unmatched records are compared with their nearest reconstruction.
    """
    T = np.asarray(X_true, dtype=np.float64)
    R = np.asarray(X_rec, dtype=np.float64)
    if T.ndim != 2 or R.ndim != 2 or T.shape[1] != R.shape[1] or len(R) == 0:
        raise UsageError(
            "reconstruction_error needs two [n, F] arrays with the same F. "
            f"Got shapes {T.shape} and {R.shape}."
        )
    cost = ((T[:, None, :] - R[None, :, :]) ** 2).mean(axis=2)
    rows, cols = linear_sum_assignment(cost)
    match = cost.argmin(axis=1)
    match[rows] = cols
    per = cost[np.arange(len(T)), match]
    return float(per.mean()), per, match


@dataclass
class InversionResult:
    """Reconstruction error of one view of a site's update."""

    view: str
    method: str
    mse: float
    baseline_mse: float
    n_records: int
    n_sites: int
    labels_correct: float
    noise_multiplier: float | None = None
    identified: float | None = None
    reconstructions: np.ndarray | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_error(self) -> float:
        """``mse / baseline_mse``: near 0 is a perfect reconstruction, near 1 no better than
        guessing 0.5 everywhere."""
        return self.mse / self.baseline_mse if self.baseline_mse > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "method": self.method,
            "mse": self.mse,
            "baseline_mse": self.baseline_mse,
            "relative_error": self.relative_error,
            "n_records": self.n_records,
            "n_sites": self.n_sites,
            "labels_correct": self.labels_correct,
            "noise_multiplier": self.noise_multiplier,
            "identified": self.identified,
            **self.extra,
        }


def _identified(T: np.ndarray, R: np.ndarray, match: np.ndarray, pool: np.ndarray) -> float:
    """Share of true records whose reconstruction is nearer to them than to any pool record."""
    hits = 0
    for i, j in enumerate(match):
        d_true = ((T[i] - R[j]) ** 2).mean()
        d_pool = ((pool - R[j]) ** 2).mean(axis=1)
        others = d_pool[~np.all(np.isclose(pool, T[i]), axis=1)]
        hits += int(others.size == 0 or d_true < others.min())
    return hits / len(T)


def gradient_inversion(
    model: nn.Module,
    params: Any,
    site_batches: Sequence[tuple[Any, Any]],
    *,
    views: Sequence[str] = VIEWS,
    method: str = "optimize",
    target: int = 0,
    max_grad_norm: float = 1.0,
    noise_multiplier: float = 1.0,
    iterations: int = 400,
    restarts: int = 2,
    pool: Any = None,
    seed: int = 0,
) -> list[InversionResult]:
    """Invert the target site's update in each view and measure the reconstruction error.

    Args:
        model: the architecture; ``params`` the global model of the round (flat).
        site_batches: ``(X, y)`` of each site's local batch this round; ``site_batches[target]``
            is the victim. The ``secure_aggregation`` view sums all of them.
        views: any of ``"site"``, ``"dp"``, ``"secure_aggregation"``.
        method: ``"optimize"`` or ``"analytic"`` (see :func:`invert_gradient`).
        max_grad_norm, noise_multiplier: the DP-SGD settings of the ``dp`` view.
        iterations, restarts: optimisation budget of the attack.
        pool: optional ``[m, F]`` records of the population; with it, ``identified`` reports
            the share of victim records whose reconstruction is nearer to them than to anyone
            else in the pool.
        seed: seed of the noise and the attack.

    Returns:
        One :class:`InversionResult` per view, in the order given.
    """
    where = "gradient_inversion"
    for v in views:
        check_choice(v, "views", where, VIEWS)
    if not site_batches:
        raise UsageError(f"The 'site_batches' parameter of {where} must list at least one site.")
    t = check_int(target, "target", where, low=0, high=len(site_batches) - 1)
    X_t = np.asarray(site_batches[t][0], dtype=np.float32)
    y_t = np.asarray(site_batches[t][1])
    k = len(y_t)
    gen = torch.Generator().manual_seed(int(seed))
    pool_arr = None if pool is None else np.asarray(pool, dtype=np.float64)
    baseline = float(((X_t.astype(np.float64) - 0.5) ** 2).mean())
    out: list[InversionResult] = []
    for v in views:
        if v == "site":
            g = site_gradient(model, params, X_t, y_t)
            n_rec, n_sites, z = k, 1, None
        elif v == "dp":
            g = dp_site_gradient(
                model, params, X_t, y_t, max_grad_norm=max_grad_norm,
                noise_multiplier=noise_multiplier, generator=gen,
            )  # fmt: skip
            n_rec, n_sites, z = k, 1, float(noise_multiplier)
        else:
            sizes = [len(np.asarray(b[1])) for b in site_batches]
            g = torch.zeros_like(_flat_params(model, params))
            for (Xb, yb), n in zip(site_batches, sizes, strict=True):
                g += site_gradient(model, params, Xb, yb) * n
            g /= sum(sizes)
            n_rec, n_sites, z = sum(sizes), len(site_batches), None
        rec, labels, info = invert_gradient(
            model, params, g, n_records=n_rec, method=method, iterations=iterations,
            restarts=restarts, seed=seed,
        )  # fmt: skip
        mse, per, match = reconstruction_error(X_t, rec)
        labels_ok = float(np.mean(labels[match] == y_t)) if len(labels) else 0.0
        ident = None
        if pool_arr is not None:
            ident = _identified(X_t.astype(np.float64), rec.astype(np.float64), match, pool_arr)
        out.append(
            InversionResult(
                view=v, method=method, mse=mse, baseline_mse=baseline, n_records=k,
                n_sites=n_sites, labels_correct=labels_ok, noise_multiplier=z, identified=ident,
                reconstructions=rec[match], extra={k2: v2 for k2, v2 in info.items()
                                                   if k2 != "method"},
            )  # fmt: skip
        )
    return out
