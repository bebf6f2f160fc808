"""Statistical and validation tests of the DP mechanisms.

Each mechanism is checked three ways:

* distribution: 10^5 draws of the insecure numpy sampler at a fixed seed, and 2-3 x 10^3 to
  2 x 10^4 draws of the secure OpenDP sampler (a CSPRNG cannot be seeded, so these use a
  p-value floor of 1e-7, see P_SECURE), pass a KS or chi-square test against the intended law;
* privacy: the empirical DP ratio P[M(D1) in S] <= e^eps P[M(D2) in S] + slack holds on
  neighbouring inputs for a family of output sets S, and a negative control shows the check
  fails when the claimed epsilon is too small;
* calibration maths against closed forms and independent implementations.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from privml.dp import mechanisms as m
from privml.dp import samplers
from privml.dp.events import (
    DiscreteGaussianDpEvent,
    DiscreteLaplaceDpEvent,
    GaussianDpEvent,
    LaplaceDpEvent,
    PureDpEvent,
    RandomizedResponseDpEvent,
)
from privml.errors import InsecureOptionWarning, UsageError

N_FAST = 100_000  # insecure sampler, fixed seed
N_SECURE = 20_000  # secure vector samplers (one OpenDP call)
P_FIXED = 1e-3  # fixed seed: deterministic outcome
#: Unseedable CSPRNG: each secure-sampler check is a false alarm with probability 1e-7 (its
#: p-value is uniform when the law is right); nine such checks here, so a correct sampler fails
#: this module at most once in 10^6 runs. (At 1e-4 it was about once in 1,100 runs of the suite.)
#: They still catch a scale off by 20 % or more (KS distance 0.034 for the Laplace at 2 x 10^4
#: draws, against 0.021 at this floor); the fixed-seed checks catch 5 %.
P_SECURE = 1e-7


def _rng(seed: int = 12345) -> np.random.Generator:
    return np.random.default_rng(seed)


def _chi2_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Chi-square p-value, lumping cells with expected count < 5 into one."""
    n = observed.sum()
    expected = expected_probs / expected_probs.sum() * n
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(stats.chisquare(observed, expected).pvalue)


