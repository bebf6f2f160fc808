"""privml's simulation engine vs Flower 1.42's ``run_simulation`` on the same work.

The work (issue 5): logistic regression on breast cancer split IID over 100 clients, 10 rounds,
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

Flower's simulation runtime runs ClientApps through a *backend*; Flower 1.42 ships only the Ray
backend (``flwr[simulation]``). When ``ray`` is importable it is used
(``client_resources = {num_cpus: 1}``). When it is not (this project does not depend on Ray),
the script gives Flower's runtime a minimal in-process backend: the same ``Backend`` interface,
ClientApps called in worker threads of this process (one per CPU) instead of Ray actors. Every
other part of Flower's runtime runs as shipped (LinkState, Grid, message (de)serialisation,
the VCE worker queues). Ray's actors only add overhead, so the in-process figure is a lower
bound on Flower's time and the ratio is conservative; the script prints which backend ran.

Timing: wall time of ``simulate(...)`` vs of ``run_simulation(...)``, both in this process after
imports and data loading (shared); median of ``--reps`` repetitions of each, interleaved. torch
runs one intra-op thread on both sides (what Ray gives an actor with ``num_cpus = 1``; privml's
engine does the same for linear models).

Run: ``.venv/bin/python benchmarks/bench_fl_flower_sim.py [--reps 3] [--clients 100]``
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data.federation import FederatedData, load_federation  # noqa: E402
from privml.fl.engine import init_params, simulate  # noqa: E402
from privml.fl.metrics import evaluate  # noqa: E402
from privml.models.nets import ModelSpec, load_flat_params  # noqa: E402
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


def _install_inprocess_backend() -> None:
    """Let Flower's simulation runtime run ClientApps in threads of this process.

    Flower 1.42's ``start_vce`` builds its backend with
    ``from .backend.raybackend import RayBackend``; without Ray that module cannot be imported,
    so a module of the same name providing an in-process ``Backend`` is registered instead.
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

    mod = types.ModuleType("flwr.server.superlink.fleet.vce.backend.raybackend")
    mod.RayBackend = InProcessBackend  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod


def run_flower(
    fed: FederatedData, spec: ModelSpec, training: Any, *, backend: str
) -> tuple[float, np.ndarray]:
    """One Flower simulation; returns (wall seconds, final flat params)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    n = len(fed.sites)
    model0, p0 = init_params(spec, training.seed)
    out: dict[str, Any] = {}
    lock = threading.Lock()

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        site_id = int(context.node_config["partition-id"])
        site = fed.sites[site_id]
        rnd = int(msg.content["config"]["server-round"])
        with lock:  # build_model touches torch's global RNG; keep it out of the race
            model, _ = init_params(spec, training.seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=training.lr)
        X = torch.from_numpy(site.X_train.astype(np.float32))
        y = torch.from_numpy(site.y_train.astype(np.float32))
        rng = np.random.default_rng([training.seed, rnd, 2, site_id])  # privml's seeding
        for _ in range(training.local_epochs):
            perm = rng.permutation(len(y))
            for start in range(0, len(y), training.batch_size):
                idx = torch.from_numpy(perm[start : start + training.batch_size])
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
        backend_config["init_args"] = {"num_cpus": os.cpu_count() or 1}
    t0 = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n,
        backend_name="ray" if backend == "ray" else "inprocess",
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    seconds = time.perf_counter() - t0
    if "arrays" not in out:
        raise RuntimeError("Flower's simulation ended without a result; see its log above")
    model, _ = init_params(spec, training.seed)
    model.load_state_dict(out["arrays"].to_torch_state_dict())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    return seconds, flat


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    # One torch thread per ClientApp, as Ray gives an actor with num_cpus=1 (OMP_NUM_THREADS=1);
    # privml's simulate uses one thread for linear models by itself.
    torch.set_num_threads(1)

    cfg = make_config(args.clients, args.rounds)
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    X_test, y_test = fed.pooled_test()
    backend = "ray" if importlib.util.find_spec("ray") is not None else "inprocess"
    if backend != "ray":
        _install_inprocess_backend()

    simulate(fed, spec, cfg.training)  # warm-up (torch kernels, allocator)
    privml_times, flower_times = [], []
    privml_params = flower_params = None
    for _ in range(args.reps):
        t0 = time.perf_counter()
        res = simulate(fed, spec, cfg.training)
        privml_times.append(time.perf_counter() - t0)
        privml_params = res.params.numpy()
        secs, flower_params = run_flower(fed, spec, cfg.training, backend=backend)
        flower_times.append(secs)
    assert privml_params is not None and flower_params is not None

    model, _ = init_params(spec, SEED)

    def acc(flat: np.ndarray) -> float:
        load_flat_params(model, torch.from_numpy(flat))
        return float(evaluate(model, torch.from_numpy(flat), X_test, y_test)["accuracy"])

    p_med, f_med = statistics.median(privml_times), statistics.median(flower_times)
    diff = float(np.max(np.abs(privml_params - flower_params)))
    print(
        f"work: {args.clients} clients x {args.rounds} rounds, logistic regression, breast "
        f"cancer IID, every client every round; {len(y_test)} pooled test records"
    )
    where = "Ray actors" if backend == "ray" else "in-process threads, Ray not installed"
    runs_p = ", ".join(f"{t:.3f}" for t in privml_times)
    runs_f = ", ".join(f"{t:.3f}" for t in flower_times)
    print(f"flower backend: {backend} ({where}); torch intra-op threads: 1")
    print(f"privml simulate      : median {p_med:8.3f} s  (runs: {runs_p})")
    print(f"flower run_simulation: median {f_med:8.3f} s  (runs: {runs_f})")
    print(f"ratio flower / privml: {f_med / p_med:.1f}x")
    print(f"accuracy privml {acc(privml_params):.4f}  flower {acc(flower_params):.4f}")
    print(f"max |privml - flower| parameter difference: {diff:.2e}")


if __name__ == "__main__":
    main()
