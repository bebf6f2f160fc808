"""Private federated training: DP-SGD at every site (sample level) or DP-FedAvg (client level).

:func:`train_private` is what ``privml run`` calls when ``[privacy] mode`` is ``"sample"`` or
``"client"`` (or when ``[model] features`` is set). It wraps the federation engine
(:mod:`privml.fl.engine`): the same cohort plans, the same server round
(:func:`~privml.fl.engine.aggregate_round`) and server optimizers, the same evaluation; only
the local step (:class:`privml.dp.sgd.DPSGDGradient` with Poisson batches) or the server's
aggregation (clipped, noised DP-FedAvg) changes.

Sample level (``mode = "sample"``): the privacy unit is one record of one site, and each site
has its own guarantee.

* Site ``s`` (``N_s`` training records) samples every record with probability
  ``q_s = min(1, B / N_s)`` at each of its ``steps_s = local_epochs * max(1, round(N_s / B))``
  local steps per round, clips per-sample gradients to ``max_grad_norm`` and adds Gaussian
  noise ``sigma_s * max_grad_norm`` (:mod:`privml.dp.sgd`).
* Before training, the whole schedule is known: which rounds each site trains in
  (:func:`~privml.fl.engine.plan_round` is seeded and data-independent), so site ``s`` runs
  ``T_s`` identical Poisson-subsampled Gaussian steps in total. ``sigma_s`` is calibrated with
  :func:`privml.dp.accounting.calibrate_noise_multiplier` so that its epsilon after all
  ``T_s`` steps is at most ``[privacy] epsilon`` and within 1% of it; ``noise_multiplier``
  fixes it instead.
* The ledger is checked for every site's whole planned spend first; if any site would
  overspend, the run stops before anything is computed and spends nothing
  (:class:`~privml.errors.BudgetExceededError`, exit code 3).
* Each round, every site that trained (including stragglers, whose late update still left the
  site) books the *increment* of its accountant epsilon (``compute_epsilon`` after the round
  minus before) in the ledger, and only then is its update aggregated. delta is booked once,
  with the first charge. The increments add up to exactly the epsilon reported.
* Site sizes are treated as public (they are in results.json, and FedAvg weighs by them).

Client level (``mode = "client"``): DP-FedAvg (McMahan et al. 2018); the privacy unit is a
whole client (every record of a site).

* Each round every client is sampled independently with probability
  ``q = clients_per_round / n_sites`` (Poisson sampling, as the accountant assumes); dropouts
  only remove sampled clients. Sampled clients train locally without noise.
* The server clips every update to L2 norm ``clip``, sums them, adds Gaussian noise
  ``z * clip`` and divides by the expected number of clients ``q * n`` (fixed denominator,
  so one client changes the result by at most ``clip / (q n)``), then applies the server
  optimizer. Accounting: ``R`` Poisson-subsampled Gaussian steps with rate ``q`` and
  multiplier ``z`` (:func:`privml.dp.accounting.dp_fedavg_event`).
* ``adaptive_clip = true``: the clip follows a private quantile of the update norms (Andrew
  et al. 2021): each sampled client also reports ``b = 1[norm <= clip] - 1/2``, the server
  adds ``N(0, sigma_b^2)`` to their sum and updates ``clip *= exp(-clip_lr (b_mean -
  target_quantile))``. The update noise is raised to ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``
  so that the two releases together are exactly one Gaussian mechanism with multiplier ``z``
  (their Theorem 1), and accounting is unchanged. The clip that a round's noise is scaled by
  is the clip that round's updates were clipped with (the update comes after).
* The ledger is checked for every client's whole planned spend, which is then booked for
  every client before the first round (client-level amplification makes every client pay,
  sampled or not; booking per client per round would be ``n * R`` ledger transactions).

Public bounds. With DP on, every column whose bounds or categories were read off the private
data (``derived_from_data``, e.g. an inferred schema) stops the run with a
:class:`~privml.errors.SchemaError` (exit 2) listing them, unless
``[privacy] allow_data_derived_bounds = true``, which warns with
:class:`~privml.errors.PrivacyLeakWarning`.

Features. ``[model] features = "hog"`` trains the model on :class:`~privml.dp.features.HogFeatures`
of the images. The features are centred on their mean: with DP the mean is a private estimate
made of Poisson-sampled noisy sums with exactly the DP-SGD step's rate and noise (one local
epoch of steps per site; for client level one extra sampled round of clients' mean
features), so it is accounted as extra steps of the same event and calibrated with them.

Not private: hyper-parameters tuned on private validation data, and the test metrics that
results.json reports, are not accounted (see docs/privacy_training.md).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.config import Config
from privml.data.federation import FederatedData, SiteData
from privml.dp.accounting import (
    calibrate_noise_multiplier,
    compute_epsilon,
    dp_fedavg_event,
    dpsgd_event,
)
from privml.dp.advice import client_level_warning
from privml.dp.features import HogFeatures, make_feature_map
from privml.dp.ledger import PrivacyLedger
from privml.dp.randomness import NoiseSource, NoiseStream, run_noise_source
from privml.dp.sgd import DPSGDGradient, poisson_batches, sampling_plan
from privml.errors import (
    BudgetExceededError,
    ConfigError,
    PrivacyLeakWarning,
    SchemaError,
    UsageError,
)
from privml.fl.engine import (
    DEFAULT_PROX_MU,
    RoundRecord,
    ServerPlan,
    TrainingResult,
    aggregate_round,
    cohort_size,
    init_params,
    init_server_state,
    local_updates,
    per_site_metrics,
    plan_round,
    simulate,
)
from privml.fl.metrics import evaluate, round_metrics
from privml.fl.server_opt import server_step
from privml.models.nets import ModelSpec, build_model
from privml.models.training import CohortData, MeanGradient, train_cohort

__all__ = [
    "CALIBRATION_TOLERANCE",
    "ClientLevelPlan",
    "PrivateRun",
    "SampleLevelPlan",
    "SitePlan",
    "DPFedAvgRound",
    "check_dp_schema",
    "dp_fedavg_aggregate",
    "dp_local_updates",
    "plan_client_level",
    "plan_sample_level",
    "train_private",
]

#: Relative slack of the noise calibration: the epsilon reached is in [(1 - tol) target, target].
CALIBRATION_TOLERANCE = 0.01

#: What a private run releases without DP (results.json ``privacy.not_accounted``).
NOT_ACCOUNTED = (
    "test metrics: the metrics, rounds and per-site metrics of results.json, computed on the "
    "sites' held-out records without DP",
    "site sizes: n_train and n_test of each site are exact (the epsilon is for replace-one "
    "neighbours, which they do not distinguish)",
    "hyper-parameters: settings chosen on private validation data (e.g. the shipped defaults "
    "tuned on validation splits) are not covered",
)


# ----------------------------------------------------------------------------- checks


def check_dp_schema(config: Config, fed: FederatedData) -> list[str]:
    """Refuses DP training on bounds or categories read off the private data.

    Returns the columns accepted under ``allow_data_derived_bounds`` (after warning), else [].

    Raises:
        SchemaError: listing every column whose schema is derived from the data.
    """
    schema = fed.encoder.schema
    derived = sorted(
        set(fed.inferred_columns) | {c for c, s in schema.items() if s.derived_from_data}
    )
    if not derived:
        return []
    declared = set(config.data.schema or {})
    marked = [c for c in derived if c in declared]
    inferred = [c for c in derived if c not in declared]
    what = []
    if inferred:
        what.append(
            f"columns {inferred} are not declared in [data.schema]: their bounds and categories "
            "were read off the private data at load time. Declare them (e.g. "
            f'[data.schema.{inferred[0]}] type = "numeric", min = ..., max = ..., from public '
            "knowledge; `privml schema infer` writes a draft)"
        )
    if marked:
        what.append(
            f"columns {marked} are declared with derived_from_data = true (a `privml schema "
            "infer` draft). Replace their bounds, categories and impute values with public "
            f"ones, then set derived_from_data = false in [data.schema.{marked[0]}] and the "
            "others"
        )
    msg = (
        f"DP training (privacy.mode = {config.privacy.mode!r}) needs public bounds, but "
        + "; ".join(what)
        + ". To accept the leak instead, set privacy.allow_data_derived_bounds = true "
        "(--set privacy.allow_data_derived_bounds=true)."
    )
    if not config.privacy.allow_data_derived_bounds:
        raise SchemaError(msg)
    warnings.warn(
        f"allow_data_derived_bounds = true: DP training uses bounds/categories of {derived} "
        "read off the private data; the epsilon reported does not cover what they reveal.",
        PrivacyLeakWarning,
        stacklevel=3,
    )
    return derived


def _check_training(config: Config) -> None:
    t, p = config.training, config.privacy
    problems: list[str] = []
    if config.attack is not None:
        problems.append(
            "[attack] simulations are not supported together with DP training; remove [attack] "
            'or set [privacy] mode = "none"'
        )
    if t.engine != "simulation":
        problems.append(
            'DP training runs in the simulation engine (training.engine = "simulation"); the '
            "Flower adapter does not carry it yet"
        )
    if p.accountant == "rdp":
        problems.append(
            'accountant = "rdp" cannot account private training: the published site sizes make '
            "replace-one the neighbouring relation, which dp-accounting's RDP accountant does "
            'not support for Poisson sampling; use accountant = "pld" (the default)'
        )
    if p.mode == "sample" and t.aggregator == "fltrust":
        problems.append(
            "training.aggregator = 'fltrust' trains the server on records carved from a site "
            "without DP; choose another aggregator with sample-level DP"
        )
    if p.mode == "client":
        if t.aggregator != "fedavg":
            problems.append(
                f"client-level DP (DP-FedAvg) averages clipped updates; training.aggregator = "
                f"{t.aggregator!r} has another sensitivity. Use aggregator = 'fedavg'"
            )
        if t.max_update_norm is not None:
            problems.append(
                "training.max_update_norm rejects updates by norm, which client-level DP "
                "replaces by clipping to [privacy] clip; remove max_update_norm"
            )
    if problems:
        raise ConfigError(problems)


# ----------------------------------------------------------------------------- accounting


#: The neighbouring relation private training is accounted under. results.json publishes
#: every site's exact size (and q, the steps and the noise derive from it), and the list of
#: sites: add/remove neighbours are told apart by those numbers alone, so the guarantee that
#: holds is replace-one (a record, or a client's records, replaced by others), which
#: dp-accounting's PLD accountant computes for Poisson-subsampled Gaussians.
RELATION = "replace"
RELATION_NAME = "replace_one"
RELATION_REASON = (
    "results.json publishes each site's size and the list of sites, so neighbouring datasets "
    "that add or remove a record (or a client) are told apart by those numbers: the epsilon "
    "reported is for replacing one record (or one client's records) by another"
)


@lru_cache(maxsize=4096)
def _epsilon(
    delta: float,
    accountant: str,
    q: float,
    sigma: float,
    steps: int,
    vdi: float | None,
    relation: str = RELATION,
) -> float:
    """``compute_epsilon`` of ``steps`` Poisson-subsampled Gaussian steps (pure; memoised)."""
    return compute_epsilon(
        delta=delta,
        sampling_rate=q,
        noise_multiplier=sigma,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
        neighboring_relation=relation,  # type: ignore[arg-type]
        value_discretization_interval=vdi,
    )


@lru_cache(maxsize=1024)
def _sigma(
    delta: float, accountant: str, target: float, q: float, steps: int, relation: str = RELATION
) -> float:
    """``calibrate_noise_multiplier`` (pure; memoised: sweeps and seeds reuse calibrations)."""
    return calibrate_noise_multiplier(
        target_epsilon=target,
        delta=delta,
        sampling_rate=q,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
        tolerance=CALIBRATION_TOLERANCE,
        neighboring_relation=relation,  # type: ignore[arg-type]
    )


class _EpsilonCache:
    """The run's accountant: epsilon and calibration of identical Poisson-Gaussian steps,
    under the replace-one relation (:data:`RELATION`)."""

    def __init__(self, *, delta: float, accountant: str) -> None:
        self.delta = delta
        self.accountant = accountant

    def epsilon(self, q: float, sigma: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        return _epsilon(self.delta, self.accountant, q, sigma, steps, None)

    def running(self, q: float, sigma: float, steps: int, final_steps: int) -> float:
        """An upper bound of the epsilon after ``steps`` of the run's ``final_steps``.

        The last step gives exactly :meth:`epsilon`; earlier ones use one coarse PLD pass
        (``value_discretization_interval = 1e-2``, pessimistic hence an upper bound, several
        times faster) capped at the final epsilon (>= the true running epsilon by
        monotonicity). RDP is used exactly.
        """
        if steps >= final_steps or self.accountant != "pld":
            return self.epsilon(q, sigma, min(steps, final_steps))
        final = self.epsilon(q, sigma, final_steps)
        return min(_epsilon(self.delta, "pld", q, sigma, steps, 1e-2), final)

    def calibrate(self, target: float, q: float, steps: int) -> float:
        return _sigma(self.delta, self.accountant, target, q, steps)


@dataclass(frozen=True)
class SitePlan:
    """One site's planned DP-SGD: its steps, noise and total epsilon (per record).

    ``center_steps`` are the Poisson-sampled noisy-sum steps of the private feature mean
    (same rate and noise as DP-SGD steps; 0 without features). ``rounds`` counts the rounds
    in which the site trains. ``epsilon`` is the accountant's epsilon after
    ``total_steps`` steps.
    """

    name: str
    index: int
    n_train: int
    sampling_rate: float
    steps_per_round: int
    rounds: int
    center_steps: int
    noise_multiplier: float
    epsilon: float

    @property
    def total_steps(self) -> int:
        return self.center_steps + self.rounds * self.steps_per_round

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "steps": self.total_steps,
            "steps_per_round": self.steps_per_round,
            "rounds": self.rounds,
            "centering_steps": self.center_steps,
            "n_train": self.n_train,
        }


@dataclass(frozen=True)
class SampleLevelPlan:
    """The whole sample-level schedule, known before training starts.

    ``charged[r - 1]`` lists the site indices that train (or straggle) in round ``r``.
    """

    sites: list[SitePlan]
    charged: list[np.ndarray]
    delta: float
    accountant: str
    max_grad_norm: float
    target_epsilon: float | None


def plan_sample_level(
    config: Config, fed: FederatedData, *, center: bool, cache: _EpsilonCache | None = None
) -> SampleLevelPlan:
    """Plans every site's sampling rate, steps and noise so its epsilon meets the target.

    Raises:
        ConfigError: a given ``noise_multiplier`` that overshoots the target epsilon.
    """
    t, p = config.training, config.privacy
    cache = cache or _EpsilonCache(delta=p.delta, accountant=p.accountant)
    n_sites = len(fed.sites)
    charged: list[np.ndarray] = []
    rounds = np.zeros(n_sites, dtype=np.int64)
    sizes = np.array([s.n_train for s in fed.sites])
    for rnd in range(1, t.rounds + 1):
        rp = plan_round(n_sites, t, rnd)
        ids = np.setdiff1d(rp.sampled, rp.dropped, assume_unique=True)
        ids = ids[sizes[ids] > 0]
        charged.append(ids)
        rounds[ids] += 1
    plans: list[SitePlan] = []
    problems: list[str] = []
    for i, s in enumerate(fed.sites):
        if s.n_train == 0:
            plans.append(SitePlan(s.name, i, 0, 0.0, 0, 0, 0, 0.0, 0.0))
            continue
        q, steps = sampling_plan(s.n_train, batch_size=t.batch_size, epochs=t.local_epochs)
        c_steps = sampling_plan(s.n_train, batch_size=t.batch_size, epochs=1)[1] if center else 0
        total = c_steps + int(rounds[i]) * steps
        if total == 0:
            plans.append(SitePlan(s.name, i, s.n_train, q, steps, 0, 0, 0.0, 0.0))
            continue
        if p.noise_multiplier is not None:
            sigma = float(p.noise_multiplier)
        else:
            assert p.epsilon is not None
            sigma = cache.calibrate(p.epsilon, q, total)
        eps = cache.epsilon(q, sigma, total)
        if p.epsilon is not None and eps > p.epsilon * (1 + 1e-9):
            problems.append(
                f"site {s.name!r}: noise_multiplier = {sigma:g} gives epsilon {eps:.4g} over "
                f"{total} steps, above the target epsilon = {p.epsilon:g}; raise "
                "noise_multiplier, or remove it to calibrate the noise to the target"
            )
        plans.append(SitePlan(s.name, i, s.n_train, q, steps, int(rounds[i]), c_steps, sigma, eps))
    if problems:
        raise ConfigError(problems)
    return SampleLevelPlan(plans, charged, p.delta, p.accountant, p.max_grad_norm, p.epsilon)


@dataclass(frozen=True)
class ClientLevelPlan:
    """DP-FedAvg's schedule: client sampling rate, rounds, noise and the resulting epsilon.

    ``noise_multiplier`` (z) is what the accountant sees; ``update_noise_multiplier`` is the
    noise actually added to the clipped sum (z itself with fixed clipping, larger with
    adaptive clipping, see the module docstring); ``count_stddev`` is sigma_b.
    """

    n_clients: int
    sampling_rate: float
    rounds: int
    center_rounds: int
    noise_multiplier: float
    update_noise_multiplier: float
    count_stddev: float | None
    epsilon: float
    delta: float
    accountant: str

    @property
    def steps(self) -> int:
        return self.rounds + self.center_rounds


def plan_client_level(
    config: Config, fed: FederatedData, *, center: bool, cache: _EpsilonCache | None = None
) -> ClientLevelPlan:
    """Plans DP-FedAvg: ``q = clients_per_round / n``, the noise multiplier and epsilon.

    Raises:
        ConfigError: a noise multiplier that overshoots the target, or adaptive clipping whose
            count noise is too small for the noise multiplier.
    """
    t, p = config.training, config.privacy
    cache = cache or _EpsilonCache(delta=p.delta, accountant=p.accountant)
    n = len(fed.sites)
    q = cohort_size(n, t) / n
    center_rounds = 1 if center else 0
    steps = t.rounds + center_rounds
    if p.noise_multiplier is not None:
        z = float(p.noise_multiplier)
    else:
        assert p.epsilon is not None
        z = cache.calibrate(p.epsilon, q, steps)
    eps = cache.epsilon(q, z, steps)
    problems = []
    if p.epsilon is not None and eps > p.epsilon * (1 + 1e-9):
        problems.append(
            f"noise_multiplier = {z:g} gives client-level epsilon {eps:.4g} over {steps} rounds, "
            f"above the target epsilon = {p.epsilon:g}; raise it or remove it to calibrate"
        )
    z_update, sigma_b = z, None
    if p.adaptive_clip:
        sigma_b = p.clipped_count_stddev if p.clipped_count_stddev is not None else q * n / 20
        if z >= 2 * sigma_b:
            problems.append(
                f"adaptive clipping: the noise multiplier {z:.4g} must be below 2 * "
                f"clipped_count_stddev = {2 * sigma_b:.4g}; raise clipped_count_stddev (default "
                "expected clients per round / 20) or clients_per_round"
            )
        else:
            z_update = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    if problems:
        raise ConfigError(problems)
    return ClientLevelPlan(
        n, q, t.rounds, center_rounds, z, z_update, sigma_b, eps, p.delta, p.accountant
    )


# ----------------------------------------------------------------------------- ledger


def _ledger(config: Config, fed: FederatedData) -> PrivacyLedger:
    from privml.dp.cli import ledger_from_config

    return ledger_from_config(config, fingerprints=fed.fingerprints or None)


def _precheck(ledger: PrivacyLedger, spends: Sequence[tuple[str, float]], delta: float) -> None:
    """Checks every site's whole planned spend; raises one error listing all refusals."""
    refused = []
    for site, eps in spends:
        try:
            ledger.check(site=site, epsilon=eps, delta=delta)
        except BudgetExceededError as exc:
            refused.append(str(exc))
    if refused:
        head = (
            f"the run would overspend the privacy budget of {len(refused)} site(s); it was "
            "stopped before training and spent nothing"
        )
        raise BudgetExceededError(head + ":\n  - " + "\n  - ".join(refused))