def _int_hist(samples: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Counts per support value plus one cell for everything outside it."""
    lo, hi = support[0], support[-1]
    inside = samples[(samples >= lo) & (samples <= hi)]
    counts = np.bincount((inside - lo).astype(np.int64), minlength=support.size)
    return np.append(counts, samples.size - inside.size)


def _dlap_probs(scale: float, support: np.ndarray) -> np.ndarray:
    a = 1.0 / scale
    p = math.tanh(a / 2) * np.exp(-a * np.abs(support))
    return np.append(p, max(0.0, 1.0 - p.sum()))


def _dgauss_probs(sigma: float, support: np.ndarray) -> np.ndarray:
    big = np.arange(-int(40 * sigma) - 5, int(40 * sigma) + 6)
    z = np.exp(-(big**2) / (2 * sigma**2)).sum()
    p = np.exp(-(support**2) / (2 * sigma**2)) / z
    return np.append(p, max(0.0, 1.0 - p.sum()))


def _max_ratio_violation(a: np.ndarray, b: np.ndarray, eps: float, edges: np.ndarray) -> float:
    """max over S of P_a(S) - e^eps P_b(S) for S = half-lines and bins at ``edges``."""
    worst = -1.0
    for x, y in ((a, b), (b, a)):
        xs, ys = np.sort(x), np.sort(y)
        for cut in edges:
            for side in ("left", "right"):
                px = np.searchsorted(xs, cut, side="right") / xs.size
                py = np.searchsorted(ys, cut, side="right") / ys.size
                if side == "right":
                    px, py = 1 - px, 1 - py
                worst = max(worst, px - math.exp(eps) * py)
        hx = np.histogram(x, bins=edges)[0] / x.size
        hy = np.histogram(y, bins=edges)[0] / y.size
        worst = max(worst, float(np.max(hx - math.exp(eps) * hy)))
    return worst


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": -1.0, "sensitivity": 1.0}, "The 'epsilon' parameter of laplace must be > 0"),
        ({"epsilon": 0.0, "sensitivity": 1.0}, "Got 0.0 instead"),
        ({"epsilon": math.inf, "sensitivity": 1.0}, "must be > 0 and finite"),
        ({"epsilon": math.nan, "sensitivity": 1.0}, "'epsilon'"),
        ({"epsilon": 1.0, "sensitivity": 0.0}, "The 'sensitivity' parameter of laplace"),
        ({"epsilon": 1.0, "sensitivity": -2.0}, "Got -2.0 instead"),
    ],
)
def test_laplace_rejects_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        m.laplace(1.0, **kwargs)


def test_parameters_are_keyword_only_and_typed() -> None:
    with pytest.raises(TypeError):
        m.laplace(1.0, 1.0, 1.0)  # type: ignore[misc]
    with pytest.raises(TypeError, match="'epsilon' parameter of laplace must be a real number"):
        m.laplace(1.0, epsilon="1", sensitivity=1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be a positive int"):
        m.discrete_laplace(3, epsilon=1.0, sensitivity=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5])
def test_gaussian_rejects_delta_outside_open_unit_interval(delta: float) -> None:
    with pytest.raises(UsageError, match=r"The 'delta' parameter of gaussian must be in \(0, 1\)"):
        m.gaussian(1.0, epsilon=1.0, delta=delta, sensitivity=1.0)


def test_classic_gaussian_refuses_epsilon_at_least_one() -> None:
    with pytest.raises(UsageError, match="classic Gaussian mechanism must be < 1"):
        m.gaussian(1.0, epsilon=1.0, delta=1e-5, sensitivity=1.0, calibration="classic")
    with pytest.raises(UsageError, match="calibration"):
        m.gaussian(1.0, epsilon=1.0, delta=1e-5, sensitivity=1.0, calibration="magic")  # type: ignore[arg-type]


def test_values_must_be_finite() -> None:
    with pytest.raises(UsageError, match="finite"):
        m.laplace(math.inf, epsilon=1.0, sensitivity=1.0)
    with pytest.raises(UsageError, match="finite"):
        m.laplace([1.0, math.nan], epsilon=1.0, sensitivity=1.0)
    with pytest.raises(UsageError, match="finite"):
        m.exponential_mechanism(["a", "b"], [1.0, math.inf], epsilon=1.0, sensitivity=1.0)
    with pytest.raises(UsageError, match="one score per candidate"):
        m.exponential_mechanism(["a", "b"], [1.0], epsilon=1.0, sensitivity=1.0)


def test_randomized_response_validates_categories() -> None:
    with pytest.raises(UsageError, match="at least 2 distinct"):
        m.randomized_response("a", categories=["a"], epsilon=1.0)
    with pytest.raises(UsageError, match="must be one of the categories"):
        m.randomized_response("z", categories=["a", "b"], epsilon=1.0)


def test_rng_must_be_a_numpy_generator() -> None:
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        m.laplace(1.0, epsilon=1.0, sensitivity=1.0, rng=42)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- secure by default


def test_secure_sampler_is_default_and_insecure_one_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all on the secure path
        release = m.laplace(5.0, epsilon=1.0, sensitivity=1.0)
    assert release.sampler == "opendp"
    with pytest.warns(InsecureOptionWarning, match="NOT safe"):
        insecure = m.laplace(5.0, epsilon=1.0, sensitivity=1.0, rng=_rng())
    assert insecure.sampler == "numpy-insecure"


def test_secure_gaussian_releases_grid_values_not_raw_floats() -> None:
    """Mironov's attack reads low-order bits; the secure output lies on a public grid."""
    step, grid_sens = m.gaussian_grid(1.0)
    assert step == 2.0**-6 and grid_sens == 65
    for _ in range(50):
        out = m.gaussian(math.pi, epsilon=1.0, delta=1e-6, sensitivity=1.0).value
        assert out / step == round(out / step)


@pytest.mark.parametrize("sens", [1e-3, 0.7, 1.0, 3.0, 1000.0, 12345.678])
def test_gaussian_grid_inflates_sensitivity_by_at_most_one_64th(sens: float) -> None:
    step, grid_sens = m.gaussian_grid(sens)
    assert 64 <= sens / step < 128
    assert sens / step <= grid_sens <= sens / step * (1 + 1 / 64)


# ----------------------------------------------------------------------------- events


def test_each_mechanism_emits_its_event() -> None:
    assert m.laplace(0.0, epsilon=0.5, sensitivity=2.0).event == LaplaceDpEvent(2.0)
    g = m.gaussian(0.0, epsilon=1.0, delta=1e-6, sensitivity=1.0)
    assert isinstance(g.event, DiscreteGaussianDpEvent) and g.event.sensitivity == 65
    with pytest.warns(InsecureOptionWarning):
        gi = m.gaussian(0.0, epsilon=1.0, delta=1e-6, sensitivity=2.0, rng=_rng())
    assert gi.event == GaussianDpEvent(gi.scale / 2.0)
    dl = m.discrete_laplace(3, epsilon=0.5, sensitivity=2)
    assert dl.event == DiscreteLaplaceDpEvent(noise_parameter=0.25, sensitivity=2)
    em = m.exponential_mechanism([1, 2], [0.0, 1.0], epsilon=0.3, sensitivity=1.0)
    assert em.event == PureDpEvent(0.3) and em.value in (1, 2)
    rr = m.randomized_response(True, categories=[True, False], epsilon=math.log(3))
    assert isinstance(rr.event, RandomizedResponseDpEvent)
    # dp-accounting's convention: p = 2 (1 - 3/4) = 1/2 for binary RR with e^eps = 3.
    assert rr.event.noise_parameter == pytest.approx(0.5) and rr.event.num_buckets == 2


# ----------------------------------------------------------------------------- Gaussian maths


def test_analytic_gaussian_is_tight_and_beats_classic() -> None:
    for eps, delta in [(0.1, 1e-5), (0.5, 1e-6), (0.9, 1e-3)]:
        sigma = m.analytic_gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
        classic = m.classic_gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
        assert sigma < classic
        assert m.analytic_gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=1.0) <= delta
        just_below = sigma * (1 - 1e-6)
        assert m.analytic_gaussian_delta(sigma=just_below, epsilon=eps, sensitivity=1.0) > delta


