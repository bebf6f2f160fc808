"""Private training as stages of the round: DP-SGD at the sites, DP-FedAvg at the server.

Sample level (``[privacy] mode = "sample"``; the unit is one record of one site, each site has
its own guarantee):

* local update: DP-SGD (:func:`dpsgd_rule`: Poisson batches, per-sample clipping and Gaussian
  noise from :mod:`privml.dp.sgd`, every draw from the site's own streams of the run's
  :class:`~privml.dp.randomness.NoiseSource`), with the noise multiplier the plan calibrated
  for the site (:func:`privml.dp.planning.plan_sample_level`);
* accounting (:class:`SampleAccounting`): before its update leaves, each site books the
  increment of its epsilon in its ledger (:class:`~privml.dp.planning.SampleBooker`); a site
  that cannot afford the round refuses it (BudgetExceededError) and nothing is released;
* before round 1, each site's private input mean (:func:`site_centre`), booked the same way.

Client level (``mode = "client"``, DP-FedAvg; the unit is a whole site):

* cohort: Poisson sampling of sites from the run's noise source (:func:`client_cohort`);
* accounting: each site books the whole run's epsilon before its first update leaves
  (:class:`ClientAccounting`);
* combine: validation, then every update clipped to ``clip`` and summed (:class:`ClippedSum`);
  central noise: ``N(0, (z clip)^2)`` on the sum, divided by the expected number of clients,
  and adaptive clipping's private quantile (:class:`CentralNoise`);
* under secure aggregation, each site clips and adds its share of the noise before encrypting
  (:class:`NoiseShare`): the key holder and the server only ever see a noised sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from privml.dp.accounting import dp_fedavg_event
from privml.dp.ledger import PrivacyLedger
from privml.dp.planning import (
    CALIBRATION_TOLERANCE,
    CENTER_CLIP,
    NOT_ACCOUNTED,
    RELATION_NAME,
    RELATION_REASON,
    ClientLevelPlan,
    SampleBooker,
    SampleLevelPlan,
    clipped_sum,
    noised_mean,
    private_mean,
)
from privml.dp.randomness import NoiseSource
from privml.dp.sgd import DPSGDGradient, poisson_batches
from privml.errors import BudgetExceededError
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Cohort, Outcome, Received, SiteUpdates
from privml.fl.validate import stack_accepted, validate_updates
from privml.models.nets import ModelSpec
from privml.models.training import CohortData, GradientRule

__all__ = [
    "CentralNoise",
    "ClientAccounting",
    "ClipState",
    "ClippedSum",
    "NoiseShare",
    "OneUpdatePerRound",
    "SampleAccounting",
    "client_cohort",
    "client_privacy",
    "dpsgd_rule",
    "fold_shift",
    "sample_privacy",
    "site_centre",
]

_EMPTY = np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- sample level


def dpsgd_rule(
    model: nn.Module, spec: ModelSpec, *, binary: bool, sigmas: NDArray[np.float64],
    max_grad_norm: float, batch_size: int, local_epochs: int, noise: NoiseSource,
) -> Callable[..., tuple[GradientRule, tuple[np.ndarray, np.ndarray]]]:  # fmt: skip
    """The local update rule of sample-level DP: ``make_rule(rnd, ids, data, rngs)`` for
    :class:`~privml.fl.stages.local.LocalTraining`. Site ``i`` draws its Poisson batches from
    ``noise.stream("dpsgd-sampling", rnd, i)`` and its Gaussian noise from
    ``noise.stream("dpsgd-noise", rnd, i)`` with multiplier ``sigmas[i]``: its update does not
    depend on the other sites of the cohort, and nobody can regenerate it."""

    def make_rule(rnd: int, ids: NDArray[np.int64], data: CohortData, rngs: Any
                  ) -> tuple[GradientRule, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        streams = [noise.stream("dpsgd-sampling", rnd, int(i)) for i in ids]
        pb = poisson_batches(data.sizes, batch_size=batch_size, epochs=local_epochs, rngs=streams)
        rule = DPSGDGradient(
            model, spec, binary=binary, max_grad_norm=max_grad_norm,
            noise_multipliers=sigmas[ids].tolist(), expected_batch=pb.expected_batch,
            steps=pb.steps, generators=[noise.stream("dpsgd-noise", rnd, int(i)) for i in ids],
        )  # fmt: skip
        return rule, (pb.idx, pb.mask)

    return make_rule


@dataclass
class SampleAccounting:
    """Step ``accounting`` of sample-level DP: every site that trained this round (a late one
    too: its update still left the site) books its round's steps before its update leaves."""

    booker: SampleBooker
    name = "accounting"
    step = "accounting"

    def apply(self, batch: SiteUpdates) -> None:
        plan = self.booker.plan
        for i in np.concatenate([batch.ids, batch.late]).astype(np.int64):
            sp = plan.sites[int(i)]
            if sp.n_train and sp.steps_per_round:
                self.booker.charge(int(i), sp.steps_per_round, f"dp-sgd round {batch.rnd}",
                                   batch.rnd)  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return self.booker.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.booker.load_state_dict(state)


