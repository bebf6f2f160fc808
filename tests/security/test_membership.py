"""Membership inference: the metrics, the honest epsilon lower bound, and the attacks on a
target built to leak (labels it can only memorise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privml.errors import UsageError
from privml.models.nets import ModelSpec
from privml.security.attacks.membership import (
    PrivacyAuditError,
    _eps_from_rates,
    epsilon_lower_bound,
    lira_game,
    lira_scores,
    loss_threshold_attack,
    membership_metrics,
    sgd_shadow_trainer,
    tpr_at_fpr,
)

from .conftest import train_plain


def test_eps_from_rates_formula() -> None:
    # TPR <= e^eps FPR + delta  and  1 - FPR <= e^eps (1 - TPR) + delta
    e = _eps_from_rates(np.array([0.5, 0.99, 0.3]), np.array([0.1, 0.5, 0.3]), 0.0)
    assert e[0] == pytest.approx(max(math.log(5.0), math.log(0.9 / 0.5)))
    assert e[1] == pytest.approx(max(math.log(0.99 / 0.5), math.log(0.5 / 0.01)))
    assert e[2] == 0.0
    with_delta = _eps_from_rates(np.array([0.5]), np.array([0.1]), 0.05)
    assert with_delta[0] == pytest.approx(math.log(0.45 / 0.1))


def _randomized_response(n: int, eps: float, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """An eps-DP mechanism: a member says 1 with prob e^eps / (1 + e^eps), a non-member 0."""
    member = rng.random(n) < 0.5
    p = math.exp(eps) / (1 + math.exp(eps))
    says_member = np.where(member, rng.random(n) < p, rng.random(n) >= p)
    return says_member.astype(float) + 0.01 * rng.random(n), member


def test_lower_bound_is_honest_and_tight_on_an_eps_dp_mechanism() -> None:
    """On an exactly eps-DP mechanism the bound stays <= eps at its confidence level, and is
    non-trivial with enough trials."""
    eps, trials, above = 1.0, 60, 0
    rng = np.random.default_rng(1)
    found = []
    for t in range(trials):
        s, m = _randomized_response(4000, eps, rng)
        b = epsilon_lower_bound(s, m, delta=0.0, confidence=0.95, seed=t)
        above += b.epsilon > eps
        found.append(b.epsilon)
    # 95% confidence: the count above eps is Binomial(60, <= 0.05); P(>= 9) < 0.01
    assert above <= 8
    assert np.mean(found) > 0.6  # the threshold at 1 sees e^eps = 2.7 from ~1000 records


def test_clopper_pearson_limits_bracket_the_rates() -> None:
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(1, 1, 500), rng.normal(0, 1, 500)])
    m = np.arange(1000) < 500
    b = epsilon_lower_bound(s, m, delta=1e-5)
    assert b.tpr_low <= b.tpr and b.fpr <= b.fpr_high
    alpha = (1 - b.confidence) / 2
    k = round(b.tpr * b.n_members)
    assert b.tpr_low == pytest.approx(stats.beta.ppf(alpha, k, b.n_members - k + 1))
    assert 0 <= b.epsilon <= b.point


def test_metrics_and_tpr_at_low_fpr() -> None:
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(2, 1, 2000), rng.normal(0, 1, 2000)])
    m = np.arange(4000) < 2000
    r = membership_metrics(s, m, attack="gauss", delta=1e-5)
    assert r.auc == pytest.approx(stats.norm.cdf(2 / math.sqrt(2)), abs=0.02)
    # TPR at FPR 1%: P(N(2,1) > z_0.99) = 1 - Phi(2.326 - 2)
    assert r.tpr_at_fpr["0.01"] == pytest.approx(1 - stats.norm.cdf(2.326 - 2), abs=0.05)
    assert tpr_at_fpr(s, m, [1.0])[0] == 1.0


def test_bound_above_accountant_epsilon_fails_loudly() -> None:
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.normal(4, 1, 1000), rng.normal(0, 1, 1000)])
    m = np.arange(2000) < 1000
    with pytest.raises(PrivacyAuditError, match="accountant reports epsilon = 0.500"):
        membership_metrics(s, m, attack="x", delta=1e-5, accountant_epsilon=0.5)
    r = membership_metrics(s, m, attack="x", delta=1e-5, accountant_epsilon=0.5, strict=False)
    assert r.violation and r.empirical_epsilon > 0.5
    ok = membership_metrics(s, m, attack="x", delta=1e-5, accountant_epsilon=50.0)
    assert not ok.violation


def test_bad_inputs() -> None:
    with pytest.raises(UsageError, match="both members and non-members"):
        membership_metrics(np.ones(4), np.ones(4, bool), attack="x", delta=1e-5)
    with pytest.raises(UsageError, match="'delta' parameter"):
        epsilon_lower_bound(np.arange(4.0), np.array([1, 1, 0, 0]), delta=1.5)
    with pytest.raises(UsageError, match="same length"):
        membership_metrics(np.ones(4), np.ones(3, bool), attack="x", delta=1e-5)


def test_lira_scores_recover_the_likelihood_ratio() -> None:
    rng = np.random.default_rng(0)
    n, K = 400, 32
    inn = rng.random((K, n)) < 0.5
    mu = rng.normal(0, 3, n)  # per-record difficulty: the reason LiRA calibrates per record
    phi = mu + np.where(inn, 2.0, 0.0) + rng.normal(0, 1, (K, n))
    target_in = rng.random(n) < 0.5
    target = mu + np.where(target_in, 2.0, 0.0) + rng.normal(0, 1, n)
    online = lira_scores(target, phi, inn, online=True)
    offline = lira_scores(target, phi, inn, online=False)
    from sklearn.metrics import roc_auc_score

    ideal = stats.norm.cdf(2 / math.sqrt(2))  # 0.92 with known per-record means
    assert roc_auc_score(target_in, online) > ideal - 0.05
    assert roc_auc_score(target_in, offline) > ideal - 0.07
    # a global threshold on phi is much weaker: the records' difficulty hides membership
    assert roc_auc_score(target_in, target) < 0.75


@pytest.fixture(scope="module")
def memorizer():  # type: ignore[no-untyped-def]
    """Random labels: the only way to fit them is to memorise, so membership shows."""
    rng = np.random.default_rng(0)
    X = rng.random((300, 10)).astype(np.float32)
    y = rng.integers(0, 2, 300)
    spec = ModelSpec("mlp", 10, 2, hidden=(128,))
    return X, y, spec


def test_loss_threshold_attack_on_a_memorising_model(memorizer) -> None:
    X, y, spec = memorizer
    m = train_plain(X[:150], y[:150], spec, steps=800, lr=1e-2)
    r = loss_threshold_attack(m, (X[:150], y[:150]), (X[150:], y[150:]), delta=1e-5)
    assert r.auc > 0.8
    assert r.empirical_epsilon > 0.5
    assert r.extra["mean_loss_members"] < r.extra["mean_loss_nonmembers"]


@pytest.mark.slow
def test_lira_game_on_a_memorising_model(memorizer) -> None:
    X, y, _ = memorizer
    spec = ModelSpec("mlp", 10, 2, hidden=(256,))
    trainer = sgd_shadow_trainer(spec, lr=0.5, epochs=300, batch_size=16)
    r = lira_game(X[:200], y[:200], spec, trainer=trainer, n_models=6, delta=1e-5)
    assert r.extra["train_accuracy"] > 0.95 and r.extra["test_accuracy"] < 0.65
    assert r.auc > 0.8
    assert r.tpr_at_fpr["0.01"] > 0.03
    assert r.empirical_epsilon > 0.5
    assert r.n_members + r.n_nonmembers == 6 * 200
