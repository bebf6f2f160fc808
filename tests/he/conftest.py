"""Shared fixtures for the HE tests: data, trained models and keys, made once per session
(key generation is the slow part)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import privml.he as he
from privml.errors import InsecureOptionWarning
from privml.models.nets import ModelSpec, build_model


@dataclass
class Data:
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def data() -> Data:
    """Breast cancer, min-max scaled into [0, 1] like privml's encoder does."""
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.min(0)) / (X.max(0) - X.min(0))
    Xtr, Xte, ytr, yte = train_test_split(
        X.astype(np.float32), y.astype(np.float32), test_size=0.3, random_state=0
    )
    return Data(Xtr, Xte, ytr, yte)


def train(spec: ModelSpec, data: Data, *, epochs: int = 200, seed: int = 0) -> torch.nn.Module:
    """Full-batch Adam; one intra-op thread (tiny tensors: threads only contend on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        model = build_model(spec)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        X = torch.tensor(data.X_train)
        y = torch.tensor(data.y_train)[:, None]
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X), y)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def reference(model: torch.nn.Module, X: np.ndarray) -> np.ndarray:
    """The plaintext model in float64."""
    import copy

    m = copy.deepcopy(model).double()
    with torch.no_grad():
        return m(torch.as_tensor(np.asarray(X, dtype=np.float64))).numpy()


@dataclass
class Setup:
    spec: ModelSpec
    model: torch.nn.Module
    ev: Any
    keys: he.KeyPair
    server_public: Any


def _setup(spec: ModelSpec, data: Data, scheme: str = "ckks", **kw: Any) -> Setup:
    model = train(spec, data)
    ev = he.compile_model(model, spec, scheme=scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        keys = he.keygen(scheme=scheme, requirements=ev.requirements, **kw)
        server_public = he.load_public(keys.public.to_bytes())
    return Setup(spec, model, ev, keys, server_public)


@pytest.fixture(scope="session")
def ckks_linear(data: Data) -> Setup:
    return _setup(ModelSpec("logistic", 30, 1), data)


@pytest.fixture(scope="session")
def ckks_mlp(data: Data) -> Setup:
    return _setup(ModelSpec("mlp", 30, 1, hidden=(16,), activation="square"), data)


@pytest.fixture(scope="session")
def paillier_linear(data: Data) -> Setup:
    # 2048-bit keys keep the suite fast; one slow test covers 3072 bits.
    return _setup(ModelSpec("logistic", 30, 1), data, scheme="paillier", key_bits=2048)


@pytest.fixture(scope="session")
def small_data(data: Data) -> Data:
    """The first 6 features: Paillier costs one encryption per feature, so protocol tests that
    do not need all 30 run five times faster."""
    return Data(data.X_train[:, :6], data.X_test[:, :6], data.y_train, data.y_test)


@pytest.fixture(scope="session")
def paillier_small(small_data: Data) -> Setup:
    return _setup(ModelSpec("logistic", 6, 1), small_data, scheme="paillier", key_bits=2048)


@pytest.fixture(scope="session")
def ref() -> Any:
    """``ref(model, X)``: the plaintext model evaluated in float64."""
    return reference


@pytest.fixture(scope="session")
def trainer() -> Any:
    """``trainer(spec, data, epochs=...)``: train a privml model quickly."""
    return train
