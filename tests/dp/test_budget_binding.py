"""The budget belongs to the records: attacks that try to get a fresh budget on the same data.

Each test runs privml as a user would (the command line or its functions, the default per-user
ledger that the suite's conftest points into a temporary ``$XDG_DATA_HOME``) and tries to
spend the same records twice: copy, rename or relocate the config, rename the site or the
dataset, raise the budget in a copied config, and change the file -- append a dummy record,
shuffle, remove or duplicate a row, edit one cell, split a site's file into two sites, merge
two sites. Then the ledger file without its key is searched for guessed records.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from privml.cli import main
from privml.config import load_config
from privml.data.federation import site_fingerprints
from privml.data.records import record_hashes
from privml.dp import ledger as ledger_module
from privml.dp.cli import budget_report, ledger_from_config, run_query
from privml.dp.ledger import PrivacyLedger, default_ledger_path, key_path
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


def test_a_copied_config_with_a_higher_budget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The budget is the ledger's: raising budget_epsilon in a copy of the config gets an
    error naming `privml budget set` before any data is read; the set command is the way."""
    cfg = tmp_path / "dp.toml"
    cfg.write_text(DP_RUN.format(budget=2.5))
    code, _, err = _cli(["run", "--config", str(cfg), "--out", str(tmp_path / "r1")], capsys)
    assert code == 0, err
    spent = _spent(cfg)
    greedy = tmp_path / "greedy.toml"
    greedy.write_text(DP_RUN.format(budget=100))

    def no_data(*_: Any, **__: Any) -> None:
        raise AssertionError("the data was read before the budget was checked")

    with monkeypatch.context() as m:
        m.setattr("privml.pipeline.load_federation", no_data)
        code, _, err = _cli(
            ["run", "--config", str(greedy), "--out", str(tmp_path / "r2")], capsys
        )
        assert code == 2 and "privml budget set" in err and "budget_epsilon = 100" in err
        assert not (tmp_path / "r2").exists()
        q = tmp_path / "q.toml"  # the query path refuses before reading data too
        q.write_text(DP_RUN.format(budget=100).replace('mode = "sample"\n', ""))
        code, _, err = _cli(["budget", "--config", str(q)], capsys)
        assert code == 2 and "privml budget set" in err
    assert _spent(cfg) == spent  # nothing spent
    # no budget line at all: the ledger's budget applies
    plain = tmp_path / "plain.toml"
    plain.write_text(DP_RUN.replace("budget_epsilon = {budget}\n", ""))
    assert budget_report(load_config(plain))["budget_epsilon"] == 2.5
    # the deliberate way, recorded with time and old and new values
    code, out, err = _cli(["budget", "set", "--config", str(greedy), "--epsilon", "4",
                           "--reason", "second study approved"], capsys)  # fmt: skip
    assert code == 0, err
    assert "was epsilon = 2.5" in out
    report = budget_report(load_config(plain))
    assert report["budget_epsilon"] == 4.0
    change = report["budget_history"][-1]
    assert (change["old_epsilon"], change["epsilon"]) == (2.5, 4.0)
    assert change["reason"] == "second study approved" and change["created_at"]
    code, _, err = _cli(["run", "--config", str(cfg), "--out", str(tmp_path / "r3")], capsys)
    assert code == 2 and "epsilon = 4" in err  # the old copy with 2.5 is now the odd one


# ----------------------------------------------------------------------------- changed files

QUERY = (
    '[data]\ntarget = "death"\npositive = "dead"\n{extra}{sites}'
    '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
    "[privacy]\nbudget_epsilon = 1.0\n"
)


def _config(folder: Path, sites: dict[str, pd.DataFrame], *, extra: str = "") -> Path:
    """A config over one CSV per site (written to ``folder``)."""
    text = ""
    for name, df in sites.items():
        df.to_csv(folder / f"{name}.csv", index=False)
        text += f'[[data.sites]]\nname = "{name}"\npath = "{name}.csv"\n'
    cfg = folder / f"c{len(list(folder.glob('c*.toml')))}.toml"
    cfg.write_text(QUERY.format(extra=extra, sites=text))
    return cfg


