"""Step ``combine`` on plain updates: validation, the anomaly filter, norm clipping and the
aggregation rule (server checks).

:class:`CheckedAggregation` is what the server does with the updates it can read:

1. **validate** every update (:mod:`privml.fl.validate`: type, dtype, shape, NaN/Inf,
   ``max_update_norm``, weight); a rejected update is counted by reason and never used;
2. optionally **filter anomalies** (:mod:`privml.fl.anomaly`): updates whose norm or
   direction is an outlier are recorded and, with ``drop_flagged``, left out;
3. optionally **clip** every update to a fixed L2 bound or the round's median norm;
4. combine the rest with the configured **rule** of :mod:`privml.fl.aggregate` (FedAvg,
   median, trimmed mean, Krum, Bulyan, FLTrust with the server's root update, ...). A round
   with fewer updates than the rule needs is skipped (or, for the audit's defences, falls back
   to FedAvg).

:func:`aggregate_round` is the same step followed by the server optimizer, on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from privml.errors import UsageError
from privml.fl import aggregate as agg
from privml.fl.anomaly import AnomalyReport, detect_anomalies
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome, Received
from privml.fl.server_opt import ServerOptimizer, init_state, make_server_optimizer
from privml.fl.validate import stack_accepted, validate_updates

__all__ = [
    "CheckedAggregation",
    "RoundOutcome",
    "ServerPlan",
    "aggregate_round",
    "init_server_state",
]


@dataclass(frozen=True)
class ServerPlan:
    """How the server combines a round's plain updates; built once per run from the config.

    Attributes:
        aggregator: the rule's name in :data:`privml.fl.aggregate.AGGREGATORS`.
        aggregator_params: the rule's own hyper-parameters (engine keys such as FLTrust's
            ``root_size`` removed, see :data:`privml.fl.aggregate.SERVER_DATA_PARAMS`).
        server_data: the engine keys with defaults filled (``{}`` for most rules).
        optimizer: the server optimizer applied to the aggregated update.
        max_update_norm: L2 bound above which an incoming update is rejected, or None.
        min_updates: the fewest accepted updates the rule can combine; a round with fewer
            is skipped (the model does not change) rather than aggregated unsafely.
    """

    aggregator: str
    aggregator_params: dict[str, Any]
    server_data: dict[str, Any]
    optimizer: ServerOptimizer
    max_update_norm: float | None
    min_updates: int

    @classmethod
    def from_training(cls, training: Any) -> ServerPlan:
        """Build the plan from ``[training]``; raises UsageError on invalid settings (the
        config loader reports the same problems as a ConfigError first)."""
        name = training.aggregator
        engine_keys = agg.SERVER_DATA_PARAMS.get(name, {})
        params = {k: v for k, v in training.aggregator_params.items() if k not in engine_keys}
        server_data = {
            **engine_keys,
            **{k: v for k, v in training.aggregator_params.items() if k in engine_keys},
        }
        problems = agg.check_params(name, params)
        if problems:
            raise UsageError("; ".join(problems))
        opt_params = dict(training.server_optimizer_params)
        if training.server_lr is not None:
            opt_params["lr"] = training.server_lr
        optimizer = make_server_optimizer(training.server_optimizer, **opt_params)
        return cls(
            aggregator=name,
            aggregator_params=params,
            server_data=server_data,
            optimizer=optimizer,
            max_update_norm=training.max_update_norm,
            min_updates=agg.min_clients(name, params),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description for results.json."""
        return {
            "aggregator": self.aggregator,
            "aggregator_params": dict(self.aggregator_params),
            "server_data": dict(self.server_data),
            "server_optimizer": {
                k: v for k, v in self.optimizer.__dict__.items() if _used_by(self.optimizer, k)
            },
            "max_update_norm": self.max_update_norm,
            "min_updates": self.min_updates,
        }


_OPT_KEYS = {
    "sgd": {"kind", "lr"},
    "momentum": {"kind", "lr", "momentum"},
    "adam": {"kind", "lr", "beta_1", "beta_2", "tau", "bias_correction"},
    "yogi": {"kind", "lr", "beta_1", "beta_2", "tau"},
    "adagrad": {"kind", "lr", "beta_1", "tau"},
}


