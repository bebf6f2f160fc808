"""Fixed-point slot packing of many signed values into one big integer (for Paillier).

A value ``v`` with ``|v| <= bound`` becomes the integer ``q = round(v * 2**frac_bits)``. Up to
``slots`` such integers share one plaintext as balanced digits in base ``2**slot_bits``::

    V = q_0 + q_1 * 2**S + q_2 * 2**(2S) + ...        (q_i signed, |q_i| < 2**(S-1))

Paillier is additively homomorphic over Z_n, and the map above is additive over the integers, so
the sum of packed ciphertexts decrypts to the packed sums **as long as no digit leaves
(-2**(S-1), 2**(S-1))**. The slot width therefore reserves headroom for the number of terms that
will be added: ``S = bits(max_terms * bound * 2**frac_bits) + 2`` (one sign bit, one spare bit).
Negative totals are represented mod n and lifted to (-n/2, n/2) before unpacking; the packed
integer is kept below ``2**(key_bits - 2)`` so that lift is exact.

Decoding checks that every digit stays within the declared bound and that nothing is left after
the last digit, so overflow or a corrupted ciphertext is detected instead of decoded to garbage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from privml.errors import CryptoError, UsageError


def slot_bits_for(max_abs_int: int, max_terms: int) -> int:
    """Slot width that holds a sum of ``max_terms`` integers of magnitude <= ``max_abs_int``."""
    if max_abs_int < 0 or max_terms < 1:
        raise UsageError("slot_bits_for needs max_abs_int >= 0 and max_terms >= 1")
    return max(1, (max_terms * max_abs_int).bit_length()) + 2


@dataclass(frozen=True)
class SlotCodec:
    """Packing of signed integers into balanced base-``2**slot_bits`` digits.

    ``slots`` is how many digits share one plaintext; ``digit_bound`` the largest magnitude a
    decoded digit may have (checked on decode).
    """

    slot_bits: int
    slots: int
    digit_bound: int

    @classmethod
    def for_key(cls, key_bits: int, slot_bits: int, digit_bound: int) -> SlotCodec:
        usable = key_bits - 2
        slots = usable // slot_bits
        if slots < 1:
            raise CryptoError(
                f"a {slot_bits}-bit slot does not fit a {key_bits}-bit Paillier plaintext"
            )
        if digit_bound >= 1 << (slot_bits - 1):
            raise CryptoError(
                f"digit bound {digit_bound} does not fit a {slot_bits}-bit balanced slot"
            )
        return cls(slot_bits=slot_bits, slots=slots, digit_bound=digit_bound)

    def n_plaintexts(self, n_values: int) -> int:
        return math.ceil(n_values / self.slots)

    def pack(self, ints: Sequence[int]) -> list[int]:
        """Pack signed ints into ``ceil(len/slots)`` signed big integers."""
        s = self.slot_bits
        out = []
        for start in range(0, len(ints), self.slots):
            chunk = ints[start : start + self.slots]
            v = 0
            for q in reversed(chunk):
                v = (v << s) + int(q)
            out.append(v)
        return out

    def unpack(self, packed: Sequence[int], n_values: int) -> list[int]:
        """Inverse of :meth:`pack` on (sums of) packed integers; checks every digit."""
        s = self.slot_bits
        mask = (1 << s) - 1
        half = 1 << (s - 1)
        out: list[int] = []
        for idx, v in enumerate(packed):
            count = min(self.slots, n_values - idx * self.slots)
            for _ in range(count):
                d = v & mask
                if d >= half:
                    d -= 1 << s
                if abs(d) > self.digit_bound:
                    raise CryptoError(
                        f"decoded value {d} exceeds the declared bound {self.digit_bound}: "
                        "overflow (more contributions than the headroom allows) or a corrupted "
                        "ciphertext"
                    )
                out.append(d)
                v = (v - d) >> s
            if v != 0:
                raise CryptoError(
                    "packed plaintext has data beyond its last slot: overflow or a corrupted "
                    "ciphertext"
                )
        return out


def to_fixed(
    values: np.ndarray, *, frac_bits: int, bound: float, name: str = "values"
) -> list[int]:
    """``round(v * 2**frac_bits)`` per value, after checking ``|v| <= bound`` and finiteness."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise UsageError(f"{name} must be finite; entry {bad} is {float(arr[bad])}")
    if arr.size:
        worst = int(np.argmax(np.abs(arr)))
        if abs(arr[worst]) > bound:
            raise UsageError(
                f"{name} entry {worst} is {arr[worst]:.6g}, outside the declared bound "
                f"+/-{bound:g}; clip the values first (e.g. with the DP clipping norm) or "
                "raise the bound"
            )
    scaled = np.rint(arr * float(1 << frac_bits))
    return [int(x) for x in scaled.tolist()]


def from_fixed(ints: Sequence[int], *, frac_bits: int) -> np.ndarray:
    return np.asarray([float(i) for i in ints], dtype=np.float64) / float(1 << frac_bits)
