"""Speed of privml's DP-SGD against Opacus 1.6 (hooks) and plain SGD, in one process.

Run:  .venv/bin/python benchmarks/bench_dpsgd.py [--repeats 7] [--quick]

Three measurements, each on one torch thread (``torch.set_num_threads(1)``), same data, same
model, same (expected) batch size, noise multiplier 1.0, clipping norm 1.0:

1. breast cancer, MLP 30-64-2 (ReLU), B = 64: samples/s of one local epoch of
   * plain SGD: a standard torch loop (DataLoader(shuffle=True), CrossEntropyLoss, SGD),
   * Opacus: ``PrivacyEngine.make_private`` (hooks mode, Poisson DPDataLoader), same loop,
   * privml: ``train_cohort`` with :class:`privml.dp.sgd.DPSGDGradient` (layer-wise route),
   * privml-vmap: the same rule forced onto the torch.func vmap(grad) route.
2. digits, the privml CNN (conv 16, conv 32 stride 2, dense 32, 10 outputs), B = 64.
3. one federated round of 100 sites (synthetic, 256 records x 30 features each, MLP 30-64-2,
   B = 32, one local epoch): privml's cohort-vectorized DP-SGD vs Opacus run site after site
   (each site's wrapped model, optimizer and Poisson loader built before the clock starts, so
   Opacus is timed at its best).

Prints the median of ``--repeats`` timings of each and the ratios privml / Opacus and
privml / plain SGD. Figures are recorded in docs/benchmarks_dp_training.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privml.dp.randomness import NoiseSource
from privml.dp.sgd import DPSGDGradient, poisson_batches
from privml.fl.local import CohortData, train_cohort
from privml.models.nets import ModelSpec, build_model, flat_params, load_flat_params

SIGMA, C, LR = 1.0, 1.0, 0.1


def _data(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "breast_cancer":
        X, y = load_breast_cancer(return_X_y=True)
    else:
        X, y = load_digits(return_X_y=True)
    X = (X - X.min(0)) / np.maximum(X.max(0) - X.min(0), 1e-9)
    return X.astype(np.float32), y.astype(np.int64)


def _median_rate(fn: Callable[[], int], repeats: int) -> float:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def plain_epoch(spec: ModelSpec, X: np.ndarray, y: np.ndarray, B: int) -> Callable[[], int]:
    torch.manual_seed(0)
    model = build_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), B, shuffle=True)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> int:
        n = 0
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            n += len(yb)
        return n

    return run


def _opacus(spec: ModelSpec, X: np.ndarray, y: np.ndarray, B: int, seed: int = 0):  # type: ignore[no-untyped-def]
    from opacus import PrivacyEngine

    torch.manual_seed(seed)
    model = build_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(y)), B, shuffle=True)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=SIGMA,
            max_grad_norm=C,
            poisson_sampling=True,
        )
    return model, opt, loader


def opacus_epoch(spec: ModelSpec, X: np.ndarray, y: np.ndarray, B: int) -> Callable[[], int]:
    model, opt, loader = _opacus(spec, X, y, B)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> int:
        n = 0
        for xb, yb in loader:
            opt.zero_grad()
            if len(yb):
                loss_fn(model(xb), yb).backward()
            opt.step()
            n += len(yb)
        return n

    return run


def privml_epoch(
    spec: ModelSpec, Xs: list[np.ndarray], ys: list[np.ndarray], B: int, method: str
) -> Callable[[], int]:
    torch.manual_seed(0)
    model = build_model(spec)
    params = flat_params(model)
    data = CohortData.from_arrays(Xs, ys)
    counter = [0]

    def run() -> int:
        counter[0] += 1
        # private training's randomness: a fresh OS-keyed source, one stream per use
        source = NoiseSource.fresh()
        rngs = [source.stream("dpsgd-sampling", counter[0], s) for s in range(len(Xs))]
        pb = poisson_batches(data.sizes, batch_size=B, epochs=1, rngs=rngs)
        rule = DPSGDGradient(
            model,
            spec,
            binary=False,
            max_grad_norm=C,
            noise_multipliers=[SIGMA] * len(Xs),
            expected_batch=pb.expected_batch,
            steps=pb.steps,
            generators=[source.stream("dpsgd-noise", counter[0], s) for s in range(len(Xs))],
            method=method,  # type: ignore[arg-type]
        )
        train_cohort(
            params,
            data,
            rule=rule,
            lr=LR,
            batch_size=B,
            epochs=1,
            rngs=(),
            batches=(pb.idx, pb.mask),
        )
        return int(pb.mask.sum())

    return run


def single_site(name: str, spec: ModelSpec, B: int, repeats: int) -> None:
    X, y = _data(name)
    rates = {
        "plain SGD": _median_rate(plain_epoch(spec, X, y, B), repeats),
        "Opacus hooks": _median_rate(opacus_epoch(spec, X, y, B), repeats),
        "privml": _median_rate(privml_epoch(spec, [X], [y], B, "auto"), repeats),
        "privml vmap": _median_rate(privml_epoch(spec, [X], [y], B, "vmap"), repeats),
    }
    print(f"\n{name}, {spec.kind} ({flat_params(build_model(spec)).numel()} params), B={B}")
    for k, v in rates.items():
        print(f"  {k:<14} {v:>12,.0f} samples/s")
    print(f"  privml / Opacus     = {rates['privml'] / rates['Opacus hooks']:.2f}x")
    print(f"  privml vmap / Opacus= {rates['privml vmap'] / rates['Opacus hooks']:.2f}x")
    print(f"  privml / plain SGD  = {rates['privml'] / rates['plain SGD']:.2f}")
    print(f"  Opacus / plain SGD  = {rates['Opacus hooks'] / rates['plain SGD']:.2f}")


def hundred_sites(repeats: int, n_sites: int = 100, n: int = 256, B: int = 32) -> None:
    rng = np.random.default_rng(0)
    spec = ModelSpec("mlp", 30, 2, hidden=(64,))
    w = rng.normal(size=30)
    Xs = [rng.random((n, 30), dtype=np.float32) for _ in range(n_sites)]
    ys = [((x - 0.5) @ w > 0).astype(np.int64) for x in Xs]
    ours = privml_epoch(spec, Xs, ys, B, "auto")

    torch.manual_seed(0)
    global_params = flat_params(build_model(spec))
    wrapped = [_opacus(spec, Xs[s], ys[s], B, seed=s) for s in range(n_sites)]
    loss_fn = nn.CrossEntropyLoss()

    def theirs() -> int:
        total = 0
        for model, opt, loader in wrapped:
            load_flat_params(model._module, global_params)
            for xb, yb in loader:
                opt.zero_grad()
                if len(yb):
                    loss_fn(model(xb), yb).backward()
                opt.step()
                total += len(yb)
        return total

    def timed(fn: Callable[[], int]) -> float:
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    t_ours, t_theirs = timed(ours), timed(theirs)
    print(f"\none round, {n_sites} sites x {n} records, MLP 30-64-2, B={B}, 1 local epoch")
    print(f"  privml (vectorized)   {t_ours * 1e3:9.1f} ms")
    print(f"  Opacus site by site   {t_theirs * 1e3:9.1f} ms")
    print(f"  speed-up              {t_theirs / t_ours:9.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 repeats (smoke run)")
    args = ap.parse_args()
    repeats = 3 if args.quick else args.repeats
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook warnings, every step
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of {repeats}")
    single_site("breast_cancer", ModelSpec("mlp", 30, 2, hidden=(64,)), 64, repeats)
    single_site("digits", ModelSpec("cnn", 64, 10, hidden=(32,), image_shape=(8, 8)), 64, repeats)
    hundred_sites(repeats)


if __name__ == "__main__":
    main()
