"""The TOML config: strict keys, every problem at once, paths relative to the file, defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privml.config import Config, load_config, parse_config
from privml.errors import ConfigError

FIVE_LINES = """\
[data]
target = "death"
positive = "dead"
sites = [{name = "hospital_a", path = "a.csv"}, {name = "hospital_b", path = "sub/b.csv"}]
"""


def _write(folder: Path, text: str, name: str = "study.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def test_five_line_config_gets_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, FIVE_LINES))
    assert isinstance(cfg, Config)
    assert cfg.name == "study"
    assert cfg.data.target == "death" and cfg.data.positive == "dead"
    assert [s.name for s in cfg.data.sites or []] == ["hospital_a", "hospital_b"]
    assert cfg.model.kind == "logistic"
    assert cfg.training.rounds > 0 and cfg.training.local_epochs > 0
    assert cfg.training.batch_size > 0 and cfg.training.lr > 0
    assert cfg.privacy.mode == "none"
    assert cfg.data.schema == {}
    assert 0 < cfg.data.test_fraction < 1


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "project" / "configs"
    text = FIVE_LINES + '[privacy]\nledger = "ledger.json"\n[output]\ndir = "../runs/x"\n'
    _write(folder, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # a relative path to the config itself, from another working directory
    cfg = load_config(Path("..") / "project" / "configs" / "study.toml")
    sites = cfg.data.sites or []
    assert sites[0].path == (folder / "a.csv").resolve()
    assert sites[1].path == (folder / "sub" / "b.csv").resolve()
    assert cfg.privacy.ledger == (folder / "ledger.json").resolve()
    assert cfg.output.dir == (tmp_path / "project" / "runs" / "x").resolve()


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "data" / "a.csv"
    text = f'[data]\ntarget = "y"\nsites = [{{name = "a", path = "{target}"}}]\n'
    cfg = load_config(_write(tmp_path / "cfg", text))
    assert (cfg.data.sites or [])[0].path == target


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path, FIVE_LINES + "[training]\nrounds = 5\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "training.learning_rate: unknown key; remove it or check its spelling"
    ]
    assert "study.toml" in str(info.value)


@pytest.mark.parametrize("table", ["modle", "data.sites[0]"])
def test_unknown_keys_anywhere(tmp_path: Path, table: str) -> None:
    if table == "modle":
        text = FIVE_LINES + '[modle]\nkind = "mlp"\n'
    else:
        text = FIVE_LINES.replace('path = "a.csv"', 'path = "a.csv", weight = 2')
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert any(p.startswith(f"{table}") and "unknown key" in p for p in info.value.problems)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = FIVE_LINES + (
        '[model]\nkind = "forest"\n'
        "[training]\nrounds = 0\nlr = -1\nbatch = 3\n"
        "[data.schema.age]\ntype = \"numeric\"\nmin = 10\nmax = 5\n"
        '[data.schema.sex]\ntype = "categorical"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    problems = info.value.problems
    joined = "\n".join(problems)
    for where in (
        "model.kind",
        "training.rounds",
        "training.lr",
        "training.batch",
        "data.schema.age",
        "data.schema.sex",
    ):
        assert where in joined, (where, joined)
    assert len(problems) >= 6
    assert f"({len(problems)} problems)" in str(info.value)
    assert "(got 0)" in joined and "(got -1" in joined


@pytest.mark.parametrize("rounds", [0, -3])
def test_non_positive_rounds_are_refused(rounds: int) -> None:
    raw = {"data": {"dataset": "breast_cancer"}, "training": {"rounds": rounds}}
    with pytest.raises(ConfigError, match=rf"training\.rounds: .*greater than 0.*got {rounds}"):
        parse_config(raw)


def test_target_required_with_own_sites(tmp_path: Path) -> None:
    text = '[data]\nsites = [{name = "a", path = "a.csv"}]\n'
    with pytest.raises(ConfigError, match="data.target is required"):
        load_config(_write(tmp_path, text))


def test_sites_or_dataset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give the sites"):
        parse_config({"data": {"target": "y"}})
    with pytest.raises(ConfigError, match="not both"):
        parse_config(
            {
                "data": {
                    "target": "y",
                    "dataset": "digits",
                    "sites": [{"name": "a", "path": "a.csv"}],
                }
            }
        )


def test_duplicate_site_names(tmp_path: Path) -> None:
    sites = '[{name = "a", path = "1.csv"}, {name = "a", path = "2.csv"}]'
    text = f'[data]\ntarget = "y"\nsites = {sites}\n'
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(_write(tmp_path, text))


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = _write(tmp_path, "[data\ntarget = 1\n", name="bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(binary)


def test_embedded_demo_and_resolved_config() -> None:
    cfg = load_config(None)
    assert cfg.name == "demo" and cfg.data.dataset == "breast_cancer"
    resolved = cfg.resolved()
    json.dumps(resolved)  # plain JSON
    assert resolved["training"]["rounds"] == cfg.training.rounds
    assert "schema" in resolved["data"] and "source" not in resolved
    again = load_config(None)
    assert again.config_hash() == cfg.config_hash()
    again.training.rounds += 1
    assert again.config_hash() != cfg.config_hash()
