"""Membership inference: the loss-threshold attack and LiRA, with honest privacy lower bounds.

Attacks score each candidate record; a higher score means "more likely a training member".

* Loss threshold (Yeom et al. 2018, "Privacy risk in machine learning"): score ``-loss(x, y)``
  of the target model. Yeom et al. fix the threshold at the mean training loss; privml reports
  the whole ROC curve instead (every threshold), which is at least as strong.
* LiRA (Carlini et al. 2022, "Membership inference attacks from first principles"): shadow
  models trained like the target on random halves of a data pool give, for every record, the
  distribution of its logit-scaled confidence ``phi = log(p_y / (1 - p_y))`` when it is IN the
  training set and when it is OUT. The *online* variant scores the likelihood ratio of two
  Gaussians fitted to the IN and OUT values; the *offline* variant uses OUT models only (no
  model has to be trained on the candidate records) and scores the one-sided test
  ``Phi((phi - mu_out) / sigma_out)``. With few shadow models the per-record variances are
  replaced by one global variance (the paper's recommendation below 64 shadows).

Metrics (:func:`membership_metrics`): ROC AUC, the true-positive rate at 1% and 0.1% false-
positive rate (the paper's headline numbers: an attack is dangerous when it is confident on a
few records, not when it is slightly better than chance on all), and the empirical epsilon
lower bound implied by (TPR, FPR) at ``delta`` (Kairouz, Oh and Viswanath 2015): any
``(epsilon, delta)``-DP training satisfies ``TPR <= e^eps FPR + delta`` and
``1 - FPR <= e^eps (1 - TPR) + delta``. The bound is made honest the way Jagielski et al.
(2020) and Nasr et al. (2021) do it: the threshold is chosen on one half of the records and
the rates are measured on the other half with Clopper-Pearson intervals (TPR at its lower,
FPR at its upper confidence limit, Bonferroni-corrected so both hold jointly at
``confidence``). A lower bound above the accountant's epsilon means the accountant, the
noise, or the training code is wrong: :class:`PrivacyAuditError` is raised.

The membership game behind the bound treats every record of the pool as one trial. The trials
share the trained models, so they are not independent draws of the DP game for a single
record; the bound is the one the literature reports for this setting, and a conservative one
(it is far below the epsilon achievable with one-record-per-model audits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from privml.errors import PrivmlError, UsageError
from privml.models.nets import ModelSpec
from privml.security._checks import as_features, as_labels, check_float, check_int, n_classes_of

__all__ = [
    "EpsilonBound",
    "MembershipResult",
    "PrivacyAuditError",
    "ShadowTrainer",
    "dpsgd_shadow_trainer",
    "epsilon_lower_bound",
    "lira_attack",
    "lira_game",
    "lira_scores",
    "logit_confidence",
    "max_certifiable_epsilon",
    "loss_threshold_attack",
    "membership_metrics",
    "record_losses",
    "sgd_shadow_trainer",
]

FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)
"""False-positive rates at which the true-positive rate is reported."""


class PrivacyAuditError(PrivmlError, RuntimeError):
    """A measured leakage contradicts the privacy guarantee the accountant claims.

    Raised when the empirical epsilon lower bound of a membership inference attack is above
    the epsilon the accountant reports for the same training: the guarantee does not hold (an
    accounting, noise or clipping bug). The command line exits with code 5.
    """

    exit_code = 5


# --------------------------------------------------------------------------------------------
# Scores from a model
# --------------------------------------------------------------------------------------------


def _logits(model: nn.Module, X: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            return torch.cat(
                [model(X[i : i + batch_size]) for i in range(0, X.shape[0], batch_size)]
            )
        finally:
            model.train(was)


def logit_confidence_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log(p_y / (1 - p_y))`` computed stably from logits ``[..., out]`` and labels ``[...]``.

    Multiclass: ``z_y - logsumexp_{j != y} z_j``. One-logit binary: ``z`` for label 1 and
    ``-z`` for label 0.
    """
    if logits.shape[-1] == 1:
        z = logits[..., 0]
        return torch.where(y == 1, z, -z)
    zy = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.unsqueeze(-1), float("-inf"))
    return zy - torch.logsumexp(others, dim=-1)


