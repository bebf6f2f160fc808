"""Encrypted aggregation of model updates for federated rounds.

Protocol (``[training] secure_aggregation = "paillier" | "ckks"``)::

    key holder site:  keys = agg.keygen();  pub = agg.public_material(keys)   -> server, sites
    every site:       blob = agg.encrypt_update(pub, update)                  -> server
    server:           total = agg.aggregate(blobs, public=pub)                -> key holder
    key holder:       s = agg.decrypt_aggregate(keys.secret, total, n_sites=len(blobs))

The server holds public material only and sees ciphertexts only; the key holder decrypts the
sum, never an individual update (it refuses aggregates of fewer than ``min_sites``
contributions). The returned vector is the **sum** of the updates: sites that want a weighted
average pre-multiply their update by their weight.

Paillier packs ``floor((key_bits - 2) / slot_bits)`` fixed-point values per ciphertext, with
``slot_bits`` sized for the sum of ``n_sites`` values within ``+/-value_bound`` (see
:mod:`privml.he.packing`): 68 values per 2048-bit ciphertext with the defaults, instead of one.
CKKS packs 2 x N/2 values per ciphertext (real and imaginary parts of the slots).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from phe import paillier as phe

from privml.errors import CryptoError, UsageError
from privml.he import formats
from privml.he.api import KeyPair, load_public
from privml.he.ckks import (
    CKKSCiphertexts,
    CKKSProfile,
    CKKSPublicContext,
    CKKSSecretKey,
    ckks_keygen,
    decrypt_vectors,
    encrypt_vectors,
)
from privml.he.packing import SlotCodec, from_fixed, slot_bits_for, to_fixed
from privml.he.paillier import (
    DEFAULT_KEY_BITS,
    PaillierCiphertexts,
    PaillierPublicKey,
    PaillierRandomnessPool,
    PaillierSecretKey,
    check_key_bits,
    paillier_keygen,
)

_CKKS_SCALE_BITS = 40
_CKKS_Q0_BITS = 60


class SecureAggregator:
    """Encrypted sum of ``n_sites`` float vectors of length ``n_params``.

    Args:
        scheme: ``"paillier"`` (exact fixed-point sums) or ``"ckks"`` (approximate).
        n_sites: most contributions one aggregate may hold; sizes the packing headroom. The
            server refuses more.
        n_params: length of every update vector.
        value_bound: declared bound on every update coordinate, ``|v| <= value_bound`` (e.g. the
            DP clipping norm); larger values are refused, never clipped silently.
        precision_bits: fixed-point resolution ``2**-precision_bits`` (Paillier); for CKKS, the
            standard deviation of the noise added at decryption (``value_bound *
            2**-precision_bits``; see docs/threat-model.md on CKKS decryption).
        key_bits: Paillier modulus size (3072 default; 2048 with a warning).
        min_sites: the key holder refuses to decrypt aggregates of fewer contributions.
    """

    def __init__(
        self,
        scheme: str,
        *,
        n_sites: int,
        n_params: int,
        value_bound: float,
        precision_bits: int = 24,
        key_bits: int = DEFAULT_KEY_BITS,
        min_sites: int = 2,
    ) -> None:
        if scheme not in ("paillier", "ckks"):
            raise UsageError(
                f"The 'scheme' parameter must be 'paillier' or 'ckks'. Got {scheme!r} instead."
            )
        for name, v, lo in (
            ("n_sites", n_sites, 1),
            ("n_params", n_params, 1),
            ("min_sites", min_sites, 1),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise UsageError(
                    f"The {name!r} parameter must be an int >= {lo}. Got {v!r} instead."
                )
        if min_sites > n_sites:
            raise UsageError(
                f"The 'min_sites' parameter ({min_sites}) must be <= n_sites ({n_sites})."
            )
        if (
            isinstance(value_bound, bool)
            or not isinstance(value_bound, int | float)
            or not 0 < value_bound < 1e9
        ):
            raise UsageError(
                "The 'value_bound' parameter must be a number in (0, 1e9). "
                f"Got {value_bound!r} instead."
            )
        if (
            isinstance(precision_bits, bool)
            or not isinstance(precision_bits, int)
            or not 4 <= precision_bits <= 52
        ):
            raise UsageError(
                "The 'precision_bits' parameter must be an int in [4, 52]. "
                f"Got {precision_bits!r} instead."
            )
        self.scheme = scheme
        self.n_sites = n_sites
        self.n_params = n_params
        self.value_bound = float(value_bound)
        self.precision_bits = precision_bits
        self.min_sites = min_sites
        self.key_bits = check_key_bits(key_bits) if scheme == "paillier" else key_bits
        self._public: CKKSPublicContext | PaillierPublicKey | None = None
        self._keys: KeyPair | None = None
        if scheme == "paillier":
            self.max_int = math.floor(self.value_bound * 2**precision_bits + 0.5)
            self.slot_bits = slot_bits_for(self.max_int, n_sites)
            self.codec = SlotCodec.for_key(self.key_bits, self.slot_bits, n_sites * self.max_int)
        else:
            headroom = _CKKS_Q0_BITS - _CKKS_SCALE_BITS - 2
            if n_sites * self.value_bound >= 2.0**headroom:
                raise UsageError(
                    f"n_sites * value_bound = {n_sites * self.value_bound:g} is too large for CKKS "
                    f"aggregation (limit 2**{headroom}); lower value_bound or use 'paillier'"
                )
            self.profile = CKKSProfile(
                "agg", 4096, (_CKKS_Q0_BITS, 49), (), relin=False, public_key=True
            )

    # -- configuration shared by every party ---------------------------------------------------

    def requirements(self) -> dict[str, Any]:
        """The public configuration baked into the keys (checked on every message)."""
        base: dict[str, Any] = {
            "scheme": self.scheme,
            "model": "aggregation",
            "n_params": self.n_params,
            "n_sites": self.n_sites,
            "value_bound": self.value_bound,
            "precision_bits": self.precision_bits,
        }
        if self.scheme == "paillier":
            base["slot_bits"] = self.slot_bits
        else:
            base["profiles"] = [self.profile.to_dict()]
            base["scale_bits"] = _CKKS_SCALE_BITS
        return base

    def _resolve_public(self, public: Any) -> CKKSPublicContext | PaillierPublicKey:
        if public is None:
            if self._public is None:
                raise UsageError("pass the key holder's public material as public=...")
            return self._public
        if isinstance(public, KeyPair):
            public = public.public
        if isinstance(public, bytes | bytearray):
            public = load_public(bytes(public))
        if self.scheme == "paillier" and not isinstance(public, PaillierPublicKey):
            raise UsageError(
                "this aggregator uses Paillier; the public material is not a Paillier key"
            )
        if self.scheme == "ckks" and not isinstance(public, CKKSPublicContext):
            raise UsageError("this aggregator uses CKKS; the public material is not a CKKS context")
        want = formats_json(self.requirements())
        if public.requirements != want:
            raise CryptoError(
                "the public material was made for another aggregation setup (n_params, n_sites, "
                "value_bound or precision differ); regenerate keys with this configuration"
            )
        self._public = public
        return public

    # -- key holder ----------------------------------------------------------------------------

    def keygen(self) -> KeyPair:
        """Generate the key pair at the key-holder site (the only party that can decrypt)."""
        reqs = formats_json(self.requirements())
        if self.scheme == "paillier":
            pub, sec = paillier_keygen(self.key_bits, reqs)
            self._keys = KeyPair(public=pub, secret=sec)
        else:
            cpub, csec = ckks_keygen([self.profile], reqs)
            self._keys = KeyPair(public=cpub, secret=csec)
        return self._keys

    def public_material(self, keys: KeyPair | None = None) -> bytes:
        """The bytes the key holder sends to the server and the other sites (no secret key).

        ``keys`` defaults to the pair made by this object's last :meth:`keygen`.
        """
        if keys is None:
            if self._keys is None:
                raise UsageError("call keygen() first, or pass the key pair")
            keys = self._keys
        if not isinstance(keys, KeyPair):
            raise TypeError(f"The 'keys' parameter must be a KeyPair. Got {type(keys).__name__}.")
        self._resolve_public(keys.public)
        return keys.public.to_bytes()

    # -- sites ---------------------------------------------------------------------------------

    def encrypt_update(
        self,
        public: bytes | PaillierPublicKey | CKKSPublicContext | KeyPair,
        update: Any,
        *,
        pool: PaillierRandomnessPool | None = None,
    ) -> bytes:
        """Encrypt one site's update (a float vector of length ``n_params``) for the server."""
        pub = self._resolve_public(public)
        vec = np.asarray(
            update.detach().cpu().numpy() if hasattr(update, "detach") else update, dtype=np.float64
        )
        if vec.shape != (self.n_params,):
            raise UsageError(
                f"The 'update' parameter must have shape ({self.n_params},). "
                f"Got {vec.shape} instead."
            )
        if isinstance(pub, PaillierPublicKey):
            q = to_fixed(vec, frac_bits=self.precision_bits, bound=self.value_bound, name="update")
            packed = self.codec.pack(q)
            cts = PaillierCiphertexts(
                role="update",
                key_id=pub.key_id,
                packing="slots",
                n_rows=self.n_params,
                n_cols=1,
                slot_bits=self.slot_bits,
                per_ct=self.codec.slots,
                cts=pub.encrypt_ints(packed, pool),
                extra={"count": 1},
            )
            return cts.to_bytes(pub.ciphertext_bytes)
        if pool is not None:
            raise UsageError("The 'pool' parameter applies to Paillier only.")
        to_fixed(vec, frac_bits=0, bound=self.value_bound, name="update")  # bound and finiteness
        rt = pub.runtime("agg")
        cap = 2 * rt.slots
        vecs = []
        for start in range(0, self.n_params, cap):
            seg = vec[start : start + cap]
            v = np.zeros(rt.slots, dtype=np.complex128)
            v[: min(rt.slots, seg.size)] += seg[: rt.slots]
            im = seg[rt.slots :]
            v[: im.size] += 1j * im
            vecs.append(v)
        ck = CKKSCiphertexts(
            role="update",
            key_id=pub.key_id,
            profile="agg",
            packing="slots",
            n_rows=self.n_params,
            n_cols=1,
            complex_packed=True,
            cts=encrypt_vectors(pub, "agg", vecs, scale=2.0**_CKKS_SCALE_BITS),
            extra={"count": 1},
        )
        return ck.to_bytes()

    # -- server --------------------------------------------------------------------------------

    def aggregate(
        self,
        updates: Sequence[bytes],
        *,
        public: bytes | PaillierPublicKey | CKKSPublicContext | None = None,
    ) -> bytes:
        """Sum encrypted updates (server side; needs only the public material).

        Refuses more than ``n_sites`` contributions (the packing headroom), the same update twice,
        and updates made under another key or configuration.
        """
        pub = self._resolve_public(public)
        if (
            isinstance(updates, bytes | bytearray)
            or not isinstance(updates, Sequence)
            or not updates
        ):
            raise UsageError(
                "The 'updates' parameter must be a non-empty list of encrypted updates."
            )
        digests = [hashlib.sha256(bytes(u)).hexdigest() for u in updates]
        if len(set(digests)) != len(digests):
            raise CryptoError(
                "the same encrypted update was submitted twice; refusing to aggregate"
            )
        kind = (
            formats.Kind.PAILLIER_UPDATE if self.scheme == "paillier" else formats.Kind.CKKS_UPDATE
        )
        parsed = []
        count = 0
        for i, blob in enumerate(updates):
            role = "update" if formats.peek_kind(bytes(blob)) == kind else "aggregate"
            if isinstance(pub, PaillierPublicKey):
                item: Any = PaillierCiphertexts.from_bytes(bytes(blob), pub, role=role)
                if (item.n_rows, item.slot_bits, item.per_ct) != (
                    self.n_params,
                    self.slot_bits,
                    self.codec.slots,
                ):
                    raise CryptoError(f"update {i} was packed for another configuration")
            else:
                item = CKKSCiphertexts.from_bytes(bytes(blob), pub, role=role)
                if item.n_rows != self.n_params or item.profile != "agg":
                    raise CryptoError(f"update {i} was encrypted for another configuration")
            c = item.extra.get("count")
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise CryptoError(f"update {i} has an invalid contribution count {c!r}")
            count += c
            parsed.append(item)
        if count > self.n_sites:
            raise CryptoError(
                f"{count} contributions exceed n_sites={self.n_sites}: the packing headroom would "
                "overflow; configure the aggregator for more sites"
            )
        extra = {"count": count, "contributors": [d[:16] for d in digests]}
        if isinstance(pub, PaillierPublicKey):
            pk = pub.key
            sums = []
            for j in range(len(parsed[0].cts)):
                acc = phe.EncryptedNumber(pk, parsed[0].cts[j])
                for item in parsed[1:]:
                    acc = acc + phe.EncryptedNumber(pk, item.cts[j])
                sums.append(int(acc.ciphertext(be_secure=False)))
            out = PaillierCiphertexts(
                role="aggregate",
                key_id=pub.key_id,
                packing="slots",
                n_rows=self.n_params,
                n_cols=1,
                slot_bits=self.slot_bits,
                per_ct=self.codec.slots,
                cts=sums,
                extra=extra,
            )
            return out.to_bytes(pub.ciphertext_bytes)
        rt = pub.runtime("agg")
        cts = [c for c in parsed[0].cts]
        for item in parsed[1:]:
            for j, ct in enumerate(item.cts):
                rt.evaluator.add_inplace(cts[j], ct)
        return CKKSCiphertexts(
            role="aggregate",
            key_id=pub.key_id,
            profile="agg",
            packing="slots",
            n_rows=self.n_params,
            n_cols=1,
            complex_packed=True,
            cts=cts,
            extra=extra,
        ).to_bytes()

    # -- key holder, again ---------------------------------------------------------------------

    def decrypt_aggregate(
        self,
        secret: PaillierSecretKey | CKKSSecretKey | KeyPair,
        aggregate: bytes,
        *,
        n_sites: int | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Decrypt the **sum** of the updates (float64, length ``n_params``).

        ``n_sites``: if given, the aggregate must hold exactly that many contributions.
        ``rng``: CKKS only, the generator of the flooding noise (default: fresh OS entropy).
        """
        if isinstance(secret, KeyPair):
            secret = secret.secret
        if self.scheme == "paillier":
            if not isinstance(secret, PaillierSecretKey):
                raise UsageError("this aggregator uses Paillier; pass the Paillier secret key")
            self._resolve_public(secret.public)
            agg: Any = PaillierCiphertexts.from_bytes(aggregate, secret.public, role="aggregate")
        else:
            if not isinstance(secret, CKKSSecretKey):
                raise UsageError("this aggregator uses CKKS; pass the CKKS secret key")
            if secret.requirements != formats_json(self.requirements()):
                raise CryptoError("this secret key was made for another aggregation setup")
            agg = CKKSCiphertexts.from_bytes(aggregate, secret, role="aggregate")
        count = agg.extra.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= self.n_sites:
            raise CryptoError(f"aggregate declares an invalid contribution count {count!r}")
        if count < self.min_sites:
            raise CryptoError(
                f"refusing to decrypt an aggregate of {count} contribution(s): at least "
                f"min_sites={self.min_sites} are required so no single update is revealed"
            )
        if n_sites is not None and count != n_sites:
            raise CryptoError(f"aggregate holds {count} contributions, expected n_sites={n_sites}")
        if agg.n_rows != self.n_params:
            raise CryptoError(f"aggregate has {agg.n_rows} values, expected {self.n_params}")
        if isinstance(secret, PaillierSecretKey):
            codec = SlotCodec(self.slot_bits, self.codec.slots, count * self.max_int)
            ints = codec.unpack(secret.decrypt_ints(agg.cts), self.n_params)
            return from_fixed(ints, frac_bits=self.precision_bits)
        vals = decrypt_vectors(secret, "agg", agg.cts, complex_out=True)
        flat = np.concatenate([np.concatenate([v.real, v.imag]) for v in vals])[: self.n_params]
        # Noise flooding: a CKKS decryption carries the ciphertext noise, and a decryption known
        # together with its ciphertext gives linear equations in the secret key (Li & Micciancio,
        # Eurocrypt 2021). The aggregate is shared, so fresh Gaussian noise turns what it reveals
        # into an RLWE sample with a large error (docs/threat-model.md). Seeded from the OS CSPRNG.
        gen = (
            rng if rng is not None else np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        )
        sigma = self.value_bound * 2.0**-self.precision_bits
        return flat + gen.normal(0.0, sigma, size=flat.shape)


def formats_json(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` after a JSON round trip (how requirements are stored in keys)."""
    import json

    return dict(json.loads(json.dumps(d)))


__all__ = ["SecureAggregator"]