@dataclass
class _Booking:
    """What a site has booked so far in this run."""

    steps: int = 0
    epsilon: float = 0.0
    delta_booked: bool = False
    charges: int = 0
    by_round: list[list[float]] = field(default_factory=list)  # [round, cumulative epsilon]


class _SampleBooker:
    """Books sample-level spends per site: the accountant epsilon's increments."""

    def __init__(
        self,
        ledger: PrivacyLedger,
        plan: SampleLevelPlan,
        cache: _EpsilonCache,
        run_id: str,
    ) -> None:
        self.ledger, self.plan, self.cache, self.run_id = ledger, plan, cache, run_id
        self.books = [_Booking() for _ in plan.sites]

    def charge(self, index: int, steps: int, label: str, rnd: int) -> None:
        sp = self.plan.sites[index]
        b = self.books[index]
        total_steps = b.steps + steps
        eps_now = self.cache.running(
            sp.sampling_rate, sp.noise_multiplier, total_steps, sp.total_steps
        )
        increment = max(0.0, eps_now - b.epsilon)
        delta = 0.0 if b.delta_booked else self.plan.delta
        self.ledger.charge(
            site=sp.name,
            epsilon=increment,
            delta=delta,
            label=label,
            event=dpsgd_event(
                sampling_rate=sp.sampling_rate, noise_multiplier=sp.noise_multiplier, steps=steps
            ),
            metadata={
                "run": self.run_id,
                "mode": "sample",
                "round": rnd,
                "accountant": self.plan.accountant,
                "neighboring_relation": RELATION_NAME,
                "delta": self.plan.delta,
                "noise_multiplier": sp.noise_multiplier,
                "sampling_rate": sp.sampling_rate,
                "steps": steps,
                "cumulative_steps": total_steps,
                "cumulative_epsilon": max(b.epsilon, eps_now),
                "max_grad_norm": self.plan.max_grad_norm,
            },
        )
        b.steps = total_steps
        b.epsilon = max(b.epsilon, eps_now)
        b.by_round.append([rnd, b.epsilon])
        b.delta_booked = True
        b.charges += 1


