"""Privacy events: *what happened*, kept separate from *how it is accounted*.

Every privml mechanism, query, training step or federated round describes itself with a
frozen :class:`dp_accounting.DpEvent` (Google's dp-accounting). The accountants in
:mod:`privml.dp.accounting` and the ledger in :mod:`privml.dp.ledger` interpret these events;
the mechanisms never compute a composed epsilon themselves.

dp-accounting already covers the Laplace, Gaussian, discrete Laplace and randomized-response
mechanisms, Poisson subsampling and (self-)composition. This module adds three events that
privml's mechanisms need and dp-accounting 0.6 lacks, as ``attrs``-frozen subclasses of
``DpEvent`` so that ``to_named_tuple`` / ``from_named_tuple`` and the accountants' recursion keep
working:

* :class:`PureDpEvent` -- a mechanism known only to be epsilon-DP (exponential mechanism,
  report-noisy-max).
* :class:`ApproxDpEvent` -- a mechanism known only to be (epsilon, delta)-DP.
* :class:`DiscreteGaussianDpEvent` -- the discrete Gaussian N_Z(0, sigma^2) added to an
  integer query of integer sensitivity (Canonne, Kamath & Steinke 2020).

All epsilons are natural-log privacy-loss bounds with respect to the neighbouring relation of
the mechanism that emitted them (add/remove one record unless stated otherwise).

Events are persisted as JSON (:func:`event_to_json` / :func:`event_from_json`); decoding only
instantiates classes from ``dp_accounting`` and ``privml.dp.events``, never arbitrary modules.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attr
from dp_accounting.dp_event import (
    ComposedDpEvent,
    DiscreteLaplaceDpEvent,
    DpEvent,
    GaussianDpEvent,
    LaplaceDpEvent,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    RandomizedResponseDpEvent,
    SelfComposedDpEvent,
    ZCDpEvent,
)

from privml.errors import UsageError

__all__ = [
    "ApproxDpEvent",
    "ComposedDpEvent",
    "DiscreteGaussianDpEvent",
    "DiscreteLaplaceDpEvent",
    "DpEvent",
    "GaussianDpEvent",
    "LaplaceDpEvent",
    "NoOpDpEvent",
    "NonPrivateDpEvent",
    "PoissonSampledDpEvent",
    "PureDpEvent",
    "RandomizedResponseDpEvent",
    "SelfComposedDpEvent",
    "ZCDpEvent",
    "compose_events",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PureDpEvent(DpEvent):  # type: ignore[misc]
    """A mechanism that satisfies ``epsilon``-DP and about which nothing finer is claimed.

    Used for the exponential mechanism and report-noisy-max. Accountants treat it through
    its worst case: the binary randomized-response pair with ratio ``e**epsilon``, which
    dominates every epsilon-DP mechanism (Kairouz, Oh & Viswanath 2015), so PLD and RDP
    composition of these events is sound and tight for the class.
    """

    epsilon: float


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ApproxDpEvent(DpEvent):  # type: ignore[misc]
    """A mechanism that satisfies (``epsilon``, ``delta``)-DP and nothing finer is claimed.

    The PLD accountant uses dp-accounting's pessimistic PLD for (epsilon, delta)-DP
    (``from_privacy_parameters``); RDP cannot represent ``delta > 0`` and refuses it.
    """

    epsilon: float
    delta: float


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DiscreteGaussianDpEvent(DpEvent):  # type: ignore[misc]
    """Discrete Gaussian noise N_Z(0, sigma^2) added to an integer query.

    ``sigma`` is the discrete Gaussian's scale parameter in the query's integer units (close
    to, but not exactly, its standard deviation); ``sensitivity`` is the query's integer
    sensitivity in the same units. The PLD accountant uses dp-accounting's
    ``from_discrete_gaussian_mechanism``; the RDP accountant uses the
    ``sensitivity**2 / (2 sigma**2)``-zCDP bound of Canonne, Kamath & Steinke 2020.
    """

    sigma: float
    sensitivity: int


_ALLOWED_MODULE_PREFIXES = ("dp_accounting.", "privml.dp.events")


def _plain(value: Any) -> Any:
    """Converts a named-tuple tree from ``DpEvent.to_named_tuple`` into JSON-able values."""
    if hasattr(value, "_fields") and hasattr(value, "module_name"):
        out: dict[str, Any] = {}
        for field in value._fields:
            out[field] = _plain(getattr(value, field))
        return out
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/nan; "inf" / "nan" are decoded by float()
    return value


def event_to_dict(event: DpEvent) -> dict[str, Any]:
    """Returns a JSON-serializable dict describing ``event`` (nested events become dicts).

    Each event dict carries ``module_name`` and ``class_name`` plus the event's fields, the
    same layout as dp-accounting's ``DpEvent.to_named_tuple``.
    """
    if not isinstance(event, DpEvent):
        raise TypeError(
            f"The 'event' parameter of event_to_dict must be a dp_accounting.DpEvent. "
            f"Got {type(event).__name__} instead."
        )
    result = _plain(event.to_named_tuple())
    assert isinstance(result, dict)
    return result


def _decode(value: Any) -> Any:
    if isinstance(value, Mapping) and "module_name" in value and "class_name" in value:
        return event_from_dict(value)
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def event_from_dict(data: Mapping[str, Any]) -> DpEvent:
    """Rebuilds a DpEvent from :func:`event_to_dict`'s output.

    Only classes defined in ``dp_accounting`` or ``privml.dp.events`` are instantiated.
    Raises :class:`~privml.errors.UsageError` for anything else.
    """
    if not isinstance(data, Mapping):
        raise UsageError(f"A privacy event must be a JSON object. Got {type(data).__name__}.")
    module_name = data.get("module_name")
    class_name = data.get("class_name")
    if not isinstance(module_name, str) or not isinstance(class_name, str):
        raise UsageError("A privacy event needs string fields 'module_name' and 'class_name'.")
    if not module_name.startswith(_ALLOWED_MODULE_PREFIXES):
        raise UsageError(
            f"Refusing to decode privacy event class {module_name}.{class_name}: only "
            "dp_accounting and privml.dp.events classes are allowed."
        )
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, DpEvent)):
        raise UsageError(f"{module_name}.{class_name} is not a DpEvent class.")
    fields = {f.name: f for f in attr.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("module_name", "class_name"):
            continue
        if key not in fields:
            raise UsageError(f"Unknown field {key!r} for privacy event {class_name}.")
        decoded = _decode(value)
        if isinstance(decoded, str) and decoded in ("inf", "-inf", "nan"):
            decoded = float(decoded)
        kwargs[key] = decoded
    try:
        event = cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"Invalid fields for privacy event {class_name}: {exc}") from exc
    assert isinstance(event, DpEvent)
    return event


def event_to_json(event: DpEvent) -> str:
    """Serializes ``event`` to a compact, key-sorted JSON string."""
    return json.dumps(event_to_dict(event), sort_keys=True, separators=(",", ":"))


def event_from_json(text: str) -> DpEvent:
    """Parses :func:`event_to_json`'s output back into an equal DpEvent."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"A privacy event is not valid JSON: {exc}") from exc
    return event_from_dict(data)


def compose_events(events: Sequence[DpEvent]) -> DpEvent:
    """Composes ``events`` into one event: NoOp for none, the event itself for one."""
    if len(events) == 0:
        return NoOpDpEvent()
    if len(events) == 1:
        return events[0]
    return ComposedDpEvent(list(events))