def site_centre(
    X: np.ndarray, *, index: int, plan: SampleLevelPlan, booker: SampleBooker,
    noise: NoiseSource, clip: float = CENTER_CLIP,
) -> np.ndarray | None:  # fmt: skip
    """Site ``index``'s private mean of the rows of ``X`` (its inputs, or its feature
    histograms), booked before it leaves the site: ``center_steps`` Poisson-sampled noisy sums
    from the site's stream ``("centre", index)``. None for a site without such steps."""
    sp = plan.sites[index]
    if sp.center_steps == 0:
        return None
    booker.charge(index, sp.center_steps, "dp-sgd input centring", 0)
    return private_mean(
        X, q=sp.sampling_rate, steps=sp.center_steps, sigma=sp.noise_multiplier, clip=clip,
        stream=noise.stream("centre", index),
    )  # fmt: skip


def fold_shift(model: nn.Module, params: torch.Tensor, center: np.ndarray) -> torch.Tensor:
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


def sample_privacy(
    privacy: Any, plan: SampleLevelPlan, booker: SampleBooker, ledger: PrivacyLedger | None,
    noise: NoiseSource, centering: str | None,
) -> dict[str, Any]:  # fmt: skip
    """results.json ``privacy`` of a sample-level run."""
    p = privacy
    worst = max(plan.sites, key=lambda sp: sp.epsilon)
    # what each site spent: its plan, or more when a resumed run computed a round again
    spent = {sp.name: max(sp.epsilon, b.epsilon)
             for sp, b in zip(plan.sites, booker.books, strict=True)}  # fmt: skip
    return {
        "mode": "sample",
        "unit": "one record of one site; each site has its own guarantee",
        "relation": RELATION_NAME,
        "relation_reason": RELATION_REASON,
        "accountant": p.accountant,
        "delta": p.delta,
        "epsilon": max(spent.values(), default=0.0),
        "epsilon_target": p.epsilon,
        "epsilon_per_site": spent,
        "noise_multiplier": worst.noise_multiplier,
        "sampling_rate": worst.sampling_rate,
        "steps": worst.total_steps,
        "max_grad_norm": p.max_grad_norm,
        "clip": p.max_grad_norm,
        "calibrated": p.noise_multiplier is None,
        "calibration_tolerance": CALIBRATION_TOLERANCE if p.noise_multiplier is None else None,
        "sampling": "Poisson, q = min(1, batch_size / n_train) per site",
        "input_centering": centering,
        "per_site": {sp.name: sp.to_dict() for sp in plan.sites},
        "epsilon_by_round": {
            sp.name: b.by_round for sp, b in zip(plan.sites, booker.books, strict=True)
        },
        "booking": "each site books the epsilon increment of its round's DP-SGD steps in its "
        "own ledger before its update leaves",
        "ledger": str(ledger.path) if ledger is not None else None,
        "dataset": ledger.dataset if ledger is not None else None,
        "run": booker.run_id,
        "noise": noise.describe(),
        "reproducible_noise": not noise.secure,
        "not_accounted": list(NOT_ACCOUNTED),
    }  # fmt: skip


# ----------------------------------------------------------------------------- client level


def client_cohort(
    n_sites: int, rate: float, dropout: float, noise: NoiseSource, empty: Sequence[int] = ()
) -> Callable[[int], Cohort]:
    """Poisson sampling of sites at rate ``rate`` (what client-level DP's accountant assumes),
    then dropouts, both from the run's stream ``("clients", round)``; sites without training
    records are sampled but do not train (they count as dropped)."""
    idle = np.asarray(sorted(empty), dtype=np.int64)

    def sample(rnd: int) -> Cohort:
        rng = noise.stream("clients", rnd)
        chosen = np.flatnonzero(rng.random(n_sites) < rate).astype(np.int64)
        dropped = _EMPTY
        if dropout > 0 and len(chosen):
            dropped = chosen[rng.random(len(chosen)) < dropout]
        if len(idle):
            dropped = np.union1d(dropped, np.intersect1d(chosen, idle)).astype(np.int64)
        return Cohort(chosen, dropped, _EMPTY)

    return sample


