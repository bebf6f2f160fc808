"""SecAgg+ on the Flower engine, with Flower's own implementation of it.

The server side is Flower's ``SecAggPlusWorkflow`` (``flwr.server.workflow``), the site side
Flower's ``secaggplus_mod`` (``flwr.client.mod``) on privml's ClientApp; privml drives them
from its round loop:

* :class:`WorkflowRound` runs one round of the workflow for the engine
  (:class:`~privml.fl.flower.server_app.FlowerEngine`): a thin Flower ``Strategy``
  (:class:`_Strategy`) whose ``configure_fit`` hands out privml's round request to the round's
  participants and whose ``aggregate_fit`` receives the unmasked weighted average; the
  workflow's four exchanges (setup, share keys, collect masked vectors, unmask) go through the
  coordinator's own exchange (:class:`_Link`: ``round_timeout``, and it stops waiting for a
  SuperNode the SuperLink marks offline). Sites outside the cohort get the evaluation request
  in the first exchange.
* :class:`WorkflowSum` is the round's combine stage: the unmasked average, checked against
  the clip bound, or a skipped round with its reason when the workflow halted (too few sites
  or too few shares: never a wrong sum).
* :func:`site_mod` wraps ``secaggplus_mod`` at the site: before Flower's mod acts on a
  message, the site checks the server's setup against its own config (share count, threshold
  above half the shares, clipping and quantization range, modulus, a weight of at most 1) and
  refuses an unmask request that names a neighbour both as sender and as dropped (answering
  it would hand the server both secrets of that neighbour). The training request itself
  reaches privml's ClientApp, which clips its update to ``clip`` and answers it as a
  ``FitRes``; the mod weights, quantizes and masks it, and only the masked vector leaves.

Where Flower's workflow cannot continue a round whose sampled site vanished *before* it sent
its key shares (it would later find no shares of that site and halt), :class:`_Workflow`
leaves such a site out of the round: nobody masked with it, so the others' masks still
cancel. Everything cryptographic is Flower's (and so are its limits: see docs/threat-model.md,
"SecAgg+ on Flower").
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from privml.errors import UsageError
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome, Received

__all__ = [
    "SecAggPlusSettings",
    "WorkflowRound",
    "WorkflowSum",
    "fit_reply",
    "fit_request",
    "site_mod",
]

log = logging.getLogger("privml.flower")

MAX_FLOWER_MODULUS = 1 << 32
"""Flower's masks are NumPy int64 draws below the modulus and its server adds the vectors in
int64: above 2**32 a sum of several vectors could overflow (its docs ask for at most 2**32)."""


@dataclass(frozen=True)
class SecAggPlusSettings:
    """The ``[training] secagg_*`` settings as the workflow's parameters (the same keys as in
    simulation: share count, threshold, clipping range, quantization range, modulus), plus
    the L2 bound ``clip`` each site clips its update to."""

    share_count: int | None
    threshold: int | None
    clipping_range: float
    quantization_range: int
    modulus: int
    clip: float

    @classmethod
    def from_config(cls, config: Any) -> SecAggPlusSettings:
        from privml.fl.stages.secure import clip_bound

        t = config.training
        clip = clip_bound(t)
        c = t.secagg_clipping_range
        return cls(t.secagg_share_count, t.secagg_threshold,
                   float(c) if c is not None else float(clip),
                   int(t.secagg_quantization_range), int(t.secagg_modulus),
                   float(clip))  # fmt: skip

    def for_cohort(self, n: int) -> tuple[int, int]:
        """``(share count, threshold)`` in a round of ``n`` sites (as in simulation)."""
        from privml.fl.secagg import SecAggParams

        p = SecAggParams(self.share_count, self.threshold, self.clipping_range,
                         self.quantization_range, self.modulus, 1.0, 0)  # fmt: skip
        return p.for_cohort(n)

    def workflow(self, n: int, max_weight: float, timeout: float) -> _Workflow:
        """Flower's workflow for a round of ``n`` sites (``max_weight``: the largest site)."""
        k, t = self.for_cohort(n)
        # Flower refuses an integer threshold equal to the share count; the fraction 1.0
        # means the same (every share)
        threshold: int | float = 1.0 if t >= k else t
        return _Workflow(k, threshold, max_weight=float(max_weight),
                         clipping_range=self.clipping_range,
                         quantization_range=self.quantization_range,
                         modulus_range=self.modulus, timeout=timeout)  # fmt: skip

    def to_dict(self, n: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "share_count": self.share_count, "threshold": self.threshold,
            "clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
            "modulus": self.modulus,
        }  # fmt: skip
        if n is not None and n >= 2:
            out["share_count"], out["threshold"] = self.for_cohort(n)
        return out


