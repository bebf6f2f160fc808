"""privml's Flower ServerApp: the coordinator side of a deployment (message API).

:class:`Coordinator` runs the same federated rounds as :func:`privml.fl.engine.simulate`, with
the sites' local training happening at the SuperNodes:

1. handshake: every SuperNode reports which site of the config it serves; the coordinator waits
   until each configured site is connected and checks that all of them run the same config
   (fingerprints), task and encoding;
2. each round: the participants (:func:`privml.fl.engine.plan_round`, the simulation's own
   sampling) get ``train`` messages with the global parameters; the replies go through the
   server step every engine shares, :func:`privml.fl.engine.aggregate_round` (validation of
   each update: type, shape, dtype, NaN/Inf, norm, weight; then the configured aggregation
   rule from :mod:`privml.fl.aggregate` and server optimizer); sites that do not answer
   within ``round_timeout`` are left out of the round;
3. evaluation of round ``r``'s model rides on round ``r + 1``'s messages (sites evaluate the
   parameters they receive before training; sites outside the cohort get an ``evaluate``
   message in the same exchange), so a round costs one message exchange; a final exchange
   evaluates the last model. Metrics are pooled from the sites' sufficient statistics
   (:mod:`privml.fl.flower.evaluation`).

``app`` is the ServerApp Flower loads from the app bundle when a SuperLink runs it in its own
``flwr-serverapp`` process; privml's ``privml flower run`` runs the same :class:`Coordinator`
in its own process (:mod:`privml.fl.flower.run`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp
except ImportError:  # an optional extra is missing: say which, and how to install it
    from privml.extras import require

    require("flower", "Running on Flower (privml flower, --engine flower)")
    raise

from privml.config import Config
from privml.data.encoding import Encoder, Task
from privml.data.federation import FederatedData
from privml.errors import ConfigError, PrivmlError, UsageError
from privml.fl.engine import (
    RoundRecord,
    ServerPlan,
    TrainingResult,
    aggregate_round,
    cohort_size,
    init_params,
    init_server_state,
    plan_round,
)
from privml.fl.flower import protocol as P
from privml.fl.flower.evaluation import EvalStats, pooled_metrics
from privml.fl.flower.site import check_supported, site_names, site_prox_mu
from privml.fl.metrics import MAX_SITES_PER_ROUND, ROUND_KEYS
from privml.fl.validate import REJECTION_REASONS
from privml.models.nets import ModelSpec

__all__ = ["Coordinator", "FlowerTraining", "SiteEntry", "app"]

log = logging.getLogger("privml.flower")


class SiteFailure(PrivmlError, RuntimeError):
    """A site refused or failed a request (its error message is included)."""

    exit_code = 2


@dataclass(frozen=True)
class SiteEntry:
    """A connected site: its config name and index, its SuperNode, its record counts."""

    name: str
    index: int
    node_id: int
    n_train: int
    n_test: int


@dataclass
class FlowerTraining:
    """A finished deployment run: the training result plus who took part and timings."""

    result: TrainingResult
    sites: list[SiteEntry]
    encoder: Encoder
    task: Task
    timing: dict[str, Any] = field(default_factory=dict)


def _reason(msg: Message) -> str:
    return f"{msg.error.reason} (code {msg.error.code})"


class Coordinator:
    """Run privml's federated training over a Flower ``Grid``.

    Args:
        grid: the Flower grid of the run.
        config: the run's config (the same as every site's).
        wait_for_sites: seconds to wait for every configured site to connect, > 0.
        round_timeout: seconds a round waits for replies before dropping the missing sites, > 0.
        poll_interval: first wait between polls for replies, seconds (doubles up to 0.5 s).
        liveness_interval: how often a round checks which SuperNodes are still online, seconds;
            it stops waiting for one the SuperLink has marked offline (missed heartbeats).
    """

    def __init__(
        self,
        grid: Grid,
        config: Config,
        *,
        wait_for_sites: float = 300.0,
        round_timeout: float = 600.0,
        poll_interval: float = 0.01,
        liveness_interval: float = 2.0,
    ) -> None:
        for name, value in (
            ("wait_for_sites", wait_for_sites),
            ("round_timeout", round_timeout),
            ("poll_interval", poll_interval),
            ("liveness_interval", liveness_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UsageError(
                    f"The {name!r} parameter of Coordinator must be a number > 0. "
                    f"Got {value!r} instead."
                )
        check_supported(config)
        self.grid = grid
        self.config = config
        self.wait_for_sites = float(wait_for_sites)
        self.round_timeout = float(round_timeout)
        self.poll_interval = float(poll_interval)
        self.liveness_interval = float(liveness_interval)
        self.fingerprint = P.fingerprint(config)
        self._fp_json = json.dumps(self.fingerprint)

    # -- messaging -----------------------------------------------------------------------

    def _message(self, node: int, kind: str, records: dict[str, Any], group: str) -> Message:
        return Message(RecordDict(records), node, kind, ttl=self.round_timeout, group_id=group)

    def exchange(self, messages: list[Message], *, timeout: float) -> dict[int, Message]:
        """Push ``messages``; return the replies (by destination node) that came in time."""
        if not messages:
            return {}
        dst = [m.metadata.dst_node_id for m in messages]
        ids = list(self.grid.push_messages(messages))
        waiting = {mid: node for mid, node in zip(ids, dst, strict=True) if mid}
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout
        pause = self.poll_interval
        next_check = time.monotonic() + self.liveness_interval
        while waiting and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(list(waiting)))
            for reply in got:
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
            if waiting and time.monotonic() > next_check:
                # a SuperNode the SuperLink no longer sees (missed heartbeats) will not answer
                online = set(self.grid.get_node_ids())
                for mid, node in list(waiting.items()):
                    if node not in online:
                        log.warning("SuperNode %s went offline; not waiting for it", node)
                        del waiting[mid]
                next_check = time.monotonic() + self.liveness_interval
            if waiting:
                time.sleep(pause if not got else self.poll_interval)
                pause = min(pause * 2, 0.5) if not got else self.poll_interval
        return replies

    def _settings(self, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"fingerprint": self._fp_json, **extra})

    def _request(self, params: np.ndarray, **extra: Any) -> dict[str, Any]:
        values: dict[str, Any] = {"fingerprint": self._fp_json, **extra}
        content = P.pack(values, P.PARAMS, params)
        content[P.SETTINGS] = ConfigRecord(values)
        return content

    # -- handshake -----------------------------------------------------------------------

    def _site_from_reply(
        self, node: int, reply: Message, expected: list[str], found: dict[str, SiteEntry]
    ) -> tuple[SiteEntry, dict[str, Any]]:
        """Check one SuperNode's handshake reply; return its site and its task/encoding."""
        if reply.has_error():
            raise SiteFailure(f"SuperNode {node} refused the run: {_reason(reply)}")
        rec = reply.content.config_records.get(P.SITE)
        if rec is None:
            raise SiteFailure(f"SuperNode {node} sent no site information")
        name = str(rec.get("site"))
        if name not in expected:
            raise ConfigError(
                f"SuperNode {node} serves site {name!r}, which this config does not "
                f"list (sites: {expected}); give it the coordinator's config"
            )
        if name in found:
            raise UsageError(
                f"two SuperNodes ({found[name].node_id} and {node}) serve site "
                f"{name!r}; stop one of them"
            )
        try:
            theirs = json.loads(str(rec.get("fingerprint", "null")))
            site_info = {
                "task": json.loads(str(rec.get("task"))),
                "encoding": json.loads(str(rec.get("encoding"))),
            }
            index = int(rec.get("site_index", -1))  # type: ignore[arg-type]
            n_train = int(rec.get("n_train", 0))  # type: ignore[arg-type]
            n_test = int(rec.get("n_test", 0))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise SiteFailure(f"SuperNode {node} sent malformed site information ({exc})") from None
        diff = P.fingerprint_mismatch(self.fingerprint, theirs)
        if diff:
            raise ConfigError(
                f"site {name!r} runs a config that differs from the coordinator's "
                f"in {diff}; give every site the same config file"
            )
        if index != expected.index(name):
            raise ConfigError(
                f"site {name!r} says it is site {index} of the config, the "
                f"coordinator's config has it at {expected.index(name)}"
            )
        return SiteEntry(name, index, node, n_train, n_test), site_info

    def handshake(self) -> tuple[list[SiteEntry], Encoder, Task]:
        """Wait for every configured site; check they agree; return them in config order."""
        expected = site_names(self.config)
        found: dict[str, SiteEntry] = {}
        info: dict[str, dict[str, Any]] = {}
        asked: set[int] = set()
        pending: dict[str, int] = {}  # query message id -> SuperNode
        deadline = time.monotonic() + self.wait_for_sites
        while len(found) < len(expected):
            # ask every newly connected SuperNode once; never block on one that is slow or gone
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                asked.update(new)
                msgs = [
                    self._message(n, MessageType.QUERY, {P.SETTINGS: self._settings()}, "hello")
                    for n in new
                ]
                ids = list(self.grid.push_messages(msgs))
                pending.update({mid: n for mid, n in zip(ids, new, strict=True) if mid})
            replies = list(self.grid.pull_messages(list(pending))) if pending else []
            for reply in replies:
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    entry, site_info = self._site_from_reply(node, reply, expected, found)
                    found[entry.name] = entry
                    info[entry.name] = site_info
                    log.info("site %s connected (SuperNode %s)", entry.name, node)
            if len(found) < len(expected):
                if time.monotonic() > deadline:
                    missing = [n for n in expected if n not in found]
                    raise UsageError(
                        f"sites {missing} did not connect within {self.wait_for_sites:.0f} s; "
                        "start their SuperNodes (`privml flower supernode --site NAME "
                        "--config FILE`) or raise --wait-for-sites"
                    )
                time.sleep(0.05 if replies else 0.2)
        sites = sorted(found.values(), key=lambda s: s.index)
        first = info[sites[0].name]
        for s in sites[1:]:
            if info[s.name]["task"] != first["task"]:
                raise ConfigError(
                    f"sites {sites[0].name!r} and {s.name!r} derived different tasks from their "
                    f"labels ({first['task']} vs {info[s.name]['task']}); declare "
                    "data.classes in the config"
                )
            if info[s.name]["encoding"] != first["encoding"]:
                raise ConfigError(
                    f"sites {sites[0].name!r} and {s.name!r} encode differently; declare the "
                    "same [data.schema] for every site"
                )
        encoder = Encoder.from_dict(first["encoding"])
        t = first["task"]
        task = Task(t["kind"], t["target"], tuple(t["classes"]))
        return sites, encoder, task

    # -- rounds --------------------------------------------------------------------------

    def _stats(self, reply: Message) -> EvalStats | None:
        if reply.has_error() or not reply.has_content():
            return None
        rec = reply.content.config_records.get(P.RESULT)
        if rec is None or "n" not in rec:
            return None
        try:
            n = int(rec["n"])  # type: ignore[arg-type]
            loss_sum = float(rec["loss_sum"])  # type: ignore[arg-type]
            confusion = P.array_from_bytes(rec["confusion"])
            hist = P.array_from_bytes(rec["hist"])
        except (KeyError, TypeError, ValueError, OSError):
            return None
        if confusion.dtype.kind not in "iu" or hist.dtype.kind not in "iu":
            return None
        if (confusion < 0).any() or (hist < 0).any() or n < 0 or not np.isfinite(loss_sum):
            return None
        return {"n": n, "loss_sum": loss_sum, "confusion": confusion, "hist": hist}

    def run(self, *, on_round: Callable[[RoundRecord], None] | None = None) -> FlowerTraining:
        """Handshake, then ``training.rounds`` rounds and a final evaluation.

        Each round follows the simulation: :func:`privml.fl.engine.plan_round` picks the
        participants (sampling, simulated dropouts and stragglers), and
        :func:`privml.fl.engine.aggregate_round` validates the replies and aggregates them
        with the configured rule and server optimizer. A participant that does not answer
        within ``round_timeout`` or answers with an error is left out of the round.
        """
        training = self.config.training
        t_start = time.perf_counter()
        sites, encoder, task = self.handshake()
        t_hand = time.perf_counter() - t_start
        from privml.pipeline import model_spec

        spec: ModelSpec = model_spec(self.config, FederatedData([], encoder, task))
        plan = ServerPlan.from_training(training)
        model, params0 = init_params(spec, training.seed)
        state = init_server_state(params0, plan)
        history: list[RoundRecord] = []
        pending: RoundRecord | None = None
        totals: dict[str, Any] = {
            "accepted": 0,
            "rejected": 0,
            "by_reason": dict.fromkeys(REJECTION_REASONS, 0),
            "dropped": 0,
            "stragglers": 0,
            "skipped_rounds": {},
            "timed_out": 0,
            "site_errors": 0,
        }
        last_stats: dict[str, EvalStats] = {}
        round_seconds: list[float] = []

        def close(record: RoundRecord, replies: dict[int, Message]) -> None:
            stats = {
                s.name: st
                for s in sites
                if s.node_id in replies and (st := self._stats(replies[s.node_id])) is not None
            }
            last_stats.clear()
            last_stats.update(stats)
            pooled = pooled_metrics(list(stats.values()))
            record.loss = pooled["loss"]
            record.accuracy = pooled["accuracy"]
            record.auc = pooled["auc"]
            if len(sites) <= MAX_SITES_PER_ROUND:
                record.per_site = {
                    name: {k: m[k] for k in ROUND_KEYS}
                    for name, m in ((n, pooled_metrics([st])) for n, st in stats.items())
                }
            history.append(record)
            if on_round is not None:
                on_round(record)

        for rnd in range(1, training.rounds + 1):
            t0 = time.perf_counter()
            rp = plan_round(len(sites), training, rnd)
            participants = {int(i) for i in rp.participants}
            # identical content for every site: Flower stores and moves it once
            content = self._request(state.params, round=rnd, evaluate=pending is not None)
            msgs = []
            for s in sites:
                if s.index in participants:
                    msgs.append(self._message(s.node_id, MessageType.TRAIN, content, str(rnd)))
                elif pending is not None:
                    msgs.append(self._message(s.node_id, MessageType.EVALUATE, content, str(rnd)))
            replies = self.exchange(msgs, timeout=self.round_timeout)
            if pending is not None:
                close(pending, replies)
            updates: list[Any] = []
            weights: list[Any] = []
            timed_out = failed = 0
            for s in sites:
                if s.index not in participants:
                    continue
                reply = replies.get(s.node_id)
                if reply is None:
                    timed_out += 1
                    log.warning("round %d: site %s did not answer in time; left out", rnd, s.name)
                    continue
                if reply.has_error():
                    failed += 1
                    log.warning("round %d: site %s failed: %s", rnd, s.name, _reason(reply))
                    continue
                meta = reply.content.config_records.get(P.RESULT)
                # None (absent or unreadable) is rejected by the validation with reason "type"
                updates.append(P.unpack(reply.content, P.RESULT, P.UPDATE))
                weights.append(meta.get("n_train") if meta is not None else None)
            outcome = aggregate_round(state, updates, weights, plan=plan)
            state = outcome.state
            totals["accepted"] += outcome.counts["accepted"]
            totals["rejected"] += outcome.counts["rejected"]
            for reason, c in outcome.counts["by_reason"].items():
                totals["by_reason"][reason] += c
            totals["dropped"] += len(rp.dropped)
            totals["stragglers"] += len(rp.stragglers)
            totals["timed_out"] += timed_out
            totals["site_errors"] += failed
            if outcome.skipped:
                totals["skipped_rounds"].setdefault(outcome.skipped, []).append(rnd)
            seconds = time.perf_counter() - t0
            round_seconds.append(seconds)
            sel = outcome.selected
            pending = RoundRecord(
                round=rnd,
                loss=None,
                accuracy=None,
                auc=None,
                clients=len(updates),
                rejected=outcome.counts["rejected"],
                seconds=seconds,
                sampled=len(rp.sampled),
                dropped=len(rp.dropped) + timed_out + failed,
                stragglers=len(rp.stragglers),
                malicious=0,
                selected=None if sel is None else len(sel),
                malicious_selected=None if sel is None else 0,
                skipped=outcome.skipped,
            )
        # final evaluation of the last model at every site
        request = self._request(state.params)
        msgs = [self._message(s.node_id, MessageType.EVALUATE, request, "final") for s in sites]
        replies = self.exchange(msgs, timeout=self.round_timeout)
        assert pending is not None
        close(pending, replies)
        metrics = pooled_metrics(list(last_stats.values()))
        metrics["per_site"] = {
            s.name: pooled_metrics([last_stats[s.name]] if s.name in last_stats else [])
            for s in sites
        }
        timing = {
            "handshake_seconds": t_hand,
            "round_seconds": round_seconds,
            "total_seconds": time.perf_counter() - t_start,
        }
        prox_mu = site_prox_mu(training)
        federation = {
            "engine": "flower",
            "strategy": training.strategy,
            "prox_mu": prox_mu if training.strategy == "fedprox" else None,
            **plan.to_dict(),
            "clients_per_round": cohort_size(len(sites), training),
            "n_sites": len(sites),
            "dropout": training.dropout,
            "straggler": training.straggler,
            "straggler_policy": "late updates are discarded (synchronous rounds)",
            "round_timeout_seconds": self.round_timeout,
            "fltrust_root": None,
            "resumed_after_round": None,
        }
        updates_section = {**totals, "max_update_norm": training.max_update_norm}
        extra = {"updates": updates_section, "federation": federation, "attack": None}
        final = torch.from_numpy(state.params.copy())
        result = TrainingResult(
            spec, model, final, history, metrics, int(totals["rejected"]), extra
        )
        return FlowerTraining(result, sites, encoder, task, timing)


app = ServerApp()
"""The ServerApp a SuperLink runs for a privml run (config in the run config)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the coordinator with the run's config; write the run folder if the run names one."""
    config = P.config_from_run_config(dict(context.run_config))
    training = Coordinator(grid, config).run()
    out = context.run_config.get(P.OUT_DIR_KEY)
    if isinstance(out, str) and out:
        from privml.fl.flower.run import write_run

        write_run(config, training, Path(out))
