"""Update anomaly detection: flag client updates whose norm or direction is an outlier.

Each round, for the ``[n_clients, n_params]`` stack of updates:

* **norm outliers** -- the robust z-score of ``log ||u_i||`` (median and scaled median
  absolute deviation over the round's clients) above ``threshold``: boosted updates (model
  replacement, Bagdasaryan et al. 2020; the ``scale`` attack) have norms many times the
  honest ones. Unusually small norms are flagged too when ``flag_small`` is set (free riders).
* **cosine outliers** -- the cosine similarity of each update to the coordinate-wise median
  update (a reference the attackers cannot move while they are a minority), with a robust
  z-score below ``-threshold``: sign flips, noise and data-poisoned sites whose training
  pulls elsewhere (a backdoor's trigger features) point away from the honest majority.

The median absolute deviation is floored at ``min_scale`` so that a round of nearly identical
honest updates does not flag tiny differences. The result names every flagged client and why;
engines record it per round and may drop flagged updates before aggregation
(:func:`filter_flagged`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from privml.errors import UsageError
from privml.fl.aggregate import _check_float

__all__ = ["AnomalyRates", "AnomalyReport", "anomaly_rates", "detect_anomalies", "filter_flagged"]

_MAD_TO_SD = 1.4826


@dataclass
class AnomalyReport:
    """One round's anomaly scores and flags (lists indexed like the update stack)."""

    norms: list[float]
    cosines: list[float]
    norm_z: list[float]
    cosine_z: list[float]
    flagged: list[bool]
    reasons: list[list[str]]
    threshold: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_flagged(self) -> int:
        return int(sum(self.flagged))

    @property
    def flagged_indices(self) -> list[int]:
        return [i for i, f in enumerate(self.flagged) if f]

    def to_dict(self) -> dict[str, Any]:
        return {
            "flagged": self.flagged_indices,
            "reasons": {str(i): r for i, r in enumerate(self.reasons) if r},
            "norms": self.norms,
            "cosines": self.cosines,
            "threshold": self.threshold,
            **self.extra,
        }


def _robust_z(x: NDArray[np.float64], min_scale: float) -> NDArray[np.float64]:
    med = np.median(x)
    mad = np.median(np.abs(x - med)) * _MAD_TO_SD
    return (x - med) / max(mad, min_scale)


def detect_anomalies(
    updates: ArrayLike,
    *,
    threshold: float = 3.0,
    min_scale: float = 0.05,
    flag_small: bool = False,
) -> AnomalyReport:
    """Flag outlying client updates by norm and by direction (see the module docstring).

    Args:
        updates: ``[n_clients, n_params]`` finite updates.
        threshold: robust z-score beyond which a client is flagged, > 0 (3.0: about 0.3% of
            Gaussian honest clients flagged by each test).
        min_scale: floor of the robust scale, > 0, in the units of log-norm and cosine.
        flag_small: also flag unusually small norms.

    Returns:
        :class:`AnomalyReport`. With fewer than 3 clients nothing is flagged (no majority).
    """
    where = "detect_anomalies"
    thr = _check_float(threshold, name="threshold", rule=where, low=0.0, low_open=True)
    ms = _check_float(min_scale, name="min_scale", rule=where, low=0.0, low_open=True)
    try:
        stack = np.asarray(updates, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"The 'updates' parameter of {where} must be numeric ({exc}).") from None
    if stack.ndim != 2 or stack.shape[0] == 0:
        raise UsageError(
            f"The 'updates' parameter of {where} must be a non-empty [n_clients, n_params] "
            f"stack. Got shape {stack.shape} instead."
        )
    if not np.isfinite(stack).all():
        raise UsageError(
            f"The 'updates' given to {where} contain NaN or Inf; reject them first with "
            "privml.fl.validate.validate_updates."
        )
    n = stack.shape[0]
    norms = np.linalg.norm(stack, axis=1)
    ref = np.median(stack, axis=0)
    ref_norm = np.linalg.norm(ref)
    denom = np.maximum(norms * ref_norm, 1e-12)
    cos = (stack @ ref) / denom if ref_norm > 0 else np.zeros(n)
    if n < 3:
        zeros = [0.0] * n
        return AnomalyReport(
            norms.tolist(), cos.tolist(), zeros, zeros, [False] * n, [[] for _ in range(n)], thr,
            {"note": "fewer than 3 updates: no majority to compare with"},
        )  # fmt: skip
    nz = _robust_z(np.log(np.maximum(norms, 1e-12)), ms)
    cz = _robust_z(cos, ms)
    reasons: list[list[str]] = [[] for _ in range(n)]
    for i in range(n):
        if nz[i] > thr:
            reasons[i].append("norm_high")
        if flag_small and nz[i] < -thr:
            reasons[i].append("norm_low")
        if cz[i] < -thr:
            reasons[i].append("direction")
    flagged = [bool(r) for r in reasons]
    # Never flag a majority: outliers are, by definition, the minority.
    if sum(flagged) * 2 >= n:
        score = np.maximum(nz, -cz)
        keep = np.argsort(-score)[: (n - 1) // 2]
        flagged = [i in set(keep.tolist()) and bool(reasons[i]) for i in range(n)]
    return AnomalyReport(
        norms.tolist(), cos.tolist(), nz.tolist(), cz.tolist(), flagged, reasons, thr
    )


def filter_flagged(updates: ArrayLike, report: AnomalyReport) -> NDArray[np.bool_]:
    """Boolean mask of the updates to keep (the unflagged ones)."""
    stack = np.asarray(updates)
    if stack.shape[0] != len(report.flagged):
        raise UsageError(
            f"filter_flagged: the report covers {len(report.flagged)} updates, the stack has "
            f"{stack.shape[0]}."
        )
    return ~np.asarray(report.flagged, dtype=bool)


@dataclass
class AnomalyRates:
    """How the anomaly filter did over a run: honest updates flagged (false positives) and
    malicious updates flagged (detections)."""

    honest_updates: int
    honest_flagged: int
    malicious_updates: int
    malicious_flagged: int

    @property
    def false_positive_rate(self) -> float | None:
        return self.honest_flagged / self.honest_updates if self.honest_updates else None

    @property
    def detection_rate(self) -> float | None:
        return self.malicious_flagged / self.malicious_updates if self.malicious_updates else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "false_positive_rate": self.false_positive_rate,
                "detection_rate": self.detection_rate}  # fmt: skip


def anomaly_rates(rounds: Iterable[Mapping[str, Any]]) -> AnomalyRates:
    """False-positive and detection rates of the anomaly filter from a federated run's
    per-round records (``clients``, ``malicious``, ``flagged_honest``, ``flagged_malicious``;
    :class:`privml.security.federated.FederatedRun` ``.rounds``)."""
    hu = hf = mu = mf = 0
    for r in rounds:
        mal = int(r.get("malicious", 0))
        hu += int(r.get("clients", 0)) - mal
        mu += mal
        hf += int(r.get("flagged_honest", 0))
        mf += int(r.get("flagged_malicious", 0))
    return AnomalyRates(hu, hf, mu, mf)
