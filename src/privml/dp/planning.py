"""Planning and booking private training: how much noise each site adds and what it costs.

This is the accountant's side of private federated training, independent of how the rounds
run (the round engine's stages call it: :mod:`privml.fl.stages.private`):

* :func:`plan_sample_level` (DP-SGD at every site): from the schedule of the rounds each site
  trains in, every site's Poisson sampling rate, steps, and the noise multiplier that gives
  its epsilon target after all of them (calibrated with dp-accounting, within
  :data:`CALIBRATION_TOLERANCE`); :class:`SampleBooker` books, round by round, the increment
  of a site's epsilon in its ledger before its update is released;
* :func:`plan_client_level` (DP-FedAvg): the noise multiplier of the clipped sum for the
  Poisson client sampling rate and the rounds, and adaptive clipping's split of it;
* :func:`precheck`: every site's whole planned spend against its remaining budget, before
  anything is computed;
* the DP building blocks the stages use: :func:`private_mean` (a site's private input mean,
  the same event as DP-SGD steps) and DP-FedAvg's clipped sum and noise
  (:func:`clipped_sum`, :func:`noised_mean`, :func:`dp_fedavg_aggregate`).

Accounting is for the replace-one relation (:data:`RELATION_NAME`: results.json publishes the
site sizes) with dp-accounting's PLD accountant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from privml.dp.accounting import calibrate_noise_multiplier, compute_epsilon, dpsgd_event
from privml.dp.ledger import PrivacyLedger
from privml.dp.randomness import NoiseStream
from privml.dp.sgd import sampling_plan
from privml.errors import (
    BudgetExceededError,
    ConfigError,
    PrivacyLeakWarning,
    SchemaError,
    UsageError,
)

if TYPE_CHECKING:
    from privml.config import Config
    from privml.data.federation import FederatedData

__all__ = [
    "CALIBRATION_TOLERANCE",
    "CENTER_CLIP",
    "NOT_ACCOUNTED",
    "RELATION",
    "RELATION_NAME",
    "RELATION_REASON",
    "ClientLevelPlan",
    "DPFedAvgRound",
    "EpsilonCache",
    "SampleBooker",
    "SampleLevelPlan",
    "SiteBook",
    "SitePlan",
    "check_dp_schema",
    "clipped_sum",
    "dp_fedavg_aggregate",
    "noised_mean",
    "plan_client_level",
    "plan_sample_level",
    "precheck",
    "private_mean",
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


class EpsilonCache:
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

        The last step (and any step beyond it) gives exactly :meth:`epsilon`; earlier ones use one
        coarse PLD pass (``value_discretization_interval = 1e-2``, pessimistic hence an upper bound,
        several times faster) capped at the final epsilon (>= the true running epsilon by
        monotonicity). RDP is used exactly.
        """
        if steps >= final_steps or self.accountant != "pld":
            return self.epsilon(q, sigma, steps)  # beyond the plan (a round done again): exact
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
    names: Sequence[str],
    sizes: Sequence[int],
    schedule: Sequence[np.ndarray],
    *,
    privacy: Any,
    batch_size: int,
    local_epochs: int,
    center: bool,
    cache: EpsilonCache | None = None,
) -> SampleLevelPlan:
    """Plans every site's sampling rate, steps and noise so its epsilon meets the target.

    Args:
        names, sizes: each site's name and number of training records.
        schedule: per round, the indices of the sites that train in it (known before
            training: the cohort sampler is seeded and data-independent).
        privacy: ``[privacy]`` (epsilon or noise_multiplier, delta, accountant, clip).
        batch_size, local_epochs: the local training that sets each site's steps.
        center: whether each site also spends one local epoch of steps on the private mean of
            its inputs.

    Raises:
        ConfigError: a given ``noise_multiplier`` that overshoots the target epsilon.
    """
    p = privacy
    cache = cache or EpsilonCache(delta=p.delta, accountant=p.accountant)
    sizes_a = np.asarray(sizes, dtype=np.int64)
    charged = [ids[sizes_a[ids] > 0] for ids in schedule]
    rounds = np.zeros(len(sizes_a), dtype=np.int64)
    for ids in charged:
        rounds[ids] += 1
    plans: list[SitePlan] = []
    problems: list[str] = []
    for i, (name, n_train) in enumerate(zip(names, sizes_a.tolist(), strict=True)):
        if n_train == 0:
            plans.append(SitePlan(name, i, 0, 0.0, 0, 0, 0, 0.0, 0.0))
            continue
        q, steps = sampling_plan(n_train, batch_size=batch_size, epochs=local_epochs)
        c_steps = sampling_plan(n_train, batch_size=batch_size, epochs=1)[1] if center else 0
        total = c_steps + int(rounds[i]) * steps
        if total == 0:
            plans.append(SitePlan(name, i, n_train, q, steps, 0, 0, 0.0, 0.0))
            continue
        if p.noise_multiplier is not None:
            sigma = float(p.noise_multiplier)
        else:
            assert p.epsilon is not None
            sigma = cache.calibrate(p.epsilon, q, total)
        eps = cache.epsilon(q, sigma, total)
        if p.epsilon is not None and eps > p.epsilon * (1 + 1e-9):
            problems.append(
                f"site {name!r}: noise_multiplier = {sigma:g} gives epsilon {eps:.4g} over "
                f"{total} steps, above the target epsilon = {p.epsilon:g}; raise "
                "noise_multiplier, or remove it to calibrate the noise to the target"
            )
        plans.append(SitePlan(name, i, n_train, q, steps, int(rounds[i]), c_steps, sigma, eps))
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
    n_clients: int,
    sampling_rate: float,
    rounds: int,
    *,
    privacy: Any,
    center: bool,
    cache: EpsilonCache | None = None,
) -> ClientLevelPlan:
    """Plans DP-FedAvg: the noise multiplier of ``rounds`` (plus one centring round with
    ``center``) Poisson-sampled rounds at client rate ``sampling_rate``, and the epsilon.

    Raises:
        ConfigError: a noise multiplier that overshoots the target, or adaptive clipping whose
            count noise is too small for the noise multiplier.
    """
    p = privacy
    cache = cache or EpsilonCache(delta=p.delta, accountant=p.accountant)
    n, q = n_clients, sampling_rate
    center_rounds = 1 if center else 0
    steps = rounds + center_rounds
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
        n, q, rounds, center_rounds, z, z_update, sigma_b, eps, p.delta, p.accountant
    )


