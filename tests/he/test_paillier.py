"""Paillier encrypted inference: fixed-point logistic regression, randomness pools, validation."""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import privml.he as he
from privml.errors import CryptoError, InsecureOptionWarning, UsageError
from privml.he import formats
from privml.models.nets import ModelSpec

HYP = settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# fixed-point: inputs and weights rounded to 2**-21, 30 terms: well under 1e-4
TOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet_2048() -> None:
    warnings.simplefilter("ignore", InsecureOptionWarning)


@HYP
@given(
    st.integers(1, 6).flatmap(
        lambda k: arrays(np.float64, (k, 6), elements=st.floats(-1.0, 1.0, allow_nan=False))
    )
)
def test_matches_plaintext_model(paillier_small, ref, X: np.ndarray) -> None:
    """Signed inputs too: negatives exercise the balanced-digit packing."""
    s = paillier_small
    ct = he.encrypt_features(s.keys, X)
    assert len(ct) == 6 and ct.per_ct == len(X)
    got = he.decrypt_scores(s.keys.secret, s.ev.predict(ct))
    np.testing.assert_allclose(got, ref(s.model, X), atol=TOL)


def test_single_patient_one_ciphertext_per_feature(paillier_linear, ref, data) -> None:
    s = paillier_linear
    x = data.X_test[1]
    ct = he.encrypt_features(s.keys, x, packing="replicated")
    assert len(ct) == 30 and ct.per_ct == 1
    got = he.decrypt_scores(s.keys.secret, s.ev.predict(ct))
    np.testing.assert_allclose(got, ref(s.model, x[None, :]), atol=TOL)


def test_batch_packs_patients(paillier_small, ref, small_data) -> None:
    s = paillier_small
    per_ct = (2048 - 2) // s.ev.requirements.data["slot_bits"]
    X = small_data.X_test[: per_ct + 5]  # two chunks
    ct = he.encrypt_features(s.server_public, X)  # a party without the secret key
    assert ct.per_ct == per_ct and len(ct) == 6 * 2
    out_bytes = s.ev.predict_bytes(ct.to_bytes(s.server_public.ciphertext_bytes), s.server_public)
    got = he.decrypt_scores(s.keys.secret, out_bytes)
    np.testing.assert_allclose(got, ref(s.model, X), atol=TOL)


def test_randomness_pool(paillier_small, ref, small_data) -> None:
    s = paillier_small
    pool = he.PaillierRandomnessPool(s.keys.public, size=8)
    server_pool = he.PaillierRandomnessPool(s.server_public, size=1)
    x = small_data.X_test[0]
    ct = he.encrypt_features(s.keys, x, pool=pool)
    assert len(pool) == 2 and pool.misses == 0
    out = s.ev.predict(ct, pool=server_pool)
    assert len(server_pool) == 0
    np.testing.assert_allclose(
        he.decrypt_scores(s.keys.secret, out), ref(s.model, x[None, :]), atol=TOL
    )
    he.encrypt_features(s.keys, x, pool=pool)  # 2 left, 6 needed: 4 computed on the spot
    assert len(pool) == 0 and pool.misses == 4
    with pytest.raises(TypeError, match="must not be pickled"):
        pickle.dumps(pool)
    with pytest.raises(TypeError, match="must not be pickled"):
        copy.copy(pool)
    other = he.keygen(scheme="paillier", requirements=s.ev.requirements, key_bits=2048)
    with pytest.raises(CryptoError, match="another Paillier public key"):
        he.encrypt_features(other, x, pool=he.PaillierRandomnessPool(s.keys.public, size=1))


def test_results_are_rerandomized(paillier_small, small_data) -> None:
    """Two answers to the same ciphertext differ as ciphertexts and by fresh flooding noise
    (at most the declared resolution, 2**-20 on the logit) in what they decrypt to."""
    s = paillier_small
    ct = he.encrypt_features(s.keys, small_data.X_test[0])
    a, b = s.ev.predict(ct), s.ev.predict(ct)
    assert a.cts != b.cts
    da, db = he.decrypt_scores(s.keys.secret, a), he.decrypt_scores(s.keys.secret, b)
    assert da[0, 0] != db[0, 0]
    np.testing.assert_allclose(da, db, atol=2 * 2.0**-20)


