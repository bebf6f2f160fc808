"""Adversarial training: PGD-AT (Madry et al. 2018) and TRADES (Zhang et al. 2019).

Both are :class:`privml.models.training.GradientRule` s, so they plug into the same vectorized local
trainer every federated engine uses (:func:`privml.models.training.train_cohort`): each site trains
on adversarial versions of its own mini-batches, crafted with the current local model, and no
record leaves the site. :func:`adversarial_train` runs one model on one dataset (a single
"site") for the centralised case and for tests.

* ``pgd`` (PGD-AT): minimise the loss at the worst point of the ``eps`` ball found by PGD with
  a random start, ``min_w E max_{||d|| <= eps} L(w, x + d, y)``.
* ``trades``: minimise ``L(w, x, y) + beta * KL(p(x) || p(x'))``, ``x'`` found by PGD on the
  KL term from ``x + 0.001 N(0, 1)``; ``beta`` trades clean accuracy for robustness
  (the paper's 6.0 by default).

``warmup`` ramps the training budget linearly from 0 to ``eps`` over the first fraction of
the steps, which stabilises training of small models (the attack budget at evaluation is
unaffected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from privml.errors import UsageError
from privml.models.nets import (
    ModelSpec,
    build_model,
    flat_params,
    functional_forward,
    load_flat_params,
    stacked_forward,
)
from privml.models.training import Batch, CohortData, shuffled_batches
from privml.security._checks import (
    as_features,
    as_labels,
    check_choice,
    check_float,
    check_int,
    n_classes_of,
)
from privml.security.attacks.evasion import _norm_name, logits_loss, perturb

__all__ = ["METHODS", "AdversarialGradient", "AdversarialTraining", "adversarial_train"]

METHODS: tuple[str, ...] = ("pgd", "trades")


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log class probabilities; a single logit ``z`` is the two-class ``[0, z]``."""
    if logits.shape[-1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
    return F.log_softmax(logits, dim=-1)


def _kl(clean_logp: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """Per-record ``KL(p_clean || p_adv)``."""
    return F.kl_div(
        _log_probs(adv_logits), clean_logp, log_target=True, reduction="none"
    ).sum(dim=-1)


class AdversarialGradient:
    """A :class:`~privml.models.training.GradientRule` for adversarial training of every site.

    Args:
        model: the architecture (any instance built from ``spec``; only its structure is used).
        spec: the model spec; Linear-stack models use the fast batched forward.
        binary: one-logit binary task (BCE) rather than multiclass (CE).
        eps: training budget, > 0, in encoded-feature units.
        norm: ``"inf"`` or ``"2"``.
        steps: PGD steps per mini-batch (>= 1; 7-10 is the usual choice).
        step_size: default ``2.5 * eps / steps``.
        method: ``"pgd"`` or ``"trades"``.
        beta: TRADES' robustness weight, > 0.
        clip: the feature box, None for unbounded features.
        warmup_steps: local steps over which the budget ramps from 0 to ``eps``.
        random_init: PGD-AT starts each attack at a uniform point of the ball (Madry et al.);
            the draws come from one generator for the whole cohort.
        seed: seed of the random starts.
        feature_mask: ``[F]`` 0/1 flags of the features the training attack may move (tabular
            data: the numeric columns, so one-hot and missing-indicator columns stay valid);
            None moves every feature.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec,
        *,
        binary: bool,
        eps: float,
        norm: str = "inf",
        steps: int = 10,
        step_size: float | None = None,
        method: str = "pgd",
        beta: float = 6.0,
        clip: tuple[float, float] | None = (0.0, 1.0),
        warmup_steps: int = 0,
        random_init: bool = True,
        seed: int = 0,
        feature_mask: Any = None,
    ) -> None:
        where = "AdversarialGradient"
        self.feature_mask = (
            None
            if feature_mask is None
            else torch.as_tensor(np.asarray(feature_mask, dtype=np.float32))
        )
        self.random_init = bool(random_init)
        self.eps = check_float(eps, "eps", where, low=0.0, low_open=True)
        self.norm = _norm_name(norm, where)
        self.steps = check_int(steps, "steps", where, low=1)
        self.step_size = (
            None
            if step_size is None
            else check_float(step_size, "step_size", where, low=0.0, low_open=True)
        )
        self.method = check_choice(method, "method", where, METHODS)
        self.beta = check_float(beta, "beta", where, low=0.0, low_open=True)
        self.clip = clip
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", where, low=0)
        self.binary = binary
        fast = stacked_forward(spec)
        if fast is not None:
            self._forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = fast
        else:
            single = functional_forward(model)
            many = vmap(single)

            def forward(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                # one site (centralised training): skip vmap's overhead (about 1.5x here)
                return single(p[0], x[0]).unsqueeze(0) if p.shape[0] == 1 else many(p, x)

            self._forward = forward
        self._gen = torch.Generator().manual_seed(int(seed))
        self._calls = 0

    def budget(self, call: int) -> float:
        """The training budget at the ``call``-th local step (after warm-up: ``eps``)."""
        if self.warmup_steps == 0 or call >= self.warmup_steps:
            return self.eps
        return self.eps * (call + 1) / self.warmup_steps

    def __call__(self, params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        eps = self.budget(self._calls)
        self._calls += 1
        a = self.step_size if self.step_size is not None else 2.5 * eps / self.steps
        p0 = params.detach()
        X, y, mask = batch.X, batch.y, batch.mask
        if self.method == "pgd":
            x_adv = perturb(
                lambda x: logits_loss(self._forward(p0, x), y), X, eps=eps, steps=self.steps,
                step_size=a, norm=self.norm, random_init=self.random_init, clip=self.clip,
                generator=self._gen, feature_mask=self.feature_mask,
            )  # fmt: skip
        else:
            with torch.no_grad():
                clean_logp = _log_probs(self._forward(p0, X))
            jitter = 0.001 * torch.randn(X.shape, generator=self._gen)
            if self.feature_mask is not None:
                jitter = jitter * self.feature_mask
            start = X + jitter
            x_adv = perturb(
                lambda x: _kl(clean_logp, self._forward(p0, x)), start, eps=eps,
                steps=self.steps, step_size=a, norm=self.norm, clip=self.clip,
                feature_mask=self.feature_mask,
            )  # fmt: skip
            # perturb projects around its start; bring the result back around X.
            x_adv = _reproject(x_adv, X, eps, self.norm, self.clip)
        with torch.enable_grad():
            p = p0.clone().requires_grad_(True)
            if self.method == "pgd":
                losses = logits_loss(self._forward(p, x_adv), y)
            else:
                clean = self._forward(p, X)
                losses = logits_loss(clean, y) + self.beta * _kl(
                    _log_probs(clean), self._forward(p, x_adv)
                )
            per_site = (losses * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            (g,) = torch.autograd.grad(per_site.sum(), p)
        return g


def _reproject(
    x: torch.Tensor, center: torch.Tensor, eps: float, norm: str, clip: tuple[float, float] | None
) -> torch.Tensor:
    d = x - center
    if norm == "inf":
        d = d.clamp(-eps, eps)
    else:
        n = torch.linalg.vector_norm(d, dim=-1, keepdim=True)
        d = d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    out = center + d
    return out if clip is None else out.clamp(clip[0], clip[1])


@dataclass
class AdversarialTraining:
    """An adversarially trained model and how it was trained."""

    model: nn.Module
    params: torch.Tensor
    spec: ModelSpec
    settings: dict[str, Any]
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _optimizer(name: str, flat: torch.Tensor, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam([flat], lr=lr)
    if name == "momentum":
        return torch.optim.SGD([flat], lr=lr, momentum=0.9)
    return torch.optim.SGD([flat], lr=lr)


def adversarial_train(
    X: Any,
    y: Any,
    spec: ModelSpec,
    *,
    eps: float,
    norm: str = "inf",
    method: str = "pgd",
    steps: int = 10,
    beta: float = 6.0,
    epochs: int = 40,
    lr: float = 3e-3,
    optimizer: str = "adam",
    batch_size: int = 64,
    warmup: float = 0.3,
    clip: tuple[float, float] | None = (0.0, 1.0),
    seed: int = 0,
    init: torch.Tensor | None = None,
    on_epoch: Callable[[int, nn.Module], dict[str, float] | None] | None = None,
) -> AdversarialTraining:
    """Train ``spec`` on ``(X, y)`` with PGD-AT or TRADES (centralised, one dataset).

    The adversarial gradient is :class:`AdversarialGradient`'s, the rule federated sites use;
    here its steps are taken by Adam (or SGD), which converges in fewer epochs.

    Args:
        X: encoded training records ``[n, F]`` (features in [0, 1] for privml's encoding).
        y: integer labels ``[n]``.
        spec: the architecture (``spec.n_features`` must equal ``F``).
        eps: training budget, > 0, in encoded-feature units (L-inf: per feature).
        norm: ``"inf"`` or ``"2"``.
        method: ``"pgd"`` (Madry et al.) or ``"trades"`` (Zhang et al.).
        steps: PGD steps per mini-batch.
        beta: TRADES' weight (ignored by ``pgd``).
        epochs: passes over the data, >= 1.
        lr: step size of the optimizer, > 0.
        optimizer: ``"adam"`` (default), ``"momentum"`` (SGD, momentum 0.9) or ``"sgd"``.
        batch_size: records per step.
        warmup: fraction of the training over which the budget ramps up to ``eps``, in [0, 1).
        clip: the feature box.
        seed: seed of the initialisation, the shuffling and the random starts.
        init: starting flat parameters (default: a fresh initialisation from ``seed``).
        on_epoch: called after every epoch with (epoch, model); a returned dict is recorded
            in ``history``.

    Returns:
        :class:`AdversarialTraining` with the trained model (eval mode).
    """
    import time

    where = "adversarial_train"
    Xt = as_features(X, "X", where, n_features=spec.n_features)
    yt = as_labels(y, Xt.shape[0], n_classes_of(spec.n_outputs), "y", where)
    n_epochs = check_int(epochs, "epochs", where, low=1)
    bs = check_int(batch_size, "batch_size", where, low=1)
    step_lr = check_float(lr, "lr", where, low=0.0, low_open=True)
    check_choice(optimizer, "optimizer", where, ("adam", "momentum", "sgd"))
    wu = check_float(warmup, "warmup", where, low=0.0, high=1.0, high_open=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    params = flat_params(model) if init is None else init.detach().to(torch.float32).clone()
    if params.shape != flat_params(model).shape:
        raise UsageError(
            f"The 'init' parameter of {where} must have {flat_params(model).numel()} values "
            f"(the model's parameters). Got {params.numel()} instead."
        )
    steps_per_epoch = -(-Xt.shape[0] // bs)
    rule = AdversarialGradient(
        model, spec, binary=spec.n_outputs == 1, eps=eps, norm=norm, steps=steps,
        method=method, beta=beta, clip=clip, seed=seed,
        warmup_steps=int(wu * n_epochs * steps_per_epoch),
    )  # fmt: skip
    data = CohortData.from_arrays([Xt.numpy()], [yt.numpy()])
    rng = np.random.default_rng([seed, 7])
    flat = params.clone().reshape(1, -1).requires_grad_(False)
    opt = _optimizer(optimizer, flat, step_lr)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    k = 0
    for epoch in range(n_epochs):
        idx, mask = shuffled_batches(data.sizes, batch_size=bs, epochs=1, rngs=[rng])
        for j in range(idx.shape[1]):
            rows = torch.from_numpy(idx[:, j, :])
            batch = Batch(data.X[rows], data.y[rows], torch.from_numpy(mask[:, j, :]))
            flat.grad = rule(flat.detach(), batch, k)
            opt.step()
            k += 1
        if on_epoch is not None:
            load_flat_params(model, flat.detach()[0])
            model.eval()
            rec = on_epoch(epoch, model)
            if rec:
                history.append({"epoch": float(epoch), **rec})
    params = flat.detach()[0].clone()
    load_flat_params(model, params)
    model.eval()
    settings = {
        "method": rule.method, "eps": rule.eps, "norm": rule.norm, "steps": rule.steps,
        "beta": rule.beta, "epochs": n_epochs, "lr": step_lr, "optimizer": optimizer,
        "batch_size": bs, "warmup": wu,
        "seed": seed,
    }  # fmt: skip
    return AdversarialTraining(model, params, spec, settings, time.perf_counter() - t0, history)
