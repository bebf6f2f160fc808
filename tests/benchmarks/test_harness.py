"""The benchmark harness: interleaving, summaries, strict JSON, docs regenerated from JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402
import render_docs  # noqa: E402


def test_interleave_rotates_order_and_excludes_warmup() -> None:
    calls: list[str] = []
    variants = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    got = harness.interleave(variants, reps=3, warmup=1)
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(s.values) == 3 for s in got.values())


def test_self_timed_variant_and_paired_ratios() -> None:
    got = harness.interleave({"slow": lambda: 4.0, "fast": lambda: 1.0}, reps=5, warmup=0)
    r = harness.ratios(got["slow"], got["fast"])
    assert r.median == r.min == r.max == 4.0
    with pytest.raises(ValueError, match="reps"):
        harness.interleave({"x": lambda: 1.0}, reps=0)


def test_json_is_strict_and_docs_regenerate(tmp_path: Path) -> None:
    b = harness.Bench("toy", out=tmp_path / "results" / "toy.json")
    b.record("ratio", float("inf"))
    b.table("t1", ["variant", "ms"], [["privml", "1.0"], ["anchor", "3.0"]], caption="Toy.")
    path = b.write()

    def refuse(c: str) -> None:
        raise AssertionError(c)

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["results"]["ratio"] == "inf"
    assert data["load_before"] is not None and "cpus" in data["machine"]

    docs = tmp_path / "docs"
    docs.mkdir()
    page = docs / "benchmarks_toy.md"
    page.write_text("# Toy\n\n<!-- bench:toy:t1 -->\nold figures\n<!-- /bench -->\n")
    args = ["--results", str(tmp_path / "results"), "--docs", str(docs)]
    assert render_docs.main([*args, "--check"]) == 1
    assert render_docs.main(args) == 0
    text = page.read_text()
    assert "| privml | 1.0 |" in text and "old figures" not in text and "load average" in text
    assert render_docs.main([*args, "--check"]) == 0
    page.write_text(text.replace("| privml | 1.0 |", "| privml | 0.1 |"))  # hand-edited figure
    assert render_docs.main([*args, "--check"]) == 1
    # a table no results file has: reported, and an error in both modes
    page.write_text(text + "\n<!-- bench:toy:nothing -->\n<!-- /bench -->\n")
    assert render_docs.main(args) == 1
    assert render_docs.main([*args, "--check"]) == 1


def test_command_line_leaves_out_the_output_path() -> None:
    argv = ["/x/benchmarks/bench_toy.py", "--reps", "3", "--out", "/tmp/r.json", "--out=/y"]
    assert harness.command_line(argv) == "bench_toy.py --reps 3"
