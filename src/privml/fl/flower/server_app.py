"""privml's Flower ServerApp: the coordinator side of a deployment (message API).

:class:`Coordinator` runs the round engine, :func:`privml.fl.rounds.run_rounds`, with the same
server stages as the simulation and the site stages at the SuperNodes (:class:`FlowerEngine`):

1. handshake: every SuperNode reports which site of the config it serves; the coordinator waits
   until each configured site is connected and checks that all of them run the same config
   (fingerprints), task and encoding; then the stages' setup requests (secure aggregation: the
   key holder makes the keys, every site gets the public material);
2. each round: the participants (the simulation's own cohort sampler) get ``train`` messages
   with the global parameters and run the site stages (local update, simulated attacker,
   encryption); the replies go through the server stages (validation, the configured rule
   and server optimizer; or the encrypted sum and the key holder's decryption, requested
   over a message); sites that do not answer within ``round_timeout`` are left out of the
   round; the server state is checkpointed after every round;
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
import threading
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
from privml.fl.checkpoint import ServerState
from privml.fl.engine import TrainingResult
from privml.fl.flower import protocol as P
from privml.fl.flower.evaluation import EvalStats, pooled_metrics
from privml.fl.flower.site import check_supported, site_names
from privml.fl.metrics import MAX_SITES_PER_ROUND, ROUND_KEYS
from privml.fl.plan import init_params
from privml.fl.plan_private import CoordinatorPrivacy
from privml.fl.rounds import Cohort, Received, RoundRecord, RoundsPlan, restore, run_rounds
from privml.fl.stages.aggregate import CheckedAggregation, ServerPlan, init_server_state
from privml.fl.stages.attack import attacker_indices
from privml.fl.stages.checkpoint import Checkpointing
from privml.fl.stages.cohort import UniformCohort
from privml.fl.stages.local import prox_weight
from privml.fl.stages.optimizer import ServerOptimizerStep
from privml.fl.stages.private import fold_shift
from privml.fl.stages.secure import SecureSetup, SecureSum
from privml.models.nets import ModelSpec
from privml.results import results_document

__all__ = [
    "Coordinator",
    "FlowerEngine",
    "FlowerTraining",
    "SiteEntry",
    "app",
    "flower_results",
    "write_run",
]

log = logging.getLogger("privml.flower")


class SiteFailure(PrivmlError, RuntimeError):
    """A site refused or failed a request (its error message is included)."""

    exit_code = 2


class SuperLinkLost(PrivmlError, RuntimeError):
    """The SuperLink went away or restarted and no longer knows this run (the coordinator
    reconnects and resumes from its last checkpoint)."""

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
    rejoins: list[dict[str, Any]] = field(default_factory=list)
    """Sites whose SuperNode came back under a new node id, and before which round."""


def _reason(msg: Message) -> str:
    return f"{msg.error.reason} (code {msg.error.code})"


def _number(value: object) -> float:
    """A site's reported epsilon: a finite float >= 0, else 0 (nothing reported)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if np.isfinite(value) and value >= 0 else 0.0


