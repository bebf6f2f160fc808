"""Speed and accuracy of privml's federated simulation, against two anchors on the same work.

Work: the logistic model trained by FedAvg for 20 rounds, every site every round,
with the demo's local SGD (5 local epochs, batch 32, lr 8; benchmarks/tune_demo.py), on

* ``breast_cancer`` split IID into 100 simulated sites (each keeps a 20 % held-out split), and
* the demo: breast cancer over 3 hospitals of unequal size (``privml run`` with no config).

Three ways to get a model, timed in this process on the same encoded arrays:

* privml: :func:`privml.fl.engine.simulate`, every site's local SGD of a round in one
  vectorized computation (stacked parameters, batched matmuls).
* per-site PyTorch loop: what a straightforward simulator does, one ``torch.nn`` model and
  ``torch.optim.SGD`` per site, site after site, with the *same* batch shuffles (site ``i``
  visits its records in the order ``privml.models.training.site_order`` gives, as in
  privml), then the same weighted FedAvg. The script checks that it ends at the same
  parameters as privml (max abs difference printed), so both sides did the same work.
* centralized scikit-learn ``LogisticRegression`` (default lbfgs, L2 with C=1) fitted on the
  union of the sites' training records, scored on the union of their held-out records: the
  same split as the federated runs, the same [0, 1]-scaled features.

Timing: wall time of training only (data loading and encoding is shared and timed apart);
every repetition runs the three once in rotating order (benchmarks/harness.py), one warm-up of
each excluded; medians with min-max. torch runs one intra-op thread on both torch sides
(privml's engine does so for linear models).

Accuracy: a held-out set of ~115 records moves 0.9 points per record, so the script also
repeats the accuracy comparison over ``--splits`` data seeds (different partitions and
held-out splits; the demo's lr and local epochs were chosen on validation records carved from
training records, never on held-out ones) and prints mean accuracies and the mean difference,
against scikit-learn's default ``LogisticRegression`` and against ``LogisticRegressionCV``
(C chosen by 5-fold cross-validation on the training records).

Run: ``.venv/bin/python benchmarks/bench_fl_speed.py [--reps 5] [--rounds 20] [--splits 10]
[--quick]``
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.config import Config, load_config, parse_config  # noqa: E402
from privml.data.federation import FederatedData, load_federation
from privml.fl.engine import init_params, simulate
from privml.fl.metrics import evaluate
from privml.models.nets import ModelSpec, build_model, flat_params, load_flat_params
from privml.models.training import site_order
from privml.pipeline import model_spec


def iid_config(n_sites: int, rounds: int) -> Config:
    demo = load_config(None)
    return parse_config(
        {
            "data": {"dataset": "breast_cancer", "partition": "iid", "n_sites": n_sites},
            "training": {**demo.training.model_dump(), "rounds": rounds},
            "output": {"html": False},
        },
        name=f"breast_cancer_iid_{n_sites}",
    )


def demo_config(rounds: int) -> Config:
    cfg = load_config(None)
    cfg.training.rounds = rounds
    return cfg


def per_site_loop(fed: FederatedData, spec: ModelSpec, cfg: Config) -> torch.Tensor:
    """FedAvg with one torch model and optimizer per site, trained site after site."""
    t = cfg.training
    _, global_params = init_params(spec, t.seed)
    global_params = global_params.double()
    weights = np.array([s.n_train for s in fed.sites], dtype=np.float64)
    weights /= weights.sum()
    data = [(torch.from_numpy(s.X_train), torch.from_numpy(s.y_train)) for s in fed.sites]
    model = build_model(spec)
    binary = spec.n_outputs == 1
    for rnd in range(1, t.rounds + 1):
        start = global_params.float()
        total = torch.zeros_like(global_params)
        for i, (X, y) in enumerate(data):
            load_flat_params(model, start)
            opt = torch.optim.SGD(model.parameters(), lr=t.lr)
            for epoch in range(t.local_epochs):
                perm = site_order(t.seed, rnd, i, epoch, len(y))  # privml's order
                for b in range(0, len(y), t.batch_size):
                    idx = torch.from_numpy(perm[b : b + t.batch_size])
                    opt.zero_grad()
                    logits = model(X[idx])
                    if binary:
                        loss = F.binary_cross_entropy_with_logits(logits[:, 0], y[idx].float())
                    else:
                        loss = F.cross_entropy(logits, y[idx])
                    loss.backward()
                    opt.step()
            total += weights[i] * (flat_params(model).double() - start.double())
        global_params = global_params + total
    return global_params.float()


def centralized(fed: FederatedData) -> tuple[LogisticRegression, float]:
    X, y = fed.pooled_train()
    Xt, yt = fed.pooled_test()
    clf = LogisticRegression(max_iter=5000).fit(X, y)
    return clf, float(clf.score(Xt, yt))


def _void(fn: Callable[[], Any]) -> Callable[[], None]:
    """The harness times a call returning None (a number would be taken as its own timing)."""

    def run() -> None:
        fn()

    return run


def bench_case(
    bench: Bench, key: str, name: str, cfg: Config, reps: int, quick: bool = False
) -> dict[str, Any]:
    t0 = time.perf_counter()
    fed = load_federation(cfg)
    load_s = time.perf_counter() - t0
    spec = model_spec(cfg, fed)
    X_test, y_test = fed.pooled_test()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    last: dict[str, Any] = {}  # quick: the timed runs' own results, not run again

    def keep(name: str, fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            last[name] = fn()

        return run

    try:
        t = bench.interleave(
            {
                "privml simulate": keep("res", lambda: simulate(fed, spec, cfg.training)),
                "per-site PyTorch loop": keep("loop", lambda: per_site_loop(fed, spec, cfg)),
                "centralized scikit-learn": keep("sk", lambda: centralized(fed)),
            },
            reps=reps,
            warmup=0 if quick else 1,
            key=f"{key}_seconds",
        )
    finally:
        torch.set_num_threads(before)
    if quick:
        res, loop_params, (_, sk_acc) = last["res"], last["loop"], last["sk"]
    else:
        res = simulate(fed, spec, cfg.training)
        loop_params = per_site_loop(fed, spec, cfg)
        _, sk_acc = centralized(fed)
    model, _ = init_params(spec, cfg.training.seed)
    loop_acc = evaluate(model, loop_params, X_test, y_test)["accuracy"]
    out = {
        "name": name,
        "sites": len(fed.sites),
        "rounds": cfg.training.rounds,
        "n_train": sum(s.n_train for s in fed.sites),
        "n_test": len(y_test),
        "load_s": load_s,
        "times": t,
        "privml_acc": float(res.metrics["accuracy"]),
        "privml_auc": float(res.metrics["auc"]),
        "loop_acc": float(loop_acc),
        "sklearn_acc": sk_acc,
        "max_param_diff": float((res.params - loop_params).abs().max()),
    }
    bench.record(key, {k: v for k, v in out.items() if k != "times"})
    ratio = ratios(t["per-site PyTorch loop"], t["privml simulate"])
    bench.record(f"{key}_ratio_loop_vs_privml", ratio.to_dict())
    out["ratio"] = ratio
    return out


def accuracy_over_splits(
    make: Callable[[int], Config], splits: int, cv_grid: tuple[int, int] = (10, 5)
) -> dict[str, Any]:
    """Federated vs centralized accuracy over ``splits`` data seeds (partition + held-out);
    ``cv_grid``: the (Cs, folds) of ``LogisticRegressionCV``."""
    fed_acc, sk_acc, cv_acc = [], [], []
    for seed in range(splits):
        cfg = make(seed)
        fed = load_federation(cfg)
        fed_acc.append(simulate(fed, model_spec(cfg, fed), cfg.training).metrics["accuracy"])
        sk_acc.append(centralized(fed)[1])
        X, y = fed.pooled_train()
        Xt, yt = fed.pooled_test()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 parameter notices
            cv = LogisticRegressionCV(Cs=cv_grid[0], cv=cv_grid[1], max_iter=5000).fit(X, y)
        cv_acc.append(float(cv.score(Xt, yt)))
    f, s, c = np.array(fed_acc), np.array(sk_acc), np.array(cv_acc)
    return {
        "fed": (f.mean(), f.std(ddof=1)),
        "sk": (s.mean(), s.std(ddof=1)),
        "cv": (c.mean(), c.std(ddof=1)),
        "diff_sk": ((f - s).mean(), (f - s).std(ddof=1) / np.sqrt(splits)),
        "diff_cv": ((f - c).mean(), (f - c).std(ddof=1) / np.sqrt(splits)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5)")
    ap.add_argument("--rounds", type=int, default=None, help="default 20 (quick 3)")
    ap.add_argument("--sites", type=int, default=None, help="sites of the IID split (100)")
    ap.add_argument("--splits", type=int, default=None, help="data seeds of the accuracy check")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    rounds = args.rounds or (2 if args.quick else 20)
    sites = args.sites or (4 if args.quick else 100)
    splits = args.splits if args.splits is not None else (2 if args.quick else 10)
    bench = Bench(
        "fl_speed",
        quick=args.quick,
        out=args.out,
        params={"reps": reps, "rounds": rounds, "sites": sites, "splits": splits},
    )
    cases = [
        bench_case(bench, "iid", f"breast cancer IID, {sites} sites", iid_config(sites, rounds),
                   reps, args.quick),
        bench_case(bench, "demo", "demo, 3 hospitals", demo_config(rounds), reps, args.quick),
    ]  # fmt: skip
    rows = []
    for r in cases:
        t = r["times"]
        rows.append(
            [f"{r['name']} ({r['n_train']} train / {r['n_test']} held-out records)",
             fmt_spread(t["privml simulate"], digits=3, unit="s"),
             fmt_spread(t["per-site PyTorch loop"], digits=3, unit="s"),
             fmt_ratio(r["ratio"]),
             fmt_spread(t["centralized scikit-learn"], digits=3, unit="s"),
             f"{r['load_s']:.2f} s"]  # fmt: skip
        )
    bench.table(
        "speed",
        ["work", "privml simulate", "per-site PyTorch loop", "speed-up", "scikit-learn (central)",
         "load + encode"],  # fmt: skip
        rows,
        caption=(
            f"FedAvg, logistic regression, {rounds} rounds, every site every round, the demo's "
            "local SGD (lr 8, 5 local epochs, batch 32); training time only, median (min-max) of "
            f"{reps} interleaved repetitions. The per-site loop uses the same batches and ends "
            "at the same parameters (largest difference "
            f"{max(r['max_param_diff'] for r in cases):.1e})."
        ),
    )
    bench.table(
        "accuracy",
        ["work", "privml federated", "per-site loop", "centralized scikit-learn", "difference"],
        [
            [r["name"], f"{r['privml_acc']:.4f} (AUC {r['privml_auc']:.4f})",
             f"{r['loop_acc']:.4f}", f"{r['sklearn_acc']:.4f}",
             f"{100 * (r['privml_acc'] - r['sklearn_acc']):+.1f} points"]  # fmt: skip
            for r in cases
        ],
        caption="Pooled held-out accuracy of the runs timed above (data seed 0).",
    )
    if splits < 2:
        bench.write()
        return
    torch.set_num_threads(1)

    def iid_seed(seed: int) -> Config:
        cfg = iid_config(sites, rounds)
        cfg.data.seed = seed
        return cfg

    def demo_seed(seed: int) -> Config:
        cfg = demo_config(rounds)
        cfg.data.seed = seed
        return cfg

    rows = []
    for key, name, make in (("iid", f"breast cancer IID, {sites} sites", iid_seed),
                            ("demo", "demo, 3 hospitals", demo_seed)):  # fmt: skip
        a = accuracy_over_splits(make, splits, (2, 2) if args.quick else (10, 5))
        bench.record(f"{key}_splits", {k: list(v) for k, v in a.items()})
        rows.append(
            [name, f"{a['fed'][0]:.4f} +- {a['fed'][1]:.4f}",
             f"{a['sk'][0]:.4f} +- {a['sk'][1]:.4f}",
             f"{a['cv'][0]:.4f} +- {a['cv'][1]:.4f}",
             f"{100 * a['diff_sk'][0]:+.2f} +- {100 * a['diff_sk'][1]:.2f}",
             f"{100 * a['diff_cv'][0]:+.2f} +- {100 * a['diff_cv'][1]:.2f}"]  # fmt: skip
        )
    bench.table(
        "splits",
        ["work", "federated", "scikit-learn default", "scikit-learn CV",
         "federated - default (points)", "federated - CV (points)"],  # fmt: skip
        rows,
        caption=(
            f"Accuracy over {splits} data seeds (partitions and held-out splits): mean +- sd; "
            "differences +- standard error. A held-out set of about 115 records moves 0.9 points "
            "per record."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
