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
from collections.abc import Iterator
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
QUICK_LIMIT = 180


def test_every_benchmark_is_on_the_harness_or_listed() -> None:
    names = {p.name for p in run_all.scripts()}
    for name in names:
        on = run_all.on_harness(BENCH / name)
        assert on != (name in NOT_YET_ON_HARNESS), (
            f"{name}: {'remove it from' if on else 'write it through harness.Bench or list it in'}"
            " NOT_YET_ON_HARNESS"
        )
    assert set(NOT_YET_ON_HARNESS) <= names


class Preloaded:
    """One process per test worker that has imported torch, pandas, scikit-learn and privml's
    pipeline; each quick run is a forked child of it (tests/benchmarks/preloaded.py), which
    saves every run the 3-5 s of imports a fresh interpreter pays."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("MPLBACKEND", "Agg")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("preloaded.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def run(self, script: Path, args: list[str], cwd: Path, limit: int) -> tuple[int, str]:
        """(exit code, the run's stdout and stderr)."""
        log = cwd / "quick-run.log"
        req = {"script": str(script), "args": args, "cwd": str(cwd), "log": str(log),
               "timeout": limit}  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()  # the child is ended by SIGALRM after `limit`
        assert answer, f"the preloaded runner died (exit {self.proc.poll()})"
        return int(json.loads(answer)["code"]), log.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def preloaded() -> Iterator[Preloaded]:
    runner = Preloaded()
    yield runner
    runner.close()


@pytest.mark.slow
@pytest.mark.parametrize("script", [p.name for p in run_all.scripts()])
def test_quick_run_writes_strict_json(script: str, tmp_path: Path, preloaded: Preloaded) -> None:
    if script in NOT_YET_ON_HARNESS:
        pytest.skip(NOT_YET_ON_HARNESS[script])
    out = tmp_path / "result.json"
    code, log = preloaded.run(BENCH / script, ["--quick", "--out", str(out)], tmp_path,
                              QUICK_LIMIT)  # fmt: skip
    assert code == 0, log[-6000:]

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
