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

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["FLOWER_OFFLINE_ENV", "apply_flower_env", "default_flower_home", "flower_env"]

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
