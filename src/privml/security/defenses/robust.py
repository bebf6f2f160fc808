"""Server-side defences against malicious updates, composed in one fixed order.

:class:`Defence` says which of them a server applies to a round's stack of updates. They run
as stages of the round engine (:meth:`Defence.stages`: the ``combine`` step's checks and the
``central noise`` step), and :func:`defend` applies the same stages to one stack:

1. **update anomaly detection** (:mod:`privml.fl.anomaly`): flagged updates
   are recorded and, with ``drop_flagged``, left out;
2. **norm clipping** (Sun et al. 2019, "Can you really backdoor federated learning?"): every
   update scaled to L2 norm at most ``clip`` (a number, or ``"median"``: the round's median
   update norm, so honest updates are barely touched and a boosted update loses its boost);
3. **robust aggregation** with any rule of :mod:`privml.fl.aggregate` (``"fedavg"``,
   ``"trimmed_mean"``, ``"median"``, ``"multi_krum"``, ...);
4. **weak differential privacy** (Sun et al. 2019): Gaussian noise of standard deviation
   ``noise_multiplier * clip_bound / n_kept`` added to the aggregate, the noise DP-FedAvg
   would add for that clipping bound. "Weak": the multipliers that keep accuracy (0.01-0.1)
   give no meaningful formal epsilon; the noise blurs the fine-grained directions a backdoor
   needs. Use client-level DP (``[privacy] mode = "client"``) for a guarantee.

privml's default defence against backdoors (:data:`BACKDOOR_DEFENCE`) combines all four with
a coordinate-wise trimmed mean: a backdoor lives in parameters that honest updates leave
nearly untouched (the weights of the trigger's features), where a coordinate-wise robust rule
discards the minority's values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import UsageError
from privml.fl import aggregate as agg
from privml.fl.anomaly import AnomalyReport
from privml.fl.checkpoint import ServerState
from privml.fl.server_opt import ServerOptimizer, init_state, make_server_optimizer
from privml.fl.stages.aggregate import CheckedAggregation, ServerPlan
from privml.fl.stages.noise import WeakNoise
from privml.security._checks import check_float

__all__ = ["BACKDOOR_DEFENCE", "NO_DEFENCE", "Defence", "DefenceOutcome", "defend"]


@dataclass(frozen=True)
class Defence:
    """Which server-side defences to apply (see the module docstring for the order).

    Attributes:
        name: a label for reports.
        anomaly_threshold: robust z-score threshold of the anomaly detector, or None (off).
        drop_flagged: leave flagged updates out of the aggregate (else only record them).
        clip: L2 bound per update (> 0), ``"median"``, or None (no clipping).
        aggregator: a rule name of :data:`privml.fl.aggregate.AGGREGATORS`.
        aggregator_params: its hyper-parameters.
        noise_multiplier: weak-DP noise, >= 0 (needs ``clip``).
    """

    name: str = "none"
    anomaly_threshold: float | None = None
    drop_flagged: bool = True
    clip: float | str | None = None
    aggregator: str = "fedavg"
    aggregator_params: Mapping[str, Any] = field(default_factory=dict)
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        where = "Defence"
        if self.anomaly_threshold is not None:
            check_float(self.anomaly_threshold, "anomaly_threshold", where, low=0.0,
                        low_open=True)  # fmt: skip
        if self.clip is not None and self.clip != "median":
            check_float(self.clip, "clip", where, low=0.0, low_open=True)
        check_float(self.noise_multiplier, "noise_multiplier", where, low=0.0)
        if self.noise_multiplier > 0 and self.clip is None:
            raise UsageError(
                "The 'noise_multiplier' parameter of Defence needs a clipping bound: the noise "
                "is scaled to it. Set clip = 'median' or a number."
            )
        problems = agg.check_params(self.aggregator, dict(self.aggregator_params))
        if problems:
            raise UsageError("; ".join(problems))

    def stages(
        self, optimizer: ServerOptimizer, *, seed: int, max_update_norm: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[CheckedAggregation, list[WeakNoise]]:  # fmt: skip
        """The round engine's stages for this defence: the ``combine`` step (validation,
        anomaly filter, clipping, the rule; too few updates for the rule fall back to
        FedAvg) and the ``central noise`` step (weak DP, noise from ``(seed, round, 5)``)."""
        params = dict(self.aggregator_params)
        plan = ServerPlan(self.aggregator, params, {}, optimizer, max_update_norm,
                          agg.min_clients(self.aggregator, params))  # fmt: skip
        combine = CheckedAggregation(
            plan, anomaly_threshold=self.anomaly_threshold, drop_flagged=self.drop_flagged,
            clip=self.clip, too_few="fedavg",
        )  # fmt: skip
        draw = None if rng is None else (lambda _rnd: rng)
        noise = [WeakNoise(self.noise_multiplier, seed, draw)] if self.noise_multiplier > 0 else []
        return combine, noise

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "anomaly_threshold": self.anomaly_threshold,
            "drop_flagged": self.drop_flagged,
            "clip": self.clip,
            "aggregator": self.aggregator,
            "aggregator_params": dict(self.aggregator_params),
            "noise_multiplier": self.noise_multiplier,
        }


NO_DEFENCE = Defence()
"""Plain FedAvg, nothing else."""

BACKDOOR_DEFENCE = Defence(
    name="privml",
    anomaly_threshold=3.0,
    clip="median",
    aggregator="trimmed_mean",
    aggregator_params={"beta": 0.2},
    noise_multiplier=0.05,
)
"""privml's defence against backdoors and boosted updates (measured in
docs/benchmarks_security.md)."""


@dataclass
class DefenceOutcome:
    """The defended aggregate of one round and what each defence did."""

    update: NDArray[np.float64]
    kept: NDArray[np.bool_]
    anomalies: AnomalyReport | None
    clip_bound: float | None
    n_clipped: int
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": int(self.kept.sum()),
            "dropped": np.flatnonzero(~self.kept).tolist(),
            "anomalies": None if self.anomalies is None else self.anomalies.to_dict(),
            "clip_bound": self.clip_bound,
            "n_clipped": self.n_clipped,
            **self.info,
        }


def defend(
    updates: Any,
    weights: Any,
    defence: Defence,
    *,
    rng: np.random.Generator | None = None,
    seed: int = 0,
    rnd: int = 1,
) -> DefenceOutcome:
    """Apply ``defence`` to a round's ``[n, P]`` update stack; return the aggregate update.

    The same stages a federated run applies (:meth:`Defence.stages`), on one stack.

    Args:
        updates: the round's client updates (new - global parameters).
        weights: ``[n]`` sample counts (used by FedAvg only).
        defence: what to apply.
        rng: the weak-DP noise's generator; None draws from ``(seed, rnd, 5)``, as a
            federated run does.
        seed, rnd: the run's seed and the round.
    """
    stack = np.asarray(updates, dtype=np.float64)
    n, p = stack.shape
    combine, noise = defence.stages(make_server_optimizer("sgd"), seed=seed, rng=rng)
    zeros = np.zeros(p, dtype=np.float32)
    state = ServerState(rnd - 1, zeros, init_state(combine.plan.optimizer, p))
    outcome = combine.combine(state, list(stack), np.asarray(weights, dtype=np.float64), rnd)
    for stage in noise:
        outcome = stage.apply(state, outcome, rnd)
    kept = np.zeros(n, dtype=bool)
    report = combine.last_anomalies
    kept[:] = True
    if report is not None and defence.drop_flagged:
        kept &= ~np.asarray(report.flagged, dtype=bool)
    info = {k: v for k, v in outcome.info.items() if k in ("note", "noise_std")}
    info["aggregator"] = defence.aggregator if "note" not in info else "fedavg"
    update = outcome.update if outcome.update is not None else np.zeros(p)
    return DefenceOutcome(update, kept, report, outcome.info.get("clip_bound"),
                          int(outcome.info.get("n_clipped", 0)), info)  # fmt: skip
