"""A model trained on a fixed feature map is saved for the record but not loaded for prediction."""

from __future__ import annotations

from pathlib import Path

import pytest

from privml.artifacts import load_model
from privml.config import parse_config
from privml.errors import DataError
from privml.pipeline import run


def test_hog_model_is_recorded_and_refused_by_loaders(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "data": {"dataset": "digits", "n_sites": 1, "partition": "iid"},
            "model": {"kind": "logistic", "features": "hog", "image_shape": [8, 8]},
            "training": {"rounds": 1, "local_epochs": 1},
            "audit": {"enabled": False},
            "output": {"html": False},
        }
    )
    out = run(cfg, out_dir=tmp_path / "run")
    assert out.out_dir is not None
    meta = (out.out_dir / "model.json").read_text()
    assert '"feature_map"' in meta and '"hog"' in meta
    with pytest.raises(DataError, match="feature map"):
        load_model(out.out_dir)
