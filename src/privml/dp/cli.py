"""Command-line pieces of the DP layer.

* ``dp_app`` -- a typer sub-app for ``privml dp``: ``epsilon`` (epsilon of T steps of the
  Poisson-subsampled Gaussian, like Opacus's / TF Privacy's compute-privacy helpers) and
  ``noise`` (the smallest noise multiplier that meets a target epsilon).
* :func:`run_query`, :func:`budget_report` and :func:`set_budget` -- what ``privml query``,
  ``privml budget`` and ``privml budget set`` do, as plain functions of a loaded config,
  returning JSON-able dicts; :func:`format_query_result`, :func:`format_budget_report` and
  :func:`format_budget_change` render them for humans.
* :func:`ledger_from_config` and :func:`open_ledger` -- the config's ledger, with or without
  the sites' records.

Errors are raised, not printed: invalid values raise :class:`~privml.errors.UsageError`
(exit code 2 in privml's ``main``), a refused spend raises
:class:`~privml.errors.BudgetExceededError` (exit code 3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from privml.errors import ConfigError, DataError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from privml.dp.ledger import PrivacyLedger

__all__ = [
    "budget_report",
    "dp_app",
    "format_budget_change",
    "format_budget_report",
    "format_query_result",
    "ledger_from_config",
    "open_ledger",
    "run_query",
    "set_budget",
    "site_records",
]

dp_app = typer.Typer(
    name="dp",
    help="Privacy accounting helpers: epsilon of a DP-SGD / DP-FedAvg run, noise calibration.",
    no_args_is_help=True,
    add_completion=False,
)

_ACCOUNTANT_HELP = "pld (privacy loss distributions, tight; default) or rdp (Renyi DP)."
_RELATION_HELP = (
    "add_or_remove (default) or replace_one: the neighbouring relation (privml's private "
    "training reports replace_one, which needs --accountant pld)"
)


def _accountant(value: str) -> str:
    name = value.strip().lower()
    if name not in ("pld", "rdp"):
        raise UsageError(f"--accountant must be 'pld' or 'rdp'. Got {value!r} instead.")
    return name


def _relation(value: str) -> str:
    name = value.strip().lower().replace("-", "_")
    if name in ("add_or_remove", "add_or_remove_one", "add_remove"):
        return "add_or_remove"
    if name in ("replace", "replace_one"):
        return "replace"
    raise UsageError(
        f"--relation must be 'add_or_remove' or 'replace_one'. Got {value!r} instead."
    )


@dp_app.command("epsilon")
def epsilon_command(
    sampling_rate: Annotated[
        float, typer.Option("--sampling-rate", help="Poisson sampling rate q in (0, 1].")
    ],
    noise_multiplier: Annotated[
        float, typer.Option("--noise-multiplier", help="Noise std / clipping norm (> 0).")
    ],
    steps: Annotated[int, typer.Option("--steps", help="Number of steps or rounds T (>= 1).")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta in (0, 1).")],
    accountant: Annotated[str, typer.Option("--accountant", help=_ACCOUNTANT_HELP)] = "pld",
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    relation: Annotated[str, typer.Option("--relation", help=_RELATION_HELP)] = "add_or_remove",
) -> None:
    """Epsilon after T steps of the Poisson-subsampled Gaussian mechanism (DP-SGD, DP-FedAvg)."""
    from privml.dp.accounting import compute_epsilon

    kind = _accountant(accountant)
    rel = _relation(relation)
    eps = compute_epsilon(
        delta=delta,
        sampling_rate=sampling_rate,
        noise_multiplier=noise_multiplier,
        steps=steps,
        accountant=kind,  # type: ignore[arg-type]
        neighboring_relation=rel,  # type: ignore[arg-type]
    )
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "epsilon": eps,
                    "delta": delta,
                    "accountant": kind,
                    "relation": "replace_one" if rel == "replace" else "add_or_remove",
                }
            )
        )
    else:
        typer.echo(
            f"epsilon = {eps:.6g} at delta = {delta:g} ({kind.upper()} accountant; q = "
            f"{sampling_rate:g}, noise multiplier = {noise_multiplier:g}, steps = {steps})"
        )


@dp_app.command("noise")
def noise_command(
    sampling_rate: Annotated[
        float, typer.Option("--sampling-rate", help="Poisson sampling rate q in (0, 1].")
    ],
    steps: Annotated[int, typer.Option("--steps", help="Number of steps or rounds T (>= 1).")],
    epsilon: Annotated[float, typer.Option("--epsilon", help="Target epsilon (> 0).")],
    delta: Annotated[float, typer.Option("--delta", help="Target delta in (0, 1).")],
    accountant: Annotated[str, typer.Option("--accountant", help=_ACCOUNTANT_HELP)] = "pld",
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Relative slack below the target epsilon.")
    ] = 0.01,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    relation: Annotated[str, typer.Option("--relation", help=_RELATION_HELP)] = "add_or_remove",
) -> None:
    """Smallest noise multiplier whose epsilon is <= the target (within --tolerance)."""
    from privml.dp.accounting import _calibrate

    kind = _accountant(accountant)
    result = _calibrate(
        target_epsilon=epsilon,
        delta=delta,
        sampling_rate=sampling_rate,
        steps=steps,
        accountant=kind,  # type: ignore[arg-type]
        tolerance=tolerance,
        neighboring_relation=_relation(relation),  # type: ignore[arg-type]
    )
    if json_output:
        typer.echo(
            json.dumps(
                {
                    "noise_multiplier": result.noise_multiplier,
                    "epsilon": result.epsilon,
                    "target_epsilon": epsilon,
                    "delta": delta,
                    "accountant": kind,
                }
            )
        )
    else:
        typer.echo(
            f"noise multiplier = {result.noise_multiplier:.6g} (epsilon = {result.epsilon:.6g} "
            f"<= {epsilon:g} at delta = {delta:g}; {kind.upper()} accountant, q = "
            f"{sampling_rate:g}, steps = {steps})"
        )


# ----------------------------------------------------------------------------- config-driven


def _section(config: Any, name: str) -> Any:
    section = getattr(config, name, None)
    if section is None:
        raise ConfigError(f"the config has no [{name}] section")
    return section


def ledger_from_config(
    config: Any,
    *,
    fingerprints: Mapping[str, str] | None = None,
    records: Mapping[str, Any] | None = None,
) -> PrivacyLedger:
    """Opens the ledger the config names, keeping each site's budget per record.

    The ledger is ``[privacy] ledger`` or, by default, the user's
    (:func:`privml.dp.ledger.default_ledger_path`, under ``$XDG_DATA_HOME``), whatever the
    current folder. Each site's budget is kept per record: ``records`` maps each site to its
    records' hashes (:func:`privml.data.records.record_hashes`) and ``fingerprints`` to
    their fingerprints; both are computed from the config's data when not given (when only
    ``fingerprints`` are given, the data read must still have them).

    The budget is the ledger's own (:mod:`privml.dp.ledger`): ``[privacy] budget_epsilon`` /
    ``budget_delta``, when the config sets them, fix it on the ledger's first use and must
    agree with it afterwards.

    Raises:
        ConfigError: ``dataset_id`` is missing.
        UsageError: the config asks for another budget than the ledger's (exit 2; the message
            names ``privml budget set``).
    """
    _check_ledger_file(_ledger_settings(config)[0])  # before any data is read
    if records is None:
        loaded_fps, records = site_records(config)
        if fingerprints is not None:
            changed = sorted(s for s, fp in fingerprints.items() if loaded_fps.get(s) != fp)
            if changed:
                raise DataError(
                    f"the data of site(s) {', '.join(map(repr, changed))} changed while privml "
                    "was running; nothing was charged. Run again on data that stays put."
                )
        fingerprints = loaded_fps
    return _open(config, fingerprints=fingerprints, records=records)


def open_ledger(config: Any) -> PrivacyLedger:
    """The config's ledger without any site: checks (and on first use fixes) its budget.

    Cheap (no data is read), so commands call it before computing anything: a config that
    asks for another budget than the ledger's is refused at once.
    """
    return _open(config)


def _open(config: Any, **sites: Any) -> PrivacyLedger:
    """The config's ledger file opened with its budget (``sites``: the sites' fingerprints
    and records, when charging)."""
    import sqlite3

    from privml.dp.ledger import PrivacyLedger

    path, dataset, budget_eps, budget_delta = _ledger_settings(config)
    _check_ledger_file(path)
    try:
        return PrivacyLedger(
            path,
            dataset=dataset,
            budget_epsilon=budget_eps,
            budget_delta=budget_delta,
            budget_source=_budget_source(config),
            **sites,
        )
    except sqlite3.DatabaseError as exc:
        raise DataError(
            f"[privacy] ledger {str(path)!r} cannot be opened as a privml ledger ({exc}); "
            "point ledger at the ledger's file, or at a new file to start one"
        ) from None


def _budget_source(config: Any) -> str:
    source = getattr(config, "source", None)
    where = f"the config {str(source)!r}" if source else "the config"
    return f"[privacy] in {where}"


def _check_ledger_file(path: Path) -> None:
    if path.exists() or path.is_symlink():
        from privml.safe_io import check_regular_file

        check_regular_file(
            path, what="[privacy] ledger",
            error=lambda m: ConfigError(f"{m}; name the ledger's file, e.g. ledger = "
                                        '"privml-ledger.sqlite"'),
        )  # fmt: skip


def _ledger_settings(config: Any) -> tuple[Path, str, Any, Any]:
    """The ledger's path, dataset label and the budget the config asks for (None: the
    ledger's own)."""
    from privml.dp.ledger import default_ledger_path

    privacy = _section(config, "privacy")
    budget_eps: Any = getattr(privacy, "budget_epsilon", None)
    budget_delta: Any = getattr(privacy, "budget_delta", None)
    dataset = getattr(config, "dataset_id", None)
    if not isinstance(dataset, str) or not dataset:
        raise ConfigError("dataset_id is not set")
    configured = getattr(privacy, "ledger", None)
    path = Path(configured) if configured is not None else default_ledger_path()
    return path, str(dataset), budget_eps, budget_delta


