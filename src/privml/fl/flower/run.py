"""Running a config on a Flower deployment from the coordinator (``privml flower run``).

:func:`run_flower` submits the run to the SuperLink's Control API with privml's app bundle
(:func:`privml.fl.flower.protocol.build_fab`; no code, no dependencies) and the config, then
executes the run's ServerApp task *in this process*: the SuperLink runs in ``process`` isolation
(``privml flower superlink``), so it starts no ServerApp process of its own; this process claims
the task over the Runtime API, authenticated with the SuperExec shared secret (HMAC; without it
anyone who can reach the SuperLink port could claim the task), and runs the
:class:`~privml.fl.flower.server_app.Coordinator`. The results come back as a normal privml run
folder (results.json, model, report), written by this process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import httpx
except ImportError:  # an optional extra is missing: say which, and how to install it
    from privml.extras import require

    require("flower", "Running on Flower (privml flower, --engine flower)")
    raise

from privml.config import Config
from privml.errors import PrivmlError, UsageError
from privml.fl.flower import protocol as P
from privml.fl.flower.server_app import Coordinator, FlowerTraining, flower_results, write_run
from privml.fl.flower.site import check_supported
from privml.fl.rounds import RoundRecord

__all__ = [
    "Deployment",
    "FlowerRunOutput",
    "flower_results",
    "register_supernode",
    "run_flower",
    "serve_run",
    "start_run",
    "write_run",
]


@dataclass(frozen=True)
class Deployment:
    """How the coordinator reaches its SuperLink.

    Attributes:
        superlink: ``host:port`` of the SuperLink (Control, Runtime and Fleet APIs share it).
        root_certificates: the CA certificate that signed the SuperLink's (TLS).
        superexec_secret: the SuperExec shared-secret file the SuperLink was started with.
        insecure: plain HTTP (tests on one machine only).
    """

    superlink: str = "127.0.0.1:9093"
    root_certificates: Path | None = None
    superexec_secret: Path | None = None
    insecure: bool = False

    def check(self) -> None:
        problems = []
        if self.insecure and self.root_certificates is not None:
            problems.append("root_certificates must be None with insecure=True (TLS off)")
        if not self.insecure and self.root_certificates is None:
            problems.append(
                "root_certificates is required with TLS (the CA file `privml certs` wrote); "
                "pass --root-certificates, or --insecure for a local test"
            )
        for name in ("root_certificates", "superexec_secret"):
            p = getattr(self, name)
            if p is not None and not Path(p).is_file():
                problems.append(f"{name}: no file {str(p)!r}")
        if ":" not in self.superlink:
            problems.append(f"superlink must be host:port; got {self.superlink!r}")
        if problems:
            raise UsageError("invalid Flower deployment: " + "; ".join(problems))


@dataclass
class FlowerRunOutput:
    """What :func:`run_flower` returns (the pipeline's ``RunOutput`` without site data)."""

    results: dict[str, Any]
    out_dir: Path | None
    training: FlowerTraining
    run_id: int


def _control_client(dep: Deployment) -> Any:
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    return ControlHttpClient.from_server_address(
        dep.superlink,
        dep.insecure,
        None if dep.insecure else str(dep.root_certificates),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )


def _runtime_client(dep: Deployment, *, token: str | None = None) -> Any:
    """A Runtime API client: with ``token`` for a claimed task (Flower's retries), else for
    claiming tasks (signed with the SuperExec secret; no retries, so that a refusal surfaces as
    an error here instead of Flower's retry policy sending this process SIGINT on HTTP 401)."""
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-serverapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    elif dep.superexec_secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=Path(dep.superexec_secret).read_bytes(),
                protected_methods={"/flwr.proto.Runtime/AcquireTask"},
            )
        )
    return RuntimeHttpClient.from_server_address(
        server_address=dep.superlink,
        insecure=dep.insecure,
        root_certificates=None if dep.insecure else str(dep.root_certificates),
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker() if token is not None else None,
    )


