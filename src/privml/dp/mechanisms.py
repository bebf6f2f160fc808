"""Differentially private mechanisms: Laplace, Gaussian, discrete Laplace and Gaussian,
exponential mechanism, report-noisy-max and randomized response.

Every mechanism takes keyword-only, validated privacy parameters and returns a
:class:`Release`: the noisy value together with the (epsilon, delta) it costs and the
:class:`~dp_accounting.DpEvent` that describes what was done, so that accounting stays separate
from the mechanism (see :mod:`privml.dp.accounting` and :mod:`privml.dp.ledger`). The release
pattern for private data is: charge the ledger first, then call the mechanism.

Sampling. By default (``rng=None``) noise comes from OpenDP's exact samplers fed by a
cryptographically secure source (see :mod:`privml.dp.samplers`), which defeats the
floating-point attack of Mironov 2012. Passing ``rng=numpy.random.Generator(...)`` switches to
an **insecure** floating-point sampler for simulations and warns with
:class:`~privml.errors.InsecureOptionWarning`.

Neighbouring relation. ``sensitivity`` is the largest change of the query between neighbouring
datasets in whatever relation the caller uses (privml's queries use add/remove one record);
epsilon and delta hold for that same relation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, Literal, TypeVar

import numpy as np
from scipy.stats import norm

from privml.dp import samplers
from privml.dp.events import (
    DiscreteGaussianDpEvent,
    DiscreteLaplaceDpEvent,
    DpEvent,
    GaussianDpEvent,
    LaplaceDpEvent,
    PureDpEvent,
    RandomizedResponseDpEvent,
)
from privml.errors import UsageError

__all__ = [
    "GaussianCalibration",
    "Release",
    "analytic_gaussian_delta",
    "analytic_gaussian_sigma",
    "check_delta",
    "check_epsilon",
    "check_sensitivity",
    "classic_gaussian_sigma",
    "discrete_gaussian",
    "discrete_gaussian_delta",
    "discrete_gaussian_sigma",
    "discrete_laplace",
    "exponential_mechanism",
    "gaussian",
    "gaussian_grid",
    "laplace",
    "randomized_response",
    "report_noisy_max",
]

T = TypeVar("T")
GaussianCalibration = Literal["analytic", "classic"]


@dataclass(frozen=True)
class Release(Generic[T]):
    """The output of one mechanism invocation.

    Attributes:
        value: the noisy statistic (or the selected candidate).
        epsilon: the epsilon this invocation alone costs (nats), as booked in a ledger.
        delta: the delta this invocation alone costs (0 for pure-DP mechanisms).
        event: the DpEvent describing the invocation, for accountants.
        mechanism: the mechanism's name, e.g. ``"laplace"``.
        sampler: ``"opendp"`` (secure) or ``"numpy-insecure"``.
        scale: the noise scale in the value's units (Laplace b, Gaussian sigma); 0 for
            selection mechanisms.
    """

    value: T
    epsilon: float
    delta: float
    event: DpEvent
    mechanism: str
    sampler: str
    scale: float


# ----------------------------------------------------------------------------- validation


def _real(name: str, func: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"The '{name}' parameter of {func} must be a real number. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    return float(value)


#: Epsilons a mechanism accepts: below, the noise is over a million times the sensitivity (and
#: its scale stops being representable near 1e-308); above, the answer is exact in practice.
EPSILON_RANGE = (1e-6, 1e4)


def check_epsilon(epsilon: object, func: str) -> float:
    """Validates epsilon > 0, finite and within :data:`EPSILON_RANGE` (nats); returns it."""
    eps = _real("epsilon", func, epsilon)
    if not (eps > 0 and math.isfinite(eps)):
        raise UsageError(
            f"The 'epsilon' parameter of {func} must be > 0 and finite. Got {epsilon!r} instead."
        )
    lo, hi = EPSILON_RANGE
    if not lo <= eps <= hi:
        raise UsageError(
            f"The 'epsilon' parameter of {func} must be in [{lo:g}, {hi:g}]: below, the noise "
            "swamps any answer (and soon cannot be represented); above, the answer is exact "
            f"in practice. Got {epsilon!r} instead."
        )
    return eps


def check_delta(delta: object, func: str) -> float:
    """Validates 0 < delta < 1; returns it as float."""
    d = _real("delta", func, delta)
    if not 0 < d < 1:
        raise UsageError(
            f"The 'delta' parameter of {func} must be in (0, 1). Got {delta!r} instead."
        )
    return d


def check_sensitivity(sensitivity: object, func: str, *, integer: bool = False) -> float:
    """Validates sensitivity > 0 and finite (a positive int if ``integer``)."""
    if integer:
        if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, np.integer)):
            raise TypeError(
                f"The 'sensitivity' parameter of {func} must be a positive int. "
                f"Got {sensitivity!r} ({type(sensitivity).__name__}) instead."
            )
        if sensitivity < 1:
            raise UsageError(
                f"The 'sensitivity' parameter of {func} must be >= 1. Got {sensitivity!r} instead."
            )
        return float(sensitivity)
    s = _real("sensitivity", func, sensitivity)
    if not (s > 0 and math.isfinite(s)):
        raise UsageError(
            f"The 'sensitivity' parameter of {func} must be > 0 and finite. "
            f"Got {sensitivity!r} instead."
        )
    return s


def _check_rng(rng: object, func: str) -> np.random.Generator | None:
    if rng is None:
        return None
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"The 'rng' parameter of {func} must be None (secure) or a numpy.random.Generator "
            f"(insecure, simulations only). Got {type(rng).__name__} instead."
        )
    samplers.warn_insecure(func)
    return rng


def _float_value(value: object, func: str) -> float | np.ndarray:
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0:
            raise UsageError(
                f"The 'value' parameter of {func} must be a number or a non-empty 1-D array. "
                f"Got shape {arr.shape} instead."
            )
        if not np.all(np.isfinite(arr)):
            raise UsageError(f"The 'value' parameter of {func} must be finite. Got {arr!r}.")
        return arr
    v = _real("value", func, value)
    if not math.isfinite(v):
        raise UsageError(f"The 'value' parameter of {func} must be finite. Got {value!r} instead.")
    return v


def _int_value(value: object, func: str) -> int | np.ndarray:
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(
                f"The 'value' parameter of {func} must be an int or a non-empty 1-D integer "
                f"array. Got dtype {arr.dtype}, shape {arr.shape} instead."
            )
        return arr.astype(np.int64)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"The 'value' parameter of {func} must be an int. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    return int(value)


# ----------------------------------------------------------------------------- Gaussian maths


def classic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Classic Gaussian mechanism noise: sigma = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon.

    Valid only for 0 < epsilon < 1 (Dwork & Roth 2014, Theorem A.1); larger epsilons raise
    :class:`~privml.errors.UsageError` -- use :func:`analytic_gaussian_sigma`.
    """
    func = "classic_gaussian_sigma"
    eps = check_epsilon(epsilon, func)
    d = check_delta(delta, func)
    sens = check_sensitivity(sensitivity, func)
    if eps >= 1:
        raise UsageError(
            f"The 'epsilon' parameter of the classic Gaussian mechanism must be < 1 (its proof "
            f"only covers 0 < epsilon < 1). Got {epsilon!r} instead; use "
            "calibration='analytic', which is valid for any epsilon."
        )
    return sens * math.sqrt(2.0 * math.log(1.25 / d)) / eps