@dataclass
class ClientAccounting:
    """Client-level accounting: each site books the whole run's epsilon (every client pays
    every round under Poisson sampling, sampled or not) once, before its first update leaves.
    ``sites`` are the sites this party books for (all in simulation, its own on Flower)."""

    ledger: PrivacyLedger
    plan: ClientLevelPlan
    sites: list[str]
    run_id: str
    booked: bool = False
    name = "client accounting"

    def book(self) -> None:
        if self.booked:
            return
        p = self.plan
        event = dp_fedavg_event(client_sampling_rate=p.sampling_rate,
                                noise_multiplier=p.noise_multiplier, rounds=p.steps)  # fmt: skip
        meta = {"run": self.run_id, "mode": "client", "accountant": p.accountant,
                "neighboring_relation": RELATION_NAME, "delta": p.delta,
                "noise_multiplier": p.noise_multiplier, "sampling_rate": p.sampling_rate,
                "steps": p.steps}  # fmt: skip
        for n in self.sites:
            self.ledger.charge(site=n, epsilon=p.epsilon, delta=p.delta,
                               label="dp-fedavg run (client level)", event=event,
                               metadata=meta)  # fmt: skip
        self.booked = True

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run_id, "booked": self.booked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.booked = str(state["run"]), bool(state["booked"])


@dataclass
class ClipState:
    """DP-FedAvg's clip: fixed, or adapted each round to a private quantile of the update
    norms (Andrew et al. 2021). Shared by the combine and central noise steps."""

    clip: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clips: list[float] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    name = "clip"

    def adapt(self, fraction: float | None) -> None:
        self.clips.append(self.clip)
        if self.adaptive and fraction is not None:
            self.fractions.append(fraction)
            self.clip = self.clip * math.exp(-self.clip_lr * (fraction - self.target_quantile))

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip, "clips": list(self.clips), "fractions": list(self.fractions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])
        self.clips, self.fractions = list(state["clips"]), list(state["fractions"])


@dataclass
class ClippedSum:
    """Step ``combine`` of DP-FedAvg: validation (a rejected update contributes nothing), then
    the sum of the accepted updates each clipped to the current clip. The outcome's update is
    that sum; the central noise step turns it into the noised mean."""

    clip: ClipState
    max_update_norm: float | None = None
    norm_bound: float | None = None
    """``aggregator = "norm_bound"``'s fixed ``max_norm``: updates are clipped to the smaller
    of it and the DP clip (the noise stays calibrated to the DP clip)."""
    step = "combine"

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        rows = received.updates
        n_params = int(state.params.shape[0])
        result = validate_updates(rows, n_params=n_params,  # type: ignore[arg-type]
                                  max_norm=self.max_update_norm)  # fmt: skip
        accepted = result.accepted_indices
        if isinstance(rows, np.ndarray) and rows.ndim == 2:
            stack = rows[accepted].astype(np.float64, copy=False)
        else:
            stack = stack_accepted(rows, result)  # type: ignore[arg-type]
        bound = min(self.clip.clip, self.norm_bound or math.inf)
        total, norms, finite = clipped_sum(stack.reshape(len(accepted), n_params), bound)
        below = float((norms[finite] <= self.clip.clip).sum()) - 0.5 * int(finite.sum())
        info = {"clip": self.clip.clip, "below": below, "n": len(accepted)}
        return Outcome(total, accepted, result.rejected, info=info)


