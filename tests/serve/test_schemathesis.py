"""Schemathesis against the service's own OpenAPI document: no 5xx over >= 500 generated
requests (valid and schema-violating), with and without a valid token. In process (ASGI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from privml.serve.app import create_app
from privml.serve.model import ServedModel
from privml.serve.settings import Limits, ServeSettings
from privml.serve.tokens import TokenStore
from tests.serve.conftest import Trained

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

N_REQUESTS = 540


def test_no_server_error_over_generated_requests(trained: Trained, tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = TokenStore(state).add("fuzzer")
    app = create_app(
        ServeSettings(model_dir=trained.folder, state_dir=state,
                      limits=Limits(rate_requests=1e6, rate_patients=1e9)),
        served=ServedModel.load(trained.folder),
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = {"Authorization": f"Bearer {token}"}
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE, headers=auth),
        schema.as_strategy(GenerationMode.NEGATIVE, headers=auth),
        schema.as_strategy(GenerationMode.POSITIVE),  # no token at all
    )
    seen: dict[int, int] = {}
    operations: set[str] = set()

    @settings(max_examples=N_REQUESTS, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case: Case) -> None:
        response = case.call()
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        operations.add(f"{case.method} {case.path}")
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: "
            f"{response.text[:300]}"
        )
        if response.status_code >= 400:
            doc = response.json()
            assert set(doc) == {"error", "field", "message"}

    run()
    total = sum(seen.values())
    assert total >= 500, seen
    assert any(400 <= s < 500 for s in seen), seen  # the generator reached the validations
    assert seen.get(200, 0) > 0 and seen.get(401, 0) > 0, seen
    assert {"POST /v1/predict", "POST /v1/contexts", "GET /v1/model"} <= operations
