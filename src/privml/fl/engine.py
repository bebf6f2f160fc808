"""The in-process simulation engine (the default engine).

:class:`SimulationEngine` runs the site side of every round (local update, site transforms,
accounting, sealing: :class:`~privml.fl.rounds.SitePipeline`) for the whole cohort in one
vectorized computation (:mod:`privml.models.training`), and evaluates the global model on the
sites' pooled held-out records. The rounds themselves are :func:`privml.fl.rounds.run_rounds`,
the same loop the Flower engine runs.

Memory grows with the cohort times the model size (stacked parameters and updates exist for
the cohort only); every site's data stays in its own arrays. Stragglers are not computed:
their update would arrive after the round closed and be discarded (synchronous rounds with a
deadline), so the model is the same as if they had trained and been ignored; a stage that
accounts for their training still books it (:attr:`~privml.fl.rounds.SiteUpdates.late`).

:func:`simulate` is the whole non-private run in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from privml.data.federation import FederatedData, SiteData
from privml.errors import UsageError
from privml.fl.checkpoint import ServerState
from privml.fl.metrics import per_site_metrics, pooled_metrics, round_metrics
from privml.fl.plan import Run, build_run
from privml.fl.rounds import Cohort, Received, RoundRecord, SitePipeline, restore, run_rounds
from privml.fl.stages.attack import Poison
from privml.models.nets import ModelSpec
from privml.models.training import GradientRule

__all__ = ["SimulationEngine", "TrainingResult", "simulate", "torch_threads"]


@dataclass
class TrainingResult:
    """What a federated run produced. ``params`` is the final global model (flat float32).

    ``extra`` holds the results.json sections the engine owns: ``updates`` (accepted, rejected
    by reason, dropped, stragglers, skipped rounds), ``federation`` (what was run) and
    ``attack`` (what was simulated, or None).
    """

    spec: ModelSpec
    model: nn.Module
    params: torch.Tensor
    history: list[RoundRecord]
    metrics: dict[str, Any]
    rejected_updates: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def torch_threads(spec: ModelSpec) -> Iterator[None]:
    """Run the linear-stack models (logistic, MLP) on one torch intra-op thread, restored after.

    Their per-step tensors are tiny (cohort x batch x features): splitting each op over threads
    costs more than it saves, and on a busy machine it made rounds about 10x slower here.
    CNNs keep torch's setting.
    """
    if spec.kind not in ("logistic", "mlp"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class SimulationEngine:
    """Every site in this process: the site side runs for the whole cohort at once.

    Args:
        pipeline: the site side of a round.
        model: the architecture (evaluation).
        test_sites: the sites whose held-out records measure the model.
    """

    name = "simulation"

    def __init__(self, pipeline: SitePipeline, model: nn.Module, test_sites: list[SiteData]):
        self.pipeline = pipeline
        self.model = model
        self.test_sites = test_sites
        self.X_test = np.concatenate([s.X_test for s in test_sites])
        self.y_test = np.concatenate([s.y_test for s in test_sites])
        self.site_sizes = [(s.name, s.n_test) for s in test_sites]

    def train(self, rnd: int, state: ServerState, cohort: Cohort) -> Received:
        ids = cohort.participants
        batch = self.pipeline.run(rnd, torch.from_numpy(state.params), ids, late=cohort.stragglers)
        return Received(ids, batch.updates, batch.weights, batch.malicious,
                        sealed=batch.sealed, info=batch.info, asked=len(ids))  # fmt: skip

    def evaluate(self, params: NDArray[np.float32]) -> dict[str, Any]:
        return round_metrics(self.model, torch.from_numpy(params), self.X_test, self.y_test,
                             self.site_sizes)  # fmt: skip

    def settle(self) -> None:
        return None

    def finish(self, params: NDArray[np.float32]) -> dict[str, Any]:
        final = torch.from_numpy(params.copy())
        metrics = pooled_metrics(self.model, final, self.X_test, self.y_test)
        metrics["per_site"] = per_site_metrics(self.model, final, self.test_sites)
        return metrics


def run_simulation(
    run: Run,
    *,
    resume: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> TrainingResult:
    """Run ``run``'s rounds in this process (from its checkpoint with ``resume``)."""
    state, history, tally, resumed_after = run.state, None, None, None
    if resume:
        if run.plan.checkpoint is None:
            raise UsageError("simulate(resume=True) needs the checkpoint_dir to resume from.")
        ck = run.plan.checkpoint.load()  # type: ignore[attr-defined]
        state, resumed_after = ck.state, ck.state.round
        history, tally = restore(ck.meta, run.plan)
    engine = SimulationEngine(run.pipeline, run.model, run.fed.sites)
    with torch_threads(run.spec):
        out = run_rounds(run.plan, engine, state, history=history, tally=tally, on_round=on_round)
    federation = {"engine": "simulation", **run.federation, "resumed_after_round": resumed_after}
    sections = {k: f() for k, f in run.sections.items()}
    federation["secure_aggregation"] = sections.pop("secure_aggregation", None)
    if sections.get("privacy", {}).get("mode", "none") == "client":
        federation["aggregator"] = "dp-fedavg"
    extra = {
        "updates": {**out.tally.to_dict(), "max_update_norm": run.server.max_update_norm},
        "federation": federation,
        "attack": sections.pop("attack", None),
        **sections,
    }
    params = run.finalize(run.model, torch.from_numpy(out.state.params.copy()))
    return TrainingResult(run.spec, run.wrap(run.model), params, out.history, out.metrics,
                          out.tally.rejected, extra)  # fmt: skip


