"""Command lines for Flower's own processes, started the privml way (offline, TLS, contained).

Used by ``privml flower superlink`` / ``privml flower supernode --stock``, the integration tests
and the benchmark. Every process gets :func:`privml.fl.flower.env.flower_env` and its own
process group, so :func:`stop_process` can end it together with anything it started (Flower's
SuperNode starts ``flower-superexec``, which starts ``flwr-clientapp`` processes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from privml.errors import UsageError
from privml.fl.flower.env import flower_env

__all__ = [
    "flower_script",
    "free_port",
    "start_process",
    "stop_process",
    "stop_processes",
    "superlink_command",
    "supernode_command",
    "wait_for_port",
]


def flower_script(name: str) -> str:
    """Path of one of Flower's console scripts, next to this Python first."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"Flower's {name!r} command was not found; is flwr 1.42 installed?")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, *, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts TCP connections (or ``proc`` exits, or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise UsageError(f"the process {proc.args!r} exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise UsageError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def superlink_command(
    *,
    host: str = "127.0.0.1",
    port: int = 9093,
    certs: Path | None = None,
    insecure: bool = False,
    superexec_secret: Path | None = None,
    enable_supernode_auth: bool = False,
    isolation: str = "process",
    database: str | None = None,
) -> list[str]:
    """``flower-superlink`` arguments for a privml coordinator.

    ``certs`` is a folder from ``privml certs`` (``ca.crt``, ``server.crt``, ``server.key``,
    ``superexec.secret``). ``isolation="process"`` (default) lets ``privml flower run`` execute
    the ServerApp in-process; ``"subprocess"`` makes the SuperLink start Flower's own
    ``flwr-serverapp`` for each run. Runtime dependency installation is always disabled.
    """
    if isolation not in ("process", "subprocess"):
        raise UsageError(
            f"The 'isolation' parameter must be 'process' or 'subprocess'. Got {isolation!r}."
        )
    cmd = [
        flower_script("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        isolation,
        "--disable-runtime-dependency-installation",
    ]
    if insecure:
        if certs is not None:
            raise UsageError("pass either certs or insecure=True, not both")
        if enable_supernode_auth:
            raise UsageError("SuperNode authentication needs TLS; drop insecure")
        cmd.append("--insecure")
    else:
        if certs is None:
            raise UsageError(
                "TLS is on by default: pass the folder `privml certs DIR` wrote (--certs DIR), "
                "or --insecure for a local test"
            )
        missing = [n for n in ("ca.crt", "server.crt", "server.key") if not (certs / n).is_file()]
        if missing:
            raise UsageError(
                f"the certificate folder {str(certs)!r} lacks {missing}; run `privml certs`"
            )
        cmd += [
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.crt"),
            "--ssl-keyfile",
            str(certs / "server.key"),
        ]
        if superexec_secret is None and (certs / "superexec.secret").is_file():
            superexec_secret = certs / "superexec.secret"
    if enable_supernode_auth:
        cmd.append("--enable-supernode-auth")
    if superexec_secret is not None and isolation == "process":
        cmd += ["--superexec-auth-secret-file", str(superexec_secret)]
    if database is not None:
        cmd += ["--database", database]
    return cmd


def supernode_command(
    *,
    superlink: str,
    site: str,
    config: Path,
    root_certificates: Path | None = None,
    insecure: bool = False,
    auth_key: Path | None = None,
    runtime_port: int | None = None,
) -> list[str]:
    """``flower-supernode`` arguments for a stock Flower SuperNode serving ``site``.

    Stock SuperNodes run each message in a new ``flwr-clientapp`` process (subprocess
    isolation); privml's ClientApp finds the site from the node config.
    """
    node_config = f'site="{site}" config="{Path(config).resolve()}"'
    cmd = [
        flower_script("flower-supernode"),
        "--superlink",
        superlink,
        "--isolation",
        "subprocess",
        "--node-config",
        node_config,
        "--port",
        str(runtime_port or free_port()),
    ]
    if insecure:
        cmd.append("--insecure")
    elif root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def start_process(
    cmd: Sequence[str],
    *,
    home: Path | None = None,
    log: IO[bytes] | int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group with Flower's offline environment."""
    full_env = flower_env(home, base=env)
    bindir = str(Path(sys.executable).parent)
    full_env["PATH"] = bindir + os.pathsep + full_env.get("PATH", "")
    return subprocess.Popen(
        list(cmd),
        env=full_env,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """Stop ``proc`` and its process group: SIGTERM, then SIGKILL after ``timeout`` s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # children (flower-superexec, flwr-clientapp) may outlive the leader: kill the group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=timeout)

def stop_processes(procs: Sequence[subprocess.Popen[bytes]], *, timeout: float = 10.0) -> None:
    """Stop several processes: SIGTERM to every process group first, so they shut down
    together, then :func:`stop_process` on each, the last started first."""
    for proc in procs:  # a group may outlive its leader: signal it either way
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        stop_process(proc, timeout=timeout)
