"""Speed of privml's DP-SGD against Opacus 1.6 (every grad-sample mode) and plain SGD.

Run:  .venv/bin/python benchmarks/bench_dpsgd.py [--reps 7] [--quick]

Three workloads, every variant on one torch thread (``torch.set_num_threads(1)``), the same
data, the same model, the same (expected) batch size, noise multiplier 1.0, clipping norm 1.0:

1. ``mlp``: breast cancer, MLP 30-64-2 (ReLU), B = 64, one epoch (569 records);
2. ``cnn``: digits, the privml CNN (conv 16, conv 32 stride 2, dense 32, 10 outputs), B = 64,
   one epoch (1,797 records);
3. ``round``: one federated round of 100 sites (synthetic, 256 records x 30 features each,
   MLP 30-64-2, B = 32, one local epoch).

Variants, each in its best configuration:

* plain SGD: the physical limit (no clipping, no noise): a shuffled permutation and batches
  taken by tensor indexing (``X[idx]``), ``CrossEntropyLoss``, ``torch.optim.SGD``;
* Opacus ``PrivacyEngine.make_private`` with ``grad_sample_mode`` ``hooks``, ``ghost``
  (ghost clipping, its wrapped criterion) and ``functorch``; batches Poisson-sampled by tensor
  indexing at Opacus's own sample rate (the same sampling its ``DPDataLoader`` does, without
  collating records one by one); ``hooks + DPDataLoader`` is the documented pipeline,
  reported for reference;
* privml: ``train_cohort`` with :class:`privml.dp.sgd.DPSGDGradient` and Poisson batches (the
  code private training runs; layer-wise route), and ``privml vmap`` (the generic
  ``torch.func`` route, the fallback for architectures the layer-wise route does not cover;
  timed on the MLP).

For the 100-site round, Opacus runs site after site in each mode (each site's wrapped model,
optimizer and criterion built before the clock starts).

Every repetition runs every variant once, in rotating order (benchmarks/harness.py); one
warm-up run of each is excluded. Reported: median time per epoch (round) with min-max, samples
per second, and per-repetition ratios against the best Opacus mode and plain SGD.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, Summary, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.dp.randomness import NoiseSource  # noqa: E402
from privml.dp.sgd import DPSGDGradient, poisson_batches  # noqa: E402
from privml.models.nets import (  # noqa: E402
    ModelSpec,
    build_model,
    flat_params,
    load_flat_params,
)
from privml.models.training import CohortData, train_cohort  # noqa: E402

SIGMA, C, LR = 1.0, 1.0, 0.1
OPACUS_MODES = ("hooks", "ghost", "functorch")


def _data(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer, load_digits

    if name == "breast_cancer":
        X, y = load_breast_cancer(return_X_y=True)
    else:
        X, y = load_digits(return_X_y=True)
    X = (X - X.min(0)) / np.maximum(X.max(0) - X.min(0), 1e-9)
    return X.astype(np.float32), y.astype(np.int64)


def plain_epoch(spec: ModelSpec, X: np.ndarray, y: np.ndarray, B: int) -> Callable[[], None]:
    """Plain mini-batch SGD, batches by tensor indexing (no per-record collation)."""
    torch.manual_seed(0)
    model = build_model(spec)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tX, ty = torch.from_numpy(X), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    n = len(ty)

    def run() -> None:
        perm = torch.randperm(n)
        for start in range(0, n, B):
            idx = perm[start : start + B]
            opt.zero_grad()
            loss_fn(model(tX[idx]), ty[idx]).backward()
            opt.step()

    return run


class _Opacus:
    """A model, optimizer (and criterion) made private by Opacus in one grad-sample mode."""

    def __init__(
        self, spec: ModelSpec, X: np.ndarray, y: np.ndarray, B: int, mode: str, seed: int = 0
    ) -> None:
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        torch.manual_seed(seed)
        model = build_model(spec)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        self.X, self.y = torch.from_numpy(X), torch.from_numpy(y)
        loader = DataLoader(TensorDataset(self.X, self.y), B, shuffle=True)
        engine = PrivacyEngine()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            made = engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                criterion=nn.CrossEntropyLoss(),
                noise_multiplier=SIGMA,
                max_grad_norm=C,
                poisson_sampling=True,
                grad_sample_mode=mode,
            )
        if mode == "ghost":
            self.model, self.opt, self.criterion, self.loader = made
        else:
            self.model, self.opt, self.loader = made
            self.criterion = nn.CrossEntropyLoss()
        self.steps = len(self.loader)
        self.rate = 1.0 / self.steps  # Opacus's sample rate (what its DPDataLoader uses)

    def step(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        self.opt.zero_grad()
        if len(yb):
            self.criterion(self.model(xb), yb).backward()
        self.opt.step()

    def epoch_indexed(self) -> None:
        """One epoch of Poisson batches drawn by tensor indexing."""
        n = len(self.y)
        for _ in range(self.steps):
            idx = torch.nonzero(torch.rand(n) < self.rate).squeeze(1)
            self.step(self.X[idx], self.y[idx])

    def epoch_loader(self) -> None:
        """One epoch through Opacus's DPDataLoader (its documented pipeline)."""
        for xb, yb in self.loader:
            self.step(xb, yb)


def privml_epoch(
    spec: ModelSpec, Xs: list[np.ndarray], ys: list[np.ndarray], B: int, method: str
) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_model(spec)
    params = flat_params(model)
    data = CohortData.from_arrays(Xs, ys)
    counter = [0]

    def run() -> None:
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

    return run


