"""The model a server serves: loaded from a run folder, compiled to encrypted evaluators.

What :meth:`ServedModel.public_info` publishes is what a client needs to encode and encrypt:
the public schema and encoding, the task (class names), the architecture sizes, and for each
accepted scheme the evaluator's key requirements (parameters, rotation steps, input layout).
Never the weights. The requirements do reveal the sizes of the model and a power-of-two bound
on its outputs (docs/threat-model.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from privml.artifacts import load_model
from privml.data.encoding import Encoder, Task
from privml.errors import UsageError
from privml.he import compile_model
from privml.he.evaluators import Evaluator
from privml.models.nets import ModelSpec
from privml.serve.settings import SCHEMES

API_VERSION = "v1"
_HASH_DOMAIN = b"privml-model-hash-v1"


def model_hash(folder: Path) -> str:
    """SHA-256 identifying a run folder's model: over model.json and model.pt, in that order."""
    h = hashlib.sha256(_HASH_DOMAIN)
    for name in ("model.json", "model.pt"):
        data = (folder / name).read_bytes()
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _signature_info(folder: Path) -> dict[str, Any] | None:
    """Who signed the model (already verified by load_model), for the metadata."""
    try:
        doc = json.loads((folder / "model.sig").read_text())
        return {"algorithm": str(doc["algorithm"]), "key_id": str(doc["key_id"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def supported_schemes(spec: ModelSpec) -> tuple[str, ...]:
    """Schemes that can evaluate ``spec``: CKKS always (if at all), Paillier for linear models."""
    return ("ckks", "paillier") if spec.kind == "logistic" else ("ckks",)


@dataclass
class ServedModel:
    """A loaded model and its compiled evaluators, one per accepted scheme."""

    folder: Path
    model: nn.Module
    spec: ModelSpec
    encoder: Encoder
    task: Task
    meta: dict[str, Any]
    hash: str
    evaluators: dict[str, Evaluator]
    signature: dict[str, Any] | None = None

    @classmethod
    def load(cls, folder: str | Path, *, schemes: tuple[str, ...] | None = None,
             resolution: float = 2.0**-20) -> ServedModel:
        """Load ``folder`` (checked by :func:`privml.artifacts.load_model`) and compile it.

        Args:
            folder: a run folder written by ``privml run``.
            schemes: schemes to accept; None = every scheme the model supports.
            resolution: noise flooding on every returned score, logit units (the service's
                ``--output-resolution``).

        Raises:
            UsageError: a requested scheme cannot evaluate this model (e.g. Paillier for an MLP,
                or an MLP whose activation is not a polynomial).
        """
        folder = Path(folder)
        # load_model checks the weights' hash and the Ed25519 signature (model.sig) against the
        # trusted keys ($PRIVML_TRUSTED_KEYS, else the deployment key): SignatureError otherwise
        model, spec, encoder, task, meta = load_model(folder)
        possible = supported_schemes(spec)
        wanted = tuple(schemes) if schemes is not None else possible
        bad = [s for s in wanted if s not in SCHEMES]
        if bad:
            raise UsageError(
                f"The 'schemes' parameter must list schemes among {list(SCHEMES)}. Got {bad}."
            )
        evaluators: dict[str, Evaluator] = {}
        for scheme in wanted:
            if scheme not in possible:
                raise UsageError(
                    f"a {spec.kind!r} model cannot be evaluated with {scheme!r} (Paillier is "
                    "additively homomorphic: logistic regression only); serve it with "
                    "--schemes ckks"
                )
            evaluators[scheme] = compile_model(model, spec, scheme=scheme, resolution=resolution)
        return cls(
            folder=folder,
            model=model,
            spec=spec,
            encoder=encoder,
            task=task,
            meta=meta,
            hash=model_hash(folder),
            evaluators=evaluators,
            signature=_signature_info(folder),
        )

    def public_info(self) -> dict[str, Any]:
        """The ``/v1/model`` document (JSON-ready; no weights)."""
        return {
            "api_version": API_VERSION,
            "model": {
                "hash": self.hash,
                "weights_sha256": self.meta.get("weights_sha256"),
                "config_hash": self.meta.get("config_hash"),
                "format": self.meta.get("format"),
                "privml_version": self.meta.get("privml_version"),
                "architecture": self.spec.to_dict(),
                "task": self.task.to_dict(),
                "signature": self.signature,
            },
            "encoding": self.encoder.to_dict(),
            "schemes": {
                name: {
                    "requirements": ev.requirements.to_dict(),
                    "security_bits": 128,
                    "output": "logits",
                    "answer": {
                        "carries": "one number per output and counted patient; every other "
                        "part of the answer is masked (a one-time pad) and re-randomized",
                        "resolution": getattr(ev, "flood_resolution", ev.resolution),
                        "statistical_security_bits": 40,
                    },
                }
                for name, ev in self.evaluators.items()
            },
        }
