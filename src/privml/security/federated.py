"""Federated rounds with simulated adversaries and server-side defences, for the audit.

:func:`federate` runs the round engine (:func:`privml.fl.rounds.run_rounds`) with the stages an
attack experiment needs: malicious sites that train on poisoned data and send boosted (model
replacement) or rewritten updates (:class:`~privml.fl.stages.attack.SimulatedAttack`), and a
server that runs the defences of :mod:`privml.security.defenses.robust` (anomaly filter,
clipping, robust rule, weak DP) and records which updates the anomaly detector flagged. The
rest of the round is the configured one: cohort sampling, local SGD or FedProx, the server
optimizer, ``max_update_norm``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from privml.data.federation import FederatedData
from privml.errors import UsageError
from privml.fl.attacks import UPDATE_ATTACKS
from privml.fl.checkpoint import ServerState
from privml.fl.engine import SimulationEngine, torch_threads
from privml.fl.plan import attacked_data, init_params
from privml.fl.rounds import Outcome, Received, RoundsPlan, SitePipeline, run_rounds
from privml.fl.stages.aggregate import CheckedAggregation, ServerPlan, init_server_state
from privml.fl.stages.attack import Poison, SimulatedAttack, boost_updates
from privml.fl.stages.cohort import UniformCohort
from privml.fl.stages.local import LocalTraining
from privml.fl.stages.optimizer import ServerOptimizerStep
from privml.models.nets import ModelSpec, load_flat_params
from privml.models.training import GradientRule, MeanGradient
from privml.security.defenses.robust import NO_DEFENCE, Defence

__all__ = ["Adversary", "FederatedRun", "boost_updates", "federate", "site_indices"]


@dataclass(frozen=True)
class Adversary:
    """Malicious sites and what they do.

    Attributes:
        sites: indices of the malicious sites in ``fed.sites``.
        poison: rewrites each malicious site's training records once, before training
            (e.g. :func:`privml.security.attacks.backdoor.poisoner`).
        boost: multiply the malicious updates by this factor (> 0), or ``"replace"`` for
            Bagdasaryan et al.'s model replacement, ``gamma = total weight / own weight`` of
            the round, so that FedAvg's result becomes the attacker's local model.
        update_attack: a Byzantine update attack of :mod:`privml.fl.attacks` instead
            (``"sign_flip"``, ``"scale"``, ``"gaussian"``, ``"alie"``, ``"ipm"``).
        update_attack_params: its parameters.
        start_round: first round the malicious sites attack (they are honest before).
    """

    sites: tuple[int, ...]
    poison: Poison | None = None
    boost: float | str | None = None
    update_attack: str | None = None
    update_attack_params: Mapping[str, Any] = field(default_factory=dict)
    start_round: int = 1

    def __post_init__(self) -> None:
        if not self.sites:
            raise UsageError("An Adversary needs at least one malicious site index.")
        if self.boost is not None and self.boost != "replace":
            if isinstance(self.boost, bool) or not isinstance(self.boost, int | float):
                raise UsageError(
                    f"The 'boost' parameter of Adversary must be a number > 0 or 'replace'. "
                    f"Got {self.boost!r} instead."
                )
            if not self.boost > 0:
                raise UsageError(
                    f"The 'boost' parameter of Adversary must be > 0. Got {self.boost} instead."
                )
        if self.update_attack is not None and self.update_attack not in UPDATE_ATTACKS:
            raise UsageError(
                f"The 'update_attack' parameter of Adversary must be one of "
                f"{list(UPDATE_ATTACKS)}. Got {self.update_attack!r} instead."
            )
        if self.update_attack is not None and self.boost is not None:
            raise UsageError("Give an Adversary 'boost' or 'update_attack', not both.")

    def stage(self, n_sites: int, seed: int) -> SimulatedAttack:
        """The round engine's attack stage for these sites."""
        bad = [i for i in self.sites if not 0 <= i < n_sites]
        if bad:
            raise UsageError(
                f"Adversary sites {bad} are outside 0..{n_sites - 1} (the federation has "
                f"{n_sites} sites)."
            )
        kind = self.update_attack or ("backdoor" if self.poison is not None else "boost")
        return SimulatedAttack(
            kind, np.unique(np.asarray(self.sites, dtype=np.int64)), self.update_attack,
            dict(self.update_attack_params), self.poison, self.boost, self.start_round, seed,
        )  # fmt: skip


@dataclass
class FederatedRun:
    """The final global model of a simulated federation and what happened each round."""

    model: nn.Module
    params: torch.Tensor
    rounds: list[dict[str, Any]]
    defence: Defence
    seconds: float

    @property
    def flagged_malicious(self) -> int:
        """Malicious updates the anomaly detector flagged, over all rounds."""
        return int(sum(r.get("flagged_malicious", 0) for r in self.rounds))

    @property
    def flagged_honest(self) -> int:
        """Honest updates the anomaly detector flagged (false alarms), over all rounds."""
        return int(sum(r.get("flagged_honest", 0) for r in self.rounds))