# ----------------------------------------------------------------------------- booking


def precheck(ledger: PrivacyLedger, spends: Sequence[tuple[str, float]], delta: float) -> None:
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
class SiteBook:
    """What a site has booked so far in this run."""

    steps: int = 0
    epsilon: float = 0.0
    delta_booked: bool = False
    charges: int = 0
    by_round: list[list[float]] = field(default_factory=list)  # [round, cumulative epsilon]


class SampleBooker:
    """Books sample-level spends per site: the accountant epsilon's increments."""

    def __init__(
        self,
        ledger: PrivacyLedger,
        plan: SampleLevelPlan,
        cache: EpsilonCache,
        run_id: str,
    ) -> None:
        self.ledger, self.plan, self.cache, self.run_id = ledger, plan, cache, run_id
        self.books = [SiteBook() for _ in plan.sites]

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

    def state_dict(self) -> dict[str, Any]:
        """What each site has booked (JSON data, for the checkpoint)."""
        return {"run": self.run_id, "books": [dict(b.__dict__) for b in self.books]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a resumed run's booking: the same run id and what it booked up to its
        checkpoint, plus what the ledger shows it booked after it (:meth:`reconcile`)."""
        self.run_id = str(state["run"])
        self.books = [SiteBook(**b) for b in state["books"]]
        self.reconcile(int(max((r for b in self.books for r, _ in b.by_round), default=0)))

    def reconcile(self, after_round: int) -> None:
        """Count the steps this run booked after round ``after_round`` (a run killed after
        booking a round and before its checkpoint): those rounds are computed again, and the
        second release composes with the first, so their steps stay in the account."""
        for sp, b in zip(self.plan.sites, self.books, strict=True):
            extra = [
                r for r in self.ledger.history(sp.name)
                if r.metadata.get("run") == self.run_id and r.metadata.get("mode") == "sample"
                and int(r.metadata.get("round", -1)) > after_round
            ]  # fmt: skip
            for r in extra:
                b.steps += int(r.metadata.get("steps", 0))
                b.epsilon = max(b.epsilon, float(r.metadata.get("cumulative_epsilon", 0.0)))
                b.by_round.append([int(r.metadata["round"]), b.epsilon])
                b.delta_booked = True
                b.charges += 1


# ----------------------------------------------------------------------------- building blocks


CENTER_CLIP = 1.0


def private_mean(
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


def _check_fedavg(clip: float, noise_multiplier: float, expected_clients: float) -> None:
    func = "dp_fedavg_aggregate"
    for name, value in (("clip", clip), ("expected_clients", expected_clients)):
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"The '{name}' parameter of {func} must be > 0. Got {value!r}.")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise UsageError(
            f"The 'noise_multiplier' parameter of {func} must be >= 0. Got {noise_multiplier!r}."
        )


def clipped_sum(updates: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DP-FedAvg's sum of updates each clipped to L2 norm ``clip`` (a non-finite update
    contributes 0). Returns ``(sum, norms, finite)``."""
    U = np.asarray(updates, dtype=np.float64)
    if U.ndim != 2:
        raise UsageError(
            f"The 'updates' parameter of dp_fedavg_aggregate must be [n, P]. Got {U.shape}."
        )
    finite: np.ndarray = np.asarray(np.isfinite(U).all(axis=1))
    U = np.where(finite[:, None], U, 0.0)
    norms = np.linalg.norm(U, axis=1)
    factors = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return (U * factors[:, None]).sum(axis=0), norms, finite


def noised_mean(
    total: np.ndarray, *, clip: float, noise_multiplier: float, expected_clients: float,
    generator: NoiseStream | torch.Generator, below: float | None = None,
    count_stddev: float | None = None,
) -> tuple[np.ndarray, float | None]:  # fmt: skip
    """``(total + N(0, (noise_multiplier clip)^2 I)) / expected_clients``, and with
    ``count_stddev`` the private fraction of unclipped updates from ``below`` (the sum of
    ``1[norm_i <= clip] - 1/2``): ``(below + N(0, count_stddev^2)) / expected_clients + 1/2``.
    The update's noise is drawn first, then the count's, from ``generator``."""
    noise = _normals(generator, total.shape[0]).numpy()
    update = (total + noise_multiplier * clip * noise) / expected_clients
    fraction = None
    if count_stddev is not None:
        z = float(_normals(generator, 1)[0])
        fraction = (float(below or 0.0) + count_stddev * z) / expected_clients + 0.5
    return update, fraction


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
    _check_fedavg(clip, noise_multiplier, expected_clients)
    total, norms, finite = clipped_sum(updates, clip)
    below = float((norms[finite] <= clip).sum()) - 0.5 * int(finite.sum())
    update, fraction = noised_mean(
        total, clip=clip, noise_multiplier=noise_multiplier, expected_clients=expected_clients,
        generator=generator, below=below, count_stddev=count_stddev,
    )  # fmt: skip
    return DPFedAvgRound(update, norms, int((~finite).sum()), fraction)


def _normals(generator: NoiseStream | torch.Generator, n: int) -> torch.Tensor:
    """``n`` float64 standard normals from a noise stream (or a seeded torch generator)."""
    if isinstance(generator, NoiseStream):
        return generator.normal(n, dtype=torch.float64)
    return torch.randn(n, generator=generator, dtype=torch.float64)


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
