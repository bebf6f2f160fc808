"""The round loop: one function, :func:`run_rounds`, runs every federated round of privml.

Start reading here. A round is a fixed list of steps; each mechanism (FedProx, DP-SGD, a
simulated attacker, Paillier, a robust rule, client-level DP, ...) is a *stage* that takes part
in some of them. Stages are small classes under :mod:`privml.fl.stages`; which stages a run
uses is decided once, from the config, by :mod:`privml.fl.plan`, after the compatibility table
(:mod:`privml.fl.compat`) has accepted the combination. The steps, in order::

    for each round r:
      1. cohort        who takes part: uniform sample, or Poisson (client-level DP);
                       dropouts and stragglers                         (server)
      2. local update  SGD | FedProx | DP-SGD from the global model      (each site)
      3. site          simulated attacker, clipping, noise share       (each site)
      4. accounting    the site books its privacy cost in its ledger,
                       before its update leaves                         (each site)
      5. seal          encrypt the update (Paillier, CKKS)              (each site)
      6. combine       secure aggregation: sum of ciphertexts, decrypted
                       by the key holder; or validation, anomaly filter
                       and the robust rule on plain updates            (server)
      7. central noise client-level DP's Gaussian noise on the sum      (server)
      8. optimize      the server optimizer applies the update         (server)
      9. record        metrics, round record, checkpoint               (server)

Steps 2 to 5 run *at the sites*. The engine decides how: the in-process simulation
(:mod:`privml.fl.engine`) runs them for the whole cohort in one vectorized computation; the
Flower engine (:mod:`privml.fl.flower`) sends each site a message and the site runs the same
stages on its own records (:class:`SitePipeline`). Steps 1 and 6 to 9 run on the server, the
same code on both engines. So a site computes the same update, and the server the same model,
whichever engine runs the round.

Everything a stage needs across rounds (the server optimizer's moments, an adaptive clip, the
privacy booked so far) is in the :class:`ServerState` or in the stage's own
``state_dict()``; both go into each round's checkpoint, so a run resumed after a crash continues
exactly where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from privml.errors import PrivmlError
from privml.fl.checkpoint import ServerState
from privml.fl.validate import REJECTION_REASONS

__all__ = [
    "ENGINES",
    "STEPS",
    "Cohort",
    "Engine",
    "Outcome",
    "Received",
    "RoundRecord",
    "RoundsPlan",
    "RoundsResult",
    "ServerStage",
    "SitePipeline",
    "SiteStage",
    "SiteUpdates",
    "Tally",
    "TooFewSites",
    "run_rounds",
]

MAX_MISSED_RECORDED = 1000
"""A round record lists the sites that missed it (by cause) up to this many; beyond, only the
counts (``dropped``, ``stragglers``) are kept."""


class TooFewSites(PrivmlError, RuntimeError):
    """A round closed with fewer site updates than ``training.min_sites_per_round``, and the
    engine could not get enough of them (exit code 2)."""

    exit_code = 2


ENGINES: tuple[str, ...] = ("simulation", "flower")
"""The engines that run rounds: in-process (default) and Flower (across machines)."""

STEPS: tuple[str, ...] = (
    "cohort",
    "local update",
    "site",
    "accounting",
    "seal",
    "combine",
    "central noise",
    "optimize",
    "record",
)
"""The steps of a round, in order (see the module docstring)."""

SITE_STEPS: tuple[str, ...] = ("local update", "site", "accounting", "seal")
"""The steps that run at the sites."""


# --------------------------------------------------------------------------------------------
# What flows through a round
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cohort:
    """Who takes part in a round: site indices (ascending) sampled, dropped out, straggling.

    Dropped sites never train; stragglers train but their update arrives after the round
    closed and is discarded (synchronous rounds), so they pay for it but it is not used.
    """

    sampled: NDArray[np.int64]
    dropped: NDArray[np.int64]
    stragglers: NDArray[np.int64]

    @property
    def trained(self) -> NDArray[np.int64]:
        """The sampled sites that trained (stragglers included)."""
        return np.setdiff1d(self.sampled, self.dropped, assume_unique=True)

    @property
    def participants(self) -> NDArray[np.int64]:
        """The sampled sites whose updates reach the server this round."""
        return np.setdiff1d(self.trained, self.stragglers, assume_unique=True)


@dataclass
class SiteUpdates:
    """What the site side of a round works on, for a batch of sites (one row per site).

    In simulation the batch is the whole cohort; on Flower it is the one site that got the
    message. Site stages change ``updates`` in place (an attacker rewrites its row, clipping
    scales rows) or fill ``sealed`` (secure aggregation: then only ``sealed`` leaves the site).

    Attributes:
        rnd: the round number (1-based).
        ids: site indices in the config's site order, ``[S]``.
        params: the global parameters the sites started from (flat float32).
        updates: new parameters minus ``params``, float64 ``[S, P]``.
        weights: each site's weight (training-record count), float64 ``[S]``.
        malicious: which rows belong to simulated attackers, ``[S]``.
        sealed: the encrypted updates (one ``bytes`` per row) once a seal stage ran.
        late: sites that train this round but whose update arrives after the round closed
            (simulated stragglers): the simulator does not compute their update, but they
            book what they spent.
        asked: how many sites the server asked for an update this round (a noise share is
            sized by it).
        info: per-round facts stages want in the record (JSON data).
    """

    rnd: int
    ids: NDArray[np.int64]
    params: torch.Tensor
    updates: NDArray[np.float64]
    weights: NDArray[np.float64]
    malicious: NDArray[np.bool_]
    sealed: list[bytes] | None = None
    late: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    asked: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Received:
    """What reached the server from a round's participants (untrusted on Flower).

    ``updates``: a float ``[n, P]`` array (simulation) or one object per reply (Flower; the
    combine step validates each). ``sealed`` replaces ``updates`` under secure aggregation.
    ``ids``: the site index of each entry. ``malicious``: which entries came from simulated
    attackers (the engine knows; used for records only). ``missing``: participants whose
    reply did not come (Flower: timed out or failed), counted by cause; ``missed``: the same
    participants, site index -> cause (``timed_out``, ``site_error``). ``asked``: how many
    sites were asked for an update.
    """

    ids: NDArray[np.int64]
    updates: Sequence[object] | NDArray[np.float64]
    weights: Sequence[object] | NDArray[np.float64]
    malicious: NDArray[np.bool_]
    sealed: Sequence[object] | None = None
    missing: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    asked: int = 0
    missed: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Outcome:
    """The server's result of combining one round's updates.

    Attributes:
        update: the aggregated update (float64 ``[P]``), None when the round is skipped.
        accepted: indices (into the received entries) that were used.
        rejected: ``(index, reason)`` pairs, reasons from
            :data:`privml.fl.validate.REJECTION_REASONS`.
        selected: indices a selecting rule kept (Krum, Bulyan, FLTrust), else None.
        skipped: why the model does not change this round, or None.
        info: the stage's scalar details (JSON data).
    """

    update: NDArray[np.float64] | None
    accepted: list[int]
    rejected: list[tuple[int, str]]
    selected: list[int] | None = None
    skipped: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        by_reason = dict.fromkeys(REJECTION_REASONS, 0)
        for _, reason in self.rejected:
            by_reason[reason] += 1
        return {"accepted": len(self.accepted), "rejected": len(self.rejected),
                "by_reason": by_reason}  # fmt: skip

    @classmethod
    def skip(
        cls, reason: str, accepted: list[int] | None = None,
        rejected: list[tuple[int, str]] | None = None,
    ) -> Outcome:  # fmt: skip
        return cls(None, accepted or [], rejected or [], skipped=reason)


@dataclass
class RoundRecord:
    """What happened in one round (a row of results.json ``rounds``).

    ``clients`` is the number of updates the server received; ``sampled``, ``dropped`` and
    ``stragglers`` count the cohort before that (``dropped`` includes, on Flower, sites that
    did not answer); ``rejected`` the updates validation refused; ``selected`` how many
    updates a selecting rule (Krum, Multi-Krum, Bulyan, FLTrust) kept; ``malicious`` the
    simulated attackers among the clients and ``malicious_selected`` those the rule kept;
    ``skipped`` why the model did not change this round (None when it did); ``per_site`` each
    site's own test metrics after the round; ``missed`` the sampled sites whose update did
    not reach the server, by cause (``dropped`` and ``straggler``: simulated by the config;
    ``timed_out``, ``site_error``: on Flower, a site that did not answer or failed), as site
    indices in the config's order (None beyond :data:`MAX_MISSED_RECORDED` sites);
    ``attempts`` how many times the round was sent (more than 1 when it was retried for
    ``min_sites_per_round``).
    """

    round: int
    loss: float | None
    accuracy: float | None
    auc: float | None
    clients: int
    rejected: int
    seconds: float
    sampled: int = 0
    dropped: int = 0
    stragglers: int = 0
    malicious: int = 0
    selected: int | None = None
    malicious_selected: int | None = None
    skipped: str | None = None
    per_site: dict[str, dict[str, Any]] | None = None
    """site -> ``loss``, ``accuracy``, ``auc`` on its own test records (the per-site learning
    curves); None when not evaluated (more than ``fl.metrics.MAX_SITES_PER_ROUND`` sites)."""
    missed: dict[str, list[int]] | None = field(default_factory=dict)
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Tally:
    """Update counts over the whole run (results.json ``updates``); ``dropped`` is the sum of
    the rounds' ``dropped`` (simulated dropouts, and on Flower the sites that did not answer,
    also counted by cause: ``timed_out``, ``site_errors``)."""

    accepted: int = 0
    rejected: int = 0
    by_reason: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECTION_REASONS, 0))
    dropped: int = 0
    stragglers: int = 0
    skipped_rounds: dict[str, list[int]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)

    def add(self, rnd: int, cohort: Cohort, received: Received, outcome: Outcome) -> None:
        counts = outcome.counts()
        self.accepted += counts["accepted"]
        self.rejected += counts["rejected"]
        for reason, c in counts["by_reason"].items():
            self.by_reason[reason] += c
        # as the round record counts it: simulated dropouts and sites that did not answer
        self.dropped += len(cohort.dropped) + sum(received.missing.values())
        self.stragglers += len(cohort.stragglers)
        for cause, c in received.missing.items():
            self.missing[cause] = self.missing.get(cause, 0) + c
        if outcome.skipped:
            self.skipped_rounds.setdefault(outcome.skipped, []).append(rnd)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "accepted": self.accepted,
            "rejected": self.rejected,
            "by_reason": dict(self.by_reason),
            "dropped": self.dropped,
            "stragglers": self.stragglers,
            "skipped_rounds": {k: list(v) for k, v in self.skipped_rounds.items()},
        }
        out.update(self.missing)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tally:
        known = {"accepted", "rejected", "by_reason", "dropped", "stragglers", "skipped_rounds"}
        return cls(
            accepted=int(d["accepted"]),
            rejected=int(d["rejected"]),
            by_reason={**dict.fromkeys(REJECTION_REASONS, 0), **d["by_reason"]},
            dropped=int(d["dropped"]),
            stragglers=int(d["stragglers"]),
            skipped_rounds={k: list(v) for k, v in d["skipped_rounds"].items()},
            missing={k: int(v) for k, v in d.items() if k not in known},
        )


# --------------------------------------------------------------------------------------------
# Stages and engines
# --------------------------------------------------------------------------------------------


class SiteStage(Protocol):
    """A stage that runs at the sites: ``step`` is one of :data:`SITE_STEPS` after the local
    update (``"site"``, ``"accounting"`` or ``"seal"``). ``apply`` changes ``batch`` in place."""

    step: str

    def apply(self, batch: SiteUpdates) -> None: ...


class LocalUpdate(Protocol):
    """The local update rule (step ``"local update"``): the updates of the batch's sites, and
    their weights (the number of records each trained on this round)."""

    def __call__(
        self, rnd: int, params: torch.Tensor, ids: NDArray[np.int64]
    ) -> NDArray[np.float64]: ...

    def weights(self, rnd: int, ids: NDArray[np.int64]) -> NDArray[np.float64]: ...


@dataclass
class SitePipeline:
    """The site side of a round: the local update, then the site stages in step order.

    ``malicious[i]`` says whether site ``i`` is a simulated attacker, for every site of the
    config the pipeline may run.
    """

    local: LocalUpdate
    stages: list[SiteStage]
    malicious: NDArray[np.bool_]

    def __post_init__(self) -> None:
        order = {s: i for i, s in enumerate(SITE_STEPS)}
        self.stages = sorted(self.stages, key=lambda s: order[s.step])

    def run(
        self, rnd: int, params: torch.Tensor, ids: NDArray[np.int64],
        late: NDArray[np.int64] | None = None, asked: int | None = None,
    ) -> SiteUpdates:  # fmt: skip
        """Steps 2 to 5 for sites ``ids``, from the global ``params`` (``late``, ``asked``:
        see :class:`SiteUpdates`; ``asked`` defaults to ``len(ids)``)."""
        empty = np.zeros((0, int(params.shape[0])))
        updates = self.local(rnd, params, ids) if len(ids) else empty
        weights = self.local.weights(rnd, ids)
        batch = SiteUpdates(rnd, ids, params, updates, weights, self.malicious[ids])
        if late is not None:
            batch.late = late
        batch.asked = len(ids) if asked is None else int(asked)
        for stage in self.stages:
            stage.apply(batch)
        return batch


class ServerStage(Protocol):
    """A server stage after the combine step (``"central noise"``): maps the outcome."""

    def apply(self, state: ServerState, outcome: Outcome, rnd: int) -> Outcome: ...


class Combine(Protocol):
    """Step ``"combine"``: from what the server received to one update (or a skipped round)."""

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome: ...


class Optimize(Protocol):
    """Step ``"optimize"``: the server optimizer applies the outcome's update."""

    def __call__(self, state: ServerState, outcome: Outcome) -> ServerState: ...


