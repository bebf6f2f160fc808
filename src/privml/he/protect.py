"""What leaves the server: only the designated scores, re-randomized and flooded.

A client holds the secret key, so it can decrypt *every* coefficient of an answer, and it can
craft the ciphertexts it sends (any polynomial, of any size, in any slot). Three measures make
an answer reveal one number per output and per counted patient, whatever was sent:

* **Coefficient masking (a one-time pad).** For a single-patient (``replicated``) answer the
  score is read from the *constant coefficient* of the decrypted polynomial: it equals the mean
  of all slots (the real part), so the evaluator never needs rotations to sum them. Every other
  coefficient is overwritten by adding a polynomial whose coefficients are uniform modulo the
  ciphertext modulus, drawn from the operating system's CSPRNG: they decrypt to uniform noise,
  independent of the model. A crafted input (unit vectors in different slot blocks, huge
  values, arbitrary polynomials) therefore gets back exactly one linear (or, for the MLP,
  quadratic) function of the model per output.
* **Re-randomization.** A fresh public-key encryption of zero is added, so the answer's second
  component is pseudo-random; without it ``c1_out = c1_in * w`` would give the weights away to a
  client that knows its own ``c1_in``. Evaluators with rotations or a squaring also re-randomize
  before them, so the key-switching noise is computed on pseudo-random data and its
  distribution does not depend on the weights.
* **Noise flooding.** The kept coefficients get Gaussian noise of a standard deviation chosen by
  the evaluator: the declared output resolution (default ``2**-20`` on the logit), and for the
  MLP at least ``2**(lambda/4)`` times the weight-dependent part of the evaluation noise
  (``lambda = 40``, see :data:`STATISTICAL_SECURITY_BITS`). The resolution caps what one answer
  can carry: ``log2(q / sigma)`` bits, about what an honest score at that resolution carries.

Every element (mask plus encryption of zero) is independent of the query, so it is computed
offline: :class:`CKKSAnswerPool` keeps precomputed elements per key and the online cost is one
ciphertext addition. Elements are used once, never pickled, and dropped in a forked child.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tenseal import sealapi as seal

from privml.errors import CryptoError, UsageError
from privml.he import _seal

#: Statistical security parameter of the noise flooding, in bits (Kullback-Leibler divergence
#: of at most 2**-lambda between the answers of two models that give the same scores).
STATISTICAL_SECURITY_BITS = 40
#: Default resolution of a returned score (standard deviation of the flooding, logit units).
DEFAULT_RESOLUTION = 2.0**-20

KINDS = ("score", "flood", "rerand")


@dataclass(frozen=True)
class MaskSpec:
    """One kind of precomputed element.

    ``kind``: ``"score"`` keeps the constant coefficient (plus Gaussian noise of standard
    deviation ``sigma``, in coefficient units) and makes every other coefficient uniform;
    ``"flood"`` adds Gaussian noise of standard deviation ``sigma`` to every coefficient (column
    packing, where every slot is a patient); ``"rerand"`` is a fresh encryption of zero only.
    ``level`` is the data level of profile ``profile`` the element lives at.
    """

    kind: str
    profile: str
    level: int
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(f"unknown mask kind {self.kind!r}")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise UsageError(f"mask sigma must be finite and >= 0. Got {self.sigma!r}.")


def uniform_mod(q: int, n: int) -> np.ndarray:
    """``n`` integers uniform in ``[0, q)`` from ``os.urandom`` (rejection sampling)."""
    bits = max(1, q.bit_length())
    top = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    out = np.frombuffer(os.urandom(8 * n), dtype="<u8") & top
    bad = out >= np.uint64(q)
    while bad.any():
        k = int(bad.sum())
        out[bad] = np.frombuffer(os.urandom(8 * k), dtype="<u8") & top
        bad = out >= np.uint64(q)
    return out.astype(np.uint64)


def gaussian(sigma: float, n: int) -> np.ndarray:
    """``n`` integers, rounded Gaussian of standard deviation ``sigma``, from ``os.urandom``
    (Box-Muller on 53-bit uniforms; never an all-zero draw)."""
    if sigma <= 0:
        return np.zeros(n, dtype=np.int64)
    raw = np.frombuffer(os.urandom(16 * n), dtype="<u8").reshape(2, n) >> np.uint64(11)
    u1 = (raw[0].astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = raw[1].astype(np.float64) / 2.0**53
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return np.rint(z * sigma).astype(np.int64)


def _residues(values: np.ndarray, q: int) -> np.ndarray:
    v = values.astype(np.int64)
    return np.where(v < 0, np.int64(q) + v, v).astype(np.uint64)


def make_element(rt: Any, spec: MaskSpec) -> Any:
    """One precomputed element for ``spec`` under the public context runtime ``rt``."""
    if rt.public_key is None:
        raise CryptoError(
            f"CKKS profile {rt.profile.name!r} carries no public key: the server needs it to "
            "re-randomize answers; generate keys from this evaluator's requirements"
        )
    parms_id = rt.levels[spec.level]
    z = seal.Ciphertext()
    rt.pk_encryptor().encrypt_zero(parms_id, z)
    if spec.kind == "rerand":
        return z
    primes = [int(m.value()) for m in rt.context.get_context_data(parms_id).parms().coeff_modulus()]
    n = rt.n
    if spec.kind == "score":
        flood = gaussian(spec.sigma, 1)
        c0 = np.stack([uniform_mod(q, n) for q in primes])
        for j, q in enumerate(primes):
            c0[j, 0] = _residues(flood, q)[0]
    else:
        flood = gaussian(spec.sigma, n)
        c0 = np.stack([_residues(flood, q) for q in primes])
    polys = np.stack([c0, np.zeros_like(c0)])
    ev = rt.evaluator
    ev.transform_from_ntt_inplace(z)
    mask = _seal.coefficient_ciphertext(rt.context, parms_id, polys, float(z.scale))
    ev.add_inplace(z, mask)
    ev.transform_to_ntt_inplace(z)
    return z


class CKKSAnswerPool:
    """Precomputed answer masks and encryptions of zero under one CKKS public context.

    ``sizes`` maps each :class:`MaskSpec` to how many elements :meth:`refill` keeps ready.
    :meth:`take` hands out each element once (computing one on the spot when the pool is empty,
    counted in ``misses``). Thread-safe; refuses pickling; empties itself in a forked child
    (a fork would hand the same one-time pads to two processes).
    """

    def __init__(self, public: Any, sizes: Mapping[MaskSpec, int], *, fill: bool = True) -> None:
        for spec, size in sizes.items():
            if not isinstance(spec, MaskSpec):
                raise TypeError("CKKSAnswerPool sizes must be keyed by MaskSpec")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise UsageError(f"pool size must be an int >= 0. Got {size!r} instead.")
        self.key_id = public.key_id
        self._public = public
        self.target = dict(sizes)
        self._items: dict[MaskSpec, list[Any]] = {s: [] for s in sizes}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.misses = 0
        self.made = 0
        if fill:
            self.refill()

    def __getstate__(self) -> None:
        raise TypeError("a CKKSAnswerPool must not be pickled or copied: reuse breaks security")

    def __len__(self) -> int:
        self._fork_guard()
        with self._lock:
            return sum(len(v) for v in self._items.values())

    def _fork_guard(self) -> None:
        if os.getpid() != self._pid:
            with self._lock:
                for v in self._items.values():
                    v.clear()
                self._pid = os.getpid()

    def check_key(self, public: Any) -> None:
        if public.key_id != self.key_id:
            raise CryptoError("this answer pool was made for another CKKS public context")

    def deficit(self) -> int:
        """Elements missing to reach every target size."""
        self._fork_guard()
        with self._lock:
            return sum(max(0, t - len(self._items.get(s, []))) for s, t in self.target.items())

    def below(self, fraction: float) -> bool:
        """Whether some kind of element has fewer than ``fraction`` of its target ready."""
        self._fork_guard()
        with self._lock:
            return any(len(self._items.get(s, [])) < fraction * t
                       for s, t in self.target.items() if t > 0)

    def _make(self, spec: MaskSpec) -> Any:
        self.made += 1
        return make_element(self._public.runtime(spec.profile), spec)

    def refill(self, limit: int | None = None) -> int:
        """Compute missing elements (all, or at most ``limit``); returns how many were made."""
        made = 0
        for spec, target in self.target.items():
            while limit is None or made < limit:
                self._fork_guard()
                with self._lock:
                    if len(self._items.setdefault(spec, [])) >= target:
                        break
                elem = self._make(spec)
                with self._lock:
                    self._items[spec].append(elem)
                made += 1
        return made

    def top_up(self, limit: int | None = None) -> int:
        """Same as :meth:`refill` (the name the service's background filler uses)."""
        return self.refill(limit)

    def take(self, spec: MaskSpec) -> Any:
        self._fork_guard()
        with self._lock:
            items = self._items.get(spec)
            if items:
                return items.pop()
        self.misses += 1
        return self._make(spec)


def apply(rt: Any, ct: Any, spec: MaskSpec, pool: CKKSAnswerPool | None) -> None:
    """Add one element for ``spec`` (from ``pool``, else computed now) to ``ct`` in place."""
    elem = pool.take(spec) if pool is not None else make_element(rt, spec)
    if tuple(elem.parms_id()) != tuple(ct.parms_id()):
        raise CryptoError("internal error: answer mask at the wrong level")
    elem.scale = float(ct.scale)
    rt.evaluator.add_inplace(ct, elem)


def specs_of(items: Iterable[tuple[MaskSpec, int]]) -> dict[MaskSpec, int]:
    out: dict[MaskSpec, int] = {}
    for spec, n in items:
        out[spec] = out.get(spec, 0) + n
    return out
