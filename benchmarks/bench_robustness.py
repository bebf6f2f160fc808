"""Robustness table: each aggregator's accuracy with no attack and under each attack kind.

Setting (issue 5): breast cancer split IID over 10 sites, 20 rounds, every site every round,
logistic regression with the demo's local SGD (lr 8, 5 local epochs, batch 32); 2 of the 10
sites are Byzantine (``[attack] fraction = 0.2``, drawn per seed) and run each attack with its
default parameters: ``sign_flip`` (-10 x own update), ``scale`` (10 x own update),
``gaussian`` (N(0, 1) noise vectors), ``label_flip`` (train on flipped labels), ``alie``
(Baruch et al. 2019, z from the paper's formula; omniscient), ``ipm`` (Xie et al. 2020,
epsilon 0.1; omniscient), plus two stronger settings of the omniscient attacks (``alie_z1``:
z = 1; ``ipm_eps10``: epsilon = 10). Each cell is the median over ``--seeds`` seeds of the
accuracy on the pooled held-out records; a seed changes the data split, the attackers, the
model's initialisation and the batches.

Run: ``.venv/bin/python benchmarks/bench_robustness.py [--seeds 5] [--rounds 20] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from privml.config import parse_config
from privml.data.federation import load_federation
from privml.fl.aggregate import AGGREGATORS
from privml.fl.engine import simulate
from privml.pipeline import model_spec

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
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write every accuracy to this file")
    args = ap.parse_args()
    assert set(ORDER) == set(AGGREGATORS), "update ORDER with the registry"

    acc: dict[str, dict[str, list[float]]] = {a: {k: [] for k in COLUMNS} for a in ORDER}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        base = _config(seed, args.rounds, "fedavg", None, {})
        fed = load_federation(base)
        spec = model_spec(base, fed)
        for name in ORDER:
            for column, kind, params in ATTACKS:
                cfg = _config(seed, args.rounds, name, kind, params)
                res = simulate(fed, spec, cfg.training, attack=cfg.attack)
                acc[name][column].append(float(res.metrics["accuracy"]))
    elapsed = time.perf_counter() - t0

    med = {a: {k: statistics.median(v) for k, v in row.items()} for a, row in acc.items()}
    print(
        f"breast cancer IID, 10 sites, {args.rounds} rounds, 2 of 10 sites attacking; "
        f"median accuracy over {args.seeds} seeds ({elapsed:.0f} s)"
    )
    head = f"{'aggregator':<14}" + "".join(f"{k:>11}" for k in COLUMNS)
    print(head)
    print("-" * len(head))
    for name in ORDER:
        print(f"{name:<14}" + "".join(f"{med[name][k]:>11.3f}" for k in COLUMNS))
    clean = med["fedavg"]["none"]
    print(f"\nwithin 2 points of FedAvg's clean accuracy ({clean:.3f}) -- 'ok', else the drop:")
    print(f"{'aggregator':<14}" + "".join(f"{k:>11}" for k in COLUMNS[1:]))
    for name in ORDER:
        cells = []
        for k in COLUMNS[1:]:
            drop = clean - med[name][k]
            cells.append(f"{'ok' if drop <= 0.02 else f'-{drop:.3f}':>11}")
        print(f"{name:<14}" + "".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setting": vars(args), "accuracy": acc, "median": med}, f, indent=2)


if __name__ == "__main__":
    main()
