"""privml's SuperNode: Flower's Fleet connection with the ClientApp run in-process.

Flower 1.42's ``flower-supernode`` runs every message in a fresh process: in ``subprocess``
isolation it starts ``flower-superexec``, which starts one ``flwr-clientapp`` process *per
message*; that process installs the app bundle, imports the ClientApp (for privml: torch,
pandas, scikit-learn) and loads the site's data, then exits. In ``process`` isolation the same
per-message process is started by an external ``flower-superexec``. There is no in-process
mode. Its worker loop also sleeps 3 s whenever a poll finds no message, and 0.5 s while
waiting for a reply, so a round costs at least one such sleep. Measured here: about 16 s per
round for a minimal app.

This node keeps everything Flower provides on the wire: it connects through Flower's own Fleet
client (:func:`flwr.supernode.fleet_http_connection.http_request_response`: registration,
activation, heartbeats, TLS, SuperNode authentication with an EC key) and moves messages with
Flower's object-tree transfer functions. What it changes is the execution: the site's data is
loaded and encoded once at start, the privml ClientApp handlers are called in this process,
and polling backs off from 10 ms to at most 1 s instead of sleeping 3 s.

It runs only privml's installed ClientApp: the app bundle of a run must be privml's
(:data:`privml.fl.flower.protocol.FAB_ID`, hash checked); code in a bundle is never executed,
so a coordinator cannot make a site run code of its choosing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privml.errors import UsageError
from privml.fl.flower import protocol as P

if TYPE_CHECKING:
    from privml.fl.flower.site import SiteRuntime

__all__ = ["NodeStats", "load_auth_key", "run_node"]

log = logging.getLogger("privml.flower")


@dataclass
class NodeStats:
    """Counters of a node's life (returned by :func:`run_node`)."""

    node_id: int = 0
    messages: int = 0
    errors: int = 0
    refused_runs: int = 0
    busy_seconds: float = 0.0
    reconnects: int = 0