def logit_confidence(model: nn.Module, X: Any, y: Any) -> np.ndarray:
    """LiRA's statistic ``phi = log(p_y / (1 - p_y))`` of each record under ``model``."""
    Xt = as_features(X, "X", "logit_confidence")
    logits = _logits(model, Xt)
    yt = as_labels(y, Xt.shape[0], n_classes_of(logits.shape[1]), "y", "logit_confidence")
    return logit_confidence_from_logits(logits, yt).numpy().astype(np.float64)


def record_losses(model: nn.Module, X: Any, y: Any) -> np.ndarray:
    """The model's training loss on each record (cross-entropy; BCE for one logit)."""
    from privml.security.attacks.evasion import logits_loss

    Xt = as_features(X, "X", "record_losses")
    logits = _logits(model, Xt)
    yt = as_labels(y, Xt.shape[0], n_classes_of(logits.shape[1]), "y", "record_losses")
    return logits_loss(logits, yt).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# Metrics and the empirical epsilon
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical lower bound on epsilon from one threshold of a membership attack.

    Attributes:
        epsilon: the lower bound (>= 0) at ``confidence``.
        point: the same formula at the measured (TPR, FPR), without confidence intervals.
        threshold: the score threshold, chosen on the selection half.
        tpr, fpr: rates measured at that threshold on the evaluation half.
        tpr_low, fpr_high: their Clopper-Pearson limits.
        delta, confidence: the delta of the bound and the joint confidence level.
        n_members, n_nonmembers: records of the evaluation half.
        max_certifiable: the largest bound these trial counts could give (a perfect attack:
            every member above the threshold, every non-member below); a bound of 0 with a
            small ``max_certifiable`` says the audit had no power, not that nothing leaks.
    """

    epsilon: float
    point: float
    threshold: float
    tpr: float
    fpr: float
    tpr_low: float
    fpr_high: float
    delta: float
    confidence: float
    n_members: int
    n_nonmembers: int
    max_certifiable: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def max_certifiable_epsilon(
    n_members: int, n_nonmembers: int, *, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon lower bound ``n_members`` + ``n_nonmembers`` evaluation trials can
    certify at ``confidence`` (two Clopper-Pearson limits, Bonferroni-corrected, as
    :func:`epsilon_lower_bound`): the bound of a perfect attack (TPR 1, FPR 0)."""
    if n_members < 1 or n_nonmembers < 1:
        return 0.0
    alpha = (1 - confidence) / 2
    lo = _cp_low(np.array([n_members]), n_members, alpha)
    hi = _cp_high(np.array([0]), n_nonmembers, alpha)
    return float(_eps_from_rates(lo, hi, delta)[0])


