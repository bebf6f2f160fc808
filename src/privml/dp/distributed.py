"""Distributed DP under secure aggregation: the distributed discrete Gaussian.

Each site adds its share of integer noise to its quantized update before masking, so the sum
the server unmasks carries the calibrated total and nobody, server included, sees an
un-noised sum (Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian Mechanism for
Federated Learning with Secure Aggregation", ICML 2021). This module is the accountant's side
(it knows nothing of the rounds):

* **Quantization.** A site's update, clipped to L2 norm ``clip`` and scaled by ``scale``
  integer units per unit, is rounded at random to integers. Rounding adds to the norm; with
  *conditional* randomized rounding (a site draws its rounding again until the rounded vector
  fits, Kairouz et al. 2021, Sec. 4.1) the rounded norm is at most
  ``sqrt(r^2 + d/4 + sqrt(2 ln(1/beta)) (r + sqrt(d)/2))`` with ``r = clip * scale`` and ``d``
  coordinates (:func:`rounded_norm_bound`; ``beta`` bounds the chance of one redraw). Replacing
  one site's update by another moves the integer sum by at most twice that in L2 norm: the
  sensitivity under the replace-one relation privml accounts under.
* **Noise.** Each site adds ``N_Z(0, sigma^2)`` per coordinate (the discrete Gaussian); the sum
  of ``m`` such shares is close to ``N_Z(0, m sigma^2)``. Proposition 14 of Kairouz et al.
  bounds the Renyi divergence of the sum of ``m`` shares for every order ``alpha``; its last
  form, ``alpha/2 (D2 / (sqrt(m) sigma) + sqrt(d) tau)^2`` with
  ``tau = 10 sum_{k=1}^{m-1} exp(-2 pi^2 sigma^2 k/(k+1))``, is a zCDP bound, which is what is
  booked (:func:`round_rho`; a ``ZCDpEvent`` per round, composed by dp-accounting's RDP
  accountant and converted to (epsilon, delta) with its conversion).
* **Dropped sites' missing shares, colluding sites.** The run declares ``m``, the fewest senders
  whose shares a released sum must contain (``[privacy] distributed_min_senders``), and ``c``,
  the sites assumed to collude with the server (``distributed_colluding_sites``: they know, and
  can subtract, their own shares). The noise is calibrated so that ``m - c`` shares alone give
  the booked epsilon (:func:`site_sigma`): each site adds ``1 / (m - c)`` of the total
  variance. Every further share only adds independent noise (post-processing). A round with
  fewer than ``m`` senders is never released: the honest sites refuse to unmask it
  (:meth:`privml.fl.secagg.SiteSession.unmask`).
* **Client sampling.** Not used to amplify: the guarantee is that of every round taking part
  (a valid upper bound under Poisson client sampling, never smaller than the sampled one).
* **Modular wrap-around.** The unmasked sum is decoded from its residue modulo ``M``; it is
  exact unless a coordinate's noise exceeds ``(M - m T)/2`` (``T`` the quantization range).
  The discrete Gaussian is sub-Gaussian with variance proxy ``sigma^2`` (Canonne, Kamath &
  Steinke 2020), so over ``d`` coordinates and ``R`` rounds the chance of any wrap is at most
  ``2 d R exp(-((M - n T)/2)^2 / (2 n sigma^2))`` (:func:`wrap_probability`);
  :func:`choose_modulus` picks the smallest power of two that keeps it below
  :data:`WRAP_PROBABILITY`.

The noise is drawn from the run's secure noise source (:class:`~privml.dp.randomness.
NoiseStream` uniforms): :func:`discrete_gaussian_rows`, the rejection sampler of Canonne,
Kamath & Steinke (Algorithm 3, discrete Laplace proposals), vectorized in floating point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.dp.randomness import NoiseStream
from privml.errors import ConfigError

__all__ = [
    "BETA",
    "WRAP_PROBABILITY",
    "DistributedPlan",
    "choose_modulus",
    "discrete_gaussian_rows",
    "plan_distributed",
    "round_rho",
    "rounded_norm_bound",
    "site_sigma",
    "wrap_probability",
    "zcdp_epsilon",
]

#: Chance that one conditional rounding needs a redraw (it never changes the bound).
BETA = float(np.exp(-0.5))

#: Largest accepted chance that the noised sum wraps around the modulus in a whole run.
WRAP_PROBABILITY = 1e-9

_ORDERS = np.concatenate([np.linspace(1.02, 10.0, 450), np.linspace(10.5, 256.0, 492),
                          np.geomspace(260.0, 1e5, 60)])  # fmt: skip


def rounded_norm_bound(norm: float, dim: int, beta: float = BETA) -> float:
    """L2 norm bound of a vector of norm ``norm`` after conditional randomized rounding
    (Kairouz et al. 2021, Sec. 4.1)."""
    sq = norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    return math.sqrt(sq)


def _tau(sigma: float, m: int) -> float:
    return 10.0 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, m))


def round_rho(sigma: float, m: int, l2: float, dim: int) -> float:
    """zCDP ``rho`` of the sum of ``m`` shares ``N_Z(0, sigma^2)`` per coordinate over ``dim``
    coordinates, for an integer query of L2 sensitivity ``l2`` (Kairouz et al. 2021,
    Proposition 14, third bound)."""
    if sigma < 0.5:
        return math.inf  # outside the proposition's domain
    return 0.5 * (l2 / (math.sqrt(m) * sigma) + math.sqrt(dim) * _tau(sigma, m)) ** 2


def zcdp_epsilon(rho: float, delta: float) -> float:
    """(epsilon, delta) of ``rho``-zCDP: dp-accounting's RDP conversion (Canonne, Kamath &
    Steinke 2020, Proposition 12)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    if rho <= 0:
        return 0.0
    eps, _ = compute_epsilon(_ORDERS, rho * _ORDERS, delta)
    return float(eps)


