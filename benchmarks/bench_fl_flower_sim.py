"""privml's simulation engine vs Flower 1.42's ``run_simulation`` on the same work.

The work: logistic regression on breast cancer split IID over 100 clients, 10 rounds,
every client every round, FedAvg weighted by the clients' training-record counts. Both sides
train on the same encoded per-client arrays with the same local SGD (lr, local epochs, batch
size) and the same per-(round, client) batch shuffles, from the same initial model, so they
compute the same model up to float rounding; the script prints both accuracies on the pooled
held-out records.

* privml: :func:`privml.fl.engine.simulate` (the whole cohort's local SGD vectorized).
* Flower: a ``ServerApp`` running Flower's own ``FedAvg`` strategy (``strategy.start``) and a
  ``ClientApp`` whose ``train`` handler loads the global ``ArrayRecord`` into a torch model and
  runs an ordinary torch SGD loop on its client's records, driven by
  ``flwr.simulation.run_simulation``.

Flower's simulation runtime runs ClientApps through a *backend*. Flower 1.42 ships the Ray
backend (``pip install 'flwr[simulation]'``, in privml's ``bench`` extra): when ``ray`` is
importable it is measured (``client_resources = {num_cpus: 1}``, one actor per CPU). Flower's
runtime is also measured with a minimal in-process backend: the same ``Backend`` interface,
ClientApps called in worker threads of this process (one per CPU) instead of Ray actors; every
other part of Flower's runtime runs as shipped (LinkState, Grid, message (de)serialisation, the
VCE worker queues). Both are reported; the in-process figure is Flower without Ray's actor
overhead.

Timing: wall time of ``simulate(...)`` vs of ``run_simulation(...)`` (Ray started and stopped
by each call, as a user's run does), in this process after imports and data loading (shared);
every repetition runs every variant once in rotating order (benchmarks/harness.py), one warm-up
run of privml and of the in-process runtime excluded (a run on Ray starts its own cluster: it has
nothing to warm up). torch runs one intra-op thread everywhere (what Ray gives an actor with
``num_cpus = 1``; privml's engine does the same for linear models).

Run: ``.venv/bin/python benchmarks/bench_fl_flower_sim.py [--reps 3] [--clients 100] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import os
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data.federation import FederatedData, load_federation  # noqa: E402
from privml.fl.engine import init_params, simulate  # noqa: E402
from privml.fl.metrics import evaluate  # noqa: E402
from privml.models.nets import ModelSpec, load_flat_params  # noqa: E402
from privml.models.training import site_order  # noqa: E402
from privml.pipeline import model_spec  # noqa: E402

SEED = 0


def make_config(n_clients: int, rounds: int) -> Any:
    # The demo's tuned local SGD (benchmarks/tune_demo.py): lr 8, 5 local epochs, batch 32.
    return parse_config(
        {
            "data": {
                "dataset": "breast_cancer",
                "n_sites": n_clients,
                "partition": "iid",
                "seed": SEED,
            },
            "training": {
                "rounds": rounds,
                "local_epochs": 5,
                "batch_size": 32,
                "lr": 8.0,
                "seed": SEED,
            },
        }
    )


# --------------------------------------------------------------------------------------------
# Flower side
# --------------------------------------------------------------------------------------------


_RAY_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


def _inprocess_backend_module() -> types.ModuleType:
    """A module standing in for Flower's ``raybackend``: ClientApps in threads of this process.

    Flower 1.42's ``start_vce`` builds its backend with
    ``from .backend.raybackend import RayBackend``; while this module is registered under that
    name (:func:`_backend`), Flower's runtime uses the in-process ``Backend`` below instead.
    """
    from flwr.app.message import Context, Message
    from flwr.clientapp.client_app import ClientApp, LoadClientAppError
    from flwr.server.superlink.fleet.vce.backend.backend import Backend, BackendConfig

    try:
        from flwr.clientapp.client_app import ClientAppException  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - location differs across versions
        from flwr.client.client_app import ClientAppException  # type: ignore[no-redef]

    class InProcessBackend(Backend):
        def __init__(self, backend_config: BackendConfig) -> None:
            res = backend_config.get("client_resources", {}) or {}
            per = float(res.get("num_cpus", 1) or 1)
            self._workers = max(1, int((os.cpu_count() or 1) // per))
            self._app_fn: Callable[[], ClientApp] | None = None

        def build(self, app_fn: Callable[[], ClientApp]) -> None:
            self._app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return self._workers

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            self._app_fn = None

        def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
            assert self._app_fn is not None
            try:
                app = self._app_fn()
                out = app(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as ex:  # same wrapping as Flower's Ray actor
                raise ClientAppException(str(ex)) from ex
            return out, context

    mod = types.ModuleType(_RAY_MODULE)
    mod.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    return mod


@contextlib.contextmanager
def _backend(kind: str) -> Iterator[None]:
    """Make Flower's runtime use Ray (``ray``) or the in-process backend for a while."""
    if kind == "ray":
        yield
        return
    saved = sys.modules.get(_RAY_MODULE)
    sys.modules[_RAY_MODULE] = _inprocess_backend_module()
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(_RAY_MODULE, None)
        else:
            sys.modules[_RAY_MODULE] = saved