class Engine(Protocol):
    """Where the site side runs, and where the test records are.

    ``train`` runs steps 2 to 5 at the cohort's participants and returns what reached the
    server; ``evaluate`` returns the metrics of ``params`` on the sites' held-out records, or
    None when they come later (Flower: they ride on the next round's messages; ``settle``
    then returns them). ``finish`` evaluates the final model (pooled and per site).
    """

    name: str

    def train(self, rnd: int, state: ServerState, cohort: Cohort) -> Received: ...

    def evaluate(self, params: NDArray[np.float32]) -> dict[str, Any] | None: ...

    def settle(self) -> dict[str, Any] | None: ...

    def finish(self, params: NDArray[np.float32]) -> dict[str, Any]: ...

    # An engine may also define ``retry(rnd, state, cohort, received) -> Received | None``:
    # called when a round got fewer than ``min_sites_per_round`` updates, it waits for the
    # missing sites and sends the round again (Flower), or returns None to give up. The
    # simulation has none: its dropouts are seeded, a retry would draw the same ones.


class Checkpointer(Protocol):
    """Step ``"record"``: saves the state after each round (authenticated checkpoint)."""

    def save(self, state: ServerState, meta: dict[str, Any]) -> None: ...


class Stateful(Protocol):
    """A stage with state across rounds, saved in the checkpoint (JSON data)."""

    name: str

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RoundsPlan:
    """The server side of a run: how many rounds, and the stage at each server step.

    ``stateful`` lists the stages (site or server side, in-process) whose state goes into the
    checkpoint; ``describe`` is filled by the plan builder with each stage's results.json part.
    """

    rounds: int
    cohort: Callable[[int], Cohort]
    combine: Combine
    optimize: Optimize
    server_stages: list[ServerStage] = field(default_factory=list)
    stateful: list[Stateful] = field(default_factory=list)
    checkpoint: Checkpointer | None = None
    min_sites: int | None = None
    """``training.min_sites_per_round``: a round with fewer updates reaching the server is
    sent again when the engine can (``Engine.retry``), else the run stops
    (:class:`TooFewSites`)."""


