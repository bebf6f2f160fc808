"""Evasion attacks: FGSM and PGD under L-infinity and L2 budgets, written in torch.

The attacks follow the Adversarial Robustness Toolbox (ART 1.20) step for step, so that with
the same start they produce the same adversarial examples (tested against
``art.attacks.evasion.FastGradientMethod`` and ``ProjectedGradientDescent`` in
tests/security/test_evasion.py):

* FGSM (Goodfellow et al. 2015): ``x + eps * sign(grad)`` (L-inf) or ``x + eps * grad /
  ||grad||_2`` (L2), then clipped to the feature box.
* PGD (Madry et al. 2018): from ``x`` (or a uniform random start in the ball), ``steps``
  steps of size ``step_size`` along the sign (L-inf) or the normalised gradient (L2) of the
  loss, each followed by clipping to the feature box and projection back onto the ``eps``
  ball around ``x``. With ``restarts > 1`` a record keeps the first restart that fools the
  model (ART's ``num_random_init``).

Budgets are in the units of the encoded features, which privml scales into [0, 1] by their
declared public bounds: ``eps = 0.1`` under L-inf lets the attacker move every feature by a
tenth of its declared range. The loss is the model's training loss (cross-entropy over the
logits; binary cross-entropy for a one-logit binary model). Integer, one-hot and
missing-indicator features are perturbed as real numbers unless excluded with
``feature_mask``; for tabular data pass a mask of the numeric columns for a realistic threat.

The core :func:`perturb` works on any leading batch shape (``[n, F]`` or the federated
engine's ``[sites, batch, F]``) and is what adversarial training
(:mod:`privml.security.defenses.adversarial`) calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privml.errors import UsageError
from privml.security._checks import (
    as_features,
    as_labels,
    check_choice,
    check_float,
    check_int,
    n_classes_of,
)

__all__ = [
    "NORMS",
    "RobustAccuracy",
    "fgsm",
    "logits_loss",
    "perturb",
    "pgd",
    "robust_accuracy",
]

Norm = Literal["inf", "2"]
NORMS: tuple[str, ...] = ("inf", "2")
"""Supported perturbation norms: L-infinity and L2 (per record, over its features)."""

#: Loss of each record from its inputs, shaped like the inputs without the feature axis.
RecordLoss = Callable[[torch.Tensor], torch.Tensor]


def logits_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-record training loss from logits ``[..., out]`` and labels ``[...]``."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(
            logits[..., 0], y.to(logits.dtype), reduction="none"
        )
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return flat.reshape(y.shape)


def _norm_name(norm: Any, where: str) -> str:
    aliases = {"inf": "inf", "linf": "inf", "l_inf": "inf", "2": "2", "l2": "2"}
    if isinstance(norm, float | int) and not isinstance(norm, bool):
        key = "inf" if norm == float("inf") else str(int(norm)) if norm == int(norm) else "?"
    else:
        key = str(norm).lower()
    if key not in aliases:
        raise UsageError(
            f"The 'norm' parameter of {where} must be 'inf' or '2' (L-infinity or L2). "
            f"Got {norm!r} instead."
        )
    return aliases[key]


def _check_clip(clip: Any, where: str) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        lo, hi = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise UsageError(
            f"The 'clip' parameter of {where} must be (min, max) or None. Got {clip!r} instead."
        ) from None
    if not lo < hi:
        raise UsageError(
            f"The 'clip' parameter of {where} must satisfy min < max. Got {clip!r} instead."
        )
    return lo, hi


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit norm per record (ART's ``_compute_perturbation``)."""
    if norm == "inf":
        return grad.sign()
    n = torch.linalg.vector_norm(grad, ord=2, dim=-1, keepdim=True)
    return grad * torch.where(n == 0, torch.ones_like(n), 1.0 / n)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projection onto the ``eps`` ball (ART's ``_projection``)."""
    if norm == "inf":
        return delta.sign() * torch.minimum(delta.abs(), torch.tensor(eps, dtype=delta.dtype))
    n = torch.linalg.vector_norm(delta, ord=2, dim=-1, keepdim=True)
    factor = torch.where(n == 0, torch.ones_like(n), torch.clamp(eps / n, max=1.0))
    return delta * factor


def _random_start(
    X: torch.Tensor, eps: float, norm: str, generator: torch.Generator
) -> torch.Tensor:
    """A uniform draw from the ``eps`` ball around each record (ART's ``random_sphere``)."""
    if norm == "inf":
        u = torch.rand(X.shape, generator=generator, dtype=X.dtype)
        return (2 * u - 1) * eps
    d = X.shape[-1]
    g = torch.randn(X.shape, generator=generator, dtype=X.dtype)
    g = g / torch.linalg.vector_norm(g, dim=-1, keepdim=True).clamp_min(1e-12)
    r = torch.rand((*X.shape[:-1], 1), generator=generator, dtype=X.dtype) ** (1.0 / d)
    return g * r * eps


def _input_grad(loss_of: RecordLoss, X: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        x = X.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of(x).sum(), x)
    return g


def perturb(
    loss_of: RecordLoss,
    X: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "inf",
    random_init: bool = False,
    clip: tuple[float, float] | None = (0.0, 1.0),
    feature_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD on already validated tensors; ``steps=1, step_size=eps`` without start is FGSM.

    Args:
        loss_of: maps inputs ``[..., F]`` to per-record losses ``[...]`` (to be increased).
        X: clean inputs ``[..., F]``.
        eps: budget (radius of the ball), > 0.
        steps: gradient steps, >= 1.
        step_size: length of each step in the ``norm``.
        norm: ``"inf"`` or ``"2"``.
        random_init: start from a uniform draw in the ball rather than from ``X``.
        clip: feature box, or None for unbounded features.
        feature_mask: ``[F]`` of 0/1; features with 0 are never changed.
        generator: torch random generator for the random start.

    Returns:
        Adversarial inputs, detached, same shape as ``X``.
    """
    X = X.detach()
    lo_hi = None if clip is None else (torch.tensor(clip[0]), torch.tensor(clip[1]))

    def box(x: torch.Tensor) -> torch.Tensor:
        return x if lo_hi is None else torch.max(torch.min(x, lo_hi[1]), lo_hi[0])

    x_adv = X
    if random_init:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        start = _random_start(X, eps, norm, gen)
        if feature_mask is not None:
            start = start * feature_mask
        x_adv = box(X + start)
    for _ in range(steps):
        g = _input_grad(loss_of, x_adv)
        g = torch.nan_to_num(g, nan=0.0)
        if feature_mask is not None:
            g = g * feature_mask
        x_adv = box(x_adv + step_size * _direction(g, norm))
        x_adv = X + _project(x_adv - X, eps, norm)
    return x_adv.detach()


def _n_outputs(model: nn.Module, n_features: int) -> int:
    with torch.no_grad():
        out = model(torch.zeros(1, n_features))
    if out.ndim != 2:
        raise UsageError(
            f"The model must map [n, {n_features}] inputs to [n, n_outputs] logits. "
            f"Got an output of shape {tuple(out.shape)}."
        )
    return int(out.shape[1])


def _prepare(
    model: nn.Module, X: Any, y: Any, where: str, feature_mask: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"The 'model' parameter of {where} must be a torch.nn.Module (privml.models.nets."
            f"build_model). Got {type(model).__name__} instead."
        )
    Xt = as_features(X, "X", where)
    n_out = _n_outputs(model, Xt.shape[1])
    yt = as_labels(y, Xt.shape[0], n_classes_of(n_out), "y", where)
    mask = None
    if feature_mask is not None:
        m = np.asarray(feature_mask)
        if m.shape != (Xt.shape[1],):
            raise UsageError(
                f"The 'feature_mask' parameter of {where} must have shape ({Xt.shape[1]},), "
                f"one flag per feature. Got shape {m.shape} instead."
            )
        mask = torch.from_numpy(m.astype(np.float32))
    return Xt, yt, mask


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode with parameter gradients off, restored on exit (attacks need input
    gradients only)."""
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, r in zip(model.parameters(), req, strict=True):
            p.requires_grad_(r)
        model.train(was_training)


def fgsm(
    model: nn.Module,
    X: Any,
    y: Any,
    *,
    eps: float,
    norm: str = "inf",
    clip: tuple[float, float] | None = (0.0, 1.0),
    feature_mask: Any = None,
    batch_size: int = 512,
) -> np.ndarray:
    """Fast gradient (sign) method (Goodfellow et al. 2015): one step of length ``eps``.

    Args:
        model: a torch module mapping ``[n, F]`` encoded features to logits.
        X: clean records ``[n, F]``, float, in the units of the encoded features.
        y: their true integer labels ``[n]``.
        eps: perturbation budget, > 0 (L-inf: per feature; L2: per record).
        norm: ``"inf"`` or ``"2"``.
        clip: the valid feature box (privml's encoded features live in [0, 1]); None: none.
        feature_mask: ``[F]`` 0/1 flags of the features the attacker may change.
        batch_size: records per gradient computation.

    Returns:
        float32 ``[n, F]`` adversarial records.
    """
    where = "fgsm"
    e = check_float(eps, "eps", where, low=0.0, low_open=True)
    nm = _norm_name(norm, where)
    box = _check_clip(clip, where)
    bs = check_int(batch_size, "batch_size", where, low=1)
    Xt, yt, mask = _prepare(model, X, y, where, feature_mask)
    parts = []
    with frozen(model):
        for start in range(0, Xt.shape[0], bs):
            xb, yb = Xt[start : start + bs], yt[start : start + bs]

            def loss_of(x: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
                return logits_loss(model(x), yb)

            parts.append(
                perturb(
                    loss_of, xb, eps=e, steps=1, step_size=e, norm=nm, clip=box,
                    feature_mask=mask,
                )  # fmt: skip
            )
    return torch.cat(parts).numpy()


def pgd(
    model: nn.Module,
    X: Any,
    y: Any,
    *,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    norm: str = "inf",
    random_init: bool = True,
    restarts: int = 1,
    clip: tuple[float, float] | None = (0.0, 1.0),
    feature_mask: Any = None,
    seed: int = 0,
    batch_size: int = 512,
) -> np.ndarray:
    """Projected gradient descent (Madry et al. 2018) under an L-inf or L2 budget.

    Args:
        model: a torch module mapping ``[n, F]`` encoded features to logits.
        X: clean records ``[n, F]``.
        y: their true integer labels ``[n]``.
        eps: budget, > 0, in encoded-feature units (L-inf per feature, L2 per record).
        steps: iterations, >= 1 (PGD-20 by default).
        step_size: length of each step; default ``2.5 * eps / steps`` (Madry et al.).
        norm: ``"inf"`` or ``"2"``.
        random_init: start from a uniform point of the ball (as Madry et al.).
        restarts: independent random starts; a record keeps the first that fools the model.
        clip: the valid feature box; None for none.
        feature_mask: ``[F]`` 0/1 flags of the features the attacker may change.
        seed: seed of the random starts.
        batch_size: records per gradient computation.

    Returns:
        float32 ``[n, F]`` adversarial records.
    """
    where = "pgd"
    e = check_float(eps, "eps", where, low=0.0, low_open=True)
    k = check_int(steps, "steps", where, low=1)
    a = (
        2.5 * e / k
        if step_size is None
        else check_float(step_size, "step_size", where, low=0.0, low_open=True)
    )
    nm = _norm_name(norm, where)
    box = _check_clip(clip, where)
    r = check_int(restarts, "restarts", where, low=1)
    bs = check_int(batch_size, "batch_size", where, low=1)
    Xt, yt, mask = _prepare(model, X, y, where, feature_mask)
    gen = torch.Generator().manual_seed(int(seed))
    parts = []
    with frozen(model):
        for start in range(0, Xt.shape[0], bs):
            xb, yb = Xt[start : start + bs], yt[start : start + bs]

            def loss_of(x: torch.Tensor, yb: torch.Tensor = yb) -> torch.Tensor:
                return logits_loss(model(x), yb)

            best = perturb(
                loss_of, xb, eps=e, steps=k, step_size=a, norm=nm, random_init=random_init,
                clip=box, feature_mask=mask, generator=gen,
            )  # fmt: skip
            if r > 1 and random_init:
                fooled = predict(model, best) != yb
                for _ in range(r - 1):
                    if bool(fooled.all()):
                        break
                    cand = perturb(
                        loss_of, xb, eps=e, steps=k, step_size=a, norm=nm, random_init=True,
                        clip=box, feature_mask=mask, generator=gen,
                    )  # fmt: skip
                    new = (predict(model, cand) != yb) & ~fooled
                    best[new] = cand[new]
                    fooled |= new
            parts.append(best)
    return torch.cat(parts).numpy()


def predict(model: nn.Module, X: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Predicted class of each record (threshold 0 on a single logit, argmax otherwise)."""
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(X, dtype=np.float32)))
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.int64)
    return logits.argmax(dim=1)


def accuracy(model: nn.Module, X: Any, y: Any) -> float:
    """Fraction of records ``X`` the model labels ``y``."""
    pred = predict(model, X).numpy()
    return float((pred == np.asarray(y)).mean())


@dataclass
class RobustAccuracy:
    """Accuracy under attack at each budget (``accuracy[i]`` at ``budgets[i]``)."""

    attack: str
    norm: str
    budgets: list[float]
    accuracy: list[float]
    clean_accuracy: float
    steps: int
    n: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "norm": self.norm,
            "budgets": list(self.budgets),
            "accuracy": list(self.accuracy),
            "clean_accuracy": self.clean_accuracy,
            "steps": self.steps,
            "n": self.n,
            **self.extra,
        }


def robust_accuracy(
    model: nn.Module,
    X: Any,
    y: Any,
    *,
    budgets: Sequence[float],
    norm: str = "inf",
    attack: str = "pgd",
    steps: int = 20,
    restarts: int = 1,
    clip: tuple[float, float] | None = (0.0, 1.0),
    feature_mask: Any = None,
    seed: int = 0,
) -> RobustAccuracy:
    """Accuracy of ``model`` on ``(X, y)`` under ``attack`` at each budget in ``budgets``.

    Args:
        budgets: perturbation budgets (> 0; 0 entries report the clean accuracy).
        attack: ``"pgd"`` (``steps`` steps of ``2.5 eps / steps``, random start) or ``"fgsm"``.
        Others as in :func:`pgd`.

    Returns:
        :class:`RobustAccuracy`; robust accuracy never exceeds the clean accuracy by more than
        the records a perturbation happens to fix.
    """
    where = "robust_accuracy"
    check_choice(attack, "attack", where, ("pgd", "fgsm"))
    nm = _norm_name(norm, where)
    bs = [check_float(b, "budgets", where, low=0.0) for b in budgets]
    if not bs:
        raise UsageError(f"The 'budgets' parameter of {where} must list at least one budget.")
    Xt, yt, _ = _prepare(model, X, y, where, feature_mask)
    clean = accuracy(model, Xt, yt.numpy())
    accs = []
    for b in bs:
        if b == 0:
            accs.append(clean)
            continue
        if attack == "fgsm":
            adv = fgsm(model, Xt, yt.numpy(), eps=b, norm=nm, clip=clip, feature_mask=feature_mask)
        else:
            adv = pgd(
                model, Xt, yt.numpy(), eps=b, steps=steps, norm=nm, restarts=restarts, clip=clip,
                feature_mask=feature_mask, seed=seed,
            )  # fmt: skip
        accs.append(accuracy(model, adv, yt.numpy()))
    return RobustAccuracy(
        attack, nm, bs, accs, clean, 1 if attack == "fgsm" else steps, int(Xt.shape[0])
    )
