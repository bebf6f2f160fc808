"""CKKS encrypted inference: decrypt(predict(encrypt(x))) ~= model(x), layouts, validation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import privml.he as he
from privml.errors import CryptoError, UsageError
from privml.he import formats
from privml.he.ckks import CKKSCiphertexts, decrypt_vectors
from privml.models.nets import ModelSpec, build_model

HYP = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
unit_rows = arrays(np.float64, (30,), elements=st.floats(0.0, 1.0, allow_nan=False))


@HYP
@given(unit_rows)
def test_linear_single_patient(ckks_linear, ref, x: np.ndarray) -> None:
    s = ckks_linear
    ct = he.encrypt_features(s.keys, x)
    assert ct.packing == "replicated" and len(ct) == 1
    got = he.decrypt_scores(s.keys.secret, s.ev.predict(ct))
    np.testing.assert_allclose(got, ref(s.model, x[None, :]), atol=1e-4)


def test_linear_batch_two_chunks_public_key_encryption(ckks_linear, ref, data) -> None:
    """Column packing across two ciphertext chunks (real and imaginary halves), encrypted by a
    party that only has the public context."""
    s = ckks_linear
    n = 2 * 2048 + 7
    X = data.X_test[np.arange(n) % len(data.X_test)]
    ct = he.encrypt_features(s.server_public, X)
    assert ct.packing == "columns" and ct.complex_packed and len(ct) == 30 * 2
    out = s.ev.predict(he.load_features(ct.to_bytes(), s.server_public))
    got = he.decrypt_scores(s.keys.secret, out.to_bytes())
    assert got.shape == (n, 1)
    np.testing.assert_allclose(got, ref(s.model, X), atol=1e-4)
    proba = he.decrypt_scores(s.keys.secret, out, output="proba")
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-got)), atol=1e-12)


def test_answer_is_one_protected_ciphertext_per_patient_and_output(ckks_linear, data) -> None:
    """One patient, one output: one answer ciphertext; its score is the constant coefficient,
    and the slots themselves hold no score (every other coefficient is a one-time pad)."""
    s = ckks_linear
    x = data.X_test[5]
    out = s.ev.predict(he.encrypt_features(s.keys, x))
    assert len(out) == 1 and out.n_cols == 1
    (slots,) = decrypt_vectors(s.keys.secret, out.profile, out.cts, complex_out=True)
    assert np.median(np.abs(slots)) > 100  # garbage, not a score near 1


@pytest.mark.parametrize("activation", ["square", "poly2"])
def test_mlp(activation: str, ckks_mlp, ref, data, trainer) -> None:
    if activation == "square":
        s = ckks_mlp
        model, ev, keys = s.model, s.ev, s.keys
    else:
        spec = ModelSpec("mlp", 30, 1, hidden=(16,), activation="poly2")
        model = trainer(spec, data, epochs=60)
        ev = he.compile_model(model, spec)
        keys = he.keygen(scheme="ckks", requirements=ev.requirements)
    assert keys.public.size_bytes <= 10_000_000
    X = data.X_test[:40]
    expected = ref(model, X)
    single = np.vstack(
        [he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, x))) for x in X[:3]]
    )
    np.testing.assert_allclose(single, expected[:3], atol=1e-3)
    batch = he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, X)))
    np.testing.assert_allclose(batch, expected, atol=1e-3)


def test_mlp_context_budget_and_keys(ckks_mlp) -> None:
    prof = ckks_mlp.ev.requirements.data["profiles"][0]
    assert prof["poly_modulus_degree"] == 8192 and sum(prof["coeff_bits"]) <= 218
    # the rotations over the features only (the hidden units are summed by the answer's
    # constant coefficient): log2(32) = 5 keys, not all 24
    assert prof["relin"] and len(prof["galois_steps"]) == 5
    assert ckks_mlp.keys.public.size_bytes <= 10_000_000


@pytest.mark.parametrize(("factor", "n"), [(1.0, 4096), (1000.0, 8192)])
def test_large_weights_use_a_rescaling_chain(ckks_linear, ref, data, factor: float, n: int) -> None:
    """Outputs too large for one 60-bit prime: the compiler picks a chain with a rescale (the
    weights encoded at the size of the prime the product drops)."""
    import copy

    model = copy.deepcopy(ckks_linear.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    ev = he.compile_model(model, ckks_linear.spec)
    (prof,) = ev.requirements.data["profiles"]
    assert prof["poly_modulus_degree"] == n
    assert ev.requirements.data["layouts"]["replicated"]["rescale"] == (n == 8192)
    keys = he.keygen(scheme="ckks", requirements=ev.requirements)
    X = data.X_test[:6]
    expected = ref(model, X)
    single = he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, X[0])))
    batch = he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, X)))
    tol = 1e-4 * factor  # same relative precision
    np.testing.assert_allclose(single, expected[:1], atol=tol)
    np.testing.assert_allclose(batch, expected, atol=tol)


def test_multiclass_linear(data) -> None:
    spec = ModelSpec("logistic", 30, 3)
    torch.manual_seed(1)
    model = build_model(spec).eval()
    ev = he.compile_model(model, spec)
    keys = he.keygen(scheme="ckks", requirements=ev.requirements)
    X = data.X_test[:5]
    with torch.no_grad():
        expected = model.double()(torch.as_tensor(X, dtype=torch.float64)).numpy()
    single = he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, X[0])))
    batch = he.decrypt_scores(keys, ev.predict(he.encrypt_features(keys, X)), output="proba")
    np.testing.assert_allclose(single, expected[:1], atol=1e-4)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0)
    np.testing.assert_array_equal(batch.argmax(1), expected.argmax(1))


# -- what gets refused -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_non_polynomial_mlp_refused(activation: str) -> None:
    spec = ModelSpec("mlp", 30, 1, hidden=(16,), activation=activation)
    with pytest.raises(UsageError, match='activation = "square"'):
        he.compile_model(build_model(spec), spec)


def test_unsupported_models_refused() -> None:
    deep = ModelSpec("mlp", 30, 1, hidden=(16, 8), activation="square")
    with pytest.raises(UsageError, match="exactly one hidden layer"):
        he.compile_model(build_model(deep), deep)
    cnn = ModelSpec("cnn", 64, 2, image_shape=(8, 8), activation="square")
    with pytest.raises(UsageError, match="CNN models are not supported"):
        he.compile_model(build_model(cnn), cnn)
    mlp = ModelSpec("mlp", 30, 1, hidden=(16,), activation="square")
    with pytest.raises(UsageError, match="evaluates linear models only"):
        he.compile_model(build_model(mlp), mlp, scheme="paillier")
    with pytest.raises(UsageError, match="maps 30 -> 1 values but the spec says 29 -> 1"):
        he.compile_model(build_model(ModelSpec("logistic", 30, 1)), ModelSpec("logistic", 29, 1))


def test_inputs_outside_bound_refused(ckks_linear) -> None:
    x = np.full(30, 0.5)
    x[3] = 1.7
    with pytest.raises(UsageError, match="magnitude 1.7, outside the declared bound 1"):
        he.encrypt_features(ckks_linear.keys, x)
    with pytest.raises(UsageError, match=r"shape \(n_patients, 30\)"):
        he.encrypt_features(ckks_linear.keys, np.zeros(29))
    with pytest.raises(UsageError, match="NaN"):
        he.encrypt_features(ckks_linear.keys, np.full(30, np.nan))


def test_foreign_and_truncated_ciphertexts_rejected(ckks_linear, data) -> None:
    s = ckks_linear
    other = he.keygen(scheme="ckks", requirements=s.ev.requirements)
    blob = he.encrypt_features(other, data.X_test[0]).to_bytes()
    with pytest.raises(CryptoError, match="foreign ciphertext"):
        he.load_features(blob, s.server_public)
    good = he.encrypt_features(s.keys, data.X_test[0]).to_bytes()
    for cut in (len(good) - 1, len(good) // 2, 40):
        with pytest.raises(CryptoError):
            he.load_features(good[:cut], s.server_public)
    with pytest.raises(CryptoError, match="exceeds the 1000-byte limit"):
        he.load_features(good, s.server_public, max_bytes=1000)
    with pytest.raises(CryptoError, match="expected a CKKS_FEATURES message, got CKKS_SCORES"):
        he.load_features(s.ev.predict_bytes(good, s.server_public), s.server_public)


def test_header_lies_rejected(ckks_linear, data) -> None:
    s = ckks_linear
    feats = he.encrypt_features(s.keys, data.X_test[:3])
    _, header, parts = formats.unpack(feats.to_bytes(), expected=formats.Kind.CKKS_FEATURES)
    header.pop("parts")
    lying = formats.pack(formats.Kind.CKKS_FEATURES, {**header, "n_rows": 5000}, parts)
    with pytest.raises(CryptoError, match="expected 60"):
        he.load_features(lying, s.server_public)
    swapped = formats.pack(formats.Kind.CKKS_FEATURES, {**header, "profile": "single"}, parts)
    with pytest.raises(CryptoError):
        s.ev.predict(he.load_features(swapped, s.server_public))
    garbage = formats.pack(formats.Kind.CKKS_FEATURES, header, [b"\0" * len(p) for p in parts])
    with pytest.raises(CryptoError, match="SEAL rejected it"):
        he.load_features(garbage, s.server_public)


def test_context_validation(ckks_linear) -> None:
    pub = ckks_linear.keys.public.to_bytes()
    _, header, parts = formats.unpack(pub, expected=formats.Kind.CKKS_PUBLIC, max_bytes=1 << 26)
    header.pop("parts")
    insecure = dict(header)
    insecure["layout"] = [dict(e) for e in header["layout"]]
    insecure["layout"][0] = {
        **insecure["layout"][0],
        "profile": {**insecure["layout"][0]["profile"], "coeff_bits": [60, 60, 40]},
    }
    with pytest.raises(CryptoError, match="below 128-bit security"):
        he.load_public(formats.pack(formats.Kind.CKKS_PUBLIC, insecure, parts))
    lying = {**header, "requirements": {**header["requirements"], "profiles": []}}
    with pytest.raises(CryptoError, match="do not match the profiles its requirements declare"):
        he.load_public(formats.pack(formats.Kind.CKKS_PUBLIC, lying, parts))
    with pytest.raises(CryptoError, match="key id does not match"):
        he.load_public(formats.pack(formats.Kind.CKKS_PUBLIC, header, parts[::-1]))
    with pytest.raises(CryptoError, match="exceeds"):
        he.load_public(pub, max_bytes=10_000)
    wrong = formats.pack(formats.Kind.CKKS_PUBLIC, header, [parts[0]] * len(parts))
    with pytest.raises(CryptoError):
        he.load_public(wrong)


def test_features_for_another_evaluator_rejected(ckks_linear, ckks_mlp, data) -> None:
    feats = he.encrypt_features(ckks_mlp.keys, data.X_test[0])
    with pytest.raises(CryptoError, match="keys made for another evaluator"):
        ckks_linear.ev.predict(feats)
    with pytest.raises(UsageError, match="must be CKKS-encrypted features"):
        ckks_linear.ev.predict(he.encrypt_features(ckks_linear.keys, data.X_test[0]).cts)  # type: ignore[arg-type]


def test_scores_decrypted_only_with_their_key(ckks_linear, data) -> None:
    s = ckks_linear
    out = s.ev.predict(he.encrypt_features(s.keys, data.X_test[0]))
    other = he.keygen(scheme="ckks", requirements=s.ev.requirements)
    with pytest.raises(CryptoError, match="foreign ciphertext"):
        he.decrypt_scores(other.secret, out.to_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(
            CKKSCiphertexts.from_bytes(out.to_bytes(), s.keys.secret, role="scores"),
            CKKSCiphertexts,
        )