# --------------------------------------------------------------------------------------------
# The site side
# --------------------------------------------------------------------------------------------


def check_setup(settings: SecAggPlusSettings, configs: ConfigRecord, n_train: int,
                n_sites: int) -> None:  # fmt: skip
    """Refuse (UsageError) a setup request that departs from the site's own config: the share
    count and threshold for the announced cohort, the ranges, the modulus; and a
    ``max_weight`` below the site's record count (its weight would exceed 1 and wrap)."""
    n = configs.get(Key.SAMPLE_NUMBER)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= n_sites:
        raise UsageError(f"SecAgg+ setup: a cohort of {n!r} sites; this config has {n_sites}")
    k_exp, t_exp = settings.for_cohort(n)
    got = {
        "share count": (configs.get(Key.SHARE_NUMBER), k_exp),
        "threshold": (configs.get(Key.THRESHOLD), t_exp),
        "clipping range": (configs.get(Key.CLIPPING_RANGE), settings.clipping_range),
        "quantization range": (configs.get(Key.TARGET_RANGE), settings.quantization_range),
        "modulus": (configs.get(Key.MOD_RANGE), settings.modulus),
    }
    bad = [f"{name} {theirs!r} (this site's config: {mine!r})"
           for name, (theirs, mine) in got.items() if theirs != mine]  # fmt: skip
    if bad:
        raise UsageError("SecAgg+ setup refused: the server asks for " + ", ".join(bad))
    w = configs.get(Key.MAX_WEIGHT)
    if isinstance(w, bool) or not isinstance(w, int | float) or not w >= n_train:
        raise UsageError(f"SecAgg+ setup refused: max_weight {w!r} is below this site's "
                         f"{n_train} records (its weight would exceed 1 and wrap)")  # fmt: skip


def check_unmask(configs: ConfigRecord) -> None:
    """Refuse an unmask request naming a neighbour both as sender and as dropped: the site
    would send the shares of both of its secrets, enough to unmask its vector alone."""
    active = configs.get(Key.ACTIVE_NODE_ID_LIST)
    dead = configs.get(Key.DEAD_NODE_ID_LIST)
    both = set(active if isinstance(active, list) else []) & set(
        dead if isinstance(dead, list) else []
    )
    if both:
        nodes = sorted(map(str, both))
        raise UsageError(f"SecAgg+ unmask refused: SuperNodes {nodes} are named both as "
                         "senders and as dropped")  # fmt: skip


def site_mod(get_runtime: Any) -> Any:
    """A ClientApp mod for the train handler: SecAgg+ messages (those carrying Flower's SecAgg+
    config record) go through the site's checks and then Flower's ``secaggplus_mod``; every
    other message goes straight to the handler."""
    from flwr.client.mod import secaggplus_mod

    def mod(msg: Message, ctx: Context, call_next: Any) -> Message:
        if RECORD_KEY_CONFIGS not in msg.content.config_records:
            return call_next(msg, ctx)
        rt = get_runtime(ctx)
        if rt.config.training.secure_aggregation != "secagg+":
            raise UsageError(f"site {rt.name!r}: this site's config uses no SecAgg+")
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        stage = configs.get(Key.STAGE)
        if stage == Stage.SETUP:
            check_setup(SecAggPlusSettings.from_config(rt.config), configs,
                        int(rt.data.n_train), len(rt.names))  # fmt: skip
        elif stage == Stage.UNMASK:
            check_unmask(configs)
        return secaggplus_mod(msg, ctx, call_next)  # type: ignore[no-any-return]

    return mod