# ----------------------------------------------------------------------------- site side


def dp_local_updates(
    model: nn.Module,
    spec: ModelSpec,
    params: torch.Tensor,
    sites: Sequence[SiteData],
    *,
    training: Any,
    rnd: int,
    site_ids: np.ndarray,
    noise_multipliers: Sequence[float],
    max_grad_norm: float,
    binary: bool,
    prox_mu: float = 0.0,
    noise: NoiseSource | None = None,
) -> np.ndarray:
    """DP-SGD local training of ``sites`` from ``params``; returns updates ``[S, P]`` (float64).

    The site-side counterpart of :func:`privml.fl.engine.local_updates`: site
    ``site_ids[s]`` draws its Poisson batches from ``noise.stream("dpsgd-sampling", rnd,
    site)`` and its Gaussian noise from ``noise.stream("dpsgd-noise", rnd, site)``
    (:mod:`privml.dp.randomness`), so its update does not depend on the other sites of the
    cohort and nobody can regenerate it. ``noise`` defaults to a fresh secure source (a site
    running alone makes its own).
    """
    source = noise if noise is not None else NoiseSource.fresh()
    data = CohortData.from_arrays([s.X_train for s in sites], [s.y_train for s in sites])
    rngs = [source.stream("dpsgd-sampling", rnd, int(i)) for i in site_ids]
    pb = poisson_batches(
        data.sizes, batch_size=training.batch_size, epochs=training.local_epochs, rngs=rngs
    )
    rule = DPSGDGradient(
        model,
        spec,
        binary=binary,
        max_grad_norm=max_grad_norm,
        noise_multipliers=noise_multipliers,
        expected_batch=pb.expected_batch,
        steps=pb.steps,
        generators=[source.stream("dpsgd-noise", rnd, int(i)) for i in site_ids],
    )
    new = train_cohort(
        params,
        data,
        rule=rule,
        lr=training.lr,
        batch_size=training.batch_size,
        epochs=training.local_epochs,
        rngs=(),  # unused: the Poisson batches are given
        prox_mu=prox_mu,
        batches=(pb.idx, pb.mask),
    )
    return (new - params.reshape(1, -1)).numpy().astype(np.float64)


