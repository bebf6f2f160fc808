"""Accountant time for 10^4 DP-SGD steps: privml against dp-accounting (and Opacus), one process.

Run:  .venv/bin/python benchmarks/bench_dp_accounting.py [--repeats 5] [--opacus]

Setting: Abadi et al. 2016, Poisson rate q = 0.01, noise multiplier 4, 10,000 steps,
delta = 1e-5, plus a low-noise setting (noise multiplier 1.1) where PLD is slowest.

* privml ``compute_epsilon(accountant="pld")`` (automatic grid: a 1e-2 pass, then
  1e-4 * max(1, eps0)) against dp-accounting's ``PLDAccountant`` at its default grid 1e-4;
* privml ``compute_epsilon(accountant="rdp")`` against dp-accounting's ``RdpAccountant``;
* ``--opacus``: Opacus's ``RDPAccountant`` and ``PRVAccountant`` as well (imports torch);
* privml ``calibrate_noise_multiplier`` for target epsilon 1 and 8 (PLD and RDP), with the
  number of accountant evaluations and the epsilon reached.

Prints medians of ``--repeats`` runs, epsilons, and ratios library time / privml time.
Figures go to docs/benchmarks_dp.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import dp_accounting as dpa
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from privml.dp.accounting import _calibrate, compute_epsilon

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--opacus", action="store_true", help="also time Opacus (imports torch)")
    args = parser.parse_args()
    q, steps, delta = 0.01, 10_000, 1e-5
    for sigma in (4.0, 1.1):
        event = dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps
        )
        rows: list[tuple[str, float, float]] = []

        def lib_pld(ev: Any = event) -> float:
            return float(
                PLDAccountant(value_discretization_interval=1e-4).compose(ev).get_epsilon(delta)
            )

        def lib_rdp(ev: Any = event) -> float:
            return float(RdpAccountant().compose(ev).get_epsilon(delta))

        cases: list[tuple[str, Callable[[], float]]] = [
            (
                "privml pld (auto grid)",
                lambda s=sigma: compute_epsilon(
                    delta=delta, sampling_rate=q, noise_multiplier=s, steps=steps
                ),
            ),
            ("dp-accounting PLD (1e-4)", lib_pld),
            (
                "privml rdp",
                lambda s=sigma: compute_epsilon(
                    delta=delta, sampling_rate=q, noise_multiplier=s, steps=steps, accountant="rdp"
                ),
            ),
            ("dp-accounting RDP", lib_rdp),
        ]
        if args.opacus:
            from opacus.accountants import PRVAccountant, RDPAccountant

            def opacus_rdp(s: float = sigma) -> float:
                acc = RDPAccountant()
                acc.history = [(s, q, steps)]
                return float(acc.get_epsilon(delta))

            def opacus_prv(s: float = sigma) -> float:
                acc = PRVAccountant()
                acc.history = [(s, q, steps)]
                return float(acc.get_epsilon(delta))

            cases += [("opacus RDP", opacus_rdp), ("opacus PRV", opacus_prv)]
        print(f"\nq = {q}, noise multiplier = {sigma}, steps = {steps:,}, delta = {delta}")
        print(f"  {'accountant':<26} {'median s':>9} {'epsilon':>9}")
        for name, fn in cases:
            t, eps = median_time(fn, args.repeats)
            rows.append((name, t, eps))
            print(f"  {name:<26} {t:>9.3f} {eps:>9.4f}")
        times = {name: t for name, t, _ in rows}
        pld_ratio = times["dp-accounting PLD (1e-4)"] / times["privml pld (auto grid)"]
        rdp_ratio = times["dp-accounting RDP"] / times["privml rdp"]
        print(f"  ratio dp-accounting / privml: PLD {pld_ratio:.2f}x, RDP {rdp_ratio:.2f}x")
    print("\ncalibrate_noise_multiplier (q = 0.01, 10,000 steps, delta = 1e-5, tolerance 1%)")
    header = f"{'target':>6} {'accountant':<10} {'median s':>9} {'sigma':>8} {'epsilon':>9}"
    print(f"  {header} {'evals':>6}")
    for target in (1.0, 8.0):
        for kind in ("pld", "rdp"):
            t, res = median_time(
                lambda tg=target, k=kind: _calibrate(
                    target_epsilon=tg,
                    delta=delta,
                    sampling_rate=q,
                    steps=steps,
                    accountant=k,
                    tolerance=0.01,
                ),
                args.repeats,
            )
            print(
                f"  {target:>6} {kind:<10} {t:>9.3f} {res.noise_multiplier:>8.4f} "
                f"{res.epsilon:>9.4f} {res.evaluations:>6}"
            )


if __name__ == "__main__":
    main()
