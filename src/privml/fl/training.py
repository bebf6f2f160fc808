"""Training from a config, in this process: what ``privml run`` (simulation engine), privml
sweep and the audit call.

:func:`train` builds every stage of the run from the config
(:func:`privml.fl.plan.build_from_config`: privacy, feature map, attack, secure aggregation, robust
rule, server optimizer, checkpoints) and runs them with the round engine
(:func:`privml.fl.rounds.run_rounds`) on the simulation engine. Private training books every spend
in the ledger before the result it pays for is released; a run resumed after a crash continues its
booking and books again a round it computes again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privml.data.federation import FederatedData
from privml.dp.ledger import PrivacyLedger
from privml.fl.engine import TrainingResult, run_simulation
from privml.fl.plan import build_from_config, config_fingerprint
from privml.fl.rounds import RoundRecord
from privml.fl.stages.attack import Poison
from privml.models.nets import ModelSpec

__all__ = ["Trained", "train"]


@dataclass
class Trained:
    """A finished run: the training result and results.json's ``privacy`` and ``features``.

    ``result.spec`` is the spec of the trained model (its ``n_features`` is the feature map's
    width when ``[model] features`` is set); ``result.model`` is the whole model (feature map
    then head), evaluable on encoded records.
    """

    result: TrainingResult
    privacy: dict[str, Any]
    features: dict[str, Any] | None = None


def _ledger(config: Any, fed: FederatedData) -> PrivacyLedger:
    from privml.dp.cli import ledger_from_config

    return ledger_from_config(
        config, fingerprints=fed.fingerprints or None, records=fed.record_hashes or None
    )


def _restored(checkpoint_dir: Path | None, fingerprint: str) -> dict[str, Any] | None:
    """The stage states of the checkpoint a resumed run continues from."""
    from privml.fl.checkpoint import has_checkpoint, load_checkpoint

    if checkpoint_dir is None or not has_checkpoint(checkpoint_dir):
        return None
    return dict(load_checkpoint(checkpoint_dir, fingerprint=fingerprint).meta.get("stages", {}))


def train(
    config: Any,
    fed: FederatedData,
    spec: ModelSpec,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    ledger: PrivacyLedger | None = None,
    poison: Poison | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> Trained:
    """Train ``config``'s run over ``fed`` in this process.

    Args:
        config: the run's config.
        fed: the encoded sites (:func:`privml.data.load_federation`).
        spec: the model for the encoded features (:func:`privml.pipeline.model_spec`).
        on_round: called after each round (after its checkpoint is written).
        ledger: where private training books; default the config's (``[privacy] ledger`` or
            the user's ledger), each site's budget kept per record (``fed.record_hashes``).
        poison: the backdoor's data poisoning for ``[attack] kind = "backdoor"``.
        checkpoint_dir: where each round's checkpoint goes (None: none).
        resume: continue from the checkpoint in ``checkpoint_dir``.

    Raises:
        SchemaError: DP on with bounds/categories derived from the data (exit 2).
        ConfigError: settings that do not fit the data (exit 2).
        BudgetExceededError: a site's planned spend does not fit its remaining budget; raised
            before any training, nothing spent (exit 3).
    """
    private = config.privacy.mode != "none"
    led = ledger if ledger is not None or not private else _ledger(config, fed)
    restored = None
    if resume:
        restored = _restored(checkpoint_dir, config_fingerprint(config, fed, spec))
    run = build_from_config(config, fed, spec, poison=poison, checkpoint_dir=checkpoint_dir,
                            ledger=led, restored=restored)  # fmt: skip
    result = run_simulation(run, resume=resume and restored is not None, on_round=on_round)
    privacy = result.extra.pop("privacy", {"mode": "none"})
    return Trained(result, privacy, result.extra.pop("features", None))