#: Per-record L2 clip of the private input mean of encoded (not feature-mapped) records.
CENTER_CLIP = 1.0


def _private_mean(
    H: np.ndarray, *, q: float, steps: int, sigma: float, clip: float, stream: NoiseStream
) -> np.ndarray:
    """Private mean of the rows of ``H``: the average of ``steps`` Poisson-sampled noisy sums.

    Each step sums the sampled rows, each scaled to L2 norm <= ``clip``, adds
    ``N(0, (sigma clip)^2 I)`` and divides by the expected count ``q N``: a Poisson-subsampled
    Gaussian mechanism with sensitivity ``clip`` and noise multiplier ``sigma``, the same event
    as one DP-SGD step. Sampling and noise come from ``stream`` (the site's own).
    """
    n, d = H.shape
    Ht = torch.from_numpy(H.astype(np.float64))
    norms = Ht.norm(dim=1, keepdim=True)
    Ht = Ht * torch.clamp(clip / torch.clamp(norms, min=1e-12), max=1.0)
    acc = torch.zeros(d, dtype=torch.float64)
    for _ in range(steps):
        take = torch.from_numpy(stream.random(n) < q)
        noise = stream.normal(d, dtype=torch.float64) * (sigma * clip)
        acc += (Ht[take].sum(0) + noise) / (q * n)
    return (acc / steps).numpy()