def fit_request(msg: Message) -> tuple[ConfigRecord, np.ndarray] | None:
    """The settings and parameters of a SecAgg+ training request (a ``FitIns``), or None when
    ``msg`` is privml's own training request."""
    if "fitins.config" not in msg.content.config_records:
        return None
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(ins.parameters)
    if len(arrays) != 1:
        raise UsageError("the SecAgg+ training request carries no readable model parameters")
    return ConfigRecord(dict(ins.config)), arrays[0]


def fit_reply(update: np.ndarray, n_train: int, clip: float,
              result: dict[str, Any]) -> RecordDict:  # fmt: skip
    """The site's answer to a SecAgg+ training request: its update clipped to L2 norm
    ``clip`` as the ``FitRes`` parameters (Flower's mod weights, quantizes and masks them; the
    plain update never leaves) and ``result`` (record count, evaluation statistics, booked
    epsilon: nothing of the update) in privml's result record."""
    from privml.fl.flower import protocol as P

    u = np.asarray(update, dtype=np.float64)
    if u.ndim != 1 or not np.isfinite(u).all():
        raise UsageError("the site's update is not finite; nothing sent")
    norm = float(np.linalg.norm(u))
    if norm > clip:
        u = u * (clip / norm)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u]), int(n_train), {})
    content = compat.fitres_to_recorddict(fitres, keep_input=False)
    content[P.RESULT] = ConfigRecord(result)
    return content


# --------------------------------------------------------------------------------------------
# The server side
# --------------------------------------------------------------------------------------------


def _workflow_class() -> type:
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow


class _Workflow(_workflow_class()):  # type: ignore[misc]
    """Flower's ``SecAggPlusWorkflow``, leaving out of the round a sampled site that vanished
    before it sent its key shares (Flower keeps it and then halts for want of its shares)."""

    def _drop_silent(self, state: Any) -> None:
        gone = state.sampled_node_ids - state.active_node_ids
        if gone:
            state.sampled_node_ids = set(state.active_node_ids)
            for nid in list(state.nid_to_neighbours):
                if nid in gone:
                    del state.nid_to_neighbours[nid]
                else:
                    state.nid_to_neighbours[nid] = state.nid_to_neighbours[nid] - gone

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        if not state.nid_to_neighbours:  # halted before anything was sent
            return bool(ok)
        self._drop_silent(state)
        return len(state.active_node_ids) >= 2 and bool(self._check_threshold(state))

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        super().share_keys_stage(grid, context, state)
        self._drop_silent(state)
        return len(state.active_node_ids) >= 2 and bool(self._check_threshold(state))


def _strategy_class() -> type:
    from flwr.server.strategy import Strategy

    return Strategy


