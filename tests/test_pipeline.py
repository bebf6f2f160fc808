"""One run end to end: results.json, model.pt and model.json, written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import privml.pipeline as pipeline
from privml.artifacts import atomic_folder, load_model
from privml.config import load_config, parse_config
from privml.data import datasets
from privml.errors import DataError, SignatureError
from privml.fl.metrics import predict_scores


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _demo(**training: Any) -> Any:
    """The embedded demo without its report and encrypted-inference check (tested elsewhere)."""
    cfg = load_config(None)
    cfg.output.html = False
    cfg.inference.encrypted = False
    for k, v in training.items():
        setattr(cfg.training, k, v)
    return cfg


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> pipeline.RunOutput:
    out = tmp_path_factory.mktemp("runs") / "demo"
    return pipeline.run(_demo(), out_dir=out)


def test_demo_run_writes_the_documented_results(demo_run: pipeline.RunOutput) -> None:
    assert demo_run.out_dir is not None
    files = {p.name for p in demo_run.out_dir.iterdir()}
    assert {"model.json", "model.pt", "results.json"} <= files  # (+ model.sig)
    res = json.loads((demo_run.out_dir / "results.json").read_text())
    assert res == json.loads(json.dumps(demo_run.results, default=str))
    assert res["schema"] == "privml-results/1"
    assert [s["name"] for s in res["sites"]] == ["hospital_a", "hospital_b", "hospital_c"]
    assert sum(s["n_train"] + s["n_test"] for s in res["sites"]) == 569
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 21))
    for r in rounds:
        assert {"round", "loss", "accuracy", "auc"} <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["auc"] <= 1 and r["loss"] > 0
    m = res["metrics"]
    assert {"accuracy", "auc", "f1", "per_site", "loss", "n"} <= set(m)
    assert m["n"] == sum(s["n_test"] for s in res["sites"])
    assert set(m["per_site"]) == {s["name"] for s in res["sites"]}
    assert m["accuracy"] >= 0.95  # the bar for the demo
    assert res["privacy"] == {"mode": "none"}
    assert res["config"] == _demo().resolved()  # the resolved config, defaults filled in
    assert res["config"]["training"]["rounds"] == 20
    assert res["task"] == {
        "kind": "binary",
        "target": "diagnosis",
        "classes": ["benign", "malignant"],
    }
    assert res["schema_inferred_from_data"] == []
    assert len(res["config_hash"]) == 64


def test_model_round_trips_through_model_json(demo_run: pipeline.RunOutput) -> None:
    assert demo_run.out_dir is not None
    model, spec, enc, task, meta = load_model(demo_run.out_dir)
    assert spec == demo_run.training.spec
    assert task == demo_run.data.task
    assert meta["config_hash"] == demo_run.results["config_hash"]
    assert enc.feature_names == demo_run.data.encoder.feature_names
    # the loaded encoder and model reproduce the run's predictions from raw records
    raw = datasets.breast_cancer().frame.iloc[:50]
    X = enc.transform(raw)
    np.testing.assert_array_equal(X, demo_run.data.encoder.transform(raw))
    with torch.no_grad():
        loaded = torch.sigmoid(model(torch.from_numpy(X))[:, 0]).numpy()
    expected = predict_scores(demo_run.training.model, demo_run.training.params, X)
    np.testing.assert_allclose(loaded, expected, atol=1e-6)


def test_tampered_weights_are_refused(demo_run: pipeline.RunOutput, tmp_path: Path) -> None:
    assert demo_run.out_dir is not None
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in demo_run.out_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    state = torch.load(copy / "model.pt", weights_only=True)
    key = next(iter(state))
    state[key] = state[key] + 0.01
    torch.save(state, copy / "model.pt")
    with pytest.raises(SignatureError, match="changed after signing"):
        load_model(copy)  # the signature is checked first
    # a folder re-signed by the deployment (privml sign) still has its own consistency checks
    from privml.signing import sign_model_dir

    sign_model_dir(copy)
    with pytest.raises(DataError, match="does not match the weights_sha256"):
        load_model(copy)
    # weights consistent with a tampered hash but not with the architecture
    meta = json.loads((copy / "model.json").read_text())
    from privml.artifacts import sha256_file

    meta["weights_sha256"] = sha256_file(copy / "model.pt")
    meta["architecture"]["n_features"] = 29
    (copy / "model.json").write_text(json.dumps(meta))
    sign_model_dir(copy)
    with pytest.raises(DataError, match="do not fit together"):
        load_model(copy)
    (copy / "model.pt").unlink()
    with pytest.raises(DataError, match="not found"):
        load_model(copy)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failing_run_leaves_the_earlier_folder_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    cfg = _demo(rounds=2)
    pipeline.run(cfg, out_dir=out)
    before = _snapshot(out)

    real_write_json = pipeline.write_json

    def write_then_fail(path: Path, data: Any) -> None:
        real_write_json(path, data)  # half of the new folder exists when the failure hits
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_json", write_then_fail)
    with pytest.raises(OSError, match="No space left"):
        pipeline.run(_demo(rounds=3), out_dir=out, force=True)
    assert _snapshot(out) == before
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_a_successful_rerun_replaces_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = pipeline.run(_demo(rounds=1), out_dir=out)
    second = pipeline.run(_demo(rounds=2), out_dir=out, force=True)
    res = json.loads((out / "results.json").read_text())
    assert len(res["rounds"]) == 2 and first.results["rounds"] != second.results["rounds"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_atomic_folder_with_nested_files(tmp_path: Path) -> None:
    final = tmp_path / "out"

    def fill(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")

    atomic_folder(final, fill)
    assert (final / "sub" / "a.txt").read_text() == "a"

    def broken(tmp: Path) -> None:
        (tmp / "b.txt").write_text("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_folder(final, broken, force=True)
    assert (final / "b.txt").read_text() == "b" and (final / "sub" / "a.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_runs_are_deterministic_for_a_seed() -> None:
    a = pipeline.run(_demo(rounds=3), write=False)
    b = pipeline.run(_demo(rounds=3), write=False)
    c = pipeline.run(_demo(rounds=3, seed=1), write=False)
    assert a.out_dir is None
    assert a.results["rounds"][-1]["loss"] == b.results["rounds"][-1]["loss"]
    assert a.results["metrics"] == b.results["metrics"]
    assert torch.equal(a.training.params, b.training.params)
    assert not torch.equal(a.training.params, c.training.params)


def test_inferred_schema_is_marked_in_results(tmp_path: Path) -> None:
    from tests.data.sites import write_sites

    paths = write_sites(tmp_path / "data", sizes=(60, 40))
    cfg = parse_config(
        {
            "data": {
                "target": "death",
                "positive": "dead",
                "sites": [{"name": f"s{i}", "path": str(p)} for i, p in enumerate(paths)],
            },
            "training": {"rounds": 2},
            "output": {"html": False},
        }
    )
    with pytest.warns(UserWarning, match="inferred from the private data"):
        out = pipeline.run(cfg, write=False)
    assert out.results["schema_inferred_from_data"] == ["age", "sex", "chol", "smoker"]
    assert any("inferred from the private data" in n for n in out.results["notes"])