def test_analytic_gaussian_matches_dp_accounting_for_large_epsilon() -> None:
    """dp-accounting's get_sigma_gaussian solves the same Balle-Wang condition independently."""
    from dp_accounting import get_sigma_gaussian

    for eps, delta in [(1.0, 1e-5), (4.0, 1e-6), (10.0, 1e-9)]:
        ours = m.analytic_gaussian_sigma(epsilon=eps, delta=delta, sensitivity=1.0)
        theirs = get_sigma_gaussian(eps, delta)
        assert ours == pytest.approx(theirs, rel=1e-3)
    # Scales linearly with the sensitivity.
    assert m.analytic_gaussian_sigma(epsilon=2.0, delta=1e-6, sensitivity=3.0) == pytest.approx(
        3 * m.analytic_gaussian_sigma(epsilon=2.0, delta=1e-6, sensitivity=1.0)
    )


def test_discrete_gaussian_delta_matches_cks20_formula_and_dp_accounting() -> None:
    """Our single-sum delta equals CKS20 Thm 7's two-tail form and dp-accounting's PLD."""
    from dp_accounting.pld import privacy_loss_distribution as pld

    for sigma, eps, sens in [(2.0, 0.5, 1), (5.0, 1.0, 3), (30.0, 0.2, 1)]:
        ours = m.discrete_gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=sens)
        # Two-tail form by direct summation over a wide support.
        y = np.arange(-int(60 * sigma) - sens, int(60 * sigma) + sens + 1)
        w = np.exp(-(y**2) / (2 * sigma**2))
        z = w.sum()
        t1 = eps * sigma**2 / sens - sens / 2
        t2 = eps * sigma**2 / sens + sens / 2
        direct = w[y > t1].sum() / z - math.exp(eps) * w[y > t2].sum() / z
        assert ours == pytest.approx(direct, rel=1e-9, abs=1e-15)
        lib = pld.from_discrete_gaussian_mechanism(
            sigma, sensitivity=sens, value_discretization_interval=1e-5
        ).get_delta_for_epsilon(eps)
        assert ours <= lib * (1 + 1e-6)  # the library's estimate is pessimistic
        assert ours == pytest.approx(lib, rel=0.02)