def _eps_from_rates(tpr: np.ndarray, fpr: np.ndarray, delta: float) -> np.ndarray:
    """``max(0, log((TPR - d) / FPR), log((1 - d - FPR) / (1 - TPR)))`` elementwise."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(
            (tpr > delta) & (fpr > 0), np.log((tpr - delta) / np.maximum(fpr, 1e-300)), 0.0
        )
        a = np.where((tpr > delta) & (fpr <= 0), np.inf, a)
        b = np.where(
            (1 - delta - fpr > 0) & (tpr < 1),
            np.log((1 - delta - fpr) / np.maximum(1 - tpr, 1e-300)),
            0.0,
        )
        b = np.where((1 - delta - fpr > 0) & (tpr >= 1), np.inf, b)
    return np.maximum(0.0, np.maximum(a, b))


def _cp_low(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    out = stats.beta.ppf(alpha, k, n - k + 1)
    return np.where(k <= 0, 0.0, np.nan_to_num(out, nan=0.0))


def _cp_high(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    out = stats.beta.ppf(1 - alpha, k + 1, n - k)
    return np.where(k >= n, 1.0, np.nan_to_num(out, nan=1.0))


def _counts(scores_in: np.ndarray, scores_out: np.ndarray, thr: np.ndarray) -> tuple[Any, Any]:
    """Members and non-members with score >= each threshold."""
    si, so = np.sort(scores_in), np.sort(scores_out)
    tp = len(si) - np.searchsorted(si, thr, side="left")
    fp = len(so) - np.searchsorted(so, thr, side="left")
    return tp, fp


def epsilon_lower_bound(
    scores: Any,
    is_member: Any,
    *,
    delta: float,
    confidence: float = 0.95,
    select_fraction: float = 0.5,
    seed: int = 0,
) -> EpsilonBound:
    """Honest empirical epsilon lower bound of a membership attack (Kairouz et al. 2015).

    The records are split at random (within members and within non-members) into a selection
    part, on which the threshold that maximises the bound is chosen, and an evaluation part,
    on which the TPR and FPR at that threshold are measured; Clopper-Pearson limits at level
    ``1 - (1 - confidence) / 2`` each make the bound hold with probability ``confidence``.

    Args:
        scores: attack scores ``[n]`` (higher: more likely a member).
        is_member: booleans ``[n]``.
        delta: the delta of the DP guarantee being audited, in [0, 1).
        confidence: joint confidence of the two intervals, in (0, 1).
        select_fraction: share of the records used to choose the threshold, in (0, 1).
        seed: seed of the split.

    Returns:
        :class:`EpsilonBound`; ``epsilon`` is 0 when the attack does no better than chance
        within the confidence intervals.
    """
    where = "epsilon_lower_bound"
    d = check_float(delta, "delta", where, low=0.0, high=1.0, high_open=True)
    c = check_float(confidence, "confidence", where, low=0.0, high=1.0, low_open=True,
                    high_open=True)  # fmt: skip
    f = check_float(select_fraction, "select_fraction", where, low=0.0, high=1.0, low_open=True,
                    high_open=True)  # fmt: skip
    s, m = _scores_and_labels(scores, is_member, where)
    rng = np.random.default_rng(seed)
    sel = np.zeros(len(s), dtype=bool)
    for group in (np.flatnonzero(m), np.flatnonzero(~m)):
        k = int(round(f * len(group)))
        sel[rng.choice(group, size=k, replace=False)] = True
    ev = ~sel
    if min((sel & m).sum(), (sel & ~m).sum(), (ev & m).sum(), (ev & ~m).sum()) < 1:
        raise UsageError(
            f"{where} needs members and non-members in both the selection and evaluation "
            f"parts; got {int(m.sum())} members and {int((~m).sum())} non-members. Give more "
            "records or change select_fraction."
        )
    alpha = (1 - c) / 2
    s_in, s_out = s[sel & m], s[sel & ~m]
    thr = np.unique(np.concatenate([s_in, s_out]))
    if len(thr) > 2000:
        thr = np.unique(np.quantile(thr, np.linspace(0, 1, 2000)))
    tp, fp = _counts(s_in, s_out, thr)
    bounds = _eps_from_rates(
        _cp_low(tp, len(s_in), alpha), _cp_high(fp, len(s_out), alpha), d
    )
    # Prefer the bound with confidence intervals; fall back on the point estimate for ties.
    point = _eps_from_rates(tp / len(s_in), fp / len(s_out), d)
    best = int(np.lexsort((np.nan_to_num(point, posinf=1e9), bounds))[-1])
    t = float(thr[best])
    e_in, e_out = s[ev & m], s[ev & ~m]
    tp_e, fp_e = _counts(e_in, e_out, np.array([t]))
    tpr, fpr = tp_e[0] / len(e_in), fp_e[0] / len(e_out)
    lo = float(_cp_low(tp_e, len(e_in), alpha)[0])
    hi = float(_cp_high(fp_e, len(e_out), alpha)[0])
    eps = float(_eps_from_rates(np.array([lo]), np.array([hi]), d)[0])
    pt = float(_eps_from_rates(np.array([tpr]), np.array([fpr]), d)[0])
    return EpsilonBound(
        epsilon=eps, point=pt, threshold=t, tpr=float(tpr), fpr=float(fpr), tpr_low=lo,
        fpr_high=hi, delta=d, confidence=c, n_members=len(e_in), n_nonmembers=len(e_out),
        max_certifiable=max_certifiable_epsilon(len(e_in), len(e_out), delta=d, confidence=c),
    )  # fmt: skip


def _scores_and_labels(scores: Any, is_member: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member)
    if s.ndim != 1 or m.shape != s.shape:
        raise UsageError(
            f"The 'scores' and 'is_member' parameters of {where} must be 1-D arrays of the same "
            f"length. Got shapes {s.shape} and {m.shape} instead."
        )
    if m.dtype != np.bool_:
        if not np.isin(m, (0, 1)).all():
            raise UsageError(f"The 'is_member' parameter of {where} must hold booleans or 0/1.")
        m = m.astype(bool)
    if not np.isfinite(s).all():
        raise UsageError(f"The 'scores' parameter of {where} contains NaN or Inf.")
    if m.all() or not m.any():
        raise UsageError(
            f"{where} needs both members and non-members; got {int(m.sum())} members of "
            f"{len(m)} records."
        )
    return s, m


ROC_POINTS = 101
"""Points of the attack's ROC curve kept in results.json (``roc``: ``fpr``, ``tpr``)."""


