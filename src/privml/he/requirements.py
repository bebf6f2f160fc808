"""What an encrypted evaluator needs from the key holder, published by the server.

The key holder (the client that will decrypt) generates its keys from these requirements: the
CKKS parameter chains and rotation steps, or the Paillier fixed-point encoding, and the input
layout. They describe the model's shape and numeric ranges, never its weights (the modulus
sizes do reveal a power-of-two bound on the model's outputs; see docs/threat-model.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from privml.errors import CryptoError
from privml.he import formats


@dataclass(frozen=True)
class EvaluatorRequirements:
    """Public, JSON-serializable description of an encrypted evaluator's key needs."""

    data: Mapping[str, Any]

    @property
    def scheme(self) -> str:
        return str(self.data["scheme"])

    @property
    def n_features(self) -> int:
        return int(self.data["n_features"])

    @property
    def n_outputs(self) -> int:
        return int(self.data["n_outputs"])

    def to_dict(self) -> dict[str, Any]:
        import json

        return dict(json.loads(json.dumps(self.data)))

    def to_bytes(self) -> bytes:
        return formats.pack(formats.Kind.REQUIREMENTS, {"requirements": self.to_dict()}, [])

    @classmethod
    def from_bytes(cls, data: bytes) -> EvaluatorRequirements:
        _, header, _ = formats.unpack(data, expected=formats.Kind.REQUIREMENTS, max_bytes=1 << 16)
        return cls.from_dict(
            formats.require(header, "requirements", dict, "evaluator requirements")
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvaluatorRequirements:
        if not isinstance(d, Mapping) or d.get("scheme") not in ("ckks", "paillier"):
            raise CryptoError("malformed evaluator requirements: unknown scheme")
        for key in ("model", "n_features", "n_outputs", "x_bound"):
            if key not in d:
                raise CryptoError(f"malformed evaluator requirements: missing {key!r}")
        return cls(dict(d))


def as_requirements(obj: object) -> EvaluatorRequirements:
    if isinstance(obj, EvaluatorRequirements):
        return obj
    if isinstance(obj, bytes | bytearray):
        return EvaluatorRequirements.from_bytes(bytes(obj))
    if isinstance(obj, Mapping):
        return EvaluatorRequirements.from_dict(obj)
    raise TypeError(
        "The 'requirements' parameter must be EvaluatorRequirements, bytes or a dict. "
        f"Got {type(obj).__name__} instead."
    )
