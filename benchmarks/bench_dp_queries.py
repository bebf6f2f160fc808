"""Noisy-query throughput on a 1,000,000-row site: privml against OpenDP, in one process.

Run:  .venv/bin/python benchmarks/bench_dp_queries.py [--rows 1000000] [--repeats 7]

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

Prints the median of ``--repeats`` timings of each, queries/s, rows/s and the ratio
OpenDP time / privml time (> 1: privml faster). Figures go to docs/benchmarks_dp.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import opendp.prelude as dp
import pandas as pd

from privml.dp.queries import answer_query, bounded_mean, bounded_sum

warnings.filterwarnings("ignore")
dp.enable_features("contrib")


@dataclass
class Col:
    type: str
    min: float | None = None
    max: float | None = None
    values: list[Any] | None = None


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    fn()  # warm-up (caches, first OpenDP construction)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ages = rng.uniform(0, 100, args.rows)
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
    print(
        f"OpenDP privacy maps: sum eps={od_sum.map(1):.4g}, "
        f"mean eps={od_mean_parts.map(1):.4g} (privml books exactly {eps})"
    )
    listed = ages.tolist()

    def od_mean(data: list[float]) -> float:
        s, n = od_mean_parts(data)
        return min(hi, max(lo, s / max(n, 1)))

    cases: list[tuple[str, str, Callable[[], Any]]] = [
        ("sum", "privml", lambda: bounded_sum(ages, lower=lo, upper=hi, epsilon=eps).value),
        ("sum", "opendp", lambda: od_sum(ages.tolist())),
        ("sum", "opendp, pre-listed", lambda: od_sum(listed)),
        ("mean", "privml", lambda: bounded_mean(ages, lower=lo, upper=hi, epsilon=eps).value),
        ("mean", "opendp", lambda: od_mean(ages.tolist())),
        ("mean", "opendp, pre-listed", lambda: od_mean(listed)),
        (
            "mean",
            "privml answer_query(frame)",
            lambda: answer_query(frame, "mean(age)", schema=schema, epsilon=eps).value,
        ),
    ]
    print(f"rows = {args.rows:,}, repeats = {args.repeats}, epsilon = {eps}")
    print(f"{'query':<6} {'implementation':<28} {'median s':>10} {'queries/s':>10} {'Mrows/s':>9}")
    medians: dict[tuple[str, str], float] = {}
    for query, impl, fn in cases:
        t, value = median_time(fn, args.repeats)
        medians[(query, impl)] = t
        print(
            f"{query:<6} {impl:<28} {t:>10.4f} {1 / t:>10.1f} {args.rows / t / 1e6:>9.1f}"
            f"   (value {float(value):.4f})"
        )
    print("ratios OpenDP time / privml time (> 1 means privml is faster):")
    for query in ("sum", "mean"):
        base = medians[(query, "privml")]
        print(
            f"  {query}: {medians[(query, 'opendp')] / base:.2f}x with list conversion, "
            f"{medians[(query, 'opendp, pre-listed')] / base:.2f}x pre-listed"
        )


if __name__ == "__main__":
    main()
