"""Accuracy of distributed DP under SecAgg+ against central DP-FedAvg at the same epsilon.

Work: the demo's records (breast cancer, logistic regression, the demo's training settings:
20 rounds, 5 local epochs, batch 32, lr 8) split IID over 100 simulated sites, every site every
round, client-level DP at epsilon 1 (delta 1e-5, clip 1), through
:func:`privml.fl.training.train` (the code ``privml run`` uses) with a throw-away ledger:

* **central DP-FedAvg**: the server adds Gaussian noise to the sum of clipped updates
  (PLD accounting);
* **distributed DP** (``secure_aggregation = "secagg+"``, Flower's default neighbourhood:
  share count 15, threshold 8): each site adds its discrete Gaussian share to its quantized
  update before masking (zCDP accounting); the noise is calibrated so that ``m`` shares alone
  give epsilon 1 and the sites refuse to unmask a sum of fewer than ``m`` senders. Two
  calibrations: ``m`` = 90% of the sites (the default: 10% may drop out) and, for contrast,
  ``m`` = the SecAgg+ threshold (the sum of all sites then carries ``n / t`` times the
  variance it needs).

Baselines: the same federation without DP, and the majority class. Each variant runs with the
same seeds (model initialisation, client order, and the noise source, made reproducible from the
seed for the benchmark only), in a rotating order; accuracy is on the held-out test records.
A second table splits the noise gap to central DP-FedAvg into its causes (computed from each
run's plan: accounting, rounding, the discrete sum, ``m`` below ``n``).

    nice -n 10 .venv/bin/python benchmarks/bench_distributed_dp.py [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data.federation import load_federation  # noqa: E402
from privml.dp.randomness import reproducible_noise  # noqa: E402
from privml.fl.training import train  # noqa: E402
from privml.pipeline import model_spec  # noqa: E402

EPSILON = 1.0
DEFAULT = "distributed DP, m = 90% of the sites (default)"
THRESHOLD = "distributed DP, m = SecAgg+ threshold (for contrast)"

VARIANTS: dict[str, dict[str, Any]] = {
    "no DP (FedAvg)": {"privacy": None, "training": {}},
    "central DP-FedAvg": {"privacy": "client", "training": {}},
    DEFAULT: {"privacy": "client", "training": {"secure_aggregation": "secagg+"}},
    THRESHOLD: {"privacy": "client", "training": {"secure_aggregation": "secagg+"},
                "min_senders": "threshold"},
}  # fmt: skip


def config(variant: str, seed: int, n_sites: int, rounds: int, ledger: Path) -> Any:
    from privml.fl.secagg import SecAggParams

    v = VARIANTS[variant]
    training = {"rounds": rounds, "local_epochs": 5, "batch_size": 32, "lr": 8.0, "seed": seed,
                "max_update_norm": 100.0, **v["training"]}  # fmt: skip
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": n_sites, "partition": "iid"},
        "model": {"kind": "logistic"},
        "training": training,
        "output": {"html": False},
    }
    if v["privacy"] is not None:
        raw["privacy"] = {"mode": v["privacy"], "epsilon": EPSILON, "clip": 1.0,
                          "ledger": str(ledger)}  # fmt: skip
        if v.get("min_senders") == "threshold":
            _, t = SecAggParams(None, None, 1.0, 2, 4, 1.0, 1).for_cohort(n_sites)
            raw["privacy"]["distributed_min_senders"] = t
    return parse_config(raw, name="distributed_dp_bench")


def run_one(variant: str, seed: int, n_sites: int, rounds: int, tmp: Path) -> dict[str, Any]:
    cfg = config(variant, seed, n_sites, rounds, tmp / f"ledger-{variant[:7]}-{seed}.sqlite")
    fed = load_federation(cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), reproducible_noise():
        warnings.simplefilter("ignore")
        out = train(cfg, fed, model_spec(cfg, fed))
    seconds = time.perf_counter() - t0
    res = out.result
    y = np.concatenate([s.y_test for s in fed.sites])
    majority = float(max(np.mean(y == 1), np.mean(y == 0)))
    priv = out.privacy
    dd = priv.get("distributed") or {}
    full = None
    if dd:  # the noise std of the sum of every site's share, in units of the clip
        full = math.sqrt(n_sites) * dd["site_sigma_units"] / dd["scale_units_per_unit"] / dd["clip"]
    return {
        "accuracy": float(res.metrics["accuracy"]),
        "seconds": seconds,
        "majority": majority,
        "epsilon": priv.get("epsilon") if priv.get("mode") != "none" else None,
        "noise_multiplier": priv.get("noise_multiplier"),
        "noise_multiplier_all_sites": full if dd else priv.get("noise_multiplier"),
        "min_senders": dd.get("min_senders"),
        "distributed": {k: dd[k] for k in ("rho_per_round", "l2_sensitivity_units",
                                            "scale_units_per_unit", "site_sigma_units", "clip",
                                            "calibrated_for_senders", "modulus")} if dd else None,
        "skipped_rounds": res.extra["updates"]["skipped_rounds"],
    }  # fmt: skip


def _paired(diff: list[float]) -> str:
    """Mean +- standard error (min to max) of paired differences, in points."""
    d = [100 * x for x in diff]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return f"{statistics.mean(d):+.1f} +- {se:.1f} ({min(d):+.1f} to {max(d):+.1f})"


def cost_rows(central: dict[str, Any], dist: dict[str, Any], n_sites: int) -> list[list[str]]:
    """The noise std (in clips) of each step from central DP-FedAvg to distributed DP."""
    d = dist["distributed"]
    z0 = float(central["noise_multiplier"])
    clip, scale, rho = d["clip"], d["scale_units_per_unit"], d["rho_per_round"]
    m = d["calibrated_for_senders"]
    steps = [
        ("central DP-FedAvg: Gaussian, PLD accounting", z0),
        ("the same Gaussian under zCDP (RDP conversion), as the discrete sum is accounted",
         2 * clip / math.sqrt(2 * rho) / clip),
        ("+ conditional randomized rounding (sensitivity of the rounded update)",
         d["l2_sensitivity_units"] / scale / math.sqrt(2 * rho) / clip),
        (f"+ sum of {m} discrete Gaussian shares (Proposition 14's tau term)",
         math.sqrt(m) * d["site_sigma_units"] / scale / clip),
        (f"+ every one of the {n_sites} sites adds its share (calibrated for {m})",
         math.sqrt(n_sites) * d["site_sigma_units"] / scale / clip),
    ]  # fmt: skip
    return [[what, f"{z:.2f}", f"{100 * (z / z0 - 1):+.1f}%"] for what, z in steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick 1)")
    args = ap.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    n_sites, rounds = (8, 1) if args.quick else (100, 20)
    variants = list(VARIANTS) if not args.quick else list(VARIANTS)[:3]
    torch.set_num_threads(1)
    bench = Bench("distributed_dp", quick=args.quick, out=args.out,
                  params={"sites": n_sites, "rounds": rounds, "seeds": seeds,
                          "epsilon": EPSILON, "delta": 1e-5, "clip": 1.0})  # fmt: skip
    got: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):  # every variant on each seed, in a rotating order
            k = seed % len(variants)
            for v in variants[k:] + variants[:k]:
                got[v].append(run_one(v, seed, n_sites, rounds, Path(tmp)))
                print(f"seed {seed} {v}: {got[v][-1]}", flush=True)
    bench.record("runs", got)
    acc = {v: [r["accuracy"] for r in rs] for v, rs in got.items()}
    central = "central DP-FedAvg"
    rows = []
    for v in variants:
        a, r0 = acc[v], got[v][0]
        diff = [x - c for x, c in zip(a, acc[central], strict=True)]
        z, full = r0["noise_multiplier"], r0["noise_multiplier_all_sites"]
        degenerate = (
            " (degenerate: the majority class)"
            if statistics.mean(a) <= (r0["majority"] + 0.005)
            else ""
        )
        skipped = sum(sum(r["skipped_rounds"].values()) for r in got[v])
        n_deg = sum(x <= r0["majority"] + 0.005 for x in a)
        spread = f"{statistics.median(a):.4f} ({min(a):.4f}-{max(a):.4f})"
        rows.append([
            v + degenerate, "-" if r0["min_senders"] is None else str(r0["min_senders"]),
            f"{statistics.mean(a):.4f}", spread,
            "" if v == central or r0["epsilon"] is None else _paired(diff),
            "-" if z is None else f"{z:.1f}", "-" if full is None else f"{full:.1f}",
            f"{n_deg} of {len(a)}", str(skipped),
            f"{statistics.median(r['seconds'] for r in got[v]):.1f}",
        ])  # fmt: skip
    majority = got[central][0]["majority"]
    rows.append(["majority class", "", f"{majority:.4f}", "", "", "", "", "", "", ""])
    bench.table("accuracy", ["variant", "m", "mean accuracy", "median (min-max)",
                             "points vs central, paired seeds: mean +- s.e. (min to max)",
                             "noise std / clip, m senders (the least released)",
                             "noise std / clip, all sites send",
                             "degenerate runs (at the majority class or below)",
                             "rounds skipped", "seconds per run"], rows,
                caption=f"Demo records IID over {n_sites} sites, client-level DP at epsilon "
                f"{EPSILON:g} (delta 1e-5, clip 1), {rounds} rounds, {seeds} seeds; test "
                "accuracy")  # fmt: skip
    bench.table("noise_cost", ["step", "noise std / clip of the sum", "vs central"],
                cost_rows(got[central][0], got[DEFAULT][0], n_sites),
                caption=f"Where distributed DP's extra noise comes from (m = 90% of {n_sites} "
                "sites, epsilon 1, from the runs' plans)")  # fmt: skip
    gaps = [c - x for x, c in zip(acc[DEFAULT], acc[central], strict=True)]
    gap = 100 * statistics.mean(gaps)
    se = 100 * statistics.stdev(gaps) / math.sqrt(len(gaps)) if len(gaps) > 1 else None
    bench.record("default_gap_points", gap)
    bench.record("default_gap_standard_error", se)
    bench.table("targets", ["target", "measured", "status"], [
        [f"distributed DP within 2 points of central DP-FedAvg at epsilon {EPSILON:g} "
         f"({n_sites} sites)", f"{DEFAULT}: {gap:+.1f} +- {se or 0:.1f} (s.e.) points below "
         f"central (mean of {seeds} paired seeds)", "met" if gap <= 2 else "**not met**"],
    ], caption="Target of distributed DP")  # fmt: skip
    bench.write()


if __name__ == "__main__":
    main()