def make_client_app(fed: FederatedData, spec: ModelSpec, training: Any) -> Any:
    """The ClientApp: an ordinary torch SGD loop on its client's records.

    Everything it closes over pickles (Ray ships the app to its actors): the template model is
    copied per call instead of being rebuilt under a lock from torch's global RNG.
    """
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    template, _ = init_params(spec, training.seed)
    sites = [(s.X_train.astype(np.float32), s.y_train.astype(np.float32)) for s in fed.sites]
    lr, epochs, batch, seed = training.lr, training.local_epochs, training.batch_size, training.seed

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        site_id = int(context.node_config["partition-id"])
        Xn, yn = sites[site_id]
        rnd = int(msg.content["config"]["server-round"])
        model = copy.deepcopy(template)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        X, y = torch.from_numpy(Xn), torch.from_numpy(yn)
        for epoch in range(epochs):
            perm = site_order(seed, rnd, site_id, epoch, len(y))  # privml's order
            for start in range(0, len(y), batch):
                idx = torch.from_numpy(perm[start : start + batch])
                opt.zero_grad()
                loss = F.binary_cross_entropy_with_logits(model(X[idx])[:, 0], y[idx])
                loss.backward()
                opt.step()
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": int(len(y))}),
            }
        )
        return Message(content=content, reply_to=msg)

    return client_app