def _best(t: dict[str, Summary], names: list[str]) -> str:
    return min(names, key=lambda n: t[n].median)


def single_site(
    bench: Bench,
    key: str,
    name: str,
    spec: ModelSpec,
    B: int,
    reps: int,
    limit: int | None,
    *,
    with_vmap: bool = False,
) -> None:
    X, y = _data(name)
    X, y = X[:limit], y[:limit]
    n = len(y)
    opacus = {m: _Opacus(spec, X, y, B, m) for m in OPACUS_MODES}
    variants: dict[str, Callable[[], Any]] = {
        "plain SGD": plain_epoch(spec, X, y, B),
        **{f"Opacus {m}": opacus[m].epoch_indexed for m in OPACUS_MODES},
        "Opacus hooks + DPDataLoader": opacus["hooks"].epoch_loader,
        "privml": privml_epoch(spec, [X], [y], B, "auto"),
    }
    if with_vmap:
        variants["privml vmap"] = privml_epoch(spec, [X], [y], B, "vmap")
    t = bench.interleave(variants, reps=reps, key=key)
    best = _best(t, [v for v in t if v.startswith("Opacus")])
    vs_best, vs_plain = ratios(t[best], t["privml"]), ratios(t["plain SGD"], t["privml"])
    bench.record(f"{key}_best_opacus", best)
    bench.record(f"{key}_privml_vs_best_opacus", vs_best.to_dict())
    bench.record(f"{key}_privml_vs_plain", vs_plain.to_dict())
    rows = []
    for v, s in t.items():
        rate = n / s.median
        rel = "1" if v == "privml" else fmt_ratio(ratios(s, t["privml"]))
        rows.append([v + (" (best Opacus)" if v == best else ""), fmt_spread(s, 1e3, 1, "ms"),
                     f"{rate:,.0f}", rel])  # fmt: skip
    params = flat_params(build_model(spec)).numel()
    bench.table(
        key,
        ["variant", "ms per epoch", "samples/s", "privml speed-up"],
        rows,
        caption=(
            f"{name.replace('_', ' ')}, {spec.kind.upper()} ({params:,} parameters), B = {B}, "
            f"one epoch of {n:,} records; median (min-max) of {reps} interleaved repetitions. "
            f"privml is {fmt_ratio(vs_best)} as fast as the best Opacus mode ({best}) and "
            f"runs at {fmt_ratio(vs_plain)} the speed of plain SGD (speed-up column: time of the "
            "variant / time of privml, per repetition)."
        ),
    )


def hundred_sites(bench: Bench, reps: int, n_sites: int, n: int = 256, B: int = 32) -> None:
    rng = np.random.default_rng(0)
    spec = ModelSpec("mlp", 30, 2, hidden=(64,))
    w = rng.normal(size=30)
    Xs = [rng.random((n, 30), dtype=np.float32) for _ in range(n_sites)]
    ys = [((x - 0.5) @ w > 0).astype(np.int64) for x in Xs]
    torch.manual_seed(0)
    global_params = flat_params(build_model(spec))

    def site_loop(mode: str) -> Callable[[], None]:
        wrapped = [_Opacus(spec, Xs[s], ys[s], B, mode, seed=s) for s in range(n_sites)]

        def run() -> None:
            for o in wrapped:
                load_flat_params(o.model._module, global_params)
                o.epoch_indexed()

        return run

    variants: dict[str, Callable[[], Any]] = {
        "privml (all sites at once)": privml_epoch(spec, Xs, ys, B, "auto"),
        **{f"Opacus {m}, site after site": site_loop(m) for m in OPACUS_MODES},
    }
    t = bench.interleave(variants, reps=reps, key="round")
    ours = t["privml (all sites at once)"]
    best = _best(t, [f"Opacus {m}, site after site" for m in OPACUS_MODES])
    r = ratios(t[best], ours)
    bench.record("round_best_opacus", best)
    bench.record("round_speedup_vs_best_opacus", r.to_dict())
    rows = [
        [v + (" (best Opacus)" if v == best else ""), fmt_spread(s, 1e3, 1, "ms"),
         "1" if s is ours else fmt_ratio(ratios(s, ours))]  # fmt: skip
        for v, s in t.items()
    ]
    bench.table(
        "round",
        ["variant", "ms per round", "privml speed-up"],
        rows,
        caption=(
            f"One federated round, {n_sites} sites x {n} records, MLP 30-64-2, B = {B}, one "
            f"local epoch; median (min-max) of {reps} interleaved repetitions."
        ),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 7, quick 2)")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 7)
    n_sites = 3 if args.quick else 100
    warnings.filterwarnings("ignore")  # Opacus's secure-RNG and hook warnings, every step
    torch.set_num_threads(1)
    bench = Bench("dpsgd", quick=args.quick, out=args.out,
                  params={"reps": reps, "sites": n_sites, "sigma": SIGMA, "clip": C})  # fmt: skip
    limit = 128 if args.quick else None  # quick: a slice of the records, to keep it short
    mlp = ModelSpec("mlp", 30, 2, hidden=(64,))
    cnn = ModelSpec("cnn", 64, 10, hidden=(32,), image_shape=(8, 8))
    # the generic vmap route (the fallback for other architectures) is timed on the MLP only
    single_site(bench, "mlp", "breast_cancer", mlp, 64, reps, limit, with_vmap=True)
    single_site(bench, "cnn", "digits", cnn, 64, reps, limit)
    hundred_sites(bench, reps if args.quick else max(3, reps // 2), n_sites)
    bench.write()


if __name__ == "__main__":
    main()
