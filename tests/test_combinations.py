"""Mechanisms that combine, end to end through ``privml run`` on the demo: each combination a
deployment needs runs as one round loop and reports what each mechanism did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from privml.cli import main

DEMO = Path(__file__).resolve().parents[1] / "src/privml/data/demo/demo.toml"


def run_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str,
             *args: str) -> dict[str, Any]:  # fmt: skip
    """``privml run`` on the demo plus ``extra`` TOML (no encrypted inference check)."""
    text = DEMO.read_text().replace("encrypted = true", "encrypted = false") + "\n" + extra
    cfg = tmp_path / "demo.toml"
    cfg.write_text(text)
    out = tmp_path / "run"
    try:
        main(["run", "--config", str(cfg), "--out", str(out), *args])
    except SystemExit as exc:
        err = capsys.readouterr().err
        raise AssertionError(f"privml run exited {exc.code}: {err}") from None
    return json.loads((out / "results.json").read_text())


def test_backdoor_attack_in_privml_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = run_demo(tmp_path, capsys, '[attack]\nkind = "backdoor"\nsites = ["hospital_b"]\n')
    a = res["attack"]
    assert a["kind"] == "backdoor" and a["sites"] == ["hospital_b"]
    assert a["params"]["boost"] == "replace"
    assert all(r["malicious"] == 1 for r in res["rounds"])
    bd = a["backdoor"]
    # the trigger works (model replacement every round) and is reported beside its baseline
    assert bd["attack_success_rate"] > bd["target_rate_without_trigger"] + 0.5, bd
    assert res["metrics"]["accuracy"] > 0.85  # the main task still works (a stealthy backdoor)