@dataclass
class RoundsResult:
    """The loop's result: the final state, the round records, the update tally."""

    state: ServerState
    history: list[RoundRecord]
    tally: Tally
    metrics: dict[str, Any]


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _missed(cohort: Cohort, received: Received) -> dict[str, list[int]] | None:
    out: dict[str, list[int]] = {}
    if len(cohort.dropped):
        out["dropped"] = [int(i) for i in cohort.dropped]
    if len(cohort.stragglers):
        out["straggler"] = [int(i) for i in cohort.stragglers]
    for site, cause in sorted(received.missed.items()):
        out.setdefault(cause, []).append(int(site))
    if sum(len(v) for v in out.values()) > MAX_MISSED_RECORDED:
        return None
    return out


def _record(
    rnd: int, t0: float, cohort: Cohort, received: Received, outcome: Outcome
) -> RoundRecord:
    sel = outcome.selected
    mal = np.asarray(received.malicious, dtype=bool)
    return RoundRecord(
        round=rnd,
        loss=None,
        accuracy=None,
        auc=None,
        clients=len(received),
        rejected=len(outcome.rejected),
        seconds=time.perf_counter() - t0,
        sampled=len(cohort.sampled),
        dropped=len(cohort.dropped) + sum(received.missing.values()),
        stragglers=len(cohort.stragglers),
        malicious=int(mal.sum()),
        selected=None if sel is None else len(sel),
        malicious_selected=None if sel is None else int(mal[sel].sum()),
        skipped=outcome.skipped,
        missed=_missed(cohort, received),
    )