def test_invalid_ciphertexts_rejected(paillier_small, small_data) -> None:
    s = paillier_small
    pub = s.server_public
    good = he.encrypt_features(s.keys, small_data.X_test[0], packing="replicated").to_bytes(
        pub.ciphertext_bytes
    )
    _, header, (body,) = formats.unpack(good, expected=formats.Kind.PAILLIER_FEATURES)
    header.pop("parts")
    w = header["width"]
    n = pub.key.n
    for bad in (0, n * n + 1, n * 5):  # zero, too big, shares a factor with n
        width = max(w, (bad.bit_length() + 7) // 8)
        forged = bad.to_bytes(width, "big") + b"".join(
            int.from_bytes(body[i : i + w], "big").to_bytes(width, "big")
            for i in range(w, len(body), w)
        )
        blob = formats.pack(formats.Kind.PAILLIER_FEATURES, {**header, "width": width}, [forged])
        with pytest.raises(CryptoError, match="not a valid ciphertext|too wide"):
            he.load_features(blob, pub)
    with pytest.raises(CryptoError):
        he.load_features(good[:-7], pub)
    other = he.keygen(scheme="paillier", requirements=s.ev.requirements, key_bits=2048)
    foreign = he.encrypt_features(other, small_data.X_test[0]).to_bytes()
    with pytest.raises(CryptoError, match="foreign ciphertext"):
        he.load_features(foreign, pub)


def test_requirements_needed_and_checked(paillier_small, small_data) -> None:
    bare = he.keygen(scheme="paillier", key_bits=2048)
    with pytest.raises(UsageError, match="without evaluator requirements"):
        he.encrypt_features(bare, small_data.X_test[0])
    with pytest.raises(UsageError, match="outside the declared bound"):
        he.encrypt_features(paillier_small.keys, np.full(6, 2.0))


@pytest.mark.slow
def test_default_3072_bits(data, trainer, ref) -> None:
    """The default key size end to end: inference and an aggregation round."""
    spec = ModelSpec("logistic", 30, 1)
    model = trainer(spec, data, epochs=50)
    ev = he.compile_model(model, spec, scheme="paillier")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InsecureOptionWarning)
        keys = he.keygen(scheme="paillier", requirements=ev.requirements)
    assert keys.public.key_bits == 3072
    X = data.X_test[:3]
    got = he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, X)))
    np.testing.assert_allclose(got, ref(model, X), atol=TOL)
    agg = he.SecureAggregator("paillier", n_sites=3, n_params=150, value_bound=1.0)
    akeys = agg.keygen()
    pub = agg.public_material(akeys)
    ups = [np.linspace(-1, 1, 150) * (i + 1) / 3 for i in range(3)]
    total = agg.aggregate([agg.encrypt_update(pub, u) for u in ups], public=pub)
    np.testing.assert_allclose(
        agg.decrypt_aggregate(akeys.secret, total, n_sites=3), np.sum(ups, axis=0), atol=1e-6
    )


@HYP
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=12))
def test_linear_combination_is_phe_dot_product(paillier_small, weights: list[int]) -> None:
    """The evaluator's simultaneous exponentiation gives exactly phe's ciphertext."""
    from phe import paillier as phe

    from privml.he.paillier import linear_combination

    pk = paillier_small.keys.public.key
    rng = np.random.default_rng(len(weights))
    ms = [int(v) for v in rng.integers(-(2**30), 2**30, len(weights))]
    cts = [pk.raw_encrypt(m % pk.n) for m in ms]
    acc = phe.EncryptedNumber(pk, pk.raw_encrypt(0, r_value=1))
    for c, w in zip(cts, weights, strict=True):
        acc = acc + phe.EncryptedNumber(pk, c) * w
    got = linear_combination(paillier_small.keys.public, cts, weights)
    assert got == acc.ciphertext(be_secure=False)
    dot = sum(m * w for m, w in zip(ms, weights, strict=True))
    assert paillier_small.keys.secret.decrypt_ints([got]) == [dot]


def test_linear_combination_edge_cases(paillier_small) -> None:
    from privml.he.paillier import linear_combination

    pub = paillier_small.keys.public
    c = pub.key.raw_encrypt(7)
    assert linear_combination(pub, [c, c], [0, 0]) == 1  # encryption of 0, randomness 1
    assert paillier_small.keys.secret.decrypt_ints([linear_combination(pub, [c], [-3])]) == [-21]
    with pytest.raises(UsageError, match="as many weights"):
        linear_combination(pub, [c], [1, 2])
    with pytest.raises(UsageError, match="below the modulus"):
        linear_combination(pub, [c], [pub.key.n])
