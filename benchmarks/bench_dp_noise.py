"""Cost of unpredictable noise: DP-SGD with privml's secure noise source vs seeded noise.

Run:  .venv/bin/python benchmarks/bench_dp_noise.py [--quick] [--out FILE]

Private training draws its Gaussian noise and its Poisson samples from AES-256-CTR keystreams
under a fresh OS-random key (:mod:`privml.dp.randomness`). The anchor is the same DP-SGD
(:class:`privml.dp.sgd.DPSGDGradient`, same data, model, clipping and noise multiplier) with
what privml used before: ``torch.randn`` from seeded ``torch.Generator`` objects for the
noise and numpy's ``binomial`` + ``choice`` for the Poisson batches. Everything else is
identical, so the ratio is the price of noise nobody can regenerate. The two variants
alternate within each repetition (benchmarks/harness.py), one torch thread.

Workloads (those of ``bench_dpsgd.py``): one local epoch on breast cancer (MLP 30-64-2,
B = 64), one on digits (the privml CNN, B = 64), and one federated round of 100 sites
(256 records x 30 features, MLP 30-64-2, B = 32). Target: secure / seeded <= 1.10.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios

from privml.dp.randomness import NoiseSource
from privml.dp.sgd import (
    DPSGDGradient,
    PoissonBatches,
    noise_generators,
    poisson_batches,
    sampling_plan,
)
from privml.models.nets import ModelSpec, build_model, flat_params
from privml.models.training import CohortData, train_cohort

SIGMA, C, LR = 1.0, 1.0, 0.1


def _data(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_digits

    X, y = (load_breast_cancer if name == "breast_cancer" else load_digits)(return_X_y=True)
    X = (X - X.min(0)) / np.maximum(X.max(0) - X.min(0), 1e-9)
    return X.astype(np.float32), y.astype(np.int64)


def _seeded_poisson(
    sizes: np.ndarray, batch_size: int, rngs: Sequence[np.random.Generator]
) -> PoissonBatches:
    """The Poisson batches as privml drew them before (numpy binomial + choice)."""
    plans = [sampling_plan(int(n), batch_size=batch_size, epochs=1) for n in sizes]
    rates = np.array([p[0] for p in plans])
    steps = np.array([p[1] for p in plans], dtype=np.int64)
    chosen, width = [], 1
    for s, n in enumerate(sizes):
        counts = rngs[s].binomial(int(n), rates[s], size=int(steps[s]))
        chosen.append(
            [np.sort(rngs[s].choice(int(n), size=int(k), replace=False)) for k in counts]
        )
        width = max(width, int(counts.max(initial=0)))
    T = int(steps.max())
    idx = np.zeros((len(sizes), T, width), dtype=np.int64)
    mask = np.zeros((len(sizes), T, width), dtype=np.float32)
    for s, picks in enumerate(chosen):
        for t, p in enumerate(picks):
            idx[s, t, : len(p)] = p
            mask[s, t, : len(p)] = 1.0
    return PoissonBatches(idx, mask, steps, rates, rates * sizes)


def epoch(
    spec: ModelSpec, Xs: list[np.ndarray], ys: list[np.ndarray], B: int, secure: bool
) -> Callable[[], None]:
    """One local epoch of DP-SGD at every site, with secure or seeded randomness."""
    torch.manual_seed(0)
    model = build_model(spec)
    params = flat_params(model)
    data = CohortData.from_arrays(Xs, ys)
    S = len(Xs)
    counter = [0]

    def run() -> None:
        counter[0] += 1
        if secure:
            source = NoiseSource.fresh()
            rngs: list = [source.stream("dpsgd-sampling", counter[0], s) for s in range(S)]
            pb = poisson_batches(data.sizes, batch_size=B, epochs=1, rngs=rngs)
            gens: list = [source.stream("dpsgd-noise", counter[0], s) for s in range(S)]
        else:
            rngs = [np.random.default_rng([counter[0], 2, s]) for s in range(S)]
            pb = _seeded_poisson(np.asarray(data.sizes), B, rngs)
            gens = noise_generators(0, counter[0], range(S))
        rule = DPSGDGradient(
            model, spec, binary=False, max_grad_norm=C, noise_multipliers=[SIGMA] * S,
            expected_batch=pb.expected_batch, steps=pb.steps, generators=gens,
        )  # fmt: skip
        train_cohort(
            params, data, rule=rule, lr=LR, batch_size=B, epochs=1, rngs=(),
            batches=(pb.idx, pb.mask),
        )  # fmt: skip

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 15, quick 1)")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 15)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    bench = Bench("dp_noise", quick=args.quick, out=args.out, params={"reps": reps})
    rng = np.random.default_rng(0)
    n_sites = 3 if args.quick else 100
    w = rng.normal(size=30)
    Xs = [rng.random((256, 30), dtype=np.float32) for _ in range(n_sites)]
    ys = [((x - 0.5) @ w > 0).astype(np.int64) for x in Xs]
    bc, dg = _data("breast_cancer"), _data("digits")
    workloads = {
        "breast cancer, MLP 30-64-2, one epoch": (
            ModelSpec("mlp", 30, 2, hidden=(64,)), [bc[0]], [bc[1]], 64),
        "digits, CNN, one epoch": (
            ModelSpec("cnn", 64, 10, hidden=(32,), image_shape=(8, 8)), [dg[0]], [dg[1]], 64),
        f"{n_sites} sites x 256 records, MLP 30-64-2, one round": (
            ModelSpec("mlp", 30, 2, hidden=(64,)), Xs, ys, 32),
    }  # fmt: skip
    rows = []
    for label, (spec, X, y, B) in workloads.items():
        got = bench.interleave(
            {"secure": epoch(spec, X, y, B, True), "seeded": epoch(spec, X, y, B, False)},
            reps=reps,
            warmup=0 if args.quick else 1,  # quick (a smoke run): no warm-up
            key=label,
        )
        r = ratios(got["secure"], got["seeded"])
        bench.record(f"{label}: secure / seeded", r.to_dict())
        rows.append(
            [label, fmt_spread(got["seeded"], 1e3, unit="ms"),
             fmt_spread(got["secure"], 1e3, unit="ms"), fmt_ratio(r)]
        )  # fmt: skip
    bench.table(
        "speed",
        ["workload", "seeded noise (before)", "secure noise (privml)", "secure / seeded"],
        rows,
        caption="DP-SGD with unpredictable noise and sampling (AES-256-CTR keystreams, fresh "
        "OS-random key) against seeded torch.randn noise and numpy sampling; one torch thread, "
        "medians (min-max) of interleaved repetitions.",
    )
    bench.write()


if __name__ == "__main__":
    main()
