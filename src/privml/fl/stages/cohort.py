"""Step ``cohort``: which sites take part in a round.

Every draw comes from a generator seeded by ``(seed, round, purpose)`` and depends on nothing
but the config, so the schedule is known before training (the privacy planner uses it) and
is the same on every engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privml.errors import UsageError
from privml.fl.rounds import Cohort

__all__ = ["PoissonCohort", "UniformCohort", "cohort_size"]

_EMPTY = np.zeros(0, dtype=np.int64)


def cohort_size(n_sites: int, training: Any) -> int:
    """Clients sampled per round: ``clients_per_round`` (at most ``n_sites``), else
    ``round(fraction * n_sites)`` (at least 1), else every site."""
    if n_sites < 1:
        raise UsageError(f"The federation needs at least one site. Got {n_sites}.")
    if training.clients_per_round is not None:
        return min(training.clients_per_round, n_sites)
    if training.fraction is not None:
        return max(1, min(n_sites, math.floor(training.fraction * n_sites + 0.5)))
    return n_sites


@dataclass(frozen=True)
class UniformCohort:
    """A uniform sample of ``cohort_size`` sites without replacement, then the dropouts
    (probability ``dropout``: they never train) and the stragglers (probability
    ``straggler``: their update arrives after the round closed and is discarded)."""

    n_sites: int
    size: int
    dropout: float
    straggler: float
    seed: int

    @classmethod
    def from_training(cls, n_sites: int, training: Any) -> UniformCohort:
        return cls(n_sites, cohort_size(n_sites, training), training.dropout,
                   training.straggler, training.seed)  # fmt: skip

    def __call__(self, rnd: int) -> Cohort:
        rng = np.random.default_rng([self.seed, rnd, 1])
        k, n = self.size, self.n_sites
        sampled = (np.sort(rng.choice(n, size=k, replace=False)) if k < n else np.arange(n)).astype(
            np.int64
        )
        dropped = sampled[rng.random(k) < self.dropout] if self.dropout > 0 else _EMPTY
        left = np.setdiff1d(sampled, dropped, assume_unique=True)
        stragglers = left[rng.random(len(left)) < self.straggler] if self.straggler else _EMPTY
        return Cohort(sampled, dropped, stragglers)

    def describe(self) -> dict[str, Any]:
        return {"sampling": "uniform without replacement", "clients_per_round": self.size}


@dataclass(frozen=True)
class PoissonCohort:
    """Every site sampled independently with probability ``rate`` (client-level DP's
    accountant assumes exactly this), then the dropouts; sites without training records
    are sampled but do not train (they count as dropped)."""

    n_sites: int
    rate: float
    dropout: float
    seed: int
    empty: frozenset[int] = frozenset()

    def __call__(self, rnd: int) -> Cohort:
        rng = np.random.default_rng([self.seed, rnd, 11])
        chosen = np.flatnonzero(rng.random(self.n_sites) < self.rate).astype(np.int64)
        dropped = _EMPTY
        if self.dropout > 0 and len(chosen):
            dropped = chosen[rng.random(len(chosen)) < self.dropout]
        if self.empty:
            idle = np.array([i for i in chosen if int(i) in self.empty], dtype=np.int64)
            dropped = np.union1d(dropped, idle).astype(np.int64)
        return Cohort(chosen, dropped, _EMPTY)

    def describe(self) -> dict[str, Any]:
        return {"sampling": "Poisson, each site with probability q", "sampling_rate": self.rate}