def _used_by(opt: ServerOptimizer, key: str) -> bool:
    return key in _OPT_KEYS[opt.kind]


def init_server_state(params: torch.Tensor | np.ndarray, plan: ServerPlan) -> ServerState:
    """The server state before round 1: ``params`` (flat) and a zero optimizer state."""
    flat = np.array(params.detach().cpu().numpy() if isinstance(params, torch.Tensor) else params)
    flat = flat.astype(np.float32).reshape(-1)
    return ServerState(round=0, params=flat, opt=init_state(plan.optimizer, flat.shape[0]))


def _scalar_info(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, str | int | float | bool) or v is None}


#: ``(rnd, params) -> g0``: FLTrust's server update on its root data this round.
RootUpdate = Callable[[int, torch.Tensor], NDArray[np.float64]]


@dataclass
class CheckedAggregation:
    """Validation, anomaly filter, norm clipping and the rule (see the module docstring).

    Attributes:
        plan: rule, its parameters, ``max_update_norm`` and the fewest updates it needs.
        anomaly_threshold: robust z-score of the anomaly filter, or None (off).
        drop_flagged: leave flagged updates out (else only record them).
        clip: L2 bound per update, ``"median"`` (the round's median norm), or None.
        too_few: with fewer updates than the rule needs, ``"skip"`` the round or fall back
            to ``"fedavg"`` (the audit's defences).
        root: FLTrust's server update, required when the rule is ``fltrust``.
    """

    plan: ServerPlan
    anomaly_threshold: float | None = None
    drop_flagged: bool = True
    clip: float | str | None = None
    too_few: Literal["skip", "fedavg"] = "skip"
    root: RootUpdate | None = None
    last_anomalies: AnomalyReport | None = field(default=None, repr=False)
    step = "combine"

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        return self.combine(state, received.updates, received.weights, rnd)

    def combine(
        self, state: ServerState, rows: Sequence[object] | np.ndarray,
        weights: Sequence[object] | np.ndarray, rnd: int,
        server_update: np.ndarray | None = None,
    ) -> Outcome:  # fmt: skip
        """The step on ``rows`` (a float ``[n, P]`` stack, or one untrusted object per
        client) and their self-reported ``weights``."""
        n_params = int(state.params.shape[0])
        result = validate_updates(
            rows,  # type: ignore[arg-type]  # a 2-D stack is validated at once
            n_params=n_params, max_norm=self.plan.max_update_norm, weights=weights,
        )  # fmt: skip
        accepted, rejected = result.accepted_indices, result.rejected
        self.last_anomalies = None
        if len(rows) == 0:
            return Outcome.skip("no_updates", accepted, rejected)
        if not accepted:
            return Outcome.skip("all_rejected", accepted, rejected)
        if isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.dtype.kind == "f":
            stack = rows[accepted].astype(np.float64, copy=False)  # a cohort's stack, at once
        else:
            stack = stack_accepted(rows, result)  # type: ignore[arg-type]
        if isinstance(weights, np.ndarray):
            w = weights[accepted].astype(np.float64)
        else:
            w = np.array([float(weights[i]) for i in accepted], dtype=np.float64)  # type: ignore[arg-type]
        used = np.arange(len(accepted))
        info: dict[str, Any] = {}
        if self.anomaly_threshold is not None:
            used = self._filter(stack, used)
        stack, w = stack[used], w[used]
        info["n_used"] = len(used)
        if self.clip is not None:
            stack, bound, n_clipped = self._clip(stack)
            info.update(clip_bound=bound, n_clipped=n_clipped)
        return self._rule(state, stack, w, [accepted[i] for i in used], accepted, rejected,
                          rnd, server_update, info)  # fmt: skip

    def _filter(self, stack: np.ndarray, used: np.ndarray) -> np.ndarray:
        report = detect_anomalies(stack, threshold=self.anomaly_threshold)  # type: ignore[arg-type]
        self.last_anomalies = report
        if not self.drop_flagged:
            return used
        return used[~np.asarray(report.flagged, dtype=bool)]

    def _clip(self, stack: np.ndarray) -> tuple[np.ndarray, float, int]:
        norms = np.linalg.norm(stack, axis=1)
        bound = float(np.median(norms)) if self.clip == "median" else float(self.clip)  # type: ignore[arg-type]
        clipped, _, over = agg.clip_rows(stack, bound)
        return clipped, bound, int(over.sum())

    def _rule(
        self, state: ServerState, stack: np.ndarray, w: np.ndarray, positions: list[int],
        accepted: list[int], rejected: list[tuple[int, str]], rnd: int,
        server_update: np.ndarray | None, info: dict[str, Any],
    ) -> Outcome:  # fmt: skip
        plan = self.plan
        name, params = plan.aggregator, plan.aggregator_params
        if len(positions) < plan.min_updates:
            if self.too_few == "skip" or not positions:
                return Outcome.skip("too_few_updates", accepted, rejected)
            info["note"] = f"{name} needs {plan.min_updates} updates; {len(positions)} kept: fedavg"
            name, params = "fedavg", {}
        spec = agg.AGGREGATORS[name]
        if spec.uses_weights and not w.sum() > 0:
            return Outcome.skip("zero_weight", accepted, rejected)
        if "server_update" in spec.needs and server_update is None:
            if self.root is None:
                raise UsageError(
                    f"The {name} aggregator needs the server's update on its root data "
                    "(server_update=...); compute it with privml.fl.stages.local.root_update."
                )
            server_update = self.root(rnd, torch.from_numpy(state.params))
        context = agg.AggregationContext(center=state.center, server_update=server_update)
        res = agg.aggregate(name, stack, weights=w if spec.uses_weights else None,
                            params=params, context=context)  # fmt: skip
        selected = (
            None if res.selected is None
            else [positions[i] for i in np.flatnonzero(res.selected)]
        )  # fmt: skip
        info.update(_scalar_info(res.info))
        return Outcome(res.update, accepted, rejected, selected=selected, info=info)


