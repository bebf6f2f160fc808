"""Step ``optimize``: the server optimizer applies the round's update (FedAvg's plain step,
server momentum, FedAdam, FedYogi, FedAdagrad; :mod:`privml.fl.server_opt`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privml.errors import ConfigError
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome
from privml.fl.server_opt import ServerOptimizer, server_step

__all__ = ["ServerOptimizerStep"]


@dataclass(frozen=True)
class ServerOptimizerStep:
    """``params += step(update)``; a skipped round carries the state over unchanged (the
    round counter advances). The update becomes the next round's centre (centered
    clipping)."""

    optimizer: ServerOptimizer
    step = "optimize"

    def __call__(self, state: ServerState, outcome: Outcome) -> ServerState:
        nxt = state.round + 1
        if outcome.update is None:
            return ServerState(nxt, state.params, state.opt, state.center)
        new_params, new_opt = server_step(
            self.optimizer, state.opt, state.params.astype(np.float64), outcome.update
        )
        with np.errstate(over="ignore", invalid="ignore"):
            params32 = new_params.astype(np.float32)
        if not np.isfinite(params32).all():
            # a step too large for the model's float32 parameters (e.g. a huge server_lr):
            # refuse rather than evaluate or publish a model of inf/nan
            raise ConfigError(
                f"training diverged in round {nxt}: the server step made the model's "
                f"parameters infinite or NaN (server optimizer {self.optimizer.kind!r}, "
                f"server lr {self.optimizer.lr:g}); lower training.server_lr or training.lr"
            )
        return ServerState(nxt, params32, new_opt, outcome.update.copy())
