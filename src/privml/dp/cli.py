"""Command-line pieces of the DP layer.

* ``dp_app`` -- a typer sub-app for ``privml dp``: ``epsilon`` (epsilon of T steps of the
  Poisson-subsampled Gaussian, like Opacus's / TF Privacy's compute-privacy helpers) and
  ``noise`` (the smallest noise multiplier that meets a target epsilon).
* :func:`run_query` and :func:`budget_report` -- what ``privml query`` and ``privml budget``
  do, as plain functions of a loaded config, returning JSON-able dicts;
  :func:`format_query_result` and :func:`format_budget_report` render them for humans.

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
    "format_budget_report",
    "format_query_result",
    "ledger_from_config",
    "run_query",
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
    config: Any, *, fingerprints: Mapping[str, str] | None = None
) -> PrivacyLedger:
    """Opens the ledger the config names with the config's budget, keyed by the sites' data.

    The ledger is ``[privacy] ledger`` or, by default, the user's
    (:func:`privml.dp.ledger.default_ledger_path`, under ``$XDG_DATA_HOME``), whatever the
    current folder. Each site's budget is keyed by the fingerprint of its records
    (``fingerprints``, computed from the config's data when not given), and with an explicit
    ``[data] name`` bound to that dataset id.

    Raises:
        ConfigError: ``budget_epsilon`` / ``budget_delta`` or ``dataset_id`` are missing.
    """
    from privml.dp.ledger import PrivacyLedger

    path, dataset, budget_eps, budget_delta = _ledger_settings(config)
    if path.exists() or path.is_symlink():
        from privml.safe_io import check_regular_file

        check_regular_file(
            path, what="[privacy] ledger",
            error=lambda m: ConfigError(f"{m}; name the ledger's file, e.g. ledger = "
                                        '"privml-ledger.sqlite"'),
        )  # fmt: skip
    if fingerprints is None:
        fingerprints = _fingerprints(_default_loader(config))
    data = getattr(config, "data", None)
    explicit = getattr(data, "name", None)
    import sqlite3

    try:
        return PrivacyLedger(
            path,
            dataset=dataset,
            budget_epsilon=budget_eps,
            budget_delta=budget_delta,
            fingerprints=fingerprints,
            dataset_id=explicit if isinstance(explicit, str) and explicit else None,
        )
    except sqlite3.DatabaseError as exc:
        raise DataError(
            f"[privacy] ledger {str(path)!r} cannot be opened as a privml ledger ({exc}); "
            "point ledger at the ledger's file, or at a new file to start one"
        ) from None


def _ledger_settings(config: Any) -> tuple[Path, str, Any, Any]:
    """The ledger's path, dataset label and budget from the config (all problems at once)."""
    from privml.dp.ledger import default_ledger_path

    privacy = _section(config, "privacy")
    problems = []
    budget_eps: Any = getattr(privacy, "budget_epsilon", None)
    budget_delta: Any = getattr(privacy, "budget_delta", None)
    dataset = getattr(config, "dataset_id", None)
    if budget_eps is None:
        problems.append("[privacy] budget_epsilon is not set (total epsilon per site, e.g. 3.0)")
    if budget_delta is None:
        problems.append("[privacy] budget_delta is not set (total delta per site, e.g. 1e-6)")
    if not isinstance(dataset, str) or not dataset:
        problems.append("dataset_id is not set")
    if problems:
        raise ConfigError(problems)
    configured = getattr(privacy, "ledger", None)
    path = Path(configured) if configured is not None else default_ledger_path()
    return path, str(dataset), budget_eps, budget_delta


def _fingerprints(frames: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    from privml.data.records import fingerprint, record_hashes

    return {name: fingerprint(record_hashes(df), df.columns) for name, df in frames.items()}


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
    _ledger_settings(config)  # a config that cannot book fails before any data is read
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
    ledger = ledger_from_config(config, fingerprints=_fingerprints({site: frames[site]}))
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
    """Spent and remaining budget per site, and the history of charges.

    A site's budget is that of its records (their fingerprint, and the dataset id's lineage
    with ``[data] name``), so the report reads the sites' data (``load_frames``, default
    ``privml.data.load_site_frames``) to know whose budget to show.

    Returns:
        ``{"dataset", "ledger", "budget_epsilon", "budget_delta", "sites": {site: {...}},
        "history": [charge, ...]}`` where each site has ``spent_epsilon``, ``spent_delta``,
        ``remaining_epsilon``, ``remaining_delta`` and ``charges``.
    """
    frames = (load_frames or _default_loader)(config)
    ledger = ledger_from_config(config, fingerprints=_fingerprints(frames))
    names = sorted(frames)
    sites = {}
    for name in names:
        status = ledger.status(name).to_dict()
        sites[name] = {
            k: status[k]
            for k in (
                "fingerprint",
                "lineage",
                "spent_epsilon",
                "spent_delta",
                "remaining_epsilon",
                "remaining_delta",
                "charges",
            )
        }
    return {
        "dataset": ledger.dataset,
        "ledger": str(ledger.path),
        "budget_epsilon": ledger.budget.epsilon,
        "budget_delta": ledger.budget.delta,
        "sites": sites,
        "history": [r.to_dict() for r in ledger.history()],
    }


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
        f"budget per site: epsilon = {report['budget_epsilon']:g}, "
        f"delta = {report['budget_delta']:g}",
        f"{'site':<20} {'spent eps':>10} {'left eps':>10} {'spent delta':>12} {'charges':>8}",
    ]
    for site, s in report["sites"].items():
        lines.append(
            f"{site:<20} {s['spent_epsilon']:>10.4g} {s['remaining_epsilon']:>10.4g} "
            f"{s['spent_delta']:>12.3g} {s['charges']:>8d}"
        )
    if report["history"]:
        lines.append("history:")
        for r in report["history"]:
            lines.append(
                f"  #{r['id']} {r['created_at']} {r['site']}: {r['label']} "
                f"(epsilon {r['epsilon']:g}, delta {r['delta']:g})"
            )
    return "\n".join(lines)
