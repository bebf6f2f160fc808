"""The in-process federated simulation engine (the default engine), and the server-side round
that every engine shares.

One round:

1. **Sample** a cohort (``clients_per_round`` or ``fraction`` of the sites), then drop the
   clients that **drop out** (probability ``dropout``: they never train) and the
   **stragglers** (probability ``straggler``: their update would arrive after the round closed;
   synchronous rounds with a deadline discard late updates, so the simulator does not compute
   them -- the model is the same as if they had trained and been ignored).
2. **Train** the participants locally from the global model, all of them in one vectorized
   computation (:func:`local_updates`, :mod:`privml.models.training`); FedProx adds its proximal
   term. Simulated attackers (``[attack]``) train on flipped labels (``label_flip``) or rewrite
   their updates (:func:`privml.fl.attacks.apply_attack`).
3. **Aggregate** on the server (:func:`aggregate_round`): validate every update
   (:mod:`privml.fl.validate`: type, dtype, shape, NaN/Inf, ``max_update_norm``, weight);
   rejected updates are counted per reason and never averaged in; the accepted ones go to the
   configured rule of :mod:`privml.fl.aggregate`; the result is applied by the server
   optimizer (:mod:`privml.fl.server_opt`).
4. **Evaluate** on the sites' pooled held-out records and **checkpoint** the server state
   (:mod:`privml.fl.checkpoint`).

Everything random is drawn from generators seeded with ``(seed, round, purpose[, site])``, so a
run is reproducible and a run resumed from a checkpoint ends with the same model as an
uninterrupted one. Memory grows with the cohort times the model size (stacked parameters and
updates exist for the cohort only); every site's data stays in its own arrays.

Two functions are the contract with other engines (the Flower ServerApp/ClientApp call them):

* site side: ``local_updates(model, params, sites, *, training, rnd, site_ids, rule,
  prox_mu=0.0) -> np.ndarray [S, P]`` (new params - global params, float64);
* server side: ``plan = ServerPlan.from_training(training)``,
  ``state = init_server_state(params, plan)``, then each round
  ``outcome = aggregate_round(state, updates, weights, plan=plan, server_update=None)`` and
  ``state = outcome.state`` (FLTrust's ``server_update`` comes from :func:`root_update`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from privml.config import TrainingConfig
from privml.data.federation import FederatedData, SiteData
from privml.errors import ConfigError, UsageError
from privml.fl import aggregate as agg
from privml.fl.attacks import (
    ATTACK_PARAMS,
    DATA_ATTACKS,
    apply_attack,
    flip_labels,
)
from privml.fl.checkpoint import ServerState, load_checkpoint, save_checkpoint
from privml.models.training import CohortData, GradientRule, MeanGradient, train_cohort
from privml.fl.metrics import per_site_metrics, pooled_metrics, round_metrics
from privml.fl.server_opt import ServerOptimizer, init_state, make_server_optimizer, server_step
from privml.fl.validate import REJECTION_REASONS, stack_accepted, validate_updates
from privml.models.nets import ModelSpec, build_model, flat_params

if TYPE_CHECKING:
    from privml.config import AttackConfig

__all__ = [
    "DEFAULT_PROX_MU",
    "RoundOutcome",
    "RoundPlan",
    "RoundRecord",
    "ServerPlan",
    "ServerState",
    "TrainingResult",
    "aggregate_round",
    "attacker_indices",
    "cohort_size",
    "init_params",
    "init_server_state",
    "local_updates",
    "per_site_metrics",
    "plan_round",
    "pooled_metrics",
    "root_update",
    "run_fingerprint",
    "sample_cohort",
    "simulate",
]

DEFAULT_PROX_MU = 0.01
"""FedProx's proximal weight when ``strategy = "fedprox"`` and ``prox_mu`` is not given."""