@dataclass
class CentralNoise:
    """Step ``central noise`` of DP-FedAvg: ``(sum + N(0, (z clip)^2 I)) / (q n)`` from the
    run's stream ``("dp-fedavg", round)`` (a round with no update is noised too: the round
    happened and is accounted), and adaptive clipping's noisy count."""

    clip: ClipState
    noise_multiplier: float
    expected_clients: float
    count_stddev: float | None
    noise: NoiseSource
    step = "central noise"

    def apply(self, state: ServerState, outcome: Outcome, rnd: int) -> Outcome:
        total = outcome.update if outcome.update is not None else np.zeros(state.params.shape[0])
        update, fraction = noised_mean(
            np.asarray(total, dtype=np.float64), clip=self.clip.clip,
            noise_multiplier=self.noise_multiplier, expected_clients=self.expected_clients,
            generator=self.noise.stream("dp-fedavg", rnd), below=outcome.info.get("below", 0.0),
            count_stddev=self.count_stddev,
        )  # fmt: skip
        self.clip.adapt(fraction)
        return Outcome(update, outcome.accepted, outcome.rejected, info=outcome.info)


@dataclass
class NoiseShare:
    """Each site's share of DP-FedAvg's noise under secure aggregation: ``N(0, (z clip)^2 /
    k)`` per coordinate for the ``k`` sites asked this round, from the site's stream
    ``("noise-share", round, site)``, so the sum of the shares carries the calibrated total.
    Shares are bounded to the encryption's range (``bound``, eight standard deviations of
    the smallest cohort: a coordinate beyond it has probability below 1e-15)."""

    clip: float
    noise_multiplier: float
    noise: NoiseSource
    bound: float

    def __call__(self, batch: SiteUpdates) -> NDArray[np.float64]:
        k = max(int(batch.asked), 1)
        std = self.noise_multiplier * self.clip / math.sqrt(k)
        rows = [self.noise.stream("noise-share", batch.rnd, int(i)).normal(
            batch.updates.shape[1], dtype=torch.float64).numpy() for i in batch.ids]  # fmt: skip
        out = np.asarray(rows, dtype=np.float64).reshape(len(batch.ids), -1) * std
        return np.clip(out, -self.bound, self.bound)


def client_privacy(
    privacy: Any, plan: ClientLevelPlan, clip: ClipState, run_id: str,
    ledger: PrivacyLedger | None, noise: NoiseSource, names: Sequence[str], secure: bool,
) -> dict[str, Any]:  # fmt: skip
    """results.json ``privacy`` of a client-level run."""
    p = privacy
    adaptive = None
    if p.adaptive_clip:
        adaptive = {"target_quantile": p.target_quantile, "clip_lr": p.clip_lr,
                    "clipped_count_stddev": plan.count_stddev, "clip_per_round": clip.clips,
                    "unclipped_fraction_per_round": clip.fractions,
                    "final_clip": clip.clip}  # fmt: skip
    return {
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
        "sampling_rate": plan.sampling_rate,
        "expected_clients_per_round": plan.sampling_rate * plan.n_clients,
        "steps": plan.steps,
        "rounds": plan.rounds,
        "centering_rounds": plan.center_rounds,
        "clip": p.clip,
        "adaptive_clip": adaptive,
        "calibrated": p.noise_multiplier is None,
        "calibration_tolerance": CALIBRATION_TOLERANCE if p.noise_multiplier is None else None,
        "sampling": "Poisson client sampling, q = clients_per_round / n_sites",
        "booking": "each client's whole planned spend, booked in its own ledger before its first "
        "update leaves",
        "noise_added": "by the sites, each its share, before encrypting (the server and the key "
        "holder see only a noised sum)" if secure else "by the server, to the sum of clipped "
        "updates",
        "ledger": str(ledger.path) if ledger is not None else None,
        "dataset": ledger.dataset if ledger is not None else None,
        "run": run_id,
        "noise": noise.describe(),
        "reproducible_noise": not noise.secure,
        "not_accounted": list(NOT_ACCOUNTED),
    }  # fmt: skip


@dataclass
class OneUpdatePerRound:
    """Step ``accounting`` of client-level DP at a deployed site: the run's booking covers one
    update per round, so the site refuses a second request for a round it already answered
    (a server replaying rounds would otherwise draw unbooked releases from it)."""

    site: str
    rounds: int
    released: set[int] = field(default_factory=set)
    step = "accounting"

    def apply(self, batch: SiteUpdates) -> None:
        if batch.rnd in self.released or not 1 <= batch.rnd <= self.rounds:
            why = "already released this round's update" if batch.rnd in self.released else (
                "was not booked for this round")  # fmt: skip
            raise BudgetExceededError(
                f"site {self.site!r} refuses round {batch.rnd}: its client-level booking covers "
                f"one update in each of rounds 1..{self.rounds}, and it {why}"
            )
        self.released.add(batch.rnd)
