"""One-run privacy audit (Steinke, Nasr and Jagielski 2023) of privml's federated training.

Run:  .venv/bin/python benchmarks/bench_security_canary.py [--quick] [--runs 20]

Setting: the demo's breast-cancer records over 3 hospitals, an MLP 30-256-1 with no
regularisation, ``m`` random canaries (schema-valid records with random labels), each added to
a hospital's training records with probability 1/2; one federated training run, then
``-loss`` of every canary, guesses at the top and bottom of the ranking, and the bound of
``privml.security.attacks.canary`` (95% confidence, Bonferroni over the guess grid).

* non-private, trained to overfit (30 rounds of 20 local epochs, lr 0.5): the certified
  lower bound in one run (target >= 1);
* the same model with privml's sample-level DP-SGD at epsilon 1 and 4 (delta 1e-5, booking
  into a throw-away ledger; 10 rounds of 5 local epochs, batch 64, lr 1.0, clipping 1.0):
  ``--runs`` independent runs each (fresh canaries, inclusion and training seed); target:
  the bound at or below the accountant's epsilon in every run.

Each run is one training; there is no speed comparison here, so the harness records the
figures (and the load average) rather than interleaving variants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.config import Config, parse_config  # noqa: E402
from privml.data.federation import FederatedData, load_federation  # noqa: E402
from privml.models.nets import load_flat_params  # noqa: E402
from privml.pipeline import model_spec  # noqa: E402
from privml.security.attacks.canary import run_canary_audit  # noqa: E402
from privml.security.attacks.evasion import accuracy  # noqa: E402


def config(*, epsilon: float | None, seed: int, rounds: int, epochs: int) -> Config:
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 3, "partition": "hospitals"},
        "model": {"kind": "mlp", "hidden": [256]},
        "training": {"rounds": rounds, "local_epochs": epochs, "batch_size": 32, "lr": 0.5,
                     "seed": seed},  # fmt: skip
    }
    if epsilon is not None:
        # DP-SGD with the demo's private-training settings scale: fewer, larger steps
        raw["training"].update({"lr": 1.0, "batch_size": 64, "rounds": max(1, rounds // 3),
                                "local_epochs": max(1, epochs // 4)})  # fmt: skip
        raw["privacy"] = {"mode": "sample", "epsilon": epsilon, "delta": 1e-5,
                          "max_grad_norm": 1.0, "budget_epsilon": 1e6}  # fmt: skip
    return parse_config(raw)


def audit(cfg: Config, fed: FederatedData, m: int, seed: int) -> dict[str, Any]:
    spec = model_spec(cfg, fed)
    Xt, yt = fed.pooled_test()
    acc: dict[str, float] = {}

    def train(f: FederatedData) -> tuple[torch.nn.Module, float | None]:
        if cfg.privacy.mode == "none":
            from privml.fl.engine import simulate

            res = simulate(f, spec, cfg.training)
            model, params, eps = res.model, res.params, None
        else:
            from privml.dp.ledger import PrivacyLedger
            from privml.fl.training import train

            with tempfile.TemporaryDirectory() as tmp:
                led = PrivacyLedger(Path(tmp) / "l.sqlite", dataset="bench",
                                    budget_epsilon=1e6, budget_delta=0.5)  # fmt: skip
                run = train(cfg, f, spec, ledger=led)
            model, params = run.result.model, run.result.params
            eps = float(run.privacy["epsilon"])
        load_flat_params(model, params.detach().to(torch.float32))
        model.eval()
        acc["test_accuracy"] = accuracy(model, Xt, yt)
        return model, eps

    t0 = time.perf_counter()
    r = run_canary_audit(fed, train, m=m, delta=1e-5, seed=seed)
    return {**r.to_dict(), **acc, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--runs", type=int, default=20, help="DP runs per epsilon")
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = 1 if args.quick else args.runs
    m = 100 if args.quick else args.canaries
    rounds, epochs = (1, 1) if args.quick else (30, 20)
    bench = Bench("security_canary", quick=args.quick, out=args.out,
                  params={"canaries": m, "dp_runs": runs, "rounds": rounds,
                          "local_epochs": epochs, "delta": 1e-5})  # fmt: skip
    fed = load_federation(config(epsilon=None, seed=0, rounds=rounds, epochs=epochs))
    plain = audit(config(epsilon=None, seed=0, rounds=rounds, epochs=epochs), fed, m, 0)
    bench.record("non_private", plain)
    rows = [[
        "non-private MLP, overfit", "1", f"{plain['epsilon']:.2f}",
        f"{plain['correct']} / {plain['guesses']}", f"{plain['max_certifiable']:.2f}", "-",
        f"{plain['test_accuracy']:.3f}",
    ]]  # fmt: skip
    verdicts = {"non_private_bound_at_least_1": plain["epsilon"] >= 1.0}
    for eps in (1.0, 4.0):
        per = []
        for seed in range(runs):
            cfg = config(epsilon=eps, seed=seed, rounds=rounds, epochs=epochs)
            per.append(audit(cfg, fed, m, seed))
            print(f"eps {eps:g} run {seed}: bound {per[-1]['epsilon']:.3f} "
                  f"(accountant {per[-1]['accountant_epsilon']:.3f})", flush=True)  # fmt: skip
        bench.record(f"dp_eps{eps:g}", per)
        bounds = [p["epsilon"] for p in per]
        held = sum(p["epsilon"] <= p["accountant_epsilon"] * (1 + 1e-9) for p in per)
        verdicts[f"dp_eps{eps:g}_held"] = f"{held} of {len(per)}"
        rows.append([
            f"DP-SGD, accountant epsilon {eps:g}", str(len(per)),
            f"{statistics.median(bounds):.2f} (max {max(bounds):.2f})",
            f"{statistics.median(p['correct'] for p in per):.0f} / "
            f"{statistics.median(p['guesses'] for p in per):.0f}",
            f"{statistics.median(p['max_certifiable'] for p in per):.2f}",
            f"{held} of {len(per)}",
            f"{statistics.median(p['test_accuracy'] for p in per):.3f}",
        ])  # fmt: skip
    bench.record("verdicts", verdicts)
    bench.table(
        "bounds",
        ["training", "runs", "certified epsilon lower bound (median)", "correct / guesses",
         "could certify at most", "bound <= accountant", "test accuracy"],  # fmt: skip
        rows,
        caption=f"One-run canary audit, {m} canaries, 95% confidence, delta 1e-5 "
        "(the bound's guess grid: 2-50% of the canaries).",
    )
    bench.write()


if __name__ == "__main__":
    main()
