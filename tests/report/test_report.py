"""The report renders whatever results.json holds: absent sections are left out, odd values
do not cost the whole report, text from the data is escaped, and `privml report` rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privml.cli import main
from privml.report import read_results, render_report, write_report


def _sections(page: str) -> list[str]:
    return [chunk.split('"', 1)[0] for chunk in page.split('<section id="')[1:]]


def test_empty_and_partial_results() -> None:
    assert _sections(render_report({})) == []
    page = render_report({"name": "x", "metrics": {"accuracy": 0.9, "n": 10}, "rounds": []})
    assert _sections(page) == ["summary"]
    odd = {
        "name": "odd", "metrics": {"accuracy": "high", "per_site": 3, "confusion": [[1]]},
        "sites": ["not a mapping"], "rounds": [{"round": 1, "loss": None}, 7],
        "privacy": {"mode": "sample", "epsilon_by_round": {"a": [[1, "x"]]}},
        "audit": {"rows": [{"attack": "a", "metric": "m", "without_defence": float("inf")}]},
        "encrypted_inference": {"skipped": "needs a linear model"},
    }  # fmt: skip
    page = render_report(odd)
    assert "<html" in page and "</html>" in page
    assert "needs a linear model" in page and "∞" in page


def test_text_from_the_data_is_escaped() -> None:
    page = render_report({"name": "<script>alert(1)</script>", "notes": ["<b>x</b>"],
                          "sites": [{"name": "<i>", "n_train": 1, "n_test": 1}],
                          "metrics": {"n": 1, "per_site": {}}})  # fmt: skip
    assert "<script>alert" not in page and "&lt;script&gt;" in page and "<b>x</b>" not in page


def test_privml_report_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "schema": "privml-results/1", "name": "r", "sites": [], "metrics": {"n": 0},
    }))  # fmt: skip
    main(["report", str(run)])
    assert "report: " in capsys.readouterr().out and (run / "report.html").is_file()
    assert read_results(run)["name"] == "r"
    out = write_report(run, tmp_path / "elsewhere.html")
    assert out.read_text().startswith("<!doctype html>")
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "missing")])
    assert exc.value.code == 2


def test_audit_results_refresh_the_report(tmp_path: Path) -> None:
    from privml.security.audit import _write_results

    (tmp_path / "results.json").write_text(json.dumps({
        "schema": "privml-results/1", "name": "r", "sites": [], "metrics": {"n": 0},
    }))  # fmt: skip
    write_report(tmp_path)
    assert 'id="audit"' not in (tmp_path / "report.html").read_text()
    row = {"attack": "membership", "metric": "AUC", "without_defence": 0.7, "with_defence": None}
    _write_results(tmp_path, {"rows": [row]})
    page = (tmp_path / "report.html").read_text()
    assert 'id="audit"' in page and "membership" in page