class Coordinator:
    """Run privml's federated training over a Flower ``Grid``.

    Args:
        grid: the Flower grid of the run.
        config: the run's config (the same as every site's).
        wait_for_sites: seconds to wait for every configured site to connect, > 0 (default
            ``training.wait_for_sites``).
        round_timeout: seconds a round waits for replies before dropping the missing sites, > 0
            (default ``training.round_timeout``).
        poll_interval: first wait between polls for replies, seconds (doubles up to 0.5 s).
        liveness_interval: how often a round checks which SuperNodes are still online, seconds;
            it stops waiting for one the SuperLink has marked offline (missed heartbeats).
        lost: set when the SuperLink no longer knows this run (it restarted); the coordinator
            then stops with :class:`SuperLinkLost` at its next poll.
    """

    def __init__(
        self,
        grid: Grid,
        config: Config,
        *,
        wait_for_sites: float | None = None,
        round_timeout: float | None = None,
        poll_interval: float = 0.01,
        liveness_interval: float = 2.0,
        lost: threading.Event | None = None,
    ) -> None:
        self.lost = lost
        if wait_for_sites is None:
            wait_for_sites = config.training.wait_for_sites
        if round_timeout is None:
            round_timeout = config.training.round_timeout
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
        # SuperNodes asked which site they serve, hellos not answered yet (message id ->
        # SuperNode, time sent), and each site's task and encoding from the handshake
        self._asked: set[int] = set()
        self._hellos: dict[str, tuple[int, float]] = {}
        self._site_info: dict[str, dict[str, Any]] = {}
        self.rejoins: list[dict[str, Any]] = []
        self._setup: dict[str, Any] | None = None  # what a stage's setup sent every site
        self._centre: np.ndarray | None = None  # the run's input centre (private training)
        self._sites: list[SiteEntry] | None = None  # the run's sites, once rounds run
        self._rejoining = False
        self._gone: set[int] = set()  # SuperNodes of sites seen offline
        self.refused: set[int] = set()  # SuperNodes of sites that failed the checks on return
        self._round = 0

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
            self._check_link()
            got = list(self.grid.pull_messages(list(waiting)))
            for reply in got:
                node = waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
            if waiting and time.monotonic() > next_check:
                # a SuperNode the SuperLink no longer sees (missed heartbeats) will not answer,
                # nor will one whose site came back under another SuperNode (restarted)
                online = set(self.grid.get_node_ids())
                serving = None
                if self._sites is not None:
                    self.rejoin(self._sites, self._round + 1, wait=0.0)  # too late for this one
                    serving = {s.node_id for s in self._sites}
                for mid, node in list(waiting.items()):
                    if node not in online:
                        log.warning("SuperNode %s went offline; not waiting for it", node)
                        del waiting[mid]
                    elif serving is not None and node not in serving:
                        log.warning("SuperNode %s was replaced; not waiting for it", node)
                        del waiting[mid]
                next_check = time.monotonic() + self.liveness_interval
            if waiting:
                time.sleep(pause if not got else self.poll_interval)
                pause = min(pause * 2, 0.5) if not got else self.poll_interval
        return replies

    def _check_link(self) -> None:
        if self.lost is not None and self.lost.is_set():
            raise SuperLinkLost("the SuperLink no longer knows this run (it restarted)")

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
            self._check_link()
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
        now = time.monotonic()
        self._asked, self._site_info = asked, info
        self._hellos = {mid: (node, now) for mid, node in pending.items()}
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

    def rejoin(self, sites: list[SiteEntry], rnd: int, *, wait: float = 5.0) -> None:
        """Map each site to the SuperNode that serves it now: a SuperNode not seen before (a
        site's SuperNode restarted, under a new node id) is asked which site it serves, its
        config fingerprint, task and encoding are checked again as in the handshake, and it
        takes its site over (``sites`` is updated in place). Waits at most ``wait`` seconds for
        the answers; a SuperNode that answers later is taken at a later call. A SuperNode that
        fails the checks is left out (logged), never used. ``rnd``: the first round the site
        can take part in again (recorded in :attr:`rejoins` as ``before_round``)."""
        if self._rejoining:  # a rejoining site's setup request polls too
            return
        self._rejoining = True
        try:
            self._rejoin(sites, rnd, wait)
        finally:
            self._rejoining = False

    def _rejoin(self, sites: list[SiteEntry], rnd: int, wait: float) -> None:
        expected = site_names(self.config)
        now = time.monotonic()
        for mid, (node, sent) in list(self._hellos.items()):
            if now - sent > self.round_timeout:  # expired: ask again if it is still there
                del self._hellos[mid]
                self._asked.discard(node)
        online = set(self.grid.get_node_ids())
        # a site's SuperNode that went offline and is back under the same node id (restarted,
        # with SuperNode authentication) is asked again, like a new one
        self._gone.update(s.node_id for s in sites if s.node_id not in online)
        for n in self._gone & online:
            self._gone.discard(n)
            self._asked.discard(n)
        new = [n for n in online if n not in self._asked]
        if new:
            self._asked.update(new)
            msgs = [
                self._message(n, MessageType.QUERY, {P.SETTINGS: self._settings()}, "hello")
                for n in new
            ]
            ids = list(self.grid.push_messages(msgs))
            self._hellos.update({mid: (n, now) for mid, n in zip(ids, new, strict=True) if mid})
        if not self._hellos:
            return
        deadline = time.monotonic() + (wait if new else 0.0)
        pause = self.poll_interval
        while self._hellos:
            for reply in self.grid.pull_messages(list(self._hellos)):
                got = self._hellos.pop(reply.metadata.reply_to_message_id, None)
                if got is not None:
                    self._take_over(sites, got[0], reply, expected, rnd)
            if not self._hellos or time.monotonic() >= deadline:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _take_over(
        self, sites: list[SiteEntry], node: int, reply: Message, expected: list[str], rnd: int
    ) -> None:
        mapped = {s.node_id: s for s in sites}

        def refuse(why: str) -> None:
            log.warning("SuperNode %s is not used: %s", node, why)
            if node in mapped:  # it served a site before it restarted: not any more
                self.refused.add(node)

        try:
            entry, info = self._site_from_reply(node, reply, expected, {})
        except PrivmlError as exc:
            refuse(str(exc))
            return
        old = sites[entry.index]
        if node in mapped and mapped[node].name != entry.name:
            refuse(f"it served site {mapped[node].name!r} and now says {entry.name!r}")
            return
        if info != self._site_info.get(entry.name) or (entry.n_train, entry.n_test) != (
            old.n_train,
            old.n_test,
        ):
            refuse(f"it serves site {entry.name!r} with other data, task or encoding than at "
                   "the start of the run")  # fmt: skip
            return
        new = SiteEntry(old.name, old.index, node, old.n_train, old.n_test)
        try:  # a restarted site lost its private set-up and the public material
            self._private_again(new)
            if self._setup is not None:
                self.ask(new, "setup", **self._setup)
        except PrivmlError as exc:
            refuse(str(exc))
            return
        self.refused.discard(node)
        sites[entry.index] = new
        self.rejoins.append({"site": old.name, "before_round": rnd, "node_id": node,
                             "previous_node_id": old.node_id})  # fmt: skip
        log.warning("site %s is back as SuperNode %s (was %s)", old.name, node, old.node_id)

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

    def ask(self, site: SiteEntry, service: str, array: np.ndarray | None = None,
            **values: Any) -> Message:  # fmt: skip
        """Send ``site`` a ``service`` request (a stage's setup or key-holder request) and
        return its reply; SiteFailure when it refuses or does not answer in time."""
        settings: dict[str, Any] = {"fingerprint": self._fp_json, "service": service, **values}
        content = P.pack(settings, P.PARAMS, array) if array is not None else {}
        content[P.SETTINGS] = ConfigRecord(settings)
        msg = self._message(site.node_id, MessageType.QUERY, content, service)
        reply = self.exchange([msg], timeout=self.round_timeout).get(site.node_id)
        if reply is None:
            raise SiteFailure(f"site {site.name!r} did not answer the {service} request in time")
        if reply.has_error():
            raise SiteFailure(f"site {site.name!r} refused the {service} request: {_reason(reply)}")
        return reply

    def ask_all(self, sites: list[SiteEntry], service: str, array: np.ndarray | None = None,
                **values: Any) -> dict[str, Message]:  # fmt: skip
        """Send every site of ``sites`` the same ``service`` request in one exchange; their
        replies by site name. SiteFailure when one refuses or does not answer in time."""
        settings: dict[str, Any] = {"fingerprint": self._fp_json, "service": service, **values}
        content = P.pack(settings, P.PARAMS, array) if array is not None else {}
        content[P.SETTINGS] = ConfigRecord(settings)
        msgs = [self._message(s.node_id, MessageType.QUERY, content, service) for s in sites]
        replies = self.exchange(msgs, timeout=self.round_timeout)
        out = {}
        for s in sites:
            reply = replies.get(s.node_id)
            if reply is None:
                raise SiteFailure(f"site {s.name!r} did not answer the {service} request in time")
            if reply.has_error():
                raise SiteFailure(f"site {s.name!r} refused the {service} request: "
                                  f"{_reason(reply)}")  # fmt: skip
            out[s.name] = reply
        return out

    def _private(self, sites: list[SiteEntry], spec: ModelSpec,
                 engine: FlowerEngine) -> CoordinatorPrivacy | None:  # fmt: skip
        """Private training's setup. Each site plans its private training from its own
        config, checks the plan against its own ledger's budget and books what it spends
        before training (the ``private`` request; a site that cannot afford the run refuses
        it and the run stops before round 1). Under input centring, the sites' private means
        are averaged with their public sizes and every site shifts its inputs by the result."""
        if self.config.privacy.mode == "none":
            return None
        from privml.dp.randomness import run_noise_source
        from privml.fl.plan_private import coordinator_private_parts

        noise = run_noise_source(self.config.training.seed)  # the server's own draws
        private = coordinator_private_parts(self.config, [s.name for s in sites],
                                            [s.n_train for s in sites], spec, noise)  # fmt: skip
        replies = self.ask_all(sites, "private")
        total, n_total = None, 0
        for s in sites:
            rec = replies[s.name].content.config_records.get(P.RESULT)
            eps = _number(rec.get("epsilon") if rec is not None else None)
            engine.booked[s.name] = [[0, eps]] if eps else []
            est = P.unpack(replies[s.name].content, P.RESULT, "centre")
            if private.centre and est is not None and s.n_train:
                if est.dtype.kind != "f" or est.ndim != 1 or not np.isfinite(est).all():
                    raise SiteFailure(f"site {s.name!r} sent an unreadable input mean")
                total = est * s.n_train if total is None else total + est * s.n_train
                n_total += s.n_train
        if private.centre and total is not None:
            engine.centre = total / max(n_total, 1)
            self.ask_all(sites, "centre", array=engine.centre)
        self._centre = engine.centre
        return private

    def _private_again(self, site: SiteEntry) -> None:
        """A site whose SuperNode restarted sets up its private training again (a fresh
        booking in its own ledger, checked against its budget) and takes the run's input
        centre, without computing a new private mean."""
        if self.config.privacy.mode == "none":
            return
        self.ask(site, "private", estimate_centre=False)
        if self._centre is not None:
            self.ask(site, "centre", array=self._centre)

    def _secure(self, sites: list[SiteEntry], n_params: int, engine: FlowerEngine,
                options: dict[str, Any] | None = None) -> SecureSum:  # fmt: skip
        """Secure aggregation's setup: keys at the key holder, public material to every site
        (``options``: client-level DP's clip, value bound, unweighted sum and denominator)."""
        t = self.config.training
        o = options or {}
        counts = [s.n_train for s in sites]
        setup = SecureSetup.from_training(t, [s.name for s in sites], counts, n_params=n_params,
                                          clip=o.get("clip"),
                                          value_bound=o.get("value_bound"))  # fmt: skip
        holder = next(s for s in sites if s.name == setup.key_holder)
        reply = self.ask(holder, "keygen", counts=json.dumps(counts))
        public = P.unpack(reply.content, P.RESULT, "public")
        if public is None:
            raise SiteFailure(f"the key holder {holder.name!r} sent no public material")
        pub = public.astype(np.uint8).tobytes()
        self._setup = {"array": np.frombuffer(pub, np.uint8), "counts": json.dumps(counts)}
        for s in sites:
            self.ask(s, "setup", **self._setup)
        engine.key_holder = holder
        return SecureSum(setup, pub, decrypt=engine.decrypt,
                         weighted=bool(o.get("weighted", True)),
                         denominator=o.get("denominator"),
                         require_all=bool(o.get("require_all", False)))  # fmt: skip

    def run(
        self,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
        checkpoint_dir: Path | None = None,
        resume: bool = False,
    ) -> FlowerTraining:
        """Handshake, then the rounds (from the checkpoint with ``resume``) and a final
        evaluation.

        Each round follows the simulation (:func:`privml.fl.rounds.run_rounds`): the same
        cohort sampler, the same server stages. A participant that does not answer within
        ``round_timeout`` or answers with an error is left out of the round.
        """
        training = self.config.training
        t_start = time.perf_counter()
        sites, encoder, task = self.handshake()
        t_hand = time.perf_counter() - t_start
        from privml.pipeline import model_spec

        spec: ModelSpec = model_spec(self.config, FederatedData([], encoder, task))
        server = ServerPlan.from_training(training)
        model, params0 = init_params(spec, training.seed)
        state = init_server_state(params0, server)
        engine = FlowerEngine(self, sites, model, self._malicious(sites))
        private = self._private(sites, spec, engine)
        run_id = self._run_id(sites, encoder, task)
        plan = self._plan(sites, server, engine, private, int(state.params.shape[0]),
                          checkpoint_dir, run_id)  # fmt: skip
        history, tally, resumed_after = None, None, None
        if resume:
            if checkpoint_dir is None:
                raise UsageError("Coordinator.run(resume=True) needs the checkpoint_dir")
            ck = plan.checkpoint.load()  # type: ignore[union-attr]
            state, resumed_after = ck.state, ck.state.round
            history, tally = restore(ck.meta, plan)
        out = run_rounds(plan, engine, state, history=history, tally=tally, on_round=on_round)
        timing = {"handshake_seconds": t_hand, "round_seconds": engine.round_seconds,
                  "total_seconds": time.perf_counter() - t_start}  # fmt: skip
        extra = self._sections(sites, server, plan, engine, resumed_after, out.tally)
        if private is not None:
            extra["privacy"] = private.describe(engine.booked, run_id)
        final = torch.from_numpy(out.state.params.copy())
        if engine.centre is not None:  # the model on the sites' raw inputs
            final = fold_shift(model, final, engine.centre)
        result = TrainingResult(spec, model, final, out.history, out.metrics, out.tally.rejected,
                                extra)  # fmt: skip
        return FlowerTraining(result, sites, encoder, task, timing, list(self.rejoins))

    def _plan(
        self, sites: list[SiteEntry], server: ServerPlan, engine: FlowerEngine,
        private: CoordinatorPrivacy | None, n_params: int, checkpoint_dir: Path | None,
        run_id: str,
    ) -> RoundsPlan:  # fmt: skip
        """The server side of the rounds: the same stages as the simulation's."""
        training = self.config.training
        combine: Any = CheckedAggregation(server)
        if private is not None and private.combine is not None:
            combine = private.combine
        if training.secure_aggregation == "secagg+":
            from privml.fl.flower.secaggplus import SecAggPlusSettings, WorkflowRound, WorkflowSum

            settings = SecAggPlusSettings.from_config(self.config)
            engine.secagg = WorkflowRound(settings, float(max(s.n_train for s in sites)))
            combine = WorkflowSum(settings, engine.secagg)
        elif training.secure_aggregation != "none":
            combine = self._secure(sites, n_params, engine,
                                   private.secure if private is not None else None)  # fmt: skip
        checkpoint = Checkpointing(checkpoint_dir, run_id) if checkpoint_dir is not None else None
        cohort: Any = UniformCohort.from_training(len(sites), training)
        if private is not None and private.cohort is not None:
            cohort = private.cohort
        return RoundsPlan(
            training.rounds, cohort, combine, ServerOptimizerStep(server.optimizer),
            list(private.server_stages) if private is not None else [],
            list(private.stateful) if private is not None else [], checkpoint,
            min_sites=training.min_sites_per_round,
        )  # fmt: skip

    def _sections(
        self, sites: list[SiteEntry], server: ServerPlan, plan: RoundsPlan,
        engine: FlowerEngine, resumed_after: int | None, tally: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """results.json's ``updates``, ``federation`` and ``attack`` of the run."""
        training = self.config.training
        combine = plan.combine
        federation = {
            "engine": "flower",
            "strategy": training.strategy,
            "prox_mu": prox_weight(training) if training.strategy == "fedprox" else None,
            **server.to_dict(),
            "clients_per_round": getattr(plan.cohort, "size", None),
            "n_sites": len(sites),
            "dropout": training.dropout,
            "straggler": training.straggler,
            "straggler_policy": "late updates are discarded (synchronous rounds)",
            "round_timeout_seconds": self.round_timeout,
            "wait_for_sites_seconds": self.wait_for_sites,
            "min_sites_per_round": training.min_sites_per_round,
            "fltrust_root": None,
            "resumed_after_round": resumed_after,
            "secure_aggregation": combine.describe(None, None)  # type: ignore[attr-defined]
            if isinstance(combine, SecureSum) or training.secure_aggregation == "secagg+"
            else None,
        }  # fmt: skip
        if self.config.privacy.mode == "client":
            federation["aggregator"] = "dp-fedavg"
        updates_section = {**tally.to_dict(), "max_update_norm": training.max_update_norm}
        attack = None
        if self.config.attack is not None:
            attack = {"kind": self.config.attack.kind, "sites": [
                s.name for s in sites if engine.malicious[s.index]]}  # fmt: skip
        return {"updates": updates_section, "federation": federation, "attack": attack}

    def _malicious(self, sites: list[SiteEntry]) -> np.ndarray:
        mask = np.zeros(len(sites), dtype=bool)
        if self.config.attack is not None:
            names = [s.name for s in sites]
            mask[attacker_indices(self.config.attack, names, self.config.training.seed)] = True
        return mask

    def _run_id(self, sites: list[SiteEntry], encoder: Encoder, task: Task) -> str:
        """What a checkpoint of this deployment is bound to: the config and the sites."""
        import hashlib

        config = self.config.resolved()
        config.pop("output", None)
        desc = {"config": config, "task": task.to_dict(), "encoding": encoder.to_dict(),
                "sites": [(s.name, s.index, s.n_train, s.n_test) for s in sites]}  # fmt: skip
        return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


class FlowerEngine:
    """The site side of each round, run at the SuperNodes over Flower messages.

    Evaluation of a round's model rides on the next round's messages (sites evaluate the
    parameters they receive before training; sites outside the cohort get an ``evaluate``
    message in the same exchange), so a round costs one message exchange; :meth:`finish`
    evaluates the last model at every site.
    """

    name = "flower"

    def __init__(self, coordinator: Coordinator, sites: list[SiteEntry], model: Any,
                 malicious: np.ndarray) -> None:  # fmt: skip
        self.c = coordinator
        self.sites = sites
        self.model = model
        self.malicious = malicious
        self.key_holder: SiteEntry | None = None
        self.secagg: Any = None  # SecAgg+: the workflow's rounds (secaggplus.WorkflowRound)
        self.round_seconds: list[float] = []
        self.booked: dict[str, list[list[float]]] = {}
        """site -> ``[round, epsilon]``: what each site reports having booked (informational)."""
        self.centre: np.ndarray | None = None
        self._evaluate_next = False
        self._retry_round = 0
        self._retry_deadline = 0.0
        self._late: dict[str, Any] | None = None
        self.last_stats: dict[str, EvalStats] = {}

    def train(
        self, rnd: int, state: ServerState, cohort: Cohort, only: set[int] | None = None
    ) -> Received:
        t0 = time.perf_counter()
        c = self.c
        c._sites, c._round = self.sites, rnd
        if only is None:
            c.rejoin(self.sites, rnd)
        participants = {int(i) for i in cohort.participants} if only is None else only
        evaluate = self._evaluate_next and only is None
        # identical content for every site: Flower stores and moves it once
        # asked: the round's participants (a noise share is sized by them, also when the
        # round is sent again to the ones that were missing)
        if self.secagg is not None:
            received = self._train_secagg(rnd, state, cohort, participants, evaluate)
        else:
            received = self._train_plain(rnd, state, cohort, participants, evaluate)
        if only is None:
            self.round_seconds.append(time.perf_counter() - t0)
        else:
            self.round_seconds[-1] += time.perf_counter() - t0
        return received

    def _train_plain(self, rnd: int, state: ServerState, cohort: Cohort, participants: set[int],
                     evaluate: bool) -> Received:  # fmt: skip
        c = self.c
        content = c._request(state.params, round=rnd, evaluate=evaluate,
                             asked=max(len(cohort.participants), 1))  # fmt: skip
        msgs = []
        for s in self.sites:
            if s.node_id in c.refused:
                continue  # back after a restart but failed the checks: left out
            if s.index in participants:
                msgs.append(c._message(s.node_id, MessageType.TRAIN, content, str(rnd)))
            elif evaluate:
                msgs.append(c._message(s.node_id, MessageType.EVALUATE, content, str(rnd)))
        replies = c.exchange(msgs, timeout=c.round_timeout)
        if evaluate:
            self._late = self._pool(replies)
            self._evaluate_next = False
        return self._received(rnd, participants, replies)

    def _train_secagg(self, rnd: int, state: ServerState, cohort: Cohort,
                      participants: set[int], evaluate: bool) -> Received:  # fmt: skip
        """A round under SecAgg+: Flower's workflow with the participants (their training
        request rides on its collect stage, their evaluation statistics on their answers);
        the sites outside the cohort get their evaluation request in its first exchange."""
        c = self.c
        request = {"fingerprint": c._fp_json, "round": rnd, "evaluate": evaluate,
                   "asked": max(len(cohort.participants), 1)}  # fmt: skip
        asked = [s for s in self.sites if s.index in participants and s.node_id not in c.refused]
        extra = []
        if evaluate:
            content = c._request(state.params)
            extra = [c._message(s.node_id, MessageType.EVALUATE, content, str(rnd))
                     for s in self.sites
                     if s.index not in participants and s.node_id not in c.refused]  # fmt: skip
        nodes = [s.node_id for s in asked]
        res, collected, evaluated = self.secagg.run(c, rnd, state.params, nodes, request, extra)
        if evaluate:
            self._late = self._pool({**evaluated, **collected})
            self._evaluate_next = False
        ids, weights = [], []
        timed_out = failed = 0
        missed: dict[int, str] = {}
        senders = set(res.senders)
        for s in self.sites:
            if s.index not in participants:
                continue
            reply = collected.get(s.node_id)
            if s.node_id in senders and reply is not None:
                ids.append(s.index)
                weights.append(self._accept(s, reply, rnd))
            elif reply is not None or s.node_id in c.refused:
                failed += 1
                missed[s.index] = "site_error"
            else:
                timed_out += 1
                missed[s.index] = "timed_out"
        idx = np.asarray(ids, dtype=np.int64)
        return Received(idx, [], weights, self.malicious[idx], sealed=[None] * len(ids),
                        missing={"timed_out": timed_out, "site_errors": failed},
                        missed=missed, info={"secaggplus": res})  # fmt: skip

    def retry(
        self, rnd: int, state: ServerState, cohort: Cohort, received: Received
    ) -> Received | None:
        """Round ``rnd`` got fewer than ``min_sites_per_round`` updates: wait until a missing
        participant is connected again (within ``wait_for_sites`` of the round's first
        retry), send it the round again and add what comes back; None once that time is up.
        A site's update does not depend on when it is computed, so the round closes as it
        would have without the interruption."""
        c = self.c
        if self._retry_round != rnd:
            self._retry_round = rnd
            self._retry_deadline = time.monotonic() + c.wait_for_sites
        missing = {int(i) for i in cohort.participants} - {int(i) for i in received.ids}
        while True:
            c.rejoin(self.sites, rnd, wait=0.5)
            online = set(c.grid.get_node_ids())
            ready = {s.index for s in self.sites if s.index in missing and s.node_id in online}
            if ready:
                break
            if time.monotonic() > self._retry_deadline:
                return None
            time.sleep(0.5)
        if time.monotonic() > self._retry_deadline:
            return None
        log.warning("round %d: %d site(s) short of min_sites_per_round; sending it again to "
                    "%s", rnd, len(missing), sorted(self.sites[i].name for i in ready))  # fmt: skip
        if self.secagg is not None:  # masked sums do not merge: the whole round again
            return self.train(rnd, state, cohort, only={int(i) for i in cohort.participants})
        again = self.train(rnd, state, cohort, only=ready)
        return _merge(received, again)

    def _accept(self, s: SiteEntry, reply: Message, rnd: int) -> Any:
        """A site's answer taken into the round: the epsilon it booked in its own ledger is
        recorded (informational), and its record count is the update's weight."""
        meta = reply.content.config_records.get(P.RESULT)
        eps = _number(meta.get("epsilon") if meta is not None else None)
        if eps:
            self.booked.setdefault(s.name, []).append([rnd, eps])
        return meta.get("n_train") if meta is not None else None

    def _received(self, rnd: int, participants: set[int], replies: dict[int, Message]) -> Received:
        ids, updates, weights, sealed = [], [], [], []
        timed_out = failed = 0
        missed: dict[int, str] = {}
        secure = self.c.config.training.secure_aggregation != "none"
        for s in self.sites:
            if s.index not in participants:
                continue
            reply = replies.get(s.node_id)
            if reply is None and s.node_id in self.c.refused:
                failed += 1
                missed[s.index] = "site_error"
                log.warning("round %d: site %s failed the checks on its return", rnd, s.name)
                continue
            if reply is None:
                timed_out += 1
                missed[s.index] = "timed_out"
                log.warning("round %d: site %s did not answer in time; left out", rnd, s.name)
                continue
            if reply.has_error():
                failed += 1
                missed[s.index] = "site_error"
                log.warning("round %d: site %s failed: %s", rnd, s.name, _reason(reply))
                continue
            ids.append(s.index)
            weights.append(self._accept(s, reply, rnd))
            if secure:
                blob = P.unpack(reply.content, P.RESULT, "sealed")
                sealed.append(None if blob is None else blob.astype(np.uint8).tobytes())
            else:
                # None (absent or unreadable) is rejected by the validation with reason "type"
                updates.append(P.unpack(reply.content, P.RESULT, P.UPDATE))
        idx = np.asarray(ids, dtype=np.int64)
        return Received(idx, updates, weights, self.malicious[idx],
                        sealed=sealed if secure else None,
                        missing={"timed_out": timed_out, "site_errors": failed},
                        missed=missed)  # fmt: skip

    def decrypt(self, aggregate: bytes, n_contributions: int) -> np.ndarray:
        """The key holder's decryption of an encrypted sum, over a message."""
        assert self.key_holder is not None
        holder = self.sites[self.key_holder.index]  # its SuperNode now
        reply = self.c.ask(holder, "decrypt", array=np.frombuffer(aggregate, np.uint8),
                           n=int(n_contributions))  # fmt: skip
        out = P.unpack(reply.content, P.RESULT, "sum")
        if out is None or out.dtype.kind != "f" or out.ndim != 1:
            raise SiteFailure(f"the key holder {self.key_holder.name!r} sent no readable sum")
        return out.astype(np.float64)

    def _pool(self, replies: dict[int, Message]) -> dict[str, Any]:
        stats = {
            s.name: st
            for s in self.sites
            if s.node_id in replies and (st := self.c._stats(replies[s.node_id])) is not None
        }
        self.last_stats = stats
        out = pooled_metrics(list(stats.values()))
        out["per_site"] = None
        if len(self.sites) <= MAX_SITES_PER_ROUND:
            out["per_site"] = {
                name: {k: m[k] for k in ROUND_KEYS}
                for name, m in ((n, pooled_metrics([st])) for n, st in stats.items())
            }
        return out

    def evaluate(self, params: np.ndarray) -> None:
        self._evaluate_next = True
        return None

    def settle(self) -> dict[str, Any] | None:
        late, self._late = self._late, None
        return late

    def finish(self, params: np.ndarray) -> dict[str, Any]:
        self.c.rejoin(self.sites, len(self.round_seconds) + 1)
        request = self.c._request(params)
        msgs = [self.c._message(s.node_id, MessageType.EVALUATE, request, "final")
                for s in self.sites if s.node_id not in self.c.refused]  # fmt: skip
        metrics = self._pool(self.c.exchange(msgs, timeout=self.c.round_timeout))
        metrics["per_site"] = {
            s.name: pooled_metrics([self.last_stats[s.name]] if s.name in self.last_stats else [])
            for s in self.sites
        }
        return metrics


def _merge(first: Received, again: Received) -> Received:
    """The updates of a round's first request and of a second one to the sites missing from
    it, in site order; what is still missing is what ``again`` missed."""
    ids = np.concatenate([first.ids, again.ids]).astype(np.int64)
    order = np.argsort(ids, kind="stable")

    def both(a: Any, b: Any) -> list[Any]:
        joined = list(a) + list(b)
        return [joined[i] for i in order]

    sealed = None
    if first.sealed is not None and again.sealed is not None:
        sealed = both(first.sealed, again.sealed)
    return Received(ids[order], both(first.updates, again.updates),
                    both(first.weights, again.weights),
                    np.concatenate([first.malicious, again.malicious])[order], sealed=sealed,
                    missing=dict(again.missing), info={**first.info, **again.info},
                    asked=first.asked, missed=dict(again.missed))  # fmt: skip


def flower_results(config: Config, training: FlowerTraining) -> dict[str, Any]:
    """results.json for a Flower run: the simulation pipeline's document plus ``deployment``."""
    res = training.result
    doc = results_document(
        config, task=training.task,
        sites=[{"name": s.name, "n_train": s.n_train, "n_test": s.n_test}
               for s in training.sites],
        training=res, privacy=res.extra.get("privacy"),
        notes=["metrics pooled from the sites' evaluation statistics; AUC from binned scores "
               "(see privml.fl.flower.evaluation)"],
    )  # fmt: skip
    doc["deployment"] = {
        "flower_version": _flower_version(),
        "sites": [{"name": s.name, "node_id": s.node_id} for s in training.sites],
        "timing": training.timing,
        "rejoins": training.rejoins,
    }
    return doc


def _flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def write_run(
    config: Config,
    training: FlowerTraining,
    out_dir: Path,
    *,
    results: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write the run folder (model, results.json, report) atomically; return it."""
    from privml.artifacts import atomic_folder, save_model, write_json

    results = results or flower_results(config, training)

    def fill(tmp: Path) -> None:
        res = training.result
        save_model(
            tmp,
            res.spec,
            res.params,
            training.encoder,
            training.task,
            config_hash=results["config_hash"],
        )
        write_json(tmp / "results.json", results)
        if config.output.html:
            from privml.report.html import render_report

            (tmp / "report.html").write_text(render_report(results))

    atomic_folder(out_dir, fill, force=force)
    return out_dir


app = ServerApp()
"""The ServerApp a SuperLink runs for a privml run (config in the run config)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the coordinator with the run's config; write the run folder if the run names one."""
    config = P.config_from_run_config(dict(context.run_config))
    training = Coordinator(grid, config).run()
    out = context.run_config.get(P.OUT_DIR_KEY)
    if isinstance(out, str) and out:
        write_run(config, training, Path(out))