def start_run(config: Config, dep: Deployment, *, out_dir: Path | None = None) -> int:
    """Submit a privml run for ``config`` to the SuperLink; return its run id."""
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab, digest = P.build_fab()
    overrides: dict[str, bool | float | int | str] = {
        P.RUN_CONFIG_KEY: P.config_to_run_config(config)
    }
    if out_dir is not None:
        overrides[P.OUT_DIR_KEY] = str(out_dir)
    client = _control_client(dep)
    try:
        res = client.StartRun(
            StartRunRequest(
                fab=fab_to_proto(Fab(digest, fab, {})),
                override_config=user_config_to_proto(overrides),
                federation="",
                app_spec="",
            )
        )
    finally:
        client.close()
    if not res.HasField("run_id"):
        raise UsageError(f"the SuperLink at {dep.superlink} did not start the run")
    return int(res.run_id)


def serve_run(
    config: Config,
    dep: Deployment,
    run_id: int,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    wait_for_sites: float | None = None,
    round_timeout: float | None = None,
    claim_timeout: float = 60.0,
) -> FlowerTraining:
    """Claim run ``run_id``'s ServerApp task and run the coordinator in this process."""
    from flwr.common.constant import SubStatus
    from flwr.common.serde import run_from_proto
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        PullTaskInputRequest,
        PushTaskOutputRequest,
    )
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.grid import HttpGrid

    acquirer = _runtime_client(dep)
    token = None
    deadline = time.monotonic() + claim_timeout
    try:
        while token is None:
            try:
                res = acquirer.AcquireTask(
                    AcquireTaskRequest(supported_task_types=["flwr-serverapp"])
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in (401, 403):
                    raise UsageError(
                        f"the SuperLink at {dep.superlink} refused to hand over run {run_id}'s "
                        "ServerApp task: pass the SuperExec secret it was started with "
                        "(--superexec-secret, superexec.secret from `privml certs`)"
                    ) from None
                raise
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
                continue
            if res.HasField("task") and res.token:
                if res.task.run_id != run_id:
                    raise UsageError(
                        f"claimed the ServerApp task of run {res.task.run_id}, not of run "
                        f"{run_id}: another run is pending on this SuperLink; run one privml "
                        "coordinator per SuperLink"
                    )
                token = res.token
            elif time.monotonic() > deadline:
                raise UsageError(
                    f"the SuperLink offered no ServerApp task for run {run_id} within "
                    f"{claim_timeout:.0f} s; is it started by `privml flower superlink` "
                    "(process isolation) with the same --superexec-secret?"
                )
            else:
                time.sleep(0.05)
    finally:
        acquirer.close()
    task_client = _runtime_client(dep, token=token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task_client))
    certs = None if dep.insecure else Path(str(dep.root_certificates)).read_bytes()
    grid = HttpGrid(dep.superlink, dep.insecure, certs, token=token)
    status, details = SubStatus.FAILED, "privml coordinator failed"
    try:
        heartbeat.start()
        task_input = task_client.PullTaskInput(PullTaskInputRequest())
        # Flower's Message() reads the process's task identity, as in its flwr-serverapp
        TaskIdentity.task_id = task_input.task_id
        TaskIdentity.run_id = task_input.run.run_id
        TaskIdentity.node_id = task_input.context.node_id
        grid.set_run(run_from_proto(task_input.run))
        training = Coordinator(
            grid, config, wait_for_sites=wait_for_sites, round_timeout=round_timeout
        ).run(on_round=on_round)
        status, details = SubStatus.COMPLETED, ""
        return training
    except BaseException as exc:
        details = f"{type(exc).__name__}: {exc}"[:1000]
        raise
    finally:
        if heartbeat.is_running:
            heartbeat.stop()
        # the SuperLink may be gone; the run then expires there
        with contextlib.suppress(Exception):
            task_client.PushTaskOutput(PushTaskOutputRequest(sub_status=status, details=details))
        task_client.close()
        grid.close()
        TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None  # type: ignore[assignment]


