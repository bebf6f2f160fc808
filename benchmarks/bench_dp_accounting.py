"""Accountant time for 10^4 DP-SGD steps: privml against dp-accounting (and Opacus), one process.

Run:  .venv/bin/python benchmarks/bench_dp_accounting.py [--reps 5] [--opacus] [--quick]

Setting: Abadi et al. 2016, Poisson rate q = 0.01, noise multiplier 4, 10,000 steps,
delta = 1e-5, plus a low-noise setting (noise multiplier 1.1) where PLD is slowest.

* privml ``compute_epsilon(accountant="pld")`` (automatic grid: a 1e-2 pass, then
  1e-4 * max(1, eps0)) against dp-accounting's ``PLDAccountant`` at its default grid 1e-4;
* privml ``compute_epsilon(accountant="rdp")`` against dp-accounting's ``RdpAccountant``;
* ``--opacus``: Opacus's ``RDPAccountant`` and ``PRVAccountant`` as well (imports torch);
* privml ``calibrate_noise_multiplier`` for target epsilon 1 and 8 (PLD and RDP), with the
  number of accountant evaluations and the epsilon reached.

Each repetition runs every accountant once, in rotating order, after one warm-up run of each
(benchmarks/harness.py); reported: medians with min-max, epsilons, and per-repetition ratios
library time / privml time. Tables go to docs/benchmarks_dp.md (benchmarks/render_docs.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dp_accounting as dpa
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.dp.accounting import _calibrate, compute_epsilon  # noqa: E402

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--reps", type=int, default=None, help="default 5 (quick 2)")
    parser.add_argument("--opacus", action="store_true", help="also time Opacus (imports torch)")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    warmup = 0 if args.quick else 1  # quick: proof that it runs, no warm-up repetition
    q, delta = 0.01, 1e-5
    steps = 100 if args.quick else 10_000
    bench = Bench("dp_accounting", quick=args.quick, out=args.out,
                  params={"reps": reps, "q": q, "steps": steps, "delta": delta})  # fmt: skip
    rows = []
    for sigma in (4.0,) if args.quick else (4.0, 1.1):
        event = dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps
        )
        eps: dict[str, float] = {}

        def keep(
            name: str, fn: Callable[[], float], eps: dict[str, float] = eps
        ) -> Callable[[], None]:
            def run() -> None:
                eps[name] = float(fn())

            return run

        def lib_pld(ev: Any = event) -> float:
            return float(
                PLDAccountant(value_discretization_interval=1e-4).compose(ev).get_epsilon(delta)
            )

        def lib_rdp(ev: Any = event) -> float:
            return float(RdpAccountant().compose(ev).get_epsilon(delta))

        cases: dict[str, Callable[[], float]] = {
            "privml PLD (automatic grid)": lambda s=sigma: compute_epsilon(
                delta=delta, sampling_rate=q, noise_multiplier=s, steps=steps
            ),
            "dp-accounting PLD (grid 1e-4)": lib_pld,
            "privml RDP": lambda s=sigma: compute_epsilon(
                delta=delta, sampling_rate=q, noise_multiplier=s, steps=steps, accountant="rdp"
            ),
            "dp-accounting RDP": lib_rdp,
        }
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

            cases |= {"Opacus RDP": opacus_rdp, "Opacus PRV": opacus_prv}
        t = bench.interleave(
            {k: keep(k, f) for k, f in cases.items()},
            reps=reps,
            warmup=warmup,
            key=f"sigma_{sigma}",
        )
        bench.record(f"sigma_{sigma}_epsilon", eps)
        for name, s in t.items():
            ours = t["privml RDP" if "RDP" in name else "privml PLD (automatic grid)"]
            r = ratios(s, ours)
            if not name.startswith("privml"):
                bench.record(f"sigma_{sigma}_ratio_{name}", r.to_dict())
            rows.append(
                [f"{sigma}", name, fmt_spread(s, digits=3, unit="s"), f"{eps[name]:.4f}",
                 "1" if s is ours else fmt_ratio(r)]  # fmt: skip
            )
    bench.table(
        "accountants",
        ["noise multiplier", "accountant", "time", "epsilon", "time / privml's"],
        rows,
        caption=(
            f"Epsilon of DP-SGD after {steps:,} steps at Poisson rate q = {q}, delta = {delta} "
            f"(Abadi et al. 2016), median (min-max) of {reps} interleaved repetitions; the last "
            "column compares each library with privml's accountant of the same kind (PLD or RDP)."
        ),
    )
    rows = []
    for target in (1.0,) if args.quick else (1.0, 8.0):
        for kind in ("pld", "rdp"):
            got: dict[str, Any] = {}

            def calibrate(tg: float = target, k: str = kind, got: dict[str, Any] = got) -> None:
                got["res"] = _calibrate(
                    target_epsilon=tg,
                    delta=delta,
                    sampling_rate=q,
                    steps=steps,
                    accountant=k,
                    tolerance=0.01,
                )

            t = bench.interleave(
                {"calibrate": calibrate},
                reps=reps,
                warmup=warmup,
                key=f"calibrate_{target}_{kind}",
            )
            res = got["res"]
            rows.append(
                [f"{target}", kind.upper(), fmt_spread(t["calibrate"], digits=3, unit="s"),
                 f"{res.noise_multiplier:.4f}", f"{res.epsilon:.4f}",
                 str(res.evaluations)]  # fmt: skip
            )
    bench.table(
        "calibration",
        ["target epsilon", "accountant", "time", "noise multiplier", "epsilon", "evaluations"],
        rows,
        caption=(
            f"privml's calibrate_noise_multiplier (q = {q}, {steps:,} steps, delta = {delta}, "
            f"tolerance 1%), median (min-max) of {reps} runs; no library calibrates directly."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
