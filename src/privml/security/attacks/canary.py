"""Privacy auditing with one training run (Steinke, Nasr and Jagielski 2023).

The membership game of :mod:`privml.security.attacks.membership` needs many trained models
(or pools many records per model and loses power). Steinke et al. show that one training run
suffices: insert ``m`` random **canaries**, each included in the training data independently
with probability 1/2; after training, score every canary (here ``-loss`` of its label under
the trained model), guess "included" for the ``k+`` highest scores and "excluded" for the
``k-`` lowest, abstain on the rest. If training is ``epsilon``-DP, the number ``W`` of correct
guesses among the ``r = k+ + k-`` made is stochastically dominated by
``Binomial(r, e^eps / (1 + e^eps))`` (their Theorem 3.1); for ``(epsilon, delta)``-DP the
tail gains a term ``2 m delta alpha`` (their Theorem 5.2, ``alpha`` the largest average of the
binomial's probability mass just below ``v``). The audit reports the largest ``epsilon`` whose
p-value for the observed ``W = v`` is below ``1 - confidence``: a lower bound on the epsilon of
the training run that holds with that confidence.

The guess counts are fixed before looking at the membership: privml tries a small grid of
``r`` (shares of ``m``) and splits ``1 - confidence`` evenly over them (Bonferroni), so taking
the best of the grid stays honest. The report also gives the largest bound the grid *could*
certify (every guess right), so that a bound of 0 reads as "cannot certify above X with m
canaries", not "no leakage".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from privml.data.federation import FederatedData, SiteData
from privml.errors import UsageError
from privml.security._checks import check_float, check_int

__all__ = [
    "GUESS_FRACTIONS",
    "CanaryAudit",
    "canary_audit",
    "insert_canaries",
    "one_run_epsilon",
    "one_run_p_value",
    "run_canary_audit",
]

GUESS_FRACTIONS: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5)
"""Guesses made (``r``) as shares of the canaries; half "included", half "excluded"."""


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` (``m`` canaries) if the
    training is ``(epsilon, delta)``-DP (Steinke et al. 2023, Theorems 3.1 and 5.2)."""
    if not 0 <= v <= r <= m:
        raise UsageError(f"one_run_p_value needs 0 <= v <= r <= m. Got v={v}, r={r}, m={m}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))
    if delta <= 0 or v == 0:
        return min(beta, 1.0)
    # alpha = max over i in 1..v of P[v - i <= Binomial(r, q) < v] / i
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_epsilon(
    m: int, r: int, v: int, *, delta: float = 0.0, significance: float = 0.05
) -> float:
    """The largest epsilon at which ``v`` correct guesses of ``r`` has p-value below
    ``significance`` (0 when even epsilon = 0 cannot be rejected)."""
    if one_run_p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < significance:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < significance:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class CanaryAudit:
    """The outcome of a one-run canary audit.

    Attributes:
        epsilon: the certified lower bound (at ``confidence``; 0: none).
        max_certifiable: the largest bound the guess grid could certify with these canaries.
        m: canaries; included: how many were in the training data.
        guesses, correct: ``r`` and ``v`` of the guess count that gave ``epsilon``.
        delta, confidence: the audited delta and the confidence of the bound.
        accountant_epsilon: the training's epsilon (None: non-private), ``violation`` when
            the bound exceeds it.
        grid: per guess count, ``{"guesses", "correct", "epsilon"}``.
    """

    epsilon: float
    max_certifiable: float
    m: int
    included: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    accountant_epsilon: float | None = None
    violation: bool = False
    grid: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": "one_run_canaries",
            "epsilon": self.epsilon,
            "max_certifiable": self.max_certifiable,
            "m": self.m,
            "included": self.included,
            "guesses": self.guesses,
            "correct": self.correct,
            "delta": self.delta,
            "confidence": self.confidence,
            "accountant_epsilon": self.accountant_epsilon,
            "violation": self.violation,
            "grid": self.grid,
            **self.extra,
        }


