"""Fault injection on the service: `privml serve` killed with SIGKILL while a client is sending
prediction requests, then restarted on the same port and state folder. While it is down the
client gets connection errors (never a 5xx); after the restart the same client, with the same
registered context, gets the same predictions without registering again."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from privml.serve.client import PredictionClient, ServiceError
from privml.serve.tokens import TokenStore
from tests.serve.conftest import (
    PASSPHRASE,
    SERVER_START_TIMEOUT_S,
    Trained,
    free_port,
    signing_env,
)
from tests.serve.test_e2e import Recorder

pytestmark = pytest.mark.slow


def _start(model: Path, state: Path, port: int, log: Path, signing_key: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "privml.serve", "--model", str(model), "--state-dir", str(state),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(signing_env(signing_key), PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def test_server_killed_and_restarted_during_requests(
    trained: Trained, tmp_path: Path, signing_key: Path
) -> None:
    state, log, port = tmp_path / "state", tmp_path / "server.log", free_port()
    token = TokenStore(state).add("restart")
    url = f"http://127.0.0.1:{port}"
    proc = _start(trained.folder, state, port, log, signing_key)
    rec = Recorder()
    outcomes: list[str] = []
    stop = threading.Event()
    X = trained.X_test[:3]
    try:
        with rec.client() as http, PredictionClient(
            url, token=token, keys_dir=tmp_path / "keys", passphrase=PASSPHRASE, http_client=http
        ) as client:
            client.register()
            first = client.predict_logits(X)

            def loop() -> None:
                while not stop.is_set():
                    try:
                        got = client.predict_logits(X)
                        outcomes.append("ok" if np.max(np.abs(got - first)) < 1e-4 else "wrong")
                    except ServiceError as exc:
                        outcomes.append(f"error {exc.status}")
                        time.sleep(0.05)

            worker = threading.Thread(target=loop)
            worker.start()
            deadline = time.monotonic() + 120
            while outcomes.count("ok") < 3 and worker.is_alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert outcomes.count("ok") >= 3, outcomes[-20:]
            proc.send_signal(signal.SIGKILL)  # no graceful shutdown
            proc.wait(timeout=30)
            down = len(outcomes)
            time.sleep(1.0)
            proc = _start(trained.folder, state, port, log, signing_key)
            restarted = len(outcomes)
            deadline = time.monotonic() + 120
            while outcomes[restarted:].count("ok") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            worker.join(timeout=120)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert set(outcomes) <= {"ok", "error 0"}, set(outcomes)  # no wrong answer, no 5xx
    assert "error 0" in outcomes[down:restarted], outcomes  # it was down: connection errors
    assert outcomes[restarted:].count("ok") >= 3, outcomes[-20:]
    sent = [what for what, _ in rec.requests]
    assert sent.count("POST /v1/contexts") == 1  # the context survived the restart
    assert token not in log.read_text(errors="replace")

