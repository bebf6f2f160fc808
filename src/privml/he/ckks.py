"""CKKS backend over Microsoft SEAL (through TenSEAL's ``sealapi`` bindings).

Keys are made by the party that decrypts (:func:`ckks_keygen`). A key set has one or more
*profiles*: a SEAL context (ring degree N, coefficient-modulus chain) with exactly the evaluation
keys an evaluator declared it needs (Galois keys for chosen rotation steps, a relinearization
key). The public part (:class:`CKKSPublicContext`) serializes without the secret key; the secret
part (:class:`CKKSSecretKey`) is written only on request, encrypted under a passphrase.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tenseal import sealapi as seal

from privml.errors import CryptoError
from privml.he import _seal, formats, keystore

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_DOMAIN = b"privml-he-ckks-public-v1"


@dataclass(frozen=True)
class CKKSProfile:
    """Public description of one SEAL context and of the evaluation keys it carries.

    ``coeff_bits`` lists the prime sizes of the coefficient modulus, the last one being SEAL's
    special prime (used only for key switching). ``galois_steps`` are left-rotation steps with
    a Galois key; ``relin`` says whether a relinearization key is included; ``public_key``
    whether the public encryption key is (parties without the secret key need it to encrypt).
    """

    name: str
    poly_modulus_degree: int
    coeff_bits: tuple[int, ...]
    galois_steps: tuple[int, ...] = ()
    relin: bool = False
    public_key: bool = True

    def validate(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise CryptoError(f"invalid CKKS profile name {self.name!r}")
        what = f"CKKS profile {self.name!r}"
        _seal.check_security(self.poly_modulus_degree, self.coeff_bits, what=what)
        half = self.poly_modulus_degree // 2
        for s in self.galois_steps:
            if isinstance(s, bool) or not isinstance(s, int) or s == 0 or not -half < s < half:
                raise CryptoError(
                    f"invalid Galois step {s!r} in {what}: steps are non-zero ints in "
                    f"(-{half}, {half})"
                )
        if len(set(self.galois_steps)) != len(self.galois_steps):
            raise CryptoError(f"duplicate Galois steps in {what}: {list(self.galois_steps)}")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> tuple[int, ...]:
        return self.coeff_bits[:-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_bits": list(self.coeff_bits),
            "galois_steps": list(self.galois_steps),
            "relin": self.relin,
            "public_key": self.public_key,
        }

    @classmethod
    def from_dict(cls, d: Any) -> CKKSProfile:
        if not isinstance(d, dict):
            raise CryptoError("malformed CKKS profile: not an object")
        try:
            prof = cls(
                name=d["name"],
                poly_modulus_degree=d["poly_modulus_degree"],
                coeff_bits=tuple(d["coeff_bits"]),
                galois_steps=tuple(d.get("galois_steps", ())),
                relin=bool(d.get("relin", False)),
                public_key=bool(d.get("public_key", True)),
            )
        except (KeyError, TypeError):
            raise CryptoError("malformed CKKS profile: missing or mistyped fields") from None
        prof.validate()
        return prof

    def estimated_public_bytes(self) -> int:
        """Rough serialized size of this profile's public keys (SEAL's zstd included).

        Evaluation keys are serialized seeded (SEAL replaces each key's uniform half by the
        seed it was drawn from), so they take half the space of the expanded keys."""
        n, bits = self.poly_modulus_degree, self.coeff_bits
        digits = len(bits) - 1
        ratio = min(1.0, sum(bits) / len(bits) / 64 + 0.13)
        key = n * digits * len(bits) * 8 * ratio
        pk = 2 * n * len(bits) * 8 * ratio if self.public_key else 0
        return int(key * (len(self.galois_steps) + (1 if self.relin else 0)) + pk + 4096)


class _Runtime:
    """SEAL objects for one profile, shared by the public and secret halves of a key set."""

    def __init__(self, profile: CKKSProfile, context: Any) -> None:
        self.profile = profile
        self.context = context
        self.encoder = seal.CKKSEncoder(context)
        self.evaluator = seal.Evaluator(context)
        self.slots = int(self.encoder.slot_count())
        self.levels = _seal.parms_ids(context)
        self.level_keys = [tuple(p) for p in self.levels]
        self.primes = _seal.data_primes(context)
        self.n = profile.poly_modulus_degree
        self.galois: Any = None
        self.relin: Any = None
        self.public_key: Any = None
        self._pk_encryptor: Any = None

    @classmethod
    def build(cls, profile: CKKSProfile) -> _Runtime:
        profile.validate()
        ctx = _seal.make_context(
            profile.poly_modulus_degree, profile.coeff_bits, what=f"CKKS profile {profile.name!r}"
        )
        return cls(profile, ctx)

    def level_of(self, ct: Any) -> int:
        key = tuple(ct.parms_id())
        try:
            return self.level_keys.index(key)
        except ValueError:
            raise CryptoError(
                f"ciphertext is not at a data level of CKKS profile {self.profile.name!r}"
            ) from None

    def pk_encryptor(self) -> Any:
        if self.public_key is None:
            raise CryptoError(
                f"CKKS profile {self.profile.name!r} carries no public key; encrypt with the key "
                "pair (symmetric encryption) or generate keys with public_key=True"
            )
        if self._pk_encryptor is None:
            self._pk_encryptor = seal.Encryptor(self.context, self.public_key)
        return self._pk_encryptor

    def max_ciphertext_bytes(self) -> int:
        data = len(self.primes)
        return int(2 * data * self.n * 8 * 1.02) + 1024

    def encode(self, values: np.ndarray, level: int, scale: float) -> Any:
        pt = seal.Plaintext()
        self.encoder.encode(values.tolist(), self.levels[level], float(scale), pt)
        return pt

    def encode_scalar(self, value: float, level: int, scale: float) -> Any:
        pt = seal.Plaintext()
        self.encoder.encode(float(value), self.levels[level], float(scale), pt)
        return pt


def _digest(parts: Sequence[bytes]) -> str:
    h = hashlib.sha256(_DOMAIN)
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


@dataclass
class CKKSPublicContext:
    """Public CKKS material: parameters and evaluation keys for each profile, no secret key.

    ``key_id`` is the SHA-256 of the serialized public material; every ciphertext names the key
    id it was made under, so a server can detect ciphertexts from another key set.
    """

    profiles: dict[str, _Runtime]
    requirements: dict[str, Any]
    key_id: str
    _blob: bytes = field(default=b"", repr=False)

    scheme = "ckks"

    def runtime(self, name: str) -> _Runtime:
        try:
            return self.profiles[name]
        except KeyError:
            raise CryptoError(
                f"the public context has no CKKS profile {name!r} (it has "
                f"{sorted(self.profiles)}); generate keys from this evaluator's requirements"
            ) from None

    def to_bytes(self) -> bytes:
        """The public context as bytes (parameters, public and evaluation keys; no secret key)."""
        return self._blob

    @property
    def size_bytes(self) -> int:
        return len(self._blob)

    @classmethod
    def from_bytes(
        cls, data: bytes, *, max_bytes: int = formats.MAX_CONTEXT_BYTES
    ) -> CKKSPublicContext:
        """Load and validate a public context received from a key holder.

        Checks: size limit, format, 128-bit security of every profile (HE standard bounds, and
        SEAL's own check), that each key parses under its parameters and that the declared
        Galois steps and relinearization key are present, and that the key id matches the
        content (detects corruption).
        """
        _, header, parts = formats.unpack(
            data, expected=formats.Kind.CKKS_PUBLIC, max_bytes=max_bytes
        )
        what = "CKKS public context"
        key_id = formats.require(header, "key_id", str, what)
        requirements = formats.require(header, "requirements", dict, what)
        layout = formats.require(header, "layout", list, what)
        if _digest(parts) != key_id:
            raise CryptoError("CKKS public context is corrupted: its key id does not match")
        profiles: dict[str, _Runtime] = {}
        idx = 0
        for entry in layout:
            if not isinstance(entry, dict):
                raise CryptoError(f"malformed {what}: bad layout entry")
            prof = CKKSProfile.from_dict(entry.get("profile"))
            items = entry.get("items")
            expected = ["params"]
            expected += ["public_key"] if prof.public_key else []
            expected += ["galois"] if prof.galois_steps else []
            expected += ["relin"] if prof.relin else []
            if items != expected:
                raise CryptoError(
                    f"malformed {what}: profile {prof.name!r} declares parts {items}, "
                    f"expected {expected}"
                )
            if idx + len(items) > len(parts):
                raise CryptoError(f"malformed {what}: missing parts")
            got = dict(zip(items, parts[idx : idx + len(items)], strict=True))
            idx += len(items)
            ptag = f"profile {prof.name!r}"
            parms = _seal.parms_from_bytes(got["params"], what=ptag)
            n = int(parms.poly_modulus_degree())
            bits = _seal.coeff_bits_of(parms)
            if n != prof.poly_modulus_degree or tuple(bits) != prof.coeff_bits:
                raise CryptoError(
                    f"{ptag}: declared N={prof.poly_modulus_degree} "
                    f"{list(prof.coeff_bits)} but the "
                    f"parameters are N={n} {bits}"
                )
            _seal.check_security(n, bits, what=ptag)
            rt = _Runtime(prof, _seal.context_from_parms(parms, what=ptag))
            if prof.public_key:
                rt.public_key = _seal.load_bytes(
                    seal.PublicKey(), got["public_key"], rt.context, f"public key of {ptag}"
                )
            if prof.galois_steps:
                gk = _seal.load_bytes(
                    seal.GaloisKeys(), got["galois"], rt.context, f"Galois keys of {ptag}"
                )
                for step, elt in zip(
                    prof.galois_steps,
                    _seal.galois_elements(rt.context, prof.galois_steps),
                    strict=True,
                ):
                    if not gk.has_key(elt):
                        raise CryptoError(f"{ptag} lacks the Galois key for rotation step {step}")
                rt.galois = gk
            if prof.relin:
                rt.relin = _seal.load_bytes(
                    seal.RelinKeys(), got["relin"], rt.context, f"relinearization key of {ptag}"
                )
            if prof.name in profiles:
                raise CryptoError(f"malformed {what}: duplicate profile {prof.name!r}")
            profiles[prof.name] = rt
        if idx != len(parts):
            raise CryptoError(f"malformed {what}: {len(parts) - idx} unexpected parts")
        if not profiles:
            raise CryptoError(f"malformed {what}: no profiles")
        declared = requirements.get("profiles")
        if declared is not None and declared != [rt.profile.to_dict() for rt in profiles.values()]:
            raise CryptoError(
                f"malformed {what}: its keys do not match the profiles its requirements declare"
            )
        return cls(profiles=profiles, requirements=requirements, key_id=key_id, _blob=bytes(data))


@dataclass
class CKKSSecretKey(keystore.SealedSecretFile):
    """The secret half of a CKKS key set: one SEAL secret key per profile.

    It can encrypt (symmetric encryption: faster than public-key encryption and with less noise)
    and decrypt. It is never serialized in the clear: :meth:`save` writes it encrypted under a
    passphrase to a file with mode 0600.
    """

    profiles: dict[str, _Runtime]
    secret_keys: dict[str, Any]
    requirements: dict[str, Any]
    key_id: str
    _decryptors: dict[str, Any] = field(default_factory=dict, repr=False)
    _encryptors: dict[str, Any] = field(default_factory=dict, repr=False)

    scheme = "ckks"

    def __repr__(self) -> str:  # never print key material
        return f"CKKSSecretKey(key_id={self.key_id[:16]}..., profiles={sorted(self.profiles)})"

    def runtime(self, name: str) -> _Runtime:
        try:
            return self.profiles[name]
        except KeyError:
            raise CryptoError(
                f"this secret key has no CKKS profile {name!r} (it has {sorted(self.profiles)})"
            ) from None

    def decryptor(self, name: str) -> Any:
        if name not in self._decryptors:
            self._decryptors[name] = seal.Decryptor(
                self.runtime(name).context, self.secret_keys[name]
            )
        return self._decryptors[name]

    def encryptor(self, name: str) -> Any:
        if name not in self._encryptors:
            self._encryptors[name] = seal.Encryptor(
                self.runtime(name).context, self.secret_keys[name]
            )
        return self._encryptors[name]

    def to_encrypted_bytes(
        self, *, passphrase: str, scrypt_n: int = keystore.DEFAULT_SCRYPT_N
    ) -> bytes:
        """The secret key encrypted under ``passphrase`` (scrypt + AES-256-GCM)."""
        parts: list[bytes] = []
        names = sorted(self.profiles)
        for name in names:
            rt = self.profiles[name]
            parts.append(_seal.save_bytes(rt.context.key_context_data().parms()))
            parts.append(_seal.save_bytes(self.secret_keys[name]))
        inner = formats.pack(
            formats.Kind.SECRET_KEY,
            {
                "scheme": "ckks",
                "key_id": self.key_id,
                "requirements": self.requirements,
                "profiles": [self.profiles[n].profile.to_dict() for n in names],
            },
            parts,
        )
        return keystore.seal_secret(
            inner,
            passphrase=passphrase,
            meta={"scheme": "ckks", "key_id": self.key_id},
            scrypt_n=scrypt_n,
        )


    @classmethod
    def from_encrypted_bytes(cls, blob: bytes, *, passphrase: str) -> CKKSSecretKey:
        _, inner = keystore.open_secret(blob, passphrase=passphrase)
        _, header, parts = formats.unpack(inner, expected=formats.Kind.SECRET_KEY)
        what = "CKKS secret key"
        if header.get("scheme") != "ckks":
            raise CryptoError(f"not a CKKS secret key (scheme {header.get('scheme')!r})")
        key_id = formats.require(header, "key_id", str, what)
        reqs = formats.require(header, "requirements", dict, what)
        plist = formats.require(header, "profiles", list, what)
        if len(parts) != 2 * len(plist):
            raise CryptoError(f"malformed {what}: wrong number of parts")
        profiles: dict[str, _Runtime] = {}
        sks: dict[str, Any] = {}
        for i, d in enumerate(plist):
            prof = CKKSProfile.from_dict(d)
            parms = _seal.parms_from_bytes(parts[2 * i], what=f"profile {prof.name!r}")
            rt = _Runtime(prof, _seal.context_from_parms(parms, what=f"profile {prof.name!r}"))
            sks[prof.name] = _seal.load_bytes(
                seal.SecretKey(), parts[2 * i + 1], rt.context, f"secret key of {prof.name!r}"
            )
            profiles[prof.name] = rt
        return cls(profiles=profiles, secret_keys=sks, requirements=reqs, key_id=key_id)


def ckks_keygen(
    profiles: Sequence[CKKSProfile], requirements: dict[str, Any]
) -> tuple[CKKSPublicContext, CKKSSecretKey]:
    """Generate a CKKS key set (one secret key per profile) and its public context.

    Evaluation keys are created for exactly the declared rotation steps and serialized seeded
    (half the size); the returned public context is parsed back from those bytes, so it is the
    object a server would hold.
    """
    if not profiles:
        raise CryptoError("a CKKS key set needs at least one profile")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise CryptoError(f"duplicate CKKS profile names: {names}")
    runtimes: dict[str, _Runtime] = {}
    sks: dict[str, Any] = {}
    parts: list[bytes] = []
    layout: list[dict[str, Any]] = []
    for prof in profiles:
        rt = _Runtime.build(prof)
        kg = seal.KeyGenerator(rt.context)
        sk = kg.secret_key()
        items = ["params"]
        parts.append(_seal.save_bytes(rt.context.key_context_data().parms()))
        if prof.public_key:
            pk = seal.PublicKey()
            kg.create_public_key(pk)
            rt.public_key = pk
            items.append("public_key")
            parts.append(_seal.save_bytes(pk))
        if prof.galois_steps:
            # Only the rotations the evaluator declared (SEAL's default makes 2*log2(N/2) keys);
            # the Serializable form is saved with its seed.
            elts = _seal.galois_elements(rt.context, prof.galois_steps)
            items.append("galois")
            parts.append(_seal.save_bytes(kg.create_galois_keys(elts)))
        if prof.relin:
            items.append("relin")
            parts.append(_seal.save_bytes(kg.create_relin_keys()))
        layout.append({"profile": prof.to_dict(), "items": items})
        runtimes[prof.name] = rt
        sks[prof.name] = sk
    key_id = _digest(parts)
    blob = formats.pack(
        formats.Kind.CKKS_PUBLIC,
        {"scheme": "ckks", "key_id": key_id, "requirements": requirements, "layout": layout},
        parts,
    )
    public = CKKSPublicContext.from_bytes(blob, max_bytes=max(len(blob), formats.MAX_CONTEXT_BYTES))
    secret = CKKSSecretKey(
        profiles=runtimes, secret_keys=sks, requirements=requirements, key_id=key_id
    )
    return public, secret


# --------------------------------------------------------------------------------------------
# Ciphertext containers
# --------------------------------------------------------------------------------------------

_ROLES = {
    "features": formats.Kind.CKKS_FEATURES,
    "scores": formats.Kind.CKKS_SCORES,
    "update": formats.Kind.CKKS_UPDATE,
    "aggregate": formats.Kind.CKKS_AGGREGATE,
}


class CKKSCiphertexts:
    """A list of CKKS ciphertexts with the metadata needed to interpret them.

    ``packing`` is ``"replicated"`` (one patient per ciphertext, its values repeated across the
    slots in the evaluator's layout; an answer holds one ciphertext per patient and output) or
    ``"columns"`` (one ciphertext per column and chunk of rows; with ``complex_packed`` the real
    parts hold one chunk and the imaginary parts the next) or ``"slots"`` (a flat vector, for
    aggregation).

    Ciphertexts made by symmetric encryption with ``compact=True`` are kept as SEAL's seeded
    serialization (half the size on the wire) and loaded only if evaluated in this process.
    """

    scheme = "ckks"

    def __init__(
        self,
        role: str,
        key_id: str,
        profile: str,
        packing: str,
        n_rows: int,
        n_cols: int,
        complex_packed: bool,
        cts: list[Any] | None = None,
        extra: dict[str, Any] | None = None,
        holder: CKKSPublicContext | CKKSSecretKey | None = None,
        *,
        blobs: list[bytes] | None = None,
    ) -> None:
        if cts is None and blobs is None:
            raise CryptoError("CKKSCiphertexts needs ciphertexts or their serialized form")
        self.role = role
        self.key_id = key_id
        self.profile = profile
        self.packing = packing
        self.n_rows = n_rows
        self.n_cols = n_cols
        self.complex_packed = complex_packed
        self.extra: dict[str, Any] = dict(extra or {})
        #: the public context or secret key these ciphertexts belong to (not serialized)
        self.holder = holder
        self._cts = cts
        self._blobs = blobs

    def __repr__(self) -> str:
        return (
            f"CKKSCiphertexts(role={self.role!r}, packing={self.packing!r}, "
            f"n_rows={self.n_rows}, n_cols={self.n_cols}, count={len(self)})"
        )

    @property
    def cts(self) -> list[Any]:
        if self._cts is None:
            if self.holder is None:
                raise CryptoError("these ciphertexts are not linked to a key set")
            rt = self.holder.runtime(self.profile)
            self._cts = [
                _seal.load_bytes(seal.Ciphertext(), b, rt.context, f"CKKS {self.role} {i}")
                for i, b in enumerate(self._blobs or [])
            ]
        return self._cts

    def __len__(self) -> int:
        return len(self._cts) if self._cts is not None else len(self._blobs or [])

    def to_bytes(self) -> bytes:
        header = {
            "scheme": "ckks",
            "role": self.role,
            "key_id": self.key_id,
            "profile": self.profile,
            "packing": self.packing,
            "n_rows": self.n_rows,
            "n_cols": self.n_cols,
            "complex": self.complex_packed,
            "extra": self.extra,
        }
        parts = (
            list(self._blobs) if self._blobs is not None
            else [_seal.save_bytes(c) for c in self.cts]
        )
        return formats.pack(_ROLES[self.role], header, parts)

    @property
    def size_bytes(self) -> int:
        return len(self.to_bytes())

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        holder: CKKSPublicContext | CKKSSecretKey,
        *,
        role: str,
        max_bytes: int | None = None,
    ) -> CKKSCiphertexts:
        """Load ciphertexts made under ``holder``'s key set and validate them.

        Rejects ciphertexts made under another key set (key id), truncated or corrupted data,
        ciphertexts that are not at a data level of the profile, that have a third component or
        an out-of-range scale.
        """
        kind = _ROLES[role]
        formats.peek_kind(data)
        limit = max_bytes if max_bytes is not None else formats.MAX_MESSAGE_BYTES
        _, header, parts = formats.unpack(data, expected=kind, max_bytes=limit)
        what = f"CKKS {role}"
        key_id = formats.require(header, "key_id", str, what)
        if key_id != holder.key_id:
            raise CryptoError(
                f"foreign ciphertext: these {role} were encrypted under key set "
                f"{key_id[:16]}..., not {holder.key_id[:16]}...; use the context they were "
                "made with"
            )
        profile = formats.require(header, "profile", str, what)
        rt = holder.runtime(profile)
        n_rows = formats.require(header, "n_rows", int, what)
        n_cols = formats.require(header, "n_cols", int, what)
        packing = formats.require(header, "packing", str, what)
        complex_packed = formats.require(header, "complex", bool, what)
        extra = formats.require(header, "extra", dict, what)
        if not 1 <= n_rows <= 1 << 24 or not 1 <= n_cols <= 1 << 16:
            raise CryptoError(
                f"malformed {what}: n_rows must be in [1, 2**24] and n_cols in [1, 2**16]"
            )
        expected = expected_count(packing, n_rows, n_cols, rt.slots, complex_packed, role=role)
        if len(parts) != expected:
            raise CryptoError(
                f"malformed {what}: {len(parts)} ciphertexts for packing {packing!r} with "
                f"{n_rows} rows x {n_cols} columns; expected {expected}"
            )
        per_ct = rt.max_ciphertext_bytes()
        cts = []
        for i, part in enumerate(parts):
            if len(part) > per_ct:
                raise CryptoError(
                    f"malformed {what}: ciphertext {i} is {len(part)} bytes, more than the "
                    f"{per_ct} bytes a ciphertext of profile {profile!r} can take"
                )
            ct = _seal.load_bytes(seal.Ciphertext(), part, rt.context, f"{what} ciphertext {i}")
            check_ciphertext(rt, ct, what=f"{what} ciphertext {i}")
            cts.append(ct)
        return cls(
            role, key_id, profile, packing, n_rows, n_cols, complex_packed, cts, extra, holder
        )


def expected_count(
    packing: str, n_rows: int, n_cols: int, slots: int, complex_packed: bool, *,
    role: str = "features",
) -> int:
    """Ciphertexts in a message: ``replicated`` features carry one per patient, answers one per
    patient and output; ``columns`` one per column and chunk of rows."""
    if packing == "replicated":
        return n_rows if role == "features" else n_rows * n_cols
    cap = slots * (2 if complex_packed else 1)
    if packing == "columns":
        return n_cols * math.ceil(n_rows / cap)
    if packing == "slots":
        return math.ceil(n_rows * n_cols / cap)
    raise CryptoError(f"unknown CKKS packing {packing!r}")


def check_ciphertext(rt: _Runtime, ct: Any, *, what: str) -> None:
    if ct.size() != 2:
        raise CryptoError(f"{what} has {ct.size()} components; only relinearized (2) are accepted")
    if not ct.is_ntt_form():
        raise CryptoError(f"{what} is not in NTT form")
    rt.level_of(ct)
    scale = float(ct.scale)
    if not (math.isfinite(scale) and 1.0 <= scale < 2.0**120):
        raise CryptoError(f"{what} has an invalid scale {scale!r}")


def encrypt_vectors(
    holder: CKKSPublicContext | CKKSSecretKey,
    profile: str,
    vectors: Sequence[np.ndarray],
    *,
    scale: float,
    level: int = 0,
    compact: bool = False,
) -> list[Any]:
    """Encode and encrypt each vector (real or complex, at most ``slots`` long).

    With a :class:`CKKSSecretKey` this is symmetric encryption; with a public context, public-key
    encryption (needs a profile with ``public_key=True``). ``compact=True`` (symmetric only)
    returns SEAL's seeded serialization of each ciphertext (bytes, half the size) instead of
    ciphertext objects.
    """
    rt = holder.runtime(profile)
    symmetric = isinstance(holder, CKKSSecretKey)
    enc = holder.encryptor(profile) if isinstance(holder, CKKSSecretKey) else rt.pk_encryptor()
    out: list[Any] = []
    for v in vectors:
        pt = rt.encode(v, level, scale)
        if symmetric and compact:
            out.append(_seal.save_bytes(enc.encrypt_symmetric(pt)))
            continue
        ct = seal.Ciphertext()
        if symmetric:
            enc.encrypt_symmetric(pt, ct)
        else:
            enc.encrypt(pt, ct)
        out.append(ct)
    return out


def decrypt_vectors(
    secret: CKKSSecretKey, profile: str, cts: Sequence[Any], *, complex_out: bool
) -> list[np.ndarray]:
    rt = secret.runtime(profile)
    dec = secret.decryptor(profile)
    out = []
    for ct in cts:
        pt = seal.Plaintext()
        dec.decrypt(ct, pt)
        if complex_out:
            out.append(np.asarray(rt.encoder.decode_complex(pt), dtype=np.complex128))
        else:
            out.append(np.asarray(rt.encoder.decode_double(pt), dtype=np.float64))
    return out
