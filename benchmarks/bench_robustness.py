"""Robustness table: each aggregator's accuracy with no attack and under each attack kind.

Setting: breast cancer split IID over 10 sites, 20 rounds, every site every round,
logistic regression with the demo's local SGD (lr 8, 5 local epochs, batch 32); 2 of the 10
sites are Byzantine (``[attack] fraction = 0.2``, drawn per seed) and run each attack with its
default parameters: ``sign_flip`` (-10 x own update), ``scale`` (10 x own update),
``gaussian`` (N(0, 1) noise vectors), ``label_flip`` (train on flipped labels), ``alie``
(Baruch et al. 2019, z from the paper's formula; omniscient), ``ipm`` (Xie et al. 2020,
epsilon 0.1; omniscient), plus two stronger settings of the omniscient attacks (``alie_z1``:
z = 1; ``ipm_eps10``: epsilon = 10). Each cell is the median over ``--seeds`` seeds of the
accuracy on the pooled held-out records; a seed changes the data split, the attackers, the
model's initialisation and the batches.

An accuracy table (no anchor library to time against): the reference is FedAvg with no attack,
and the majority-class rate of the pooled test set is recorded beside it. Every accuracy goes
to the JSON results (benchmarks/harness.py).

Run: ``.venv/bin/python benchmarks/bench_robustness.py [--seeds 5] [--rounds 20] [--quick]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data.federation import load_federation  # noqa: E402
from privml.fl.aggregate import AGGREGATORS  # noqa: E402
from privml.fl.engine import simulate  # noqa: E402
from privml.pipeline import model_spec  # noqa: E402

# (column, kind, parameters): the six kinds with their defaults, then two stronger settings of
# the omniscient attacks: ALIE with z = 1 (the formula gives z = 0.25 for n = 10, f = 2) and IPM
# with epsilon = 10 (> (n - f) / f = 4, which reverses the mean).
ATTACKS: list[tuple[str, str | None, dict[str, float]]] = [
    ("none", None, {}),
    ("sign_flip", "sign_flip", {}),
    ("scale", "scale", {}),
    ("gaussian", "gaussian", {}),
    ("label_flip", "label_flip", {}),
    ("alie", "alie", {}),
    ("ipm", "ipm", {}),
    ("alie_z1", "alie", {"z": 1.0}),
    ("ipm_eps10", "ipm", {"epsilon": 10.0}),
]
COLUMNS = [c for c, _, _ in ATTACKS]
ORDER = [
    "fedavg",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "norm_bound",
    "fltrust",
    "centered_clip",
]


def _config(
    seed: int, rounds: int, aggregator: str, attack: str | None, params: dict[str, float]
) -> Any:
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid", "seed": seed},
        "training": {
            "rounds": rounds,
            "local_epochs": 5,
            "batch_size": 32,
            "lr": 8.0,
            "seed": seed,
            "aggregator": aggregator,
        },
    }
    if attack is not None:
        raw["attack"] = {"kind": attack, "fraction": 0.2, **params}
    return parse_config(raw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, default=None, help="default 5 (quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="default 20 (quick 2)")
    args = ap.parse_args()
    seeds = args.seeds or (1 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 20)
    assert set(ORDER) == set(AGGREGATORS), "update ORDER with the registry"
    bench = Bench(
        "robustness", quick=args.quick, out=args.out, params={"seeds": seeds, "rounds": rounds}
    )

    acc: dict[str, dict[str, list[float]]] = {a: {k: [] for k in COLUMNS} for a in ORDER}
    majority: list[float] = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        base = _config(seed, rounds, "fedavg", None, {})
        fed = load_federation(base)
        spec = model_spec(base, fed)
        _, y_test = fed.pooled_test()
        majority.append(float(max(y_test.mean(), 1 - y_test.mean())))
        for name in ORDER:
            for column, kind, params in ATTACKS:
                cfg = _config(seed, rounds, name, kind, params)
                res = simulate(fed, spec, cfg.training, attack=cfg.attack)
                acc[name][column].append(float(res.metrics["accuracy"]))
    elapsed = time.perf_counter() - t0

    med = {a: {k: statistics.median(v) for k, v in row.items()} for a, row in acc.items()}
    bench.record("accuracy", acc)
    bench.record("median", med)
    bench.record("majority_class", majority)
    bench.record("seconds", elapsed)
    clean = med["fedavg"]["none"]
    rows = []
    for name in ORDER:
        cells = []
        for k in COLUMNS:
            v = med[name][k]
            cells.append(f"**{v:.3f}**" if clean - v > 0.02 else f"{v:.3f}")
        rows.append([name, *cells])
    bench.table(
        "accuracy",
        ["aggregator", *COLUMNS],
        rows,
        caption=(
            f"Breast cancer IID over 10 sites, {rounds} rounds, 2 of 10 sites Byzantine; median "
            f"pooled test accuracy over {seeds} seed(s). Bold: more than 2 points below FedAvg's "
            f"clean accuracy ({clean:.3f}); the majority class is "
            f"{statistics.median(majority):.3f}."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
