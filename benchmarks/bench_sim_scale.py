"""Simulation at scale: one federated round of 100,000 sites, against its arithmetic alone.

Work: the built-in synthetic dataset (12 encoded features, binary label) over N sites of R
records (``bench_data_scale.py`` measures loading it); ``simulate`` runs logistic regression,
every site every round, 2 local epochs, batch 32. Reported: the seconds per round as the engine
records them, against the arithmetic of the same round alone (the same batched local steps on
tensors gathered beforehand: what a round costs without any bookkeeping). Both run on one torch
thread and alternate within each repetition (benchmarks/harness.py; one warm-up each excluded).

Run:  .venv/bin/python benchmarks/bench_sim_scale.py [--quick] [--reps 2] [--sites 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data_scale import _config  # noqa: E402
from harness import Bench, add_common_args, fmt_spread, summarize  # noqa: E402


def round_table(bench: Bench, n_sites: int, rows: int, rounds: int, reps: int) -> None:
    """Seconds per simulated round at scale, against the round's arithmetic alone."""
    import torch

    from privml.data import load_federation
    from privml.fl.engine import init_params, simulate
    from privml.models.training import Batch, MeanGradient
    from privml.pipeline import model_spec

    cfg = _config(n_sites, rows, rounds=rounds)
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"local_epochs": 2, "batch_size": 32, "lr": 1.0})})  # fmt: skip
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    t = cfg.training
    got: dict[str, Any] = {}

    def rounds_of_simulate() -> float:
        res = simulate(fed, spec, t)
        secs = [r.seconds for r in res.history]
        got.setdefault("rounds", []).append(secs)
        got["accuracy"] = float(res.metrics["accuracy"])
        return float(np.median(secs))

    # the arithmetic of one round: the same steps on batches gathered beforehand
    model, params = init_params(spec, t.seed)
    rule = MeanGradient(model, spec, binary=fed.task.kind == "binary")
    X, y, offsets = fed.train_arrays()
    sizes = np.diff(offsets)
    width = int(min(t.batch_size, sizes.max()))
    steps = int(np.ceil(sizes.max() / t.batch_size)) * t.local_epochs
    rng = np.random.default_rng(0)
    local = (rng.random((len(sizes), width)) * sizes[:, None]).astype(np.int64)
    rows_idx = torch.from_numpy(local + offsets[:-1, None]).reshape(-1)
    mask = torch.from_numpy((np.arange(width)[None, :] < sizes[:, None]).astype(np.float32))
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    batches = [
        Batch(Xt.index_select(0, rows_idx).reshape(len(sizes), width, -1),
              yt.index_select(0, rows_idx).reshape(len(sizes), width), mask)
        for _ in range(steps)
    ]  # fmt: skip

    def arithmetic() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            stacked = params.reshape(1, -1).repeat(len(sizes), 1)
            for k, b in enumerate(batches):
                stacked = stacked - t.lr * rule(stacked, b, k)
        return time.perf_counter() - t0

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timed = bench.interleave(
            {"privml simulate, seconds per round": rounds_of_simulate,
             "arithmetic of a round alone": arithmetic},
            reps=reps,
            key="round",
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    measured = got["rounds"][1:]  # the first call was the warm-up
    per_round = summarize([s for secs in measured for s in secs])
    alone = timed["arithmetic of a round alone"]
    bench.record("round_seconds", per_round.to_dict())
    bench.record("round_arithmetic_share", alone.median / per_round.median)
    bench.record("round_history_seconds", measured)
    bench.table(
        "round",
        ["", "seconds", "share of the round"],
        [
            [
                "privml simulate: one round (every site)",
                fmt_spread(per_round, digits=3, unit="s"),
                "1",
            ],
            [
                "the same steps' arithmetic on batches gathered beforehand",
                fmt_spread(alone, digits=3, unit="s"),
                f"{100 * alone.median / per_round.median:.0f}%",
            ],
        ],  # fmt: skip
        caption=(
            f"One round of {n_sites:,} sites x {rows} records (logistic regression, every site "
            f"every round, {t.local_epochs} local epochs, batch {t.batch_size}: {steps} "
            f"batched steps of {n_sites:,} x {width} records): the engine's round time over "
            f"{rounds} rounds x {reps} runs (median, min-max), against the same "
            f"steps' arithmetic alone; pooled test accuracy {got['accuracy']:.3f}."
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default 2, quick 1)")
    ap.add_argument("--sites", type=int, default=None, help="default 100,000 (quick 500)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run (default 3)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    reps = args.reps or (1 if args.quick else 2)
    sites = args.sites or (500 if args.quick else 100_000)
    rounds = args.rounds or (2 if args.quick else 3)
    bench = Bench("sim_scale", quick=args.quick, out=args.out,
                  params={"sites": sites, "rows": 20, "rounds": rounds, "reps": reps})  # fmt: skip
    round_table(bench, sites, 20, rounds, reps)
    bench.write()


if __name__ == "__main__":
    main()
