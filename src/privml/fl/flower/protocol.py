"""What privml's ServerApp and ClientApp say to each other, and the app bundle Flower ships.

Messages (Flower message API, ``flwr.app.Message``):

* ``query`` (handshake): the coordinator sends its config fingerprint; the site answers with
  its name, index in the config, record counts, encoding, task and its own fingerprint.
* ``train``: ``ConfigRecord "settings" {"fingerprint", "round", "evaluate", "params"}`` with
  the global parameters (float32); the site answers ``ConfigRecord "result" {"n_train",
  "update"}`` (new - global, float64) plus, when ``evaluate`` is set, its evaluation statistics
  of the parameters it received (the previous round's model): ``n``, ``loss_sum``,
  ``confusion``, ``hist``.
* ``evaluate``: the settings with the parameters; the site answers its statistics.

Arrays travel as ``np.save`` bytes (never pickled) inside the one ConfigRecord when small
(:data:`INLINE_LIMIT`), else as an ``ArrayRecord`` of the same name (:func:`pack`). Flower
moves every record, array and chunk as a separate content-addressed object over its own HTTP
request, so one record per message (3 objects instead of 11) makes a round markedly faster; a
round's requests have identical content for every site.

The config travels to the coordinator's ServerApp as JSON in the run config (key
:data:`RUN_CONFIG_KEY`); the sites use their own copy of the same config file and must agree
with the coordinator on every setting that changes the computation (:func:`fingerprint`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from typing import Any

import numpy as np

from privml import __version__
from privml.config import Config, parse_config
from privml.errors import ConfigError

__all__ = [
    "APP_NAME",
    "APP_PUBLISHER",
    "FAB_ID",
    "RUN_CONFIG_KEY",
    "build_fab",
    "config_from_run_config",
    "fingerprint",
    "fingerprint_mismatch",
    "pyproject_toml",
]

APP_PUBLISHER = "privml"
APP_NAME = "privml-flower"
FAB_ID = f"{APP_PUBLISHER}/{APP_NAME}"
RUN_CONFIG_KEY = "privml-config"
OUT_DIR_KEY = "privml-out"

# record names inside a message's RecordDict
PARAMS = "params"
UPDATE = "update"
SETTINGS = "settings"
SITE = "site"
RESULT = "result"


def array_to_bytes(a: np.ndarray) -> bytes:
    """``np.save`` bytes of ``a`` (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


INLINE_LIMIT = 4 << 20
"""Arrays up to this many bytes travel inside the message's one ConfigRecord; larger ones in an
``ArrayRecord`` (which Flower splits into chunks of at most 5 MiB)."""


def pack(values: dict[str, Any], name: str, array: np.ndarray) -> dict[str, Any]:
    """Message records holding ``values`` (small settings) and ``array`` under ``name``.

    Returns a mapping record name -> record for ``RecordDict``: the ConfigRecord under the key
    :data:`SETTINGS` (requests) or :data:`RESULT` (replies) is made by the caller from
    ``values``; this adds the array inline (``values[name]`` as bytes) or as an ArrayRecord.
    """
    from flwr.app import Array, ArrayRecord

    if array.nbytes <= INLINE_LIMIT:
        values[name] = array_to_bytes(array)
        return {}
    return {name: ArrayRecord({name: Array(np.ascontiguousarray(array))})}


def unpack(content: Any, record: str, name: str) -> np.ndarray | None:
    """The array ``name`` of a message packed by :func:`pack` (None if absent or malformed)."""
    try:
        arrays = content.array_records
        if name in arrays and name in arrays[name]:
            return np.asarray(arrays[name][name].numpy())
        values = content.config_records.get(record)
        if values is not None and name in values:
            return array_from_bytes(values[name])
    except (TypeError, ValueError, OSError):
        return None
    return None


def array_from_bytes(b: object) -> np.ndarray:
    """Inverse of :func:`array_to_bytes`; refuses pickled objects and non-bytes."""
    if not isinstance(b, bytes):
        raise ValueError(f"expected bytes, got {type(b).__name__}")
    return np.load(io.BytesIO(b), allow_pickle=False)


def pyproject_toml() -> str:
    """The Flower App Bundle's ``pyproject.toml``: privml's installed apps, no code, no deps.

    The bundle carries no code: both components are imported from the privml installed at the
    SuperLink and at each site, and ``dependencies`` is empty, so no Flower component ever
    installs anything for a privml run.
    """
    return f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{APP_NAME}"
version = "{__version__}"
description = "privml federated training (ServerApp and ClientApp from the installed privml)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "{APP_PUBLISHER}"

[tool.flwr.app.components]
serverapp = "privml.fl.flower.server_app:app"
clientapp = "privml.fl.flower.client_app:app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = ""
{OUT_DIR_KEY} = ""
"""


@functools.cache
def build_fab() -> tuple[bytes, str]:
    """Build the app bundle in memory; return ``(bytes, sha256 hex)`` (built once per process)."""
    from flwr.cli.build import build_fab_from_files

    fab, _meta = build_fab_from_files({"pyproject.toml": pyproject_toml().encode()})
    return fab, hashlib.sha256(fab).hexdigest()


def config_to_run_config(config: Config) -> str:
    """The config as JSON for the run config (paths already absolute at the coordinator)."""
    return json.dumps(config.resolved(), sort_keys=True)


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The config the coordinator sent with the run (see :func:`config_to_run_config`)."""
    text = run_config.get(RUN_CONFIG_KEY)
    if not isinstance(text, str) or not text:
        raise ConfigError(
            f"the Flower run carries no privml config (run config key {RUN_CONFIG_KEY!r}); "
            "start runs with `privml flower run --config FILE`"
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the run's privml config is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the run's privml config is not a JSON object")
    name = raw.pop("name", "privml")
    return parse_config(raw, name=str(name))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


COORDINATOR_ONLY = ("engine", "min_sites_per_round", "round_timeout", "wait_for_sites")
"""``[training]`` settings only the coordinator uses: a site's value does not matter."""

_SITE_OWN = ("ledger", "budget_epsilon", "budget_delta")
"""``[privacy]`` settings each site keeps for itself: its ledger and its budget."""


def fingerprint(config: Config) -> dict[str, str]:
    """Hashes of the config sections that must be equal at the coordinator and every site.

    ``data`` (everything but where each site keeps its file), ``model``, ``training`` (but
    the :data:`COORDINATOR_ONLY` settings) and ``privacy`` (but each site's own ledger and
    budget); a difference in any of them would make a site train or encode differently from
    what the coordinator expects.
    """
    r = config.resolved()
    data = dict(r["data"])
    if data.get("sites"):
        data["sites"] = [s["name"] for s in data["sites"]]
    training = {k: v for k, v in r["training"].items() if k not in COORDINATOR_ONLY}
    return {
        "data": _digest(data),
        "model": _digest(r["model"]),
        "training": _digest(training),
        "privacy": _digest({k: v for k, v in r["privacy"].items() if k not in _SITE_OWN}),
    }


def fingerprint_mismatch(ours: dict[str, str], theirs: Any) -> list[str]:
    """Names of the sections on which two fingerprints differ (all of them if malformed)."""
    if not isinstance(theirs, dict):
        return sorted(ours)
    return sorted(k for k in ours if theirs.get(k) != ours[k])
