"""Report generation on the demo: target <= 2 s.

Two figures: the in-process render of report.html from the demo's results.json (what
`privml run` adds at its end), and the wall time of the whole `privml report RUN_DIR` command
in a fresh interpreter (Python start-up and imports included). The anchor is matplotlib drawing
the same plots (the same number of figures and panels, saved as PNG) and nothing else: the
floor of any report with these plots; the ratio is what privml's report costs above it. On a
loaded machine wall time mostly waits for a CPU, so CPU time (user + system) is shown too.

    python benchmarks/bench_report.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Bench,
    add_common_args,
    fmt_ratio,
    fmt_spread,
    ratios,
    summarize,
)


def _plots_only() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for ncols in (2, 2, 1):  # learning curves, ROC + calibration, membership ROC
        fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 3.4), dpi=110, squeeze=False)
        for ax in axes[0]:
            for k in range(4):
                ax.plot(range(20), [0.5 + 0.02 * i + 0.01 * k for i in range(20)])
            ax.legend([f"s{k}" for k in range(4)])
        fig.tight_layout()
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    add_common_args(ap)
    args = ap.parse_args()
    import privml
    from privml.report import read_results, render_report

    bench = Bench("report", quick=args.quick, out=args.out)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "demo"
        # quick (proof that it runs): a 2-round demo without the audit, one repetition
        quick_demo = ["training.rounds=2", "audit.enabled=false"] if args.quick else []
        privml.run(None, out_dir=run_dir, overrides=quick_demo)
        results = read_results(run_dir)
        reps = 1 if args.quick else 9
        warmup = 0 if args.quick else 1
        cpu: list[float] = []
        render_cpu: list[float] = []

        def render_timed() -> float:
            c0, t0 = time.process_time(), time.perf_counter()
            render_report(results)
            render_cpu.append(time.process_time() - c0)
            return time.perf_counter() - t0

        def command() -> float:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "privml.cli", "report", str(run_dir)],
                           check=True, capture_output=True)  # fmt: skip
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            return wall

        got = bench.interleave(
            {"privml report (in process)": render_timed,
             "matplotlib, same plots only": _plots_only},
            reps=reps, warmup=warmup, key="timings",
        )  # fmt: skip
        ours, anchor = got["privml report (in process)"], got["matplotlib, same plots only"]
        cmd = bench.interleave(
            {"privml report RUN_DIR": command}, reps=reps, warmup=warmup, key="command"
        )
        wall = cmd["privml report RUN_DIR"]
        size = (run_dir / "report.html").stat().st_size
        cmd_cpu, ren_cpu = summarize(cpu[1:] or cpu), summarize(render_cpu[1:] or render_cpu)
        bench.record("cpu_seconds", {"command": cmd_cpu.to_dict(), "render": ren_cpu.to_dict()})
        bench.record("report_bytes", size)
        rows = [
            ["render report.html (in process)", fmt_spread(ours, unit="s", digits=2),
             fmt_spread(ren_cpu, unit="s", digits=2), "≤ 2 s"],
            ["`privml report RUN_DIR` (fresh process)", fmt_spread(wall, unit="s", digits=2),
             fmt_spread(cmd_cpu, unit="s", digits=2), "≤ 2 s"],
            ["anchor: matplotlib, the same plots only", fmt_spread(anchor, unit="s", digits=2),
             "", ""],
            ["ratio report / anchor (wall)", fmt_ratio(ratios(ours, anchor)), "", ""],
        ]  # fmt: skip
        caption = f"The demo's report.html: {size / 1024:.0f} KB, 3 figures."
        bench.table("demo", ["what", "wall, median (min-max)", "CPU time", "target"], rows,
                    caption=caption)  # fmt: skip
        path = bench.write()
        print(f"report: render {ours.median:.2f} s (CPU {ren_cpu.median:.2f} s), command "
              f"{wall.median:.2f} s (CPU {cmd_cpu.median:.2f} s), anchor {anchor.median:.2f} s "
              f"-> {path}")  # fmt: skip


if __name__ == "__main__":
    main()
