"""The encrypted prediction service and its client.

Server::

    from privml.serve import ServeSettings, create_app, run_server
    run_server(ServeSettings(model_dir="runs/demo"))        # what `privml serve` does

Client::

    from privml.serve import PredictionClient
    with PredictionClient("https://hospital:8443", token=..., passphrase=...) as c:
        c.predict_csv("patients.csv", "scores.csv")

The server only ever receives public contexts and ciphertexts; the client never receives the
weights. Protocol, limits and security notes: docs/serve.md. Names are imported lazily so that
``privml --help`` does not load FastAPI, SEAL or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privml.serve.app import create_app
    from privml.serve.client import KeyRing, PredictionClient, PredictionSummary, ServiceError
    from privml.serve.model import ServedModel
    from privml.serve.server import run_server
    from privml.serve.settings import Limits, ServeSettings
    from privml.serve.store import StateStore
    from privml.serve.tokens import TokenStore

_WHERE = {
    "create_app": "privml.serve.app",
    "KeyRing": "privml.serve.client",
    "PredictionClient": "privml.serve.client",
    "PredictionSummary": "privml.serve.client",
    "ServiceError": "privml.serve.client",
    "ServedModel": "privml.serve.model",
    "run_server": "privml.serve.server",
    "Limits": "privml.serve.settings",
    "ServeSettings": "privml.serve.settings",
    "StateStore": "privml.serve.store",
    "TokenStore": "privml.serve.tokens",
}

__all__ = [
    "KeyRing",
    "Limits",
    "PredictionClient",
    "PredictionSummary",
    "ServeSettings",
    "ServedModel",
    "ServiceError",
    "StateStore",
    "TokenStore",
    "create_app",
    "run_server",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'privml.serve' has no attribute {name!r}")
