"""results.json: the one place its document and schema are built, for every engine.

``privml run`` (:mod:`privml.pipeline`) and a Flower deployment (:mod:`privml.fl.flower.run`)
both call :func:`results_document`; each adds its own sections afterwards (the encrypted
inference check and the quick audit; the deployment).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from privml import __version__

__all__ = ["RESULTS_SCHEMA", "participation", "results_document"]

RESULTS_SCHEMA = "privml-results/1"

#: Causes of a missed round the config itself asks for (simulated dropouts and stragglers);
#: the others (a site that did not answer or failed) make a run degraded.
SIMULATED_CAUSES = ("dropped", "straggler")
_MAX_SITES_LISTED = 1000


def results_document(
    config: Any,
    *,
    task: Any,
    sites: Sequence[dict[str, Any]],
    training: Any,
    privacy: dict[str, Any] | None = None,
    inferred: Sequence[str] = (),
    notes: Sequence[str] = (),
    features: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json sections every run has.

    Args:
        config: the run's config.
        task: the prediction task (:class:`privml.data.encoding.Task`).
        sites: ``{"name", "n_train", "n_test"}`` per site.
        training: the :class:`privml.fl.engine.TrainingResult` (its ``extra`` carries the
            engine's ``updates``, ``federation`` and ``attack`` sections).
        privacy: results.json's ``privacy`` (``{"mode": "none"}`` when None).
        inferred: columns whose schema was read off the data.
        notes: warnings and remarks about the run.
        features: the fixed feature map the model starts with, if any.
    """
    extra = training.extra
    doc: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "privml_version": __version__,
        "name": config.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": task.to_dict(),
        "sites": [dict(s) for s in sites],
        "model": training.spec.to_dict(),
        "rounds": [r.to_dict() for r in training.history],
        "metrics": training.metrics,
        "updates": extra.get("updates", {"rejected": training.rejected_updates}),
        "federation": extra.get("federation"),
        "privacy": privacy if privacy is not None else {"mode": "none"},
        "schema_inferred_from_data": list(inferred),
        "notes": list(notes),
        "config": config.resolved(),
        "config_hash": config.config_hash(),
        "overrides": list(getattr(config, "overrides", ())),
    }
    doc["participation"] = participation(doc["sites"], training.history, training.metrics)
    if extra.get("attack") is not None:
        doc["attack"] = extra["attack"]
    if features is not None:
        doc["features"] = features
    return doc


def participation(
    sites: Sequence[dict[str, Any]], history: Sequence[Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """Which sites missed which rounds, and which test records the final metrics cover.

    Returns results.json's ``participation``: ``missed`` (site -> cause -> rounds; causes
    ``dropped`` and ``straggler`` are the config's simulated ones, ``timed_out`` and
    ``site_error`` a deployment's sites that did not answer or failed), ``rounds_unlisted``
    (rounds with too many missing sites to list), ``metrics_cover`` (test records evaluated
    ``n`` of ``of``; the sites with test records that were not evaluated), ``degraded``
    (a site missed a round for a reason the config did not simulate, or the metrics do not
    cover every test record) and ``warnings`` (why, in words).
    """
    names = [str(s["name"]) for s in sites]
    missed: dict[str, dict[str, list[int]]] = {}
    unlisted: list[int] = []
    for r in history:
        rec = r.missed if hasattr(r, "missed") else r.get("missed")
        rnd = r.round if hasattr(r, "round") else r.get("round")
        if rec is None:
            unlisted.append(int(rnd))
            continue
        for cause, ids in rec.items():
            for i in ids:
                name = names[i] if 0 <= int(i) < len(names) else f"#{i}"
                missed.setdefault(name, {}).setdefault(cause, []).append(int(rnd))
    total = sum(int(s.get("n_test", 0)) for s in sites)
    n = int(metrics.get("n") or 0)
    per_site = metrics.get("per_site") or {}
    not_evaluated = [
        str(s["name"]) for s in sites
        if int(s.get("n_test", 0)) > 0 and isinstance(per_site.get(s["name"]), dict)
        and not per_site[s["name"]].get("n")
    ]  # fmt: skip
    real = {
        name: {c: rounds for c, rounds in causes.items() if c not in SIMULATED_CAUSES}
        for name, causes in missed.items()
    }
    real = {name: causes for name, causes in real.items() if causes}
    warnings = []
    for name, causes in sorted(real.items()):
        rounds = sorted({r for rs in causes.values() for r in rs})
        warnings.append(
            f"site {name} missed {len(rounds)} round(s) ({', '.join(sorted(causes))}): "
            f"{_ranges(rounds)}"
        )
    if n < total:
        warnings.append(
            f"the final metrics cover {n} of {total} test records"
            + (f" (not evaluated: {', '.join(not_evaluated)})" if not_evaluated else "")
        )
    listed = dict(sorted(missed.items())[:_MAX_SITES_LISTED])
    return {
        "missed": listed,
        "sites_missing_rounds": len(missed),
        "rounds_unlisted": unlisted,
        "metrics_cover": {"n": n, "of": total, "not_evaluated": not_evaluated},
        "degraded": bool(warnings),
        "warnings": warnings,
    }


def _ranges(rounds: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out: list[str] = []
    for r in rounds:
        if out and out[-1].split("-")[-1] == str(r - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)
