"""Utility of privml's private training: test accuracy at the issue's targets (delta = 1e-5).

Run:  .venv/bin/python benchmarks/bench_dpsgd_utility.py            # the chosen settings
      .venv/bin/python benchmarks/bench_dpsgd_utility.py --tune     # the validation search
      .venv/bin/python benchmarks/bench_dpsgd_utility.py --only digits
      .venv/bin/python benchmarks/bench_dpsgd_utility.py --quick    # one seed, few rounds
      .venv/bin/python benchmarks/bench_dpsgd_utility.py --seeds 20 # more training seeds

The demo and digits rows are scored over ``--seeds`` training seeds (default 10: the noise is
drawn afresh every run and one seed's test accuracy moves by 1-3 points, so a mean over three
seeds can land on either side of a target by chance); the client rows (about 50 s a seed) over
the first 3 of them. The table gives mean, standard deviation and min-max.

Accuracies (no timing) go to the JSON results and the ``utility`` table (benchmarks/harness.py,
benchmarks/render_docs.py); with ``--quick`` each experiment runs one seed, 1 round, no validation
split, digits at epsilon 1 only and 20 clients (a smoke run: its
accuracies are not the targets').

Experiments (each through :func:`privml.fl.training.train`, the code ``privml run``
uses, with a throw-away ledger):

* demo: breast cancer over 3 hospitals, logistic regression, sample-level DP, epsilon = 1
  (target >= 0.95 test accuracy);
* digits: one site, logistic regression on HOG features (``[model] features = "hog"``),
  sample-level DP, epsilon = 1 and 3 (targets >= 0.93 and >= 0.96); the Opacus reference
  quoted in the issue (a small ReLU CNN) is 0.75 / 0.875;
* client: 1,000 synthetic clients, logistic regression, client-level DP-FedAvg at epsilon = 2
  against the same federation without DP (target: within 3 points).

Hyper-parameters (and, for digits at epsilon 1, the HOG map's ``[model.hog]`` settings) were
chosen with ``--tune``: every site's *training* records are split 75/25
into train/validation (seeded), each candidate is trained on the 75% and scored on the 25%
(every candidate with seed 0, then the 8 best again with seeds 0-2, their mean deciding), and
the best is then trained on the full training records and scored on the held-out test records,
which played no part in the choice. The search itself runs on
private data and is not accounted (docs/privacy_training.md).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args  # noqa: E402

from privml.config import Config, parse_config  # noqa: E402
from privml.data.federation import FederatedData, SiteData, load_federation
from privml.fl.engine import simulate
from privml.fl.training import train
from privml.pipeline import model_spec

DELTA = 1e-5


def merge(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


DEMO: dict[str, Any] = {
    "data": {"dataset": "breast_cancer", "n_sites": 3, "partition": "hospitals"},
    "model": {"kind": "logistic"},
    "training": {
        "rounds": 20,
        "local_epochs": 1,
        "batch_size": 64,
        "lr": 4.0,
        "seed": 0,
        "server_optimizer": "sgd",
        "server_lr": 1.0,
    },
    "privacy": {"mode": "sample", "epsilon": 1.0, "max_grad_norm": 0.5},
}
DIGITS: dict[str, Any] = {
    "data": {"dataset": "digits", "n_sites": 1, "partition": "iid"},
    "model": {
        "kind": "logistic",
        "features": "hog",
        "image_shape": [8, 8],
        "hog": {"bins": 8, "cell": 2, "stride": 2, "cell_eps": 0.1},
    },
    "training": {
        "rounds": 20,
        "local_epochs": 1,
        "batch_size": 512,
        "lr": 8.0,
        "seed": 0,
        "server_optimizer": "sgd",
        "server_lr": 1.0,
    },
    "privacy": {"mode": "sample", "epsilon": 1.0, "max_grad_norm": 0.25},
}
#: epsilon 3 keeps the library's default HOG settings (its search did not cover them).
DIGITS_EPS3: dict[str, Any] = merge(
    DIGITS,
    training={"rounds": 40, "batch_size": 512, "lr": 2.0},
    privacy={"epsilon": 3.0, "max_grad_norm": 0.5},
)
DIGITS_EPS3["model"] = {k: v for k, v in DIGITS["model"].items() if k != "hog"}
CLIENT: dict[str, Any] = {
    "data": {"dataset": "synthetic", "n_sites": 1000, "rows": 60, "n_features": 10},
    "model": {"kind": "logistic"},
    "training": {
        "rounds": 30,
        "local_epochs": 1,
        "batch_size": 16,
        "lr": 2.0,
        "seed": 0,
        "clients_per_round": 100,
    },
    "privacy": {"mode": "client", "epsilon": 2.0, "clip": 1.0},
}


def config(raw: dict[str, Any], ledger_dir: Path) -> Config:
    raw = merge(
        raw,
        privacy={
            "delta": DELTA,
            "ledger": str(ledger_dir / f"ledger-{time.perf_counter_ns()}.sqlite"),
            "budget_epsilon": 1e6,
            "budget_delta": 0.5,
        },
    )
    return parse_config(raw)


def validation_split(fed: FederatedData, *, fraction: float = 0.25, seed: int = 0) -> FederatedData:
    """Each site's training records split into train and validation (as the 'test' set)."""
    sites = []
    for i, s in enumerate(fed.sites):
        rng = np.random.default_rng([seed, 101, i])
        perm = rng.permutation(s.n_train)
        k = int(round(fraction * s.n_train))
        val, tr = perm[:k], perm[k:]
        sites.append(SiteData(s.name, s.X_train[tr], s.y_train[tr], s.X_train[val], s.y_train[val]))
    return replace(fed, sites=sites)


