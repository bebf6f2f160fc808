"""The budget belongs to the records: attacks that try to get a fresh budget on the same data.

Each test runs privml as a user would (the command line, the default per-user ledger that
the suite's conftest points into a temporary ``$XDG_DATA_HOME``) and tries what finding 2 of
the privacy review did: copy the config, rename it, run from another folder, rename the site,
give the dataset another name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from privml.cli import main
from privml.config import load_config
from privml.data.federation import site_fingerprints
from privml.dp.cli import budget_report, ledger_from_config, run_query
from privml.errors import BudgetExceededError, DataError, UsageError
from tests.data.sites import patient_frame

DP_RUN = """
[data]
dataset = "breast_cancer"
[model]
kind = "logistic"
[training]
rounds = 2
local_epochs = 1
batch_size = 64
lr = 2.0
[privacy]
mode = "sample"
budget_epsilon = {budget}
[audit]
enabled = false
"""


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def _spent(config: Path) -> dict[str, float]:
    report = budget_report(load_config(config))
    return {s: v["spent_epsilon"] for s, v in report["sites"].items()}


def test_copied_renamed_and_relocated_configs_spend_one_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "a"
    a.mkdir()
    cfg = a / "dp.toml"
    cfg.write_text(DP_RUN.format(budget=2.5))
    monkeypatch.chdir(a)
    code, _, err = _cli(["run", "--config", str(cfg), "--out", str(tmp_path / "r1")], capsys)
    assert code == 0, err
    first = _spent(cfg)
    assert all(0.99 <= v <= 1.0 for v in first.values())
    # a copy under another name, run from another folder: the same records, the same budget
    b = tmp_path / "elsewhere"
    b.mkdir()
    copy = b / "dp2.toml"
    shutil.copy(cfg, copy)
    monkeypatch.chdir(b)
    code, _, err = _cli(["run", "--config", str(copy), "--out", str(tmp_path / "r2")], capsys)
    assert code == 0, err
    second = _spent(copy)
    assert second == _spent(cfg)
    assert all(second[s] == pytest.approx(2 * first[s], rel=1e-3) for s in first)
    assert not (a / "runs").exists() and not (b / "runs").exists()  # no ledger per folder
    # a third run (renamed again) would overspend 2.5: refused, exit 3, nothing spent
    third = tmp_path / "renamed.toml"
    shutil.copy(cfg, third)
    code, _, err = _cli(["run", "--config", str(third), "--out", str(tmp_path / "r3")], capsys)
    assert code == 3 and "budget" in err and "Nothing was spent" in err
    assert _spent(third) == second


def test_another_dataset_name_cannot_start_a_fresh_budget(tmp_path: Path) -> None:
    site = tmp_path / "h.csv"
    patient_frame(300, seed=1).to_csv(site, index=False)
    base = (
        '[data]\ntarget = "death"\npositive = "dead"\nname = "{name}"\n'
        '[[data.sites]]\nname = "{site}"\npath = "h.csv"\n'
        '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
        "[privacy]\nbudget_epsilon = 1.0\n"
    )
    one = tmp_path / "one.toml"
    one.write_text(base.format(name="heart", site="h"))
    run_query(load_config(one), site="h", query="mean(age)", epsilon=0.6)
    two = tmp_path / "two.toml"
    two.write_text(base.format(name="cardio", site="h"))
    with pytest.raises(UsageError, match="already budgeted under dataset id 'heart'"):
        run_query(load_config(two), site="h", query="mean(age)", epsilon=0.6)
    # the same file under another site name and no dataset name: still the same records
    three = tmp_path / "three.toml"
    three.write_text(base.format(name="heart", site="h").replace('name = "heart"\n', ""))
    text = three.read_text().replace('name = "h"', 'name = "renamed"')
    three.write_text(text)
    with pytest.raises(BudgetExceededError, match="only 0.4 of 1 remains"):
        run_query(load_config(three), site="renamed", query="mean(age)", epsilon=0.6)


def test_a_changed_file_under_a_dataset_id_keeps_its_spend(tmp_path: Path) -> None:
    site = tmp_path / "h.csv"
    df = patient_frame(300, seed=2)
    df.to_csv(site, index=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[data]\ntarget = "death"\npositive = "dead"\nname = "heart"\n'
        '[[data.sites]]\nname = "h"\npath = "h.csv"\n'
        '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
        "[privacy]\nbudget_epsilon = 1.0\n"
    )
    run_query(load_config(cfg), site="h", query="mean(age)", epsilon=0.7)
    pd.concat([df, patient_frame(5, seed=99)]).to_csv(site, index=False)  # records added
    with pytest.warns(UserWarning, match="data changed"), pytest.raises(BudgetExceededError):
        run_query(load_config(cfg), site="h", query="mean(age)", epsilon=0.7)
    assert budget_report(load_config(cfg))["sites"]["h"]["spent_epsilon"] == pytest.approx(0.7)
    # without a dataset id, a changed file is new data: documented, and visible here
    cfg.write_text(cfg.read_text().replace('name = "heart"\n', ""))
    df.iloc[:-1].to_csv(site, index=False)
    out = run_query(load_config(cfg), site="h", query="mean(age)", epsilon=0.7)
    assert out["remaining_epsilon"] == pytest.approx(0.3)


def test_a_query_whose_data_does_not_parse_is_not_charged(tmp_path: Path) -> None:
    site = tmp_path / "h.csv"
    df = patient_frame(50, seed=3).astype({"age": object})
    df.loc[7, "age"] = "forty"
    df.to_csv(site, index=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[data]\ntarget = "death"\npositive = "dead"\n'
        '[[data.sites]]\nname = "h"\npath = "h.csv"\n'
        '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
        "[privacy]\nbudget_epsilon = 1.0\n"
    )
    config = load_config(cfg)
    with pytest.raises(DataError, match="column 'age'.*'forty'.*row.* 8.*nothing was charged"):
        run_query(config, site="h", query="mean(age)", epsilon=0.5)
    assert ledger_from_config(config).status("h").charges == 0


@pytest.mark.slow
def test_a_fresh_ledger_admits_five_default_dp_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "dp.toml"
    cfg.write_text(DP_RUN.replace("budget_epsilon = {budget}\n", ""))  # every default
    for i in range(5):
        code, _, err = _cli(
            ["run", "--config", str(cfg), "--out", str(tmp_path / f"r{i}"), "--json"], capsys
        )
        assert code == 0, err
    spent = budget_report(load_config(cfg))
    assert all(s["charges"] > 0 and s["remaining_epsilon"] >= 4.9 for s in spent["sites"].values())
    text = (tmp_path / "r4" / "results.json").read_text()
    res: dict[str, Any] = json.loads(text)
    assert res["privacy"]["epsilon"] <= 1.0 and res["privacy"]["delta"] == 1e-5
    # the fingerprints (hashes of the private records) stay in the ledger, unpublished
    for fp in site_fingerprints(load_config(cfg)).values():
        assert fp[7:] not in text
