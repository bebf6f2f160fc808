"""The app in process: every malformed request gets a 4xx JSON error naming the field; limits;
registration refusals; error containment; logs."""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import privml.he as he
from privml.errors import CryptoError, InsecureOptionWarning, SignatureError, UsageError
from privml.he import formats
from privml.he.ckks import CKKSProfile, _digest, ckks_keygen, encrypt_vectors
from privml.serve.app import create_app
from privml.serve.client import PredictionClient
from privml.serve.model import ServedModel
from privml.serve.settings import Limits, ServeSettings
from privml.serve.tokens import TokenStore
from tests.serve.conftest import PASSPHRASE, StoreClock, Trained, trusting

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(trained: Trained, signing_key: Path) -> ServedModel:
    with trusting(signing_key):
        return ServedModel.load(trained.folder)


@pytest.fixture(scope="module")
def keys(served: ServedModel) -> he.KeyPair:
    return he.keygen(scheme="ckks", requirements=served.evaluators["ckks"].requirements.to_bytes())


@pytest.fixture(scope="module")
def other_keys(served: ServedModel) -> he.KeyPair:
    return he.keygen(scheme="ckks", requirements=served.evaluators["ckks"].requirements.to_bytes())


class Api:
    """A TestClient on a fresh app with its own state folder and a token for 'alice'."""

    def __init__(self, served: ServedModel, state: Path, **limits: Any) -> None:
        from starlette.testclient import TestClient

        self.token = TokenStore(state).add("alice")
        self.settings = ServeSettings(
            model_dir=served.folder, state_dir=state, limits=Limits(**limits)
        )
        self.app = create_app(self.settings, served=served)
        self.http = TestClient(self.app, base_url="http://127.0.0.1", raise_server_exceptions=False)
        self.auth = {"Authorization": f"Bearer {self.token}"}

    def post(self, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Any:
        h = dict(self.auth, **(headers or {}))
        if raw is not None:
            h.setdefault("Content-Type", "application/json")
            return self.http.post(path, content=raw, headers=h)
        return self.http.post(path, json=body, headers=h)

    def get(self, path: str) -> Any:
        return self.http.get(path, headers=self.auth)

    def register(self, kp: he.KeyPair) -> str:
        r = self.post("/v1/contexts", {"context": b64(kp.public.to_bytes())})
        assert r.status_code in (200, 201), r.text
        return str(r.json()["key_id"])


@pytest.fixture
def make_api(served: ServedModel, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    count = [0]

    def make(**limits: Any) -> Api:
        count[0] += 1
        return Api(served, tmp_path / f"state{count[0]}", **limits)

    yield make


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    return make_api()


def error(r: Any, status: int, field: str | None, what: str = "") -> dict[str, Any]:
    assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
    doc = r.json()
    assert set(doc) == {"error", "field", "message"}
    assert doc["field"] == field, doc
    assert doc["message"]
    return dict(doc)


# ------------------------------------------------------------------------------------------
# Malformed requests
# ------------------------------------------------------------------------------------------


def test_malformed_prediction_requests_get_4xx_naming_the_field(
    api: Api, keys: he.KeyPair, other_keys: he.KeyPair, trained: Trained
) -> None:
    kid = api.register(keys)
    good = encrypt_features = he.encrypt_features(keys, trained.X_test[:3]).to_bytes()
    foreign = he.encrypt_features(other_keys, trained.X_test[:3]).to_bytes()
    _, header, parts = formats.unpack(good, expected=formats.Kind.CKKS_FEATURES)

    def envelope(**changes: Any) -> bytes:
        h = {k: v for k, v in header.items() if k != "parts"}
        h.update(changes)
        return formats.pack(formats.Kind.CKKS_FEATURES, h, parts)

    cases: list[tuple[str, Any, int, str | None]] = [
        ("bad base64", {"key_id": kid, "ciphertexts": "not base64!"}, 422, "ciphertexts"),
        ("base64 without padding", {"key_id": kid, "ciphertexts": "AAA"}, 422, "ciphertexts"),
        ("truncated ciphertext", {"key_id": kid, "ciphertexts": b64(good[:-100])}, 422,
         "ciphertexts"),
        ("prefix only", {"key_id": kid, "ciphertexts": b64(good[:10])}, 422, "ciphertexts"),
        ("foreign ciphertext", {"key_id": kid, "ciphertexts": b64(foreign)}, 422, "ciphertexts"),
        ("not a privml message", {"key_id": kid, "ciphertexts": b64(b"x" * 500)}, 422,
         "ciphertexts"),
        ("public context as features", {"key_id": kid, "ciphertexts": b64(keys.public.to_bytes())},
         422, "ciphertexts"),
        ("huge n_rows", {"key_id": kid, "ciphertexts": b64(envelope(n_rows=10**30))}, 422,
         "ciphertexts"),
        ("negative n_rows", {"key_id": kid, "ciphertexts": b64(envelope(n_rows=-3))}, 422,
         "ciphertexts"),
        ("n_rows not an int", {"key_id": kid, "ciphertexts": b64(envelope(n_rows="3"))}, 422,
         "ciphertexts"),
        ("wrong column count", {"key_id": kid, "ciphertexts": b64(envelope(n_cols=29))}, 422,
         "ciphertexts"),
        ("unknown packing", {"key_id": kid, "ciphertexts": b64(envelope(packing="diagonal"))},
         422, "ciphertexts"),
        ("unknown profile", {"key_id": kid, "ciphertexts": b64(envelope(profile="single"))}, 422,
         "ciphertexts"),
        ("unknown key id", {"key_id": "0" * 64, "ciphertexts": b64(good)}, 404, "key_id"),
        ("key id not hex", {"key_id": "Z" * 64, "ciphertexts": b64(good)}, 422, "key_id"),
        ("key id as a number", {"key_id": 12345, "ciphertexts": b64(good)}, 422, "key_id"),
        ("key id huge float", {"key_id": 1e308, "ciphertexts": b64(good)}, 422, "key_id"),
        ("ciphertexts as a list", {"key_id": kid, "ciphertexts": [b64(good)]}, 422,
         "ciphertexts"),
        ("ciphertexts null", {"key_id": kid, "ciphertexts": None}, 422, "ciphertexts"),
        ("ciphertexts empty", {"key_id": kid, "ciphertexts": ""}, 422, "ciphertexts"),
        ("missing field", {"key_id": kid}, 422, "ciphertexts"),
        ("unknown field", {"key_id": kid, "ciphertexts": b64(good), "debug": True}, 422, "debug"),
        ("body is a list", [kid, b64(good)], 422, "body"),
        ("body is a string", "hello", 422, "body"),
    ]
    assert encrypt_features
    for name, body, status, field in cases:
        r = api.post("/v1/predict", body)
        doc = error(r, status, field, name)
        assert "ciphertexts" not in doc["message"] or len(doc["message"]) < 400, name
    # not JSON, JSON with a 5000-digit number, and NaN where a string is expected
    assert api.post("/v1/predict", raw=b"{not json").status_code in (400, 422)
    r = api.post("/v1/predict", raw=b'{"key_id": ' + b"9" * 5000 + b', "ciphertexts": "AA=="}')
    assert 400 <= r.status_code < 500
    r = api.post("/v1/predict", raw=b'{"key_id": NaN, "ciphertexts": "AA=="}')
    error(r, 422, "key_id")
    r = api.post("/v1/predict", raw=b"", headers={"Content-Type": "text/plain"})
    assert 400 <= r.status_code < 500
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"key_id": "\xff\xfe", "ciphertexts": "A"}'):
        error(api.post("/v1/predict", raw=raw), 400, "body")  # too deep; not UTF-8
    # a good request still works afterwards
    r = api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(good)})
    assert r.status_code == 200
    z = he.decrypt_scores(keys.secret, base64.b64decode(r.json()["scores"]))
    assert np.max(np.abs(z - trained.logits(trained.X_test[:3]))) < 1e-4


