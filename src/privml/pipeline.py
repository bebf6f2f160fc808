"""One run from one config: data -> federated training -> evaluation -> artifacts and report.

The command line (``privml run``) and the Python API (:func:`run`) call this same code.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privml import __version__
from privml.artifacts import atomic_folder, save_model, write_json
from privml.config import Config
from privml.data.federation import FederatedData, load_federation
from privml.fl.engine import RoundRecord, TrainingResult, simulate
from privml.models.nets import ModelSpec

RESULTS_SCHEMA = "privml-results/1"


@dataclass
class RunOutput:
    results: dict[str, Any]
    out_dir: Path | None
    training: TrainingResult
    data: FederatedData


def model_spec(config: Config, fed: FederatedData) -> ModelSpec:
    m = config.model
    return ModelSpec(
        kind=m.kind,
        n_features=fed.n_features,
        n_outputs=fed.task.n_outputs,
        hidden=tuple(m.hidden),
        activation=m.activation,
        image_shape=tuple(m.image_shape) if m.image_shape else None,  # type: ignore[arg-type]
    )


def default_out_dir(config: Config) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return Path("runs") / f"{config.name}-{stamp}"


def run(
    config: Config,
    *,
    out_dir: Path | None = None,
    write: bool = True,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> RunOutput:
    """Execute the whole flow for ``config``; write the run folder unless ``write`` is False."""
    stage = on_stage or (lambda _s: None)
    t0 = time.perf_counter()
    stage("loading and encoding the sites' data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fed = load_federation(config)
    notes = [str(w.message) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    spec = model_spec(config, fed)
    stage(f"training {spec.kind} over {len(fed.sites)} sites")
    result = simulate(fed, spec, config.training, on_round=on_round)
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "privml_version": __version__,
        "name": config.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": fed.task.to_dict(),
        "sites": [{"name": s.name, "n_train": s.n_train, "n_test": s.n_test} for s in fed.sites],
        "model": spec.to_dict(),
        "rounds": [r.to_dict() for r in result.history],
        "metrics": result.metrics,
        "updates": {"rejected": result.rejected_updates},
        "privacy": {"mode": "none"},
        "schema_inferred_from_data": fed.inferred_columns,
        "notes": notes,
        "config": config.resolved(),
        "config_hash": config.config_hash(),
    }
    results["timing"] = {"total_seconds": time.perf_counter() - t0}
    final_dir = None
    if write:
        stage("writing results")
        final_dir = out_dir or config.output.dir or default_out_dir(config)

        def fill(tmp: Path) -> None:
            save_model(
                tmp, spec, result.params, fed.encoder, fed.task, config_hash=results["config_hash"]
            )
            write_json(tmp / "results.json", results)
            if config.output.html:
                from privml.report.html import render_report

                (tmp / "report.html").write_text(render_report(results))

        atomic_folder(final_dir, fill)
    return RunOutput(results, final_dir, result, fed)
