"""Shared fixtures for the DP tests: a stand-in column schema and small site frames."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest

from privml.errors import InsecureOptionWarning


@dataclass(frozen=True)
class Col:
    """Stand-in for privml.config.ColumnSchema (same attribute names)."""

    type: str
    min: float | None = None
    max: float | None = None
    values: list[Any] | None = None
    derived_from_data: bool = False


@pytest.fixture
def schema() -> dict[str, Col]:
    return {
        "age": Col("numeric", 0.0, 100.0),
        "income": Col("numeric"),  # bounds not declared
        "score": Col("numeric", 0.0, 10.0, derived_from_data=True),
        "sex": Col("categorical", values=["F", "M"]),
        "smoker": Col("binary"),
    }


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 1000
    return pd.DataFrame(
        {
            "age": rng.uniform(0, 100, n),
            "income": rng.normal(50_000, 10_000, n),
            "score": rng.uniform(0, 10, n),
            "sex": rng.choice(["F", "M"], n),
            "smoker": rng.integers(0, 2, n),
        }
    )


@pytest.fixture
def quiet_insecure() -> Iterator[None]:
    """Silences the InsecureOptionWarning of tests that use the seeded numpy sampler on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        yield
