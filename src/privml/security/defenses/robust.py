"""Server-side defences against malicious updates, composed in one fixed order.

:class:`Defence` says which of them a server applies to a round's stack of updates, and
:func:`defend` applies them:

1. **update anomaly detection** (:mod:`privml.security.defenses.anomaly`): flagged updates
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
from privml.security._checks import check_float
from privml.security.defenses.anomaly import AnomalyReport, detect_anomalies

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
    rng: np.random.Generator,
) -> DefenceOutcome:
    """Apply ``defence`` to a round's ``[n, P]`` update stack; return the aggregate update.

    Args:
        updates: the round's client updates (new - global parameters).
        weights: ``[n]`` sample counts (used by FedAvg only).
        defence: what to apply.
        rng: generator of the weak-DP noise (seed it from the run's seed and round).
    """
    stack = np.asarray(updates, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    n = stack.shape[0]
    kept = np.ones(n, dtype=bool)
    report = None
    if defence.anomaly_threshold is not None:
        report = detect_anomalies(stack, threshold=defence.anomaly_threshold)
        if defence.drop_flagged:
            kept &= ~np.asarray(report.flagged, dtype=bool)
    use = stack[kept]
    bound = None
    n_clipped = 0
    if defence.clip is not None:
        norms = np.linalg.norm(use, axis=1)
        bound = float(np.median(norms)) if defence.clip == "median" else float(defence.clip)
        over = norms > bound
        n_clipped = int(over.sum())
        factor = np.ones_like(norms)
        factor[over] = bound / np.maximum(norms[over], 1e-300)
        use = use * factor[:, None]
    need = agg.min_clients(defence.aggregator, dict(defence.aggregator_params))
    rule = defence.aggregator if use.shape[0] >= need else "fedavg"
    result = agg.aggregate(
        rule, use, weights=w[kept], params=dict(defence.aggregator_params) if rule != "fedavg"
        else None,
    )  # fmt: skip
    update = result.update
    info: dict[str, Any] = {"aggregator": rule}
    if rule != defence.aggregator:
        info["note"] = f"{defence.aggregator} needs {need} updates; {use.shape[0]} kept: fedavg"
    if defence.noise_multiplier > 0 and bound is not None:
        std = defence.noise_multiplier * bound / max(use.shape[0], 1)
        update = update + rng.normal(0.0, std, size=update.shape)
        info["noise_std"] = std
    return DefenceOutcome(update, kept, report, bound, n_clipped, info)