def analytic_gaussian_delta(*, sigma: float, epsilon: float, sensitivity: float) -> float:
    """Exact delta of the continuous Gaussian mechanism (Balle & Wang 2018, Theorem 8).

    delta = Phi(D/(2s) - e s/D) - e^e Phi(-D/(2s) - e s/D), with D the L2 sensitivity,
    s = sigma and e = epsilon; the second term is evaluated in log space.
    """
    func = "analytic_gaussian_delta"
    s = check_sensitivity(sigma, func)
    eps = _real("epsilon", func, epsilon)
    if not (eps >= 0 and math.isfinite(eps)):
        raise UsageError(f"The 'epsilon' parameter of {func} must be >= 0. Got {epsilon!r}.")
    sens = check_sensitivity(sensitivity, func)
    a = sens / (2.0 * s)
    b = eps * s / sens
    first = float(norm.cdf(a - b))
    log_second = eps + float(norm.logcdf(-a - b))
    second = math.exp(log_second) if log_second > -745 else 0.0
    return max(0.0, first - second)


def analytic_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: float) -> float:
    """Smallest sigma making the Gaussian mechanism (epsilon, delta)-DP, for any epsilon > 0.

    The analytic Gaussian mechanism of Balle & Wang 2018: bisection on sigma over the exact
    condition :func:`analytic_gaussian_delta` <= delta (scipy's ``norm.cdf``/``logcdf``), to a
    relative width of 1e-12, returning the upper (safe) end.
    """
    func = "analytic_gaussian_sigma"
    eps = check_epsilon(epsilon, func)
    d = check_delta(delta, func)
    sens = check_sensitivity(sensitivity, func)
    return sens * _analytic_sigma_unit(eps, d)