def test_features_with_the_wrong_scale_or_level_are_refused(
    api: Api, keys: he.KeyPair, served: ServedModel, trained: Trained
) -> None:
    kid = api.register(keys)
    reqs = served.evaluators["ckks"].requirements.to_dict()
    lay = reqs["layouts"]["columns"]
    good = he.encrypt_features(keys, trained.X_test[:4])
    bad_scale = encrypt_vectors(keys.secret, lay["profile"], [np.zeros(4)] * len(good.cts),
                                scale=2.0 ** (lay["scale_bits"] + 3))
    forged = type(good)(good.role, good.key_id, good.profile, good.packing, good.n_rows,
                        good.n_cols, good.complex_packed, bad_scale, holder=good.holder)
    r = api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(forged.to_bytes())})
    assert "scale" in error(r, 422, "ciphertexts")["message"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_ciphertexts_never_cause_a_server_error(
    data: st.DataObject, served: ServedModel, keys: he.KeyPair, trained: Trained,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    api = _fuzz_api(served, keys, tmp_path_factory)
    good = _fuzz_good(keys, trained)
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice", "header"]))
    blob = bytearray(good)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "extend":
        blob += data.draw(st.binary(min_size=1, max_size=64))
    elif kind == "splice":
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i : i + 16] = data.draw(st.binary(min_size=0, max_size=32))
    else:
        _, header, parts = formats.unpack(good, expected=formats.Kind.CKKS_FEATURES)
        h = {k: v for k, v in header.items() if k != "parts"}
        key = data.draw(st.sampled_from(sorted(h)))
        h[key] = data.draw(st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=8),
                                     st.booleans(), st.none(), st.floats()))
        blob = bytearray(formats.pack(formats.Kind.CKKS_FEATURES, h, parts))
    r = api.post("/v1/predict", {"key_id": api.kid, "ciphertexts": b64(bytes(blob))})
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.json()["field"] == "ciphertexts", (r.status_code, r.text)