def load_auth_key(path: str | Path) -> tuple[Any, Any]:
    """Load a SuperNode authentication private key (OpenSSH, NIST EC curve) and its public key."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    p = Path(path)
    if not p.is_file():
        raise UsageError(
            f"The 'auth_key' parameter must name an existing private key file. Got {str(p)!r} "
            "instead; `privml certs DIR --site NAME` writes one."
        )
    try:
        key = load_ssh_private_key(p.read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot read the SuperNode key {str(p)!r}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(
            f"the SuperNode key {str(p)!r} is a {type(key).__name__}; Flower's SuperNode "
            "authentication needs an EC (NIST curve) key, e.g. from `privml certs`"
        )
    return key, key.public_key()


def _check_bundle(run: Any, fab: Any) -> str | None:
    """Why this run's app bundle is not privml's, or None if it is."""
    from flwr.common.config import get_fab_config

    if run.fab_id != P.FAB_ID:
        return f"the run's app is {run.fab_id!r}, not {P.FAB_ID!r}"
    if hashlib.sha256(fab.content).hexdigest() != run.fab_hash or fab.hash_str != run.fab_hash:
        return "the app bundle does not match the run's hash"
    try:
        components = get_fab_config(fab.content)["tool"]["flwr"]["app"]["components"]
    except (KeyError, ValueError, TypeError) as exc:
        return f"the app bundle has no readable components ({exc})"
    if components.get("clientapp") != "privml.fl.flower.client_app:app":
        return f"the app bundle's clientapp is {components.get('clientapp')!r}"
    return None


def run_node(
    runtime: SiteRuntime,
    *,
    superlink: str,
    root_certificates: str | Path | None = None,
    insecure: bool = False,
    auth_key: str | Path | None = None,
    max_wait_time: float | None = 60.0,
    stop: threading.Event | None = None,
    max_poll_interval: float = 1.0,
    on_message: Callable[[str, float], None] | None = None,
    reconnect: float | None = None,
    on_connect: Callable[[int], None] | None = None,
) -> NodeStats:
    """Serve ``runtime``'s site to the SuperLink at ``superlink`` until ``stop`` is set.

    Args:
        runtime: the site, loaded once (:class:`SiteRuntime`).
        superlink: the SuperLink's address, ``host:port``.
        root_certificates: PEM CA file that signed the SuperLink's certificate (TLS).
        insecure: plain HTTP, no TLS; only for tests on one machine (the caller warns).
        auth_key: OpenSSH EC private key for SuperNode authentication (the SuperLink must run
            with ``--enable-supernode-auth`` and have the public key registered).
        max_wait_time: seconds to keep retrying to reach the SuperLink before giving up
            (None: forever).
        stop: set it to make the node deactivate and return.
        max_poll_interval: longest pause between polls when idle, seconds (> 0).
        on_message: called with (message type, seconds spent) after each message.
        on_connect: called with the node id each time the node has connected.
        reconnect: when the SuperLink goes away or restarts (it no longer knows this node),
            wait up to this many seconds for it to listen again and connect anew (a new
            node id unless the SuperLink kept its state); None: return with an error. Needs
            the node in a process of its own (it changes how Flower's client code in this
            process reacts to a restarted SuperLink, see
            :func:`privml.fl.flower.env.survive_superlink_restarts`).

    Returns:
        :class:`NodeStats`.

    Raises:
        UsageError: bad arguments, or the SuperLink cannot be reached, refuses the node's key
            (HTTP 401) or presents a certificate ``root_certificates`` does not trust. Flower's
            Fleet client then also ends *this process* 5 s later (``flwr_exit`` starts an
            ``os._exit`` timer; on HTTP 401 it first sends the process SIGINT): run a node in
            a process of its own, as ``privml flower supernode`` does.
    """
    from flwr.app import Error, Message

    from privml.fl.flower.client_app import make_client_app

    if insecure and root_certificates is not None:
        raise UsageError(
            "The 'root_certificates' parameter of run_node must be None with insecure=True "
            f"(TLS off). Got {str(root_certificates)!r} instead."
        )
    if not insecure and root_certificates is not None and not Path(root_certificates).is_file():
        raise UsageError(
            "The 'root_certificates' parameter of run_node must name the CA certificate file. "
            f"Got {str(root_certificates)!r} instead."
        )
    if insecure and auth_key is not None:
        raise UsageError("SuperNode authentication needs TLS; drop --insecure or the key")
    if not max_poll_interval > 0:
        raise UsageError(
            f"The 'max_poll_interval' parameter of run_node must be > 0. Got {max_poll_interval}."
        )
    keys = load_auth_key(auth_key) if auth_key is not None else None
    stop = stop or threading.Event()
    client = make_client_app(lambda _ctx: runtime)
    stats = NodeStats()
    runs: dict[int, tuple[Any, dict[str, Any] | None, str | None, Any]] = {}
    node_config = {"site": runtime.name}
    certs = str(Path(root_certificates).resolve()) if root_certificates is not None else None

    def reply_error(message: Message, code: int, reason: str) -> Message:
        return Message(Error(code=code, reason=reason), reply_to=message)

    lost = _survive_restarts() if reconnect is not None else None
    connects = [0]

    def connected(node_id: int) -> None:
        connects[0] += 1
        if on_connect is not None:
            on_connect(node_id)

    give_up_at, seen = None, 0
    while True:
        lost_why = _serve_once(
            superlink, insecure, certs, keys, max_wait_time, stop, lost, runtime, client,
            stats, runs, node_config, max_poll_interval, on_message, reply_error, connected,
        )  # fmt: skip
        if lost_why is None or stop.is_set():
            return stats
        if reconnect is None or lost is None:
            raise UsageError(
                f"lost the connection to the SuperLink at {superlink} ({lost_why}); restart "
                "this SuperNode when the SuperLink is back"
            )
        if give_up_at is None or connects[0] != seen:  # lost after a working connection
            give_up_at, seen = time.monotonic() + reconnect, connects[0]
        log.warning("lost the SuperLink at %s (%s); reconnecting", superlink, lost_why)
        left = give_up_at - time.monotonic()
        if left <= 0 or not _wait_reachable(superlink, left, stop):
            if stop.is_set():
                return stats
            raise UsageError(
                f"lost the connection to the SuperLink at {superlink} ({lost_why}) and could "
                f"not connect again within {reconnect:.0f} s; restart this SuperNode when the "
                "SuperLink is back (after a restart without its --database, register this "
                "site's key again)"
            )
        if lost_why.startswith("could not sign in"):
            stop.wait(2.0)  # e.g. the killed process's activation has not expired yet
        lost.clear()
        runs.clear()
        stats.reconnects += 1


NODE_HEARTBEAT_INTERVAL = 10
"""Seconds between a reconnecting SuperNode's heartbeats (Flower's minimum; its default is
30): the SuperLink counts a node online until two intervals pass without one, and refuses to
activate its key again meanwhile, so a killed SuperNode's site can sign in again after 20 s
instead of a minute."""


class _SignInFailed(RuntimeError):
    """Flower's Fleet client could not sign in (it would have ended the process)."""


def _sign_in_failed(code: int, message: str | None = None, *_a: Any, **_k: Any) -> None:
    raise _SignInFailed(f"Flower exit code {code}: {(message or '').strip().splitlines()[-1:]}")