def accuracy(cfg: Config, fed: FederatedData) -> float:
    spec = model_spec(cfg, fed)
    if cfg.privacy.mode == "none" and cfg.model.features == "none":
        return float(simulate(fed, spec, cfg.training).metrics["accuracy"])
    return float(train(cfg, fed, spec).result.metrics["accuracy"])


def evaluate_on(
    raw: dict[str, Any], ledger_dir: Path, *, validation: bool, seeds: Iterable[int]
) -> list[float]:
    accs = []
    for seed in seeds:
        cfg = config(merge(raw, training={"seed": seed}), ledger_dir)
        fed = load_federation(cfg)
        if validation:
            fed = validation_split(fed, seed=seed)
        accs.append(accuracy(cfg, fed))
    return accs


def _candidates(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, v, strict=True)) for v in itertools.product(*(grid[k] for k in keys))]


def _full(raw: dict[str, Any], cand: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with a candidate's ``section.key`` (or ``model.hog.key``) values set."""
    sections: dict[str, dict[str, Any]] = {}
    for k, v in cand.items():
        sec, *path, field = k.split(".")
        target = sections.setdefault(sec, {})
        for part in path:  # a sub-table ([model.hog]): merged into the one in raw
            target = target.setdefault(part, dict(raw.get(sec, {}).get(part, {})))
        target[field] = v
    return merge(raw, **sections)


def tune(
    name: str,
    raw: dict[str, Any],
    candidates: list[dict[str, Any]],
    ledger_dir: Path,
    seeds: list[int],
    *,
    keep: int = 8,
) -> dict[str, Any]:
    """Search on the validation split; returns the best raw config.

    Two stages: every candidate is scored with the first seed only, then the ``keep`` best are
    scored again on every seed and the best mean of that second stage wins (the noise cannot be
    seeded, so one seed's score is itself noisy: the second stage keeps a lucky draw from
    deciding)."""
    screened = []
    for cand in candidates:
        full = _full(raw, cand)
        acc = statistics.mean(evaluate_on(full, ledger_dir, validation=True, seeds=seeds[:1]))
        screened.append((acc, cand, full))
        print(f"  {name} {cand} validation (seed {seeds[0]}) {acc:.4f}", flush=True)
    screened.sort(key=lambda r: -r[0])
    results = []
    for _, cand, full in screened[:keep]:
        accs = evaluate_on(full, ledger_dir, validation=True, seeds=seeds)
        results.append((statistics.mean(accs), cand, full))
        print(f"  {name} {cand} validation (seeds {seeds}) {results[-1][0]:.4f}", flush=True)
    results.sort(key=lambda r: -r[0])
    best = results[0]
    print(f"{name}: best {best[1]} validation accuracy {best[0]:.4f}", flush=True)
    return best[2]


def _grids(*grids: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The union of several grids (each candidate once, in order)."""
    seen: set[str] = set()
    out = []
    for grid in grids:
        for cand in _candidates(grid):
            key = repr(sorted(cand.items()))
            if key not in seen:
                seen.add(key)
                out.append(cand)
    return out


_SGD = {"training.server_optimizer": ["sgd"], "training.server_lr": [1.0]}

#: The searches behind the chosen settings above, re-run when the accounting moved to
#: replace-one neighbours (about twice the noise of add/remove at the same epsilon). tune()
#: screens each candidate with seed 0, then re-scores the 8 best on seeds 0-2 (the validation
#: figures quoted here are those means).
SEARCH: dict[str, list[dict[str, Any]]] = {
    # demo (epsilon 1), inputs centred privately, 144 candidates. Best: 20 rounds, B 64, lr 4,
    # C 0.5, no server momentum (0.924); next 5 rounds, B 64, lr 8 (0.909); the previous
    # choice (10 rounds, B 128, lr 8, momentum 0.5) screened at 0.912 and was not kept. The
    # validation set is 114 records from 3 small sites: one seed's score moves by several points.
    # Re-screened with 3 seeds per candidate (400 candidates: C 0.1-1, B 64-512, 3-40 rounds,
    # lr 0.5-8, no momentum): the chosen settings stay the best (0.930), then B 128 (0.927),
    # then a plateau of 0.91-0.924; C 0.1 loses (0.67-0.73).
    "demo": _grids(
        {
            "training.server_optimizer": ["momentum"],
            "training.server_lr": [0.5],
            "privacy.max_grad_norm": [0.5, 1.0],
            "training.batch_size": [64, 128, 256],
            "training.rounds": [5, 10, 20, 40],
            "training.lr": [4.0, 8.0, 16.0],
        },
        {
            **_SGD,
            "privacy.max_grad_norm": [0.5, 1.0],
            "training.batch_size": [64, 128, 256],
            "training.rounds": [5, 10, 20, 40],
            "training.lr": [4.0, 8.0, 16.0],
        },
    ),
    # digits at epsilon 1, HOG features (norm 4), 322 candidates: batch sizes up to the whole
    # site (q = 1), 10-80 rounds, lr 0.5-32, C 0.25-2, server momentum or Adam. Best: 20
    # rounds, B 1024, lr 4, C 0.5 (0.894); B 512, lr 2 (0.893); momentum did not help (<= 0.882).
    # Large lr loses most (lr 32: 0.46-0.81); the plateau is 0.87-0.92 for one seed.
    "digits": _grids(
        {
            **_SGD,
            "privacy.max_grad_norm": [0.5],
            "training.batch_size": [512, 1024, 2048],
            "training.rounds": [10, 20, 40, 80],
            "training.lr": [4.0, 8.0, 16.0, 32.0],
        },
        {
            **_SGD,
            "privacy.max_grad_norm": [0.25, 0.5, 1.0],
            "training.batch_size": [512, 1024, 2048],
            "training.rounds": [10, 20, 40, 80],
            "training.lr": [0.5, 1.0, 2.0, 4.0],
        },
        {
            "training.server_optimizer": ["momentum"],
            "training.server_lr": [0.05, 0.1, 0.2],
            "privacy.max_grad_norm": [0.5, 1.0],
            "training.batch_size": [512, 2048],
            "training.rounds": [20, 40, 80],
            "training.lr": [1.0, 2.0, 4.0],
        },
        {
            "training.server_optimizer": ["adam"],
            "training.server_lr": [0.01, 0.03],
            "privacy.max_grad_norm": [1.0],
            "training.batch_size": [512, 2048],
            "training.rounds": [20, 40],
            "training.lr": [1.0, 4.0],
        },
        *(
            {
                **_SGD,
                "training.batch_size": [1024, 2048],
                "training.rounds": [40, 60, 80],
                "training.lr": [lr],
                "privacy.max_grad_norm": [c],
            }
            for lr, c in [(0.5, 1.0), (0.5, 2.0), (1.0, 2.0), (2.0, 1.0), (1.0, 0.5)]
        ),
    ),
    # digits at epsilon 1, the HOG map's own settings ([model.hog]), searched after the grids
    # above from their best (20 rounds, B 1024, lr 4, C 0.5). (a) bins x cell x stride, 24
    # candidates: more features lose (bins 16, stride 1: 0.72-0.80 for seed 0); the 8 kept
    # 0.79-0.891, the defaults (8 bins, cell 2, stride 2) 0.877, best cell 3 stride 1 (0.891).
    # (b) bins 4-8, cell 2-3, stride 1-2, cell_eps 0.001-0.1, scale 2-8, 108 candidates: seed
    # 0 0.76-0.911; the 8 kept 0.839-0.904, best cell_eps 0.1 (0.904), next bins 6, cell 3
    # (0.890; with cell_eps 0.001 0.887, the best for seed 0). (c) lr 2-8, C 0.25-1, B
    # 512/1024, 20/40 rounds on cell_eps 0.1 and on bins 6 / cell 3 / cell_eps 0.001, 72
    # candidates (seed 0 0.67-0.914): best cell_eps 0.1, 20 rounds, B 512, lr 8, C 0.25 (0.907;
    # the chosen DIGITS), next B 1024, lr 4, C 0.5 (0.898). Re-scored on 30 validation seeds
    # (13-42) that took no part in the choice, the gains shrink into the spread (sd of one
    # seed about 0.023, of a 30-seed mean about 0.004): the chosen 0.885, the previous
    # settings 0.880, cell_eps 0.1 alone 0.879, B 512 / lr 8 / C 0.25 with the default map
    # 0.876, bins 6 / cell 3 / cell_eps 0.001 0.878. At epsilon 3 (seeds 13-32) cell_eps 0.1
    # gives 0.954 against the default's 0.955, so the library default stays.
    "digits_hog": _grids(
        {
            "model.hog.bins": [8, 12, 16],
            "model.hog.cell": [2],
            "model.hog.stride": [1, 2],
        },
        {
            "model.hog.bins": [8, 12, 16],
            "model.hog.cell": [3],
            "model.hog.stride": [1, 2, 3],
        },
        {
            "model.hog.bins": [8, 12, 16],
            "model.hog.cell": [4],
            "model.hog.stride": [2, 3, 4],
        },
        {
            "model.hog.bins": [4, 6, 8],
            "model.hog.cell": [2, 3],
            "model.hog.stride": [1, 2],
            "model.hog.cell_eps": [0.001, 0.01, 0.1],
            "model.hog.scale": [2.0, 4.0, 8.0],
        },
        *(
            {
                **{f"model.hog.{k}": [v] for k, v in hog.items()},
                "training.lr": [2.0, 4.0, 8.0],
                "privacy.max_grad_norm": [0.25, 0.5, 1.0],
                "training.batch_size": [512, 1024],
                "training.rounds": [20, 40],
            }
            for hog in (
                {"bins": 8, "cell": 2, "stride": 2, "cell_eps": 0.1},
                {"bins": 6, "cell": 3, "stride": 2, "cell_eps": 0.001},
            )
        ),
    ),
    # digits at epsilon 3, 72 candidates. Best: 40 rounds, B 512, lr 2, C 0.5 (0.965); next
    # B 1024 with C 1 (0.958).
    "digits3": _grids(
        {
            **_SGD,
            "privacy.max_grad_norm": [0.5, 1.0],
            "training.batch_size": [512, 1024, 2048],
            "training.rounds": [20, 40, 80],
            "training.lr": [1.0, 2.0, 4.0, 8.0],
        }
    ),
    # client level (epsilon 2): lr 2, clip 1 (0.735 vs 0.737 non-private, seed 0-1)
    "client": _candidates({"training.lr": [1.0, 2.0], "privacy.clip": [0.25, 0.5, 1.0]}),
}


def _quick(raw: dict[str, Any]) -> dict[str, Any]:
    """A smoke run: 1 round, 20 clients at most (private training accounts replace-one
    neighbours, which only the PLD accountant computes)."""
    t, d = raw["training"], raw["data"]
    n_sites = min(20, d["n_sites"])
    training: dict[str, Any] = {"rounds": 1}
    if "clients_per_round" in t:
        training["clients_per_round"] = min(t["clients_per_round"], n_sites // 2)
    return merge(raw, training=training, data={"n_sites": n_sites})


def describe(raw: dict[str, Any]) -> str:
    """The settings of one experiment, as the docs' settings table shows them."""
    t, p = raw["training"], raw["privacy"]
    parts = [f"{t['rounds']} rounds", f"{t['local_epochs']} local epoch(s)"]
    if "clients_per_round" in t:
        n = raw["data"]["n_sites"]
        parts.append(f"q = {t['clients_per_round'] / n:g} ({t['clients_per_round']} clients per "
                     "round)")  # fmt: skip
    parts += [f"B {t['batch_size']}", f"lr {t['lr']:g}"]
    if p["mode"] == "sample":
        parts.append(f"C {p['max_grad_norm']:g}")
    elif p["mode"] == "client":
        parts.append(f"clip {p['clip']:g}")
    hog = raw["model"].get("hog")
    if hog:
        parts.append("HOG " + ", ".join(f"{k} {v:g}" for k, v in hog.items()))
    if t.get("server_optimizer", "sgd") != "sgd":
        lr = t.get("server_lr")
        parts.append(f"server {t['server_optimizer']}" + (f" (lr {lr:g})" if lr else ""))
    return ", ".join(parts)


def report(
    bench: Bench,
    name: str,
    raw: dict[str, Any],
    ledger_dir: Path,
    target: str,
    seeds: list[int],
    validation: bool = False,
    threshold: float | None = None,
) -> list[str]:
    t0 = time.perf_counter()
    val = evaluate_on(raw, ledger_dir, validation=True, seeds=seeds) if validation else []
    test = evaluate_on(raw, ledger_dir, validation=False, seeds=seeds)
    seconds = time.perf_counter() - t0
    bench.record(name, {"validation": val, "test": test, "seconds": seconds,
                        "settings": raw})  # fmt: skip
    shown = f"{statistics.mean(val):.3f}" if val else "-"
    print(f"{name:<24} validation {shown}  test {statistics.mean(test):.4f} [{seconds:.0f} s]",
          flush=True)  # fmt: skip
    if threshold is not None:
        target += " (met)" if statistics.mean(test) >= threshold else " (**not met**)"
    sd = statistics.stdev(test) if len(test) > 1 else 0.0
    return [name, shown, str(len(test)),
            f"**{statistics.mean(test):.3f}** (sd {sd:.3f}, {min(test):.3f}-{max(test):.3f})",
            target]  # fmt: skip


def _span(seeds: list[int]) -> str:
    return str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--tune", action="store_true", help="run the validation grid search")
    ap.add_argument("--only", choices=["demo", "digits", "client"], default=None)
    ap.add_argument(
        "--validation", action="store_true", help="also score the settings on the validation split"
    )
    ap.add_argument(
        "--seeds", type=int, default=10,
        help="training seeds for the demo and digits rows (the client rows use the first 3)",
    )
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    client_seeds = seeds[:3]
    bench = Bench("dpsgd_utility", quick=args.quick, out=args.out,
                   params={"seeds": seeds, "client_seeds": client_seeds, "delta": DELTA,
                           "tune": args.tune})  # fmt: skip
    rows: list[list[str]] = []
    settings: list[list[str]] = []
    chosen = {"demo": DEMO, "digits": DIGITS, "client": CLIENT}
    with tempfile.TemporaryDirectory() as tmp:
        ledger_dir = Path(tmp)
        for name, raw in chosen.items():
            if args.only and name != args.only:
                continue
            if args.tune:
                if name == "digits":  # the searches start from the default HOG map
                    raw = {**raw, "model": {k: v for k, v in raw["model"].items() if k != "hog"}}
                raw = tune(name, raw, SEARCH[name], ledger_dir, seeds=[0, 1, 2])
                if name == "digits":  # then the map's own settings, from that best
                    raw = tune("digits hog", raw, SEARCH["digits_hog"], ledger_dir,
                               seeds=[0, 1, 2])  # fmt: skip
            if args.quick:
                raw = _quick(raw)
            if name == "demo":
                rows.append(
                    report(
                        bench,
                        "demo, epsilon 1",
                        raw,
                        ledger_dir,
                        ">= 0.95",
                        seeds,
                        args.validation,
                        0.95,
                    )
                )
                settings.append(["demo: breast cancer, 3 hospitals, logistic, sample-level, "
                                 "eps = 1, inputs centred privately", describe(raw)])  # fmt: skip
            elif name == "digits":
                rows.append(
                    report(
                        bench,
                        "digits, epsilon 1",
                        raw,
                        ledger_dir,
                        ">= 0.93",
                        seeds,
                        args.validation,
                        0.93,
                    )
                )
                settings.append(["digits, 1 site, HOG + logistic, sample-level, eps = 1",
                                 describe(raw)])  # fmt: skip
                if not args.quick:  # the same code path as epsilon 1
                    eps3 = DIGITS_EPS3
                    if args.tune:
                        eps3 = tune("digits eps 3", eps3, SEARCH["digits3"], ledger_dir,
                                    seeds=[0, 1, 2])  # fmt: skip
                    rows.append(
                        report(
                            bench,
                            "digits, epsilon 3",
                            eps3,
                            ledger_dir,
                            ">= 0.96",
                            seeds,
                            args.validation,
                            0.96,
                        )
                    )
                    settings.append(["digits, same, eps = 3", describe(eps3)])
            else:
                private = report(bench, "1,000 clients, client-level, epsilon 2", raw,
                                 ledger_dir, "within 3 points of non-private", client_seeds,
                                 args.validation)  # fmt: skip
                plain = report(bench, "1,000 clients, non-private",
                               merge(raw, privacy={"mode": "none"}), ledger_dir, "-", client_seeds,
                               args.validation)  # fmt: skip
                gap = statistics.mean(bench.results[plain[0]]["test"]) - statistics.mean(
                    bench.results[private[0]]["test"]
                )
                private[3] += " (met)" if gap <= 0.03 else " (**not met**)"
                rows += [private, plain]
                n = raw["data"]["n_sites"]
                settings.append(
                    [
                        f"{n:,} synthetic clients ({raw['data']['rows']} rows each), "
                        "logistic, client-level DP-FedAvg, eps = 2",
                        describe(raw),
                    ]
                )
                settings.append(["same federation without DP (FedAvg)", "same"])
    bench.table(
        "utility",
        ["experiment", "validation (--validation)", "seeds", "test: mean (sd, min-max)", "target"],
        rows,
        caption=(
            f"Test accuracy, delta = 1e-5, PLD accountant, mean over training seeds "
            f"{_span(seeds)} (client rows: {_span(client_seeds)}; the data split is fixed by "
            "data.seed = 0; the noise is drawn afresh every run); met / not met from the mean; "
            "settings in the table above, the script (DEMO, DIGITS, DIGITS_EPS3, CLIENT) and "
            "the JSON results."
        ),
    )
    bench.table(
        "settings",
        ["experiment", "settings"],
        settings,
        caption=(
            "The settings (the script's DEMO, DIGITS, DIGITS_EPS3, CLIENT; B is the expected "
            "batch size: each site samples every record with probability q = min(1, B / N), N "
            "its training records; C the per-sample clipping norm)."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