@lru_cache(maxsize=4096)
def _analytic_sigma_unit(eps: float, delta: float) -> float:
    def excess(u: float) -> float:
        return analytic_gaussian_delta(sigma=u, epsilon=eps, sensitivity=1.0) - delta

    lo, hi = 1.0, 1.0
    while excess(hi) > 0:
        hi *= 2.0
    while excess(lo) <= 0 and lo > 1e-12:
        lo /= 2.0
    while (hi - lo) > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def _dg_normaliser(sigma: float) -> float:
    """Z = sum over all integers y of exp(-y^2 / (2 sigma^2))."""
    if sigma >= 10.0:
        # Poisson summation: Z = sqrt(2 pi) sigma (1 + 2 sum_k exp(-2 pi^2 sigma^2 k^2)).
        return math.sqrt(2.0 * math.pi) * sigma
    n = math.ceil(40.0 * sigma) + 2
    y = np.arange(-n, n + 1, dtype=np.float64)
    return float(np.sum(np.exp(-(y**2) / (2.0 * sigma**2))))


def discrete_gaussian_delta(*, sigma: float, epsilon: float, sensitivity: int) -> float:
    """Exact delta of the discrete Gaussian mechanism (Canonne, Kamath & Steinke 2020, Thm 7).

    For an integer query with integer sensitivity D and noise N_Z(0, sigma^2),
    delta = P[X > e s^2/D - D/2] - e^e P[X > e s^2/D + D/2]. privml evaluates the equivalent
    single sum over y > e s^2/D - D/2 of w(y) (1 - exp(e - (2 y D + D^2) / (2 s^2))) / Z,
    whose terms are all non-negative (no cancellation), truncated 13 sigma past its start
    (the omitted mass is below e^-84 of the total).
    """
    func = "discrete_gaussian_delta"
    s = check_sensitivity(sigma, func)
    eps = _real("epsilon", func, epsilon)
    if not (eps >= 0 and math.isfinite(eps)):
        raise UsageError(f"The 'epsilon' parameter of {func} must be >= 0. Got {epsilon!r}.")
    d = int(check_sensitivity(sensitivity, func, integer=True))
    return _dg_delta(s, eps, d)


def _dg_delta(sigma: float, eps: float, sens: int) -> float:
    t = eps * sigma**2 / sens - sens / 2.0
    start = math.floor(t) + 1
    stop = max(start, 0) + math.ceil(13.0 * sigma) + 2
    y = np.arange(start, stop + 1, dtype=np.float64)
    loss = (2.0 * y * sens + sens**2) / (2.0 * sigma**2)
    terms = np.exp(-(y**2) / (2.0 * sigma**2)) * -np.expm1(np.minimum(eps - loss, 0.0))
    return float(np.sum(terms)) / _dg_normaliser(sigma)


