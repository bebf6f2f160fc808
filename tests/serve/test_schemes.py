"""Other model shapes and schemes through the client: a 10-class model (softmax, one column per
class) and Paillier keys. In process (the HTTP layer is the same as in test_e2e)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privml.config import load_config
from privml.pipeline import run
from privml.serve.app import create_app
from privml.serve.client import PredictionClient
from privml.serve.model import ServedModel
from privml.serve.settings import ServeSettings
from privml.serve.tokens import TokenStore
from tests.serve.conftest import PASSPHRASE, Trained

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DIGITS = """
name = "digits"
[data]
dataset = "digits"
n_sites = 2
[model]
kind = "logistic"
[training]
rounds = 4
local_epochs = 1
batch_size = 64
lr = 0.5
seed = 0
"""


def _client(served: ServedModel, tmp_path: Path, **kw: object) -> PredictionClient:
    from starlette.testclient import TestClient

    state = tmp_path / "state"
    token = TokenStore(state).add("clinic")
    app = create_app(ServeSettings(model_dir=served.folder, state_dir=state), served=served)
    http = TestClient(app, base_url="http://127.0.0.1")
    return PredictionClient("http://127.0.0.1", token=token, keys_dir=tmp_path / "keys",
                            passphrase=PASSPHRASE, http_client=http, **kw)  # type: ignore[arg-type]


def test_multiclass_probabilities_and_labels(tmp_path: Path) -> None:
    cfg_path = tmp_path / "digits.toml"
    cfg_path.write_text(DIGITS)
    res = run(load_config(cfg_path), out_dir=tmp_path / "run")
    served = ServedModel.load(tmp_path / "run")
    assert served.spec.n_outputs == 10 and set(served.evaluators) == {"ckks", "paillier"}
    enc = served.encoder
    X = np.vstack([s.X_test for s in res.data.sites])[:40].astype(np.float64)
    raw = {name: spec.min + X[:, j] * (spec.max - spec.min)  # type: ignore[operator]
           for j, (name, spec) in enumerate(enc.schema.items())}
    df = pd.DataFrame({"id": range(100, 140), **raw})
    with _client(served, tmp_path, batch_size=16) as c:
        out = c.predict_frame(df)
    assert list(out.columns) == ["id"] + [f"p_{k}" for k in range(10)] + ["label"]
    assert out["id"].tolist() == list(range(100, 140))
    import torch

    with torch.no_grad():
        z = served.model.double()(torch.as_tensor(enc.transform(df), dtype=torch.float64))
    p = torch.softmax(z, dim=1).numpy()
    got = out[[f"p_{k}" for k in range(10)]].to_numpy()
    assert np.max(np.abs(got - p)) < 1e-4
    assert np.allclose(got.sum(axis=1), 1.0)
    assert out["label"].tolist() == [str(k) for k in p.argmax(axis=1)]


MLP = """
name = "mlp"
[data]
dataset = "breast_cancer"
n_sites = 2
[model]
kind = "mlp"
hidden = [8]
activation = "square"
[training]
rounds = 4
local_epochs = 2
batch_size = 32
lr = 0.5
seed = 0
"""


def test_square_activation_mlp(tmp_path: Path) -> None:
    cfg_path = tmp_path / "mlp.toml"
    cfg_path.write_text(MLP)
    res = run(load_config(cfg_path), out_dir=tmp_path / "run")
    served = ServedModel.load(tmp_path / "run")
    assert set(served.evaluators) == {"ckks"}  # Paillier cannot square
    X = np.vstack([s.X_test for s in res.data.sites])[:20].astype(np.float64)
    with _client(served, tmp_path, batch_size=16) as c:
        z = c.predict_logits(X)  # 16 column-packed + 4
        z1 = c.predict_logits(X[0])  # replicated: rotations with the MLP's Galois keys
    import torch

    with torch.no_grad():
        ref = served.model.double()(torch.as_tensor(X, dtype=torch.float64)).numpy()
    assert np.max(np.abs(z - ref)) < 1e-3 and np.max(np.abs(z1 - ref[:1])) < 1e-3
    assert np.array_equal(z[:, 0] > 0, ref[:, 0] > 0)


def test_paillier_keys_through_the_service(trained: Trained, tmp_path: Path) -> None:
    served = ServedModel.load(trained.folder)
    X = trained.X_test[:6].astype(np.float64)
    with _client(served, tmp_path, scheme="paillier", batch_size=4) as c:
        z = c.predict_logits(X)  # two requests: 4 + 2 patients
        assert c.keys().scheme == "paillier"
        assert c.keys().public.key_bits >= 3072  # type: ignore[union-attr]
    assert np.max(np.abs(z - trained.logits(X))) < 1e-4
