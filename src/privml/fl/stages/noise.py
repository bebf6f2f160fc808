"""Step ``central noise``: noise the server adds to the combined update.

* :class:`WeakNoise` -- Sun et al. 2019's "weak differential privacy" against backdoors:
  Gaussian noise of standard deviation ``noise_multiplier * clip_bound / n_used`` on the
  aggregate, the noise DP-FedAvg would add for that clipping bound. "Weak": the multipliers
  that keep accuracy (0.01-0.1) give no meaningful formal epsilon, and nothing is accounted;
  use client-level DP (``[privacy] mode = "client"``) for a guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome

__all__ = ["WeakNoise"]


@dataclass(frozen=True)
class WeakNoise:
    """Weak-DP noise on the aggregate (needs a clipping bound in the outcome's info), drawn
    from a generator seeded by ``(seed, round, 5)`` (or ``rng(round)`` when given)."""

    noise_multiplier: float
    seed: int
    rng: Callable[[int], np.random.Generator] | None = None
    step = "central noise"

    def apply(self, state: ServerState, outcome: Outcome, rnd: int) -> Outcome:
        bound = outcome.info.get("clip_bound")
        if outcome.update is None or bound is None or not self.noise_multiplier > 0:
            return outcome
        std = self.noise_multiplier * float(bound) / max(int(outcome.info.get("n_used", 1)), 1)
        rng = self.rng(rnd) if self.rng is not None else np.random.default_rng([self.seed, rnd, 5])
        outcome.update = outcome.update + rng.normal(0.0, std, size=outcome.update.shape)
        outcome.info["noise_std"] = std
        return outcome
