"""Shared fixtures of the security tests: small vulnerable targets, trained once per session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from privml.models.nets import ModelSpec, build_model


@pytest.fixture(autouse=True)
def _signing_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Never touch the user's real deployment key: every test gets its own key folder."""
    d = tmp_path_factory.mktemp("keys")
    monkeypatch.setenv("PRIVML_SIGNING_KEY", str(d / "signing-key.pem"))
    monkeypatch.delenv("PRIVML_TRUSTED_KEYS", raising=False)
    monkeypatch.delenv("PRIVML_SIGNING_PASSPHRASE", raising=False)


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def train_plain(
    X: np.ndarray,
    y: np.ndarray,
    spec: ModelSpec,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 0,
) -> torch.nn.Module:
    """Full-batch Adam, no regularisation: a target that overfits when asked to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(X, y, spec, steps=steps, lr=lr, seed=seed)
    finally:
        torch.set_num_threads(threads)


def _train(
    X: np.ndarray, y: np.ndarray, spec: ModelSpec, *, steps: int, lr: float, seed: int
) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model(spec)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        out = m(Xt)
        if spec.n_outputs == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], yt.float())
        else:
            loss = torch.nn.functional.cross_entropy(out, yt)
        loss.backward()
        opt.step()
    m.eval()
    return m


@pytest.fixture(scope="session")
def digits_mlp(digits: tuple[np.ndarray, np.ndarray]) -> torch.nn.Module:
    """A plainly trained digits MLP (about 0.97 accuracy, not robust)."""
    X, y = digits
    return train_plain(X[:1200], y[:1200], ModelSpec("mlp", 64, 10, hidden=(32,)), steps=200)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The test machines are small and shared: torch's intra-op threads then spin against
    each other (10x slower here). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
