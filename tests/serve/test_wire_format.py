"""docs/wire-format.md is enough to write a client: tests/serve/wire_client.py, which imports
no privml code (the standard library and tenseal.sealapi only), registers a context and gets
correct predictions from a running `privml serve` (127.0.0.1, stopped by the fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import Server, Trained

pytestmark = pytest.mark.slow
CLIENT = Path(__file__).with_name("wire_client.py")


def test_a_client_without_privml_gets_correct_predictions(
    server: Server, trained: Trained, tmp_path: Path
) -> None:
    from privml.serve.tokens import TokenStore

    token = TokenStore(server.state_dir).add(f"wire-client-{os.getpid()}")  # its own token
    X = trained.X_test[:3].astype(np.float64)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-I", str(CLIENT), server.url, token],
        input=json.dumps(X.tolist()), capture_output=True, text=True, timeout=300,
        cwd=tmp_path, env=env,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["privml_loaded"] == []
    np.testing.assert_allclose(out["logits"], trained.logits(X)[:, 0], atol=1e-5)