def _query(cfg: Path, site: str, epsilon: float) -> dict[str, Any]:
    return run_query(load_config(cfg), site=site, query="mean(age)", epsilon=epsilon)


def _edit(df: pd.DataFrame, how: str) -> pd.DataFrame:
    if how == "append a dummy record":
        dummy = df.iloc[[0]].assign(age=33.0, chol="123.4", sex="M")
        return pd.concat([df, dummy], ignore_index=True)
    if how == "shuffle the rows":
        return df.sample(frac=1.0, random_state=1).reset_index(drop=True)
    if how == "remove one record":
        return df.drop(index=7).reset_index(drop=True)
    if how == "duplicate a row":
        return pd.concat([df, df.iloc[[3]]], ignore_index=True)
    if how == "change one cell":
        out = df.copy()
        out.loc[0, "age"] = 21.0 if out.loc[0, "age"] != 21.0 else 22.0
        return out
    if how == "reorder and rename nothing":
        return df[list(reversed(df.columns))]
    raise AssertionError(how)


EDITS = [
    "append a dummy record",
    "shuffle the rows",
    "remove one record",
    "duplicate a row",
    "change one cell",
    "reorder and rename nothing",
]


@pytest.mark.parametrize("how", EDITS)
def test_a_changed_file_gives_no_fresh_budget_to_its_unchanged_records(
    tmp_path: Path, how: str
) -> None:
    df = patient_frame(200, seed=2)
    cfg = _config(tmp_path, {"h": df})
    _query(cfg, "h", 0.7)
    _config(tmp_path, {"h": _edit(df, how)})  # overwrite the site's file
    with pytest.raises(BudgetExceededError, match="only 0.3 of 1 remains"):
        _query(cfg, "h", 0.7)  # refused, nothing spent
    assert _query(cfg, "h", 0.3)["remaining_epsilon"] == pytest.approx(0.0, abs=1e-12)
    # and the records of the original file have spent it all, whichever file holds them
    _config(tmp_path, {"h": df})
    with pytest.raises(BudgetExceededError):
        _query(cfg, "h", 0.01)


def test_an_edited_or_new_record_is_new_to_the_ledger(tmp_path: Path) -> None:
    """What a changed file cannot protect: a record whose content changed is a new record
    (documented); only it starts at zero, never the records around it."""
    df = patient_frame(50, seed=4)
    cfg = _config(tmp_path, {"h": df})
    _query(cfg, "h", 0.9)
    edited = _edit(df, "change one cell")
    _config(tmp_path, {"h": edited.iloc[[0]]})  # the edited record alone
    assert _query(cfg, "h", 0.9)["remaining_epsilon"] == pytest.approx(0.1)
    _config(tmp_path, {"h": df.iloc[[0]]})  # its original version alone
    with pytest.raises(BudgetExceededError):
        _query(cfg, "h", 0.2)


def test_splitting_or_merging_sites_gives_no_fresh_budget(tmp_path: Path) -> None:
    one, two = patient_frame(120, seed=5), patient_frame(80, seed=6)
    whole = _config(tmp_path, {"h": one})
    _query(whole, "h", 0.7)
    split = _config(tmp_path / "." , {"h_east": one.iloc[:60], "h_west": one.iloc[60:]})
    for site in ("h_east", "h_west"):
        with pytest.raises(BudgetExceededError, match="only 0.3 of 1 remains"):
            _query(split, site, 0.7)
    # two sites charged apart, then merged into one file: each record keeps its spend
    apart = _config(tmp_path, {"g": two})
    _query(apart, "g", 0.5)
    merged = _config(tmp_path, {"m": pd.concat([one, two], ignore_index=True)})
    with pytest.raises(BudgetExceededError, match="only 0.3 of 1 remains"):
        _query(merged, "m", 0.4)  # one's records have 0.7, two's 0.5
    _query(merged, "m", 0.3)
    report = budget_report(load_config(apart))
    assert report["sites"]["g"]["spent_epsilon"] == pytest.approx(0.8)


