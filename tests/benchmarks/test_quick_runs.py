"""Every benchmark runs (quick mode, tiny sizes) and the docs' tables match the committed JSON.

The quick runs write their JSON to a temporary folder and never touch docs/ or
benchmarks/results/; their figures are not for comparison, only proof that each script still
runs end to end, with its anchor, through the harness.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import render_docs  # noqa: E402
import run_all  # noqa: E402
import targets  # noqa: E402

#: Scripts whose owners are moving them onto the harness; each is skipped with this reason
#: until it writes through ``harness.Bench`` (then the test below insists it leaves this set).
NOT_YET_ON_HARNESS: dict[str, str] = {}

#: Seconds a quick run may take (on 2 busy cores); the sizes are tiny on purpose.
QUICK_LIMIT = 240


def test_every_benchmark_is_on_the_harness_or_listed() -> None:
    names = {p.name for p in run_all.scripts()}
    for name in names:
        on = run_all.on_harness(BENCH / name)
        assert on != (name in NOT_YET_ON_HARNESS), (
            f"{name}: {'remove it from' if on else 'write it through harness.Bench or list it in'}"
            " NOT_YET_ON_HARNESS"
        )
    assert set(NOT_YET_ON_HARNESS) <= names


@pytest.mark.slow
@pytest.mark.parametrize("script", [p.name for p in run_all.scripts()])
def test_quick_run_writes_strict_json(script: str, tmp_path: Path) -> None:
    if script in NOT_YET_ON_HARNESS:
        pytest.skip(NOT_YET_ON_HARNESS[script])
    out = tmp_path / "result.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=QUICK_LIMIT,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    def refuse(c: str) -> None:
        raise AssertionError(f"non-strict JSON constant {c}")

    data = json.loads(out.read_text(), parse_constant=refuse)
    assert data["quick"] is True and data["benchmark"] == script.removeprefix("bench_")[:-3]
    assert data["tables"], "a benchmark writes at least one table for the docs"
    assert data["load_before"] is not None and data["machine"]["cpus"]
    for table in data["tables"].values():
        assert table["rows"] and all(len(r) == len(table["columns"]) for r in table["rows"])


def test_docs_tables_match_the_committed_results() -> None:
    """A figure typed into a generated table, or a table without results, fails here."""
    assert render_docs.main(["--check"]) == 0


def test_targets_tables_match_the_committed_results(tmp_path: Path) -> None:
    """The targets tables (results/targets.json) are what targets.py reads from the other
    committed results now: a result re-run without re-collecting the targets fails here."""
    out = tmp_path / "targets.json"
    assert targets.main(["--out", str(out)]) == 0
    fresh = json.loads(out.read_text())["tables"]
    committed = json.loads((BENCH / "results" / "targets.json").read_text())["tables"]
    assert fresh == committed, "run benchmarks/targets.py, then benchmarks/render_docs.py"


def test_committed_results_are_full_runs() -> None:
    """Only full-size runs are committed (quick results are for smoke tests)."""
    for p in (BENCH / "results").glob("*.json"):
        data = json.loads(p.read_text())
        assert not data["quick"] and not p.stem.endswith("-quick"), p.name