def test_discrete_gaussian_delta_grows_with_the_shift() -> None:
    """The worst neighbour is the one at the full sensitivity (needed for CKS20 Thm 7)."""
    for sigma, eps in [(3.0, 0.5), (20.0, 1.0)]:
        deltas = [
            m.discrete_gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=d)
            for d in (1, 2, 3, 5, 8)
        ]
        assert deltas == sorted(deltas)


def test_discrete_gaussian_sigma_is_tight() -> None:
    for eps, delta, sens in [(1.0, 1e-6, 1), (0.3, 1e-5, 65), (5.0, 1e-9, 100)]:
        sigma = m.discrete_gaussian_sigma(epsilon=eps, delta=delta, sensitivity=sens)
        assert m.discrete_gaussian_delta(sigma=sigma, epsilon=eps, sensitivity=sens) <= delta
        lower = sigma * (1 - 1e-5)
        assert m.discrete_gaussian_delta(sigma=lower, epsilon=eps, sensitivity=sens) > delta
        # Essentially the continuous analytic sigma (CKS20: "essentially the same privacy").
        cont = m.analytic_gaussian_sigma(epsilon=eps, delta=delta, sensitivity=sens)
        assert sigma == pytest.approx(cont, rel=0.02)


# ----------------------------------------------------------------------------- distributions


def test_laplace_distribution_insecure_fixed_seed(quiet_insecure: None) -> None:
    rel = m.laplace(np.zeros(N_FAST), epsilon=0.5, sensitivity=1.0, rng=_rng())
    assert stats.kstest(rel.value, stats.laplace(scale=2.0).cdf).pvalue > P_FIXED
    # The test has power: a 5% wrong scale is rejected.
    assert stats.kstest(rel.value, stats.laplace(scale=2.1).cdf).pvalue < P_FIXED


def test_laplace_distribution_secure() -> None:
    rel = m.laplace(np.zeros(N_SECURE), epsilon=0.5, sensitivity=1.0)
    assert rel.sampler == "opendp"
    assert stats.kstest(rel.value, stats.laplace(scale=2.0).cdf).pvalue > P_SECURE


def test_gaussian_distribution_insecure_fixed_seed(quiet_insecure: None) -> None:
    gen = _rng()
    sigma = m.analytic_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=1.0)
    draws = samplers.numpy_gaussian(np.zeros(N_FAST), sigma=sigma, rng=gen)
    assert stats.kstest(draws, stats.norm(scale=sigma).cdf).pvalue > P_FIXED
    assert stats.kstest(draws, stats.norm(scale=1.05 * sigma).cdf).pvalue < P_FIXED
    public = [
        m.gaussian(0.0, epsilon=1.0, delta=1e-5, sensitivity=1.0, rng=gen).value
        for _ in range(2000)
    ]
    assert stats.kstest(public, stats.norm(scale=sigma).cdf).pvalue > P_FIXED


def test_gaussian_distribution_secure() -> None:
    """The secure Gaussian is a discrete Gaussian on the grid with std ~ the analytic sigma."""
    draws = np.array(
        [m.gaussian(10.0, epsilon=1.0, delta=1e-5, sensitivity=1.0).value for _ in range(2000)]
    )
    rel = m.gaussian(10.0, epsilon=1.0, delta=1e-5, sensitivity=1.0)
    assert stats.kstest(draws - 10.0, stats.norm(scale=rel.scale).cdf).pvalue > P_SECURE
    analytic = m.analytic_gaussian_sigma(epsilon=1.0, delta=1e-5, sensitivity=1.0)
    assert analytic <= rel.scale <= analytic * (1 + 1 / 64 + 1e-3)


