"""The documented Python API: privml.run on a path, a dict or a Config; privml.load_run;
typed results with pandas tables; load_config(dict) and --set style overrides; and the
README's notebook example, executed as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import privml
from privml.config import load_config
from privml.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data": {"dataset": "breast_cancer", "n_sites": 3, "partition": "hospitals"},
    "training": {"rounds": 3},
    "inference": {"encrypted": False},
    "audit": {"enabled": False},
}


def test_run_dict_path_and_config_agree(tmp_path: Path) -> None:
    a = privml.run(SMALL, write=False)
    toml = tmp_path / "study.toml"
    toml.write_text(
        '[data]\ndataset = "breast_cancer"\nn_sites = 3\npartition = "hospitals"\n'
        "[training]\nrounds = 3\n[inference]\nencrypted = false\n[audit]\nenabled = false\n"
    )
    b = privml.run(toml, out_dir=tmp_path / "run")
    c = privml.run(privml.load_config(SMALL), write=False)
    assert a.metrics.pooled == b.metrics.pooled == c.metrics.pooled
    assert a.out_dir is None and b.out_dir == tmp_path / "run"
    loaded = privml.load_run(tmp_path / "run")
    assert loaded.metrics == b.metrics and loaded.rounds == b.rounds
    assert isinstance(loaded.metrics.pooled.balanced_accuracy, float)


def test_to_frame_tables() -> None:
    r = privml.run(SMALL, write=False)
    sites = r.to_frame()
    assert list(sites.index) == ["hospital_a", "hospital_b", "hospital_c", "pooled"]
    assert sites.loc["pooled", "n_test"] == sum(s.n_test for s in r.sites)
    for col in ("accuracy", "balanced_accuracy", "auc", "f1", "prevalence", "majority_baseline"):
        assert sites[col].notna().all(), col
    rounds = r.to_frame("rounds")
    assert set(rounds["site"]) == {"pooled", "hospital_a", "hospital_b", "hospital_c"}
    assert sorted(set(rounds["round"])) == [1, 2, 3]
    wide = rounds.pivot(index="round", columns="site", values="auc")
    assert wide.shape == (3, 4)
    with pytest.raises(UsageError):
        r.to_frame("nope")  # type: ignore[arg-type]


def test_load_config_dict_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(SMALL, overrides=["training.rounds=7", "model.hidden=[8, 4]",
                                        "model.kind=mlp"])  # fmt: skip
    assert cfg.training.rounds == 7 and cfg.model.hidden == [8, 4] and cfg.model.kind == "mlp"
    assert cfg.overrides == ["training.rounds=7", "model.hidden=[8, 4]", "model.kind=mlp"]
    with pytest.raises(ConfigError, match="training.roundz: unknown key"):
        load_config(SMALL, overrides=["training.roundz=3"])
    for bad in ("training.rounds", "rounds=3", ".x=1"):
        with pytest.raises(UsageError, match="section.key=value"):
            load_config(SMALL, overrides=[bad])
    with pytest.raises(UsageError, match="not a table"):
        load_config(SMALL, overrides=["training.rounds.x=1"])
    with pytest.raises(ConfigError):
        load_config({"data": {}})


def test_load_run_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="results.json"):
        privml.load_run(tmp_path)
    (tmp_path / "results.json").write_text('{"schema": "privml-results/1", ')
    with pytest.raises(UsageError, match="not valid JSON"):
        privml.load_run(tmp_path)  # cut short
    (tmp_path / "results.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(UsageError, match="not a privml results.json"):
        privml.load_run(tmp_path)


@pytest.mark.slow
def test_readme_notebook_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    exec(compile(code.group(1), "README.md", "exec"), {})  # noqa: S102
    assert (tmp_path / "runs" / "notebook" / "report.html").is_file()