def _linear_first(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and isinstance(model[0], nn.Linear)


def _shifted(fed: FederatedData, center: np.ndarray) -> FederatedData:
    c = center.astype(np.float32)
    sites = [
        SiteData(s.name, s.X_train - c, s.y_train, s.X_test - c, s.y_test) for s in fed.sites
    ]
    return replace(fed, sites=sites)


def _fold_shift(model: nn.Module, params: torch.Tensor, center: np.ndarray) -> torch.Tensor:
    """Parameters of the same model acting on unshifted inputs: ``b' = b - W c``.

    Exact for a first ``Linear`` layer (``W (x - c) + b = W x + (b - W c)``).
    """
    first = model[0]  # type: ignore[index]
    assert isinstance(first, nn.Linear)
    n_w = first.in_features * first.out_features
    W = params[:n_w].reshape(first.out_features, first.in_features).double()
    out = params.clone()
    b = out[n_w : n_w + first.out_features].double()
    out[n_w : n_w + first.out_features] = (b - W @ torch.from_numpy(center)).float()
    return out


# ----------------------------------------------------------------------------- features


def _feature_map(config: Config) -> HogFeatures | None:
    m = config.model
    if m.features == "none":
        return None
    return make_feature_map(m.features, m.image_shape)


def _with_features(fed: FederatedData, fmap: HogFeatures) -> FederatedData:
    sites = [
        SiteData(s.name, fmap.transform(s.X_train), s.y_train, fmap.transform(s.X_test), s.y_test)
        for s in fed.sites
    ]
    return replace(fed, sites=sites)


def _head_spec(spec: ModelSpec, fmap: HogFeatures | None) -> ModelSpec:
    if fmap is None:
        return spec
    if spec.n_features != fmap.n_inputs:
        raise ConfigError(
            f"[model] image_shape {list(fmap.image_shape)} has {fmap.n_inputs} pixels but the "
            f"data has {spec.n_features} encoded features"
        )
    return replace(spec, n_features=fmap.n_features, image_shape=None)


def _composite(head: nn.Module, fmap: HogFeatures | None) -> nn.Module:
    if fmap is None:
        return head
    return nn.Sequential(fmap, *head.children())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- results


@dataclass
class PrivateRun:
    """What :func:`train_private` returns: the training result and results.json's ``privacy``.

    ``result.spec`` is the spec of the trained head (its ``n_features`` is the feature map's
    width when ``[model] features`` is set); ``result.model`` is the whole model (feature map
    then head), evaluable on encoded records; ``features`` describes the map (or None).
    """

    result: TrainingResult
    privacy: dict[str, Any]
    features: dict[str, Any] | None = None
    plan: SampleLevelPlan | ClientLevelPlan | None = field(default=None, repr=False)


def _record(
    rnd: int, ev: dict[str, Any], clients: int, rejected: int, t0: float, **extra: Any
) -> RoundRecord:
    return RoundRecord(
        round=rnd,
        loss=ev["loss"],
        accuracy=ev["accuracy"],
        auc=ev["auc"],
        clients=clients,
        rejected=rejected,
        seconds=time.perf_counter() - t0,
        per_site=ev.get("per_site"),
        **extra,
    )


def _run_id(config: Config) -> str:
    return f"{config.name}:{config.config_hash()[:12]}:{datetime.now(UTC).isoformat()}"


# ----------------------------------------------------------------------------- sample level


def _train_sample_level(
    config: Config,
    fed: FederatedData,
    spec: ModelSpec,
    fmap: HogFeatures | None,
    ledger: PrivacyLedger,
    on_round: Callable[[RoundRecord], None] | None,
    noise: NoiseSource,
) -> PrivateRun:
    t, p = config.training, config.privacy
    cache = _EpsilonCache(delta=p.delta, accountant=p.accountant)
    head_spec = _head_spec(spec, fmap)
    center = p.center_inputs and (fmap is not None or _linear_first(build_model(head_spec)))
    plan = plan_sample_level(config, fed, center=center, cache=cache)
    _precheck(ledger, [(sp.name, sp.epsilon) for sp in plan.sites if sp.total_steps], p.delta)
    run_id = _run_id(config)
    booker = _SampleBooker(ledger, plan, cache, run_id)
    raw_fed = fed
    shift: np.ndarray | None = None
    if center:
        width = fmap.n_features if fmap is not None else fed.n_features
        total = np.zeros(width)
        n_total = 0
        for sp, s in zip(plan.sites, fed.sites, strict=True):
            if sp.center_steps == 0:
                continue
            booker.charge(sp.index, sp.center_steps, "dp-sgd input centring", 0)
            est = _private_mean(
                fmap.histogram_array(s.X_train) if fmap is not None else s.X_train,
                q=sp.sampling_rate,
                steps=sp.center_steps,
                sigma=sp.noise_multiplier,
                clip=1.0 if fmap is not None else CENTER_CLIP,
                stream=noise.stream("centre", sp.index),
            )
            total += est * s.n_train
            n_total += s.n_train
        if fmap is not None:
            fmap.set_center(total / max(n_total, 1))
        else:
            shift = total / max(n_total, 1)
            fed = _shifted(fed, shift)
    if fmap is not None:
        fed = _with_features(fed, fmap)

    server = ServerPlan.from_training(t)
    head, params0 = init_params(head_spec, t.seed)
    state = init_server_state(params0, server)
    binary = fed.task.kind == "binary"
    prox_mu = (
        (t.prox_mu if t.prox_mu is not None else DEFAULT_PROX_MU)
        if t.strategy == "fedprox"
        else 0.0
    )
    X_test, y_test = fed.pooled_test()
    site_sizes = [(s.name, s.n_test) for s in fed.sites]
    history: list[RoundRecord] = []
    rejected = 0
    sigmas = np.array([sp.noise_multiplier for sp in plan.sites])
    for rnd in range(1, t.rounds + 1):
        t0 = time.perf_counter()
        rp = plan_round(len(fed.sites), t, rnd)
        ids = np.array([i for i in rp.participants if fed.sites[i].n_train > 0], dtype=np.int64)
        params_t = torch.from_numpy(state.params)
        if len(ids):
            updates = dp_local_updates(
                head,
                head_spec,
                params_t,
                [fed.sites[i] for i in ids],
                training=t,
                rnd=rnd,
                site_ids=ids,
                noise_multipliers=sigmas[ids].tolist(),
                max_grad_norm=p.max_grad_norm,
                binary=binary,
                prox_mu=prox_mu,
                noise=noise,
            )
        else:
            updates = np.zeros((0, state.params.shape[0]))
        # Book every site that trained (stragglers too) before any update is released.
        for i in plan.charged[rnd - 1]:
            booker.charge(int(i), plan.sites[i].steps_per_round, f"dp-sgd round {rnd}", rnd)
        weights = np.array([fed.sites[i].n_train for i in ids], dtype=np.float64)
        outcome = aggregate_round(state, updates, weights, plan=server)
        state = outcome.state
        rejected += outcome.counts["rejected"]
        ev = round_metrics(head, torch.from_numpy(state.params), X_test, y_test, site_sizes)
        rec = _record(
            rnd,
            ev,
            len(ids),
            outcome.counts["rejected"],
            t0,
            sampled=len(rp.sampled),
            dropped=len(rp.dropped),
            stragglers=len(rp.stragglers),
            skipped=outcome.skipped,
        )
        history.append(rec)
        if on_round is not None:
            on_round(rec)

    for sp, b in zip(plan.sites, booker.books, strict=True):
        if b.steps != sp.total_steps or abs(b.epsilon - sp.epsilon) > 1e-9 * max(1.0, sp.epsilon):
            raise AssertionError(f"booked {b} differs from the plan {sp}")  # pragma: no cover
    final = torch.from_numpy(state.params.copy())
    if shift is not None:
        final = _fold_shift(head, final, shift)
        fed = raw_fed
        X_test, y_test = fed.pooled_test()
    metrics = evaluate(head, final, X_test, y_test)
    metrics["per_site"] = per_site_metrics(head, final, fed.sites)
    worst = max(plan.sites, key=lambda sp: sp.epsilon)
    privacy = {
        "mode": "sample",
        "unit": "one record of one site; each site has its own guarantee",
        "relation": RELATION_NAME,
        "relation_reason": RELATION_REASON,
        "accountant": p.accountant,
        "delta": p.delta,
        "epsilon": worst.epsilon,
        "epsilon_target": p.epsilon,
        "epsilon_per_site": {sp.name: sp.epsilon for sp in plan.sites},
        "noise_multiplier": worst.noise_multiplier,
        "sampling_rate": worst.sampling_rate,
        "steps": worst.total_steps,
        "max_grad_norm": p.max_grad_norm,
        "clip": p.max_grad_norm,
        "calibrated": p.noise_multiplier is None,
        "calibration_tolerance": CALIBRATION_TOLERANCE if p.noise_multiplier is None else None,
        "sampling": "Poisson, q = min(1, batch_size / n_train) per site",
        "input_centering": (
            None
            if not center
            else "hog features centred on a private mean"
            if fmap is not None
            else f"inputs centred on a private mean (records clipped to L2 norm {CENTER_CLIP}), "
            "folded into the first layer's bias"
        ),
        "per_site": {sp.name: sp.to_dict() for sp in plan.sites},
        "epsilon_by_round": {
            sp.name: b.by_round for sp, b in zip(plan.sites, booker.books, strict=True)
        },
        "ledger": str(ledger.path),
        "dataset": ledger.dataset,
        "run": run_id,
        "noise": noise.describe(),
        "reproducible_noise": not noise.secure,
        "not_accounted": list(NOT_ACCOUNTED),
    }
    extra = {"federation": {"engine": "simulation", **server.to_dict()}, "privacy": privacy}
    result = TrainingResult(
        head_spec, _composite(head, fmap), final, history, metrics, rejected, extra
    )
    return PrivateRun(result, privacy, fmap.to_dict() if fmap else None, plan)


# ----------------------------------------------------------------------------- client level


@dataclass(frozen=True)
class DPFedAvgRound:
    """One DP-FedAvg aggregation: the noisy mean update and what the clip saw.

    ``unclipped_fraction`` is the private estimate of the fraction of updates with norm
    <= clip (adaptive clipping), None without ``count_stddev``.
    """

    update: np.ndarray
    norms: np.ndarray
    rejected: int
    unclipped_fraction: float | None


def dp_fedavg_aggregate(
    updates: np.ndarray,
    *,
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: NoiseStream | torch.Generator,
    count_stddev: float | None = None,
) -> DPFedAvgRound:
    """The server side of one DP-FedAvg round (McMahan et al. 2018; Andrew et al. 2021).

    Clips every update to L2 norm ``clip`` (a non-finite update counts as rejected and
    contributes 0), sums, adds ``N(0, (noise_multiplier * clip)^2 I)`` and divides by the
    *expected* number of clients, so adding or removing one client moves the result by at
    most ``clip / expected_clients`` before noise. With ``count_stddev`` it also releases
    the private fraction of unclipped updates: ``(sum_i (1[norm_i <= clip] - 1/2) +
    N(0, count_stddev^2)) / expected_clients + 1/2``.

    Args:
        updates: ``[n, P]`` client updates (new - global); ``n`` may be 0.
        clip: L2 clipping norm > 0.
        noise_multiplier: noise std / clip (>= 0).
        expected_clients: q * n_clients > 0, the fixed denominator.
        generator: the server's noise for this round: a
            :class:`~privml.dp.randomness.NoiseStream` (private training), or a seeded
            ``torch.Generator`` for simulations that release nothing.
        count_stddev: sigma_b of the unclipped count, or None (fixed clipping).
    """
    func = "dp_fedavg_aggregate"
    for name, value in (("clip", clip), ("expected_clients", expected_clients)):
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"The '{name}' parameter of {func} must be > 0. Got {value!r}.")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise UsageError(
            f"The 'noise_multiplier' parameter of {func} must be >= 0. Got {noise_multiplier!r}."
        )
    U = np.asarray(updates, dtype=np.float64)
    if U.ndim != 2:
        raise UsageError(f"The 'updates' parameter of {func} must be [n, P]. Got {U.shape}.")
    finite: np.ndarray = np.asarray(np.isfinite(U).all(axis=1))
    U = np.where(finite[:, None], U, 0.0)
    norms = np.linalg.norm(U, axis=1)
    factors = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    total = (U * factors[:, None]).sum(axis=0)
    noise = _normals(generator, U.shape[1]).numpy()
    update = (total + noise_multiplier * clip * noise) / expected_clients
    fraction = None
    if count_stddev is not None:
        below = float((norms[finite] <= clip).sum()) - 0.5 * int(finite.sum())
        z = float(_normals(generator, 1)[0])
        fraction = (below + count_stddev * z) / expected_clients + 0.5
    return DPFedAvgRound(update, norms, int((~finite).sum()), fraction)


