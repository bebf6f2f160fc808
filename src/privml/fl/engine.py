"""The in-process federated simulation engine (the default engine).

Each round: sample a cohort of sites, train each site locally from the global model (all sites
in one vectorized computation, :mod:`privml.fl.local`), turn the results into updates, check
every update, aggregate them with a pure function from :mod:`privml.fl.aggregate`, and evaluate.
Deterministic for a seed: initialisation, cohort sampling and every site's batches are drawn
from generators seeded with ``(seed, round, site)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.config import TrainingConfig
from privml.data.federation import FederatedData, SiteData
from privml.fl import aggregate as agg
from privml.fl.local import CohortData, GradientRule, MeanGradient, train_cohort
from privml.fl.metrics import evaluate
from privml.models.nets import ModelSpec, build_model, flat_params


@dataclass
class RoundRecord:
    round: int
    loss: float | None
    accuracy: float | None
    auc: float | None
    clients: int
    rejected: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainingResult:
    """What a federated run produced. ``params`` is the final global model (flat float32)."""

    spec: ModelSpec
    model: nn.Module
    params: torch.Tensor
    history: list[RoundRecord]
    metrics: dict[str, Any]
    rejected_updates: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def init_params(spec: ModelSpec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Build the model and its initial flat parameters from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    return model, flat_params(model)


def sample_cohort(n_sites: int, training: TrainingConfig, rnd: int) -> np.ndarray:
    """Indices of the sites taking part in round ``rnd`` (sampling, then dropouts)."""
    rng = np.random.default_rng([training.seed, rnd, 1])
    k = min(training.clients_per_round or n_sites, n_sites)
    chosen = (
        np.sort(rng.choice(n_sites, size=k, replace=False)) if k < n_sites else np.arange(n_sites)
    )
    if training.dropout > 0:
        keep = rng.random(len(chosen)) >= training.dropout
        if not keep.any():
            keep[rng.integers(len(chosen))] = True
        chosen = chosen[keep]
    return chosen


def local_updates(
    model: nn.Module,
    params: torch.Tensor,
    sites: list[SiteData],
    *,
    training: TrainingConfig,
    rnd: int,
    site_ids: np.ndarray,
    rule: GradientRule,
    prox_mu: float = 0.0,
) -> np.ndarray:
    """Train ``sites`` from ``params`` and return their updates ``[S, P]`` (new - global)."""
    data = CohortData.from_arrays([s.X_train for s in sites], [s.y_train for s in sites])
    rngs = [np.random.default_rng([training.seed, rnd, 2, int(i)]) for i in site_ids]
    new = train_cohort(
        params,
        data,
        rule=rule,
        lr=training.lr,
        batch_size=training.batch_size,
        epochs=training.local_epochs,
        rngs=rngs,
        prox_mu=prox_mu,
    )
    return (new - params.reshape(1, -1)).numpy().astype(np.float64)


def simulate(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> TrainingResult:
    """Run federated training in this process and return the final model and its history."""
    model, params = init_params(spec, training.seed)
    binary = fed.task.kind == "binary"
    rule = MeanGradient(model, spec, binary=binary)
    X_test, y_test = fed.pooled_test()
    history: list[RoundRecord] = []
    rejected_total = 0
    for rnd in range(1, training.rounds + 1):
        t0 = time.perf_counter()
        ids = sample_cohort(len(fed.sites), training, rnd)
        cohort = [fed.sites[i] for i in ids]
        updates = local_updates(
            model, params, cohort, training=training, rnd=rnd, site_ids=ids, rule=rule
        )
        weights = np.array([s.n_train for s in cohort], dtype=np.float64)
        ok = np.isfinite(updates).all(axis=1)
        if training.max_update_norm is not None:
            ok &= np.linalg.norm(updates, axis=1) <= training.max_update_norm
        rejected_total += int((~ok).sum())
        if ok.any():
            delta = agg.fedavg(updates[ok], weights[ok])
            params = params + torch.from_numpy(delta.astype(np.float32))
        ev = evaluate(model, params, X_test, y_test)
        rec = RoundRecord(
            rnd,
            ev["loss"],
            ev["accuracy"],
            ev["auc"],
            len(ids),
            int((~ok).sum()),
            time.perf_counter() - t0,
        )
        history.append(rec)
        if on_round is not None:
            on_round(rec)
    metrics = evaluate(model, params, X_test, y_test)
    metrics["per_site"] = {s.name: evaluate(model, params, s.X_test, s.y_test) for s in fed.sites}
    return TrainingResult(spec, model, params, history, metrics, rejected_total)
