"""Encrypted aggregation: sums match, edges of the packing, and what the parties refuse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import privml.he as he
from privml.errors import CryptoError, InsecureOptionWarning, UsageError
from privml.he import formats

N_PARAMS = 150  # > 2 Paillier plaintexts of 68 slots at 2048 bits
SITES = 4


@pytest.fixture(autouse=True)
def _quiet_2048() -> None:
    warnings.simplefilter("ignore", InsecureOptionWarning)


@pytest.fixture(scope="module")
def paillier_agg() -> tuple[he.SecureAggregator, he.KeyPair, bytes]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        agg = he.SecureAggregator(
            "paillier", n_sites=SITES, n_params=N_PARAMS, value_bound=1.0, key_bits=2048
        )
        keys = agg.keygen()
        return agg, keys, agg.public_material(keys)


@pytest.fixture(scope="module")
def ckks_agg() -> tuple[he.SecureAggregator, he.KeyPair, bytes]:
    agg = he.SecureAggregator("ckks", n_sites=SITES, n_params=N_PARAMS, value_bound=1.0)
    keys = agg.keygen()
    return agg, keys, agg.public_material(keys)


def _round(setup, updates):
    agg, keys, pub = setup
    blobs = [agg.encrypt_update(pub, u) for u in updates]
    total = agg.aggregate(blobs, public=pub)
    return agg.decrypt_aggregate(keys.secret, total, n_sites=len(updates))


def test_paillier_sum_is_exact_to_the_resolution(paillier_agg) -> None:
    rng = np.random.default_rng(0)
    ups = [rng.uniform(-1, 1, N_PARAMS) for _ in range(SITES)]
    got = _round(paillier_agg, ups)
    # each value is rounded to 2**-24 before encryption: the sum is exact up to SITES half-steps
    assert np.max(np.abs(got - np.sum(ups, axis=0))) <= SITES * 2.0**-25
    fixed = [np.rint(u * 2**24) / 2**24 for u in ups]
    np.testing.assert_array_equal(got, np.sum(fixed, axis=0))


@pytest.mark.parametrize("value", [1.0, -1.0])
def test_paillier_edges_all_sites_at_the_bound(paillier_agg, value: float) -> None:
    ups = [np.full(N_PARAMS, value) for _ in range(SITES)]
    np.testing.assert_array_equal(_round(paillier_agg, ups), np.full(N_PARAMS, SITES * value))


def test_paillier_mixed_signs_and_zeros(paillier_agg) -> None:
    base = np.tile([1.0, -1.0, 0.0, -(2.0**-24), 2.0**-24], N_PARAMS // 5)
    ups = [base, -base, base, base]
    np.testing.assert_array_equal(_round(paillier_agg, ups), 2 * base)


def test_ckks_sum(ckks_agg) -> None:
    rng = np.random.default_rng(1)
    ups = [rng.uniform(-1, 1, N_PARAMS) for _ in range(SITES)]
    got = _round(ckks_agg, ups)
    assert np.max(np.abs(got - np.sum(ups, axis=0))) < 1e-5  # flooding noise sigma 2**-24


@pytest.mark.parametrize("setup_name", ["paillier_agg", "ckks_agg"])
def test_refusals(setup_name: str, request: pytest.FixtureRequest) -> None:
    agg, keys, pub = request.getfixturevalue(setup_name)
    ok = np.zeros(N_PARAMS)
    with pytest.raises(UsageError, match="outside the declared bound"):
        agg.encrypt_update(pub, np.full(N_PARAMS, 1.5))
    with pytest.raises(UsageError, match="must be finite"):
        agg.encrypt_update(pub, np.full(N_PARAMS, np.nan))
    with pytest.raises(UsageError, match=rf"shape \({N_PARAMS},\)"):
        agg.encrypt_update(pub, np.zeros(N_PARAMS + 1))
    blobs = [agg.encrypt_update(pub, ok + i / 10) for i in range(SITES + 1)]
    with pytest.raises(CryptoError, match="exceed n_sites=4"):
        agg.aggregate(blobs, public=pub)
    with pytest.raises(CryptoError, match="submitted twice"):
        agg.aggregate([blobs[0], blobs[0]], public=pub)
    single = agg.aggregate(blobs[:1], public=pub)
    with pytest.raises(CryptoError, match="at least min_sites=2"):
        agg.decrypt_aggregate(keys.secret, single)
    pair = agg.aggregate(blobs[:2], public=pub)
    with pytest.raises(CryptoError, match="expected n_sites=3"):
        agg.decrypt_aggregate(keys.secret, pair, n_sites=3)
    with pytest.raises(CryptoError, match="expected a"):
        agg.decrypt_aggregate(keys.secret, blobs[0])  # an individual update is never decrypted
    with pytest.raises(CryptoError):
        agg.aggregate([blobs[0][:-3]], public=pub)
    # partial aggregates can be summed again (hierarchical aggregation)
    quad = agg.aggregate([pair, agg.aggregate(blobs[2:4], public=pub)], public=pub)
    assert agg.decrypt_aggregate(keys.secret, quad, n_sites=4).shape == (N_PARAMS,)


def test_foreign_keys_and_configs(paillier_agg, ckks_agg) -> None:
    agg, keys, pub = paillier_agg
    other = he.SecureAggregator(
        "paillier", n_sites=SITES, n_params=N_PARAMS, value_bound=1.0, key_bits=2048
    )
    okeys = other.keygen()
    opub = other.public_material(okeys)
    blob = other.encrypt_update(opub, np.zeros(N_PARAMS))
    with pytest.raises(CryptoError, match="foreign ciphertext"):
        agg.aggregate([blob], public=pub)
    wider = he.SecureAggregator(
        "paillier", n_sites=SITES, n_params=N_PARAMS, value_bound=2.0, key_bits=2048
    )
    with pytest.raises(CryptoError, match="another aggregation setup"):
        wider.encrypt_update(pub, np.zeros(N_PARAMS))
    cagg, _, cpub = ckks_agg
    with pytest.raises(UsageError, match="not a Paillier key"):
        agg.encrypt_update(cpub, np.zeros(N_PARAMS))
    with pytest.raises(UsageError, match="not a CKKS context"):
        cagg.encrypt_update(pub, np.zeros(N_PARAMS))


def test_server_sees_public_material_only(paillier_agg, ckks_agg) -> None:
    for agg, keys, pub in (paillier_agg, ckks_agg):
        kind = formats.peek_kind(pub)
        assert kind in (formats.Kind.PAILLIER_PUBLIC, formats.Kind.CKKS_PUBLIC)
        server = he.SecureAggregator(
            agg.scheme, n_sites=SITES, n_params=N_PARAMS, value_bound=1.0, key_bits=agg.key_bits
        )
        blobs = [agg.encrypt_update(pub, np.full(N_PARAMS, 0.5)) for _ in range(2)]
        total = server.aggregate(blobs, public=pub)  # a fresh object with only the public bytes
        np.testing.assert_allclose(
            agg.decrypt_aggregate(keys.secret, total), np.ones(N_PARAMS), atol=1e-5
        )


def test_public_material_defaults_to_last_keygen() -> None:
    agg = he.SecureAggregator("ckks", n_sites=2, n_params=3, value_bound=1.0)
    with pytest.raises(UsageError, match="call keygen"):
        agg.public_material()
    keys = agg.keygen()
    assert agg.public_material() == keys.public.to_bytes()


def test_constructor_validation() -> None:
    with pytest.raises(UsageError, match="'scheme'"):
        he.SecureAggregator("rsa", n_sites=2, n_params=3, value_bound=1.0)
    with pytest.raises(UsageError, match="'n_sites' parameter must be an int >= 1"):
        he.SecureAggregator("ckks", n_sites=0, n_params=3, value_bound=1.0)
    with pytest.raises(UsageError, match="'value_bound'"):
        he.SecureAggregator("ckks", n_sites=2, n_params=3, value_bound=-1.0)
    with pytest.raises(UsageError, match="min_sites"):
        he.SecureAggregator("ckks", n_sites=2, n_params=3, value_bound=1.0, min_sites=3)
    with pytest.raises(CryptoError, match=">= 2048"):
        he.SecureAggregator("paillier", n_sites=2, n_params=3, value_bound=1.0, key_bits=1024)


def test_paillier_packing_factor() -> None:
    """10 sites x 1000 floats: 68 values per 2048-bit ciphertext, 102 per 3072-bit one."""
    a = he.SecureAggregator("paillier", n_sites=10, n_params=1000, value_bound=1.0, key_bits=2048)
    assert a.codec.slots == 68 and a.codec.n_plaintexts(1000) == 15
    b = he.SecureAggregator("paillier", n_sites=10, n_params=1000, value_bound=1.0)
    assert b.codec.slots == 102 and b.codec.n_plaintexts(1000) == 10