@lru_cache(maxsize=4096)
def _dg_sigma(eps: float, delta: float, sens: int) -> float:
    # The continuous analytic sigma is an excellent starting bracket.
    guess = max(1e-3, sens * _analytic_sigma_unit(eps, delta))
    lo, hi = guess / 1.5, guess * 1.5
    while _dg_delta(hi, eps, sens) > delta:
        hi *= 2.0
    while _dg_delta(lo, eps, sens) <= delta and lo > 1e-6:
        lo /= 2.0
    while (hi - lo) > 1e-7 * hi:
        mid = 0.5 * (lo + hi)
        if _dg_delta(mid, eps, sens) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def discrete_gaussian_sigma(*, epsilon: float, delta: float, sensitivity: int) -> float:
    """Smallest discrete-Gaussian scale sigma (to 1e-7 relative) whose exact delta <= delta.

    Bisection on :func:`discrete_gaussian_delta`, bracketed by the analytic continuous sigma.
    """
    func = "discrete_gaussian_sigma"
    eps = check_epsilon(epsilon, func)
    d = check_delta(delta, func)
    sens = int(check_sensitivity(sensitivity, func, integer=True))
    return _dg_sigma(eps, d, sens)


def gaussian_grid(sensitivity: float) -> tuple[float, int]:
    """The snapping grid of the secure Gaussian: (step g, integer sensitivity in steps).

    g is the power of two with 64 <= sensitivity / g < 128; values are rounded to multiples of
    g, which can move two neighbours' rounded values apart by at most floor(sens/g) + 1 steps.
    The noise is therefore calibrated for at most 1/64 (1.6%) more sensitivity than declared.
    """
    sens = check_sensitivity(sensitivity, "gaussian_grid")
    exponent = math.floor(math.log2(sens / 64.0))
    step = math.ldexp(1.0, exponent)
    while sens / step >= 128.0:
        step *= 2.0
    while sens / step < 64.0:
        step /= 2.0
    return step, math.floor(sens / step) + 1


# ----------------------------------------------------------------------------- mechanisms


def laplace(
    value: float | Sequence[float] | np.ndarray,
    *,
    epsilon: float,
    sensitivity: float,
    rng: np.random.Generator | None = None,
) -> Release[Any]:
    """Laplace mechanism: value + Laplace(sensitivity / epsilon) noise; epsilon-DP.

    Args:
        value: the exact query answer, a finite float or a 1-D array.
        epsilon: privacy parameter > 0 (nats) per invocation.
        sensitivity: the L1 sensitivity of the query (> 0), in the value's units.
        rng: ``None`` (default, secure): OpenDP's float Laplace, which snaps the value to a
            power-of-two grid and adds exact discrete-Laplace noise from a CSPRNG; its privacy
            map certifies epsilon (defeats Mironov 2012). A ``numpy.random.Generator``:
            INSECURE floating-point noise for simulations, with an InsecureOptionWarning.

    Returns:
        A :class:`Release` with ``LaplaceDpEvent(noise_multiplier=scale / sensitivity)``.
    """
    func = "laplace"
    eps = check_epsilon(epsilon, func)
    sens = check_sensitivity(sensitivity, func)
    val = _float_value(value, func)
    generator = _check_rng(rng, func)
    scale = samplers.certified_laplace_scale(sensitivity=sens, epsilon=eps)
    if generator is None:
        noisy: Any = samplers.opendp_laplace(val, scale=scale)
        sampler = samplers.SECURE_SAMPLER
    else:
        noisy = samplers.numpy_laplace(val, scale=scale, rng=generator)
        sampler = samplers.INSECURE_SAMPLER
    return Release(noisy, eps, 0.0, LaplaceDpEvent(scale / sens), func, sampler, scale)