class _Recorder:
    """The ``combine`` step of the defence, recording per round which updates were flagged."""

    def __init__(self, combine: CheckedAggregation) -> None:
        self.combine = combine
        self.rounds: list[dict[str, Any]] = []

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        outcome = self.combine(state, received, rnd)
        ids = np.asarray(received.ids)
        mal = np.asarray(received.malicious, dtype=bool)
        flagged = np.zeros(len(ids), dtype=bool)
        report = self.combine.last_anomalies
        if report is not None:
            flagged[np.asarray(outcome.accepted, dtype=np.int64)] = report.flagged
        self.rounds.append({
            "round": rnd,
            "clients": len(ids),
            "malicious": int(mal.sum()),
            "flagged": [int(i) for i in ids[flagged]],
            "flagged_malicious": int((flagged & mal).sum()),
            "flagged_honest": int((flagged & ~mal).sum()),
            "clip_bound": outcome.info.get("clip_bound"),
            "n_clipped": int(outcome.info.get("n_clipped", 0)),
        })  # fmt: skip
        return outcome


class _AuditEngine(SimulationEngine):
    """The simulation engine, evaluating with the audit's own metric every few rounds."""

    def __init__(self, pipeline: SitePipeline, model: nn.Module, fed: FederatedData,
                 recorder: _Recorder, evaluate: Callable[[nn.Module], dict[str, float]] | None,
                 every: int) -> None:  # fmt: skip
        super().__init__(pipeline, model, fed.sites)
        self.recorder, self.user_evaluate, self.every = recorder, evaluate, every

    def evaluate(self, params: NDArray[np.float32]) -> dict[str, Any]:
        rec = self.recorder.rounds[-1]
        if self.user_evaluate is not None and self.every > 0 and rec["round"] % self.every == 0:
            load_flat_params(self.model, torch.from_numpy(params))
            rec.update(self.user_evaluate(self.model))
        return {"loss": None, "accuracy": None, "auc": None}

    def finish(self, params: NDArray[np.float32]) -> dict[str, Any]:
        return {"loss": None, "accuracy": None, "auc": None}


def federate(
    fed: FederatedData,
    spec: ModelSpec,
    training: Any,
    *,
    adversary: Adversary | None = None,
    defence: Defence = NO_DEFENCE,
    rule: GradientRule | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    evaluate_every: int = 0,
) -> FederatedRun:
    """Run ``training.rounds`` federated rounds with optional adversary and defence.

    Args:
        fed: the sites' encoded records.
        spec: the model architecture.
        training: rounds, local training (SGD or FedProx), sampling, the server optimizer,
            ``max_update_norm`` and seed (the aggregator comes from ``defence``).
        adversary: malicious sites, or None.
        defence: the server's defences (:class:`~privml.security.defenses.robust.Defence`).
        rule: the local gradient rule (plain SGD by default).
        evaluate: ``f(model) -> metrics`` run on the final model, and every
            ``evaluate_every`` rounds when that is > 0 (recorded in ``rounds``).

    Returns:
        :class:`FederatedRun` whose ``rounds`` list, per round, the participants, which were
        malicious, which updates the anomaly detector flagged and what the defence did.
    """
    t0 = time.perf_counter()
    model, params0 = init_params(spec, training.seed)
    g = rule if rule is not None else MeanGradient(model, spec, binary=fed.task.kind == "binary")
    n = len(fed.sites)
    atk = adversary.stage(n, training.seed) if adversary is not None else None
    local = LocalTraining(attacked_data(list(fed.sites), atk), training, g)
    optimizer = ServerPlan.from_training(training).optimizer
    combine, noise = defence.stages(
        optimizer, seed=training.seed, max_update_norm=training.max_update_norm
    )
    recorder = _Recorder(combine)
    plan = RoundsPlan(training.rounds, UniformCohort.from_training(n, training), recorder,
                      ServerOptimizerStep(optimizer), list(noise))  # fmt: skip
    malicious = atk.mask(n) if atk is not None else np.zeros(n, dtype=bool)
    pipeline = SitePipeline(local, [atk] if atk is not None else [], malicious)
    engine = _AuditEngine(pipeline, model, fed, recorder, evaluate, evaluate_every)
    with torch_threads(spec):
        out = run_rounds(plan, engine, init_server_state(params0, combine.plan))
    params = torch.from_numpy(out.state.params.copy())
    load_flat_params(model, params)
    model.eval()
    return FederatedRun(model, params, recorder.rounds, defence, time.perf_counter() - t0)


def site_indices(fed: FederatedData, names_or_positions: Sequence[str | int]) -> tuple[int, ...]:
    """Positions of the named (or numbered) sites; unknown names are an error."""
    names = [s.name for s in fed.sites]
    out: list[int] = []
    for x in names_or_positions:
        if isinstance(x, int) and not isinstance(x, bool):
            if not 0 <= x < len(names):
                raise UsageError(f"site position {x} is outside 0..{len(names) - 1}")
            out.append(x)
        elif x in names:
            out.append(names.index(str(x)))
        else:
            raise UsageError(f"unknown site {x!r}; the sites are {names}")
    return tuple(out)
