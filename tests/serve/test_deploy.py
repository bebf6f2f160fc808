"""Deployment: a second server process (TLS, two workers) on the same state folder serves a
client that registered with the first one, without registering again; TLS is enforced."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import numpy as np
import pytest

from privml.fl.flower.certs import generate_certificates
from privml.serve.client import PredictionClient, ServiceError
from tests.serve.conftest import PASSPHRASE, Server, Trained, start_server
from tests.serve.test_e2e import Recorder

pytestmark = pytest.mark.slow
WORKERS = "2"


def test_tls_workers_and_restart_keep_serving_registered_clients(
    server: Server, trained: Trained, keys_dir: Path, tmp_path: Path, signing_key: Path
) -> None:
    token = server.tokens["alice"]
    with PredictionClient(server.url, token=token, keys_dir=keys_dir,
                          passphrase=PASSPHRASE) as c:
        kid = c.register()
        first = c.predict_logits(trained.X_test[:5])
    certs = generate_certificates(tmp_path / "certs")
    tls = start_server(
        trained.folder, server.state_dir, tmp_path / "tls.log",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--workers", WORKERS, signing_key=signing_key, verify=str(certs.ca_cert), scheme="https",
    )
    try:
        rec = Recorder()
        ssl_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        with rec.client(verify=ssl_ctx) as http, \
                PredictionClient(tls.url, token=token, keys_dir=keys_dir, passphrase=PASSPHRASE,
                                 verify=str(certs.ca_cert), http_client=http) as c:
            got = np.vstack([c.predict_logits(trained.X_test[:5]) for _ in range(4)])
        assert np.max(np.abs(got - np.tile(first, (4, 1)))) < 1e-4
        sent = [what for what, _ in rec.requests]
        assert f"GET /v1/contexts/{kid}" in sent
        assert "POST /v1/contexts" not in sent  # the registration survived the new process
        assert sent.count("POST /v1/predict") == 4
        # plain HTTP on the TLS port, and TLS without trusting the CA, both fail
        with pytest.raises(httpx.HTTPError):
            httpx.get(tls.url.replace("https://", "http://") + "/healthz", timeout=5)
        with PredictionClient(tls.url, token=token, keys_dir=keys_dir,
                              passphrase=PASSPHRASE) as c, \
                pytest.raises(ServiceError, match="cannot reach"):
            c.info()
    finally:
        tls.stop()
    assert "2 worker(s)" in tls.log_text() and token not in tls.log_text()