def canary_audit(
    scores: Any,
    included: Any,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
    accountant_epsilon: float | None = None,
) -> CanaryAudit:
    """Steinke et al.'s bound from the canaries' scores and their (secret) inclusion.

    Args:
        scores: ``[m]`` canary scores, higher for "more likely included".
        included: ``[m]`` booleans, which canaries were in the training data.
        delta: the delta of the audited guarantee (0 for pure DP), in [0, 1).
        confidence: confidence of the bound, in (0, 1).
        fractions: guess counts as shares of ``m`` (Bonferroni over them).
        accountant_epsilon: the run's epsilon, to flag a violation.
    """
    where = "canary_audit"
    d = check_float(delta, "delta", where, low=0.0, high=1.0, high_open=True)
    c = check_float(confidence, "confidence", where, low=0.0, high=1.0, low_open=True,
                    high_open=True)  # fmt: skip
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    if s.ndim != 1 or inc.shape != s.shape or len(s) < 2:
        raise UsageError(
            f"The 'scores' and 'included' parameters of {where} must be 1-D of the same length "
            f">= 2. Got shapes {s.shape} and {inc.shape} instead."
        )
    if not np.isfinite(s).all():
        raise UsageError(f"The 'scores' parameter of {where} contains NaN or Inf.")
    m = len(s)
    ks = sorted({max(1, int(round(f * m / 2))) for f in fractions if 0 < f <= 1})
    if not ks:
        raise UsageError(f"The 'fractions' parameter of {where} must hold shares in (0, 1].")
    sig = (1 - c) / len(ks)
    order = np.argsort(-s, kind="stable")
    grid: list[dict[str, float]] = []
    cap = 0.0
    for k in ks:
        k = min(k, m // 2)
        top, bottom = order[:k], order[m - k :]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        r = 2 * k
        e = one_run_epsilon(m, r, v, delta=d, significance=sig)
        cap = max(cap, one_run_epsilon(m, r, r, delta=d, significance=sig))
        grid.append({"guesses": r, "correct": v, "epsilon": e})
    best = max(grid, key=lambda g: g["epsilon"])  # first of equals: the fewest guesses
    res = CanaryAudit(
        epsilon=best["epsilon"], max_certifiable=cap, m=m, included=int(inc.sum()),
        guesses=int(best["guesses"]), correct=int(best["correct"]), delta=d, confidence=c,
        grid=grid,
    )  # fmt: skip
    if accountant_epsilon is not None:
        res.accountant_epsilon = float(accountant_epsilon)
        res.violation = res.epsilon > res.accountant_epsilon * (1 + 1e-9)
    return res


def insert_canaries(
    fed: FederatedData,
    canaries_X: np.ndarray,
    canaries_y: np.ndarray,
    included: np.ndarray,
) -> FederatedData:
    """A copy of ``fed`` whose sites' training data also hold the included canaries, dealt to
    the sites in turn (canary ``i`` to site ``i mod n_sites``); test data unchanged."""
    inc = np.asarray(included, dtype=bool)
    n = len(fed.sites)
    sites: list[SiteData] = []
    for j, s in enumerate(fed.sites):
        pick = np.flatnonzero(inc & (np.arange(len(inc)) % n == j))
        X = np.concatenate([s.X_train, canaries_X[pick]]).astype(np.float32)
        y = np.concatenate([s.y_train, canaries_y[pick].astype(s.y_train.dtype)])
        sites.append(SiteData(s.name, X, y, s.X_test, s.y_test))
    return FederatedData(sites, fed.encoder, fed.task, list(fed.inferred_columns),
                         list(fed.notes), fed.truth)  # fmt: skip


#: Trains on a federation and returns ``(model, accountant epsilon or None)``.
CanaryTrainer = Callable[[FederatedData], tuple[Any, float | None]]


def run_canary_audit(
    fed: FederatedData,
    train: CanaryTrainer,
    *,
    m: int,
    delta: float = 0.0,
    confidence: float = 0.95,
    seed: int = 0,
) -> CanaryAudit:
    """Insert ``m`` random canaries (schema-valid records with random labels), each with
    probability 1/2, train once with ``train``, and audit (:func:`canary_audit`).

    Args:
        fed: the federation (the canaries are added to its sites' training data).
        train: trains a model on a federation; returns it and the accountant's epsilon.
        m: canaries, >= 2.
        delta: delta of the audited guarantee (the accountant's; 0 for non-private runs).
        confidence: confidence of the bound.
        seed: seed of the canaries and their inclusion.
    """
    from privml.security.attacks.membership import record_losses
    from privml.security.tabular import FeatureLayout, random_records

    k = check_int(m, "m", "run_canary_audit", low=2)
    rng = np.random.default_rng([seed, 1, 2023])
    layout = FeatureLayout.from_encoder(fed.encoder, fed.n_features)
    Xc = random_records(layout, k, rng=rng)
    n_classes = max(2, len(fed.task.classes))
    yc = rng.integers(0, n_classes, k).astype(np.int64)
    inc = rng.random(k) < 0.5
    model, eps = train(insert_canaries(fed, Xc, yc, inc))
    scores = -record_losses(model, Xc, yc)
    res = canary_audit(scores, inc, delta=delta, confidence=confidence, accountant_epsilon=eps)
    res.extra["seed"] = seed
    return res
