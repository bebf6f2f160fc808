"""Membership inference: LiRA and the loss threshold on an overfit model, then the same model
trained with DP-SGD at epsilon = 1 -- with the empirical epsilon lower bound beside the
accountant's epsilon.

Setting: a pool of ``--pool`` digits (8x8, [0, 1]); ``--models`` MLPs 64-256-10, each
trained on a random half of the pool (Carlini et al.'s game; every model is the target once,
the others are its shadows). Non-private: SGD lr 0.5, batch 32, 200 epochs, no regularisation
(deliberately overfit). Private: privml's DP-SGD (Poisson sampling, clipping 1.0, noise
multiplier calibrated by privml's PLD accountant to epsilon = 1 at delta = 1e-5 per model),
expected batch 125 (sampling rate about 1/2), lr 2.0, 30 epochs. Attacks: online LiRA
(per-record Gaussians, global variance below 64 shadows), offline LiRA, loss threshold (same
target models). The bound: threshold chosen on
half the trials, Clopper-Pearson 95% on the other half (privml.security.attacks.membership).

    .venv/bin/python benchmarks/bench_security_membership.py [--pool 300] [--models 24]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.models.nets import ModelSpec  # noqa: E402
from privml.security.attacks.membership import (  # noqa: E402
    dpsgd_shadow_trainer,
    lira_game,
    sgd_shadow_trainer,
)


def row(res) -> dict[str, float | None]:  # type: ignore[no-untyped-def]
    y = res.extra["loss_threshold"]
    return {
        "auc": res.auc,
        "tpr_at_1pct": res.tpr_at_fpr["0.01"],
        "tpr_at_0.1pct": res.tpr_at_fpr["0.001"],
        "empirical_epsilon": res.empirical_epsilon,
        "max_certifiable": res.bound.max_certifiable,
        "loss_auc": y["auc"],
        "loss_empirical_epsilon": y["empirical_epsilon"],
        "accountant_epsilon": res.accountant_epsilon,
        "train_accuracy": res.extra["train_accuracy"],
        "test_accuracy": res.extra["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    add_common_args(ap)
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--models", type=int, default=24)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--dp-batch", type=int, default=125)
    ap.add_argument("--dp-lr", type=float, default=2.0)
    ap.add_argument("--dp-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=200, help="non-private (overfit) epochs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.quick:
        args.pool, args.models, args.dp_epochs, args.epochs = 100, 4, 1, 5
    torch.set_num_threads(args.threads)
    d = load_digits()
    rng = np.random.default_rng(0)
    idx = rng.choice(len(d.target), size=args.pool, replace=False)
    X = (d.data[idx] / 16.0).astype(np.float32)
    y = d.target[idx].astype(np.int64)
    spec = ModelSpec("mlp", 64, 10, hidden=(256,))
    delta = 1e-5
    out: dict[str, object] = {"pool": args.pool, "models": args.models, "delta": delta}
    t0 = time.perf_counter()
    plain = sgd_shadow_trainer(spec, lr=0.5, epochs=args.epochs, batch_size=32)
    for online in (True, False):
        r = lira_game(X, y, spec, trainer=plain, n_models=args.models, online=online,
                      delta=delta)  # fmt: skip
        out[f"non_private/{'online' if online else 'offline'}"] = row(r)
    dp = dpsgd_shadow_trainer(spec, epsilon=args.epsilon, delta=delta, max_grad_norm=1.0,
                              lr=args.dp_lr, epochs=args.dp_epochs,
                              batch_size=args.dp_batch)  # fmt: skip
    for online in (True, False):
        r = lira_game(X, y, spec, trainer=dp, n_models=args.models, online=online,
                      delta=delta, accountant_epsilon=args.epsilon)  # fmt: skip
        out[f"dp_eps{args.epsilon:g}/{'online' if online else 'offline'}"] = row(r)
    out["dp_noise_multipliers"] = sorted({round(s, 3) for s in dp.noise_multipliers})  # type: ignore[attr-defined]
    out["seconds"] = time.perf_counter() - t0
    bench = Bench("security_membership", quick=args.quick, out=args.out,
                  params={k: v for k, v in vars(args).items() if k not in ("out",)})
    bench.record("membership", out)
    rows = []
    for k, v in out.items():
        if not isinstance(v, dict):
            continue
        acc = "-" if v["accountant_epsilon"] is None else f"{v['accountant_epsilon']:.2f}"
        rows.append([k.replace("/", ", LiRA "), f"{v['auc']:.3f}", f"{v['tpr_at_1pct']:.3f}",
                     f"{v['tpr_at_0.1pct']:.3f}", f"{v['empirical_epsilon']:.2f}",
                     f"{v['max_certifiable']:.2f}", acc, f"{v['loss_auc']:.3f}",
                     f"{v['train_accuracy']:.3f}", f"{v['test_accuracy']:.3f}"])  # fmt: skip
    bench.table("lira", ["model, attack", "AUC (chance 0.5)", "TPR @ 1% FPR", "TPR @ 0.1% FPR",
                         "empirical eps (lower bound)", "could certify at most",
                         "accountant eps", "loss-threshold AUC", "train acc", "test acc"], rows,
                caption=f"Carlini et al.'s game on a pool of {args.pool} digits, {args.models} "
                "models (each the target once); bound: threshold chosen on half the trials, "
                "Clopper-Pearson 95% on the other half, delta 1e-5.")  # fmt: skip
    bench.write()


if __name__ == "__main__":
    main()
