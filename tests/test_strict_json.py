"""results.json and every other JSON privml writes are strict JSON: no NaN, no Infinity."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privml.artifacts import dumps_json, strict_json, write_json
from privml.config import load_config
from privml.pipeline import run


def _refuse(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def test_non_finite_numbers_become_null_and_numpy_becomes_json(tmp_path: Path) -> None:
    data = {
        "nan": math.nan,
        "inf": [math.inf, -math.inf, 1.5],
        "np": np.float32(0.25),
        "npnan": np.float64("nan"),
        "arr": np.array([1.0, np.inf]),
        "t": torch.tensor([2.0]),
        "tuple": (1, "a"),
        "path": tmp_path,
        7: True,
    }
    write_json(tmp_path / "x.json", data)
    back = json.loads((tmp_path / "x.json").read_text(), parse_constant=_refuse)
    assert back == {
        "nan": None,
        "inf": [None, None, 1.5],
        "np": 0.25,
        "npnan": None,
        "arr": [1.0, None],
        "t": [2.0],
        "tuple": [1, "a"],
        "path": str(tmp_path),
        "7": True,
    }
    assert strict_json({"a": [math.nan]}) == {"a": [None]}
    json.loads(dumps_json({"x": float("-inf")}), parse_constant=_refuse)


@pytest.mark.slow
def test_results_json_of_a_demo_run_is_strict(tmp_path: Path) -> None:
    cfg = load_config()
    cfg.inference.encrypted = False
    cfg.training.rounds = 2
    out = run(cfg, out_dir=tmp_path / "run")
    assert out.out_dir is not None
    json.loads((out.out_dir / "results.json").read_text(), parse_constant=_refuse)
