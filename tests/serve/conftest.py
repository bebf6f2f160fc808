"""Fixtures for the prediction-service tests: the demo model trained once per session, a real
uvicorn server on 127.0.0.1 (random free port) started and stopped by the fixture, keys made once.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from privml.artifacts import load_model
from privml.config import load_config
from privml.data.encoding import Encoder, Task
from privml.models.nets import ModelSpec
from privml.pipeline import run
from privml.serve.tokens import TokenStore

PASSPHRASE = "correct horse battery staple"
SERVER_START_TIMEOUT_S = 180.0  # torch + SEAL imports on a busy 2-core machine


@dataclass
class Trained:
    folder: Path
    model: torch.nn.Module
    spec: ModelSpec
    encoder: Encoder
    task: Task
    X_test: np.ndarray
    y_test: np.ndarray

    def logits(self, X: np.ndarray) -> np.ndarray:
        """The plaintext model in float64 (the reference the encrypted scores must match)."""
        import copy

        ref = copy.deepcopy(self.model).double().eval()
        with torch.no_grad():
            return ref(torch.as_tensor(np.asarray(X, dtype=np.float64))).numpy()


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's model-signing key (never the user's real deployment key)."""
    return tmp_path_factory.mktemp("signing") / "signing-key.pem"


def signing_env(signing_key: Path) -> dict[str, str]:
    """Environment under which models are signed with, and trusted by, ``signing_key``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PRIVML_TRUSTED_KEYS", "PRIVML_SIGNING_PASSPHRASE")}
    env["PRIVML_SIGNING_KEY"] = str(signing_key)
    return env


@contextmanager
def trusting(signing_key: Path) -> Iterator[None]:
    """Sign and verify models with ``signing_key`` for the duration (module/session fixtures,
    which run outside the autouse fixture below)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVML_SIGNING_KEY", str(signing_key))
        mp.delenv("PRIVML_TRUSTED_KEYS", raising=False)
        mp.delenv("PRIVML_SIGNING_PASSPHRASE", raising=False)
        yield


@pytest.fixture(autouse=True)
def _signing(signing_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVML_SIGNING_KEY", str(signing_key))
    monkeypatch.delenv("PRIVML_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("PRIVML_SIGNING_PASSPHRASE", raising=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, signing_key: Path) -> Trained:
    """``privml run`` of the demo config (logistic regression, signed), once per session."""
    out = tmp_path_factory.mktemp("serve-model") / "run"
    with trusting(signing_key):
        res = run(load_config(None), out_dir=out)
        model, spec, enc, task, _ = load_model(out)
    X_test = np.vstack([s.X_test for s in res.data.sites])
    y_test = np.concatenate([s.y_test for s in res.data.sites])
    return Trained(out, model, spec, enc, task, X_test, y_test)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path
    verify: Any = True
    tokens: dict[str, str] = field(default_factory=dict)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 60.0, *, after: int = 0) -> str:
        """The log once it holds ``text`` past its first ``after`` characters (what it held
        before the request, so that an earlier test's line does not count): the access log
        line of a request is written after its response has left, so a client can see the
        answer before the line."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log[after:] or time.monotonic() > deadline:
                return log
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(
    model_dir: Path, state_dir: Path, log_path: Path, *extra: str, signing_key: Path,
    verify: Any = True, scheme: str = "http",
) -> Server:
    """``python -m privml.serve`` (the same command as ``privml serve``) in a subprocess that
    trusts ``signing_key`` (the model folder's signer)."""
    port = free_port()
    log = log_path.open("ab")
    cmd = [
        sys.executable, "-m", "privml.serve", "--model", str(model_dir), "--state-dir",
        str(state_dir), "--host", "127.0.0.1", "--port", str(port), *extra,
    ]
    env = dict(signing_env(signing_key), PYTHONUNBUFFERED="1")
    if isinstance(verify, str):
        verify = ssl.create_default_context(cafile=verify)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    url = f"{scheme}://127.0.0.1:{port}"
    server = Server(url, proc, state_dir, log_path, verify=verify)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0, verify=verify).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{server.log_text()}")


@pytest.fixture(scope="session")
def server(trained: Trained, tmp_path_factory: pytest.TempPathFactory,
           signing_key: Path) -> Iterator[Server]:
    """A real uvicorn on 127.0.0.1 with a random port, auth on, two tokens (alice, bob)."""
    root = tmp_path_factory.mktemp("serve-server")
    state = root / "state"
    store = TokenStore(state)
    tokens = {name: store.add(name) for name in ("alice", "bob")}
    srv = start_server(trained.folder, state, root / "server.log", signing_key=signing_key)
    srv.tokens = tokens
    try:
        yield srv
    finally:
        srv.stop()


class StoreClock:
    """The state store's wall clock, stopped: token buckets refill only when a test moves it
    (``clock.now += seconds``), so a rate-limit test does not depend on how fast the machine
    serves the requests in between (a bucket refilling at 1 unit/s let a third request through
    whenever the first two took a second)."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now


@pytest.fixture
def store_clock(monkeypatch: pytest.MonkeyPatch) -> StoreClock:
    import privml.serve.store

    clock = StoreClock()
    monkeypatch.setattr(privml.serve.store, "time", clock)
    return clock


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-keys") / "keys"