def _normals(generator: NoiseStream | torch.Generator, n: int) -> torch.Tensor:
    """``n`` float64 standard normals from a noise stream (or a seeded torch generator)."""
    if isinstance(generator, NoiseStream):
        return generator.normal(n, dtype=torch.float64)
    return torch.randn(n, generator=generator, dtype=torch.float64)


def _train_client_level(
    config: Config,
    fed: FederatedData,
    spec: ModelSpec,
    fmap: HogFeatures | None,
    ledger: PrivacyLedger,
    on_round: Callable[[RoundRecord], None] | None,
    noise: NoiseSource,
) -> PrivateRun:
    t, p = config.training, config.privacy
    cache = _EpsilonCache(delta=p.delta, accountant=p.accountant)
    center = fmap is not None and p.center_inputs
    plan = plan_client_level(config, fed, center=center, cache=cache)
    advice = client_level_warning(
        noise_multiplier=plan.update_noise_multiplier,
        n_params=sum(x.numel() for x in build_model(_head_spec(spec, fmap)).parameters()),
        clients=plan.sampling_rate * plan.n_clients, n_sites=plan.n_clients,
        epsilon=plan.epsilon,
    )  # fmt: skip
    if advice is not None:
        warnings.warn(advice, UserWarning, stacklevel=2)
    names = [s.name for s in fed.sites]
    _precheck(ledger, [(n, plan.epsilon) for n in names], p.delta)
    run_id = _run_id(config)
    event = dp_fedavg_event(
        client_sampling_rate=plan.sampling_rate,
        noise_multiplier=plan.noise_multiplier,
        rounds=plan.steps,
    )
    meta = {
        "run": run_id,
        "mode": "client",
        "accountant": p.accountant,
        "neighboring_relation": RELATION_NAME,
        "delta": p.delta,
        "noise_multiplier": plan.noise_multiplier,
        "sampling_rate": plan.sampling_rate,
        "steps": plan.steps,
        "clip": p.clip,
        "adaptive_clip": p.adaptive_clip,
    }
    for n in names:
        ledger.charge(
            site=n,
            epsilon=plan.epsilon,
            delta=p.delta,
            label="dp-fedavg run (client level)",
            event=event,
            metadata=meta,
        )
    n_clients = plan.n_clients
    q = plan.sampling_rate
    denom = q * n_clients
    head_spec = _head_spec(spec, fmap)

    def sample(rnd: int) -> tuple[np.ndarray, int]:
        rng = noise.stream("clients", rnd)
        chosen = np.flatnonzero(rng.random(n_clients) < q)
        if t.dropout > 0 and len(chosen):
            keep = rng.random(len(chosen)) >= t.dropout
            return chosen[keep], int((~keep).sum())
        return chosen, 0

    if center:
        assert fmap is not None
        # One extra sampled round: each sampled client sends its mean feature vector (norm
        # <= 1), the server adds N(0, z^2) to the sum; accounted as one more DP-FedAvg round.
        chosen, _ = sample(0)
        d = fmap.n_features
        total = torch.zeros(d, dtype=torch.float64)
        for i in chosen:
            s = fed.sites[i]
            if s.n_train:
                total += torch.from_numpy(
                    fmap.histogram_array(s.X_train).mean(0).astype(np.float64)
                )
        total += noise.stream("dp-fedavg", 0).normal(d, dtype=torch.float64) * plan.noise_multiplier
        fmap.set_center((total / denom).numpy())
    if fmap is not None:
        fed = _with_features(fed, fmap)

    server = ServerPlan.from_training(t)
    head, params0 = init_params(head_spec, t.seed)
    state = init_server_state(params0, server)
    params = state.params.astype(np.float64)
    opt_state = state.opt
    rule = MeanGradient(head, head_spec, binary=fed.task.kind == "binary")
    prox_mu = (
        (t.prox_mu if t.prox_mu is not None else DEFAULT_PROX_MU)
        if t.strategy == "fedprox"
        else 0.0
    )
    X_test, y_test = fed.pooled_test()
    site_sizes = [(s.name, s.n_test) for s in fed.sites]
    clip = float(p.clip)
    clips: list[float] = []
    unclipped_fraction: list[float] = []
    history: list[RoundRecord] = []
    rejected_total = 0
    for rnd in range(1, t.rounds + 1):
        t0 = time.perf_counter()
        chosen, dropped = sample(rnd)
        ids = np.array([i for i in chosen if fed.sites[i].n_train > 0], dtype=np.int64)
        if len(ids):
            updates = local_updates(
                head,
                torch.from_numpy(params.astype(np.float32)),
                [fed.sites[i] for i in ids],
                training=t,
                rnd=rnd,
                site_ids=ids,
                rule=rule,
                prox_mu=prox_mu,
            )
        else:
            updates = np.zeros((0, params.shape[0]))
        agg = dp_fedavg_aggregate(
            updates,
            clip=clip,
            noise_multiplier=plan.update_noise_multiplier,
            expected_clients=denom,
            generator=noise.stream("dp-fedavg", rnd),
            count_stddev=plan.count_stddev,
        )
        rejected_total += agg.rejected
        mean_update = agg.update
        clips.append(clip)
        if p.adaptive_clip:
            assert agg.unclipped_fraction is not None
            unclipped_fraction.append(agg.unclipped_fraction)
            clip = clip * math.exp(-p.clip_lr * (agg.unclipped_fraction - p.target_quantile))
        new_params, opt_state = server_step(server.optimizer, opt_state, params, mean_update)
        params = new_params.astype(np.float64)
        ev = round_metrics(
            head, torch.from_numpy(params.astype(np.float32)), X_test, y_test, site_sizes
        )
        rec = _record(
            rnd, ev, len(ids), agg.rejected, t0, sampled=len(chosen) + dropped, dropped=dropped
        )
        history.append(rec)
        if on_round is not None:
            on_round(rec)

    final = torch.from_numpy(params.astype(np.float32))
    metrics = evaluate(head, final, X_test, y_test)
    metrics["per_site"] = per_site_metrics(head, final, fed.sites)
    privacy = {
        "mode": "client",
        "unit": "one client (all records of a site)",
        "relation": RELATION_NAME,
        "relation_reason": RELATION_REASON,
        "accountant": p.accountant,
        "delta": p.delta,
        "epsilon": plan.epsilon,
        "epsilon_target": p.epsilon,
        "epsilon_per_site": dict.fromkeys(names, plan.epsilon),
        "noise_multiplier": plan.noise_multiplier,
        "update_noise_multiplier": plan.update_noise_multiplier,
        "sampling_rate": q,
        "expected_clients_per_round": denom,
        "steps": plan.steps,
        "rounds": plan.rounds,
        "centering_rounds": plan.center_rounds,
        "clip": p.clip,
        "adaptive_clip": (
            {
                "target_quantile": p.target_quantile,
                "clip_lr": p.clip_lr,
                "clipped_count_stddev": plan.count_stddev,
                "clip_per_round": clips,
                "unclipped_fraction_per_round": unclipped_fraction,
                "final_clip": clip,
            }
            if p.adaptive_clip
            else None
        ),
        "calibrated": p.noise_multiplier is None,
        "calibration_tolerance": CALIBRATION_TOLERANCE if p.noise_multiplier is None else None,
        "sampling": "Poisson client sampling, q = clients_per_round / n_sites",
        "booking": "each client's whole planned spend, booked before the first round",
        "ledger": str(ledger.path),
        "dataset": ledger.dataset,
        "run": run_id,
        "noise": noise.describe(),
        "reproducible_noise": not noise.secure,
        "not_accounted": list(NOT_ACCOUNTED),
    }
    extra = {
        "federation": {"engine": "simulation", **server.to_dict(), "aggregator": "dp-fedavg"},
        "privacy": privacy,
    }
    result = TrainingResult(
        head_spec, _composite(head, fmap), final, history, metrics, rejected_total, extra
    )
    return PrivateRun(result, privacy, fmap.to_dict() if fmap else None, plan)


