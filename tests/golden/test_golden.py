"""Today's results stay today's: every golden run (tests/golden/cases.py) recomputed equals its
recorded final parameters (1e-6) and round records."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from tests.golden.cases import CASES, JSON, NPZ, TOLERANCE

with np.load(NPZ) as _z:
    PARAMS = {k: _z[k] for k in _z.files}
INFO: dict[str, Any] = json.loads(JSON.read_text())


def _close(a: Any, b: Any, path: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, a, b)
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float | int):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_every_case_has_a_golden() -> None:
    assert set(CASES) == set(PARAMS) == set(INFO)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    params, info = CASES[name]()
    np.testing.assert_allclose(params, PARAMS[name], rtol=0, atol=TOLERANCE.get(name, 1e-6))
    _close(json.loads(json.dumps(info)), INFO[name], name)