def simulate(
    fed: FederatedData,
    spec: ModelSpec,
    training: Any,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    attack: Any | None = None,
    poison: Poison | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    rule: GradientRule | None = None,
) -> TrainingResult:
    """Run federated training in this process and return the final model and its history.

    Args:
        fed: every site's encoded records.
        spec: the model architecture.
        training: the ``[training]`` settings (rounds, local SGD, sampling, aggregator, ...).
        on_round: called after each round (after its checkpoint is written).
        attack: simulated Byzantine sites (``[attack]``), or None.
        poison: the backdoor's data poisoning for ``[attack] kind = "backdoor"``
            (:func:`privml.security.attacks.backdoor.backdoor_poison`).
        checkpoint_dir: where to write the server state after every round (atomically);
            None writes no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` (which must come from a
            run with the same fingerprint: settings, attack, model and data).
        rule: the local gradient rule; None is plain SGD.

    Raises:
        ConfigError: attack sites or FLTrust root settings that do not fit the data, or a
            checkpoint of another run.
        UsageError: ``resume`` without ``checkpoint_dir`` or without a checkpoint.
    """
    if resume and checkpoint_dir is None:
        raise UsageError("simulate(resume=True) needs the checkpoint_dir to resume from.")
    run = build_run(fed, spec, training, attack=attack, poison=poison, rule=rule,
                    checkpoint_dir=checkpoint_dir)  # fmt: skip
    return run_simulation(run, resume=resume, on_round=on_round)


# --------------------------------------------------------------------------------------------
# Names the private-training module still imports from here; they move with it onto the
# round engine's stages.
# --------------------------------------------------------------------------------------------

from privml.fl.plan import init_params as init_params  # noqa: E402
from privml.fl.stages.aggregate import ServerPlan as ServerPlan  # noqa: E402
from privml.fl.stages.aggregate import aggregate_round as aggregate_round  # noqa: E402
from privml.fl.stages.aggregate import init_server_state as init_server_state  # noqa: E402
from privml.fl.stages.cohort import cohort_size as cohort_size  # noqa: E402
from privml.fl.stages.local import DEFAULT_PROX_MU as DEFAULT_PROX_MU  # noqa: E402


def plan_round(n_sites: int, training: Any, rnd: int) -> Cohort:
    """Round ``rnd``'s cohort under uniform sampling (:class:`UniformCohort`)."""
    from privml.fl.stages.cohort import UniformCohort

    return UniformCohort.from_training(n_sites, training)(rnd)


def local_updates(
    model: nn.Module, params: torch.Tensor, sites: list[SiteData], *, training: Any, rnd: int,
    site_ids: np.ndarray, rule: GradientRule, prox_mu: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """Updates ``[S, P]`` of ``sites`` (the sites ``site_ids``) from ``params``."""
    from privml.fl.stages.local import LocalTraining

    by_index = {int(i): s for i, s in zip(site_ids, sites, strict=True)}
    t = training.model_copy(update={"strategy": "fedprox", "prox_mu": prox_mu}) if prox_mu else (
        training.model_copy(update={"strategy": "fedavg", "prox_mu": None}))  # fmt: skip
    return LocalTraining(by_index, t, rule)(rnd, params, np.asarray(site_ids, dtype=np.int64))
