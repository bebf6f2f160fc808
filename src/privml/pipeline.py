"""One run from one config: data -> federated training -> evaluation -> artifacts and report.

The command line (``privml run``) and the Python API (:func:`run`) call this same code.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privml.artifacts import (
    atomic_folder,
    check_output_folder,
    save_model,
    strict_json,
    write_json,
)
from privml.config import Config
from privml.data.federation import FederatedData, load_federation
from privml.errors import ConfigError, DataError, UsageError
from privml.fl.checkpoint import (
    has_checkpoint,
    load_checkpoint,
    locate_partial_run,
    partial_dir,
    read_run_config,
    write_run_config,
)
from privml.fl.compat import check_combination
from privml.fl.engine import TrainingResult
from privml.fl.metrics import curves
from privml.fl.rounds import RoundRecord
from privml.fl.training import train
from privml.models.nets import ModelSpec
from privml.results import RESULTS_SCHEMA, results_document

__all__ = ["RESULTS_SCHEMA", "RunOutput", "model_spec", "run"]


@dataclass
class RunOutput:
    results: dict[str, Any]
    out_dir: Path | None
    training: TrainingResult
    data: FederatedData


def model_spec(config: Config, fed: FederatedData) -> ModelSpec:
    """The architecture for ``config`` on ``fed``'s encoded features.

    Raises:
        ConfigError: the model does not fit the data (a cnn's image_shape) or is too large.
    """
    from privml.models.nets import check_spec

    m = config.model
    spec = ModelSpec(
        kind=m.kind,
        n_features=fed.n_features,
        n_outputs=fed.task.n_outputs,
        hidden=tuple(m.hidden),
        activation=m.activation,
        image_shape=tuple(m.image_shape) if m.image_shape else None,  # type: ignore[arg-type]
    )
    check_spec(spec)
    return spec


def encrypted_inference(
    config: Config, result: TrainingResult, fed: FederatedData, private: Any
) -> dict[str, Any]:
    """Compile the trained model to an encrypted evaluator and measure it on the test records.

    A model that cannot be evaluated under encryption (ReLU, a feature map) is reported with
    the reason instead of failing the run.
    """
    from privml.errors import PrivmlError
    from privml.he import run_encrypted_inference_check
    from privml.models.nets import build_model, load_flat_params

    inf = config.inference
    if private is not None and getattr(private, "features", None) is not None:
        return {"scheme": inf.scheme, "skipped": "models on a feature map are not compiled "
                "to encrypted evaluators; set [model] features = \"none\""}
    model = build_model(result.spec)
    load_flat_params(model, result.params)
    X_test, _ = fed.pooled_test()
    try:
        return run_encrypted_inference_check(
            model, result.spec, X_test[: inf.max_samples], scheme=inf.scheme,
            n_single=inf.n_single, key_bits=inf.key_bits,
            max_context_bytes=inf.max_context_bytes,
        )
    except PrivmlError as exc:
        return {"scheme": inf.scheme, "skipped": str(exc)}


@contextmanager
def _noting(notes: list[str]) -> Iterator[None]:
    """Show each warning as it is raised (the command line prints it at once) and keep its
    text for results.json's ``notes``."""
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("always")

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                 line: Any = None) -> None:  # fmt: skip
            if str(message) not in notes:
                notes.append(str(message))
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def budget_snapshot(
    config: Config,
    sites: list[str],
    fingerprints: dict[str, str] | None = None,
    records: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Each site's budget, spend and remainder in the ledger after this run (all runs and
    queries on these records, basic composition per record under replace-one; a site's
    spend is that of its most-spent record), for the report."""
    from privml.dp.cli import ledger_from_config

    ledger = ledger_from_config(
        config, fingerprints=fingerprints or None, records=records or None
    )
    per_site = {}
    for site in sites:
        st = ledger.status(site)
        per_site[site] = {
            "budget_epsilon": st.budget.epsilon, "spent_epsilon": st.spent.epsilon,
            "remaining_epsilon": st.remaining.epsilon, "budget_delta": st.budget.delta,
            "spent_delta": st.spent.delta, "remaining_delta": st.remaining.delta,
        }  # fmt: skip
    return {
        "composition": "basic (epsilons and deltas add up), per record",
        "relation": "replace_one",
        "per_site": per_site,
    }


def check_extras(config: Config) -> None:
    """Refuses, before any data is read, a config whose features need a missing extra."""
    from privml.extras import require

    if config.inference.encrypted:
        require(
            "he", "[inference] encrypted = true",
            alternative="turn the check off: --set inference.encrypted=false",
        )
    if config.training.secure_aggregation != "none":
        require(
            "he", f'[training] secure_aggregation = "{config.training.secure_aggregation}"',
            alternative='set training.secure_aggregation = "none"',
        )


def default_out_dir(config: Config) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
    return Path("runs") / f"{config.name}-{stamp}"


def protected_paths(config: Config) -> list[Path]:
    """What a run reads and must never overwrite: the config, the sites' files, the ledger
    and its key, and the signing key. No output folder may be one of them or contain one."""
    from privml.dp.ledger import default_ledger_path, key_path
    from privml.signing import default_key_path

    paths: list[Path] = [default_key_path()]
    if config.source is not None:
        paths.append(Path(config.source))
    paths += [s.path for s in config.data.sites or []]
    ledger = Path(config.privacy.ledger) if config.privacy.ledger is not None else None
    ledger = ledger or default_ledger_path()
    paths += [ledger, key_path(ledger)]
    return paths


def run(
    config: Config,
    *,
    out_dir: Path | None = None,
    write: bool = True,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_stage: Callable[[str], None] | None = None,
    resume: Path | None = None,
    force: bool = False,
) -> RunOutput:
    """Execute the whole flow for ``config``; write the run folder unless ``write`` is False.

    While training, the server state is checkpointed after every round into
    ``<run folder>.partial/`` (see :mod:`privml.fl.checkpoint`); ``resume`` (that folder or the
    run folder path) continues an interrupted run of the same config, and the final model
    equals that of an uninterrupted run.

    The run folder must not exist yet; with ``force`` an existing one is replaced if privml
    wrote it (:func:`privml.artifacts.check_output_folder`). A run that fails leaves no
    ``.partial`` folder, except one holding a checkpoint it can resume from, which the
    exception's note names.
    """
    stage = on_stage or (lambda _s: None)
    t0 = time.perf_counter()
    check_combination(config, resume=resume is not None)
    check_extras(config)
    if config.privacy.mode != "none":
        from privml.dp.cli import open_ledger

        open_ledger(config)  # a config asking for another budget than the ledger's stops here
    final_dir: Path | None = None
    partial: Path | None = None
    if resume is not None:
        final_dir, partial = locate_partial_run(resume)
        if read_run_config(partial).config_hash() != config.config_hash():
            raise ConfigError(
                f"the interrupted run in {str(partial)!r} was started with another config; "
                "resume it with its own config (omit --config) or start a new run"
            )
        if has_checkpoint(partial / "checkpoint"):
            # verified (signature, run id) before any data is read; again with the data's
            # fingerprint when training resumes from it
            load_checkpoint(partial / "checkpoint")
        from privml.safe_io import resolve_path

        if out_dir is not None and resolve_path(out_dir) != resolve_path(final_dir):
            raise UsageError(
                f"--out {str(out_dir)!r} differs from the interrupted run's folder "
                f"{str(final_dir)!r}; omit --out when resuming"
            )
        check_output_folder(final_dir, force=force, protected=protected_paths(config))
    elif write:
        final_dir = Path(out_dir or config.output.dir or default_out_dir(config))
        option = "--out" if out_dir is not None or config.output.dir is None else "[output] dir"
        check_output_folder(
            final_dir, force=force, protected=protected_paths(config), option=option
        )
        partial = partial_dir(final_dir)
        if partial.exists() or partial.is_symlink():
            raise UsageError(
                f"{str(partial)!r} holds an interrupted run; continue it with "
                f"`privml run --resume {final_dir}` or delete that folder"
            )
    try:
        return _run(
            config, final_dir=final_dir, partial=partial, write=write, on_round=on_round,
            stage=stage, resume=resume, force=force, t0=t0,
        )
    except BaseException as exc:
        _after_failure(exc, final_dir, partial, resumed=resume is not None)
        raise


def _after_failure(
    exc: BaseException, final_dir: Path | None, partial: Path | None, *, resumed: bool
) -> None:
    """Clean up after a failed run: keep a ``.partial`` folder only if it holds a checkpoint
    the run can continue from (and say so in a note on ``exc``), else remove it.

    A refusal (:class:`PrivmlError`) of a new run is deterministic, so resuming would fail the
    same way: its folder goes. An interruption, a crash or an I/O error keeps the checkpoint.
    A resumed run's folder is never removed here: it is what the user asked to continue.
    """
    from privml.errors import PrivmlError
    from privml.fl.checkpoint import checkpoint_round

    if partial is None or not partial.exists():
        return
    rnd = checkpoint_round(partial / "checkpoint")
    if not resumed and (rnd is None or isinstance(exc, PrivmlError)):
        shutil.rmtree(partial, ignore_errors=True)
        return
    if isinstance(exc, PrivmlError):
        return  # a refusal: its message says what to fix; resuming as is would fail again
    where = f"the checkpoint after round {rnd}" if rnd is not None else "the interrupted run"
    exc.add_note(
        f"{where} is kept in {str(partial)!r}; continue it with "
        f"`privml run --resume {final_dir}`"
    )


def _refuse_untrained(updates: Any, config: Config) -> None:
    """Stop a run in which no client update was ever accepted: its model is the untrained
    initialisation, and writing (and signing) it as a result would mislead."""
    if not isinstance(updates, dict) or updates.get("accepted") != 0:
        return
    rejected = updates.get("rejected") or 0
    if not rejected:
        return
    reasons = {k: v for k, v in (updates.get("by_reason") or {}).items() if v}
    hint = "check the sites' data and [training]"
    if reasons.get("non_finite"):
        hint = (
            f"the updates overflowed to inf/NaN: lower training.lr (now {config.training.lr:g})"
        )
    elif reasons.get("norm"):
        hint = "the updates exceeded max_update_norm: raise it or lower training.lr"
    raise DataError(
        f"training failed: all {rejected} client updates of all {config.training.rounds} rounds "
        f"were rejected ({', '.join(f'{k}: {v}' for k, v in reasons.items())}), so the model "
        f"never trained; nothing was written. {hint[0].upper()}{hint[1:]}"
    )


def _run(
    config: Config,
    *,
    final_dir: Path | None,
    partial: Path | None,
    write: bool,
    on_round: Callable[[RoundRecord], None] | None,
    stage: Callable[[str], None],
    resume: Path | None,
    force: bool,
    t0: float,
) -> RunOutput:
    stage("loading and encoding the sites' data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fed = load_federation(config)
    notes = [str(w.message) for w in caught]
    for w in caught:  # shown once the data loaded (a failed load shows its error only)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    spec = model_spec(config, fed)
    stage(f"training {spec.kind} over {len(fed.sites)} sites")
    checkpoint_dir = None
    resuming = False
    if partial is not None:
        if resume is None:
            write_run_config(partial, config)
        checkpoint_dir = partial / "checkpoint"
        resuming = resume is not None and has_checkpoint(checkpoint_dir)
    backdoor = None
    if config.attack is not None and config.attack.kind == "backdoor":
        from privml.security.attacks.backdoor import backdoor_poison

        backdoor = backdoor_poison(config, fed, spec)
    # one round engine for every run: private training books every spend in the ledger
    # before releasing anything (privml.fl.training)
    with _noting(notes):  # e.g. client-level DP with too few sites, before training
        private = train(
            config, fed, spec, on_round=on_round, checkpoint_dir=checkpoint_dir,
            resume=resuming, poison=backdoor[0] if backdoor is not None else None,
        )  # fmt: skip
    result = private.result
    if backdoor is not None:
        from privml.security.attacks.backdoor import backdoor_report

        result.extra["attack"]["backdoor"] = backdoor_report(
            result.model, result.params, fed, backdoor[1], backdoor[2]
        )
    results = results_document(
        config, task=fed.task,
        sites=[{"name": s.name, "n_train": s.n_train, "n_test": s.n_test} for s in fed.sites],
        training=result, privacy=private.privacy, inferred=fed.inferred_columns, notes=notes,
        features=private.features,
    )  # fmt: skip
    _refuse_untrained(results["updates"], config)
    results["metrics"]["curves"] = curves(result.model, result.params, *fed.pooled_test())
    if config.privacy.mode != "none":
        results["privacy"]["budget"] = budget_snapshot(
            config, [s.name for s in fed.sites], fed.fingerprints, fed.record_hashes
        )
    if config.inference.encrypted:
        stage(f"encrypted inference check ({config.inference.scheme})")
        results["encrypted_inference"] = encrypted_inference(config, result, fed, private)
    if config.audit.enabled:
        # measured leakage (membership inference) beside the accountant's epsilon;
        # raises PrivacyAuditError (exit 5) before anything is written if it contradicts it.
        from privml.security.audit import QUICK_AUDIT_NOT_ACCOUNTED, quick_audit

        stage("quick audit: membership inference")
        results["audit"] = quick_audit(
            result.model, result.params, fed, privacy=results["privacy"], seed=config.training.seed
        )
        if results["privacy"].get("mode", "none") != "none":
            # released about training records without DP: listed beside the epsilon
            results["privacy"]["not_accounted"].append(QUICK_AUDIT_NOT_ACCOUNTED)
    results["timing"] = {"total_seconds": time.perf_counter() - t0}
    results = strict_json(results)  # what is returned is what results.json holds
    if write or resume is not None:
        assert final_dir is not None
        stage("writing results")

        def fill(tmp: Path) -> None:
            save_model(
                tmp,
                result.spec,
                result.params,
                fed.encoder,
                fed.task,
                config_hash=results["config_hash"],
                feature_map=results.get("features"),
            )
            write_json(tmp / "results.json", results)
            if config.output.html:
                from privml.report.html import render_report

                (tmp / "report.html").write_text(render_report(results))

        atomic_folder(final_dir, fill, force=force)
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
    return RunOutput(results, final_dir, result, fed)