@lru_cache(maxsize=256)
def _rho_for(epsilon: float, delta: float) -> float:
    """The largest total ``rho`` whose epsilon is at most ``epsilon`` (bisection)."""
    lo, hi = 0.0, 1.0
    while zcdp_epsilon(hi, delta) <= epsilon:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if zcdp_epsilon(mid, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return lo


@lru_cache(maxsize=1024)
def site_sigma(rho_round: float, m: int, l2: float, dim: int) -> float:
    """The smallest per-site scale whose ``m`` shares give at most ``rho_round`` per round."""
    lo = 0.5
    hi = max(1.0, l2 / (math.sqrt(m) * math.sqrt(2 * rho_round)))
    while round_rho(hi, m, l2, dim) > rho_round:
        hi *= 2
    if round_rho(lo, m, l2, dim) <= rho_round:
        return lo
    while hi - lo > 1e-9 * hi:
        mid = 0.5 * (lo + hi)
        if round_rho(mid, m, l2, dim) <= rho_round:
            hi = mid
        else:
            lo = mid
    return hi


def wrap_probability(
    modulus: int, max_senders: int, quantization_range: int, sigma: float, dim: int, rounds: int
) -> float:
    """Union bound on the chance that any coordinate of any round's noised sum leaves the
    window the server decodes it from (see the module docstring)."""
    slack = (modulus - max_senders * quantization_range) / 2
    if slack <= 0:
        return 1.0
    var = max_senders * sigma**2
    return min(1.0, 2.0 * dim * rounds * math.exp(-(slack**2) / (2 * var)))


def choose_modulus(
    max_senders: int, quantization_range: int, sigma: float, dim: int, rounds: int
) -> int:
    """The smallest power of two >= 2**32 whose :func:`wrap_probability` is below
    :data:`WRAP_PROBABILITY` (at most 2**62)."""
    for bits in range(32, 63):
        m = 1 << bits
        if wrap_probability(m, max_senders, quantization_range, sigma, dim, rounds) <= (
            WRAP_PROBABILITY
        ):
            return m
    raise ConfigError(
        f"distributed DP: no modulus up to 2**62 keeps the noised sum of {max_senders} sites "
        f"(per-site noise {sigma:.4g} units) from wrapping around; lower "
        "training.secagg_quantization_range"
    )


@dataclass(frozen=True)
class DistributedPlan:
    """The distributed discrete Gaussian of a run (all integer quantities in quantization
    units; ``scale`` units per unit of the update).

    Attributes:
        clip: L2 clip of each site's update (the DP clip).
        scale: quantization units per unit (``quantization_range / (2 clipping_range)``).
        dim: coordinates per update.
        rounded_norm: L2 bound after conditional rounding (:func:`rounded_norm_bound`).
        sensitivity: replace-one L2 sensitivity of the integer sum (``2 rounded_norm``).
        steps: rounds accounted (centring round included).
        rho_round, rho: zCDP per round and over the run.
        epsilon, delta: the run's guarantee.
        min_senders: ``m``, the fewest senders of a released sum.
        colluding: ``c``, the senders assumed to collude with the server; ``m - c`` honest
            shares alone give ``epsilon`` (:attr:`honest_shares`).
        max_senders: the largest cohort (the wrap-around bound).
        modulus: the modulus the sum is taken in.
        wrap_probability: bound on any wrap-around in the run.
    """

    clip: float
    scale: float
    dim: int
    rounded_norm: float
    sensitivity: float
    steps: int
    rho_round: float
    rho: float
    epsilon: float
    delta: float
    min_senders: int
    max_senders: int
    quantization_range: int
    modulus: int
    wrap_probability: float
    colluding: int = 0
    sigmas: dict[int, float] = field(default_factory=dict, compare=False)

    @property
    def honest_shares(self) -> int:
        """``m - c``: the shares the calibration counts on in every released sum."""
        return self.min_senders - self.colluding

    @property
    def site_sigma(self) -> float:
        """Each site's noise scale (units): ``honest_shares`` shares give ``epsilon``."""
        return self.sigma(self.honest_shares)

    def sigma(self, shares: int) -> float:
        """Per-site noise scale (units) that gives ``rho_round`` with ``shares`` shares."""
        t = int(shares)
        if t not in self.sigmas:
            self.sigmas[t] = site_sigma(self.rho_round, t, self.sensitivity, self.dim)
        return self.sigmas[t]

    def epsilon_with(self, shares: int) -> float:
        """The run's epsilon if the adversary is left with only ``shares`` honest shares per
        released sum (more colluding sites than declared: each subtracts its own share)."""
        if shares < 1:
            return math.inf
        rho = round_rho(self.site_sigma, int(shares), self.sensitivity, self.dim) * self.steps
        return zcdp_epsilon(rho, self.delta)

    def colluding_epsilons(self) -> dict[int, float]:
        """epsilon by number of colluding sites, from the declared count up."""
        m, c = self.min_senders, self.colluding
        ks = sorted({c, c + 1, c + 2, m // 10, m // 4, m // 2, m - 1} - {*range(c)})
        return {k: self.epsilon_with(m - k) for k in ks if c <= k < m}

    def event(self) -> Any:
        """The DpEvent booked: ``steps`` rounds of ``rho_round``-zCDP."""
        from dp_accounting.dp_event import SelfComposedDpEvent, ZCDpEvent

        return SelfComposedDpEvent(ZCDpEvent(self.rho_round), self.steps)

    def sum_std(self, senders: int | None = None) -> float:
        """Standard deviation (real units) of the noise on a sum of ``senders`` sites' shares
        (default ``honest_shares``: the least an adversary is left with)."""
        k = self.honest_shares if senders is None else int(senders)
        return math.sqrt(k) * self.site_sigma / self.scale

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "distributed discrete Gaussian (Kairouz, Liu & Steinke 2021)",
            "clip": self.clip, "scale_units_per_unit": self.scale, "dim": self.dim,
            "rounding": f"conditional randomized rounding, beta = {BETA:.4f}",
            "rounded_norm_bound_units": self.rounded_norm,
            "l2_sensitivity_units": self.sensitivity,
            "rho_per_round": self.rho_round, "rho": self.rho, "steps": self.steps,
            "epsilon": self.epsilon, "delta": self.delta,
            "min_senders": self.min_senders, "colluding_sites": self.colluding,
            "calibrated_for_senders": self.honest_shares,
            "site_sigma_units": self.site_sigma,
            "noise_std_of_sum_at_min_senders": self.sum_std(self.min_senders),
            "noise_std_of_honest_shares": self.sum_std(),
            "released_only_with": f"at least {self.min_senders} senders (the sites refuse to "
            "unmask a sum of fewer)",
            "epsilon_if_colluding": {str(k): e for k, e in self.colluding_epsilons().items()},
            "max_senders": self.max_senders, "modulus": self.modulus,
            "wrap_probability_bound": self.wrap_probability,
            "sampling_amplification": "none (every round accounted as if every site took part)",
            "accounting": "zCDP per round (Proposition 14), composed and converted to "
            "(epsilon, delta) by dp-accounting's RDP accountant",
        }  # fmt: skip


def plan_distributed(
    *, epsilon: float | None, noise_multiplier: float | None, delta: float, clip: float,
    clipping_range: float, quantization_range: int, dim: int, steps: int, min_senders: int,
    max_senders: int, modulus: int | None, colluding: int = 0,
) -> DistributedPlan:  # fmt: skip
    """Calibrates the distributed discrete Gaussian of a run.

    ``epsilon``: the target (the per-site noise is the smallest that gives at most it with
    ``min_senders - colluding`` shares); or ``noise_multiplier``: the noise of that many shares
    is ``noise_multiplier * clip`` per coordinate (real units). ``modulus``: a fixed one
    (checked against :data:`WRAP_PROBABILITY`), or None to choose it (:func:`choose_modulus`).

    Raises:
        ConfigError: a modulus that lets the sum wrap around, or settings outside the
            mechanism's domain.
    """
    if min_senders < 2 or max_senders < min_senders:
        raise ConfigError(
            f"privacy.distributed_min_senders = {min_senders}: distributed DP needs at least 2 "
            f"senders per released sum and at most the {max_senders} sites of a round; "
            f"set it in [2, {max_senders}]"
        )
    if not 0 <= colluding < min_senders:
        raise ConfigError(
            f"privacy.distributed_colluding_sites = {colluding} must be below "
            f"distributed_min_senders = {min_senders} (at least one honest share per sum)"
        )
    honest = min_senders - colluding
    scale = quantization_range / (2 * clipping_range)
    rn = rounded_norm_bound(clip * scale, dim)
    l2 = 2 * rn
    if epsilon is not None:
        rho = _rho_for(float(epsilon), float(delta))
        rho_round = rho / steps
    else:
        assert noise_multiplier is not None
        sig = float(noise_multiplier) * clip * scale / math.sqrt(honest)
        rho_round = round_rho(sig, honest, l2, dim)
        rho = rho_round * steps
    sigma_min = site_sigma(rho_round, honest, l2, dim)
    if modulus is None:
        modulus = choose_modulus(max_senders, quantization_range, sigma_min, dim, steps)
    wrap = wrap_probability(modulus, max_senders, quantization_range, sigma_min, dim, steps)
    if wrap > WRAP_PROBABILITY:
        raise ConfigError(
            f"training.secagg_modulus = {modulus}: the noised sum of up to {max_senders} sites "
            f"may wrap around it (probability bound {wrap:.3g} > {WRAP_PROBABILITY:g}); remove "
            "secagg_modulus to let privml choose one, or raise it"
        )
    eps = zcdp_epsilon(rho_round * steps, delta)
    plan = DistributedPlan(
        float(clip), scale, int(dim), rn, l2, int(steps), rho_round, rho_round * steps, eps,
        float(delta), int(min_senders), int(max_senders), int(quantization_range), int(modulus),
        wrap, int(colluding),
    )  # fmt: skip
    plan.sigmas[honest] = sigma_min
    return plan


def discrete_gaussian_rows(
    streams: Sequence[NoiseStream], sigma: float, n: int
) -> NDArray[np.int64]:
    """``[len(streams), n]`` draws of ``N_Z(0, sigma^2)``, row ``r`` from ``streams[r]``'s
    uniforms (Canonne, Kamath & Steinke 2020, Algorithm 3: discrete Laplace proposals of scale
    ``t = floor(sigma) + 1``, each accepted with probability
    ``exp(-(|y| - sigma^2/t)^2 / (2 sigma^2))``), in float64 arithmetic."""
    out = np.zeros((len(streams), n), dtype=np.int64)
    if n == 0 or not len(streams):
        return out
    t = math.floor(sigma) + 1
    for r, stream in enumerate(streams):
        row = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while len(todo):
            k = len(todo)
            u = stream.random((3, k))
            # geometric counts with P(G = g) = (1 - p) p^g, p = exp(-1/t); 1 - u is in (0, 1]
            g1 = np.floor(-t * np.log1p(-u[0]))
            g2 = np.floor(-t * np.log1p(-u[1]))
            y = g1 - g2
            accept = u[2] < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
            row[todo[accept]] = y[accept].astype(np.int64)
            todo = todo[~accept]
        out[r] = row
    return out
