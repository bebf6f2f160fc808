"""End to end against a real uvicorn on 127.0.0.1: predictions, privacy of the exchange, auth,
the command line, logs."""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from privml.he import _seal, formats
from privml.he.ckks import CKKSSecretKey
from privml.serve.client import PredictionClient, ServiceError
from tests.serve.conftest import PASSPHRASE, Server, Trained

#: The HE issue's bound for CKKS logistic regression: decrypted logits within 1e-4.
SCORE_TOL = 1e-4


class Recorder:
    """httpx event hooks keeping every request body and response body."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.responses: list[tuple[str, bytes]] = []

    def on_request(self, request: httpx.Request) -> None:
        self.requests.append((f"{request.method} {request.url.path}", request.read()))

    def on_response(self, response: httpx.Response) -> None:
        self.responses.append((str(response.request.url.path), response.read()))

    def client(self, verify: Any = True) -> httpx.Client:
        return httpx.Client(
            timeout=120.0, verify=verify,
            event_hooks={"request": [self.on_request], "response": [self.on_response]},
        )


def _client(server: Server, keys_dir: Path, *, token: str | None = None,
            http: httpx.Client | None = None, batch_size: int = 64) -> PredictionClient:
    return PredictionClient(
        server.url, token=server.tokens["alice"] if token is None else token,
        keys_dir=keys_dir, passphrase=PASSPHRASE, batch_size=batch_size, http_client=http,
        verify=server.verify,
    )


def test_encrypted_predictions_equal_the_plaintext_model(
    server: Server, trained: Trained, keys_dir: Path
) -> None:
    X = trained.X_test
    ref = trained.logits(X)
    with _client(server, keys_dir, batch_size=40) as c:  # several column-packed batches
        got = c.predict_logits(X)
        singles = np.vstack([c.predict_logits(X[i]) for i in range(3)])  # replicated packing
        proba = c.predict_proba(X)
    assert got.shape == ref.shape == (len(X), 1)
    assert np.max(np.abs(got - ref)) <= SCORE_TOL
    assert np.max(np.abs(singles - ref[:3])) <= SCORE_TOL
    assert np.array_equal(got[:, 0] > 0, ref[:, 0] > 0)  # agreement 100%
    ref_p = 1 / (1 + np.exp(-ref[:, 0]))
    assert np.max(np.abs(proba - ref_p)) <= SCORE_TOL
    # and the model is the good one (not a trivially constant predictor)
    assert np.mean((ref[:, 0] > 0) == (trained.y_test == 1)) > 0.9


def _raw_csv(trained: Trained, path: Path, n: int) -> pd.DataFrame:
    """Raw (unscaled) records from the demo test set, with an id column."""
    cols = {}
    for j, (name, spec) in enumerate(trained.encoder.schema.items()):
        assert spec.type == "numeric"
        cols[name] = spec.min + trained.X_test[:n, j].astype(np.float64) * (spec.max - spec.min)
    df = pd.DataFrame({"patient_id": [f"P{i:04d}" for i in range(n)], **cols})
    df.to_csv(path, index=False, float_format="%.6g")
    return pd.read_csv(path, dtype=object)


def _float_patterns(values: np.ndarray) -> tuple[set[str], set[bytes], set[bytes]]:
    """Text forms (several precisions) and float32/float64 bytes of the non-trivial values."""
    texts: set[str] = set()
    b32: set[bytes] = set()
    b64: set[bytes] = set()
    for v in np.asarray(values, dtype=np.float64).ravel():
        if not np.isfinite(v) or v == round(v):  # 0, 1, integers: present in any JSON
            continue
        f32 = np.float32(v)
        for t in (repr(float(v)), repr(float(f32)), str(f32), f"{v:.4f}", f"{v:.5g}",
                  f"{v:.6g}", f"{v:.8g}", f"{v:.3e}"):
            # at least 4 significant digits, and a '.' (never in base64 or hex)
            if "." in t and len(t.lstrip("-0.")) >= 4:
                texts.add(t)
        b32.add(struct.pack("<f", float(v)))
        b32.add(struct.pack(">f", float(v)))
        b64.add(struct.pack("<d", float(v)))
        b64.add(struct.pack(">d", float(v)))
        b64.add(struct.pack("<d", float(f32)))
    return texts, b32, b64


def _decoded_payloads(body: bytes) -> list[tuple[bytes, bytes]]:
    """(envelope header, SEAL parts) of every base64 value in a JSON body."""
    out = []
    try:
        doc = json.loads(body)
    except ValueError:
        return out
    for v in doc.values() if isinstance(doc, dict) else []:
        if isinstance(v, str) and len(v) > 64:
            try:
                raw = base64.b64decode(v, validate=True)
            except binascii.Error:
                continue
            if raw.startswith(formats.MAGIC):
                _, header, parts = formats.unpack(raw, expected=tuple(formats.Kind))
                out.append((json.dumps(header).encode(), b"".join(parts)))
            else:
                out.append((raw, b""))
    return out


def _secret_fingerprints(secret: CKKSSecretKey) -> list[bytes]:
    """32-byte windows of the secret key: SEAL's serialized form and its raw NTT coefficients."""
    marks = []
    for name, sk in secret.secret_keys.items():
        ser = _seal.save_bytes(sk)
        marks += [ser[i : i + 32] for i in range(64, len(ser) - 32, max(1, len(ser) // 16))]
        pt = sk.data()
        coeffs = np.array([pt.data(i) for i in range(0, pt.coeff_count(), 97)], dtype=np.uint64)
        marks += [coeffs[i : i + 4].tobytes() for i in range(0, len(coeffs) - 4, 16)]
        assert name in secret.profiles
    return marks


def _find_bytes(blob: bytes, patterns: set[bytes] | list[bytes]) -> list[bytes]:
    """Patterns (of 8 bytes or more) that occur in ``blob``, at any offset.

    Vectorized: the blob is read as uint64 at each of the 8 alignments and the patterns' first
    8 bytes are looked up with ``np.isin``; candidates are then confirmed with ``in``.
    """
    pats = [p for p in patterns if len(p) >= 8]
    assert len(pats) == len(list(patterns)), "patterns must be at least 8 bytes"
    if not pats or len(blob) < 8:
        return []
    heads = np.frombuffer(b"".join(p[:8] for p in pats), dtype=np.uint64)
    hit = False
    for off in range(8):
        n = (len(blob) - off) // 8
        if n and np.isin(np.frombuffer(blob, dtype=np.uint64, count=n, offset=off), heads).any():
            hit = True
            break
    return [p for p in pats if p in blob] if hit else []


def _find_texts(text: str, patterns: set[str]) -> list[str]:
    """Patterns (each holding a '.') inside a number-like run of ``text`` (JSON, base64 and hex
    never hold a '.', so every run with one is examined)."""
    runs = [m.group() for m in re.finditer(r"[-+0-9.eE]*\.[-+0-9.eE]*", text)]
    return [p for p in patterns if any(p in r for r in runs)]


def test_exchange_reveals_no_feature_no_secret_key_and_no_weight(
    server: Server, trained: Trained, keys_dir: Path, tmp_path: Path
) -> None:
    rec = Recorder()
    csv = tmp_path / "patients.csv"
    raw = _raw_csv(trained, csv, 12)
    with rec.client() as http, _client(server, keys_dir, http=http, batch_size=5) as c:
        c.register(force=True)  # the context upload is part of what is checked
        c.predict_csv(csv, tmp_path / "scores.csv", progress=False)
        X_enc = c.encoder.transform(raw)
        single = c.predict_logits(X_enc[0])  # one patient (replicated packing) too
        keys = c.keys()
    assert np.isfinite(single).all()
    sent = [b for _, b in rec.requests if b]
    assert any(b'"ciphertexts"' in b for b in sent) and any(b'"context"' in b for b in sent)

    # features: raw CSV strings, encoded values as text and as float32/float64 bytes
    numeric = raw.drop(columns=["patient_id"])
    raw_texts = {
        str(v) for v in numeric.to_numpy().ravel()
        if "." in str(v) and len(str(v).lstrip("-0.")) >= 4
    }
    texts, b32, b64 = _float_patterns(X_enc)
    texts |= raw_texts
    _, r32, r64 = _float_patterns(numeric.to_numpy(dtype=np.float64))
    b32 |= r32
    b64 |= r64
    assert texts and b32 and b64
    secret_marks = _secret_fingerprints(keys.secret)  # type: ignore[arg-type]
    secret_file = next(keys_dir.rglob("secret.key")).read_bytes()
    secret_marks += [secret_file[i : i + 32] for i in range(0, len(secret_file) - 32, 4096)]
    for body in sent:
        text = body.decode("utf-8", errors="replace")
        leaked = _find_texts(text, texts)
        assert not leaked, f"feature values in a request body: {leaked[:5]}"
        assert not _find_bytes(body, secret_marks), "secret key bytes sent"
        for header, parts in _decoded_payloads(body):
            blob = header + parts
            assert not any(p in header for p in b32), "float32 feature bytes in a header"
            assert not _find_bytes(blob, b64), "float64 feature bytes in a request"
            assert not _find_texts(header.decode(errors="replace"), texts)
            assert not _find_bytes(blob, secret_marks), "secret key bytes sent"

    # responses: no weight or bias, in any of these forms
    W = np.concatenate([p.detach().numpy().ravel() for p in trained.model.parameters()])
    wtexts, w32, w64 = _float_patterns(W)
    assert len(wtexts) > 30
    for path, body in rec.responses:
        text = body.decode("utf-8", errors="replace")
        leaked = _find_texts(text, wtexts)
        assert not leaked, f"weights in the response of {path}: {leaked[:5]}"
        for header, parts in _decoded_payloads(body):
            assert not any(p in header for p in w32)
            assert not _find_bytes(header + parts, w64), f"weight bytes in {path}"


def test_command_line_predict_writes_ids_probabilities_and_labels(
    server: Server, trained: Trained, keys_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from privml.cli import main

    csv, out = tmp_path / "patients.csv", tmp_path / "scores.csv"
    raw = _raw_csv(trained, csv, 30)
    monkeypatch.setenv("PRIVML_TOKEN", server.tokens["alice"])
    monkeypatch.setenv("PRIVML_KEY_PASSPHRASE", PASSPHRASE)
    main(["predict", "--server", server.url, "--input", str(csv), "--out", str(out),
          "--keys", str(keys_dir), "--id-column", "patient_id", "--batch-size", "16",
          "--no-progress"])
    res = pd.read_csv(out, dtype={"patient_id": str})
    assert list(res.columns) == ["patient_id", "probability", "label"]
    assert res["patient_id"].tolist() == raw["patient_id"].tolist()
    ref = trained.logits(trained.encoder.transform(raw))[:, 0]
    ref_p = 1 / (1 + np.exp(-ref))
    assert np.max(np.abs(res["probability"].to_numpy() - ref_p)) <= 2e-6 + SCORE_TOL
    expect = np.where(ref > 0, trained.task.classes[1], trained.task.classes[0])
    assert res["label"].tolist() == expect.tolist()


def test_no_token_wrong_token_and_revoked_token_are_refused(
    server: Server, trained: Trained, keys_dir: Path
) -> None:
    from privml.cli import main
    from privml.serve.store import StateStore

    for headers in ({}, {"Authorization": "Bearer privml_wrong"},
                    {"Authorization": "Basic YWxpY2U6cHc="},
                    {"Authorization": f"Bearer {server.tokens['alice']}x"}):
        r = httpx.get(f"{server.url}/v1/model", headers=headers)
        assert r.status_code == 401
        assert r.json()["field"] == "Authorization"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = httpx.post(f"{server.url}/v1/predict", headers=headers,
                       json={"key_id": "0" * 64, "ciphertexts": "AAAA"})
        assert r.status_code == 401
    with _client(server, keys_dir) as alice:
        kid = alice.register()
    # bob works, then is revoked through the command line: refused on the next request
    with _client(server, keys_dir, token=server.tokens["bob"]) as c:
        assert c.register() == kid  # same key pair, registered for bob too
        assert c.predict_logits(trained.X_test[:3]).shape == (3, 1)
        main(["serve", "tokens", "revoke", "bob", "--state-dir", str(server.state_dir)])
        with pytest.raises(ServiceError) as err:
            c.predict_logits(trained.X_test[:3])
        assert err.value.status == 401
    # the revoked token's registrations are forgotten; alice's are not affected
    owners = {r.owner for r in StateStore(server.state_dir).records() if r.key_id == kid}
    assert owners == {"alice"}
    r = httpx.get(f"{server.url}/v1/contexts/{kid}",
                  headers={"Authorization": f"Bearer {server.tokens['alice']}"})
    assert r.status_code == 200
    with _client(server, keys_dir) as c:
        assert c.predict_logits(trained.X_test[:2]).shape == (2, 1)


def test_contexts_are_per_token(server: Server, trained: Trained, keys_dir: Path,
                                tmp_path: Path) -> None:
    from privml.serve.tokens import TokenStore

    carol = TokenStore(server.state_dir).add("carol")
    with _client(server, keys_dir) as alice:
        kid = alice.register()
    body = {"key_id": kid, "ciphertexts": "AAAA"}
    r = httpx.post(f"{server.url}/v1/predict", json=body,
                   headers={"Authorization": f"Bearer {carol}"})
    assert r.status_code == 404 and r.json()["field"] == "key_id"
    r = httpx.get(f"{server.url}/v1/contexts/{kid}", headers={"Authorization": f"Bearer {carol}"})
    assert r.status_code == 404


def test_server_logs_hold_no_token_ciphertext_or_key(server: Server, trained: Trained,
                                                     keys_dir: Path) -> None:
    before = len(server.log_text())  # the server is shared: earlier tests' lines are there
    with _client(server, keys_dir) as c:
        c.predict_logits(trained.X_test[:4])
        blob = c.keys().public.to_bytes()
    log = server.wait_for_log("POST /v1/predict 200 owner=alice", after=before)
    assert "POST /v1/predict 200 owner=alice" in log[before:]  # the access log works
    for token in server.tokens.values():
        assert token not in log and token[len("privml_"):][:16] not in log
    # no base64 or hex run long enough to carry a ciphertext or key
    assert not re.search(r"[A-Za-z0-9+/]{100,}", log)
    assert base64.b64encode(blob[200:260]).decode()[:40] not in log
    assert binascii.hexlify(blob[200:232]).decode() not in log