def run_flower(
    config: Config,
    *,
    deployment: Deployment,
    out_dir: Path | None = None,
    write: bool = True,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    wait_for_sites: float | None = None,
    round_timeout: float | None = None,
    force: bool = False,
) -> FlowerRunOutput:
    """Train ``config`` on the Flower deployment and write the run folder like ``privml run``.

    Args:
        config: the run's config; every site runs a SuperNode with the same file.
        deployment: the SuperLink to use (:class:`Deployment`).
        out_dir: the run folder (default ``output.dir`` or ``runs/<name>-<time>``).
        write: write the run folder.
        on_round: called after each round's evaluation is known.
        on_stage: called with a short description of each stage.
        wait_for_sites: seconds to wait until every configured site is connected (default
            ``training.wait_for_sites``).
        round_timeout: seconds a round waits for the sites' replies (default
            ``training.round_timeout``).
    """
    stage = on_stage or (lambda _s: None)
    deployment.check()
    check_supported(config)
    if write:
        from privml.artifacts import check_output_folder
        from privml.pipeline import default_out_dir, protected_paths

        out_dir = Path(out_dir or config.output.dir or default_out_dir(config))
        check_output_folder(out_dir, force=force, protected=protected_paths(config))
    t0 = time.perf_counter()
    stage(f"submitting the run to the SuperLink at {deployment.superlink}")
    try:
        run_id = start_run(config, deployment)
    except PrivmlError:
        raise
    except Exception as exc:
        raise UsageError(
            f"cannot reach the SuperLink's Control API at {deployment.superlink}: "
            f"{type(exc).__name__}: {exc}; check the address, --root-certificates, and that "
            "`privml flower superlink` runs"
        ) from None
    stage(f"run {run_id}: waiting for the sites, then training")
    try:
        training = serve_run(
            config,
            deployment,
            run_id,
            on_round=on_round,
            wait_for_sites=wait_for_sites,
            round_timeout=round_timeout,
        )
    except httpx.HTTPError as exc:
        raise UsageError(
            f"run {run_id}: lost the connection to the SuperLink at {deployment.superlink} "
            f"({type(exc).__name__}: {exc})"
        ) from None
    results = flower_results(config, training)
    results["deployment"]["run_id"] = str(run_id)
    results["timing"] = {"total_seconds": time.perf_counter() - t0}
    final_dir = None
    if write:
        stage("writing results")
        assert out_dir is not None
        final_dir = out_dir
        write_run(config, training, final_dir, results=results, force=force)
    return FlowerRunOutput(results, final_dir, training, run_id)


def register_supernode(
    public_key: Path,
    *,
    superlink: str,
    root_certificates: Path,
    name: str | None = None,
) -> int:
    """Register a SuperNode's public key (OpenSSH, NIST EC curve) with the SuperLink.

    Needed when the SuperLink runs with ``--enable-supernode-auth``: it then accepts only
    SuperNodes that prove possession of a registered key. Returns the SuperNode's id.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    p = Path(public_key)
    if not p.is_file():
        raise UsageError(f"The 'public_key' parameter must name a file. Got {str(p)!r} instead.")
    try:
        key = load_ssh_public_key(p.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise UsageError(f"cannot read the public key {str(p)!r}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise UsageError(
            f"{str(p)!r} is not a NIST-curve EC public key; use the .pub from `privml certs --site`"
        )
    dep = Deployment(superlink=superlink, root_certificates=root_certificates)
    dep.check()
    client = _control_client(dep)
    try:
        res = client.RegisterNode(
            RegisterNodeRequest(public_key=public_key_to_bytes(key), name=name)
        )
    finally:
        client.close()
    if not res.node_id:
        raise UsageError(f"the SuperLink at {superlink} did not register {str(p)!r}")
    return int(res.node_id)
