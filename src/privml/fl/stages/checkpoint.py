"""Step ``record``: the server state after each round goes into an authenticated checkpoint
(:mod:`privml.fl.checkpoint`), with the round records and every stateful stage's state, so a
run resumed after a crash continues exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privml.fl.checkpoint import Checkpoint, ServerState, load_checkpoint, save_checkpoint

__all__ = ["Checkpointing"]


@dataclass(frozen=True)
class Checkpointing:
    """Save to ``folder`` after every round; ``fingerprint`` binds the checkpoint to the run
    (settings, attack, model and data): a checkpoint resumes only the run that wrote it."""

    folder: Path
    fingerprint: str
    step = "record"

    def save(self, state: ServerState, meta: dict[str, Any]) -> None:
        save_checkpoint(self.folder, state, fingerprint=self.fingerprint, meta=meta)

    def load(self) -> Checkpoint:
        return load_checkpoint(self.folder, fingerprint=self.fingerprint)
