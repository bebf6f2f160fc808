"""The ``privml dp`` sub-app and the query / budget command functions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from privml.dp import cli
from privml.dp.accounting import compute_epsilon
from privml.dp.ledger import default_ledger_path
from privml.errors import BudgetExceededError, ConfigError, SchemaError, UsageError

runner = CliRunner()


def test_epsilon_command_json_matches_the_accountant() -> None:
    args = ["epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "4", "--steps", "10000"]
    result = runner.invoke(cli.dp_app, [*args, "--delta", "1e-5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"epsilon", "delta", "accountant", "relation"}
    assert out["accountant"] == "pld" and out["delta"] == 1e-5
    assert out["epsilon"] == pytest.approx(0.947, abs=5e-3)
    rdp = runner.invoke(cli.dp_app, [*args, "--delta", "1e-5", "--accountant", "rdp"])
    assert rdp.exit_code == 0 and "RDP accountant" in rdp.stdout and "epsilon = 1.035" in rdp.stdout


def test_noise_command_calibrates_below_the_target() -> None:
    args = ["noise", "--sampling-rate", "0.01", "--steps", "1000", "--epsilon", "1"]
    result = runner.invoke(cli.dp_app, [*args, "--delta", "1e-5", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    eps = compute_epsilon(
        delta=1e-5, sampling_rate=0.01, noise_multiplier=out["noise_multiplier"], steps=1000
    )
    assert 0.99 <= eps <= 1 and out["epsilon"] == pytest.approx(eps)
    text = runner.invoke(cli.dp_app, [*args, "--delta", "1e-5", "--accountant", "rdp"])
    assert text.exit_code == 0 and text.stdout.startswith("noise multiplier = ")


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (["--sampling-rate", "2"], UsageError, "'sampling_rate'"),
        (["--delta", "0"], UsageError, "'delta'"),
        (["--accountant", "moments"], UsageError, "--accountant must be 'pld' or 'rdp'"),
        (["--noise-multiplier", "-1"], UsageError, "'noise_multiplier'"),
    ],
)
def test_invalid_cli_values_raise_usage_errors(args: list[str], error: type, match: str) -> None:
    base = {
        "--sampling-rate": "0.01",
        "--noise-multiplier": "1.0",
        "--steps": "10",
        "--delta": "1e-5",
    }
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    flat = [x for kv in base.items() for x in kv]
    result = runner.invoke(cli.dp_app, ["epsilon", *flat])
    assert isinstance(result.exception, error)
    assert match in str(result.exception)


def test_non_numeric_cli_value_is_a_usage_error() -> None:
    result = runner.invoke(
        cli.dp_app,
        [
            "epsilon",
            "--sampling-rate",
            "x",
            "--noise-multiplier",
            "1",
            "--steps",
            "3",
            "--delta",
            "1e-5",
        ],
    )
    assert result.exit_code == 2  # click's own usage error


# ----------------------------------------------------------------------------- config functions


def _config(tmp_path: Path, *, ledger: Path | None = None, budget: float = 1.0) -> Any:
    schema = {
        "age": SimpleNamespace(type="numeric", min=0.0, max=100.0, values=None),
        "sex": SimpleNamespace(type="categorical", min=None, max=None, values=["F", "M"]),
        "income": SimpleNamespace(type="numeric", min=None, max=None, values=None),
    }
    return SimpleNamespace(
        dataset_id="heart",
        privacy=SimpleNamespace(budget_epsilon=budget, budget_delta=1e-6, ledger=ledger),
        data=SimpleNamespace(schema=schema, sites=["a", "b"]),
    )


def _frames(config: Any) -> dict[str, pd.DataFrame]:
    a = pd.DataFrame({"age": [20.0, 40.0, 60.0] * 100, "sex": ["F", "M", "F"] * 100})
    b = pd.DataFrame({"age": [30.0, 50.0] * 25, "sex": ["M", "F"] * 25})
    return {"a": a, "b": b, "c": a.iloc[:2]}


def test_run_query_returns_the_documented_fields(tmp_path: Path) -> None:
    config = _config(tmp_path, ledger=tmp_path / "l.sqlite")
    out = cli.run_query(config, site="a", query="mean(age)", epsilon=0.25, load_frames=_frames)
    assert set(out) == {"query", "site", "value", "epsilon", "delta", "remaining_epsilon"}
    assert out["query"] == "mean(age)" and out["site"] == "a"
    assert out["epsilon"] == 0.25 and out["delta"] == 0.0
    assert out["remaining_epsilon"] == pytest.approx(0.75)
    assert 0 <= out["value"] <= 100
    json.dumps(out)  # JSON-able
    hist = cli.run_query(
        config, site="a", query="histogram(sex) ", epsilon=0.25, delta=1e-7, load_frames=_frames
    )
    assert set(hist["value"]) == {"F", "M"} and hist["delta"] == 1e-7
    text = cli.format_query_result(hist)
    assert "histogram(sex) at site 'a'" in text and "remaining epsilon = 0.5" in text


def test_run_query_errors(tmp_path: Path) -> None:
    config = _config(tmp_path, ledger=tmp_path / "l.sqlite", budget=0.3)
    with pytest.raises(UsageError, match="Unknown site 'd'. Sites in this config: a, b, c"):
        cli.run_query(config, site="d", query="count()", epsilon=0.1, load_frames=_frames)
    with pytest.raises(SchemaError, match=r"\[data.schema.income\]"):
        cli.run_query(config, site="a", query="mean(income)", epsilon=0.1, load_frames=_frames)
    with pytest.raises(UsageError, match="Cannot parse query"):
        cli.run_query(config, site="a", query="drop(age)", epsilon=0.1, load_frames=_frames)
    cli.run_query(config, site="a", query="count()", epsilon=0.2, load_frames=_frames)
    with pytest.raises(BudgetExceededError) as info:
        cli.run_query(config, site="a", query="count()", epsilon=0.2, load_frames=_frames)
    assert info.value.exit_code == 3 and "remains" in str(info.value)
    broken = SimpleNamespace(dataset_id="", privacy=SimpleNamespace(budget_epsilon=None), data=None)
    with pytest.raises(ConfigError, match="dataset_id is not set"):
        cli.run_query(broken, site="a", query="count()", epsilon=0.1, load_frames=_frames)


def test_default_ledger_is_the_users_whatever_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_home = tmp_path / "data-home"
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    config = _config(tmp_path, ledger=None)
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        cli.run_query(config, site="b", query="count()", epsilon=0.1, load_frames=_frames)
        assert not (tmp_path / folder / "runs").exists()
    expected = data_home / "privml" / "privacy-ledger.sqlite"
    frames = _frames(config)
    ledger = cli.ledger_from_config(
        config, fingerprints=cli._fingerprints(frames), records=cli._record_hashes(frames)
    )
    assert ledger.path == expected and os.path.exists(expected)
    assert ledger.status("b").spent.epsilon == pytest.approx(0.2)  # both folders, one budget
    monkeypatch.setenv("XDG_DATA_HOME", "relative/path")  # ignored, as the XDG spec says
    assert default_ledger_path() == Path.home() / ".local/share/privml/privacy-ledger.sqlite"


def test_budget_report(tmp_path: Path) -> None:
    config = _config(tmp_path, ledger=tmp_path / "l.sqlite")
    cli.run_query(config, site="a", query="mean(age) by sex", epsilon=0.3, load_frames=_frames)
    cli.run_query(config, site="a", query="count()", epsilon=0.2, load_frames=_frames)
    report = cli.budget_report(config, load_frames=_frames)
    assert report["dataset"] == "heart" and report["budget_epsilon"] == 1.0
    assert report["relation"] == "replace_one"
    assert set(report["sites"]) == {"a", "b", "c"}  # configured sites, even without charges
    assert report["sites"]["a"]["spent_epsilon"] == pytest.approx(0.5)
    assert report["sites"]["a"]["remaining_epsilon"] == pytest.approx(0.5)
    assert report["sites"]["a"]["records"] == 3  # 300 rows, 3 distinct records
    assert report["sites"]["b"]["charges"] == 0
    # c holds two of a's records: their spend is a's, whichever site name reads them
    assert report["sites"]["c"]["spent_epsilon"] == pytest.approx(0.5)
    assert [h["label"] for h in report["history"]] == ["mean(age) by sex", "count()"]
    assert {h["relation"] for h in report["history"]} == {"replace_one"}
    assert report["budget_history"][0]["epsilon"] == 1.0
    json.dumps(report)
    text = cli.format_budget_report(report)
    assert "mean(age) by sex" in text and "spent eps" in text and "replace-one" in text


def test_dp_epsilon_recomputes_replace_one() -> None:
    runner = CliRunner()
    args = ["epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "2", "--steps", "50",
            "--delta", "1e-5", "--json"]  # fmt: skip
    add = json.loads(runner.invoke(cli.dp_app, args).stdout)
    rep = json.loads(runner.invoke(cli.dp_app, [*args, "--relation", "replace_one"]).stdout)
    assert rep["relation"] == "replace_one" and add["relation"] == "add_or_remove"
    assert rep["epsilon"] == pytest.approx(
        compute_epsilon(delta=1e-5, sampling_rate=0.1, noise_multiplier=2.0, steps=50,
                        neighboring_relation="replace")
    ) and rep["epsilon"] > 1.3 * add["epsilon"]  # fmt: skip
    bad = runner.invoke(cli.dp_app, [*args, "--relation", "swap"])
    assert bad.exit_code != 0