def test_discrete_laplace_distribution(quiet_insecure: None) -> None:
    support = np.arange(-25, 26)
    fast = m.discrete_laplace(np.zeros(N_FAST, dtype=np.int64), epsilon=0.5, rng=_rng()).value
    assert _chi2_p(_int_hist(fast, support), _dlap_probs(2.0, support)) > P_FIXED
    secure = m.discrete_laplace(np.zeros(N_SECURE, dtype=np.int64), epsilon=0.5).value
    assert _chi2_p(_int_hist(secure, support), _dlap_probs(2.0, support)) > P_SECURE
    # Power: the pmf of a 10% larger scale is rejected.
    assert _chi2_p(_int_hist(fast, support), _dlap_probs(2.2, support)) < P_FIXED


def test_discrete_gaussian_distribution(quiet_insecure: None) -> None:
    sigma = m.discrete_gaussian_sigma(epsilon=1.0, delta=1e-3, sensitivity=1)
    support = np.arange(-int(6 * sigma), int(6 * sigma) + 1)
    gen = _rng()
    fast = samplers.numpy_discrete_gaussian(np.zeros(N_FAST, dtype=np.int64), scale=sigma, rng=gen)
    assert _chi2_p(_int_hist(np.asarray(fast), support), _dgauss_probs(sigma, support)) > P_FIXED
    secure = samplers.opendp_discrete_gaussian(np.zeros(N_SECURE, dtype=np.int64), scale=sigma)
    assert _chi2_p(_int_hist(np.asarray(secure), support), _dgauss_probs(sigma, support)) > P_SECURE
    # The public scalar mechanism draws from the same law.
    public = np.array([m.discrete_gaussian(0, epsilon=1.0, delta=1e-3).value for _ in range(2000)])
    assert _chi2_p(_int_hist(public, support), _dgauss_probs(sigma, support)) > P_SECURE


def _em_probs(scores: np.ndarray, eps: float, sens: float) -> np.ndarray:
    w = np.exp(eps * (scores - scores.max()) / (2 * sens))
    return w / w.sum()


def test_exponential_mechanism_distribution(quiet_insecure: None) -> None:
    scores = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    probs = _em_probs(scores, 1.0, 1.0)
    gen = _rng()
    # The mechanism's scale for (epsilon=1, sensitivity=1, not monotonic) is 2.
    fast = samplers.numpy_noisy_argmax(scores, scale=2.0, noise="gumbel", rng=gen, size=N_FAST)
    assert _chi2_p(np.bincount(fast, minlength=5), probs) > P_FIXED
    public = [
        m.exponential_mechanism(range(5), scores, epsilon=1.0, sensitivity=1.0, rng=gen).value
        for _ in range(2000)
    ]
    assert _chi2_p(np.bincount(public, minlength=5), probs) > P_FIXED
    secure = [
        m.exponential_mechanism(range(5), scores, epsilon=1.0, sensitivity=1.0).value
        for _ in range(2000)
    ]
    assert _chi2_p(np.bincount(secure, minlength=5), probs) > P_SECURE
    # Power: the probabilities of the wrong (monotonic) scale are rejected.
    assert _chi2_p(np.bincount(fast, minlength=5), _em_probs(scores, 2.0, 1.0)) < P_FIXED


def _rnm_exponential_probs(scores: np.ndarray, scale: float) -> np.ndarray:
    """P[argmax(u_i + Exp(scale))] by numerical integration."""

    def win(i: int) -> float:
        def integrand(x: float) -> float:
            f = math.exp(-(x - scores[i]) / scale) / scale
            for j, u in enumerate(scores):
                if j != i:
                    f *= -math.expm1(-(x - u) / scale) if x > u else 0.0
            return f

        return integrate.quad(integrand, scores[i], scores[i] + 60 * scale, points=list(scores))[0]

    p = np.array([win(i) for i in range(scores.size)])
    return p / p.sum()