# ----------------------------------------------------------------------------- entry point


def _train_features_only(
    config: Config,
    fed: FederatedData,
    spec: ModelSpec,
    fmap: HogFeatures,
    on_round: Callable[[RoundRecord], None] | None,
) -> PrivateRun:
    """Non-private training on the feature map, centred on the exact pooled mean."""
    total = np.zeros(fmap.n_features)
    n_total = 0
    for s in fed.sites:
        if s.n_train:
            total += fmap.histogram_array(s.X_train).sum(0)
            n_total += s.n_train
    fmap.set_center(total / max(n_total, 1))
    head_spec = _head_spec(spec, fmap)
    result = simulate(
        _with_features(fed, fmap),
        head_spec,
        config.training,
        on_round=on_round,
        attack=config.attack,
    )
    result.model = _composite(result.model, fmap)
    return PrivateRun(result, {"mode": "none"}, fmap.to_dict(), None)


def train_private(
    config: Config,
    fed: FederatedData,
    spec: ModelSpec,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    ledger: PrivacyLedger | None = None,
) -> PrivateRun:
    """Trains as ``[privacy]`` and ``[model] features`` say, booking every spend.

    Args:
        config: the run's config (``privacy.mode`` ``"sample"``, ``"client"``, or ``"none"``
            with ``model.features`` set).
        fed: the encoded sites (:func:`privml.data.load_federation`).
        spec: the model for the encoded features (:func:`privml.pipeline.model_spec`).
        on_round: called after each round.
        ledger: the ledger to book in; default ``[privacy] ledger`` (or the user's ledger,
            :func:`privml.dp.ledger.default_ledger_path`) with the config's budget, each site
            keyed by the fingerprint of its records (``fed.fingerprints``).

    Returns:
        :class:`PrivateRun`; ``privacy`` is results.json's ``privacy`` section.

    Raises:
        SchemaError: DP on with bounds/categories derived from the data (exit 2).
        ConfigError: settings DP training does not support (exit 2).
        BudgetExceededError: the planned spend does not fit a site's remaining budget; raised
            before any training, nothing spent (exit 3).
    """
    mode = config.privacy.mode
    fmap = _feature_map(config)
    if mode == "none":
        if fmap is None:
            raise ConfigError(
                "train_private needs [privacy] mode = 'sample' or 'client', or [model] features"
            )
        return _train_features_only(config, fed, spec, fmap, on_round)
    check_dp_schema(config, fed)
    _check_training(config)
    led = ledger if ledger is not None else _ledger(config, fed)
    noise = run_noise_source(config.training.seed)
    if mode == "sample":
        return _train_sample_level(config, fed, spec, fmap, led, on_round, noise)
    return _train_client_level(config, fed, spec, fmap, led, on_round, noise)
