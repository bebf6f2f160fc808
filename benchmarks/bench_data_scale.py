"""The data layer at scale: loading, checking and encoding many sites, and its memory.

Work: the built-in synthetic dataset (``dataset = "synthetic"``: 8 numeric columns, an age and
a categorical smoker, a binary label; 12 encoded features) split into N sites of R records,
from the config to every site's encoded train and held-out arrays (``load_federation``:
generate, split into sites, check the labels against the task, split each site, encode).

* privml: :func:`privml.data.load_federation` (one pass over the pooled records).
* anchor: privml's previous site-by-site loader (``benchmarks/baseline_data.py``, a frozen
  copy: a pandas frame per site, labels checked per site, float64 encoding blocks), the
  straightforward pandas implementation. Both give the same sites (checked at the smallest
  size); they alternate within each repetition.

Tables:

* ``load``: seconds to load N x R, privml vs the anchor, interleaved (the anchor runs at every
  size up to ``--anchor-max-sites``; at the largest size once per repetition as well).
* ``memory``: peak resident memory of a whole run in a fresh process (load, then one federated
  round of the logistic model over all sites, 1 local epoch, batch 32): paired with the anchor
  at 1,000 x 2,000 and privml alone at 10,000 x 2,000 (the target); bytes per record beside the
  48 bytes of encoded features (float32) and 8 of label.

A round of simulation at this scale is ``bench_sim_scale.py``.

Run:  .venv/bin/python benchmarks/bench_data_scale.py [--quick] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Bench,
    add_common_args,
    fmt_ratio,
    fmt_spread,
    ratios,
    summarize,
)

FULL = {
    "sizes": [(1_000, 20), (10_000, 20), (100_000, 20)],
    "anchor_max_sites": 100_000,
    "pair_sites": 1_000,
    "memory_sites": 10_000,
    "memory_rows": 2_000,
    "reps": 3,
    "memory_reps": 1,
}
QUICK = {
    "sizes": [(10, 20), (40, 20)],
    "anchor_max_sites": 40,
    "pair_sites": 10,
    "memory_sites": 10,
    "memory_rows": 20,
    "reps": 1,
    "memory_reps": 1,
}
BYTES_ENCODED = 12 * 4 + 8  # float32 features + int64 label per record
#: Sizes (sites) up to which the anchor loader runs every repetition; above, once.
ANCHOR_REPEATED_UP_TO = 1_000


def _config(n_sites: int, rows: int, rounds: int = 1) -> Any:
    from privml.config import parse_config

    return parse_config(
        {
            "data": {"dataset": "synthetic", "n_sites": n_sites, "rows": rows},
            "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "lr": 1.0},
        }
    )


def _status(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_now() -> float:
    """Current resident set size in bytes (Linux), else the peak so far."""
    got = _status("VmRSS")
    return got if got is not None else _peak()


def _peak() -> float:
    """Peak resident set size of this process. VmHWM belongs to the process's own memory
    (reset by exec); getrusage's ru_maxrss is not: a child started from a large parent starts
    at the parent's figure, so it is only the fallback."""
    got = _status("VmHWM")
    if got is not None:
        return got
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(kb) * (1 if sys.platform == "darwin" else 1024)


def child(impl: str, n_sites: int, rows: int) -> dict[str, Any]:
    """One whole run in this (fresh) process: load, then one round over all sites."""
    import torch

    from privml.data import load_federation
    from privml.data.federation import FederatedData
    from privml.fl.engine import simulate
    from privml.pipeline import model_spec

    torch.set_num_threads(1)
    cfg = _config(n_sites, rows)
    rss_start = _rss_now()  # the interpreter and its libraries, before any data
    t0 = time.perf_counter()
    if impl == "privml":
        fed = load_federation(cfg)
    else:
        import baseline_data

        sites = baseline_data.load_synthetic(cfg)
        ref = load_federation(_config(2, 20))  # encoder and task only
        fed = FederatedData(sites, ref.encoder, ref.task)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_now()
    t0 = time.perf_counter()
    res = simulate(fed, model_spec(cfg, fed), cfg.training)
    run_s = time.perf_counter() - t0
    n = sum(s.n_train + s.n_test for s in fed.sites)
    return {
        "records": n,
        "load_s": load_s,
        "simulate_s": run_s,
        "rss_start": rss_start,
        "rss_after_load": rss_loaded,
        "peak_rss": _peak(),
        "accuracy": float(res.metrics["accuracy"]),
    }


