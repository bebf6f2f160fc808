"""The command line, as users meet it: bad input gets one clear message and exit code 2,
users' own CSV files train with five config lines, and `privml schema infer` output pastes
into a config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from privml.cli import main
from tests.data.sites import five_line_config, write_sites


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run ``privml ARGV`` in this process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- bad input: each case writes its sites and config, then the expected message -----------

Case = Callable[[Path], Path]


def _sites(tmp: Path) -> list[Path]:
    return write_sites(tmp, sizes=(60, 40, 30))


def _edit(path: Path, fn: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    fn(pd.read_csv(path, dtype=object, keep_default_na=False)).to_csv(path, index=False)


def missing_file(tmp: Path) -> Path:
    paths = _sites(tmp)
    paths[1].unlink()
    return five_line_config(tmp, paths)


def target_missing_in_one_site(tmp: Path) -> Path:
    paths = _sites(tmp)
    _edit(paths[1], lambda df: df.drop(columns="death"))
    return five_line_config(tmp, paths)


def extra_column_at_one_site(tmp: Path) -> Path:
    paths = _sites(tmp)
    _edit(paths[1], lambda df: df.assign(ward="x"))
    return five_line_config(tmp, paths)


def site_lacks_a_column(tmp: Path) -> Path:
    paths = _sites(tmp)
    _edit(paths[1], lambda df: df.drop(columns="sex"))
    return five_line_config(tmp, paths)


def schema_column_missing_from_files(tmp: Path) -> Path:
    extra = '[data.schema.bmi]\ntype = "numeric"\nmin = 10\nmax = 60\n'
    return five_line_config(tmp, _sites(tmp), extra)


def undeclared_column_with_strict_schema(tmp: Path) -> Path:
    extra = (
        "allow_inferred_schema = false\n"
        '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
        '[data.schema.sex]\ntype = "binary"\nvalues = ["F", "M"]\n'
        '[data.schema.smoker]\ntype = "categorical"\nvalues = ["never", "former", "current"]\n'
        "missing = true\n"
    )
    return five_line_config(tmp, _sites(tmp), extra)


def _text_in_age(tmp: Path) -> list[Path]:
    paths = _sites(tmp)

    def put(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[7, "age"] = "old"
        return df

    _edit(paths[1], put)
    return paths


def text_in_numeric_column(tmp: Path) -> Path:
    return five_line_config(tmp, _text_in_age(tmp))


def text_in_declared_numeric_column(tmp: Path) -> Path:
    extra = '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
    return five_line_config(tmp, _text_in_age(tmp), extra)


def third_label_value(tmp: Path) -> Path:
    paths = _sites(tmp)

    def put(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[3, "death"] = "unknown"
        return df

    _edit(paths[1], put)
    return five_line_config(tmp, paths)


def empty_site(tmp: Path) -> Path:
    paths = _sites(tmp)
    _edit(paths[1], lambda df: df.iloc[:0])
    return five_line_config(tmp, paths)


def zero_byte_site(tmp: Path) -> Path:
    paths = _sites(tmp)
    paths[1].write_bytes(b"")
    return five_line_config(tmp, paths)


def unknown_config_key(tmp: Path) -> Path:
    return five_line_config(tmp, _sites(tmp), "[training]\nrounds = 5\nlearning_rate = 0.1\n")


def zero_rounds(tmp: Path) -> Path:
    return five_line_config(tmp, _sites(tmp), "[training]\nrounds = 0\n")


def negative_rounds(tmp: Path) -> Path:
    return five_line_config(tmp, _sites(tmp), "[training]\nrounds = -3\n")


def missing_config(tmp: Path) -> Path:
    return tmp / "no_such_config.toml"


BAD_INPUT: dict[str, tuple[Case, list[str]]] = {
    "missing file": (missing_file, ["site 's1'", "site_1.csv' not found", "fix data.sites"]),
    "target missing in one site": (
        target_missing_in_one_site,
        ["site 's1': target column 'death' is missing", "fix data.target"],
    ),
    "extra column at one site": (
        extra_column_at_one_site,
        ["column 'ward' is at sites ['s1'] but not at sites ['s0', 's2']", "data.exclude"],
    ),
    "site lacks a column": (
        site_lacks_a_column,
        ["column 'sex' is at sites ['s0', 's2'] but not at sites ['s1']", "add it where"],
    ),
    "schema column missing from files": (
        schema_column_missing_from_files,
        ["site 's0': columns ['bmi'] declared in [data.schema] are missing", "site 's2'"],
    ),
    "undeclared column, strict schema": (
        undeclared_column_with_strict_schema,
        ["columns ['chol'] have no declared schema", "declare them in [data.schema]"],
    ),
    "text in numeric column": (
        text_in_numeric_column,
        ["site 's1', column 'age': non-numeric value 'old' at row 8", "fix the file"],
    ),
    "text in declared numeric column": (
        text_in_declared_numeric_column,
        ["site 's1', column 'age': non-numeric value 'old' at row 8", "fix the file"],
    ),
    "third label value": (
        third_label_value,
        ["target 'death'", "'unknown' in 1 record, first at site 's1', row 4", "data.classes"],
    ),
    "empty site": (empty_site, ["site 's1': no rows", "remove the site or give it data"]),
    "zero-byte site": (zero_byte_site, ["site 's1'", "is empty"]),
    "unknown config key": (
        unknown_config_key,
        ["training.learning_rate: unknown key", "check its spelling"],
    ),
    "zero rounds": (zero_rounds, ["training.rounds", "greater than 0", "(got 0)"]),
    "negative rounds": (negative_rounds, ["training.rounds", "greater than 0", "(got -3)"]),
    "missing config": (missing_config, ["no_such_config.toml' not found", "--config"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_clear_message(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = BAD_INPUT[case]
    config = make(tmp_path)
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, "run", "--config", config, "--out", out_dir)
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.count("error: ") == 1, err
    before, message = err.split("error: ")
    # nothing but the progress line of the stage that failed comes before the message
    assert before in ("", "loading and encoding the sites' data\n"), before
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert not out_dir.exists() and not (tmp_path / "out.partial").exists()


# ---- users' own CSV files -------------------------------------------------------------------


def test_own_csvs_train_with_five_lines_and_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = five_line_config(tmp_path, write_sites(tmp_path / "data"))
    config.write_text(config.read_text().replace('path = "', 'path = "data/'))
    code, out, err = cli(capsys, "run", "-c", config, "--out", tmp_path / "run")
    assert code == 0, err
    assert "PrivacyLeakWarning" in err and "inferred from the private data" in err
    assert "[data.schema]" in err  # the fix is shown verbatim
    assert "pooled" in out and "Traceback" not in err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["schema_inferred_from_data"] == ["age", "sex", "chol", "smoker"]
    assert res["task"]["classes"] == ["alive", "dead"]
    assert res["metrics"]["auc"] > 0.7  # it learned the label's dependence on the features


def test_schema_infer_output_pastes_into_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_sites(tmp_path)
    code, out, err = cli(capsys, "schema", "infer", *paths, "--target", "death")
    assert code == 0, err
    assert "review it" in err and "derived_from_data = false" in err
    assert out.startswith("# Schema inferred by `privml schema infer` FROM PRIVATE DATA.")
    schema = tomllib.loads(out)["data"]["schema"]
    assert list(schema) == ["age", "sex", "chol", "smoker"]
    assert all(col["derived_from_data"] for col in schema.values())

    config = five_line_config(tmp_path, paths, "\n" + out + "\n[training]\nrounds = 3\n")
    code, out2, err2 = cli(capsys, "run", "-c", config, "--out", tmp_path / "run")
    assert code == 0, err2
    assert "inferred from the private data" not in err2  # nothing left to infer...
    assert "derived_from_data = true" in err2  # ...but the pasted draft is flagged until reviewed
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["schema_inferred_from_data"] == ["age", "sex", "chol", "smoker"]
    assert res["config"]["data"]["schema"]["chol"]["missing"] is True


def test_schema_infer_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "schema", "infer", tmp_path / "nope.csv")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "nope.csv' not found" in err


# ---- privml run on the demo -----------------------------------------------------------------


def _pooled_accuracy(summary: str) -> float:
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]

    lines = summary.splitlines()
    header = cells(next(x for x in lines if "site" in x and "accuracy" in x))
    return float(cells(next(x for x in lines if "pooled" in x))[header.index("accuracy")])


@pytest.mark.slow  # two full demo runs, with the report and the encrypted-inference check
def test_demo_summary_json_and_rerun_into_the_same_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "demo"
    code, out, err = cli(capsys, "run", "--out", out_dir)
    assert code == 0, err
    assert _pooled_accuracy(out) >= 0.95
    assert f"results: {out_dir}/results.json" in out
    assert "privacy: none" in out
    assert (out_dir / "report.html").is_file()

    code, out, err = cli(capsys, "run", "--out", out_dir, "--json", "--force")  # same folder
    assert code == 0, err
    res = json.loads(out)  # stdout is the JSON document and nothing else
    assert res == json.loads((out_dir / "results.json").read_text())
    assert res["metrics"]["accuracy"] >= 0.95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "run", "--no-such-option")
    assert code == 2 and "No such option" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["run", "--resume", "\x00", "--out", "o"], ["run", "--out", "a\x00b"],
     ["run", "--config", "c\x00.toml"], ["report", "r\x00"], ["verify", "\x00"],
     ["budget", "--ledger", "l\x00"]],  # fmt: skip
)
def test_a_nul_character_in_an_argument_is_a_usage_error(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no operating system call takes such a name; it used to end in an internal error (exit 1)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, *argv)
    assert code == 2, err
    assert "NUL character" in err and "internal error" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_nul_character_in_a_config_path_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[data]\ndataset = "breast_cancer"\n[output]\ndir = "a\\u0000b"\n')
    code, _, err = cli(capsys, "run", "--config", config)
    assert code == 2, err
    assert "output.dir: a path cannot contain a NUL character" in err


@pytest.mark.slow
def test_console_script_end_to_end(tmp_path: Path) -> None:
    """The installed ``privml`` executable: JSON only on stdout; bad input exits 2 cleanly."""
    exe = Path(sys.executable).with_name("privml")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "privml.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PRIVML_DEBUG": ""}
    cfg = tmp_path / "quick.toml"
    cfg.write_text('[data]\ndataset = "breast_cancer"\n[training]\nrounds = 2\n')
    done = subprocess.run(
        [*cmd, "run", "-c", str(cfg), "--json", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "quick"
    assert "Traceback" not in done.stderr
    bad = five_line_config(tmp_path, [tmp_path / "missing.csv"])
    done = subprocess.run(
        [*cmd, "run", "-c", str(bad)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr and "missing.csv' not found" in done.stderr