_FUZZ: dict[str, Any] = {}


def _fuzz_api(served: ServedModel, keys: he.KeyPair, tpf: pytest.TempPathFactory) -> Any:
    if "api" not in _FUZZ:
        # no rate limit in the way: each request counts a chunk's 4,096 patients, and 60 quick
        # requests would exceed the default 20,000 patients/s (429, not what is tested here)
        api = Api(served, tpf.mktemp("fuzz-state"), rate_requests=1e6, rate_patients=1e12)
        api.kid = api.register(keys)  # type: ignore[attr-defined]
        _FUZZ["api"] = api
    return _FUZZ["api"]


def _fuzz_good(keys: he.KeyPair, trained: Trained) -> bytes:
    if "good" not in _FUZZ:
        _FUZZ["good"] = he.encrypt_features(keys, trained.X_test[:2]).to_bytes()
    return bytes(_FUZZ["good"])


def test_paths_and_methods(api: Api, keys: he.KeyPair) -> None:
    error(api.get("/v1/contexts/xyz"), 422, "key_id")
    error(api.get("/v1/contexts/" + "a" * 64), 404, "key_id")
    error(api.http.delete("/v1/contexts/" + "a" * 64, headers=api.auth), 404, "key_id")
    assert api.get("/v1/nothing").status_code == 404
    assert api.http.put("/v1/predict", headers=api.auth).status_code == 405
    doc = api.http.get("/openapi.json").json()
    for path in ("/v1/model", "/v1/contexts", "/v1/contexts/{key_id}", "/v1/predict",
                 "/healthz", "/readyz"):
        assert path in doc["paths"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert api.http.get("/healthz").json() == {"status": "ok"}  # exactly what docs/serve.md says
    assert api.http.get("/readyz").json()["status"] == "ready"


def test_model_metadata_is_public_and_holds_no_weight(api: Api, served: ServedModel) -> None:
    info = api.get("/v1/model").json()
    assert info["model"]["hash"] == served.hash and len(served.hash) == 64
    assert info["model"]["task"]["classes"] == ["benign", "malignant"]
    assert info["encoding"]["feature_names"] == served.encoder.feature_names
    assert set(info["schemes"]) == {"ckks", "paillier"}
    reqs = info["schemes"]["ckks"]["requirements"]
    assert he.EvaluatorRequirements.from_dict(reqs).n_features == 30
    assert info["limits"]["max_batch"] == 8192 and info["auth"] is True
    weights = [float(p) for p in served.model.state_dict()["0.weight"].ravel()]
    text = json.dumps(info)
    assert not any(f"{w:.6g}" in text for w in weights if abs(w) > 1e-3)


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------


def test_registration_is_idempotent_and_contexts_can_be_deleted(api: Api,
                                                                keys: he.KeyPair) -> None:
    body = {"context": b64(keys.public.to_bytes())}
    r1 = api.post("/v1/contexts", body)
    assert r1.status_code == 201 and r1.json()["new"] is True
    r2 = api.post("/v1/contexts", body)
    assert r2.status_code == 200 and r2.json()["new"] is False
    kid = r1.json()["key_id"]
    assert kid == keys.public.key_id
    assert api.get(f"/v1/contexts/{kid}").json()["scheme"] == "ckks"
    assert api.http.delete(f"/v1/contexts/{kid}", headers=api.auth).status_code == 204
    error(api.get(f"/v1/contexts/{kid}"), 404, "key_id")


def _insecure_context() -> bytes:
    """A CKKS context whose profile declares N=4096 with 180 bits of modulus (< 128-bit)."""
    prof = {"name": "single", "poly_modulus_degree": 4096, "coeff_bits": [60, 60, 60],
            "galois_steps": [], "relin": False, "public_key": False}
    parts = [b"params"]
    header = {"scheme": "ckks", "key_id": _digest(parts), "requirements": {},
              "layout": [{"profile": prof, "items": ["params"]}]}
    return formats.pack(formats.Kind.CKKS_PUBLIC, header, parts)


def test_contexts_below_128_bits_or_unable_to_evaluate_are_refused(
    api: Api, served: ServedModel, keys: he.KeyPair
) -> None:
    reqs = served.evaluators["ckks"].requirements.to_dict()

    def register(blob: bytes) -> str:
        return str(error(api.post("/v1/contexts", {"context": b64(blob)}), 422,
                         "context")["message"])

    msg = register(_insecure_context())
    assert "128-bit" in msg and "poly_modulus_degree 4096" in msg
    # keys made for other requirements: named down to the parameter
    other = json.loads(json.dumps(reqs))
    other["layouts"]["columns"]["scale_bits"] = 31
    msg = register(he.keygen(scheme="ckks", requirements=other).public.to_bytes())
    assert "requirements.layouts.columns.scale_bits" in msg and "31" in msg
    # declared requirements equal, actual keys lack the public key the server re-randomizes
    # its answers with
    profiles = [CKKSProfile.from_dict(p) for p in reqs["profiles"]]
    target = profiles[0]
    weak = [p if p is not target else CKKSProfile(
        p.name, p.poly_modulus_degree, p.coeff_bits, p.galois_steps, p.relin, False)
        for p in profiles]
    public, _ = ckks_keygen(weak, {**reqs, "profiles": [p.to_dict() for p in weak]})
    kind, header, parts = formats.unpack(public.to_bytes(), expected=formats.Kind.CKKS_PUBLIC)
    header["requirements"] = reqs  # the header claims the model's requirements
    header.pop("parts")
    msg = register(formats.pack(kind, header, parts))
    # refused by privml.he when it loads the context, or by the server's own check
    assert ("public_key" in msg and f"{target.name!r}" in msg) or "do not match" in msg
    assert public.key_id not in {r.key_id for r in api.app.state.service.store.records()}
    # a secret key is never accepted as a context
    secret_blob = keys.secret.to_encrypted_bytes(passphrase=PASSPHRASE, scrypt_n=1 << 14)
    assert "secret key" in register(secret_blob)
    assert "base64" in error(api.post("/v1/contexts", {"context": "@@@"}), 422,
                             "context")["message"]
    error(api.post("/v1/contexts", {"context": 3}), 422, "context")


def test_paillier_keys_below_3072_bits_and_unaccepted_schemes_are_refused(
    make_api: Callable[..., Api], served: ServedModel, trained: Trained
) -> None:
    reqs = served.evaluators["paillier"].requirements.to_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        weak = he.keygen(scheme="paillier", requirements=reqs, key_bits=2048)
    api = make_api()
    msg = error(api.post("/v1/contexts", {"context": b64(weak.public.to_bytes())}), 422,
                "context")["message"]
    assert "'key_bits'" in msg and "3072" in msg
    ckks_only = Api(ServedModel.load(trained.folder, schemes=("ckks",)),
                    api.settings.resolved_state_dir.parent / "ckks-only")
    r = ckks_only.post("/v1/contexts", {"context": b64(weak.public.to_bytes())})
    assert error(r, 422, "context")["error"] == "scheme_not_accepted"


# ------------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------------


def test_body_size_batch_size_and_context_quota(
    make_api: Callable[..., Api], keys: he.KeyPair, other_keys: he.KeyPair, trained: Trained
) -> None:
    small = make_api(max_body_bytes=64 * 1024)
    r = small.post("/v1/contexts", {"context": b64(keys.public.to_bytes())})
    assert error(r, 413, "body")["error"] == "body_too_large"
    api = make_api(max_batch=8, max_contexts_per_token=1)
    kid = api.register(keys)
    feats = he.encrypt_features(keys, trained.X_test[:9]).to_bytes()
    r = api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(feats)})
    assert error(r, 422, "ciphertexts")["error"] == "batch_too_large"
    r = api.post("/v1/contexts", {"context": b64(other_keys.public.to_bytes())})
    assert error(r, 403, "context")["error"] == "context_quota"
    api.register(keys)  # the same context again is fine
    assert api.http.delete(f"/v1/contexts/{kid}", headers=api.auth).status_code == 204
    api.register(other_keys)