@dataclass
class RoundRecord:
    """What happened in one round (a row of results.json ``rounds``).

    ``clients`` is the number of updates the server received; ``sampled``, ``dropped`` and
    ``stragglers`` count the cohort before that; ``rejected`` the updates validation refused;
    ``selected`` how many updates a selecting rule (Krum, Multi-Krum, Bulyan, FLTrust) kept;
    ``malicious`` the simulated attackers among the clients and ``malicious_selected`` those the
    rule kept; ``skipped`` why the model did not change this round (None when it did);
    ``per_site`` each site's own test metrics after the round.
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
def _torch_threads(spec: ModelSpec) -> Iterator[None]:
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


def init_params(spec: ModelSpec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Build the model and its initial flat parameters from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    return model, flat_params(model)


# --------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------


def cohort_size(n_sites: int, training: TrainingConfig) -> int:
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
class RoundPlan:
    """Who takes part in a round: site indices (ascending) sampled, dropped out, straggling."""

    sampled: NDArray[np.int64]
    dropped: NDArray[np.int64]
    stragglers: NDArray[np.int64]

    @property
    def participants(self) -> NDArray[np.int64]:
        """The sampled sites whose updates reach the server this round."""
        out = np.setdiff1d(self.sampled, self.dropped, assume_unique=True)
        return np.setdiff1d(out, self.stragglers, assume_unique=True)


def plan_round(n_sites: int, training: TrainingConfig, rnd: int) -> RoundPlan:
    """Sample round ``rnd``'s cohort, then its dropouts and stragglers (seeded by round).

    A round may end with no participant (every sampled client dropped out or straggled); the
    server then skips it and the global model does not change.
    """
    rng = np.random.default_rng([training.seed, rnd, 1])
    k = cohort_size(n_sites, training)
    sampled = (
        np.sort(rng.choice(n_sites, size=k, replace=False)) if k < n_sites else np.arange(n_sites)
    ).astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    dropped = sampled[rng.random(k) < training.dropout] if training.dropout > 0 else empty
    left = np.setdiff1d(sampled, dropped, assume_unique=True)
    stragglers = left[rng.random(len(left)) < training.straggler] if training.straggler else empty
    return RoundPlan(sampled, dropped, stragglers)


def sample_cohort(n_sites: int, training: TrainingConfig, rnd: int) -> np.ndarray:
    """Indices of the sites whose updates reach the server in round ``rnd``."""
    return plan_round(n_sites, training, rnd).participants


# --------------------------------------------------------------------------------------------
# Site side
# --------------------------------------------------------------------------------------------


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
    """Train ``sites`` from ``params`` and return their updates ``[S, P]`` (new - global).

    Site ``site_ids[s]`` shuffles its batches with a generator seeded by
    ``(training.seed, rnd, 2, site_ids[s])``, so a site computes the same update whichever
    engine (simulation or Flower) or cohort it runs in. ``prox_mu > 0`` is FedProx.
    """
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


def root_update(
    params: torch.Tensor,
    X_root: np.ndarray,
    y_root: np.ndarray,
    *,
    training: TrainingConfig,
    rnd: int,
    rule: GradientRule,
) -> np.ndarray:
    """FLTrust's server update ``g0`` for round ``rnd``: the server trains on its clean root
    dataset exactly as a client trains (same lr, batch size, local epochs), float64 ``[P]``.

    Batches are shuffled with a generator seeded by ``(training.seed, rnd, 4)``.
    """
    data = CohortData.from_arrays([X_root], [y_root])
    new = train_cohort(
        params,
        data,
        rule=rule,
        lr=training.lr,
        batch_size=training.batch_size,
        epochs=training.local_epochs,
        rngs=[np.random.default_rng([training.seed, rnd, 4])],
    )
    return (new[0] - params.reshape(-1)).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# Server side (shared by every engine)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerPlan:
    """How the server combines a round's updates; built once per run from the config.

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
    def from_training(cls, training: TrainingConfig) -> ServerPlan:
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


def _used_by(opt: ServerOptimizer, key: str) -> bool:
    used = {
        "sgd": {"kind", "lr"},
        "momentum": {"kind", "lr", "momentum"},
        "adam": {"kind", "lr", "beta_1", "beta_2", "tau", "bias_correction"},
        "yogi": {"kind", "lr", "beta_1", "beta_2", "tau"},
        "adagrad": {"kind", "lr", "beta_1", "tau"},
    }
    return key in used[opt.kind]


def init_server_state(params: torch.Tensor | np.ndarray, plan: ServerPlan) -> ServerState:
    """The server state before round 1: ``params`` (flat) and a zero optimizer state."""
    flat = np.array(params.detach().cpu().numpy() if isinstance(params, torch.Tensor) else params)
    flat = flat.astype(np.float32).reshape(-1)
    return ServerState(round=0, params=flat, opt=init_state(plan.optimizer, flat.shape[0]))


