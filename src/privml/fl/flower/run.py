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
import logging
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
from privml.fl.flower.env import survive_superlink_restarts
from privml.fl.flower.server_app import (
    Coordinator,
    FlowerTraining,
    SuperLinkLost,
    flower_results,
    write_run,
)
from privml.fl.flower.site import check_supported
from privml.fl.rounds import RoundRecord

log = logging.getLogger("privml.flower")

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


def _runtime_client(dep: Deployment, *, token: str | None = None, retries: bool = True) -> Any:
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
        retry_invoker=make_simple_http_retry_invoker() if token is not None and retries else None,
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
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> FlowerTraining:
    """Claim run ``run_id``'s ServerApp task and run the coordinator in this process
    (checkpoints in ``checkpoint_dir``; ``resume``: from the one there).

    Raises:
        SuperLinkLost: the SuperLink went away or restarted during the run
            (``httpx.HTTPError`` too, when a request failed).
    """
    from flwr.common.constant import SubStatus
    from flwr.common.serde import run_from_proto
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        PullTaskInputRequest,
        PushTaskOutputRequest,
        SendTaskHeartbeatRequest,
    )
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.task_identity import TaskIdentity

    lost = survive_superlink_restarts()
    lost.clear()
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
    beat_client = _runtime_client(dep, token=token, retries=False)

    def beat() -> bool:
        # Flower's task heartbeat raises on a 401 (an uncaught exception in its thread) or
        # interrupts the process; this one reports a SuperLink that lost the task instead
        try:
            res = beat_client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.TransportError:
            return False  # down, perhaps restarting: the rounds find out
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (401, 403, 404):
                lost.set()
                return True
            return False
        if not res.success:
            lost.set()
        return True

    heartbeat = HeartbeatSender(beat)
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
            grid, config, wait_for_sites=wait_for_sites, round_timeout=round_timeout, lost=lost
        ).run(on_round=on_round, checkpoint_dir=checkpoint_dir, resume=resume)
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
        beat_client.close()
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
    resume: Path | None = None,
    max_reconnects: int = 10,
) -> FlowerRunOutput:
    """Train ``config`` on the Flower deployment and write the run folder like ``privml run``.

    The server state is checkpointed after every round in ``<run folder>.partial`` (signed,
    as in simulation). When the SuperLink goes away or restarts, the coordinator waits for it
    (``wait_for_sites``), submits the run again and continues from the last checkpoint; a run
    that ends otherwise keeps that folder and names it, for ``resume``.

    Args:
        config: the run's config; every site runs a SuperNode with the same file.
        deployment: the SuperLink to use (:class:`Deployment`).
        out_dir: the run folder (default ``output.dir`` or ``runs/<name>-<time>``).
        write: write the run folder (and checkpoints).
        on_round: called after each round's evaluation is known.
        on_stage: called with a short description of each stage.
        wait_for_sites: seconds to wait until every configured site is connected (default
            ``training.wait_for_sites``); also how long to wait for a lost SuperLink.
        round_timeout: seconds a round waits for the sites' replies (default
            ``training.round_timeout``).
        resume: an interrupted Flower run (its run folder or ``.partial`` folder) to continue
            from its last authenticated checkpoint; ``config`` must be the one it started with.
        max_reconnects: how many times to reconnect to a lost SuperLink.
    """
    import shutil

    from privml.fl.checkpoint import (
        has_checkpoint,
        load_checkpoint,
        locate_partial_run,
        partial_dir,
        read_run_record,
        write_run_config,
    )

    stage = on_stage or (lambda _s: None)
    deployment.check()
    check_supported(config)
    partial: Path | None = None
    if resume is not None:
        final, partial = locate_partial_run(resume)
        record = read_run_record(partial)  # signature first: exit 4 if altered
        if record.config.config_hash() != config.config_hash():
            raise UsageError(
                f"the interrupted run in {str(partial)!r} was started with another config; "
                "resume it with its own config (omit --config) or start a new run"
            )
        if out_dir is not None and Path(out_dir).resolve() != final.resolve():
            raise UsageError(
                f"--resume continues the run that will be written to {str(final)!r}; omit --out"
            )
        if has_checkpoint(partial / "checkpoint"):
            load_checkpoint(partial / "checkpoint")  # verified before anything else runs
        out_dir = final
        write = True
    elif write:
        from privml.artifacts import check_output_folder
        from privml.pipeline import default_out_dir, protected_paths

        out_dir = Path(out_dir or config.output.dir or default_out_dir(config))
        check_output_folder(out_dir, force=force, protected=protected_paths(config))
        partial = partial_dir(out_dir)
        if partial.exists() or partial.is_symlink():
            raise UsageError(
                f"{str(partial)!r} holds an interrupted run; continue it with "
                f"`privml run --engine flower --resume {out_dir}` or delete that folder"
            )
        write_run_config(partial, config)
    checkpoint_dir = partial / "checkpoint" if partial is not None else None
    wait = config.training.wait_for_sites if wait_for_sites is None else wait_for_sites
    t0 = time.perf_counter()
    try:
        training, run_id = _train_through_restarts(
            config, deployment, stage, checkpoint_dir, resume is not None, wait,
            max_reconnects, on_round=on_round, wait_for_sites=wait_for_sites,
            round_timeout=round_timeout,
        )  # fmt: skip
        results = flower_results(config, training)
        results["deployment"]["run_id"] = str(run_id)
        results["timing"] = {"total_seconds": time.perf_counter() - t0}
        final_dir = None
        if write:
            stage("writing results")
            assert out_dir is not None
            final_dir = out_dir
            write_run(config, training, final_dir, results=results, force=force)
    except BaseException as exc:
        if partial is not None and partial.exists():
            if checkpoint_dir is not None and has_checkpoint(checkpoint_dir):
                note = (
                    f"the checkpoint is kept in {str(partial)!r}; continue the run with "
                    f"`privml run --engine flower --resume {out_dir}`"
                )
                if hasattr(exc, "add_note"):
                    exc.add_note(note)
            elif resume is None:
                shutil.rmtree(partial, ignore_errors=True)
        raise
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    return FlowerRunOutput(results, final_dir, training, run_id)