def test_report_noisy_max_distribution(quiet_insecure: None) -> None:
    scores = np.array([0.0, 1.0, 2.0, 4.0])
    probs = _rnm_exponential_probs(scores, 2.0)
    gen = _rng()
    fast = samplers.numpy_noisy_argmax(scores, scale=2.0, noise="exponential", rng=gen, size=N_FAST)
    assert _chi2_p(np.bincount(fast, minlength=4), probs) > P_FIXED
    public = [
        m.report_noisy_max(scores, epsilon=1.0, sensitivity=1.0, rng=gen).value for _ in range(2000)
    ]
    assert _chi2_p(np.bincount(public, minlength=4), probs) > P_FIXED
    secure = [m.report_noisy_max(scores, epsilon=1.0, sensitivity=1.0).value for _ in range(2000)]
    assert _chi2_p(np.bincount(secure, minlength=4), probs) > P_SECURE
    # Power: exponential-mechanism probabilities differ and are rejected.
    assert _chi2_p(np.bincount(fast, minlength=4), _em_probs(scores, 1.0, 1.0)) < P_FIXED


def test_randomized_response_distribution(quiet_insecure: None) -> None:
    cats = ["a", "b", "c", "d"]
    eps = 1.2
    p_true = math.exp(eps) / (math.exp(eps) + 3)
    probs = np.array([p_true] + [(1 - p_true) / 3] * 3)
    gen = _rng()
    fast = samplers.numpy_randomized_response(
        "a", categories=cats, prob=p_true, rng=gen, size=N_FAST
    )
    counts = np.array([fast.count(c) for c in cats])
    assert _chi2_p(counts, probs) > P_FIXED
    public = [
        m.randomized_response("a", categories=cats, epsilon=eps, rng=gen).value for _ in range(2000)
    ]
    assert _chi2_p(np.array([public.count(c) for c in cats]), probs) > P_FIXED
    secure = [m.randomized_response("a", categories=cats, epsilon=eps).value for _ in range(2000)]
    assert _chi2_p(np.array([secure.count(c) for c in cats]), probs) > P_SECURE


# ----------------------------------------------------------------------------- DP ratio checks

SLACK = 0.01  # absolute slack on probabilities with 10^5 draws per side (std ~ 0.0016)


def test_laplace_dp_ratio(quiet_insecure: None) -> None:
    eps = 1.0
    a = m.laplace(np.zeros(N_FAST), epsilon=eps, sensitivity=1.0, rng=_rng(1)).value
    b = m.laplace(np.ones(N_FAST), epsilon=eps, sensitivity=1.0, rng=_rng(2)).value
    edges = np.linspace(-4, 5, 37)
    assert _max_ratio_violation(a, b, eps, edges) <= SLACK
    # Negative control: claiming half the epsilon is caught.
    assert _max_ratio_violation(a, b, eps / 2, edges) > 5 * SLACK


def test_laplace_dp_ratio_secure() -> None:
    eps = 1.0
    a = m.laplace(np.zeros(N_SECURE), epsilon=eps, sensitivity=1.0).value
    b = m.laplace(np.ones(N_SECURE), epsilon=eps, sensitivity=1.0).value
    # Unseedable, 2 x 10^4 draws per side: at the tight sets (half-lines from the shift on)
    # P_a(S) - e^eps P_b(S) has mean 0 and standard deviation up to
    # sqrt((0.25 + e^2 * 0.184 * 0.816) / 20000) = 0.0082, and the maximum over the correlated
    # sets exceeded 0.025 in 2.35e-3 of 20,000 simulated runs (a flaky bound). 0.045 is 5.5
    # of those deviations: a false alarm below 1e-7. A mechanism whose true epsilon is 10 %
    # above the claim already violates it by 0.048 at the half-line from 1.
    assert _max_ratio_violation(a, b, eps, np.linspace(-4, 5, 19)) <= 4.5 * SLACK


def test_gaussian_dp_ratio(quiet_insecure: None) -> None:
    eps, delta = 1.0, 1e-3
    gen = _rng(3)
    sigma = m.gaussian(0.0, epsilon=eps, delta=delta, sensitivity=1.0, rng=gen).scale
    a = samplers.numpy_gaussian(np.zeros(N_FAST), sigma=sigma, rng=gen)
    b = samplers.numpy_gaussian(np.ones(N_FAST), sigma=sigma, rng=gen)
    edges = np.linspace(-8, 9, 35)
    assert _max_ratio_violation(a, b, eps, edges) <= delta + SLACK
    assert _max_ratio_violation(a, b, eps / 4, edges) > 3 * SLACK