@dataclass(frozen=True)
class RoundOutcome:
    """The server's result of one round.

    Attributes:
        state: the state after the round (``state.round`` advanced even when skipped).
        update: the aggregated update the optimizer applied (float64 ``[P]``), None if skipped.
        accepted: indices (into the round's updates) that passed validation.
        rejected: ``(index, reason)`` pairs, reasons from
            :data:`privml.fl.validate.REJECTION_REASONS`.
        counts: ``{"accepted", "rejected", "by_reason"}`` for results.json.
        selected: indices (into the round's updates) the rule kept, for selecting rules
            (Krum, Multi-Krum, Bulyan, FLTrust); None for rules that use every update.
        info: the rule's scalar details (``f``, ``beta``, ``max_norm``, ...; JSON data).
        skipped: why the model did not change (``"no_updates"``, ``"all_rejected"``,
            ``"too_few_updates"``, ``"zero_weight"``), or None.
    """

    state: ServerState
    update: NDArray[np.float64] | None
    accepted: list[int]
    rejected: list[tuple[int, str]]
    counts: dict[str, Any]
    selected: list[int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def _scalar_info(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if isinstance(v, str | int | float | bool) or v is None}


def aggregate_round(
    state: ServerState,
    updates: Sequence[object] | np.ndarray,
    weights: Sequence[object] | np.ndarray,
    *,
    plan: ServerPlan,
    server_update: np.ndarray | None = None,
) -> RoundOutcome:
    """One server round: validate the updates, aggregate the accepted ones, step the optimizer.

    Every engine calls this function (the simulator here, Flower's ServerApp in
    :mod:`privml.fl.flower`), so the server behaves identically wherever it runs.

    Args:
        state: the server state before the round (:func:`init_server_state` for round 1).
        updates: one entry per client that reported: ideally a float ``[n_params]`` numpy
            array (its new parameters minus ``state.params``). Anything else is untrusted
            input: it is rejected with a reason, counted, and never averaged in.
        weights: one self-reported weight per update (its number of training records);
            FedAvg and norm bounding weight by it, robust rules ignore it.
        plan: the run's :class:`ServerPlan`.
        server_update: FLTrust's server update on its root data (:func:`root_update`);
            required when ``plan.aggregator == "fltrust"``, ignored otherwise.

    Returns:
        :class:`RoundOutcome`; a round with no usable update (or fewer than the rule needs) is
        skipped: the parameters, optimizer state and centre are carried over unchanged.

    Raises:
        UsageError: ``weights`` of the wrong length, or fltrust without ``server_update``.
    """
    n_params = int(state.params.shape[0])
    rows: Sequence[object] = (
        list(updates) if isinstance(updates, np.ndarray) and updates.ndim == 2 else updates  # type: ignore[assignment]
    )
    result = validate_updates(
        rows, n_params=n_params, max_norm=plan.max_update_norm, weights=weights
    )
    counts = result.counts()
    accepted = result.accepted_indices
    nxt = state.round + 1

    def skip(reason: str) -> RoundOutcome:
        carried = ServerState(nxt, state.params, state.opt, state.center)
        return RoundOutcome(carried, None, accepted, result.rejected, counts, skipped=reason)

    if len(rows) == 0:
        return skip("no_updates")
    if not accepted:
        return skip("all_rejected")
    if len(accepted) < plan.min_updates:
        return skip("too_few_updates")
    stack = stack_accepted(rows, result)
    w = np.array([float(weights[i]) for i in accepted], dtype=np.float64)  # type: ignore[arg-type]
    spec = agg.AGGREGATORS[plan.aggregator]
    if spec.uses_weights and not w.sum() > 0:
        return skip("zero_weight")
    if "server_update" in spec.needs and server_update is None:
        raise UsageError(
            f"The {plan.aggregator} aggregator needs the server's update on its root data "
            "(server_update=...); compute it with privml.fl.engine.root_update."
        )
    context = agg.AggregationContext(center=state.center, server_update=server_update)
    res = agg.aggregate(
        plan.aggregator,
        stack,
        weights=w if spec.uses_weights else None,
        params=plan.aggregator_params,
        context=context,
    )
    new_params, new_opt = server_step(
        plan.optimizer, state.opt, state.params.astype(np.float64), res.update
    )
    selected = None if res.selected is None else [accepted[i] for i in np.flatnonzero(res.selected)]
    return RoundOutcome(
        state=ServerState(nxt, new_params.astype(np.float32), new_opt, res.update.copy()),
        update=res.update,
        accepted=accepted,
        rejected=result.rejected,
        counts=counts,
        selected=selected,
        info=_scalar_info(res.info),
    )


# --------------------------------------------------------------------------------------------
# Simulated attackers and FLTrust's root data
# --------------------------------------------------------------------------------------------


def attacker_indices(attack: AttackConfig, site_names: Sequence[str], seed: int) -> np.ndarray:
    """Indices of the sites that ``attack`` makes Byzantine, ascending.

    ``attack.sites`` lists names or positions (0-based); ``attack.fraction`` picks
    ``round(fraction * n_sites)`` sites at random (generator seeded by ``(seed, 7)``), fixed
    for the whole run.

    Raises:
        ConfigError: an unknown site, or a fraction that rounds to no site (or to every site
            for an attack that imitates honest clients).
    """
    n = len(site_names)
    if attack.sites is not None:
        idx: list[int] = []
        problems = []
        for s in attack.sites:
            if isinstance(s, int):
                if 0 <= s < n:
                    idx.append(s)
                else:
                    problems.append(f"attack.sites: position {s} is outside 0..{n - 1}")
            elif s in site_names:
                idx.append(list(site_names).index(s))
            else:
                shown = ", ".join(list(site_names)[:5]) + (", ..." if n > 5 else "")
                problems.append(f"attack.sites: no site named {s!r} (sites: {shown})")
        if problems:
            raise ConfigError(problems)
        chosen = np.unique(np.asarray(idx, dtype=np.int64))
    else:
        assert attack.fraction is not None
        k = math.floor(attack.fraction * n + 0.5)
        if k < 1:
            raise ConfigError(
                f"attack.fraction = {attack.fraction} of {n} sites rounds to no attacker; "
                f"raise it to at least {0.5 / n:.3g} or list the sites"
            )
        rng = np.random.default_rng([seed, 7])
        chosen = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    if attack.kind in ("alie", "ipm") and len(chosen) >= n:
        raise ConfigError(
            f"the {attack.kind} attack imitates honest sites, but every site is an attacker; "
            "leave at least one honest site"
        )
    return chosen


def _n_classes(fed: FederatedData) -> int:
    return 2 if fed.task.kind == "binary" else len(fed.task.classes)


def _carve_root(
    sites: list[SiteData], malicious: np.ndarray, server_data: dict[str, Any], seed: int
) -> tuple[list[SiteData], np.ndarray, np.ndarray, dict[str, Any]]:
    """Hold out FLTrust's root dataset from one honest site's training records."""
    size = int(server_data["root_size"])
    names = [s.name for s in sites]
    want = server_data.get("root_site")
    if want is not None:
        if want not in names:
            raise ConfigError(f"aggregator_params.root_site: no site named {want!r}")
        pos = names.index(want)
        if pos in set(malicious.tolist()):
            raise ConfigError(
                f"aggregator_params.root_site {want!r} is a simulated attacker; FLTrust's root "
                "data must be clean: choose an honest site"
            )
    else:
        honest = [i for i in range(len(sites)) if i not in set(malicious.tolist())]
        if not honest:
            raise ConfigError("fltrust needs an honest site to take the root dataset from")
        pos = max(honest, key=lambda i: sites[i].n_train)
    site = sites[pos]
    if site.n_train <= size:
        raise ConfigError(
            f"aggregator_params.root_size = {size} needs a site with more than {size} training "
            f"records; {site.name!r} has {site.n_train}. Lower root_size or pick root_site."
        )
    rng = np.random.default_rng([seed, 5])
    take = np.zeros(site.n_train, dtype=bool)
    take[rng.choice(site.n_train, size=size, replace=False)] = True
    X_root, y_root = site.X_train[take], site.y_train[take]
    out = list(sites)
    out[pos] = SiteData(
        site.name, site.X_train[~take], site.y_train[~take], site.X_test, site.y_test
    )
    info = {"site": site.name, "records": size}
    return out, X_root, y_root, info


# --------------------------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------------------------


def run_fingerprint(
    fed: FederatedData, spec: ModelSpec, training: TrainingConfig, attack: AttackConfig | None
) -> str:
    """SHA-256 of everything a run's result depends on: training settings, attack, model, and
    every site's encoded records. A checkpoint resumes only a run with the same fingerprint."""
    h = hashlib.sha256()
    desc = {
        "training": training.model_dump(mode="json"),
        "attack": attack.model_dump(mode="json") if attack is not None else None,
        "spec": spec.to_dict(),
        "task": fed.task.to_dict(),
    }
    h.update(json.dumps(desc, sort_keys=True).encode())
    for s in fed.sites:
        h.update(s.name.encode() + b"\0")
        for arr in (s.X_train, s.y_train, s.X_test, s.y_test):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _attack_section(
    attack: AttackConfig, names: Sequence[str], malicious: np.ndarray
) -> dict[str, Any]:
    params = {**ATTACK_PARAMS[attack.kind], **attack.kind_params()}
    return {
        "kind": attack.kind,
        "type": "data" if attack.kind in DATA_ATTACKS else "update",
        "threat_model": "omniscient (sees the cohort's honest updates)"
        if attack.kind in ("alie", "ipm")
        else "own data and update only",
        "sites": [names[i] for i in malicious],
        "n_malicious": int(len(malicious)),
        "n_sites": len(names),
        "fraction": attack.fraction,
        "params": params,
        "rounds_without_honest_client": [],
    }


def simulate(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    attack: AttackConfig | None = None,
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
        checkpoint_dir: where to write the server state after every round (atomically);
            None writes no checkpoints.
        resume: continue from the checkpoint in ``checkpoint_dir`` (which must come from a
            run with the same fingerprint: settings, attack, model and data).
        rule: the local gradient rule; None is plain SGD (:class:`MeanGradient`).

    Raises:
        ConfigError: attack sites or FLTrust root settings that do not fit the data, or a
            checkpoint of another run.
        UsageError: ``resume`` without ``checkpoint_dir`` or without a checkpoint.
    """
    with _torch_threads(spec):
        return _simulate(
            fed,
            spec,
            training,
            on_round=on_round,
            attack=attack,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            rule=rule,
        )


def _simulate(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    attack: AttackConfig | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    rule: GradientRule | None = None,
) -> TrainingResult:
    if resume and checkpoint_dir is None:
        raise UsageError("simulate(resume=True) needs the checkpoint_dir to resume from.")
    plan = ServerPlan.from_training(training)
    model, params0 = init_params(spec, training.seed)
    rule = rule if rule is not None else MeanGradient(model, spec, binary=fed.task.kind == "binary")
    prox_mu = (
        (training.prox_mu if training.prox_mu is not None else DEFAULT_PROX_MU)
        if training.strategy == "fedprox"
        else 0.0
    )
    fingerprint = run_fingerprint(fed, spec, training, attack)
    names = [s.name for s in fed.sites]
    n_sites = len(fed.sites)
    sites = list(fed.sites)

    malicious = np.zeros(0, dtype=np.int64)
    attack_info: dict[str, Any] | None = None
    if attack is not None:
        malicious = attacker_indices(attack, names, training.seed)
        attack_info = _attack_section(attack, names, malicious)
        if attack.kind == "label_flip":
            k = _n_classes(fed)
            for i in malicious:
                s = sites[i]
                sites[i] = SiteData(
                    s.name, s.X_train, flip_labels(s.y_train, k), s.X_test, s.y_test
                )
    is_malicious = np.zeros(n_sites, dtype=bool)
    is_malicious[malicious] = True
    update_attack = attack is not None and attack.kind not in DATA_ATTACKS

    root: tuple[np.ndarray, np.ndarray] | None = None
    root_info: dict[str, Any] | None = None
    if plan.aggregator == "fltrust":
        sites, X_root, y_root, root_info = _carve_root(
            sites, malicious, plan.server_data, training.seed
        )
        root = (X_root, y_root)

    X_test, y_test = fed.pooled_test()
    site_sizes = [(s.name, s.n_test) for s in fed.sites]
    state = init_server_state(params0, plan)
    secure = None
    if training.secure_aggregation != "none":
        # keys made at the key-holder site before round 1 (privml.fl.secure).
        from privml.fl.secure import SecureAggregation

        secure = SecureAggregation.from_training(
            training, names, [s.n_train for s in sites], n_params=int(state.params.shape[0])
        )
    history: list[RoundRecord] = []
    totals: dict[str, Any] = {
        "accepted": 0,
        "rejected": 0,
        "by_reason": dict.fromkeys(REJECTION_REASONS, 0),
        "dropped": 0,
        "stragglers": 0,
        "skipped_rounds": {},
    }
    resumed_after: int | None = None
    if resume:
        assert checkpoint_dir is not None
        ck = load_checkpoint(checkpoint_dir, fingerprint=fingerprint)
        state = ck.state
        resumed_after = state.round
        history = [RoundRecord(**r) for r in ck.meta["history"]]
        totals = ck.meta["totals"]
        if attack_info is not None:
            attack_info["rounds_without_honest_client"] = ck.meta.get("attack_skips", [])

    for rnd in range(state.round + 1, training.rounds + 1):
        t0 = time.perf_counter()
        rp = plan_round(n_sites, training, rnd)
        ids = rp.participants
        params_t = torch.from_numpy(state.params)
        cohort = [sites[i] for i in ids]
        mal_mask = is_malicious[ids]
        if len(ids):
            updates = local_updates(
                model,
                params_t,
                cohort,
                training=training,
                rnd=rnd,
                site_ids=ids,
                rule=rule,
                prox_mu=prox_mu,
            )
        else:
            updates = np.zeros((0, state.params.shape[0]))
        if update_attack and mal_mask.any():
            assert attack is not None and attack_info is not None
            # The attackers work from the finite updates (a broken honest site's NaN update is
            # left for validation to reject).
            finite = np.isfinite(updates).all(axis=1)
            sub_mask = mal_mask[finite]
            if attack.kind in ("alie", "ipm") and not (~sub_mask).any():
                # Nobody honest to imitate in this cohort: the attackers send honest updates.
                attack_info["rounds_without_honest_client"].append(rnd)
            elif sub_mask.any():
                updates[finite] = apply_attack(
                    attack.kind,
                    updates[finite],
                    sub_mask,
                    rng=np.random.default_rng([training.seed, rnd, 3]),
                    params=attack.kind_params(),
                )
        g0 = (
            root_update(params_t, root[0], root[1], training=training, rnd=rnd, rule=rule)
            if root is not None and len(ids)
            else None
        )
        weights = np.array([s.n_train for s in cohort], dtype=np.float64)
        if secure is not None:
            outcome = secure.round(state, updates, ids, plan=plan)
        else:
            outcome = aggregate_round(state, updates, weights, plan=plan, server_update=g0)
        state = outcome.state
        totals["accepted"] += outcome.counts["accepted"]
        totals["rejected"] += outcome.counts["rejected"]
        for reason, c in outcome.counts["by_reason"].items():
            totals["by_reason"][reason] += c
        totals["dropped"] += len(rp.dropped)
        totals["stragglers"] += len(rp.stragglers)
        if outcome.skipped:
            totals["skipped_rounds"].setdefault(outcome.skipped, []).append(rnd)
        ev = round_metrics(model, torch.from_numpy(state.params), X_test, y_test, site_sizes)
        sel = outcome.selected
        rec = RoundRecord(
            round=rnd,
            loss=ev["loss"],
            accuracy=ev["accuracy"],
            auc=ev["auc"],
            clients=len(ids),
            rejected=outcome.counts["rejected"],
            seconds=time.perf_counter() - t0,
            sampled=len(rp.sampled),
            dropped=len(rp.dropped),
            stragglers=len(rp.stragglers),
            malicious=int(mal_mask.sum()),
            selected=None if sel is None else len(sel),
            malicious_selected=None if sel is None else int(mal_mask[sel].sum()),
            skipped=outcome.skipped,
            per_site=ev["per_site"],
        )
        history.append(rec)
        if checkpoint_dir is not None:
            meta = {
                "history": [r.to_dict() for r in history],
                "totals": totals,
                "attack_skips": attack_info["rounds_without_honest_client"] if attack_info else [],
            }
            save_checkpoint(checkpoint_dir, state, fingerprint=fingerprint, meta=meta)
        if on_round is not None:
            on_round(rec)

    final = torch.from_numpy(state.params.copy())
    metrics = pooled_metrics(model, final, X_test, y_test)
    metrics["per_site"] = per_site_metrics(model, final, fed.sites)
    federation = {
        "engine": "simulation",
        "strategy": training.strategy,
        "prox_mu": prox_mu if training.strategy == "fedprox" else None,
        **plan.to_dict(),
        "clients_per_round": cohort_size(n_sites, training),
        "n_sites": n_sites,
        "dropout": training.dropout,
        "straggler": training.straggler,
        "straggler_policy": "late updates are discarded (synchronous rounds)",
        "fltrust_root": root_info,
        "resumed_after_round": resumed_after,
        "secure_aggregation": secure.describe() if secure is not None else None,
    }
    updates_section = {**totals, "max_update_norm": training.max_update_norm}
    extra = {"updates": updates_section, "federation": federation, "attack": attack_info}
    return TrainingResult(spec, model, final, history, metrics, int(totals["rejected"]), extra)
