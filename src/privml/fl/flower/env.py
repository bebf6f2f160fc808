"""The environment every Flower process privml starts runs in: offline, lean, contained.

Flower 1.42 reaches out to the network on its own unless told not to:

* **telemetry**: every Flower process sends usage events to ``telemetry.flower.ai`` unless
  ``FLWR_TELEMETRY_ENABLED=0`` (read once, when ``flwr.supercore.telemetry`` is imported);
* **update check**: ``flower-superlink``, ``flower-supernode`` and ``flower-superexec`` query for
  a newer Flower release in a background thread unless ``FLWR_DISABLE_UPDATE_CHECK=1``;
* **runtime dependency installation**: the SuperLink installs each run's app dependencies into a
  fresh environment (``uv sync``; about 5.6 GB of CUDA torch here) *by default* in 1.42, unless
  started with ``--disable-runtime-dependency-installation`` or with
  ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``. SuperNodes and SuperExec install only with
  ``--allow-runtime-dependency-installation`` (off by default); privml never passes it.

Flower also writes state (installed app bundles, a telemetry source id, update-check cache,
credentials) under ``FLWR_HOME`` (default ``~/.flwr``); privml points it at a folder of the
deployment instead of the user's home.

Nothing here changes this process's environment at import time: :func:`flower_env` returns a
mapping for child processes, and :func:`apply_flower_env` is called explicitly by the commands
that run Flower code in-process, before they import ``flwr``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FLOWER_OFFLINE_ENV",
    "SUPERLINK_LOST",
    "apply_flower_env",
    "default_flower_home",
    "flower_env",
    "survive_superlink_restarts",
]

log = logging.getLogger("privml.flower")

FLOWER_OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Variables that keep Flower offline (no telemetry, no update check, no dependency install)."""


def default_flower_home() -> Path:
    """``./.privml-flower``: Flower's state folder for processes privml starts from here."""
    return Path.cwd() / ".privml-flower"


def flower_env(
    home: str | Path | None = None,
    base: Mapping[str, str] | None = None,
    *,
    create: bool = True,
) -> dict[str, str]:
    """Environment for a Flower child process: ``base`` (default: ours) plus the offline settings.

    Args:
        home: Flower's state folder (``FLWR_HOME``); default :func:`default_flower_home`.
        base: environment to start from (default ``os.environ``).
        create: create the folder if missing.
    """
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_OFFLINE_ENV)
    folder = Path(home) if home is not None else default_flower_home()
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    env["FLWR_HOME"] = str(folder.resolve())
    return env


def apply_flower_env(home: str | Path | None = None) -> None:
    """Put the offline settings into *this* process's environment (call before importing flwr).

    Used by the commands that run Flower's client or ServerApp code in-process. A module of
    ``flwr`` imported earlier keeps the telemetry setting it read then; privml's in-process code
    paths emit no telemetry events either way.
    """
    from privml.extras import require

    require("flower", "Running on Flower (privml flower, --engine flower)")
    os.environ.update(flower_env(home, base={}))


SUPERLINK_LOST = threading.Event()
"""Set when Flower's client code in this process found that the SuperLink no longer knows it
(HTTP 401 after a SuperLink restart), instead of letting it interrupt the process."""


class _OsWithoutSelfInterrupt:
    """``os`` for Flower's retry and Fleet modules, whose ``os.kill(os.getpid(), SIGINT)`` on an
    HTTP 401 would end the process (Flower's retry policy then sleeps 6 s and gives up, so the
    call raises ``httpx.HTTPStatusError``): the 401 sets :data:`SUPERLINK_LOST` instead, and
    privml reconnects."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def kill(self, pid: int, sig: int) -> None:
        if pid == os.getpid() and sig == signal.SIGINT:
            log.warning("the SuperLink no longer recognises this process (HTTP 401)")
            SUPERLINK_LOST.set()
            return
        os.kill(pid, sig)


class _SignalWithoutSelfInterrupt:
    """``signal`` for Flower's heartbeat module (``raise_signal(SIGINT)`` when the SuperLink
    says a task is gone)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def raise_signal(self, sig: int) -> None:
        if sig == signal.SIGINT:
            log.warning("the SuperLink no longer knows this task")
            SUPERLINK_LOST.set()
            return
        signal.raise_signal(sig)


def survive_superlink_restarts() -> threading.Event:
    """Make Flower's client code in this process report a restarted SuperLink (which no longer
    knows this SuperNode or task) through :data:`SUPERLINK_LOST` and an ``httpx`` error, instead
    of sending this process SIGINT; privml's SuperNode and coordinator then reconnect. Applies to
    this process (idempotent); returns the event."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supercore.retry.http_retry as http_retry
    import flwr.supernode.fleet_http_connection as fleet

    http_retry.os = _OsWithoutSelfInterrupt()  # type: ignore[assignment]
    fleet.os = _OsWithoutSelfInterrupt()  # type: ignore[assignment]
    heartbeat.signal = _SignalWithoutSelfInterrupt()  # type: ignore[assignment]
    return SUPERLINK_LOST