def _train_through_restarts(
    config: Config, dep: Deployment, stage: Callable[[str], None], checkpoint_dir: Path | None,
    resume: bool, wait: float, max_reconnects: int, **serve: Any,
) -> tuple[FlowerTraining, int]:  # fmt: skip
    """Submit and coordinate the run; when the SuperLink is lost, wait for it, submit the run
    again and continue from the last checkpoint."""
    from privml.fl.checkpoint import checkpoint_round, has_checkpoint

    lost_times = 0
    resume_now = resume and checkpoint_dir is not None and has_checkpoint(checkpoint_dir)
    while True:
        stage(f"submitting the run to the SuperLink at {dep.superlink}")
        run_id = _submit(config, dep, wait if lost_times else 0.0)
        stage(f"run {run_id}: waiting for the sites, then training")
        try:
            return serve_run(config, dep, run_id, checkpoint_dir=checkpoint_dir,
                             resume=resume_now, **serve), run_id  # fmt: skip
        except (SuperLinkLost, httpx.HTTPError) as exc:
            lost_times += 1
            why = f"{type(exc).__name__}: {exc}"
            if lost_times > max_reconnects:
                raise UsageError(
                    f"run {run_id}: lost the SuperLink at {dep.superlink} {lost_times} times "
                    f"({why}); giving up"
                ) from None
            rnd = checkpoint_round(checkpoint_dir) if checkpoint_dir is not None else None
            resume_now = rnd is not None
            log.warning("run %s: lost the SuperLink (%s)", run_id, why)
            stage(
                f"lost the SuperLink at {dep.superlink} ({why}); waiting up to {wait:.0f} s for "
                "it, then continuing "
                + (f"after round {rnd} (checkpoint)" if rnd is not None else "from round 1")
            )


def _submit(config: Config, dep: Deployment, wait: float) -> int:
    """:func:`start_run`, retried for ``wait`` seconds while the SuperLink is unreachable."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return start_run(config, dep)
        except PrivmlError:
            raise
        except Exception as exc:
            if time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise UsageError(
                f"cannot reach the SuperLink's Control API at {dep.superlink}: "
                f"{type(exc).__name__}: {exc}; check the address, --root-certificates, and that "
                "`privml flower superlink` runs"
            ) from None


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