def gaussian(
    value: float,
    *,
    epsilon: float,
    delta: float,
    sensitivity: float,
    calibration: GaussianCalibration = "analytic",
    rng: np.random.Generator | None = None,
) -> Release[float]:
    """Gaussian mechanism on a scalar; (epsilon, delta)-DP for any epsilon > 0.

    Args:
        value: the exact query answer (finite float).
        epsilon: privacy parameter > 0 (nats).
        delta: privacy parameter in (0, 1).
        sensitivity: the query's L2 (= absolute, for a scalar) sensitivity, > 0.
        calibration: ``"analytic"`` (default): the analytic Gaussian of Balle & Wang 2018
            (exact condition, any epsilon); ``"classic"``: sensitivity sqrt(2 ln(1.25/delta)) /
            epsilon, only for epsilon < 1.
        rng: ``None`` (default, secure): the value is snapped to the grid of
            :func:`gaussian_grid` and exact discrete Gaussian noise is added by OpenDP's CKS20
            sampler; its scale is the smallest whose *exact* discrete-Gaussian delta
            (:func:`discrete_gaussian_delta`) is <= delta at the grid sensitivity, so the
            guarantee is exact, not an approximation of the continuous one (noise std is at
            most ~1.6% above the continuous analytic sigma). A ``numpy.random.Generator``:
            INSECURE continuous N(0, sigma^2) noise with the continuous calibration.

    Returns:
        A :class:`Release`; its event is ``DiscreteGaussianDpEvent`` (secure) or
        ``GaussianDpEvent`` (insecure).
    """
    func = "gaussian"
    eps = check_epsilon(epsilon, func)
    d = check_delta(delta, func)
    sens = check_sensitivity(sensitivity, func)
    if calibration not in ("analytic", "classic"):
        raise UsageError(
            f"The 'calibration' parameter of gaussian must be 'analytic' or 'classic'. "
            f"Got {calibration!r} instead."
        )
    if calibration == "classic":
        classic_gaussian_sigma(epsilon=eps, delta=d, sensitivity=sens)  # validates eps < 1
    val = _float_value(value, func)
    if isinstance(val, np.ndarray):
        raise UsageError(
            "The 'value' parameter of gaussian must be a scalar; release vectors coordinate by "
            "coordinate with a split budget, or use laplace for L1-bounded vectors."
        )
    generator = _check_rng(rng, func)
    if generator is not None:
        if calibration == "analytic":
            sigma = analytic_gaussian_sigma(epsilon=eps, delta=d, sensitivity=sens)
        else:
            sigma = classic_gaussian_sigma(epsilon=eps, delta=d, sensitivity=sens)
        noisy = float(samplers.numpy_gaussian(val, sigma=sigma, rng=generator))
        event: DpEvent = GaussianDpEvent(sigma / sens)
        return Release(noisy, eps, d, event, func, samplers.INSECURE_SAMPLER, sigma)
    step, grid_sens = gaussian_grid(sens)
    if calibration == "analytic":
        sigma_grid = _dg_sigma(eps, d, grid_sens)
    else:
        sigma_grid = classic_gaussian_sigma(epsilon=eps, delta=d, sensitivity=float(grid_sens))
        if _dg_delta(sigma_grid, eps, grid_sens) > d:  # pragma: no cover - classic is loose
            sigma_grid = _dg_sigma(eps, d, grid_sens)
    snapped = round(val / step)
    noisy_int = samplers.opendp_discrete_gaussian(int(snapped), scale=sigma_grid)
    assert isinstance(noisy_int, int)
    event = DiscreteGaussianDpEvent(sigma_grid, grid_sens)
    return Release(
        float(noisy_int) * step, eps, d, event, func, samplers.SECURE_SAMPLER, sigma_grid * step
    )


def discrete_laplace(
    value: int | Sequence[int] | np.ndarray,
    *,
    epsilon: float,
    sensitivity: int = 1,
    rng: np.random.Generator | None = None,
) -> Release[Any]:
    """Discrete Laplace (geometric) mechanism for integer queries; epsilon-DP.

    Adds noise with P(k) proportional to exp(-|k| epsilon / sensitivity).

    Args:
        value: exact integer answer, or a 1-D integer array (then ``sensitivity`` is L1).
        epsilon: privacy parameter > 0 (nats).
        sensitivity: integer sensitivity >= 1 (1 for a count under add/remove).
        rng: ``None`` (default, secure): OpenDP's exact discrete Laplace sampler (CSPRNG);
            a ``numpy.random.Generator``: INSECURE, for simulations.
    """
    func = "discrete_laplace"
    eps = check_epsilon(epsilon, func)
    sens = check_sensitivity(sensitivity, func, integer=True)
    val = _int_value(value, func)
    generator = _check_rng(rng, func)
    scale = samplers.certified_laplace_scale(sensitivity=sens, epsilon=eps, integer=True)
    if generator is None:
        noisy: Any = samplers.opendp_discrete_laplace(val, scale=scale)
        sampler = samplers.SECURE_SAMPLER
    else:
        noisy = samplers.numpy_discrete_laplace(val, scale=scale, rng=generator)
        sampler = samplers.INSECURE_SAMPLER
    event = DiscreteLaplaceDpEvent(noise_parameter=1.0 / scale, sensitivity=int(sens))
    return Release(noisy, eps, 0.0, event, func, sampler, scale)


