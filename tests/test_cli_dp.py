"""`privml query`, `privml budget` and `privml dp` through the real command line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privml.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(
        '[data]\ndataset = "breast_cancer"\n'
        '[privacy]\nbudget_epsilon = 1.0\nledger = "ledger.sqlite"\n'
    )
    return p


def test_query_books_then_refuses_with_exit_3(config: Path, capsys) -> None:
    args = ["query", "--config", str(config), "--site", "hospital_a", "--epsilon", "0.4"]
    code, out, err = _run([*args, "mean(mean_radius)", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert set(res) == {"query", "site", "value", "epsilon", "delta", "remaining_epsilon"}
    assert res["epsilon"] == 0.4 and res["remaining_epsilon"] == pytest.approx(0.6)
    # declared bounds of mean radius are [6.981, 28.11]: a clamped mean lies inside them
    assert 6.981 <= res["value"] <= 28.11
    code, _, _ = _run([*args, "count()"], capsys)
    assert code == 0
    code, out, err = _run([*args, "count()"], capsys)
    assert code == 3
    assert "remains" in err and "Traceback" not in err
    code, out, _ = _run(["budget", "--config", str(config), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert "hospital_a" in json.dumps(report)


def test_query_usage_errors_exit_2(config: Path, capsys) -> None:
    base = ["query", "--config", str(config), "--epsilon", "0.1"]
    code, _, err = _run([*base, "--site", "nowhere", "count()"], capsys)
    assert code == 2 and "nowhere" in err
    code, _, err = _run([*base, "--site", "hospital_a", "median(nonexistent)"], capsys)
    assert code == 2 and "nonexistent" in err and "Traceback" not in err
    code, _, err = _run(
        ["query", "--config", str(config), "--site", "hospital_a", "--epsilon", "-1", "count()"],
        capsys,
    )
    assert code == 2 and "epsilon" in err


def test_dp_epsilon_and_noise_json(capsys) -> None:
    code, out, _ = _run(
        ["dp", "epsilon", "--sampling-rate", "0.01", "--noise-multiplier", "4", "--steps",
         "10000", "--delta", "1e-5", "--json"],
        capsys,
    )
    assert code == 0
    res = json.loads(out)
    # Abadi et al. 2016 setting; dp-accounting's PLD gives about 0.947
    assert res["accountant"] == "pld" and 0.9 < res["epsilon"] < 1.0
