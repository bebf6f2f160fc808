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


HOG = {"bins": 6, "cell": 3, "stride": 1, "cell_eps": 0.05, "scale": 3.0}


def _digits_hog(hog: dict[str, object] | None) -> dict[str, object]:
    model: dict[str, object] = {"kind": "logistic", "features": "hog", "image_shape": [8, 8]}
    if hog is not None:
        model["hog"] = hog
    return {
        "data": {"dataset": "digits", "n_sites": 1, "partition": "iid"},
        "model": model,
        "training": {"rounds": 1, "local_epochs": 1},
        "audit": {"enabled": False},
        "output": {"html": False},
    }


def test_hog_settings_travel_into_the_saved_model_and_rebuild_it(tmp_path: Path) -> None:
    """[model.hog] reaches the map that trains, results.json and model.json; the map rebuilt
    from model.json with the saved head gives the run's own test accuracy."""
    import json

    import torch

    from privml.dp.features import HogFeatures
    from privml.models.nets import ModelSpec, build_model

    cfg = parse_config(_digits_hog(HOG))
    out = run(cfg, out_dir=tmp_path / "run")
    assert out.out_dir is not None
    meta = json.loads((out.out_dir / "model.json").read_text())
    fmap_record = meta["feature_map"]
    assert {k: fmap_record[k] for k in HOG} == HOG and fmap_record["center"] is not None
    assert json.loads((out.out_dir / "results.json").read_text())["features"] == fmap_record
    fmap = HogFeatures.from_dict(fmap_record)
    assert fmap.n_features == 6 * 6 * 6  # 6 bins x (8 - 3 + 1)^2 cells: not the default 128
    spec = ModelSpec.from_dict(meta["architecture"])
    assert spec.n_features == fmap.n_features
    head = build_model(spec)
    head.load_state_dict(torch.load(out.out_dir / "model.pt", weights_only=True))
    X, y = out.data.pooled_test()
    with torch.no_grad():
        pred = head(torch.from_numpy(fmap.transform(X))).argmax(1).numpy()
    assert float((pred == y).mean()) == pytest.approx(out.results["metrics"]["accuracy"])
    # the loaders still refuse a feature-map model for prediction
    with pytest.raises(DataError, match="feature map"):
        load_model(out.out_dir)


def test_default_hog_table_keeps_the_config_hash() -> None:
    plain = parse_config(_digits_hog(None))
    assert "hog" not in plain.resolved()["model"]
    defaults = {"bins": 8, "cell": 2, "stride": 2, "cell_eps": 0.01, "scale": 4.0}
    assert parse_config(_digits_hog(defaults)).config_hash() == plain.config_hash()
    assert parse_config(_digits_hog({"bins": 12})).config_hash() != plain.config_hash()
    assert parse_config(_digits_hog({"bins": 12})).resolved()["model"]["hog"]["bins"] == 12


@pytest.mark.parametrize(
    ("hog", "features", "expected"),
    [
        ({"bins": 1}, "hog", "model.hog.bins"),
        ({"cell": 9}, "hog", "hog.cell (9) is larger than the 8x8 image"),
        ({"stride": 0}, "hog", "model.hog.stride"),
        ({"cell_eps": 0}, "hog", "model.hog.cell_eps"),
        ({"scale": -1.0}, "hog", "model.hog.scale"),
        ({"bins": 2.5}, "hog", "model.hog.bins: must be a whole number"),
        ({"bin": 8}, "hog", "model.hog.bin: unknown key"),
        ({"bins": 12}, "none", 'only features = "hog" uses'),
    ],
)
def test_bad_hog_setting_is_refused_with_exit_2(
    hog: dict[str, object],
    features: str,
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from privml.cli import main

    def toml(v: object) -> str:
        return repr(v) if not isinstance(v, str) else f'"{v}"'

    config = tmp_path / "c.toml"
    config.write_text(
        '[data]\ndataset = "digits"\nn_sites = 1\n\n'
        f'[model]\nkind = "logistic"\nfeatures = "{features}"\nimage_shape = [8, 8]\n\n'
        "[model.hog]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in hog.items())
    )
    code = 0
    try:
        main(["run", "--config", str(config), "--out", str(tmp_path / "out")])
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