def discrete_gaussian(
    value: int,
    *,
    epsilon: float,
    delta: float,
    sensitivity: int = 1,
    rng: np.random.Generator | None = None,
) -> Release[int]:
    """Discrete Gaussian mechanism (Canonne, Kamath & Steinke 2020) for an integer query.

    The scale is the smallest whose exact delta (:func:`discrete_gaussian_delta`) is <= delta.

    Args:
        value: exact integer answer.
        epsilon: privacy parameter > 0 (nats).
        delta: privacy parameter in (0, 1).
        sensitivity: integer sensitivity >= 1.
        rng: ``None`` (default, secure): OpenDP's exact CKS20 sampler (CSPRNG); a
            ``numpy.random.Generator``: INSECURE rejection sampler, for simulations.
    """
    func = "discrete_gaussian"
    eps = check_epsilon(epsilon, func)
    d = check_delta(delta, func)
    sens = int(check_sensitivity(sensitivity, func, integer=True))
    val = _int_value(value, func)
    if isinstance(val, np.ndarray):
        raise UsageError("The 'value' parameter of discrete_gaussian must be a scalar int.")
    generator = _check_rng(rng, func)
    sigma = _dg_sigma(eps, d, sens)
    if generator is None:
        noisy = samplers.opendp_discrete_gaussian(val, scale=sigma)
        sampler = samplers.SECURE_SAMPLER
    else:
        noisy = samplers.numpy_discrete_gaussian(val, scale=sigma, rng=generator)
        sampler = samplers.INSECURE_SAMPLER
    assert isinstance(noisy, int)
    return Release(noisy, eps, d, DiscreteGaussianDpEvent(sigma, sens), func, sampler, sigma)