def test_rate_limits_per_token(make_api: Callable[..., Api], keys: he.KeyPair,
                               trained: Trained, store_clock: StoreClock) -> None:
    api = make_api(rate_requests=1.0)  # bursts of 2
    assert api.get("/v1/model").status_code == 200
    assert api.get("/v1/model").status_code == 200
    r = api.get("/v1/model")
    assert error(r, 429, None)["error"] == "rate_limited"
    assert int(r.headers["retry-after"]) >= 1
    store_clock.now += 1.0  # a second later, one request's worth has come back
    assert api.get("/v1/model").status_code == 200
    assert api.get("/v1/model").status_code == 429
    other = TokenStore(api.settings.resolved_state_dir).add("bob")
    assert api.http.get("/v1/model", headers={"Authorization": f"Bearer {other}"}).status_code \
        == 200
    api = make_api(rate_patients=2.0, max_batch=4)  # bursts of 4 patients
    kid = api.register(keys)
    feats = b64(he.encrypt_features(keys, trained.X_test[:3]).to_bytes())
    assert api.post("/v1/predict", {"key_id": kid, "ciphertexts": feats}).status_code == 200
    r = api.post("/v1/predict", {"key_id": kid, "ciphertexts": feats})
    assert error(r, 429, None)["error"] == "rate_limited"


