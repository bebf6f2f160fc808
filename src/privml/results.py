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

__all__ = ["RESULTS_SCHEMA", "results_document"]

RESULTS_SCHEMA = "privml-results/1"


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
    if extra.get("attack") is not None:
        doc["attack"] = extra["attack"]
    if features is not None:
        doc["features"] = features
    return doc