def _scores(scores: object, n: int | None, func: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise UsageError(
            f"The 'scores' parameter of {func} must be a non-empty 1-D array. "
            f"Got shape {arr.shape} instead."
        )
    if n is not None and arr.size != n:
        raise UsageError(
            f"The 'scores' parameter of {func} must have one score per candidate "
            f"({n}). Got {arr.size} instead."
        )
    if not np.all(np.isfinite(arr)):
        raise UsageError(f"The 'scores' parameter of {func} must be finite.")
    return arr


def exponential_mechanism(
    candidates: Sequence[T],
    scores: Sequence[float] | np.ndarray,
    *,
    epsilon: float,
    sensitivity: float,
    monotonic: bool = False,
    rng: np.random.Generator | None = None,
) -> Release[T]:
    """Exponential mechanism (McSherry & Talwar 2007); epsilon-DP.

    Selects candidate i with probability proportional to exp(epsilon u_i / (2 sensitivity))
    (``exp(epsilon u_i / sensitivity)`` if ``monotonic``: all scores move in the same
    direction between neighbours).

    Args:
        candidates: the public output range (non-empty).
        scores: utility u_i of each candidate (finite); computed from the private data.
        epsilon: privacy parameter > 0 (nats).
        sensitivity: the largest change of any score between neighbours, > 0.
        monotonic: whether the scores are monotonic in the data.
        rng: ``None`` (default, secure): OpenDP's exact Gumbel noisy-max (the Gumbel-max trick
            samples exactly this distribution); a ``numpy.random.Generator``: INSECURE.

    Returns:
        A :class:`Release` whose value is the selected candidate, with ``PureDpEvent``.
    """
    func = "exponential_mechanism"
    eps = check_epsilon(epsilon, func)
    sens = check_sensitivity(sensitivity, func)
    cands = list(candidates)
    if not cands:
        raise UsageError(f"The 'candidates' parameter of {func} must be non-empty.")
    arr = _scores(scores, len(cands), func)
    generator = _check_rng(rng, func)
    scale = (1.0 if monotonic else 2.0) * sens / eps
    if generator is None:
        index = samplers.opendp_noisy_argmax(arr, scale=scale, noise="gumbel")
        sampler = samplers.SECURE_SAMPLER
    else:
        index = samplers.numpy_noisy_argmax(arr, scale=scale, noise="gumbel", rng=generator)
        sampler = samplers.INSECURE_SAMPLER
    return Release(cands[index], eps, 0.0, PureDpEvent(eps), func, sampler, 0.0)


def report_noisy_max(
    scores: Sequence[float] | np.ndarray,
    *,
    epsilon: float,
    sensitivity: float,
    monotonic: bool = False,
    rng: np.random.Generator | None = None,
) -> Release[int]:
    """Report-noisy-max with exponential noise (equivalent to permute-and-flip); epsilon-DP.

    Returns the index of max(score_i + Exponential(2 sensitivity / epsilon)) (scale
    sensitivity / epsilon if ``monotonic``). McKenna & Sheldon 2020 show it is never worse than
    the exponential mechanism in expected utility.

    Args:
        scores: finite scores computed on private data.
        epsilon: privacy parameter > 0 (nats).
        sensitivity: largest change of any score between neighbours, > 0.
        monotonic: whether scores move in one direction between neighbours.
        rng: ``None`` (default, secure): OpenDP ``make_noisy_max`` with exact exponential noise
            and a CSPRNG, whose pure-DP map certifies epsilon; a Generator: INSECURE.
    """
    func = "report_noisy_max"
    eps = check_epsilon(epsilon, func)
    sens = check_sensitivity(sensitivity, func)
    arr = _scores(scores, None, func)
    generator = _check_rng(rng, func)
    scale = (1.0 if monotonic else 2.0) * sens / eps
    if generator is None:
        index = samplers.opendp_noisy_argmax(arr, scale=scale, noise="exponential")
        sampler = samplers.SECURE_SAMPLER
    else:
        index = samplers.numpy_noisy_argmax(arr, scale=scale, noise="exponential", rng=generator)
        sampler = samplers.INSECURE_SAMPLER
    return Release(index, eps, 0.0, PureDpEvent(eps), func, sampler, 0.0)


def randomized_response(
    value: T,
    *,
    categories: Sequence[T],
    epsilon: float,
    rng: np.random.Generator | None = None,
) -> Release[T]:
    """k-ary randomized response (Warner 1965); epsilon-DP for one respondent (local DP).

    Reports the true value with probability e^epsilon / (e^epsilon + k - 1), otherwise one of
    the k - 1 other categories uniformly. The neighbouring relation is *replace* (one
    respondent's value changes).

    Args:
        value: the respondent's true category (must be in ``categories``).
        categories: the k >= 2 distinct public categories.
        epsilon: privacy parameter > 0 (nats).
        rng: ``None`` (default, secure): OpenDP's ``make_randomized_response`` (CSPRNG);
            a Generator: INSECURE.

    Returns:
        A :class:`Release` with ``RandomizedResponseDpEvent`` in dp-accounting's convention
        (noise parameter p: with probability p the output is uniform over all k buckets).
    """
    func = "randomized_response"
    eps = check_epsilon(epsilon, func)
    cats = list(categories)
    if len(cats) < 2 or len(set(map(repr, cats))) != len(cats):
        raise UsageError(
            f"The 'categories' parameter of {func} must hold at least 2 distinct values. "
            f"Got {cats!r} instead."
        )
    if value not in cats:
        raise UsageError(
            f"The 'value' parameter of {func} must be one of the categories {cats!r}. "
            f"Got {value!r} instead."
        )
    generator = _check_rng(rng, func)
    k = len(cats)
    prob = math.exp(eps) / (math.exp(eps) + k - 1) if eps < 700 else 1.0
    if generator is None:
        out = samplers.opendp_randomized_response(value, categories=cats, prob=prob)
        sampler = samplers.SECURE_SAMPLER
    else:
        out = samplers.numpy_randomized_response(value, categories=cats, prob=prob, rng=generator)
        sampler = samplers.INSECURE_SAMPLER
    noise_parameter = k * (1.0 - prob) / (k - 1)
    event = RandomizedResponseDpEvent(noise_parameter=noise_parameter, num_buckets=k)
    return Release(out, eps, 0.0, event, func, sampler, 0.0)