def test_discrete_mechanisms_dp_ratio(quiet_insecure: None) -> None:
    eps = 0.7
    a = m.discrete_laplace(np.zeros(N_FAST, dtype=np.int64), epsilon=eps, rng=_rng(4)).value
    b = m.discrete_laplace(np.ones(N_FAST, dtype=np.int64), epsilon=eps, rng=_rng(5)).value
    edges = np.arange(-10, 12) - 0.5
    assert _max_ratio_violation(a, b, eps, edges) <= SLACK
    assert _max_ratio_violation(a, b, eps / 2, edges) > 3 * SLACK
    sigma = m.discrete_gaussian_sigma(epsilon=eps, delta=1e-3, sensitivity=1)
    gen = _rng(6)
    c = samplers.numpy_discrete_gaussian_noise(sigma, N_FAST, gen)
    d = samplers.numpy_discrete_gaussian_noise(sigma, N_FAST, gen) + 1
    edges = np.arange(-15, 17) - 0.5
    assert _max_ratio_violation(c, d, eps, edges) <= 1e-3 + SLACK


def test_selection_mechanisms_dp_ratio(quiet_insecure: None) -> None:
    eps = 1.0
    # Neighbouring score vectors: every score moves by at most 1.
    s1 = np.array([0.0, 1.0, 2.0, 3.0])
    s2 = np.array([1.0, 0.0, 3.0, 2.0])
    gen = _rng(7)
    for noise in ("gumbel", "exponential"):
        # Both mechanisms use scale 2 * sensitivity / epsilon for non-monotonic scores.
        d1 = samplers.numpy_noisy_argmax(s1, scale=2.0 / eps, noise=noise, rng=gen, size=N_FAST)  # type: ignore[arg-type]
        d2 = samplers.numpy_noisy_argmax(s2, scale=2.0 / eps, noise=noise, rng=gen, size=N_FAST)  # type: ignore[arg-type]
        p1 = np.bincount(d1, minlength=4) / N_FAST
        p2 = np.bincount(d2, minlength=4) / N_FAST
        assert np.all(p1 <= math.exp(eps) * p2 + SLACK)
        assert np.all(p2 <= math.exp(eps) * p1 + SLACK)
        # Negative control: half the noise (scale 1 / eps) breaks the claimed epsilon.
        h1 = samplers.numpy_noisy_argmax(s1, scale=0.5 / eps, noise=noise, rng=gen, size=N_FAST)  # type: ignore[arg-type]
        h2 = samplers.numpy_noisy_argmax(s2, scale=0.5 / eps, noise=noise, rng=gen, size=N_FAST)  # type: ignore[arg-type]
        q1 = np.bincount(h1, minlength=4) / N_FAST
        q2 = np.bincount(h2, minlength=4) / N_FAST
        assert np.any(q1 > math.exp(eps) * q2 + SLACK) or np.any(q2 > math.exp(eps) * q1 + SLACK)


def test_randomized_response_dp_ratio(quiet_insecure: None) -> None:
    eps = 0.8
    gen = _rng(8)
    cats = [0, 1, 2]
    prob = m.randomized_response(0, categories=cats, epsilon=eps, rng=gen).event.noise_parameter
    p_true = 1 - prob + prob / 3
    a = samplers.numpy_randomized_response(0, categories=cats, prob=p_true, rng=gen, size=N_FAST)
    b = samplers.numpy_randomized_response(1, categories=cats, prob=p_true, rng=gen, size=N_FAST)
    pa = np.bincount(a, minlength=3) / len(a)
    pb = np.bincount(b, minlength=3) / len(b)
    assert np.all(pa <= math.exp(eps) * pb + SLACK) and np.all(pb <= math.exp(eps) * pa + SLACK)
    # Tight: the true category's ratio is e^eps.
    assert pa[0] / pb[0] == pytest.approx(math.exp(eps), rel=0.05)
