"""What an encrypted evaluator needs from the key holder, published by the server.

The key holder (the client that will decrypt) generates its keys from these requirements: the
CKKS parameter chains and rotation steps, or the Paillier fixed-point encoding, and the input
layout. They describe the model's shape and numeric ranges, never its weights (the modulus
sizes do reveal a power-of-two bound on the model's outputs; see docs/threat-model.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
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
        """A JSON-normalized copy (the form stored in keys and compared on every request)."""
        return dict(json.loads(json.dumps(self.data)))

    @cached_property
    def normalized(self) -> dict[str, Any]:
        """Cached :meth:`to_dict` for comparisons; do not mutate."""
        return self.to_dict()

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
        """Parse requirements received from a server, checking every field a client relies on."""
        if not isinstance(d, Mapping) or d.get("scheme") not in ("ckks", "paillier"):
            raise CryptoError("malformed evaluator requirements: unknown scheme")
        for key in ("model", "n_features", "n_outputs", "x_bound"):
            if key not in d:
                raise CryptoError(f"malformed evaluator requirements: missing {key!r}")
        _int(d, "n_features", 1, 1 << 16)
        _int(d, "n_outputs", 1, 1 << 12)
        xb = d["x_bound"]
        if isinstance(xb, bool) or not isinstance(xb, int | float) or not 0 < xb < 1e6:
            raise CryptoError(f"malformed evaluator requirements: x_bound {xb!r}")
        if d["scheme"] == "ckks":
            if d.get("answer") != "mean":
                raise CryptoError(
                    "malformed evaluator requirements: unsupported CKKS answer format "
                    f"{d.get('answer')!r} (this client reads 'mean'); upgrade privml"
                )
            _check_ckks_layouts(d)
        else:
            if d.get("answer") != "padded":
                raise CryptoError(
                    "malformed evaluator requirements: unsupported Paillier answer format "
                    f"{d.get('answer')!r} (this client reads 'padded'); upgrade privml"
                )
            _int(d, "x_frac_bits", 8, 40)
            _int(d, "w_frac_bits", 8, 40)
            slot_bits = _int(d, "slot_bits", 2, 4096)
            bound = _int(d, "out_digit_bound", 0, 1 << 4096)
            if bound >= 1 << (slot_bits - 1):
                raise CryptoError(
                    "malformed evaluator requirements: out_digit_bound exceeds the slot"
                )
        return cls(dict(d))


def _int(d: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CryptoError(
            f"malformed evaluator requirements: {key} must be an int in [{lo}, {hi}], got {v!r}"
        )
    return v


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def _check_ckks_layouts(d: Mapping[str, Any]) -> None:
    from privml.he.ckks import CKKSProfile

    profiles = d.get("profiles")
    layouts = d.get("layouts")
    if not isinstance(profiles, list) or not profiles or not isinstance(layouts, Mapping):
        raise CryptoError(
            "malformed evaluator requirements: CKKS profiles and layouts are required"
        )
    by_name: dict[str, CKKSProfile] = {}
    for p in profiles:
        parsed = CKKSProfile.from_dict(p)  # includes the 128-bit security check
        by_name[parsed.name] = parsed
    n_feat = int(d["n_features"])
    for name, lay in layouts.items():
        if name not in ("replicated", "columns") or not isinstance(lay, Mapping):
            raise CryptoError(f"malformed evaluator requirements: unknown layout {name!r}")
        prof = by_name.get(str(lay.get("profile")))
        if prof is None:
            raise CryptoError(f"malformed evaluator requirements: layout {name!r} names no profile")
        _int(lay, "scale_bits", 20, 60)
        if name == "replicated":
            ip, hp = (_int(lay, k, 1, prof.slots) for k in ("Ip", "Hp"))
            _int(lay, "score_factor", 1, prof.slots)
            if not all(_pow2(v) for v in (ip, hp)) or ip < n_feat:
                raise CryptoError("malformed evaluator requirements: bad replicated layout sizes")
            if ip * hp > prof.slots:
                raise CryptoError("malformed evaluator requirements: layout exceeds the slots")
        elif not isinstance(lay.get("complex"), bool):
            raise CryptoError("malformed evaluator requirements: columns layout needs 'complex'")


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