def site_records(config: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """Each site's fingerprint and record hashes, from the config's data."""
    if getattr(getattr(config, "data", None), "dataset", None) is not None:
        from privml.data.federation import site_records as builtin_records

        return builtin_records(config)
    frames = _default_loader(config)
    return _fingerprints(frames), _record_hashes(frames)


def _fingerprints(frames: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    from privml.data.records import fingerprint, record_hashes

    return {name: fingerprint(record_hashes(df), df.columns) for name, df in frames.items()}


def _record_hashes(frames: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    from privml.data.records import record_hashes

    return {name: record_hashes(df) for name, df in frames.items()}


def _default_loader(config: Any) -> Mapping[str, pd.DataFrame]:
    from privml.data import load_site_frames  # type: ignore[attr-defined]

    frames: Mapping[str, pd.DataFrame] = load_site_frames(config)
    return frames


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def run_query(
    config: Any,
    *,
    site: str,
    query: str,
    epsilon: float,
    delta: float | None = None,
    load_frames: Callable[[Any], Mapping[str, pd.DataFrame]] | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Runs one DP query on one site's data, charging the config's ledger first.

    Args:
        config: a loaded privml config (uses ``privacy.budget_epsilon``, ``privacy.budget_delta``,
            ``privacy.ledger``, ``dataset_id``, ``data.schema``).
        site: the site's name.
        query: e.g. ``"mean(age)"``, ``"histogram(sex)"``, ``"quantile(age, 0.5)"``,
            ``"mean(age) by sex"``.
        epsilon: epsilon to spend on this query (> 0).
        delta: None or 0 for pure DP (Laplace), else in (0, 1) (Gaussian).
        load_frames: returns the site frames; default ``privml.data.load_site_frames``.
        rng: INSECURE numpy sampler, for simulations only.

    Returns:
        ``{"query", "site", "value", "epsilon", "delta", "remaining_epsilon"}``; value is a
        number, or a dict for histograms and group-bys.

    Raises:
        UsageError: bad site, query, epsilon or delta (nothing is spent).
        SchemaError: the query needs bounds or categories the schema does not declare.
        BudgetExceededError: the site's remaining budget is too small (nothing is spent).
    """
    from privml.dp.queries import answer_query, parse_query

    spec = parse_query(query)  # fail on a bad query before reading any data
    if rng is None:
        from privml.extras import require

        require("queries", "privml query (OpenDP's exact noise samplers)")
    open_ledger(config)  # a config that cannot book (or asks for another budget) stops here
    data = _section(config, "data")
    schema = getattr(data, "schema", None)
    if getattr(data, "dataset", None) is not None:
        from privml.data import declared_schema

        schema = declared_schema(config)
    if schema is None:
        raise ConfigError("[data.schema] is missing: declare each column's type and bounds")
    frames = (load_frames or _default_loader)(config)
    if site not in frames:
        raise UsageError(
            f"Unknown site {site!r}. Sites in this config: {', '.join(sorted(frames)) or 'none'}."
        )
    one = {site: frames[site]}
    ledger = ledger_from_config(
        config, fingerprints=_fingerprints(one), records=_record_hashes(one)
    )
    result = answer_query(
        frames[site],
        spec,
        schema=schema,
        epsilon=epsilon,
        delta=0.0 if delta is None else delta,
        ledger=ledger,
        site=site,
        rng=rng,
        allow_data_derived_bounds=bool(
            getattr(_section(config, "privacy"), "allow_data_derived_bounds", False)
        ),
    )
    remaining = ledger.remaining(site)
    return {
        "query": result.query,
        "site": site,
        "value": _jsonable(result.value),
        "epsilon": result.epsilon,
        "delta": result.delta,
        "remaining_epsilon": remaining.epsilon,
    }


def _configured_sites(config: Any) -> list[str]:
    data = getattr(config, "data", None)
    sites = getattr(data, "sites", None) if data is not None else None
    names: list[str] = []
    if isinstance(sites, Mapping):
        names = [str(k) for k in sites]
    elif isinstance(sites, (list, tuple)):
        for s in sites:
            name = s if isinstance(s, str) else getattr(s, "name", None)
            if isinstance(name, str):
                names.append(name)
    return names


def budget_report(
    config: Any, *, load_frames: Callable[[Any], Mapping[str, pd.DataFrame]] | None = None
) -> dict[str, Any]:
    """The ledger's budget and its history, each site's spend and remainder, the charges.

    A site's budget is kept per record, so the report reads the sites' data (``load_frames``,
    default ``privml.data.load_site_frames`` or the built-in dataset's sites) to know whose
    spend to show: a site's spend is that of its most-spent record.

    Returns:
        ``{"dataset", "ledger", "relation", "budget_epsilon", "budget_delta",
        "budget_history": [change, ...], "sites": {site: {...}}, "history": [charge, ...]}``
        where each site has ``records``, ``spent_epsilon``, ``spent_delta``,
        ``remaining_epsilon``, ``remaining_delta`` and ``charges``, and each charge its
        ``relation``.
    """
    open_ledger(config)
    if load_frames is not None:
        frames = load_frames(config)
        fps, recs = _fingerprints(frames), _record_hashes(frames)
    else:
        fps, recs = site_records(config)
    ledger = ledger_from_config(config, fingerprints=fps, records=recs)
    sites = {}
    for name in sorted(recs):
        status = ledger.status(name).to_dict()
        sites[name] = {
            k: status[k]
            for k in (
                "fingerprint",
                "records",
                "spent_epsilon",
                "spent_delta",
                "remaining_epsilon",
                "remaining_delta",
                "charges",
            )
        }
    from privml.dp.ledger import RELATION

    return {
        "dataset": ledger.dataset,
        "ledger": str(ledger.path),
        "relation": RELATION,
        "budget_epsilon": ledger.budget.epsilon,
        "budget_delta": ledger.budget.delta,
        "budget_history": [c.to_dict() for c in ledger.budget_history()],
        "sites": sites,
        "history": [r.to_dict() for r in ledger.history()],
    }


def set_budget(
    config: Any = None,
    *,
    ledger: str | Path | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """What ``privml budget set`` does: changes a ledger's budget, recorded in its history.

    The ledger is ``ledger``, else the config's (``[privacy] ledger``), else the user's
    default. The config's own budget lines are not consulted (this is the deliberate change
    they cannot make).

    Returns:
        ``{"ledger", "old_epsilon", "old_delta", "epsilon", "delta", "reason", "created_at",
        "max_spent_epsilon", "max_spent_delta"}``.
    """
    from privml.dp.ledger import PrivacyLedger, default_ledger_path

    if epsilon is None and delta is None:
        raise UsageError("privml budget set needs --epsilon, --delta or both.")
    if ledger is not None:
        path = Path(ledger)
        dataset = "privml"
    elif config is not None:
        path, dataset, _, _ = _ledger_settings(config)
    else:
        path, dataset = default_ledger_path(), "privml"
    _check_ledger_file(path)
    handle = PrivacyLedger(path, dataset=dataset)
    change = handle.set_budget(epsilon=epsilon, delta=delta, reason=reason or "privml budget set")
    most = handle.max_spent()
    return {
        "ledger": str(path),
        "old_epsilon": change.old_epsilon,
        "old_delta": change.old_delta,
        "epsilon": change.epsilon,
        "delta": change.delta,
        "reason": change.reason,
        "created_at": change.created_at,
        "max_spent_epsilon": most.epsilon,
        "max_spent_delta": most.delta,
    }


def format_budget_change(change: Mapping[str, Any]) -> str:
    """Human-readable lines for :func:`set_budget`'s result."""
    old = (
        "none (a new ledger)"
        if change["old_epsilon"] is None
        else f"epsilon = {change['old_epsilon']:g}, delta = {change['old_delta']:g}"
    )
    lines = [
        f"ledger {change['ledger']}: budget per record set to epsilon = {change['epsilon']:g}, "
        f"delta = {change['delta']:g} (was {old}); recorded in the ledger's budget history "
        f"({change['created_at']}, {change['reason']!r})",
    ]
    if (
        change["max_spent_epsilon"] > change["epsilon"]
        or change["max_spent_delta"] > change["delta"]
    ):
        lines.append(
            f"note: some records have already spent epsilon = {change['max_spent_epsilon']:g}, "
            f"delta = {change['max_spent_delta']:g}; they get no more charges"
        )
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


def format_query_result(result: Mapping[str, Any]) -> str:
    """Human-readable lines for :func:`run_query`'s result."""
    return (
        f"{result['query']} at site {result['site']!r}: {_fmt(result['value'])}\n"
        f"charged epsilon = {result['epsilon']:g}, delta = {result['delta']:g}; "
        f"remaining epsilon = {result['remaining_epsilon']:g}"
    )


def format_budget_report(report: Mapping[str, Any]) -> str:
    """Human-readable table for :func:`budget_report`'s result."""
    lines = [
        f"dataset {report['dataset']!r}, ledger {report['ledger']}",
        f"budget per record: epsilon = {report['budget_epsilon']:g}, "
        f"delta = {report['budget_delta']:g}; every charge booked under the "
        f"{report.get('relation', 'replace_one').replace('_', '-')} relation; a site's spend is "
        "that of its most-spent record",
        f"{'site':<20} {'records':>8} {'spent eps':>10} {'left eps':>10} {'spent delta':>12} "
        f"{'charges':>8}",
    ]
    for site, s in report["sites"].items():
        n = s.get("records")
        lines.append(
            f"{site:<20} {'-' if n is None else n:>8} {s['spent_epsilon']:>10.4g} "
            f"{s['remaining_epsilon']:>10.4g} {s['spent_delta']:>12.3g} {s['charges']:>8d}"
        )
    if report.get("budget_history"):
        lines.append("budget history:")
        for c in report["budget_history"]:
            was = (
                ""
                if c["old_epsilon"] is None
                else f" (was epsilon {c['old_epsilon']:g}, delta {c['old_delta']:g})"
            )
            lines.append(
                f"  {c['created_at']} epsilon {c['epsilon']:g}, delta {c['delta']:g}{was}: "
                f"{c['reason']}"
            )
    if report["history"]:
        lines.append("history:")
        for r in report["history"]:
            conv = r["metadata"].get("converted_from") if isinstance(r["metadata"], dict) else None
            how = r.get("relation", "replace_one").replace("_", "-")
            if conv:
                how += (
                    f", from add/remove epsilon {conv['epsilon']:g}, delta {conv['delta']:g} "
                    "by group privacy"
                )
            lines.append(
                f"  #{r['id']} {r['created_at']} {r['site']}: {r['label']} "
                f"(epsilon {r['epsilon']:g}, delta {r['delta']:g}, {how})"
            )
    return "\n".join(lines)