def test_expired_contexts_are_swept_and_the_client_registers_again(
    make_api: Callable[..., Api], trained: Trained, tmp_path: Path
) -> None:
    api = make_api()
    client = PredictionClient("http://127.0.0.1", token=api.token, keys_dir=tmp_path / "keys",
                              passphrase=PASSPHRASE, http_client=api.http)
    z1 = client.predict_logits(trained.X_test[:2])
    kid = client.keys().public.key_id
    db = api.settings.resolved_state_dir / "state.db"
    with sqlite3.connect(db) as conn:  # pretend it was last used 8 days ago
        conn.execute("UPDATE contexts SET last_used = last_used - 8 * 86400")
    error(api.get(f"/v1/contexts/{kid}"), 404, "key_id")
    svc = api.app.state.service
    assert svc.store.expire(ttl_s=api.settings.limits.context_ttl_s) == 1
    assert not list((api.settings.resolved_state_dir / "contexts").glob("*.ctx"))
    client._registered.clear()
    z2 = client.predict_logits(trained.X_test[:2])  # 404 -> registers again -> predicts
    assert np.max(np.abs(z1 - z2)) < 1e-4
    assert api.get(f"/v1/contexts/{kid}").status_code == 200


# ------------------------------------------------------------------------------------------
# Auth off, errors contained, logs
# ------------------------------------------------------------------------------------------


