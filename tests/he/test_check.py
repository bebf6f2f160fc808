"""run_encrypted_inference_check: the figures privml run puts in results.json."""

from __future__ import annotations

import json
import warnings

import pytest

import privml.he as he
from privml.errors import InsecureOptionWarning


def test_ckks_check(ckks_linear, data) -> None:
    s = ckks_linear
    r = he.run_encrypted_inference_check(s.model, s.spec, data.X_test, n_single=3, batch_n=600)
    json.dumps(r)  # JSON-ready
    assert r["scheme"] == "ckks" and r["model"] == "linear" and r["n"] == len(data.X_test)
    assert r["max_abs_error"] <= 1e-4
    assert r["agreement"] == 1.0
    assert r["single_query_latency_ms"] > 0 and r["batch_throughput_per_s"] > 0
    assert r["batch_n"] == 600 and r["n_single"] == 3
    assert 0 < r["public_context_bytes"] < 10_000_000
    assert set(r["ciphertext_bytes"]) == {"single_query", "single_result", "batch_per_patient"}
    assert [p["name"] for p in r["parameters"]["profiles"]] == ["main"]


@pytest.mark.slow
def test_paillier_check(paillier_linear, data) -> None:
    s = paillier_linear
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        r = he.run_encrypted_inference_check(
            s.model, s.spec, data.X_test[:20], scheme="paillier", key_bits=2048, n_single=1
        )
    assert r["max_abs_error"] <= 1e-4 and r["agreement"] == 1.0
    assert r["parameters"]["key_bits"] == 2048
    assert r["randomness_pool_precompute_s"] > 0