def _survive_restarts() -> threading.Event:
    """In a SuperNode process that reconnects: a SuperLink that restarted or no longer knows
    this node is reported instead of ending the process
    (:func:`privml.fl.flower.env.survive_superlink_restarts`), a failed sign-in raises instead
    of Flower's ``flwr_exit`` (which ends the process 5 s later), and heartbeats every
    :data:`NODE_HEARTBEAT_INTERVAL` seconds."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.fleet_http_connection as fleet

    from privml.fl.flower.env import survive_superlink_restarts

    fleet.flwr_exit = _sign_in_failed  # type: ignore[assignment]
    fleet.HEARTBEAT_DEFAULT_INTERVAL = NODE_HEARTBEAT_INTERVAL
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = NODE_HEARTBEAT_INTERVAL
    return survive_superlink_restarts()


def _wait_reachable(superlink: str, seconds: float, stop: threading.Event) -> bool:
    """Wait until ``host:port`` accepts connections (True), ``seconds`` pass or ``stop``."""
    import socket

    host, _, port = superlink.rpartition(":")
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 1.0):
                return True
        except OSError:
            stop.wait(0.5)
    return False


def _serve_once(
    superlink: str, insecure: bool, certs: str | None, keys: Any, max_wait_time: float | None,
    stop: threading.Event, lost: threading.Event | None, runtime: SiteRuntime, client: Any,
    stats: NodeStats, runs: dict[int, Any], node_config: dict[str, Any],
    max_poll_interval: float, on_message: Callable[[str, float], None] | None,
    reply_error: Callable[..., Any], on_connect: Callable[[int], None] | None,
) -> str | None:  # fmt: skip
    """One connection to the SuperLink: serve messages until ``stop`` (None) or until the
    SuperLink is lost (why, as text)."""
    import httpx
    from flwr.app import Context, Message, RecordDict
    from flwr.common.config import get_fused_config_from_fab
    from flwr.common.constant import ErrorCode
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        pull_and_inflate_object_from_tree,
        push_objects,
    )
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode.fleet_http_connection import http_request_response

    try:
        connection = http_request_response(superlink, insecure, certs, keys, None, max_wait_time)
        conn = connection.__enter__()
    except _SignInFailed as exc:  # reconnecting: try again (see _survive_restarts)
        return f"could not sign in: {exc}"
    except SystemExit as exc:  # Flower exits the process when it cannot connect
        raise UsageError(
            f"could not connect to the SuperLink at {superlink} (Flower exit code {exc.code}); "
            "check the address, that it runs, its certificate (--root-certificates) and, after "
            "a restart without its --database, register this site's key again"
        ) from None
    try:
        node_id, receive, send, get_run, get_fab, pull_object, push_object, confirm = conn
        stats.node_id = node_id
        log.info("site %s connected as SuperNode %s", runtime.name, node_id)
        if on_connect is not None:
            on_connect(node_id)
        pause = 0.01
        while not stop.is_set():
            if lost is not None and lost.is_set():
                return "it no longer knows this node"
            try:
                got = receive()
            except RunNotRunningException:
                got = None
            if got is None:
                stop.wait(pause)
                pause = min(pause * 1.5, max_poll_interval)
                continue
            pause = 0.01
            t0 = time.perf_counter()
            message, tree = got
            run_id = message.metadata.run_id
            try:
                if run_id not in runs:
                    run = get_run(run_id)
                    fab = get_fab(run.fab_hash, run_id)
                    why = _check_bundle(run, fab)
                    run_config = (
                        get_fused_config_from_fab(fab.content, run) if why is None else None
                    )
                    # the run's context state lives as long as the run at this node (Flower's
                    # SecAgg+ mod keeps its keys and shares there between messages)
                    runs[run_id] = (run, run_config, why, RecordDict())
                run, run_config, why, state = runs[run_id]
                message = pull_and_inflate_object_from_tree(
                    tree,
                    functools.partial(pull_object, run_id),
                    functools.partial(confirm, run_id),
                    return_type=Message,
                )
                message.metadata.__dict__["_message_id"] = tree.object_id
                if why is not None:
                    stats.refused_runs += 1
                    log.warning("refusing run %s: %s", run_id, why)
                    reply = reply_error(
                        message, ErrorCode.INVALID_FAB, f"privml site refuses: {why}"
                    )
                else:
                    context = Context(
                        run_id=run_id,
                        node_id=node_id,
                        node_config=dict(node_config),
                        state=state,
                        run_config=dict(run_config or {}),
                    )
                    try:
                        reply = client(message, context)
                    except Exception as exc:  # the coordinator gets the reason, the site a log
                        stats.errors += 1
                        log.warning("%s message failed: %s", message.metadata.message_type, exc)
                        reply = reply_error(
                            message,
                            ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                            f"{type(exc).__name__}: {exc}",
                        )
            except RunNotRunningException:
                continue
            busy = time.perf_counter() - t0
            with no_object_id_recompute():
                reply.metadata.__dict__["_message_id"] = reply.object_id
                out_tree = get_object_tree(reply)
                try:
                    to_push, session = send(reply, out_tree, busy)
                except RunNotRunningException:
                    continue
                push_objects(
                    get_all_nested_objects(reply),
                    functools.partial(push_object, run_id, session),
                    object_ids_to_push=to_push,
                )
            stats.messages += 1
            stats.busy_seconds += busy
            if on_message is not None:
                on_message(message.metadata.message_type, busy)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.__exit__(None, None, None)
    return None
