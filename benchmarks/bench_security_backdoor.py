"""Federated backdoor (Bagdasaryan et al. 2020) against privml's defence, with its baselines.

Run:  .venv/bin/python benchmarks/bench_security_backdoor.py [--quick] [--seeds 5]

* **non-IID demo**: the demo's breast-cancer records over 4 hospitals with Dirichlet(0.5)
  label skew (``[data] partition = "dirichlet"``), the demo's logistic regression and training
  settings (20 rounds of 5 local epochs, lr 8). Hospital 0 is the attacker: it picks a trigger
  the clean model does not obey (``privml.security.experiments.choose_trigger``: up to three
  columns set to values rare in its own records, clean success at most 0.1 on them), adds
  triggered copies of half its non-target records relabelled ``benign``, and replaces the
  model (update scaled by total / own weight). Per seed (data split, training, attacker):
  the clean model's success on non-target test records (the baseline), the success without
  and with privml's backdoor defence (anomaly filter, median-norm clipping, trimmed mean
  trimming one of 4 updates per side, weak DP 0.05), and main-task accuracy.
* **anomaly filter on the IID demo**: the same attack on 4 IID hospitals; the share of honest
  updates the filter flagged (false positives) and of the attacker's updates it flagged.
* **digits** (pixel trigger, 2x2 white patch; 10 IID sites, MLP 64-64-10, 30 rounds): the
  image case, one seed.

Targets: clean success <= 0.1, undefended >= 0.9, defended <= 0.2, defended main-task
accuracy within 2 points of clean; false-positive rate <= 5% on the IID demo.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data.federation import load_federation  # noqa: E402
from privml.pipeline import model_spec  # noqa: E402
from privml.security.attacks.backdoor import pixel_trigger  # noqa: E402
from privml.security.experiments import backdoor_audit  # noqa: E402


def demo(partition: str, seed: int, rounds: int) -> dict[str, Any]:
    cfg = parse_config({
        "data": {"dataset": "breast_cancer", "n_sites": 4, "partition": partition,
                 "alpha": 0.5, "seed": seed},
        "model": {"kind": "logistic"},
        "training": {"rounds": rounds, "local_epochs": 5, "batch_size": 32, "lr": 8.0,
                     "seed": seed},
    })  # fmt: skip
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    out = backdoor_audit(fed, spec, cfg.training, trigger=None, malicious=[0], target=0,
                         non_iid_sites=None, seed=seed)  # fmt: skip
    return dict(out["configured"])


def digits(seed: int, rounds: int, epochs: int = 2) -> dict[str, Any]:
    cfg = parse_config({
        "data": {"dataset": "digits", "n_sites": 10, "partition": "iid", "seed": seed},
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"rounds": rounds, "local_epochs": epochs, "batch_size": 32, "lr": 0.5,
                     "seed": seed},
    })  # fmt: skip
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    out = backdoor_audit(fed, spec, cfg.training, trigger=pixel_trigger((8, 8), size=2),
                         malicious=[0], target=0, non_iid_sites=None, seed=seed)  # fmt: skip
    return dict(out["configured"])


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def summarise(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    col: dict[str, list[float]] = {k: [] for k in (
        "clean_success", "attack_success", "defended_success", "clean_accuracy",
        "attack_accuracy", "defended_accuracy", "defence_clean_accuracy", "fpr_attack",
        "fpr_clean", "detection")}  # fmt: skip
    for r in runs:
        rows = r["rows"]
        col["clean_success"].append(r["clean_success"])
        col["attack_success"].append(rows["attack"]["attack_success"])
        col["defended_success"].append(rows["attack_defended"]["attack_success"])
        col["clean_accuracy"].append(rows["clean"]["accuracy"])
        col["attack_accuracy"].append(rows["attack"]["accuracy"])
        col["defended_accuracy"].append(rows["attack_defended"]["accuracy"])
        col["defence_clean_accuracy"].append(rows["clean_defended"]["accuracy"])
        col["fpr_attack"].append(rows["attack_defended"].get("false_positive_rate") or 0.0)
        col["fpr_clean"].append(rows["clean_defended"].get("false_positive_rate") or 0.0)
        col["detection"].append(rows["attack_defended"].get("detection_rate") or 0.0)
    return col


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-digits", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = 1 if args.quick else args.seeds
    rounds = 2 if args.quick else 20
    bench = Bench("security_backdoor", quick=args.quick, out=args.out,
                  params={"seeds": seeds, "rounds": rounds, "sites": 4, "alpha": 0.5,
                          "target": "benign", "boost": "replace"})  # fmt: skip
    t0 = time.perf_counter()
    settings = {"non_iid": "dirichlet", "iid": "iid"}
    cols: dict[str, dict[str, list[float]]] = {}
    for name, part in settings.items():
        runs = [demo(part, s, rounds) for s in range(seeds)]
        bench.record(f"demo_{name}", runs)
        cols[name] = summarise(runs)
        for s, r in enumerate(runs):
            print(f"{name} seed {s}: clean {r['clean_success']:.3f} attack "
                  f"{r['success_without_defence']:.3f} defended {r['success_with_defence']:.3f} "
                  f"({r['verdict']})", flush=True)  # fmt: skip
    c = cols["non_iid"]
    verdicts = {
        "clean_success_le_0.1": statistics.median(c["clean_success"]) <= 0.1,
        "undefended_ge_0.9": statistics.median(c["attack_success"]) >= 0.9,
        "defended_le_0.2": statistics.median(c["defended_success"]) <= 0.2,
        "defended_accuracy_within_2_points": statistics.median(
            [a - b for a, b in zip(c["clean_accuracy"], c["defended_accuracy"], strict=True)]
        ) <= 0.02,
        "iid_false_positive_rate_le_0.05": statistics.median(cols["iid"]["fpr_attack"]) <= 0.05,
    }
    rows = []
    for name, label in (("non_iid", "4 non-IID hospitals (Dirichlet 0.5)"),
                        ("iid", "4 IID hospitals")):  # fmt: skip
        c = cols[name]
        rows += [
            [label, "clean training (baseline)", _med(c["clean_accuracy"]),
             _med(c["clean_success"])],
            [label, "model replacement, no defence", _med(c["attack_accuracy"]),
             _med(c["attack_success"])],
            [label, "model replacement, privml defence", _med(c["defended_accuracy"]),
             _med(c["defended_success"])],
            [label, "privml defence, no attack (its cost)", _med(c["defence_clean_accuracy"]),
             "-"],
        ]  # fmt: skip
    bench.table("demo", ["hospitals", "scenario", "main-task accuracy", "attack success"], rows,
                caption=f"Backdoor on the demo, one attacking hospital of 4, medians (min-max) "
                f"over {seeds} seeds; attack success on test records whose true class is not "
                "the target.")  # fmt: skip
    arows = []
    for name, label in (("iid", "4 IID hospitals"), ("non_iid", "4 non-IID hospitals")):
        c = cols[name]
        arows.append([label, _med(c["fpr_attack"]), _med(c["fpr_clean"]), _med(c["detection"])])
    bench.table("anomaly", ["hospitals", "honest updates flagged (under attack)",
                            "honest updates flagged (no attack)", "attacker's updates flagged"],
                arows, caption="The anomaly filter of privml's backdoor defence: false-positive "
                "rate on honest hospitals and detection rate on the attacker, medians (min-max) "
                f"over {seeds} seeds, 20 rounds each.")  # fmt: skip
    if not args.no_digits:
        d = digits(0, 2, 1) if args.quick else digits(0, 30)
        bench.record("digits", d)
        r = d["rows"]
        bench.table("digits", ["scenario", "main-task accuracy", "attack success"], [
            ["clean training (baseline)", f"{r['clean']['accuracy']:.3f}",
             f"{r['clean']['attack_success']:.3f}"],
            ["model replacement, no defence", f"{r['attack']['accuracy']:.3f}",
             f"{r['attack']['attack_success']:.3f}"],
            ["model replacement, privml defence", f"{r['attack_defended']['accuracy']:.3f}",
             f"{r['attack_defended']['attack_success']:.3f}"],
            ["privml defence, no attack", f"{r['clean_defended']['accuracy']:.3f}", "-"],
        ], caption="Digits, 10 IID sites, pixel trigger, one attacker, seed 0.")  # fmt: skip
    bench.record("verdicts", verdicts)
    bench.record("seconds", time.perf_counter() - t0)
    print(verdicts)
    bench.write()


if __name__ == "__main__":
    main()