class _Strategy(_strategy_class()):  # type: ignore[misc]
    """The Flower strategy the workflow calls: privml decides who trains and what the
    aggregate is for; this only hands out the round's requests and keeps the average."""

    def __init__(self, fitins: list[tuple[Any, FitIns]]) -> None:
        self.fitins = fitins
        self.average: np.ndarray | None = None
        self.results: list[tuple[Any, FitRes]] = []

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: Any) -> list[tuple[Any, FitIns]]:  # fmt: skip
        return self.fitins

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Any]]:  # fmt: skip
        self.results = list(results)
        if not results:
            return None, {}
        params = results[0][1].parameters
        arrays = parameters_to_ndarrays(params)
        self.average = np.asarray(arrays[0], dtype=np.float64) if len(arrays) == 1 else None
        return params, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: Any) -> list[Any]:  # fmt: skip
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:  # fmt: skip
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class _Link:
    """The grid the workflow talks to: each of its exchanges goes through the coordinator's
    own (``round_timeout``; a SuperNode the SuperLink marks offline is not waited for), the
    first one also carrying the evaluation requests of the sites outside the cohort; the
    replies of each stage are kept (the collect stage's carry the sites' result records)."""

    def __init__(self, coordinator: Any, extra: list[Message]) -> None:
        self.c = coordinator
        self.extra = extra
        self.extra_replies: dict[int, Message] = {}
        self.stages: list[str] = []
        self.replies: dict[str, dict[int, Message]] = {}

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        stage = str(msgs[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if msgs \
            else "none"  # fmt: skip
        extra, self.extra = self.extra, []
        for m in msgs:
            m.metadata.ttl = self.c.round_timeout
        replies = self.c.exchange(msgs + extra, timeout=self.c.round_timeout)
        for m in extra:
            node = m.metadata.dst_node_id
            if node in replies:
                self.extra_replies[node] = replies[node]
        self.stages.append(stage)
        got = {m.metadata.dst_node_id: replies[m.metadata.dst_node_id] for m in msgs
               if m.metadata.dst_node_id in replies}  # fmt: skip
        self.replies[stage] = got
        return list(got.values())


@dataclass
class RoundResult:
    """What one SecAgg+ round gave the server: the unmasked weighted average of the senders'
    updates (None: the round halted), who sent, why it halted."""

    average: np.ndarray | None
    senders: list[int]
    sampled: int
    share_count: int
    threshold: int
    total_weight: float
    skipped: str | None = None
    detail: str | None = None
    seconds: float = 0.0


@dataclass
class WorkflowRound:
    """Runs Flower's SecAgg+ workflow for one round of the Flower engine."""

    settings: SecAggPlusSettings
    max_weight: float
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def run(self, coordinator: Any, rnd: int, params: np.ndarray, nodes: list[int],
            request: dict[str, Any], extra: list[Message]
            ) -> tuple[RoundResult, dict[int, Message], dict[int, Message]]:  # fmt: skip
        """One round with the SuperNodes ``nodes`` (``request``: privml's round settings for
        the training request). Returns the result, the collect stage's replies by SuperNode
        (with their result records) and the replies to ``extra``."""
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey

        t0 = time.perf_counter()
        link = _Link(coordinator, extra)
        parameters = ndarrays_to_parameters([np.asarray(params, dtype=np.float32)])
        fitins = [(GridClientProxy(n, link, 0), FitIns(parameters, dict(request)))  # type: ignore[arg-type]
                  for n in nodes]  # fmt: skip
        strategy = _Strategy(fitins)
        state = RecordDict({
            MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(parameters, keep_input=True),
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd}),
        })  # fmt: skip
        ctx = LegacyContext(Context(0, 0, {}, state, {}), strategy=strategy)
        n = len(nodes)
        k, t = self.settings.for_cohort(n) if n >= 2 else (n, n)
        skipped = detail = None
        if n < 2:
            skipped, detail = "secagg_too_few_sites", f"{n} site(s) in the cohort; SecAgg+ needs 2"
        else:
            workflow = self.settings.workflow(n, self.max_weight, coordinator.round_timeout)
            try:
                workflow(link, ctx)
            except Exception as exc:  # noqa: BLE001 - a malformed reply halts the round, safely
                skipped, detail = "secagg_failed", f"{type(exc).__name__}: {exc}"
            if skipped is None and strategy.average is None:
                last = link.stages[-1] if link.stages else Stage.SETUP
                replied = {s: len(r) for s, r in link.replies.items()}
                if last == Stage.UNMASK:
                    skipped = "secagg_too_few_shares"
                    detail = (f"fewer than {t} shares of some site's secret came back (replies "
                              f"by stage: {replied}); the sum cannot be unmasked")  # fmt: skip
                else:
                    skipped = "secagg_too_few_sites"
                    detail = (f"a site kept fewer than {t} live neighbours at the {last} stage "
                              f"(replies by stage: {replied})")  # fmt: skip
        collected = link.replies.get(Stage.COLLECT_MASKED_VECTORS, {})
        senders = [nid for nid, m in collected.items() if not m.has_error()]
        total_w = sum(r.num_examples for _, r in strategy.results) / self.max_weight
        res = RoundResult(strategy.average if skipped is None else None, senders, n, k, t,
                          float(total_w), skipped, detail, time.perf_counter() - t0)  # fmt: skip
        if skipped is not None:
            log.warning("round %d: SecAgg+ round skipped (%s): %s", rnd, skipped, detail)
        # sites that vanished after sending their key shares: their masks were rebuilt from
        # their neighbours' shares
        shared = {nid for nid, m in link.replies.get(Stage.SHARE_KEYS, {}).items()
                  if not m.has_error()}  # fmt: skip
        unmasked = {nid for nid, m in link.replies.get(Stage.UNMASK, {}).items()
                    if not m.has_error()}  # fmt: skip
        recovered = sorted(shared - unmasked) if skipped is None else []
        self.rounds.append({"round": rnd, "sites": n, "senders": len(senders),
                            "recovered": len(recovered), "seconds": res.seconds,
                            "skipped": skipped, "detail": detail})  # fmt: skip
        return res, collected, link.extra_replies


