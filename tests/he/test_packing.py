"""Slot packing for Paillier: exact integer identities, edges, and phe's own decryption."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phe import paillier as phe

from privml.errors import CryptoError, UsageError
from privml.he.packing import SlotCodec, from_fixed, slot_bits_for, to_fixed

BOUND = 2**24  # largest magnitude one contribution may have
SITES = 10
CODEC = SlotCodec.for_key(2048, slot_bits_for(BOUND, SITES), SITES * BOUND)

contribution = st.lists(st.integers(-BOUND, BOUND), min_size=1, max_size=3 * CODEC.slots)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(contribution, min_size=1, max_size=SITES).filter(
        lambda vs: len({len(v) for v in vs}) == 1
    )
)
def test_sum_of_packed_is_packed_sum(vectors: list[list[int]]) -> None:
    n = len(vectors[0])
    packed = [CODEC.pack(v) for v in vectors]
    total = [sum(col) for col in zip(*packed, strict=True)]
    assert CODEC.unpack(total, n) == [sum(col) for col in zip(*vectors, strict=True)]


@pytest.mark.parametrize("value", [BOUND, -BOUND, 0])
def test_edges_all_sites_at_the_bound(value: int) -> None:
    n = CODEC.slots + 3  # spans two plaintexts
    packed = [CODEC.pack([value] * n) for _ in range(SITES)]
    total = [sum(col) for col in zip(*packed, strict=True)]
    assert CODEC.unpack(total, n) == [SITES * value] * n
    assert all(abs(v) < 2 ** (CODEC.slots * CODEC.slot_bits) for v in total)


def test_alternating_signs_and_carries() -> None:
    v = [BOUND, -BOUND, -1, 1, 0, -BOUND, BOUND] * 5
    packed = [CODEC.pack(v) for _ in range(SITES)]
    total = [sum(col) for col in zip(*packed, strict=True)]
    assert CODEC.unpack(total, len(v)) == [SITES * x for x in v]


def test_overflow_beyond_headroom_is_detected() -> None:
    n = 4
    packed = [CODEC.pack([BOUND] * n) for _ in range(SITES + 1)]
    total = [sum(col) for col in zip(*packed, strict=True)]
    with pytest.raises(CryptoError, match="exceeds the declared bound"):
        CODEC.unpack(total, n)


def test_garbage_beyond_last_slot_is_detected() -> None:
    (p,) = CODEC.pack([1, 2, 3])
    with pytest.raises(CryptoError, match="beyond its last slot"):
        CODEC.unpack([p + (1 << (3 * CODEC.slot_bits))], 3)


def test_slot_layout_fits_the_plaintext() -> None:
    assert CODEC.slots * CODEC.slot_bits <= 2046
    assert CODEC.slot_bits == (SITES * BOUND).bit_length() + 2
    with pytest.raises(CryptoError, match="does not fit"):
        SlotCodec.for_key(2048, 4000, 1)


def test_fixed_point_checks() -> None:
    assert to_fixed(np.array([0.5, -0.25]), frac_bits=4, bound=1.0) == [8, -4]
    assert from_fixed([8, -4], frac_bits=4).tolist() == [0.5, -0.25]
    with pytest.raises(UsageError, match="entry 1 is 1.5, outside the declared bound"):
        to_fixed(np.array([0.0, 1.5]), frac_bits=8, bound=1.0)
    with pytest.raises(UsageError, match="must be finite; entry 0 is nan"):
        to_fixed(np.array([np.nan]), frac_bits=8, bound=1.0)


@pytest.fixture(scope="module")
def phe_keys() -> tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey]:
    return phe.generate_paillier_keypair(n_length=2048)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.lists(st.integers(-BOUND, BOUND), min_size=CODEC.slots, max_size=CODEC.slots),
        min_size=2,
        max_size=4,
    )
)
def test_phe_decryption_agrees(
    phe_keys: tuple[phe.PaillierPublicKey, phe.PaillierPrivateKey], vectors: list[list[int]]
) -> None:
    """Packed ints encrypted and summed with phe, decrypted by phe, unpack to the plain sums."""
    pk, sk = phe_keys
    encs = [phe.EncryptedNumber(pk, pk.raw_encrypt(CODEC.pack(v)[0] % pk.n)) for v in vectors]
    total = encs[0]
    for e in encs[1:]:
        total = total + e
    m = sk.raw_decrypt(total.ciphertext(be_secure=False))
    signed = m - pk.n if m > pk.n // 2 else m
    assert signed == sum(CODEC.pack(v)[0] for v in vectors)  # phe agrees with big-int arithmetic
    assert CODEC.unpack([signed], CODEC.slots) == [sum(c) for c in zip(*vectors, strict=True)]
