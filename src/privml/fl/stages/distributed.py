"""Distributed DP under SecAgg+ masking (``[privacy] mode = "client"`` with
``secure_aggregation = "secagg+"``): client-level DP without anyone adding noise centrally.

The stages, around SecAgg+'s (:mod:`privml.fl.stages.masking`):

* cohort: Poisson sampling of sites from the run's noise source (as DP-FedAvg);
* accounting (:class:`DistributedAccounting`): each site books the run's epsilon before its
  first update leaves;
* seal, at each site: clip to the DP clip, quantize with *conditional* randomized rounding
  (draws from the site's stream ``("secagg-rounding", round, site)``), add its share of
  discrete Gaussian noise (:class:`DiscreteGaussianShare`, the site's stream
  ``("ddg-share", round, site)``), mask;
* combine, at the server: unmask the sum (which carries the noise of every sender), decode it
  around the middle of its range, divide by the expected number of clients. A round with
  fewer than ``m`` senders (``[privacy] distributed_min_senders``) is skipped
  (``dp_too_few_senders``): the server stops, and were it to go on, every honest site would
  refuse its unmask request (each checks the list of senders against ``m`` itself).

The calibration and its accounting (quantization, modular wrap-around, dropped sites' missing
shares) are :mod:`privml.dp.distributed`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.dp.distributed import DistributedPlan, discrete_gaussian_rows, plan_distributed
from privml.dp.ledger import PrivacyLedger
from privml.dp.planning import NOT_ACCOUNTED, RELATION_NAME, RELATION_REASON, precheck
from privml.dp.randomness import NoiseSource, NoiseStream
from privml.errors import ConfigError
from privml.fl.rounds import SiteUpdates

__all__ = [
    "DiscreteGaussianShare",
    "DistributedAccounting",
    "StreamUniforms",
    "distributed_parts",
    "distributed_privacy",
]


@dataclass
class DiscreteGaussianShare:
    """Each sender's share of the noise: ``N_Z(0, sigma^2)`` per coordinate, in quantization
    units, where ``sigma`` makes ``m - c`` shares alone give the booked epsilon
    (:attr:`~privml.dp.distributed.DistributedPlan.site_sigma`; the round's SecAgg+ threshold
    plays no part: sums of fewer than ``m`` senders are never released)."""

    plan: DistributedPlan
    noise: NoiseSource
    draws: int = 0

    def __call__(self, batch: SiteUpdates, threshold: int) -> NDArray[np.int64]:
        sigma = self.plan.site_sigma
        streams = [self.noise.stream("ddg-share", batch.rnd, int(i)) for i in batch.ids]
        n = int(np.asarray(batch.updates).shape[1])
        self.draws += len(streams) * n
        return discrete_gaussian_rows(streams, sigma, n)


@dataclass
class StreamUniforms:
    """Stochastic rounding's draws from each site's stream ``("secagg-rounding", round,
    site)``; a redraw (conditional rounding) continues the stream."""

    noise: NoiseSource
    _rnd: int = -1
    _streams: dict[int, NoiseStream] = field(default_factory=dict)

    def __call__(self, rnd: int, ids: NDArray[np.int64], n: int) -> NDArray[np.float64]:
        if rnd != self._rnd:
            self._rnd, self._streams = rnd, {}
        out = np.empty((len(ids), n))
        for r, i in enumerate(ids):
            key = int(i)
            if key not in self._streams:
                self._streams[key] = self.noise.stream("secagg-rounding", rnd, key)
            out[r] = self._streams[key].random(n)
        return out


@dataclass
class DistributedAccounting:
    """Each site books the run's epsilon (``steps`` rounds of the distributed discrete
    Gaussian's zCDP) once, before its first update leaves."""

    ledger: PrivacyLedger
    plan: DistributedPlan
    sites: list[str]
    run_id: str
    sampling_rate: float
    booked: bool = False
    name = "client accounting"

    def book(self) -> None:
        if self.booked:
            return
        p = self.plan
        meta = {"run": self.run_id, "mode": "client", "mechanism": "distributed discrete "
                "Gaussian under SecAgg+", "accountant": "zcdp", "neighboring_relation":
                RELATION_NAME, "delta": p.delta, "rho": p.rho, "steps": p.steps,
                "min_senders": p.min_senders, "colluding_sites": p.colluding,
                "calibrated_for_senders": p.honest_shares,
                "sampling_rate": self.sampling_rate}  # fmt: skip
        for n in self.sites:
            self.ledger.charge(site=n, epsilon=p.epsilon, delta=p.delta,
                               label="distributed dp-fedavg run (client level, secagg+)",
                               event=p.event(), metadata=meta)  # fmt: skip
        self.booked = True

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "booked": self.booked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.booked = str(state["run"]), bool(state["booked"])


