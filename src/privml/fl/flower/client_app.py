"""privml's Flower ClientApp: the site side of a deployment (message API).

``app`` is the ClientApp Flower loads from the app bundle (component
``privml.fl.flower.client_app:app``) when a stock ``flower-supernode`` runs it; it finds its
site from the SuperNode's node config (``--node-config 'site="NAME" config="/path.toml"'``).
privml's own SuperNode (:mod:`privml.fl.flower.node`) builds the same handlers with
:func:`make_client_app` around the site runtime it loaded once at start.

Every incoming message is untrusted input: the coordinator's config fingerprint must equal the
site's, the parameters must be a finite float vector of the site model's size, and the round
must be one of the config's; anything else is answered with an error, never trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp
except ImportError:  # an optional extra is missing: say which, and how to install it
    from privml.extras import require

    require("flower", "Running on Flower (privml flower, --engine flower)")
    raise

from privml.errors import UsageError
from privml.fl.flower import protocol as P
from privml.fl.flower.evaluation import EvalStats
from privml.fl.flower.secaggplus import SecAggPlusSettings, fit_reply, fit_request, site_mod
from privml.fl.flower.site import SiteRuntime

__all__ = ["app", "make_client_app", "runtime_from_node_config", "stats_to_config"]


def stats_to_config(stats: EvalStats) -> dict[str, Any]:
    """Evaluation statistics as ConfigRecord values (arrays as ``np.save`` bytes)."""
    return {
        "n": int(stats["n"]),
        "loss_sum": float(stats["loss_sum"]),
        "confusion": P.array_to_bytes(np.asarray(stats["confusion"], dtype=np.int64)),
        "hist": P.array_to_bytes(np.asarray(stats["hist"], dtype=np.int64)),
    }


def _settings(msg: Message) -> ConfigRecord:
    if P.SETTINGS not in msg.content.config_records:
        raise UsageError("message without privml settings; is this a privml run?")
    return msg.content.config_records[P.SETTINGS]


def _check(rt: SiteRuntime, settings: ConfigRecord) -> None:
    raw = settings.get("fingerprint")
    try:
        theirs = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        theirs = None
    rt.check_fingerprint(theirs)


def _params(rt: SiteRuntime, msg: Message) -> np.ndarray:
    params = P.unpack(msg.content, P.SETTINGS, P.PARAMS)
    if params is None:
        raise UsageError(f"site {rt.name!r}: the message carries no readable model parameters")
    return params


def _counts(settings: ConfigRecord) -> list[int]:
    raw = settings.get("counts")
    try:
        counts = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        counts = None
    if not isinstance(counts, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts
    ):
        raise UsageError("the request carries no valid site counts")
    return counts


def _blob(msg: Message) -> bytes:
    arr = P.unpack(msg.content, P.SETTINGS, P.PARAMS)
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 1:
        raise UsageError("the request carries no readable bytes")
    return arr.tobytes()


def _serve(rt: SiteRuntime, service: str, settings: ConfigRecord, msg: Message) -> dict[str, Any]:
    """A stage's request to this site: ``private`` (plan, check and book this site's private
    training; its private input mean back), ``centre``, ``keygen``, ``setup`` or ``decrypt``."""
    result: dict[str, Any] = {}
    if service == "keygen":
        public = rt.keygen(_counts(settings))
        content = P.pack(result, "public", np.frombuffer(public, dtype=np.uint8))
    elif service == "setup":
        rt.setup(_counts(settings), _blob(msg))
        content = {}
    elif service == "private":
        estimate = settings.get("estimate_centre", True)
        private = rt.private_setup(estimate_centre=estimate is not False)
        result.update(epsilon=rt.booked(), planned=float(private.planned))
        content = {}
        if private.centre is not None:
            content = P.pack(result, "centre", np.asarray(private.centre, dtype=np.float64))
    elif service == "centre":
        rt.apply_centre(P.unpack(msg.content, P.SETTINGS, P.PARAMS))
        content = {}
    elif service == "decrypt":
        n = settings.get("n")
        if isinstance(n, bool) or not isinstance(n, int):
            raise UsageError(f"decrypt: the count of contributions must be an int; got {n!r}")
        content = P.pack(result, "sum", rt.decrypt(_blob(msg), n))
    else:
        raise UsageError(f"unknown request {service!r}")
    content[P.RESULT] = ConfigRecord(result)
    return content


def make_client_app(get_runtime: Callable[[Context], SiteRuntime]) -> ClientApp:
    """A ClientApp whose handlers run on the :class:`SiteRuntime` ``get_runtime(context)``."""
    client = ClientApp()

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        rt = get_runtime(context)
        settings = _settings(msg)
        _check(rt, settings)
        service = settings.get("service")
        if service is not None:
            return Message(RecordDict(_serve(rt, str(service), settings, msg)), reply_to=msg)
        info = rt.info()
        record = ConfigRecord(
            {
                "site": info.name,
                "site_index": info.index,
                "n_train": info.n_train,
                "n_test": info.n_test,
                "n_features": info.n_features,
                "task": json.dumps(info.task),
                "encoding": json.dumps(info.encoding),
                "fingerprint": json.dumps(info.fingerprint),
            }
        )
        return Message(RecordDict({P.SITE: record}), reply_to=msg)

    @client.train(mods=[site_mod(get_runtime)])
    def train(msg: Message, context: Context) -> Message:
        rt = get_runtime(context)
        secagg = fit_request(msg)  # SecAgg+: Flower's workflow asks for a FitRes
        settings, params = secagg if secagg is not None else (_settings(msg), None)
        _check(rt, settings)
        if params is None:
            params = _params(rt, msg)
        elif rt.config.training.secure_aggregation != "secagg+":
            raise UsageError(f"site {rt.name!r}: this site's config uses no SecAgg+")
        rnd = settings.get("round")
        result: dict[str, Any] = {}
        if settings.get("evaluate", False):
            result.update(stats_to_config(rt.evaluate(params)))
        asked = settings.get("asked")
        batch = rt.run_round(params, rnd=rnd, asked=asked)  # type: ignore[arg-type]
        result["n_train"] = int(batch.weights[0])
        booked = rt.booked()
        if booked is not None:  # what this site has booked in its own ledger (informational)
            result["epsilon"] = booked
        if secagg is not None:  # the clipped update goes to Flower's mod, which masks it
            clip = SecAggPlusSettings.from_config(rt.config).clip
            return Message(fit_reply(batch.updates[0], result["n_train"], clip, result),
                           reply_to=msg)  # fmt: skip
        if batch.sealed is not None:
            blob = batch.sealed[0]
            if blob is None:
                raise UsageError(f"site {rt.name!r}: its update is not finite; nothing sent")
            content = P.pack(result, "sealed", np.frombuffer(blob, dtype=np.uint8))
        else:
            content = P.pack(result, P.UPDATE, batch.updates[0])
        content[P.RESULT] = ConfigRecord(result)
        return Message(RecordDict(content), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        rt = get_runtime(context)
        _check(rt, _settings(msg))
        stats = stats_to_config(rt.evaluate(_params(rt, msg)))
        return Message(RecordDict({P.RESULT: ConfigRecord(stats)}), reply_to=msg)

    return client


_RUNTIMES: dict[tuple[str, float, str], SiteRuntime] = {}


def runtime_from_node_config(context: Context) -> SiteRuntime:
    """The site runtime named by the SuperNode's node config (``site``, ``config``), cached."""
    site = context.node_config.get("site")
    path = context.node_config.get("config")
    if not isinstance(site, str) or not isinstance(path, str) or not site or not path:
        raise UsageError(
            "this SuperNode has no privml site: start it with `privml flower supernode --site "
            'NAME --config FILE`, or pass --node-config \'site="NAME" config="/abs/file.toml"\' '
            f"to flower-supernode. Got node config {dict(context.node_config)!r}."
        )
    p = Path(path)
    key = (str(p.resolve()), p.stat().st_mtime if p.exists() else 0.0, site)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = SiteRuntime.from_file(p, site)
    return _RUNTIMES[key]


app = make_client_app(runtime_from_node_config)
"""The ClientApp for a stock ``flower-supernode`` (site and config from its node config)."""
