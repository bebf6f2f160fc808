"""Noisy-query throughput on a 1,000,000-row site: privml against OpenDP, in one process.

Run:  .venv/bin/python benchmarks/bench_dp_queries.py [--rows 1000000] [--reps 7] [--quick]

Same data (one float column, ages uniform in [0, 100], declared bounds [0, 100]), same
epsilon = 1, same kind of release, both with secure (OpenDP) samplers:

* sum  -- clamp to [0, 100], sum, Laplace noise with scale 100 / epsilon.
  privml: ``bounded_sum(array, lower=0, upper=100, epsilon=1)``.
  OpenDP: ``make_clamp >> then_sum >> then_laplace`` on the column as a Python list (the input
  type OpenDP's vector API takes), timed with the list conversion ("opendp") and once more
  on a list converted before the clock starts ("opendp, pre-listed").
* mean -- unknown n: noisy sum and noisy count, epsilon / 2 each.
  privml: ``bounded_mean`` (centred sum / count). OpenDP: ``make_basic_composition`` of the
  clamped sum (Laplace) and the count (discrete Laplace), divided afterwards.
* privml end to end: ``answer_query(frame, "mean(age)")`` on a pandas DataFrame, parsing and
  schema checks included (no ledger).

Each repetition runs every variant of a query once, in rotating order, after one warm-up run of
each (benchmarks/harness.py); reported: medians with min-max, queries/s, rows/s and the
per-repetition ratio OpenDP time / privml time (> 1: privml faster). Tables go to
docs/benchmarks_dp.md (benchmarks/render_docs.py).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import opendp.prelude as dp
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.dp.queries import answer_query, bounded_mean, bounded_sum  # noqa: E402

warnings.filterwarnings("ignore")
dp.enable_features("contrib")


@dataclass
class Col:
    type: str
    min: float | None = None
    max: float | None = None
    values: list[Any] | None = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rows", type=int, default=None, help="default 1,000,000 (quick 5,000)")
    parser.add_argument("--reps", type=int, default=None, help="default 7 (quick 2)")
    args = parser.parse_args()
    n_rows = args.rows or (5_000 if args.quick else 1_000_000)
    reps = args.reps or (1 if args.quick else 7)
    bench = Bench("dp_queries", quick=args.quick, out=args.out,
                  params={"rows": n_rows, "reps": reps, "epsilon": 1.0})  # fmt: skip
    rng = np.random.default_rng(0)
    ages = rng.uniform(0, 100, n_rows)
    frame = pd.DataFrame({"age": ages})
    schema = {"age": Col("numeric", 0.0, 100.0)}
    eps, lo, hi = 1.0, 0.0, 100.0

    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.symmetric_distance()
    od_sum = (
        dp.t.make_clamp(*space, bounds=(lo, hi))
        >> dp.t.then_sum()
        >> dp.m.then_laplace(scale=hi / eps)
    )
    od_count = dp.t.make_count(*space) >> dp.m.then_laplace(scale=2.0 / eps)
    od_half_sum = (
        dp.t.make_clamp(*space, bounds=(lo, hi))
        >> dp.t.then_sum()
        >> dp.m.then_laplace(scale=2.0 * hi / eps)
    )
    od_mean_parts = dp.c.make_basic_composition([od_half_sum, od_count])
    privacy_maps = {"opendp_sum": float(od_sum.map(1)), "opendp_mean": float(od_mean_parts.map(1))}
    bench.record("opendp_privacy_maps", privacy_maps)
    listed = ages.tolist()

    def od_mean(data: list[float]) -> float:
        s, n = od_mean_parts(data)
        return min(hi, max(lo, s / max(n, 1)))

    def void(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            fn()

        return run

    queries: dict[str, dict[str, Callable[[], None]]] = {
        "sum": {
            "privml bounded_sum": void(
                lambda: bounded_sum(ages, lower=lo, upper=hi, epsilon=eps).value
            ),
            "OpenDP (with list conversion)": void(lambda: od_sum(ages.tolist())),
            "OpenDP (pre-listed)": void(lambda: od_sum(listed)),
        },
        "mean": {
            "privml bounded_mean": void(
                lambda: bounded_mean(ages, lower=lo, upper=hi, epsilon=eps).value
            ),
            "OpenDP (with list conversion)": void(lambda: od_mean(ages.tolist())),
            "OpenDP (pre-listed)": void(lambda: od_mean(listed)),
            "privml answer_query(frame, 'mean(age)')": void(
                lambda: answer_query(frame, "mean(age)", schema=schema, epsilon=eps).value
            ),
        },
    }
    rows = []
    for query, variants in queries.items():
        t = bench.interleave(variants, reps=reps, warmup=0 if args.quick else 1, key=query)
        ours = next(iter(t.values()))
        for name, s in t.items():
            r = ratios(s, ours)
            bench.record(f"{query}_ratio_{name}", r.to_dict())
            rows.append(
                [query, name, fmt_spread(s, 1e3, 1, "ms"), f"{1 / s.median:,.1f}",
                 f"{n_rows / s.median / 1e6:,.1f}", "1" if s is ours else fmt_ratio(r)]  # fmt: skip
            )
    bench.table(
        "queries",
        ["query", "implementation", "time", "queries/s", "M rows/s", "time / privml's"],
        rows,
        caption=(
            f"One noisy answer on {n_rows:,} rows (uniform in the declared bounds [0, 100]), "
            f"epsilon = 1, median (min-max) of {reps} interleaved repetitions. OpenDP's privacy "
            f"maps: sum {privacy_maps['opendp_sum']:.4g}, mean "
            f"{privacy_maps['opendp_mean']:.4g} (privml books exactly 1)."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