def test_insecure_no_auth_warns_and_serves_anonymously(served: ServedModel,
                                                       tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    s = ServeSettings(model_dir=served.folder, state_dir=tmp_path / "st", auth=False)
    with pytest.warns(InsecureOptionWarning, match="AUTHENTICATION IS OFF"):
        app = create_app(s, served=served)
    http = TestClient(app, base_url="http://127.0.0.1")
    assert http.get("/v1/model").status_code == 200


def test_unexpected_errors_are_contained_and_not_logged_with_their_message(
    api: Api, keys: he.KeyPair, trained: Trained, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kid = api.register(keys)
    feats = b64(he.encrypt_features(keys, trained.X_test[:2]).to_bytes())

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("SECRET-MATERIAL " + feats[:200])

    ev = api.app.state.service.served.evaluators["ckks"]
    monkeypatch.setattr(ev, "predict", boom)
    with caplog.at_level(logging.INFO, logger="privml.serve"):
        r = api.post("/v1/predict", {"key_id": kid, "ciphertexts": feats})
    assert r.status_code == 500 and r.json()["error"] == "internal"
    assert "SECRET-MATERIAL" not in r.text
    assert "internal error RuntimeError" in caplog.text
    assert "SECRET-MATERIAL" not in caplog.text and feats[:40] not in caplog.text
    assert api.token not in caplog.text


def test_readiness_fails_when_the_state_is_unwritable(api: Api,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> None:
        raise OSError("disk full")

    monkeypatch.setattr(api.app.state.service.store, "check", broken)
    r = api.http.get("/readyz")
    assert r.status_code == 503 and r.json()["error"] == "not_ready"
    assert api.http.get("/healthz").status_code == 200


def test_settings_are_validated(served: ServedModel, tmp_path: Path) -> None:
    base = ServeSettings(model_dir=served.folder, state_dir=tmp_path)
    with pytest.raises(UsageError, match="'host'.*TLS"):
        base.with_(host="0.0.0.0").validate()
    base.with_(host="0.0.0.0", allow_plaintext=True).validate()
    base.with_(host="::1").validate()
    with pytest.raises(UsageError, match="'tls_cert' and 'tls_key'"):
        base.with_(tls_cert=tmp_path / "c.pem").validate()
    with pytest.raises(UsageError, match="'max_batch'"):
        base.with_(limits=Limits(max_batch=0)).validate()
    with pytest.raises(UsageError, match="'rate_requests'"):
        base.with_(limits=Limits(rate_requests=float("nan"))).validate()
    with pytest.raises(UsageError, match="'workers'"):
        base.with_(workers=0).validate()
    with pytest.raises(UsageError, match="'schemes'"):
        base.with_(schemes=("rsa",)).validate()
    with pytest.raises(UsageError, match="'model'"):
        base.with_(model_dir=tmp_path / "nope").validate()
    assert ServeSettings.from_json(base.to_json()) == base
    # an unsigned or altered model is never served (privml.artifacts.load_model checks)
    import shutil

    unsigned = tmp_path / "unsigned"
    shutil.copytree(served.folder, unsigned, ignore=shutil.ignore_patterns("serve-state"))
    (unsigned / "model.sig").unlink()
    with pytest.raises(SignatureError, match="unsigned"):
        create_app(base.with_(model_dir=unsigned))
    with pytest.raises(CryptoError):
        from privml.serve.app import check_can_evaluate

        check_can_evaluate(he.keygen(
            scheme="ckks", requirements=served.evaluators["ckks"].requirements).public,
            {**served.evaluators["ckks"].requirements.to_dict(), "n_outputs": 2})
