"""Federated backdoor (Bagdasaryan et al. 2020) against privml's defence, on digits.

Setting (issue 8): scikit-learn's digits split i.i.d. over 10 sites (privml's built-in
``digits`` dataset, 20% of each site held out), MLP 64-64-10, 30 FedAvg rounds of 2 local
epochs (batch 32, lr 0.5), every site every round. Site 0 is malicious: it adds triggered
copies (2x2 white patch, bottom-right corner) of half of its non-target records labelled
``0``, and scales its update to replace the global model (``boost = "replace"``) -- or, in the
``poison_only`` variant, sends its poisoned update unscaled.

For each variant and seed: main-task accuracy and attack success rate (share of non-0 test
digits classified 0 once triggered) for clean training, the attack without defence, the attack
against each defence, and each defence without attack (its cost). Defences:

* ``privml``: anomaly filter (robust z > 3 on log-norm or cosine to the median update),
  median-norm clipping, coordinate-wise trimmed mean (beta 0.2), weak DP (noise 0.05 x bound);
* ``clip_dp``: Sun et al. 2019 alone -- median-norm clipping + weak DP, FedAvg;
* ``trimmed_mean``: the robust rule alone.

    .venv/bin/python benchmarks/bench_security_backdoor.py [--seeds 3] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from privml.config import parse_config
from privml.data.federation import load_federation
from privml.pipeline import model_spec
from privml.security.attacks.backdoor import backdoor_experiment, pixel_trigger
from privml.security.defenses.robust import BACKDOOR_DEFENCE, Defence

DEFENCES = {
    "privml": BACKDOOR_DEFENCE,
    "clip_dp": Defence(name="clip_dp", clip="median", noise_multiplier=0.05),
    "trimmed_mean": Defence(name="trimmed_mean", aggregator="trimmed_mean",
                            aggregator_params={"beta": 0.2}),  # fmt: skip
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    trigger = pixel_trigger((8, 8), size=2)
    results: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        cfg = parse_config({
            "data": {"dataset": "digits", "n_sites": 10, "partition": "iid", "seed": seed},
            "model": {"kind": "mlp", "hidden": [64]},
            "training": {"rounds": args.rounds, "local_epochs": 2, "batch_size": 32,
                         "lr": 0.5, "seed": seed},
        })  # fmt: skip
        fed = load_federation(cfg)
        spec = model_spec(cfg, fed)
        for variant, boost in (("replace", "replace"), ("poison_only", None)):
            for dname, defence in DEFENCES.items():
                scen = ["attack_defended", "clean_defended"]
                if dname == "privml":
                    scen = ["clean", "attack", *scen]
                r = backdoor_experiment(
                    fed, spec, cfg.training, trigger=trigger, malicious=[0], target=0,
                    boost=boost, defence=defence, scenarios=scen,
                )  # fmt: skip
                for name, row in r.rows.items():
                    key = (
                        f"{variant}/{name}" if name in ("attack",) else
                        name if name == "clean" else f"{variant}/{dname}/{name}"
                    )  # fmt: skip
                    if name == "clean_defended":
                        key = f"{dname}/clean_defended"
                    if name == "clean" and variant != "replace":
                        continue
                    if name == "clean_defended" and variant != "replace":
                        continue
                    d = results.setdefault(key, {"accuracy": [], "attack_success": [],
                                                 "flagged_malicious": []})  # fmt: skip
                    d["accuracy"].append(row["accuracy"])
                    d["attack_success"].append(row["attack_success"])
                    d["flagged_malicious"].append(row["flagged_malicious"])
    summary = {
        k: {m: statistics.median(v) for m, v in d.items()} | {"runs": len(d["accuracy"])}
        for k, d in results.items()
    }
    print(json.dumps(summary, indent=2))
    print(f"\nmedians over {args.seeds} seeds ({time.perf_counter() - t0:.0f} s)")
    print(f"{'scenario':42s} {'accuracy':>9s} {'success':>8s} {'flagged':>8s}")
    for k, v in summary.items():
        print(f"{k:42s} {v['accuracy']:9.3f} {v['attack_success']:8.3f} "
              f"{v['flagged_malicious']:8.0f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"median": summary, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