def run_flower(
    fed: FederatedData, spec: ModelSpec, training: Any, *, backend: str
) -> tuple[float, np.ndarray]:
    """One Flower simulation; returns (wall seconds, final flat params)."""
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    n = len(fed.sites)
    model0, _ = init_params(spec, training.seed)
    out: dict[str, Any] = {}
    client_app = make_client_app(fed, spec, training)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n,
            min_available_nodes=n,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model0.state_dict()),
            num_rounds=training.rounds,
        )
        out["arrays"] = result.arrays

    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    if backend == "ray":
        backend_config["init_args"] = {"num_cpus": os.cpu_count() or 1, "log_to_driver": False}
    with _backend(backend):
        t0 = time.perf_counter()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=n,
            backend_config=backend_config,  # type: ignore[arg-type]
        )
        seconds = time.perf_counter() - t0
    if "arrays" not in out:
        raise RuntimeError(f"Flower's simulation ({backend}) ended without a result; see its log")
    model, _ = init_params(spec, training.seed)
    model.load_state_dict(out["arrays"].to_torch_state_dict())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    return seconds, flat


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 2, quick 1)")
    ap.add_argument("--clients", type=int, default=None, help="default 100 (quick 10)")
    ap.add_argument("--rounds", type=int, default=None, help="default 10 (quick 2)")
    ap.add_argument(
        "--ray",
        choices=("auto", "yes", "no"),
        default=None,
        help="measure Flower on Ray: auto (when importable; the default), yes, no (the default "
        "with --quick: starting Ray takes longer than the whole quick run)",
    )
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 2)
    clients = args.clients or (4 if args.quick else 100)
    rounds = args.rounds or (1 if args.quick else 10)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    cfg = make_config(clients, rounds)
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    X_test, y_test = fed.pooled_test()
    ray = args.ray or ("no" if args.quick else "auto")
    has_ray = ray == "yes" or (ray == "auto" and importlib.util.find_spec("ray") is not None)
    bench = Bench(
        "fl_flower_sim",
        quick=args.quick,
        out=args.out,
        params={"clients": clients, "rounds": rounds, "reps": reps, "ray": has_ray},
    )
    params: dict[str, np.ndarray] = {}

    def ours() -> float:
        t0 = time.perf_counter()
        res = simulate(fed, spec, cfg.training)
        seconds = time.perf_counter() - t0
        params["privml"] = res.params.numpy()
        return seconds

    def flower(kind: str) -> Callable[[], float]:
        def run() -> float:
            seconds, flat = run_flower(fed, spec, cfg.training, backend=kind)
            params[f"flower_{kind}"] = flat
            return seconds

        return run

    variants: dict[str, Callable[[], float]] = {"privml simulate": ours}
    if has_ray:
        variants["Flower run_simulation, Ray"] = flower("ray")
    variants["Flower run_simulation, in-process backend"] = flower("inprocess")
    # warm-up: privml and the in-process runtime once each; a run on Ray starts and stops its
    # own Ray cluster, so there is nothing of it to warm up (and a run costs about a minute)
    for name, fn in variants.items():
        if "Ray" not in name and not args.quick:  # quick (a smoke run): no warm-up
            fn()
    t = bench.interleave(variants, reps=reps, warmup=0, key="seconds")

    model, _ = init_params(spec, SEED)

    def acc(flat: np.ndarray) -> float:
        load_flat_params(model, torch.from_numpy(flat))
        return float(evaluate(model, torch.from_numpy(flat), X_test, y_test)["accuracy"])

    accuracy = {k: acc(v) for k, v in params.items()}
    diff = {
        k: float(np.max(np.abs(params["privml"] - v))) for k, v in params.items() if k != "privml"
    }
    bench.record("accuracy", accuracy)
    bench.record("max_param_diff_vs_privml", diff)
    ours_s = t["privml simulate"]
    rows = []
    for name, s in t.items():
        key = "privml" if name.startswith("privml") else (
            "flower_ray" if "Ray" in name else "flower_inprocess"
        )  # fmt: skip
        r = ratios(s, ours_s)
        if key != "privml":
            bench.record(f"ratio_{key}", r.to_dict())
        rows.append(
            [name, fmt_spread(s, digits=3, unit="s"), "1" if key == "privml" else fmt_ratio(r),
             f"{accuracy[key]:.4f}", "-" if key == "privml" else f"{diff[key]:.1e}"]  # fmt: skip
        )
    if not has_ray:
        why = "not run (--ray no)" if ray == "no" else "not measured: ray is not installed"
        rows.append(["Flower run_simulation, Ray", why, "-", "-", "-"])
    bench.table(
        "sim",
        ["", "wall time", "privml speed-up", "accuracy", "max |param - privml|"],
        rows,
        caption=(
            f"{clients} clients x {rounds} rounds, logistic regression, breast cancer IID, "
            f"every client every round, the demo's local SGD (lr 8, 5 local epochs, batch 32); "
            f"{len(y_test)} pooled test records; median (min-max) of {reps} interleaved "
            "repetitions. Both sides compute the same model (largest parameter difference in "
            "the last column)."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