def distributed_privacy(
    privacy: Any, plan: DistributedPlan, accounting: DistributedAccounting, q: float, n: int,
    rounds: int, ledger: PrivacyLedger | None, noise: NoiseSource, share: DiscreteGaussianShare,
) -> dict[str, Any]:  # fmt: skip
    """results.json ``privacy`` of a run with distributed DP."""
    p = privacy
    z = plan.sum_std() / plan.clip
    return {
        "mode": "client",
        "unit": "one client (all records of a site)",
        "relation": RELATION_NAME,
        "relation_reason": RELATION_REASON,
        "accountant": "zcdp (Kairouz et al. 2021, Proposition 14; dp-accounting's RDP "
        "conversion)",
        "delta": p.delta,
        "epsilon": plan.epsilon,
        "epsilon_target": p.epsilon,
        "epsilon_per_site": dict.fromkeys(accounting.sites, plan.epsilon),
        "noise_multiplier": z,
        "update_noise_multiplier": z,
        "sampling_rate": q,
        "expected_clients_per_round": q * n,
        "steps": plan.steps,
        "rounds": rounds,
        "centering_rounds": 0,
        "clip": p.clip,
        "adaptive_clip": None,
        "calibrated": p.noise_multiplier is None,
        "calibration_tolerance": None,
        "sampling": "Poisson client sampling, q = clients_per_round / n_sites (not used to "
        "amplify the guarantee)",
        "booking": "each client's whole planned spend, booked in its own ledger before its first "
        "update leaves",
        "noise_added": "by the sites, each its discrete Gaussian share on its quantized update "
        "before masking; the server unmasks only a noised sum",
        "distributed": {**plan.to_dict(), "noise_draws": share.draws},
        "ledger": str(ledger.path) if ledger is not None else None,
        "dataset": ledger.dataset if ledger is not None else None,
        "run": accounting.run_id,
        "noise": noise.describe(),
        "reproducible_noise": not noise.secure,
        "assumes": f"an honest-but-curious server and at most {plan.colluding} sites colluding "
        f"with it; every released sum has at least {plan.min_senders} senders (the sites "
        "refuse to unmask fewer), so at least "
        f"{plan.honest_shares} honest noise shares",
        "not_accounted": [*NOT_ACCOUNTED, f"more than {plan.colluding} colluding sites: each "
                          "further one that subtracts (or omits) its share leaves epsilon that "
                          f"of {plan.honest_shares} - 1, ... shares (results.json privacy."
                          "distributed.epsilon_if_colluding)"],
    }  # fmt: skip


def min_senders(privacy: Any, training: Any, n: int, q: float) -> int:
    """``m``: the configured ``distributed_min_senders``, or 90% of a round's expected
    senders (``q n`` sampled, less ``dropout``), rounded up, at least 2."""
    if privacy.distributed_min_senders is not None:
        return int(privacy.distributed_min_senders)
    expected = q * n * (1 - float(training.dropout))
    return max(2, math.ceil(0.9 * expected - 1e-9))


def distributed_parts(
    config: Any, fed: Any, hspec: Any, ledger: PrivacyLedger, noise: NoiseSource,
    restored: dict[str, Any], *, n_params: int, run_id: str, parts_type: Any,
) -> Any:  # fmt: skip
    """The stages client-level DP adds under SecAgg+ (see the module docstring): a
    :class:`~privml.fl.plan_private.PrivateParts` whose ``secure`` options configure the
    masking stages (``parts_type`` is that class, passed in so that this stage module does
    not import the planner that imports it).

    Raises:
        ConfigError: settings outside the mechanism's domain, or a modulus that may wrap.
        BudgetExceededError: a site's planned spend does not fit its remaining budget.
    """
    from privml.fl.stages.cohort import cohort_size
    from privml.fl.stages.private import client_cohort

    t, p = config.training, config.privacy
    n = len(fed.sites)
    q = cohort_size(n, t) / n
    clip = float(p.clip)
    c = t.secagg_clipping_range if t.secagg_clipping_range is not None else clip
    if c < clip:
        raise ConfigError(
            f"training.secagg_clipping_range = {c:g} is below privacy.clip = {clip:g}: "
            "coordinate clipping would change the sensitivity; remove it or raise it"
        )
    m = min_senders(p, t, n, q)
    # a modulus other than the default is the user's (checked); the default is replaced by
    # the smallest one the noised sum cannot wrap around
    default = type(t).model_fields["secagg_modulus"].default
    fixed = t.secagg_modulus if t.secagg_modulus != default else None
    plan = plan_distributed(
        epsilon=p.epsilon if p.noise_multiplier is None else None,
        noise_multiplier=p.noise_multiplier, delta=p.delta, clip=clip, clipping_range=float(c),
        quantization_range=int(t.secagg_quantization_range), dim=n_params, steps=t.rounds,
        min_senders=m, max_senders=n, modulus=fixed, colluding=int(p.distributed_colluding_sites),
    )  # fmt: skip
    if p.epsilon is not None and plan.epsilon > p.epsilon * (1 + 1e-9):
        raise ConfigError(
            f"noise_multiplier = {p.noise_multiplier:g} gives client-level epsilon "
            f"{plan.epsilon:.4g} over {t.rounds} rounds with {plan.honest_shares} noise shares, "
            "above the "
            f"target epsilon = {p.epsilon:g}; raise it or remove it to calibrate"
        )
    names = [s.name for s in fed.sites]
    accounting = DistributedAccounting(ledger, plan, names, run_id, q)
    if restored:
        accounting.load_state_dict(restored["client accounting"])
    if not accounting.booked:
        precheck(ledger, [(nm, plan.epsilon) for nm in names], p.delta)
        accounting.book()  # every client's whole spend, before its first update leaves
    empty = [i for i, s in enumerate(fed.sites) if s.n_train == 0]
    share = DiscreteGaussianShare(plan, noise)
    parts = parts_type(fed, hspec, cohort=client_cohort(n, q, t.dropout, noise, empty),
                         stateful=[accounting])  # fmt: skip
    parts.secure = {"clip": clip, "weighted": False, "denominator": q * n, "noise": share,
                    "modulus": plan.modulus, "rounding_bound": plan.rounded_norm,
                    "uniforms": StreamUniforms(noise), "min_senders": plan.min_senders}  # fmt: skip
    parts.privacy = lambda: distributed_privacy(p, plan, accounting, q, n, t.rounds, ledger,
                                                noise, share)  # fmt: skip
    assert math.isfinite(plan.epsilon)
    return parts
