"""Run every benchmark, then regenerate the docs tables from their JSON results.

Run:  .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--skip NAME ...]

``make bench`` runs this at full size (results in ``benchmarks/results/NAME.json``), then
``targets.py`` collects the targets tables and ``render_docs.py`` rewrites the tables in docs/.
``make bench-quick`` runs every script with ``--quick`` on tiny sizes, writing to a temporary
folder, then collects the targets and renders every docs page from those results into a copy
(docs/ is left alone; a docs table that no script produced fails the run). The test suite runs
each script the same way in ``tests/benchmarks/test_quick_runs.py``.

A benchmark is a ``bench_*.py`` script in this folder that writes its results through
``harness.Bench``; scripts not on the harness yet are listed and skipped. Each script runs in a
fresh process, one after another (never two at once: they would time each other), and the
wall time of each is printed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def on_harness(path: Path) -> bool:
    """Whether a script writes its results through the harness (``Bench(...).write()``)."""
    text = path.read_text()
    return "from harness import" in text and "Bench(" in text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes; docs are not touched")
    ap.add_argument("--only", nargs="*", default=None, help="names like dpsgd or bench_dpsgd")
    ap.add_argument("--skip", nargs="*", default=[], help="names to leave out")
    ap.add_argument("--out-dir", type=Path, default=None, help="JSON folder (quick: a temp dir)")
    args = ap.parse_args(argv)

    def name(p: Path) -> str:
        return p.stem.removeprefix("bench_")

    wanted = {s.removeprefix("bench_") for s in args.only} if args.only else None
    skip = {s.removeprefix("bench_") for s in args.skip}
    todo, pending = [], []
    for p in scripts():
        if (wanted is not None and name(p) not in wanted) or name(p) in skip:
            continue
        (todo if on_harness(p) else pending).append(p)
    out_dir = args.out_dir
    tmp = None
    if args.quick and out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="privml-bench-quick-")
        out_dir = Path(tmp.name)
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    timings: list[tuple[str, float, int]] = []
    t_all = time.perf_counter()
    for p in todo:
        cmd = [sys.executable, str(p)]
        if args.quick:
            cmd.append("--quick")
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--out", str(out_dir / f"{name(p)}.json")]
        print(f"\n=== {p.name} {'(quick)' if args.quick else ''}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env, check=False).returncode
        timings.append((p.name, time.perf_counter() - t0, rc))
    total = time.perf_counter() - t_all
    failed = [n for n, _, rc in timings if rc != 0]
    print("\nbenchmark                            seconds  status")
    for n, s, rc in timings:
        print(f"{n:<36} {s:8.1f}  {'ok' if rc == 0 else f'FAILED ({rc})'}")
    print(f"{'total':<36} {total:8.1f}")
    if pending:
        print("not on benchmarks/harness.py yet (skipped): " + ", ".join(p.name for p in pending))
    rc = 1 if failed else 0
    if not args.quick and args.out_dir is None:
        # the targets tables, then every docs table, from whatever results are there now
        for step in ("targets.py", "render_docs.py"):
            got = subprocess.run([sys.executable, str(HERE / step)], env=env, check=False)
            rc = rc or got.returncode
    elif args.quick and wanted is None and not skip and out_dir is not None:
        # the whole pipeline on the quick results: targets collected, then every docs page
        # rendered into a copy (docs/ untouched); a table no script produced fails the run
        docs_copy = out_dir / "docs"
        shutil.copytree(HERE.parent / "docs", docs_copy, dirs_exist_ok=True)
        for step, extra in (
            ("targets.py", ["--results", str(out_dir)]),
            ("render_docs.py", ["--results", str(out_dir), "--docs", str(docs_copy)]),
        ):
            got = subprocess.run([sys.executable, str(HERE / step), *extra], env=env, check=False)
            print(f"{step} on the quick results: {'ok' if got.returncode == 0 else 'FAILED'}")
            rc = rc or got.returncode
    if tmp is not None:
        tmp.cleanup()
    return rc


if __name__ == "__main__":
    sys.exit(main())
