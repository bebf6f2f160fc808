# ruff: noqa: F811  (pytest fixtures imported from test_app are parameters here)
"""Limits a model owner relies on and state that must never be lost: lifetime budgets in
patients, counting by ciphertext capacity, contexts of an earlier model, hostile envelopes,
evaluation time limits, the service's own state folder, concurrent token commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import privml.he as he
from privml.errors import UsageError
from privml.he import formats
from privml.serve.settings import Limits, ServeSettings, default_state_dir
from privml.serve.tokens import TokenStore
from tests.serve.conftest import Trained
from tests.serve.test_app import Api, api, b64, error, keys, make_api, served  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_lifetime_budget_in_patients(make_api: Callable[..., Api], keys: he.KeyPair,
                                     trained: Trained) -> None:
    api = make_api()
    capped = TokenStore(api.settings.resolved_state_dir).add("capped", budget=2)
    auth = {"Authorization": f"Bearer {capped}"}
    r = api.http.post("/v1/contexts", json={"context": b64(keys.public.to_bytes())}, headers=auth)
    kid = r.json()["key_id"]

    def one(i: int) -> object:
        ct = he.encrypt_features(keys, trained.X_test[i]).to_bytes()
        return api.http.post("/v1/predict", json={"key_id": kid, "ciphertexts": b64(ct)},
                             headers=auth)

    assert one(0).status_code == 200 and one(1).status_code == 200
    doc = error(one(2), 403, None)
    assert doc["error"] == "budget_exhausted" and "2 of its 2 patients" in doc["message"]
    # alice (no budget) is unaffected
    kid_a = api.register(keys)
    ct = he.encrypt_features(keys, trained.X_test[0]).to_bytes()
    assert api.post("/v1/predict", {"key_id": kid_a, "ciphertexts": b64(ct)}).status_code == 200


def test_column_requests_count_their_capacity(make_api: Callable[..., Api], keys: he.KeyPair,
                                              trained: Trained) -> None:
    """Three patients in column packing fill one chunk of 4,096 slots the client could have
    used: the request counts 4,096 patients against the budget."""
    api = make_api(patient_budget=5000)
    kid = api.register(keys)
    ct = he.encrypt_features(keys, trained.X_test[:3]).to_bytes()
    assert api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(ct)}).status_code == 200
    assert api.app.state.service.store.usage("alice") == 4096
    doc = error(api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(ct)}), 403, None)
    assert "4096 of its 5000" in doc["message"]


def test_deeply_nested_envelopes_are_4xx(api: Api, keys: he.KeyPair) -> None:
    """A context or ciphertext envelope whose JSON header nests thousands of levels: 422 naming
    the field, never a 500 (RecursionError)."""
    import struct

    depth = 20000
    hb = b'{"parts":[],"x":' + b"[" * depth + b"]" * depth + b"}"
    for kind, field, path in (
        (formats.Kind.CKKS_PUBLIC, "context", "/v1/contexts"),
        (formats.Kind.CKKS_FEATURES, "ciphertexts", "/v1/predict"),
    ):
        blob = struct.pack(">8sBBI", formats.MAGIC, formats.VERSION, int(kind), len(hb)) + hb
        if field == "context":
            r = api.post(path, {"context": b64(blob)})
        else:
            kid = api.register(keys)
            r = api.post(path, {"key_id": kid, "ciphertexts": b64(blob)})
        assert "nested" in error(r, 422, field)["message"]


def test_a_context_of_an_earlier_model_is_404_and_registers_again(
    make_api: Callable[..., Api], served, keys: he.KeyPair, trained: Trained  # noqa: F811
) -> None:
    """Same state folder, a retrained model with another shape: the old context answers 404
    (the client registers new keys), not 422 or 500."""
    import copy

    api = make_api()
    kid = api.register(keys)
    ev = served.evaluators["ckks"]
    other = copy.copy(ev)
    other.requirements = he.EvaluatorRequirements.from_dict(
        {**ev.requirements.to_dict(), "x_bound": 2.0}
    )
    served.evaluators["ckks"] = other
    try:
        ct = he.encrypt_features(keys, trained.X_test[0]).to_bytes()
        doc = error(api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(ct)}), 404,
                    "key_id")
        assert "register it again" in doc["message"]
    finally:
        served.evaluators["ckks"] = ev


def test_evaluation_time_limit_is_503(make_api: Callable[..., Api], served,  # noqa: F811
                                      keys: he.KeyPair, trained: Trained,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    api = make_api(eval_timeout_s=0.2)
    kid = api.register(keys)
    ev = served.evaluators["ckks"]
    real = ev.predict

    def slow(features, *, pool=None, deadline=None):  # type: ignore[no-untyped-def]
        time.sleep(0.4)
        return real(features, pool=pool, deadline=deadline)

    monkeypatch.setattr(ev, "predict", slow)
    ct = he.encrypt_features(keys, trained.X_test[:5]).to_bytes()
    doc = error(api.post("/v1/predict", {"key_id": kid, "ciphertexts": b64(ct)}), 503, None)
    assert doc["error"] == "evaluation_timeout" and "0.2 s" in doc["message"]


# ------------------------------------------------------------------------------------------
# State that must never be lost
# ------------------------------------------------------------------------------------------


def test_state_lives_outside_the_run_folder(trained: Trained, tmp_path: Path) -> None:
    """The default state folder is the service's own; replacing the run folder (what a new
    `privml run --out` over it does) keeps every token."""
    import shutil

    copy = tmp_path / "runs" / "demo"
    shutil.copytree(trained.folder, copy)
    state = ServeSettings(model_dir=copy).resolved_state_dir
    assert state == default_state_dir(copy)
    assert copy.resolve() not in state.resolve().parents
    token = TokenStore(state).add("clinic-a")
    shutil.rmtree(copy)
    shutil.copytree(trained.folder, copy)  # the folder replaced by a new run
    assert TokenStore(ServeSettings(model_dir=copy).resolved_state_dir).verify(token) == \
        "clinic-a"
    with pytest.raises(UsageError, match="inside the model folder"):
        ServeSettings(model_dir=copy, state_dir=copy / "serve-state").validate()


def test_concurrent_token_adds_in_threads_are_all_kept(tmp_path: Path) -> None:
    store_dir = tmp_path / "state"
    tokens: list[str] = []
    lock = threading.Lock()

    def add(i: int) -> None:
        t = TokenStore(store_dir).add(f"client-{i}")
        with lock:
            tokens.append(t)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = TokenStore(store_dir)
    assert len(store.list()) == 40
    assert sorted(store.verify(t) or "" for t in tokens) == sorted(f"client-{i}"
                                                                   for i in range(40))


@pytest.mark.slow
def test_100_parallel_token_commands_store_100_tokens(tmp_path: Path) -> None:
    """100 `privml serve tokens add` processes at once: every printed token works."""
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "privml.serve", "tokens", "add", f"clinic-{i}",
             "--state-dir", str(state)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        for i in range(100)
    ]
    printed = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()
        printed.append(out.decode().strip())
    store = TokenStore(state)
    assert len(store.list()) == 100
    assert all(store.verify(t) is not None for t in printed)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--max-body-mb", "nan"], "--max-body-mb"),
        (["--max-body-mb", "inf"], "--max-body-mb"),
        (["--max-body-mb", "-1"], "--max-body-mb"),
        (["--rate-limit", "nan"], "--rate-limit"),
        (["--output-resolution", "0"], "--output-resolution"),
        (["--eval-timeout", "-5"], "--eval-timeout"),
        (["--header-timeout", "nan"], "--header-timeout"),
        (["--max-batch", "0"], "max_batch"),
        (["--patient-budget", "0"], "patient_budget"),
    ],
)
def test_bad_serve_flags_exit_2_with_a_message(trained: Trained, flags: list[str],
                                               match: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "privml.serve", "--model", str(trained.folder), "--state-dir",
         str(tmp_path / "s"), *flags],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr


def test_tokens_list_shows_budget_and_use(tmp_path: Path) -> None:
    from privml.serve.store import StateStore

    state = tmp_path / "state"
    TokenStore(state).add("a", budget=10)
    StateStore(state).spend("a", 4, budget=10)
    r = subprocess.run(
        [sys.executable, "-m", "privml.serve", "tokens", "list", "--state-dir", str(state),
         "--json"], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["budget_patients"] == 10 and row["used_patients"] == 4


def test_limits_validate_numbers() -> None:
    for bad in ({"body_timeout_s": float("nan")}, {"eval_workers": -1},
                {"patient_budget": 0}, {"output_resolution": 2.0}):
        with pytest.raises(UsageError):
            Limits(**bad).validate()  # type: ignore[arg-type]
    assert Limits(eval_workers=0).workers == max(1, os.cpu_count() or 1)
    assert np.isclose(Limits().output_resolution, 2.0**-20)