def run_child(impl: str, n_sites: int, rows: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", impl, str(n_sites), str(rows)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def load_table(bench: Bench, sizes: list[tuple[int, int]], reps: int, anchor_max: int) -> None:
    import baseline_data

    from privml.data import load_federation

    rows_out = []
    first = True
    for n_sites, rows in sizes:
        cfg = _config(n_sites, rows)

        def ours(cfg: Any = cfg) -> None:
            load_federation(cfg)

        def theirs(cfg: Any = cfg) -> None:
            baseline_data.load_synthetic(cfg)

        variants: dict[str, Any] = {"privml": ours}
        if n_sites <= anchor_max:
            variants["per-site baseline"] = theirs
        if first:  # both compute the same sites
            ours, theirs = load_federation(cfg).sites, baseline_data.load_synthetic(cfg)
            for a, b in zip(ours, theirs, strict=True):
                assert a.name == b.name
                for x, y in ((a.X_train, b.X_train), (a.y_train, b.y_train), (a.X_test, b.X_test)):
                    np.testing.assert_array_equal(x, y)
            del ours, theirs
        # the first size warms both code paths up; larger sizes are not repeated for warm-up
        key = f"load_{n_sites}x{rows}"
        long_anchor = "per-site baseline" in variants and n_sites > ANCHOR_REPEATED_UP_TO
        if long_anchor:
            # minutes per run: the anchor runs once, beside privml's first repetition; privml's
            # figure is the median of all its repetitions
            t = bench.interleave(variants, reps=1, warmup=1 if first else 0)
            if reps > 1:
                more = bench.interleave({"privml": ours}, reps=reps - 1, warmup=0)
                t["privml"] = summarize(t["privml"].values + more["privml"].values)
            bench.record(key, {n: v.to_dict() for n, v in t.items()})
        else:
            t = bench.interleave(variants, reps=reps, warmup=1 if first else 0, key=key)
        first = False
        p = t["privml"]
        if "per-site baseline" in t:
            b = t["per-site baseline"]
            r = summarize([v / p.median for v in b.values]) if long_anchor else ratios(b, p)
            bench.record(f"load_ratio_{n_sites}x{rows}", r.to_dict())
            rows_out.append(
                [
                    f"{n_sites:,} x {rows}",
                    fmt_spread(p, digits=2, unit="s"),
                    fmt_spread(b, digits=2, unit="s") + (" (one run)" if long_anchor else ""),
                    fmt_ratio(r),
                ]  # fmt: skip
            )
        else:
            rows_out.append(
                [f"{n_sites:,} x {rows}", fmt_spread(p, digits=2, unit="s"), "not run", "-"]
            )
    bench.table(
        "load",
        ["sites x records", "privml load_federation", "per-site baseline", "speed-up"],
        rows_out,
        caption=(
            f"Loading, checking, splitting and encoding the synthetic dataset (12 encoded "
            f"features), median (min-max) of {reps} interleaved repetitions (above "
            f"{ANCHOR_REPEATED_UP_TO:,} sites the baseline runs once, beside privml's first, and "
            "the speed-up is its time over privml's median); the baseline is privml's previous "
            "site-by-site pandas loader."
        ),
    )


def memory_table(bench: Bench, pair: int, target: int, rows: int, reps: int) -> None:
    results: dict[str, list[dict[str, Any]]] = {"privml": [], "baseline": [], "target": []}

    def run(key: str, impl: str, n: int) -> float:
        r = run_child(impl, n, rows)
        results[key].append(r)
        return float(r["load_s"])

    bench.interleave(
        {
            "privml": lambda: run("privml", "privml", pair),
            "per-site baseline": lambda: run("baseline", "baseline", pair),
        },
        reps=reps,
        warmup=0,  # every run is a fresh process: nothing to warm up
    )
    if target == pair:  # the same run (quick mode): not repeated
        results["target"] = list(results["privml"])
    else:
        bench.interleave({"privml": lambda: run("target", "privml", target)}, reps=reps, warmup=0)
    table = []
    for key, label, n in (
        ("privml", "privml", pair),
        ("baseline", "per-site baseline", pair),
        ("target", "privml", target),
    ):
        rs = results[key]
        peak = [r["peak_rss"] for r in rs]
        run_bytes = [r["peak_rss"] - r["rss_start"] for r in rs]
        loaded = [r["rss_after_load"] - r["rss_start"] for r in rs]
        records = rs[0]["records"]
        bench.record(f"memory_{key}", rs)
        table.append(
            [
                label,
                f"{n:,} x {rows:,} ({records / 1e6:.1f} M records)",
                f"{np.median(peak) / 2**30:.2f} GiB ({min(peak) / 2**30:.2f}-"
                f"{max(peak) / 2**30:.2f})",
                f"{np.median(run_bytes) / records:.0f}",
                f"{np.median(loaded) / records:.0f}",
                f"{np.median([r['load_s'] for r in rs]):.1f} s",
                f"{np.median([r['simulate_s'] for r in rs]):.1f} s",
            ]
        )
    bench.table(
        "memory",
        [
            "loader",
            "sites x records",
            "peak RSS",
            "run bytes/record",
            "kept bytes/record",
            "load",
            "one round",
        ],  # fmt: skip
        table,
        caption=(
            f"A whole run in a fresh process (load, then one FedAvg round of the logistic model "
            f"over every site, 1 local epoch, batch 32): peak resident memory, median (min-max) "
            f"of {reps} runs. Bytes per record count the growth over the process's memory "
            "before any data (Python, numpy, pandas, torch): at the peak of the run ('run') and "
            f"once loaded ('kept'); the encoded data is {BYTES_ENCODED} bytes per record (12 "
            "float32 features and an int64 label)."
        ),
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        warnings.simplefilter("ignore")
        impl, n, rows = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(child(impl, n, rows)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--anchor-max-sites", type=int, default=None)
    args = ap.parse_args()
    p = dict(QUICK if args.quick else FULL)
    if args.reps:
        p["reps"] = args.reps
    if args.anchor_max_sites is not None:
        p["anchor_max_sites"] = args.anchor_max_sites
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)  # the same for both loaders (they are numpy/pandas bound)
    bench = Bench("data_scale", quick=args.quick, out=args.out, params=p)
    load_table(bench, p["sizes"], p["reps"], p["anchor_max_sites"])
    memory_table(bench, p["pair_sites"], p["memory_sites"], p["memory_rows"], p["memory_reps"])
    bench.write()


if __name__ == "__main__":
    main()