@dataclass(frozen=True)
class RoundOutcome:
    """The server's result of one round of :func:`aggregate_round` (state after it, and the
    combine step's :class:`~privml.fl.rounds.Outcome` fields)."""

    state: ServerState
    update: NDArray[np.float64] | None
    accepted: list[int]
    rejected: list[tuple[int, str]]
    counts: dict[str, Any]
    selected: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def aggregate_round(
    state: ServerState,
    updates: Sequence[object] | np.ndarray,
    weights: Sequence[object] | np.ndarray,
    *,
    plan: ServerPlan,
    server_update: np.ndarray | None = None,
) -> RoundOutcome:
    """One server round on plain updates: validate, aggregate the accepted ones with the plan's
    rule, step the server optimizer (the ``combine`` and ``optimize`` steps of a round).

    Args:
        state: the server state before the round (:func:`init_server_state` for round 1).
        updates: one entry per client that reported: ideally a float ``[n_params]`` numpy
            array (its new parameters minus ``state.params``). Anything else is untrusted
            input: it is rejected with a reason, counted, and never averaged in.
        weights: one self-reported weight per update (its number of training records);
            FedAvg and norm bounding weight by it, robust rules ignore it.
        plan: the run's :class:`ServerPlan`.
        server_update: FLTrust's server update on its root data
            (:func:`privml.fl.stages.local.root_update`); required for ``fltrust``.

    Raises:
        UsageError: ``weights`` of the wrong length, or fltrust without ``server_update``.
    """
    from privml.fl.stages.optimizer import ServerOptimizerStep

    outcome = CheckedAggregation(plan).combine(state, updates, weights, state.round + 1,
                                               server_update)  # fmt: skip
    new = ServerOptimizerStep(plan.optimizer)(state, outcome)
    return RoundOutcome(
        new, outcome.update, outcome.accepted, outcome.rejected, outcome.counts(),
        outcome.selected, outcome.info, outcome.skipped,
    )  # fmt: skip
