"""Accuracy of distributed DP under SecAgg+ against central DP-FedAvg at the same epsilon.

Work: the demo's records (breast cancer, logistic regression, the demo's training settings:
20 rounds, 5 local epochs, batch 32, lr 8) split IID over 100 simulated sites, every site every
round, client-level DP at epsilon 1 (delta 1e-5, clip 1), through
:func:`privml.fl.training.train` (the code ``privml run`` uses) with a throw-away ledger:

* **central DP-FedAvg**: the server adds Gaussian noise to the sum of clipped updates
  (PLD accounting);
* **distributed DP** (``secure_aggregation = "secagg+"``): each site adds its discrete Gaussian
  share to its quantized update before masking; the noise is calibrated so that the shares of
  the SecAgg+ threshold's sites alone give epsilon 1 (zCDP accounting), so the sum carries
  ``n / threshold`` times the variance it needs when every site sends. Two settings: Flower's
  default neighbourhood (share count 15, threshold 8) and a larger one (share count 31,
  threshold 28) that trades Shamir work for less noise.

Baselines: the same federation without DP, and the majority class. Each variant runs with the
same seeds (model initialisation, client order, and the noise source, made reproducible from the
seed for the benchmark only); accuracy is on the held-out test records.

    nice -n 10 .venv/bin/python benchmarks/bench_distributed_dp.py [--seeds 5] [--quick]
"""

from __future__ import annotations

import argparse
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

VARIANTS: dict[str, dict[str, Any]] = {
    "no DP (FedAvg)": {"privacy": None, "training": {}},
    "central DP-FedAvg": {"privacy": "client", "training": {}},
    "distributed DP, SecAgg+ k = 15, t = 8": {
        "privacy": "client", "training": {"secure_aggregation": "secagg+"}},
    "distributed DP, SecAgg+ k = 31, t = 28": {
        "privacy": "client",
        "training": {"secure_aggregation": "secagg+", "secagg_share_count": 31,
                     "secagg_threshold": 28}},
}  # fmt: skip


def config(variant: str, seed: int, n_sites: int, rounds: int, ledger: Path) -> Any:
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
    return {
        "accuracy": float(res.metrics["accuracy"]),
        "seconds": seconds,
        "majority": majority,
        "epsilon": priv.get("epsilon") if priv.get("mode") != "none" else None,
        "noise_multiplier": priv.get("noise_multiplier"),
        "threshold": (priv.get("distributed") or {}).get("calibrated_for_senders"),
        "skipped_rounds": res.extra["updates"]["skipped_rounds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick 1)")
    args = ap.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    n_sites, rounds = (8, 2) if args.quick else (100, 20)
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
        a = acc[v]
        diff = [x - c for x, c in zip(a, acc[central], strict=True)]
        z = got[v][0]["noise_multiplier"]
        t = got[v][0].get("threshold")
        full = "-" if z is None else f"{z:.1f}" if t is None else f"{z * (n_sites / t) ** 0.5:.1f}"
        degenerate = (
            " (degenerate: the majority class)"
            if statistics.mean(a) <= (got[v][0]["majority"] + 0.005)
            else ""
        )
        spread = f"{statistics.median(a):.4f} ({min(a):.4f}-{max(a):.4f})"
        rows.append([
            v + degenerate, f"{statistics.mean(a):.4f}", spread,
            "" if v == central or got[v][0]["epsilon"] is None
            else f"{100 * statistics.mean(diff):+.1f}",
            "-" if z is None else f"{z:.1f}", full,
            f"{statistics.median(r['seconds'] for r in got[v]):.1f}",
        ])  # fmt: skip
    majority = got[central][0]["majority"]
    rows.append(["majority class", f"{majority:.4f}", "", "", "", "", ""])
    bench.table("accuracy", ["variant", "mean accuracy", "median (min-max)",
                             "points vs central (mean of paired seeds)",
                             "noise std / clip at the threshold",
                             "noise std / clip, all sites' shares", "seconds per run"], rows,
                caption=f"Demo records IID over {n_sites} sites, client-level DP at epsilon "
                f"{EPSILON:g} (delta 1e-5, clip 1), {rounds} rounds, {seeds} seeds; test "
                "accuracy")  # fmt: skip
    best = max((v for v in variants if v.startswith("distributed")),
               key=lambda v: statistics.mean(acc[v]))  # fmt: skip
    gap = 100 * (statistics.mean(acc[central]) - statistics.mean(acc[best]))
    bench.table("targets", ["target", "measured", "status"], [
        [f"distributed DP within 2 points of central DP-FedAvg at epsilon {EPSILON:g} "
         f"({n_sites} sites)", f"{best}: {gap:.1f} points below central (mean of "
         f"{seeds} seeds)", "met" if gap <= 2 else "**not met**"],
    ], caption="Target of distributed DP")  # fmt: skip
    bench.write()


if __name__ == "__main__":
    main()
