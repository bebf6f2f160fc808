"""Schemathesis against a live `privml serve` process on 127.0.0.1: >= 2,000 generated requests
(schema-valid and schema-violating, with and without a token) over real HTTP, and not one 5xx.
The server is started and stopped by the test."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from privml.serve.tokens import TokenStore
from tests.serve.conftest import Trained, start_server

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N_REQUESTS = 2000


def test_no_server_error_from_a_live_server(
    trained: Trained, tmp_path: Path, signing_key: Path
) -> None:
    state = tmp_path / "state"
    token = TokenStore(state).add("fuzzer")
    server = start_server(
        trained.folder, state, tmp_path / "server.log", "--rate-limit", "1e9",
        "--patient-rate-limit", "1e12", signing_key=signing_key,
    )  # fmt: skip
    try:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        auth = {"Authorization": f"Bearer {token}"}
        cases = st.one_of(
            schema.as_strategy(GenerationMode.POSITIVE, headers=auth),
            schema.as_strategy(GenerationMode.NEGATIVE, headers=auth),
            schema.as_strategy(GenerationMode.POSITIVE),  # no token at all
        )
        seen: dict[int, int] = {}
        operations: set[str] = set()

        @settings(max_examples=N_REQUESTS, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=cases)
        def run(case: Case) -> None:
            response = case.call(base_url=server.url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            operations.add(f"{case.method} {case.path}")
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}"
            )

        run()
        assert server.proc.poll() is None, server.log_text()[-2000:]  # still serving
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        server.stop()
    total = sum(seen.values())
    assert total >= N_REQUESTS, seen
    assert any(400 <= s < 500 for s in seen) and seen.get(200, 0) > 0, seen
    assert {"POST /v1/predict", "POST /v1/contexts", "GET /v1/model"} <= operations
    assert token not in server.log_text()
