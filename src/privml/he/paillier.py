"""Paillier backend over python-paillier (``phe``), with gmpy2 for the big-integer arithmetic.

All encryption, homomorphic addition, scalar multiplication and decryption go through phe's key
and number classes (``PaillierPublicKey.raw_encrypt``, ``EncryptedNumber``,
``PaillierPrivateKey.raw_decrypt``); this module adds key-size policy, validation, fixed-point
packing (:mod:`privml.he.packing`), byte formats and a pool of precomputed encryptions of zero.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import gmpy2
from phe import paillier as phe

from privml.errors import CryptoError, InsecureOptionWarning, UsageError
from privml.he import formats, keystore

#: Default Paillier modulus size: 3072 bits gives ~128-bit security (NIST SP 800-57 part 1,
#: table 2: same strength as RSA-3072).
DEFAULT_KEY_BITS = 3072
#: 2048-bit moduli (~112-bit security) are allowed with an InsecureOptionWarning.
MIN_KEY_BITS = 2048
MAX_KEY_BITS = 8192
_DOMAIN = b"privml-he-paillier-public-v1"
_SMALL_PRIMES_PRODUCT = math.prod(int(p) for p in range(3, 20000, 2) if gmpy2.is_prime(p))


def check_key_bits(key_bits: object) -> int:
    """Validate a requested key size: >= 3072 silently, 2048..3071 with a warning, else refused."""
    if isinstance(key_bits, bool) or not isinstance(key_bits, int):
        raise TypeError(f"The 'key_bits' parameter must be an int. Got {key_bits!r} instead.")
    if key_bits < MIN_KEY_BITS:
        raise CryptoError(
            f"The 'key_bits' parameter must be >= {MIN_KEY_BITS} (3072 recommended for 128-bit "
            f"security). Got {key_bits} instead: moduli this small can be factored."
        )
    if key_bits > MAX_KEY_BITS or key_bits % 256:
        raise CryptoError(
            f"The 'key_bits' parameter must be a multiple of 256 up to {MAX_KEY_BITS}. "
            f"Got {key_bits} instead."
        )
    if key_bits < DEFAULT_KEY_BITS:
        warnings.warn(
            f"{key_bits}-bit Paillier keys give about 112-bit security (NIST SP 800-57); use "
            f"key_bits={DEFAULT_KEY_BITS} for 128-bit security",
            InsecureOptionWarning,
            stacklevel=3,
        )
    return key_bits


def _check_modulus(n: int, *, what: str) -> None:
    bits = n.bit_length()
    if bits < MIN_KEY_BITS:
        raise CryptoError(
            f"{what} has a {bits}-bit modulus; at least {MIN_KEY_BITS} bits are required "
            f"({DEFAULT_KEY_BITS} recommended)"
        )
    if bits > MAX_KEY_BITS:
        raise CryptoError(f"{what} has a {bits}-bit modulus, above the {MAX_KEY_BITS}-bit limit")
    if n % 2 == 0 or math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1 or gmpy2.is_square(n):
        raise CryptoError(
            f"{what} is not a valid Paillier modulus (it has small or square factors)"
        )
    if bits < DEFAULT_KEY_BITS:
        warnings.warn(
            f"{what} uses a {bits}-bit modulus (about 112-bit security)",
            InsecureOptionWarning,
            stacklevel=3,
        )


def _key_id(n: int) -> str:
    nb = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return hashlib.sha256(_DOMAIN + nb).hexdigest()


@dataclass
class PaillierPublicKey:
    """A Paillier public key (phe) with its key id and the evaluator requirements it serves."""

    key: phe.PaillierPublicKey
    requirements: dict[str, Any]
    key_id: str = ""

    scheme = "paillier"

    def __post_init__(self) -> None:
        if not self.key_id:
            self.key_id = _key_id(self.key.n)

    @property
    def key_bits(self) -> int:
        return int(self.key.n.bit_length())

    @property
    def ciphertext_bytes(self) -> int:
        return (self.key.nsquare.bit_length() + 7) // 8

    def to_bytes(self) -> bytes:
        n = self.key.n
        header = {
            "scheme": "paillier",
            "key_id": self.key_id,
            "key_bits": self.key_bits,
            "requirements": self.requirements,
        }
        return formats.pack(
            formats.Kind.PAILLIER_PUBLIC, header, [n.to_bytes((n.bit_length() + 7) // 8, "big")]
        )

    @property
    def size_bytes(self) -> int:
        return len(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = 1 << 16) -> PaillierPublicKey:
        """Load a public key received from a key holder; refuses moduli below 2048 bits."""
        _, header, parts = formats.unpack(
            data, expected=formats.Kind.PAILLIER_PUBLIC, max_bytes=max_bytes
        )
        what = "Paillier public key"
        key_id = formats.require(header, "key_id", str, what)
        reqs = formats.require(header, "requirements", dict, what)
        if len(parts) != 1:
            raise CryptoError(f"malformed {what}: expected one part")
        n = int.from_bytes(parts[0], "big")
        _check_modulus(n, what=what)
        if _key_id(n) != key_id:
            raise CryptoError(f"{what} is corrupted: its key id does not match the modulus")
        return cls(key=phe.PaillierPublicKey(n), requirements=reqs, key_id=key_id)

    # -- encryption -------------------------------------------------------------------------

    def encrypt_ints(
        self, values: Sequence[int], pool: PaillierRandomnessPool | None = None
    ) -> list[int]:
        """Encrypt signed integers (|v| < n/3); raw ciphertexts as ints.

        With ``pool`` the randomness comes from precomputed encryptions of zero (see
        :class:`PaillierRandomnessPool`); otherwise phe draws a fresh ``r`` and computes
        ``r**n mod n**2`` on the spot.
        """
        pk = self.key
        out = []
        for v in values:
            m = int(v) % pk.n
            if pool is None:
                out.append(pk.raw_encrypt(m))
            else:
                pool.check_key(self)
                # r_value=1 gives the deterministic (1 + n*m) mod n^2; adding a fresh encryption
                # of zero (phe's homomorphic addition) randomizes it exactly like raw_encrypt.
                nude = phe.EncryptedNumber(pk, pk.raw_encrypt(m, r_value=1))
                zero = phe.EncryptedNumber(pk, pool.take())
                out.append((nude + zero).ciphertext(be_secure=False))
        return out

    def check_ciphertexts(self, cts: Sequence[int], *, what: str) -> None:
        nsq = self.key.nsquare
        n = self.key.n
        for i, c in enumerate(cts):
            if not 0 < c < nsq or gmpy2.gcd(c, n) != 1:
                raise CryptoError(f"{what} {i} is not a valid ciphertext for this public key")


@dataclass
class PaillierSecretKey(keystore.SealedSecretFile):
    """A Paillier private key (phe). Written only on request, encrypted under a passphrase."""

    key: phe.PaillierPrivateKey
    public: PaillierPublicKey

    scheme = "paillier"

    def __repr__(self) -> str:
        return f"PaillierSecretKey(key_id={self.key_id[:16]}..., key_bits={self.public.key_bits})"

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @property
    def requirements(self) -> dict[str, Any]:
        return self.public.requirements

    def decrypt_ints(self, cts: Sequence[int]) -> list[int]:
        """Decrypt raw ciphertexts to signed integers in (-n/2, n/2]."""
        n = self.key.public_key.n
        half = n // 2
        out = []
        for c in cts:
            m = self.key.raw_decrypt(int(c))
            out.append(m - n if m > half else m)
        return out

    def subkey(self, *, salt: bytes, info: bytes) -> bytes:
        """An AES-256 key derived from this secret key (HKDF-SHA256 over ``p`` and ``q``) for
        files as sensitive as the key itself (:func:`privml.he.keystore.derive_subkey`)."""
        p, q = int(self.key.p), int(self.key.q)
        size = (max(p, q).bit_length() + 7) // 8
        material = p.to_bytes(size, "big") + q.to_bytes(size, "big")
        return keystore.derive_subkey(material, salt=salt, info=self.key_id.encode() + info)

    def to_encrypted_bytes(
        self, *, passphrase: str, scrypt_n: int = keystore.DEFAULT_SCRYPT_N
    ) -> bytes:
        p, q = int(self.key.p), int(self.key.q)
        size = (max(p, q).bit_length() + 7) // 8
        inner = formats.pack(
            formats.Kind.SECRET_KEY,
            {"scheme": "paillier", "key_id": self.key_id, "public": self.public.to_bytes().hex()},
            [p.to_bytes(size, "big"), q.to_bytes(size, "big")],
        )
        return keystore.seal_secret(
            inner,
            passphrase=passphrase,
            meta={"scheme": "paillier", "key_id": self.key_id},
            scrypt_n=scrypt_n,
        )


    @classmethod
    def from_encrypted_bytes(cls, blob: bytes, *, passphrase: str) -> PaillierSecretKey:
        _, inner = keystore.open_secret(blob, passphrase=passphrase)
        _, header, parts = formats.unpack(inner, expected=formats.Kind.SECRET_KEY)
        if header.get("scheme") != "paillier" or len(parts) != 2:
            raise CryptoError("not a Paillier secret key")
        try:
            public = PaillierPublicKey.from_bytes(bytes.fromhex(header["public"]))
        except (KeyError, TypeError, ValueError):
            raise CryptoError("malformed Paillier secret key: bad public part") from None
        p, q = int.from_bytes(parts[0], "big"), int.from_bytes(parts[1], "big")
        if p * q != public.key.n or p == q:
            raise CryptoError("malformed Paillier secret key: p*q does not match the public key")
        return cls(key=phe.PaillierPrivateKey(public.key, p, q), public=public)


def paillier_keygen(
    key_bits: int, requirements: dict[str, Any]
) -> tuple[PaillierPublicKey, PaillierSecretKey]:
    """Generate a Paillier key pair with phe (primes from the OS random generator)."""
    check_key_bits(key_bits)
    pk, sk = phe.generate_paillier_keypair(n_length=key_bits)
    public = PaillierPublicKey(key=pk, requirements=requirements)
    return public, PaillierSecretKey(key=sk, public=public)


class PaillierRandomnessPool:
    """Precomputed encryptions of zero under one public key, to take ``r**n mod n**2`` offline.

    Each element is ``phe.PaillierPublicKey.raw_encrypt(0)`` = ``r**n mod n**2`` for a fresh
    random ``r``: the expensive part of a Paillier encryption. Online, encrypting ``m`` costs one
    modular multiplication ``(1 + n*m) * r**n``; the result has exactly the distribution of a
    fresh encryption **provided each element is used once and stays secret**. The pool hands out
    each element once and deletes it; it refuses to be pickled, and it empties itself when used
    in a forked child process (a fork would otherwise hand the same elements to two processes).
    Thread-safe: a background thread may :meth:`top_up` while requests :meth:`take`.

    ``size`` elements are computed now; ``target`` (default ``size``) is the level
    :meth:`top_up` refills to.
    """

    def __init__(self, public: PaillierPublicKey, *, size: int, target: int | None = None) -> None:
        for name, v in (("size", size), ("target", target if target is not None else size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UsageError(f"The {name!r} parameter must be an int >= 0. Got {v!r} instead.")
        self.key_id = public.key_id
        self._public = public
        self._pid = os.getpid()
        self._items: list[int] = []
        self._lock = threading.Lock()
        self.target = target if target is not None else size
        self.misses = 0
        self.refill(size)

    def __len__(self) -> int:
        self._fork_guard()
        return len(self._items)

    @classmethod
    def handover(cls, public: PaillierPublicKey, items: Sequence[int]) -> PaillierRandomnessPool:
        """A pool holding ``items``, elements made elsewhere and handed to this pool alone (a
        claim from a :class:`~privml.he.stored_pool.StoredPaillierPool`); it never refills."""
        pool = cls(public, size=0, target=0)
        pool._items = [int(v) for v in items]
        return pool

    def __getstate__(self) -> None:
        raise TypeError(
            "a PaillierRandomnessPool must not be pickled or copied: reuse breaks security"
        )

    def _fork_guard(self) -> None:
        if os.getpid() != self._pid:
            with self._lock:
                self._items.clear()
                self._pid = os.getpid()

    def _fresh(self) -> int:
        return int(self._public.key.raw_encrypt(0))

    def refill(self, count: int) -> None:
        """Precompute ``count`` more encryptions of zero (the slow, offline part)."""
        for _ in range(count):
            item = self._fresh()
            with self._lock:
                self._items.append(item)

    def deficit(self) -> int:
        """Elements missing to reach ``target``."""
        self._fork_guard()
        return max(0, self.target - len(self._items))

    def below(self, fraction: float) -> bool:
        """Whether fewer than ``fraction * target`` elements are ready."""
        self._fork_guard()
        return len(self._items) < fraction * self.target

    def top_up(self, limit: int | None = None) -> int:
        """Refill towards ``target`` (at most ``limit`` elements); returns how many were made."""
        n = self.deficit() if limit is None else min(limit, self.deficit())
        self.refill(n)
        return n

    def check_key(self, public: PaillierPublicKey) -> None:
        if public.key_id != self.key_id:
            raise CryptoError("this randomness pool was made for another Paillier public key")

    def take(self) -> int:
        """One fresh encryption of zero; computed on the spot when the pool is empty."""
        self._fork_guard()
        with self._lock:
            if self._items:
                return self._items.pop()
        self.misses += 1
        return self._fresh()


#: Window of the simultaneous exponentiation in :func:`linear_combination`, bits.
_WINDOW = 3


def linear_combination(public: PaillierPublicKey, cts: Sequence[int],
                       weights: Sequence[int]) -> int:
    """``prod c_i**w_i mod n**2`` for signed integer weights ``|w_i| < n``: an encryption of
    ``sum w_i m_i`` (not re-randomized: callers must re-randomize before it leaves).

    The value is exactly phe's ``sum(EncryptedNumber(c_i) * w_i)`` (tested), computed by
    simultaneous exponentiation (Straus: one shared squaring chain, ``_WINDOW``-bit windows per
    base, the product of the negative-weight terms inverted once, instead of one exponentiation
    and one inversion per term): 3-4x faster than phe for 30 features of 24-bit weights at
    3072 bits (docs/benchmarks_he.md). Plain modular arithmetic on phe's ciphertexts, nothing
    secret: the weights are the evaluator's own and the timing depends only on them.
    """
    if len(cts) != len(weights):
        raise UsageError("linear_combination: as many weights as ciphertexts are needed")
    m = gmpy2.mpz(public.key.nsquare)
    n = public.key.n
    pos: list[tuple[Any, int]] = []
    neg: list[tuple[Any, int]] = []
    for c, w in zip(cts, weights, strict=True):
        w = int(w)
        if abs(w) >= n:
            raise UsageError("linear_combination: a weight is not below the modulus")
        if w > 0:
            pos.append((gmpy2.mpz(c), w))
        elif w < 0:
            neg.append((gmpy2.mpz(c), -w))
    acc = _multi_power(pos, m)
    if neg:
        acc = acc * gmpy2.invert(_multi_power(neg, m), m) % m
    return int(acc)


def _multi_power(pairs: list[tuple[Any, int]], m: Any) -> Any:
    """``prod b**e mod m`` for non-negative ``e`` (Straus's simultaneous exponentiation)."""
    one = gmpy2.mpz(1)
    if not pairs:
        return one
    k = _WINDOW
    mask = (1 << k) - 1
    tables = []
    for b, e in pairs:
        t = [one, b % m]
        for _ in range(2, 1 << k):
            t.append(t[-1] * t[1] % m)
        tables.append((t, e))
    windows = -(-max(e.bit_length() for _, e in pairs) // k)
    acc = one
    for j in range(windows - 1, -1, -1):
        for _ in range(k):
            acc = acc * acc % m
        shift = j * k
        for t, e in tables:
            d = (e >> shift) & mask
            if d:
                acc = acc * t[d] % m
    return acc


def rerandomize(public: PaillierPublicKey, c: int, pool: PaillierRandomnessPool | None) -> int:
    """Multiply by a fresh encryption of zero so the ciphertext reveals nothing of its history."""
    pk = public.key
    if pool is None:
        num = phe.EncryptedNumber(pk, c)
        num.obfuscate()
        return int(num.ciphertext(be_secure=False))
    pool.check_key(public)
    return int(
        (phe.EncryptedNumber(pk, c) + phe.EncryptedNumber(pk, pool.take())).ciphertext(
            be_secure=False
        )
    )


_ROLES = {
    "features": formats.Kind.PAILLIER_FEATURES,
    "scores": formats.Kind.PAILLIER_SCORES,
    "update": formats.Kind.PAILLIER_UPDATE,
    "aggregate": formats.Kind.PAILLIER_AGGREGATE,
}


@dataclass
class PaillierCiphertexts:
    """Raw Paillier ciphertexts (ints) plus what is needed to decode them.

    ``packing="columns"``: one ciphertext per column and chunk of ``per_ct`` rows, rows packed
    into ``slot_bits``-wide balanced slots. ``packing="slots"``: a flat vector packed
    ``per_ct`` values per ciphertext (aggregation).
    """

    role: str
    key_id: str
    packing: str
    n_rows: int
    n_cols: int
    slot_bits: int
    per_ct: int
    cts: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    #: the public key these ciphertexts belong to (not serialized)
    holder: PaillierPublicKey | None = field(default=None, repr=False, compare=False)

    scheme = "paillier"

    def __len__(self) -> int:
        return len(self.cts)

    def expected_count(self) -> int:
        if self.packing == "columns":
            return self.n_cols * math.ceil(self.n_rows / self.per_ct)
        if self.packing == "slots":
            return math.ceil(self.n_rows * self.n_cols / self.per_ct)
        raise CryptoError(f"unknown Paillier packing {self.packing!r}")

    def to_bytes(self, width: int | None = None) -> bytes:
        w = width or max(1, max((c.bit_length() for c in self.cts), default=8) + 7) // 8
        header = {
            "scheme": "paillier",
            "role": self.role,
            "key_id": self.key_id,
            "packing": self.packing,
            "n_rows": self.n_rows,
            "n_cols": self.n_cols,
            "slot_bits": self.slot_bits,
            "per_ct": self.per_ct,
            "width": w,
            "extra": self.extra,
        }
        body = b"".join(int(c).to_bytes(w, "big") for c in self.cts)
        return formats.pack(_ROLES[self.role], header, [body])

    @property
    def size_bytes(self) -> int:
        return len(self.to_bytes())

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        public: PaillierPublicKey,
        *,
        role: str,
        max_bytes: int | None = None,
    ) -> PaillierCiphertexts:
        """Load ciphertexts made under ``public`` and validate every one of them."""
        limit = max_bytes if max_bytes is not None else formats.MAX_MESSAGE_BYTES
        _, header, parts = formats.unpack(data, expected=_ROLES[role], max_bytes=limit)
        what = f"Paillier {role}"
        key_id = formats.require(header, "key_id", str, what)
        if key_id != public.key_id:
            raise CryptoError(
                f"foreign ciphertext: these {role} were encrypted under Paillier key "
                f"{key_id[:16]}..., not {public.key_id[:16]}..."
            )
        fields = {
            k: formats.require(header, k, int, what)
            for k in ("n_rows", "n_cols", "slot_bits", "per_ct", "width")
        }
        packing = formats.require(header, "packing", str, what)
        extra = formats.require(header, "extra", dict, what)
        if min(fields.values()) < 1:
            raise CryptoError(f"malformed {what}: sizes must be >= 1")
        width = fields["width"]
        if width > public.ciphertext_bytes:
            raise CryptoError(
                f"malformed {what}: {width}-byte ciphertexts are too wide for this key"
            )
        if fields["per_ct"] * fields["slot_bits"] > public.key_bits - 2:
            raise CryptoError(f"malformed {what}: packing exceeds the plaintext size")
        if len(parts) != 1 or len(parts[0]) % width:
            raise CryptoError(f"malformed {what}: body is not a whole number of ciphertexts")
        body = parts[0]
        cts = [int.from_bytes(body[i : i + width], "big") for i in range(0, len(body), width)]
        obj = cls(
            role,
            key_id,
            packing,
            fields["n_rows"],
            fields["n_cols"],
            fields["slot_bits"],
            fields["per_ct"],
            cts,
            extra,
            public,
        )
        if len(cts) != obj.expected_count():
            raise CryptoError(
                f"malformed {what}: {len(cts)} ciphertexts, expected {obj.expected_count()}"
            )
        public.check_ciphertexts(cts, what=f"{what} ciphertext")
        return obj