def _enough(
    plan: RoundsPlan, engine: Engine, rnd: int, state: ServerState, cohort: Cohort,
    received: Received,
) -> tuple[Received, int]:  # fmt: skip
    """``received``, or the round sent again until ``plan.min_sites`` updates reach the
    server, and the number of attempts; TooFewSites when the engine cannot get them."""
    need = plan.min_sites
    attempts = 1
    if need is None or len(received) >= need:
        return received, attempts
    # sites the config drops (simulated dropouts, stragglers) do not come back on a retry
    retry = getattr(engine, "retry", None) if len(cohort.participants) >= need else None
    while len(received) < need:
        again = retry(rnd, state, cohort, received) if retry is not None else None
        if again is None:
            missed = _missed(cohort, received) or {}
            why = "; ".join(f"{cause}: sites {ids}" for cause, ids in missed.items())
            hint = (
                "the sites did not come back in time; restart their SuperNodes and resume the "
                "run, or lower min_sites_per_round"
                if retry is not None
                else "a retry cannot help: the config drops these sites (dropout, straggler), "
                "drawn from the seed. Lower min_sites_per_round, dropout or straggler"
            )
            raise TooFewSites(
                f"round {rnd}: only {len(received)} site update(s) reached the server, fewer "
                f"than training.min_sites_per_round = {need} ({len(cohort.sampled)} sampled"
                f"{'; ' + why if why else ''}; sites numbered in the config's order); {hint}"
            )
        received = again
        attempts += 1
    return received, attempts