@dataclass
class MembershipResult:
    """The outcome of one membership inference attack.

    ``tpr_at_fpr`` maps a false-positive rate (as a string, ``"0.01"``) to the true-positive
    rate reached at it. ``violation`` is True when the empirical lower bound exceeds
    ``accountant_epsilon``.
    """

    attack: str
    auc: float
    tpr_at_fpr: dict[str, float]
    bound: EpsilonBound
    accountant_epsilon: float | None
    n_members: int
    n_nonmembers: int
    violation: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def empirical_epsilon(self) -> float:
        return self.bound.epsilon

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "auc": self.auc,
            "tpr_at_fpr": dict(self.tpr_at_fpr),
            "empirical_epsilon": self.bound.epsilon,
            "accountant_epsilon": self.accountant_epsilon,
            "violation": self.violation,
            "bound": self.bound.to_dict(),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            **self.extra,
        }


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray, levels: Sequence[float]) -> list[float]:
    """Highest TPR whose FPR does not exceed each level (0 when no threshold qualifies)."""
    fpr, tpr, _ = roc_curve(is_member, scores)
    return [float(tpr[fpr <= lv].max()) if np.any(fpr <= lv) else 0.0 for lv in levels]


def membership_metrics(
    scores: Any,
    is_member: Any,
    *,
    attack: str,
    delta: float,
    accountant_epsilon: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    strict: bool = True,
) -> MembershipResult:
    """AUC, TPR at 1% and 0.1% FPR and the empirical epsilon bound of an attack's scores.

    Args:
        scores: ``[n]`` attack scores, higher for members.
        is_member: ``[n]`` booleans (the ground truth).
        attack: a name for the report.
        delta: delta of the guarantee audited (the accountant's delta), in [0, 1).
        accountant_epsilon: the epsilon the accountant reports for this training, or None for
            non-private training (nothing to check).
        confidence: joint confidence of the bound.
        seed: seed of the threshold-selection split.
        strict: raise :class:`PrivacyAuditError` when the bound exceeds
            ``accountant_epsilon``; with False the result is only flagged (``violation``).

    Raises:
        PrivacyAuditError: the empirical lower bound exceeds the accountant's epsilon.
    """
    s, m = _scores_and_labels(scores, is_member, "membership_metrics")
    if accountant_epsilon is not None:
        accountant_epsilon = check_float(
            accountant_epsilon, "accountant_epsilon", "membership_metrics", low=0.0
        )
    bound = epsilon_lower_bound(s, m, delta=delta, confidence=confidence, seed=seed)
    rates = tpr_at_fpr(s, m, FPR_LEVELS)
    fpr, tpr, _ = roc_curve(m, s)
    if len(fpr) > ROC_POINTS:  # the report's ROC plot: evenly spaced corners of the curve
        keep = np.unique(np.linspace(0, len(fpr) - 1, ROC_POINTS).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    res = MembershipResult(
        attack=attack,
        auc=float(roc_auc_score(m, s)),
        tpr_at_fpr={str(lv): r for lv, r in zip(FPR_LEVELS, rates, strict=True)},
        bound=bound,
        accountant_epsilon=accountant_epsilon,
        n_members=int(m.sum()),
        n_nonmembers=int((~m).sum()),
        extra={"roc": {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}},
    )
    if accountant_epsilon is not None and bound.epsilon > accountant_epsilon * (1 + 1e-9):
        res.violation = True
        if strict:
            raise PrivacyAuditError(
                f"membership inference ({attack}) proves epsilon >= {bound.epsilon:.3f} "
                f"(TPR {bound.tpr:.3f}, FPR {bound.fpr:.4f}, {bound.confidence:.0%} confidence) "
                f"but the accountant reports epsilon = {accountant_epsilon:.3f} at delta "
                f"{bound.delta:g}: the privacy guarantee does not hold. Check the noise "
                "multiplier, the clipping and the accountant before releasing this model."
            )
    return res


# --------------------------------------------------------------------------------------------
# Loss threshold
# --------------------------------------------------------------------------------------------


def _balanced(n_in: int, n_out: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = min(n_in, n_out)
    a = np.sort(rng.choice(n_in, size=k, replace=False)) if n_in > k else np.arange(n_in)
    b = np.sort(rng.choice(n_out, size=k, replace=False)) if n_out > k else np.arange(n_out)
    return a, b


def loss_threshold_attack(
    model: nn.Module,
    members: tuple[Any, Any],
    nonmembers: tuple[Any, Any],
    *,
    delta: float,
    accountant_epsilon: float | None = None,
    balance: bool = True,
    seed: int = 0,
    strict: bool = True,
) -> MembershipResult:
    """Yeom et al.'s attack on ``model``: a lower loss means a training member.

    Args:
        model: the trained target (a torch module producing logits).
        members: ``(X, y)`` records the model was trained on.
        nonmembers: ``(X, y)`` records from the same distribution it never saw.
        delta, accountant_epsilon, strict: as in :func:`membership_metrics`.
        balance: subsample the larger group so both are equally many (the usual game).
        seed: seed of the subsampling and of the bound's split.
    """
    rng = np.random.default_rng(seed)
    l_in = record_losses(model, *members)
    l_out = record_losses(model, *nonmembers)
    if balance:
        a, b = _balanced(len(l_in), len(l_out), rng)
        l_in, l_out = l_in[a], l_out[b]
    scores = -np.concatenate([l_in, l_out])
    truth = np.concatenate([np.ones(len(l_in), bool), np.zeros(len(l_out), bool)])
    res = membership_metrics(
        scores, truth, attack="loss_threshold", delta=delta,
        accountant_epsilon=accountant_epsilon, seed=seed, strict=strict,
    )  # fmt: skip
    res.extra["mean_loss_members"] = float(l_in.mean())
    res.extra["mean_loss_nonmembers"] = float(l_out.mean())
    return res


# --------------------------------------------------------------------------------------------
# LiRA
# --------------------------------------------------------------------------------------------


def lira_scores(
    target_phi: Any,
    shadow_phi: Any,
    shadow_in: Any,
    *,
    online: bool = True,
    global_variance: bool | None = None,
) -> np.ndarray:
    """LiRA's per-record membership scores.

    Args:
        target_phi: ``[n]`` logit-scaled confidences under the target model.
        shadow_phi: ``[K, n]`` the same under K shadow models.
        shadow_in: ``[K, n]`` booleans, True where the record was in the shadow's training set.
        online: likelihood ratio of IN and OUT Gaussians; False: offline one-sided test
            against the OUT Gaussian only.
        global_variance: use one variance for all records (default: when K < 64).

    Returns:
        ``[n]`` scores, higher for members. Records with no OUT (or, online, no IN) shadow
        fall back on the global mean of that side.
    """
    t = np.asarray(target_phi, dtype=np.float64)
    phi = np.asarray(shadow_phi, dtype=np.float64)
    inn = np.asarray(shadow_in, dtype=bool)
    if phi.ndim != 2 or phi.shape[1] != t.shape[0] or inn.shape != phi.shape:
        raise UsageError(
            "lira_scores needs target_phi [n], shadow_phi [K, n] and shadow_in [K, n]. Got "
            f"shapes {t.shape}, {phi.shape} and {inn.shape}."
        )
    K = phi.shape[0]
    fixed = K < 64 if global_variance is None else bool(global_variance)
    out = ~inn

    def side(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cnt = mask.sum(axis=0)
        tot = np.where(mask, phi, 0.0).sum(axis=0)
        glob_mu = phi[mask].mean() if mask.any() else 0.0
        mu = np.where(cnt > 0, tot / np.maximum(cnt, 1), glob_mu)
        dev = np.where(mask, (phi - mu[None, :]) ** 2, 0.0)
        if fixed or not mask.any():
            var_all = dev.sum() / max(int(mask.sum()) - 1, 1) if mask.any() else 1.0
            var = np.full_like(mu, var_all)
        else:
            var = np.where(cnt > 1, dev.sum(axis=0) / np.maximum(cnt - 1, 1), np.nan)
            var = np.where(np.isnan(var), np.nanmean(var) if np.isfinite(var).any() else 1.0, var)
        return mu, np.sqrt(np.maximum(var, 1e-12))

    mu_out, sd_out = side(out)
    if not online:
        return stats.norm.logcdf(t, loc=mu_out, scale=sd_out)
    mu_in, sd_in = side(inn)
    return stats.norm.logpdf(t, loc=mu_in, scale=sd_in) - stats.norm.logpdf(
        t, loc=mu_out, scale=sd_out
    )


#: Trains K models at once: ``(X [n, F], y [n], member_masks [K, n] bool, seed) -> [K, P]``
#: flat parameters, model ``k`` trained on the records where ``member_masks[k]`` is True.
ShadowTrainer = Callable[[np.ndarray, np.ndarray, np.ndarray, int], torch.Tensor]


def sgd_shadow_trainer(
    spec: ModelSpec,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    rule: Any = None,
    init_seed: int = 0,
    poisson: bool = False,
) -> ShadowTrainer:
    """A :data:`ShadowTrainer` using privml's vectorized local trainer: all K models train
    together as a cohort of K "sites", each holding its own subset of the pool.

    Args:
        spec: the architecture.
        lr, epochs, batch_size: SGD settings, those of the target's training.
        rule: a :class:`privml.models.training.GradientRule` (default: plain mini-batch SGD,
            :class:`privml.models.training.MeanGradient`); pass a DP-SGD rule to audit DP training.
        init_seed: seed of the initialisation shared by all models.
        poisson: draw Poisson-sampled batches (each record with probability
            ``batch_size / n_k``, as DP-SGD's accounting assumes) instead of shuffled ones.
    """
    from privml.fl.plan import init_params
    from privml.models.training import CohortData, MeanGradient, train_cohort

    where = "sgd_shadow_trainer"
    step = check_float(lr, "lr", where, low=0.0, low_open=True)
    n_epochs = check_int(epochs, "epochs", where, low=1)
    bs = check_int(batch_size, "batch_size", where, low=1)
    model, start = init_params(spec, init_seed)
    g = rule if rule is not None else MeanGradient(model, spec, binary=spec.n_outputs == 1)

    def train(X: np.ndarray, y: np.ndarray, masks: np.ndarray, seed: int) -> torch.Tensor:
        data = CohortData.from_arrays([X[mk] for mk in masks], [y[mk] for mk in masks])
        rngs = [np.random.default_rng([seed, 11, k]) for k in range(len(masks))]
        batches = _poisson_batches(data.sizes, bs, n_epochs, rngs) if poisson else None
        return train_cohort(
            start, data, rule=g, lr=step, batch_size=bs, epochs=n_epochs, rngs=rngs,
            batches=batches,
        )  # fmt: skip

    return train


def dpsgd_shadow_trainer(
    spec: ModelSpec,
    *,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    lr: float,
    epochs: int,
    batch_size: int,
    accountant: str = "pld",
    init_seed: int = 0,
) -> ShadowTrainer:
    """A :data:`ShadowTrainer` whose K models are each trained with DP-SGD at ``epsilon``.

    Uses privml's DP-SGD (:class:`privml.dp.sgd.DPSGDGradient`: Poisson sampling, per-sample
    clipping to ``max_grad_norm``, Gaussian noise) with each model's noise multiplier
    calibrated by privml's accountant (:func:`privml.dp.accounting.calibrate_noise_multiplier`)
    so that the model's training is ``(epsilon, delta)``-DP per record for its own data size.
    The noise multipliers used are stored in ``trainer.noise_multipliers`` after a call.
    """
    from privml.dp.accounting import calibrate_noise_multiplier
    from privml.dp.sgd import DPSGDGradient, noise_generators, poisson_batches, sampling_plan
    from privml.fl.plan import init_params
    from privml.models.training import CohortData, train_cohort

    where = "dpsgd_shadow_trainer"
    eps = check_float(epsilon, "epsilon", where, low=0.0, low_open=True)
    d = check_float(delta, "delta", where, low=0.0, high=1.0, low_open=True, high_open=True)
    step = check_float(lr, "lr", where, low=0.0, low_open=True)
    n_epochs = check_int(epochs, "epochs", where, low=1)
    bs = check_int(batch_size, "batch_size", where, low=1)
    model, start = init_params(spec, init_seed)
    cache: dict[int, float] = {}

    def sigma(n: int) -> float:
        if n not in cache:
            q, steps = sampling_plan(n, batch_size=bs, epochs=n_epochs)
            cache[n] = calibrate_noise_multiplier(
                target_epsilon=eps, delta=d, sampling_rate=q, steps=steps,
                accountant=accountant,  # type: ignore[arg-type]
            )  # fmt: skip
        return cache[n]

    def train(X: np.ndarray, y: np.ndarray, masks: np.ndarray, seed: int) -> torch.Tensor:
        data = CohortData.from_arrays([X[mk] for mk in masks], [y[mk] for mk in masks])
        rngs = [np.random.default_rng([seed, 13, k]) for k in range(len(masks))]
        pb = poisson_batches(data.sizes, batch_size=bs, epochs=n_epochs, rngs=rngs)
        sigmas = [sigma(int(n)) for n in data.sizes]
        train.noise_multipliers = sigmas  # type: ignore[attr-defined]
        rule = DPSGDGradient(
            model, spec, binary=spec.n_outputs == 1, max_grad_norm=max_grad_norm,
            noise_multipliers=sigmas, expected_batch=pb.expected_batch, steps=pb.steps,
            generators=noise_generators(seed, 0, range(len(masks))),
        )  # fmt: skip
        return train_cohort(
            start, data, rule=rule, lr=step, batch_size=bs, epochs=n_epochs, rngs=rngs,
            batches=(pb.idx, pb.mask),
        )  # fmt: skip

    return train


def _poisson_batches(
    sizes: np.ndarray, batch_size: int, epochs: int, rngs: Sequence[np.random.Generator]
) -> tuple[np.ndarray, np.ndarray]:
    """Poisson-sampled steps ``[K, steps, B_max]``: each record joins a step with probability
    ``batch_size / n``; ``epochs * n / batch_size`` steps."""
    steps = max(int(math.ceil(epochs * sizes.max() / batch_size)), 1)
    picks: list[list[np.ndarray]] = []
    for k, n in enumerate(sizes):
        q = min(batch_size / max(int(n), 1), 1.0)
        picks.append([np.flatnonzero(rngs[k].random(int(n)) < q) for _ in range(steps)])
    width = max(1, max(len(p) for row in picks for p in row))
    idx = np.zeros((len(sizes), steps, width), dtype=np.int64)
    mask = np.zeros((len(sizes), steps, width), dtype=np.float32)
    for k, row in enumerate(picks):
        for s, p in enumerate(row):
            idx[k, s, : len(p)] = p
            mask[k, s, : len(p)] = 1.0
    return idx, mask


def lira_game(
    X: Any,
    y: Any,
    spec: ModelSpec,
    *,
    trainer: ShadowTrainer,
    n_models: int = 16,
    n_targets: int | None = None,
    online: bool = True,
    delta: float,
    accountant_epsilon: float | None = None,
    seed: int = 0,
    strict: bool = True,
) -> MembershipResult:
    """Carlini et al.'s evaluation game: ``n_models`` models trained on random halves of a pool.

    Every record joins each model's training set with probability 1/2. Each of the first
    ``n_targets`` models in turn is the target and the others are its shadows (leave-one-out);
    the scores of all targets are pooled for the ROC and the bound (``n_targets * n`` trials).
    The loss-threshold attack on the same targets is reported in ``extra["loss_threshold"]``.

    Args:
        X, y: the pool ``[n, F]``, ``[n]``.
        spec: the architecture the trainer trains.
        trainer: trains all models at once (:func:`sgd_shadow_trainer`).
        n_models: models trained (>= 3; Carlini et al. use 16-256).
        n_targets: how many of them serve as target (default all).
        online: online (IN and OUT) or offline (OUT only) LiRA.
        delta, accountant_epsilon, strict: as in :func:`membership_metrics`.
        seed: seed of the membership draws, the training and the bound.
    """
    from privml.models.nets import build_model, functional_forward

    where = "lira_game"
    model = build_model(spec)
    K = check_int(n_models, "n_models", where, low=3)
    T = K if n_targets is None else check_int(n_targets, "n_targets", where, low=1, high=K)
    Xt = as_features(X, "X", where, n_features=spec.n_features)
    yt = as_labels(y, Xt.shape[0], n_classes_of(spec.n_outputs), "y", where)
    rng = np.random.default_rng([seed, 3])
    masks = rng.random((K, Xt.shape[0])) < 0.5
    stacked = trainer(Xt.numpy(), yt.numpy(), masks, seed)
    from privml.security.attacks.evasion import logits_loss

    f = functional_forward(model)
    with torch.no_grad():
        logits = [f(stacked[k], Xt) for k in range(K)]
        phi = np.stack(
            [logit_confidence_from_logits(lg, yt).numpy() for lg in logits]
        ).astype(np.float64)
        losses = np.stack([logits_loss(lg, yt).numpy() for lg in logits]).astype(np.float64)
    scores, truth = [], []
    for t in range(T):
        others = np.arange(K) != t
        scores.append(lira_scores(phi[t], phi[others], masks[others], online=online))
        truth.append(masks[t])
    s, m = np.concatenate(scores), np.concatenate(truth)
    res = membership_metrics(
        s, m, attack="lira_online" if online else "lira_offline", delta=delta,
        accountant_epsilon=accountant_epsilon, seed=seed, strict=strict,
    )  # fmt: skip
    # Yeom et al.'s loss threshold on the very same target models, for comparison.
    yeom = membership_metrics(
        -losses[:T].reshape(-1), masks[:T].reshape(-1), attack="loss_threshold", delta=delta,
        accountant_epsilon=accountant_epsilon, seed=seed, strict=strict,
    )  # fmt: skip
    res.violation = res.violation or yeom.violation
    res.extra["loss_threshold"] = yeom.to_dict()
    with torch.no_grad():
        acc_in, acc_out = [], []
        for k in range(K):
            lg = logits[k]
            pred = (lg[:, 0] > 0).long() if lg.shape[1] == 1 else lg.argmax(1)
            ok = (pred == yt).numpy()
            acc_in.append(ok[masks[k]].mean())
            acc_out.append(ok[~masks[k]].mean())
    res.extra.update(
        n_models=K, n_targets=T, pool=int(Xt.shape[0]),
        train_accuracy=float(np.mean(acc_in)), test_accuracy=float(np.mean(acc_out)),
    )  # fmt: skip
    return res


def lira_attack(
    model: nn.Module,
    members: tuple[Any, Any],
    nonmembers: tuple[Any, Any],
    *,
    trainer: ShadowTrainer,
    n_shadows: int = 8,
    online: bool = False,
    delta: float,
    accountant_epsilon: float | None = None,
    seed: int = 0,
    strict: bool = True,
) -> MembershipResult:
    """LiRA against one given trained model (the audit's case).

    Shadow models are trained by ``trainer`` on random halves of the pool ``members +
    nonmembers``; the target's own members and non-members are the ground truth. Offline by
    default (the OUT distribution is what every record has); online works too since each
    record is IN for about half of the shadows.
    """
    where = "lira_attack"
    K = check_int(n_shadows, "n_shadows", where, low=2)
    Xm, ym = members
    Xn, yn = nonmembers
    rng = np.random.default_rng([seed, 5])
    a, b = _balanced(len(ym), len(yn), rng)
    X = np.concatenate([np.asarray(Xm)[a], np.asarray(Xn)[b]]).astype(np.float32)
    y = np.concatenate([np.asarray(ym)[a], np.asarray(yn)[b]])
    truth = np.concatenate([np.ones(len(a), bool), np.zeros(len(b), bool)])
    masks = rng.random((K, len(y))) < 0.5
    stacked = trainer(X, y, masks, seed)
    from privml.models.nets import functional_forward

    f = functional_forward(model)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    with torch.no_grad():
        phi = np.stack(
            [logit_confidence_from_logits(f(stacked[k], Xt), yt).numpy() for k in range(K)]
        ).astype(np.float64)
    target = logit_confidence(model, X, y)
    scores = lira_scores(target, phi, masks, online=online)
    res = membership_metrics(
        scores, truth, attack="lira_online" if online else "lira_offline", delta=delta,
        accountant_epsilon=accountant_epsilon, seed=seed, strict=strict,
    )  # fmt: skip
    res.extra["n_shadows"] = K
    return res