@dataclass
class WorkflowSum:
    """Step ``combine`` under SecAgg+ on Flower: the workflow's unmasked weighted average
    (computed in the engine's round, :class:`WorkflowRound`), checked: the average of updates
    clipped to ``clip`` has L2 norm at most ``clip`` (plus the quantization error), else the
    round is skipped (``secagg_sum_out_of_bounds``: a site did not clip, or sent arbitrary
    residues). A halted workflow skips the round with its reason."""

    settings: SecAggPlusSettings
    workflow: WorkflowRound
    step = "combine"

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        res = received.info.get("secaggplus")
        if not isinstance(res, RoundResult):
            return Outcome.skip("no_updates")
        accepted = list(range(len(received.ids)))
        if res.skipped is not None or res.average is None:
            out = Outcome.skip(res.skipped or "secagg_failed", [], [])
            out.info["detail"] = res.detail
            return out
        avg = res.average
        s = self.settings
        n = max(len(res.senders), 1)
        slack = math.sqrt(avg.size) * 2 * n * s.clipping_range / s.quantization_range \
            / max(res.total_weight, 1e-12)  # fmt: skip
        norm = float(np.linalg.norm(avg))
        if avg.ndim != 1 or not np.isfinite(avg).all() or norm > s.clip + slack:
            out = Outcome.skip("secagg_sum_out_of_bounds", [], [])
            out.info["detail"] = (f"the unmasked average has L2 norm {norm:.4g} > clip "
                                  f"{s.clip:.4g}: some site did not clip its update")  # fmt: skip
            log.warning("round %d: %s", rnd, out.info["detail"])
            return out
        return Outcome(avg, accepted, [], info={"clip": s.clip, "secagg_senders": n,
                                               "total_weight": res.total_weight})  # fmt: skip

    def describe(self, *_: Any) -> dict[str, Any]:
        """results.json ``federation.secure_aggregation``."""
        import statistics

        rounds = self.workflow.rounds
        n = max((r["sites"] for r in rounds), default=None)
        secs = [r["seconds"] for r in rounds]
        return {
            "scheme": "secagg+",
            "protocol": "Flower's SecAggPlusWorkflow and secaggplus_mod (flwr "
            f"{_flower_version()}): X25519 key agreement, AES-GCM share transport, Shamir "
            "shares, masks from NumPy's generator seeded with 32 bits of each key",
            "implementation": "flower",
            "parameters": self.settings.to_dict(n),
            "clip": self.settings.clip,
            "max_weight": self.workflow.max_weight,
            "key_holder": None,
            "server_checks": "after unmasking, the average's L2 norm <= clip (else the round "
            "is skipped); no per-update check",
            "median_round_seconds": statistics.median(secs) if secs else None,
            "recovered_sites": sum(r["recovered"] for r in rounds),
            "per_round": rounds,
        }


def _flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")
