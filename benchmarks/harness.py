"""One discipline for every benchmark in this folder.

* **Interleaved:** within each repetition every variant (privml and its anchors) runs once, in
  an order that rotates from one repetition to the next, so a burst of load on this shared
  machine hits every variant alike. Warm-up runs (one per variant by default) are excluded
  for all of them.
* **Robust summaries:** medians with the min-max spread of the repetitions; ratios are
  computed per repetition (privml and the anchor ran side by side) and summarised the same way.
* **The conditions are recorded:** the load average before and after, CPU count, torch threads,
  versions, the git commit, the UTC time.
* **Numbers cannot drift from the docs:** each script writes its results as JSON
  (``benchmarks/results/<name>.json`` by default, ``--out`` to change it), tables included;
  ``benchmarks/render_docs.py`` regenerates the tables in ``docs/benchmarks*.md`` between
  ``<!-- bench:<name>:<table> -->`` and ``<!-- /bench -->`` markers from those files.

A script uses it like this::

    bench = Bench("dpsgd", quick=args.quick, out=args.out)
    timings = bench.interleave({"privml": run_ours, "opacus": run_theirs}, reps=7)
    bench.table("mlp", ["variant", "median ms", "spread"], rows, caption="...")
    bench.write()

Each callable returns either ``None`` (the harness times the call) or the number of seconds it
measured itself (to exclude set-up that belongs to neither variant).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:  # the threads the benchmark ran with
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    else:  # a benchmark that never used torch: not imported (seconds) only to be named
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["torch"] = importlib.metadata.version("torch")
    return info


@dataclass
class Summary:
    """Median and spread of one variant's repetitions (seconds, or any unit)."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": len(self.values),
                "values": list(self.values)}  # fmt: skip


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("no values to summarise")
    return Summary([float(v) for v in values])


def _call(fn: Callable[[], float | None]) -> float:
    t0 = time.perf_counter()
    got = fn()
    elapsed = time.perf_counter() - t0
    return float(got) if got is not None else elapsed


def interleave(
    variants: Mapping[str, Callable[[], float | None]],
    *,
    reps: int,
    warmup: int = 1,
) -> dict[str, Summary]:
    """Run every variant ``reps`` times, alternating within each repetition.

    The order rotates by one each repetition (A B C, B C A, C A B, ...). ``warmup`` untimed
    rounds of every variant come first. Returns each variant's timings.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1. Got {reps} instead.")
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(_call(variants[n]))
    return {n: summarize(v) for n, v in out.items()}


def ratios(slow: Summary, fast: Summary) -> Summary:
    """Per-repetition ratios ``slow / fast`` (the speed-up of ``fast``), paired by repetition."""
    pairs = zip(slow.values, fast.values, strict=True)
    return summarize([a / b if b > 0 else math.inf for a, b in pairs])


def fmt_spread(s: Summary, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    """``12.3 (11.9-13.0) ms`` style cell."""
    f = f"{{:.{digits}f}}"
    return f"{f.format(s.median * scale)} ({f.format(s.min * scale)}-{f.format(s.max * scale)})" + (
        f" {unit}" if unit else ""
    )


def fmt_ratio(s: Summary) -> str:
    return f"{s.median:.2f}x ({s.min:.2f}-{s.max:.2f})"


@dataclass
class Bench:
    """One benchmark script's results: conditions, measurements and the tables for the docs."""

    name: str
    quick: bool = False
    out: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    load_before: list[float] = field(default_factory=loadavg)

    def interleave(
        self,
        variants: Mapping[str, Callable[[], float | None]],
        *,
        reps: int,
        warmup: int = 1,
        key: str | None = None,
    ) -> dict[str, Summary]:
        """:func:`interleave`, with the timings stored under ``results[key]`` when given."""
        got = interleave(variants, reps=reps, warmup=warmup)
        if key is not None:
            self.results[key] = {n: s.to_dict() for n, s in got.items()}
        return got

    def record(self, key: str, value: Any) -> None:
        self.results[key] = value

    def table(
        self,
        table_id: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        *,
        caption: str = "",
    ) -> None:
        """A table for the docs (rendered by render_docs.py) and for the terminal."""
        cells = [[str(c) for c in row] for row in rows]
        if any(len(r) != len(columns) for r in cells):
            raise ValueError(f"table {table_id!r}: every row needs {len(columns)} cells")
        self.tables[table_id] = {"columns": list(columns), "rows": cells, "caption": caption}
        print(f"\n{caption or table_id}")
        print(markdown_table(list(columns), cells))

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "quick": self.quick,
            "started": self.started,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command_line(sys.argv),
            "machine": machine(),
            "load_before": self.load_before,
            "load_after": loadavg(),
            "params": self.params,
            "results": self.results,
            "tables": self.tables,
        }

    def write(self) -> Path:
        """Write the JSON (strict: no NaN or Infinity) and return its path."""
        path = self.out or (RESULTS_DIR / f"{self.name}{'-quick' if self.quick else ''}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(_strict(self.to_dict()), indent=1, allow_nan=False)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(blob + "\n")
        os.replace(tmp, path)
        print(f"\nresults: {path} (load average {self.load_before} -> {loadavg()})")
        return path


def command_line(argv: Sequence[str]) -> str:
    """The command that produced a result, as the docs show it: the script's name and its
    options, without ``--out`` (where the JSON went is no part of what was measured)."""
    kept: list[str] = []
    skip = False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return " ".join([Path(argv[0]).name, *kept])


def _strict(obj: Any) -> Any:
    """Replace non-finite floats by strings so the JSON stays strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def conditions_line(data: Mapping[str, Any]) -> str:
    """The sentence under every generated table: when, where, at what load."""
    if data.get("results", {}).get("collected"):
        return (
            f"Collected {data.get('started', '?')} by `{data.get('command', '?')}` from "
            "benchmarks/results/; each row names the benchmark run it comes from (when, load "
            "average)."
        )
    m = data.get("machine", {})
    load = data.get("load_before") or []
    load_after = data.get("load_after") or []
    quick = " (quick mode: tiny sizes, not for comparison)" if data.get("quick") else ""
    return (
        f"Measured {data.get('started', '?')} with `{data.get('command', '?')}` on "
        f"{m.get('cpus', '?')} CPUs ({m.get('processor', '?')}), Python {m.get('python', '?')}, "
        f"torch {m.get('torch', '?')}, commit {m.get('commit', '?')}; load average "
        f"{load[0] if load else '?'} before, {load_after[0] if load_after else '?'} after"
        f"{quick}."
    )


def add_common_args(ap: Any) -> None:
    """``--quick`` and ``--out`` for every benchmark script."""
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes and few repetitions (a smoke run)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON results file (default benchmarks/results/)"
    )
