"""Conventions of the ecosystem: --version, -h, --set overrides recorded in results.json, plain
unwrapped output when piped, help texts that render, the honest headline (balanced accuracy,
F1 and the majority baseline beside accuracy, with a warning for a degenerate model) and the
client-level DP warning before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privml import __version__
from privml.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_version_and_short_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "--version") == (0, f"privml {__version__}\n", "")
    code, out, _ = cli(capsys, "-h")
    assert code == 0 and "Usage: privml" in out and "report" in out
    code, out, _ = cli(capsys, "run", "-h")
    assert code == 0 and "--set" in out


def test_audit_help_shows_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "audit", "--help")
    assert code == 0
    assert "audit.attacks" in " ".join(out.split()), out


def test_set_is_applied_and_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(
        capsys, "run", "--set", "training.rounds=2", "--set", "inference.encrypted=false",
        "--set", "audit.enabled=false", "--out", tmp_path / "run",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(res["rounds"]) == 2 and res["config"]["training"]["rounds"] == 2
    assert res["overrides"] == ["training.rounds=2", "inference.encrypted=false",
                                "audit.enabled=false"]  # fmt: skip
    assert "encrypted_inference" not in res
    code, _, err = cli(capsys, "run", "--set", "training.rounds", "--out", tmp_path / "x")
    assert code == 2 and "section.key=value" in err and not (tmp_path / "x").exists()
    code, _, err = cli(capsys, "run", "--set", "training.roundz=2", "--out", tmp_path / "x")
    assert code == 2 and "training.roundz: unknown key" in err


@pytest.mark.slow
def test_piped_output_is_not_wrapped(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("COLUMNS", None)
    res = subprocess.run(
        [sys.executable, "-m", "privml.cli", "run", "--set", "training.rounds=2",
         "--set", "inference.encrypted=false", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    pooled = [ln for ln in lines if "pooled" in ln]
    assert len(pooled) == 1 and "hospital_a" in res.stdout
    header = next(ln for ln in lines if "site" in ln and "AUC" in ln)
    for col in ("positive", "majority", "accuracy", "bal. acc", "F1", "AUC"):
        assert col in header, header  # no column squeezed to "majori…"
    assert any(len(ln) > 80 for ln in lines)  # the legend line, not wrapped at 80
    assert "\x1b[" not in res.stdout  # no colour codes in a pipe


def test_degenerate_model_is_called_degenerate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rare outcome (5 % positive) that the features do not predict: the model predicts
    "alive" for everyone, its accuracy 0.95 is the majority baseline, and the summary says so
    instead of printing it as a success."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    names = []
    for i in range(2):
        n = 300
        frame = pd.DataFrame({
            "x1": rng.normal(size=n).round(3), "x2": rng.normal(size=n).round(3),
            "death": np.where(np.arange(n) % 20 == 0, "dead", "alive"),
        })  # fmt: skip
        frame.to_csv(tmp_path / f"s{i}.csv", index=False)
        names.append(f'{{name = "s{i}", path = "s{i}.csv"}}')
    cfg = tmp_path / "study.toml"
    cfg.write_text(
        f'[data]\ntarget = "death"\npositive = "dead"\nsites = [{", ".join(names)}]\n'
        "[training]\nrounds = 3\n[inference]\nencrypted = false\n"
    )
    code, out, err = cli(capsys, "run", "--config", cfg, "--out", tmp_path / "run")
    assert code == 0, err
    assert "majority" in out and "bal. acc" in out
    assert "no better than predicting the majority class 'alive'" in " ".join(err.split()), err


def test_client_level_dp_with_few_sites_warns_before_training(tmp_path: Path) -> None:
    import warnings

    import privml
    from privml.dp.advice import client_level_noise_ratio

    events: list[str] = []
    study = {
        "data": {"dataset": "breast_cancer", "n_sites": 3, "partition": "hospitals"},
        "training": {"rounds": 3},
        "privacy": {"mode": "client", "epsilon": 8.0, "clip": 1.0,
                    "ledger": str(tmp_path / "ledger.sqlite"), "budget_epsilon": 1000},
        "inference": {"encrypted": False},
        "audit": {"enabled": False},
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: events.append(f"warning: {msg}")
        result = privml.run(study, write=False, on_round=lambda rec: events.append("round"))
    warned = [e for e in events if "client-level DP" in e]
    assert warned and events.index(warned[0]) < events.index("round"), events
    text = warned[0]
    assert "sites per round" in text and "x the norm of the largest clipped update" in text
    z = result.privacy["noise_multiplier"]
    need = int(text.split("needs roughly ")[1].split()[0])
    assert need > 3 and client_level_noise_ratio(z, 31, need) <= 1.0
    assert any("client-level DP" in n for n in result.results["notes"])


def test_schema_infer_marks_impute_and_errors_name_the_config_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from tests.data.sites import five_line_config, write_sites

    paths = write_sites(tmp_path, sizes=(80, 60))
    code, draft, err = cli(capsys, "schema", "infer", *paths, "--target", "death")
    assert code == 0, err
    assert "impute" in err and "derived_from_data = false" in " ".join(err.split())
    impute_lines = [ln for ln in draft.splitlines() if ln.startswith("impute")]
    assert impute_lines and all("median of the private data" in ln for ln in impute_lines)
    schema = tomllib.loads(draft)["data"]["schema"]
    assert all(c["derived_from_data"] for c in schema.values())
    cfg = five_line_config(tmp_path, paths, extra="[privacy]\nmode = \"sample\"\nepsilon = 2\n"
                           f'ledger = "{tmp_path / "l.sqlite"}"\n\n' + draft)  # fmt: skip
    code, _, err = cli(capsys, "run", "--config", cfg, "--out", tmp_path / "run")
    assert code == 2
    msg = " ".join(err.split())
    assert "derived_from_data = false" in msg and "not declared" not in msg
    assert "privacy.allow_data_derived_bounds = true" in msg and "=True" not in msg