def _fill(record: RoundRecord, metrics: dict[str, Any]) -> RoundRecord:
    record.loss, record.accuracy, record.auc = metrics["loss"], metrics["accuracy"], metrics["auc"]
    per_site = metrics.get("per_site")
    if per_site is not None and all(isinstance(v, dict) for v in per_site.values()):
        record.per_site = {n: {k: m.get(k) for k in ("loss", "accuracy", "auc")}
                           for n, m in per_site.items()}  # fmt: skip
    return record


def run_rounds(
    plan: RoundsPlan,
    engine: Engine,
    state: ServerState,
    *,
    history: list[RoundRecord] | None = None,
    tally: Tally | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> RoundsResult:
    """Run rounds ``state.round + 1 .. plan.rounds`` and evaluate the final model.

    Args:
        plan: the server-side stages (:func:`privml.fl.plan.build_plan`).
        engine: where the sites run (:class:`privml.fl.engine.SimulationEngine`, or the
            Flower coordinator's engine).
        state: the server state to start from (round 0, or a checkpoint's).
        history, tally: the records and counts of the rounds before ``state`` (resume).
        on_round: called with each round's record once its metrics are known (and after the
            round's checkpoint is written).
    """
    history = list(history or [])
    tally = tally or Tally()
    pending: RoundRecord | None = None

    def emit(record: RoundRecord, metrics: dict[str, Any]) -> None:
        _fill(record, metrics)
        if on_round is not None:
            on_round(record)

    if history and history[-1].loss is None:
        pending = history[-1]  # resumed: its metrics were to ride on the next round
        if (metrics := engine.evaluate(state.params)) is not None:  # ask for them again
            emit(pending, metrics)
            pending = None
    for rnd in range(state.round + 1, plan.rounds + 1):
        t0 = time.perf_counter()
        cohort = plan.cohort(rnd)  # 1. who takes part
        received = engine.train(rnd, state, cohort)  # 2-5. at the sites
        received, attempts = _enough(plan, engine, rnd, state, cohort, received)
        if pending is not None and (late := engine.settle()) is not None:
            emit(pending, late)
            pending = None
        outcome = plan.combine(state, received, rnd)  # 6. secure sum or checks and rule
        for stage in plan.server_stages:  # 7. central noise
            outcome = stage.apply(state, outcome, rnd)
        state = plan.optimize(state, outcome)  # 8. server optimizer
        record = _record(rnd, t0, cohort, received, outcome)  # 9. record
        record.attempts = attempts
        tally.add(rnd, cohort, received, outcome)
        history.append(record)
        metrics = engine.evaluate(state.params)
        if metrics is not None:
            _fill(record, metrics)
        if plan.checkpoint is not None:
            plan.checkpoint.save(state, _meta(history, tally, plan))
        if metrics is None:
            pending = record
        elif on_round is not None:
            on_round(record)
    final = engine.finish(state.params)
    if pending is not None:
        emit(pending, final)
    return RoundsResult(state, history, tally, final)


def _meta(history: list[RoundRecord], tally: Tally, plan: RoundsPlan) -> dict[str, Any]:
    return {
        "history": [r.to_dict() for r in history],
        "totals": tally.to_dict(),
        "stages": {s.name: s.state_dict() for s in plan.stateful},
    }


def restore(meta: dict[str, Any], plan: RoundsPlan) -> tuple[list[RoundRecord], Tally]:
    """The records, tally and stage states of a checkpoint's ``meta`` (stages updated)."""
    stages = meta.get("stages", {})
    for s in plan.stateful:
        if s.name in stages:
            s.load_state_dict(stages[s.name])
    return [RoundRecord(**r) for r in meta["history"]], Tally.from_dict(meta["totals"])
