"""Federated rounds with simulated adversaries and server-side defences, for the audit.

The round loop the attack experiments need: malicious sites that train on poisoned data and
send boosted (model replacement) or rewritten updates, and a server that runs the defences of
:mod:`privml.security.defenses.robust` and records which updates the anomaly detector flagged.
It is built from the same pieces as the simulation engine -- cohort sampling, the vectorized
site-side trainer (:func:`privml.fl.engine.local_updates`), the Byzantine update attacks of
:mod:`privml.fl.attacks` and the aggregation rules of :mod:`privml.fl.aggregate` -- with a plain
server step (``global += aggregate``). The engine's own ``[attack]`` simulation covers the
Byzantine attacks for ``privml run``; this loop adds data poisoning with a trigger and the
defences whose effect the audit measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.config import TrainingConfig
from privml.data.federation import FederatedData, SiteData
from privml.errors import UsageError
from privml.fl.attacks import UPDATE_ATTACKS, apply_attack
from privml.fl.engine import init_params, local_updates, sample_cohort
from privml.models.nets import ModelSpec, load_flat_params
from privml.models.training import GradientRule, MeanGradient
from privml.security.defenses.robust import NO_DEFENCE, Defence, defend

__all__ = ["Adversary", "FederatedRun", "boost_updates", "federate", "site_indices"]

#: ``(X, y, rng) -> (X', y')``: how a malicious site rewrites its training records.
Poison = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


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


def federate(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
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
        training: rounds, local epochs, batch size, lr, sampling and seed (the aggregator
            comes from ``defence``).
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
    model, params = init_params(spec, training.seed)
    binary = fed.task.kind == "binary"
    g = rule if rule is not None else MeanGradient(model, spec, binary=binary)
    sites: list[SiteData] = list(fed.sites)
    malicious = np.zeros(len(sites), dtype=bool)
    if adversary is not None:
        bad = [i for i in adversary.sites if not 0 <= i < len(sites)]
        if bad:
            raise UsageError(
                f"Adversary sites {bad} are outside 0..{len(sites) - 1} (the federation has "
                f"{len(sites)} sites)."
            )
        malicious[list(adversary.sites)] = True
        if adversary.poison is not None:
            for i in adversary.sites:
                s = sites[i]
                X, y = adversary.poison(
                    s.X_train, s.y_train, np.random.default_rng([training.seed, 97, i])
                )
                sites[i] = SiteData(s.name, X, y, s.X_test, s.y_test)
    rounds: list[dict[str, Any]] = []
    for rnd in range(1, training.rounds + 1):
        ids = sample_cohort(len(sites), training, rnd)
        cohort = [sites[i] for i in ids]
        mal = malicious[ids]
        active = adversary is not None and rnd >= adversary.start_round and bool(mal.any())
        if adversary is not None and not active and adversary.poison is not None:
            cohort = [fed.sites[i] if malicious[i] else sites[i] for i in ids]
        updates = local_updates(
            model, params, cohort, training=training, rnd=rnd, site_ids=ids, rule=g
        )
        weights = np.array([s.n_train for s in cohort], dtype=np.float64)
        if active:
            assert adversary is not None
            if adversary.update_attack is not None:
                updates = apply_attack(
                    adversary.update_attack, updates, mal,
                    rng=np.random.default_rng([training.seed, rnd, 3]),
                    params=dict(adversary.update_attack_params),
                )  # fmt: skip
            elif adversary.boost is not None:
                updates = boost_updates(updates, weights, mal, adversary.boost)
        out = defend(updates, weights, defence, rng=np.random.default_rng([training.seed, rnd, 5]))
        params = params + torch.from_numpy(out.update.astype(np.float32))
        flagged = np.zeros(len(ids), dtype=bool)
        if out.anomalies is not None:
            flagged = np.asarray(out.anomalies.flagged, dtype=bool)
        rec: dict[str, Any] = {
            "round": rnd,
            "clients": len(ids),
            "malicious": int(mal.sum()) if active else 0,
            "flagged": [int(i) for i in ids[flagged]],
            "flagged_malicious": int((flagged & mal).sum()) if active else 0,
            "flagged_honest": int((flagged & ~mal).sum()) if active else int(flagged.sum()),
            "clip_bound": out.clip_bound,
            "n_clipped": out.n_clipped,
        }
        if evaluate is not None and evaluate_every > 0 and rnd % evaluate_every == 0:
            load_flat_params(model, params)
            rec.update(evaluate(model))
        rounds.append(rec)
    load_flat_params(model, params)
    model.eval()
    return FederatedRun(model, params, rounds, defence, time.perf_counter() - t0)


def boost_updates(
    updates: np.ndarray, weights: np.ndarray, malicious: np.ndarray, boost: float | str
) -> np.ndarray:
    """Scale the malicious rows of ``updates`` (a copy): by ``boost``, or for ``"replace"`` by
    ``gamma = total weight / malicious weight`` (Bagdasaryan et al.'s model replacement: FedAvg
    of the round then lands on the attackers' own model)."""
    out = np.array(updates, dtype=np.float64, copy=True)
    mal = np.asarray(malicious, dtype=bool)
    if not mal.any():
        return out
    w = np.asarray(weights, dtype=np.float64)
    gamma = w.sum() / w[mal].sum() if boost == "replace" else float(boost)
    out[mal] *= gamma
    return out


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