def test_another_dataset_or_site_name_cannot_start_a_fresh_budget(tmp_path: Path) -> None:
    df = patient_frame(300, seed=1)
    one = _config(tmp_path, {"h": df}, extra='name = "heart"\n')
    _query(one, "h", 0.6)
    two = _config(tmp_path, {"renamed": df}, extra='name = "cardio"\n')
    with pytest.raises(BudgetExceededError, match="only 0.4 of 1 remains"):
        _query(two, "renamed", 0.6)


# ----------------------------------------------------------------------------- the key


def _ledger_bytes(path: Path) -> bytes:
    data = b""
    for p in (path, path.with_name(path.name + "-wal")):
        if p.exists():
            data += p.read_bytes()
    return data


def test_the_ledger_file_alone_does_not_confirm_a_guessed_record(tmp_path: Path) -> None:
    """Low-entropy records (age, sex, outcome: 280 possibilities) are easy to enumerate. An
    adversary with the ledger file but not its key finds none of their hashes in it; with
    the key the same search finds them (the test is not vacuous)."""
    rng = np.random.default_rng(3)
    df = pd.DataFrame(
        {
            "age": rng.integers(20, 90, 40).astype(float),
            "sex": rng.choice(["F", "M"], 40),
            "death": rng.choice(["alive", "dead"], 40),
        }
    )
    cfg = _config(tmp_path, {"h": df})
    _query(cfg, "h", 0.2)
    path = default_ledger_path()
    guesses = pd.DataFrame(
        [(float(a), s, d) for a in range(20, 90) for s in "FM" for d in ("alive", "dead")],
        columns=["age", "sex", "death"],
    )
    plain = record_hashes(guesses)
    blob = _ledger_bytes(path)
    stored = {
        r[0] for r in sqlite3.connect(path).execute("SELECT record FROM records").fetchall()
    }
    assert len(stored) == len(df.drop_duplicates())
    for h in plain:
        for raw in (h.astype("<u8").tobytes(), h.astype(">u8").tobytes()):
            assert raw not in blob
        assert int(h.astype(np.int64)) not in stored
    assert site_fingerprints(load_config(cfg))["h"][7:].encode() not in blob
    # with the key, the guesses that are records are confirmed
    key = key_path(path).read_bytes()
    keyed = ledger_module._keyed_records(plain, ledger_module._subkey(key, "records"))
    truth = set(record_hashes(df).astype(np.int64).tolist())
    found = [int(k) in stored for k in keyed]
    assert sum(found) == len(truth) > 0
    assert oct(key_path(path).stat().st_mode & 0o777) == "0o600"


def test_a_lost_or_loose_key_is_refused(tmp_path: Path) -> None:
    df = patient_frame(30, seed=8)
    cfg = _config(tmp_path, {"h": df})
    _query(cfg, "h", 0.2)
    kp = key_path(default_ledger_path())
    kp.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        _query(cfg, "h", 0.2)
    kp.chmod(0o600)
    kp.rename(kp.with_suffix(".bak"))  # lost: a fresh key would make every record new
    with pytest.raises(UsageError, match="key .* is missing"):
        _query(cfg, "h", 0.2)
    assert not kp.exists()  # and no new key was made in its place
    PrivacyLedger(tmp_path / "other.sqlite", dataset="d")  # another ledger's key
    kp.write_bytes((tmp_path / "other.sqlite.key").read_bytes())
    kp.chmod(0o600)
    with pytest.raises(UsageError, match="does not belong"):
        _query(cfg, "h", 0.2)
    kp.with_suffix(".bak").replace(kp)
    assert _query(cfg, "h", 0.2)["remaining_epsilon"] == pytest.approx(0.6)


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
