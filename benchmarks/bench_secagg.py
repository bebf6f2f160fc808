"""Cost of SecAgg+ masking per federated round, against a plain round and Flower's SecAgg+.

Work: 100 sites x 11,260 parameters (digits split IID over 100 sites, an MLP with one hidden
layer of 150 units), every site every round, privml's default local training (2 local epochs,
batch 32), lr 0.5, ``max_update_norm`` 10.

Two comparisons, each interleaved (benchmarks/harness.py: rotating order, one warm-up each
excluded, medians with min-max):

* **overhead** -- privml's simulation, seconds per round (median of the run's rounds) of the
  same run with ``secure_aggregation = "none"`` and ``"secagg+"`` (default share count
  ``2 ceil(log2 n) + 1`` = 15 and threshold 8 for 100 sites). Target: SecAgg+ <= 2x plain.
* **against Flower** -- one round of secure aggregation of the same 100 fixed updates of
  11,260 values, with the same share count and threshold, quantization range 2**22 and
  modulus 2**32: privml's :class:`~privml.fl.stages.masking.SealMasked` and
  :class:`~privml.fl.stages.masking.MaskedSum` (key exchange, quantization, masking,
  unmasking), and Flower's own ``SecAggPlusWorkflow`` (ServerApp, ``LegacyContext`` with
  ``FedAvg``) with ``secaggplus_mod`` on a ClientApp whose ``fit`` returns the same fixed
  update, driven by ``flwr.simulation.run_simulation``. Flower's time is the fit workflow
  alone (its four stages, timed inside the ServerApp), not the simulation's start-up.
  Backend: Ray when importable (one actor per CPU), else Flower's runtime with an in-process
  backend (benchmarks/bench_fl_flower_sim.py); the JSON says which. Target: privml >= 5x
  faster.

And two tables that explain the first figure: **per site** -- the SecAgg+ runs' seal step (every
site's part, per site) and combine step (the server's unmasking), from the engine's own record,
beside each building block (X25519 agreement, Shamir split and rebuild, AES-CTR mask) timed
alone, round robin, and the floor those set per site; **share count** -- the default share
count's failure bounds (``privml.fl.secagg.failure_bounds``) and the per-site cost of the
smallest share count that meets Bell et al.'s 2**-40 / 2**-30.

    .venv/bin/python benchmarks/bench_secagg.py [--reps 3] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="flwr-home-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data import load_federation  # noqa: E402
from privml.fl.engine import simulate  # noqa: E402
from privml.fl.rounds import Received, SiteUpdates  # noqa: E402
from privml.fl.secagg import SecAggParams, failure_bounds, sound_share_count  # noqa: E402
from privml.fl.stages.masking import (  # noqa: E402
    MaskedSum,
    MaskingServer,
    SealMasked,
    SimulatedSites,
    seeded_uniforms,
)
from privml.pipeline import model_spec  # noqa: E402

CLIP = 10.0


def config(n_sites: int, rounds: int, hidden: int, secure: str) -> Any:
    training: dict[str, Any] = {"rounds": rounds, "lr": 0.5, "seed": 0, "max_update_norm": CLIP}
    if secure != "none":
        training["secure_aggregation"] = secure
    return parse_config({
        "data": {"dataset": "digits", "partition": "iid", "n_sites": n_sites},
        "model": {"kind": "mlp", "hidden": [hidden]},
        "training": training,
        "output": {"html": False},
    }, name="secagg_bench")  # fmt: skip


def round_seconds(n_sites: int, rounds: int, hidden: int, secure: str,
                  got: dict[str, Any]) -> float:  # fmt: skip
    cfg = config(n_sites, rounds, hidden, secure)
    fed = load_federation(cfg)
    res = simulate(fed, model_spec(cfg, fed), cfg.training)
    got[secure] = {"accuracy": res.metrics["accuracy"],
                   "n_params": int(res.params.numel()),
                   "skipped": res.extra["updates"]["skipped_rounds"]}  # fmt: skip
    sa = res.extra["federation"].get("secure_aggregation") or {}
    if sa.get("median_seal_seconds_per_site") is not None:
        # the engine's own record of its seal step (every site's key exchange, quantization and
        # masking, per site) and of the server's unmasking, median over the run's rounds; the
        # consistency check (every sender signs the list of senders, the sites verify the
        # signatures) is part of the unmasking, and recorded on its own too
        got.setdefault("parts", []).append(
            (sa["median_seal_seconds_per_site"], sa["median_unmask_seconds"],
             sa["median_confirm_seconds"])
        )  # fmt: skip
    return statistics.median(r.seconds for r in res.history)


def _unsigned_confirm(self: Any, *, all_senders: Any) -> bytes:
    self._advance("mask", "confirm")
    return b""


class PrivmlRound:
    """One SecAgg+ round over fixed updates: key exchange, masking, consistency check,
    unmasking. ``check=False``, for measuring the check's cost only: the sites' signing and
    verifying patched out (an insecure round, never offered outside this benchmark)."""

    def __init__(self, updates: np.ndarray, weights: np.ndarray, k: int, t: int,
                 check: bool = True) -> None:  # fmt: skip
        self.check = check
        n, p = updates.shape
        self.params = SecAggParams(k, t, CLIP, 1 << 22, 1 << 32, float(weights.max()), p)
        self.server = MaskingServer(self.params)
        self.sites = SimulatedSites(self.params)
        self.seal = SealMasked(self.params, self.server, self.sites, CLIP, seeded_uniforms(0))
        self.combine = MaskedSum(self.params, self.server, self.sites, CLIP)
        self.updates, self.weights = updates, weights
        self.ids = np.arange(n, dtype=np.int64)
        self.rnd = 0
        self.err = 0.0

    def __call__(self) -> float:
        if self.check:
            return self._round()
        from unittest import mock

        from privml.fl.secagg import SiteSession

        with mock.patch.object(SiteSession, "confirm", _unsigned_confirm), \
                mock.patch.object(SiteSession, "_check_senders", lambda *a, **k: None):  # fmt: skip
            return self._round()

    def _round(self) -> float:
        self.rnd += 1
        t0 = time.perf_counter()
        batch = SiteUpdates(self.rnd, self.ids, torch.zeros(1), self.updates.copy(), self.weights,
                            np.zeros(len(self.ids), dtype=bool))  # fmt: skip
        self.seal.apply(batch)
        got = Received(self.ids, batch.updates, self.weights, batch.malicious, sealed=batch.sealed)
        out = self.combine(None, got, self.rnd)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        w = self.weights / self.weights.max()
        ref = (w @ self.updates) / w.sum()
        self.err = max(self.err, float(np.abs(out.update - ref).max()))  # type: ignore[operator]
        return seconds


def signature_seconds(reps: int) -> dict[str, float]:
    """Median seconds of one Ed25519 signature of a 32-byte digest and of its verification
    (``cryptography``), each call timed alone."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pub, msg = key.public_key(), bytes(32)
    sig = key.sign(msg)
    out: dict[str, list[float]] = {"sign": [], "verify": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        key.sign(msg)
        t1 = time.perf_counter()
        pub.verify(sig, msg)
        out["sign"].append(t1 - t0)
        out["verify"].append(time.perf_counter() - t1)
    return {k: statistics.median(v) for k, v in out.items()}


def primitive_costs(k: int, t: int, n_words: int, modulus: int, reps: int,
                    pycryptodome: bool = False) -> dict[str, float]:  # fmt: skip
    """Median seconds of each building block of a round, one call at a time: an X25519
    agreement + HKDF, a Shamir split of one 16-byte seed into ``k`` shares, its rebuild from
    ``t`` shares, and one AES-CTR mask of ``n_words`` residues (``pycryptodome``: also the
    split and rebuild with PyCryptodome's sharing, for comparison)."""
    import os as _os

    from Crypto.Protocol.SecretSharing import Shamir
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from privml.fl import secagg as S

    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    pub = b.public_key()
    seed = _os.urandom(16)
    shares = S._split(seed, t, k)
    key = _os.urandom(32)
    calls = {
        "agreement": lambda: S._agree(a, pub, b"bench"),
        "split": lambda: S._split(seed, t, k),
        "rebuild": lambda: S._combine(shares[:t]),
        "mask": lambda: S._prg(key, n_words, modulus),
    }
    if pycryptodome:
        pc_shares = Shamir.split(t, k, seed)
        calls["split_pycryptodome"] = lambda: Shamir.split(t, k, seed)
        calls["rebuild_pycryptodome"] = lambda: Shamir.combine(pc_shares[:t])
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):  # round robin, so that a burst of load hits every block alike
        for name, fn in calls.items():
            batch = 50 if name == "agreement" else 5
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            times[name].append((time.perf_counter() - t0) / batch)
    return {name: statistics.median(v) for name, v in times.items()}


def flower_round(updates: np.ndarray, weights: np.ndarray, k: int, t: int, backend: str,
                 out: dict[str, Any]) -> float:  # fmt: skip
    """Flower's SecAggPlusWorkflow + secaggplus_mod on the same fixed updates (one round)."""
    from bench_fl_flower_sim import _backend
    from flwr.app import Context
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    n, p = updates.shape

    class Fixed(NumPyClient):  # type: ignore[misc]
        def __init__(self, i: int) -> None:
            self.i = i

        def get_parameters(self, config: Any) -> list[np.ndarray]:
            return [np.zeros(p)]

        def fit(self, parameters: Any, config: Any) -> tuple[list[np.ndarray], int, dict]:
            return [updates[self.i]], int(weights[self.i]), {}

    def client_fn(context: Context) -> Any:
        return Fixed(int(context.node_config["partition-id"])).to_client()

    def copy_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
        # Flower's workflow sends one message object to every node and secaggplus_mod pops
        # keys from it: a transport (Ray, gRPC) hands each node its own deserialized copy, so
        # the in-process backend must too
        return call_next(copy.deepcopy(msg), ctxt)

    mods = [copy_mod, secaggplus_mod] if backend != "ray" else [secaggplus_mod]
    client_app = ClientApp(client_fn=client_fn, mods=mods)
    server_app = ServerApp()

    class Timed(SecAggPlusWorkflow):  # type: ignore[misc]
        def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
            ok = bool(super().unmask_stage(grid, context, state))
            out["unmasked"] = ok
            return ok

        def __call__(self, grid: Any, context: Any) -> None:
            out["unmasked"] = False
            t0 = time.perf_counter()
            super().__call__(grid, context)
            out["seconds"] = time.perf_counter() - t0
            if out["unmasked"]:
                rec = context.state.array_records["parameters"]
                out["result"] = np.concatenate([a.numpy().ravel() for a in rec.values()])

    @server_app.main()
    def main(grid: Any, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                          min_available_clients=n)  # fmt: skip
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
        wf = Timed(
            num_shares=k, reconstruction_threshold=t, max_weight=float(weights.max()),
            clipping_range=CLIP, quantization_range=1 << 22, modulus_range=1 << 32,
        )  # fmt: skip
        DefaultWorkflow(fit_workflow=wf)(grid, legacy)

    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    if backend == "ray":
        backend_config["init_args"] = {"num_cpus": os.cpu_count() or 1, "log_to_driver": False}
    out.pop("seconds", None)
    with _backend(backend):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                       backend_config=backend_config)  # type: ignore[arg-type]  # fmt: skip
    if "seconds" not in out or not out["unmasked"]:
        raise RuntimeError(f"Flower's SecAgg+ workflow ({backend}) did not finish; see its log")
    ref = (weights @ updates) / weights.sum()
    out["max_error"] = max(out.get("max_error", 0.0), float(np.abs(out["result"] - ref).max()))
    return float(out["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="default 3 (quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run (default 3)")
    ap.add_argument("--ray", choices=("auto", "yes", "no"), default=None,
                    help="Flower on Ray: auto (default; 'no' with --quick), yes, no")  # fmt: skip
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    warmup = 0 if args.quick else 1  # quick: a smoke run, its figures are not compared
    rounds = args.rounds or (2 if args.quick else 3)
    n_sites, hidden = (6, 8) if args.quick else (100, 150)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    ray = args.ray or ("no" if args.quick else "auto")
    has_ray = ray == "yes" or (ray == "auto" and importlib.util.find_spec("ray") is not None)
    backend = "ray" if has_ray else "in-process"
    k, t = SecAggParams(None, None, 1, 2, 4, 1, 1).for_cohort(n_sites)
    bench = Bench("secagg", quick=args.quick, out=args.out,
                  params={"sites": n_sites, "hidden": hidden, "rounds": rounds, "reps": reps,
                          "share_count": k, "threshold": t, "flower_backend": backend})  # fmt: skip

    # 1. overhead over a plain round
    got: dict[str, Any] = {}
    t_over = bench.interleave(
        {v: (lambda v=v: round_seconds(n_sites, rounds, hidden, v, got))
         for v in ("none", "secagg+")},
        reps=reps, warmup=warmup, key="round_seconds")  # fmt: skip
    r_over = ratios(t_over["secagg+"], t_over["none"])
    n_params = got["none"]["n_params"]
    bench.record("runs", got)
    bench.table("overhead", ["variant", "seconds per round", "accuracy"], [
        ["plain (no secure aggregation)", fmt_spread(t_over["none"], 1, 3, "s"),
         f"{got['none']['accuracy']:.4f}"],
        [f"SecAgg+ (k = {k}, t = {t})", fmt_spread(t_over["secagg+"], 1, 3, "s"),
         f"{got['secagg+']['accuracy']:.4f}"],
        ["ratio SecAgg+ / plain (target <= 2)", fmt_ratio(r_over), ""],
    ], caption=f"{n_sites} sites x {n_params:,} parameters, privml's simulation, seconds per "
       "round (median of each run's rounds)")  # fmt: skip

    # 2. where a round's time goes, per site, and the floor its building blocks set
    parts = got["parts"]
    sites_s = statistics.median(p[0] for p in parts) * n_sites
    server_s = statistics.median(p[1] for p in parts)
    confirm_s = statistics.median(p[2] for p in parts)
    prim = primitive_costs(
        k, t, n_params + 1, 1 << 32, reps=3 if args.quick else 15, pycryptodome=True
    )
    floor_site = 2 * (k - 1) * prim["agreement"] + 2 * prim["split"] + k * prim["mask"]
    floor_server = prim["rebuild"] + prim["mask"]
    plain_site = t_over["none"].median / n_sites
    bench.record("per_site", {"sites_seconds_per_site": sites_s / n_sites,
                              "server_seconds": server_s, "primitives": prim,
                              "floor_site_seconds": floor_site,
                              "floor_server_seconds_per_site": floor_server,
                              "consistency_check_seconds": confirm_s,
                              "plain_round_seconds_per_site": plain_site})  # fmt: skip
    ms = 1e3
    bench.table("per_site", ["cost", "per site", "100 sites one after another" if n_sites == 100
                             else f"{n_sites} sites one after another"], [
        ["plain round (local training, aggregation), for scale", f"{plain_site * ms:.2f} ms",
         f"{t_over['none'].median:.3f} s"],
        ["SecAgg+ sites' part, measured (key exchange, quantization, masking)",
         f"{sites_s / n_sites * ms:.2f} ms",
         f"{sites_s:.3f} s"],
        ["SecAgg+ server's part, measured (unmask: consistency check, seed rebuilds, masks "
         "removed)", f"{server_s / n_sites * ms:.2f} ms", f"{server_s:.3f} s"],
        ["of which the consistency check (each sender signs the list of senders, every site "
         "checks every signature once: verifications shared in the simulation)",
         f"{confirm_s / n_sites * ms:.2f} ms", f"{confirm_s:.3f} s"],
        [f"site: {2 * (k - 1)} X25519 agreements + HKDF",
         f"{2 * (k - 1) * prim['agreement'] * ms:.2f} ms", ""],
        [f"site: 2 Shamir splits of a 16-byte seed into {k} shares",
         f"{2 * prim['split'] * ms:.2f} ms", ""],
        [f"site: {k} AES-256-CTR masks of {n_params + 1:,} residues",
         f"{k * prim['mask'] * ms:.2f} ms", ""],
        ["floor of the sites' part (the three lines above)", f"{floor_site * ms:.2f} ms",
         f"{floor_site * n_sites:.3f} s"],
        [f"server: 1 Shamir rebuild from {t} shares + 1 self mask (no dropout)",
         f"{floor_server * ms:.2f} ms", f"{floor_server * n_sites:.3f} s"],
        ["for comparison, PyCryptodome's sharing (GF(2^128)): 2 splits (site) / 1 rebuild "
         "(server)", f"{2 * prim['split_pycryptodome'] * ms:.2f} / "
         f"{prim['rebuild_pycryptodome'] * ms:.2f} ms",
         f"{2 * prim['split_pycryptodome'] * n_sites:.3f} / "
         f"{prim['rebuild_pycryptodome'] * n_sites:.3f} s"],
    ], caption=f"where a SecAgg+ round of {n_sites} sites x {n_params:,} parameters spends its "
       f"time (k = {k}, t = {t}, modulus 2**32): the SecAgg+ runs of the overhead table split "
       "into their seal step (every site's part: key exchange, quantization, masking; run "
       "here one site after another) and their combine step (the server's unmasking), "
       "medians over rounds and runs, and the building blocks timed alone; "
       "a deployment runs the sites' parts in parallel, the server's part stays "
       "sequential")  # fmt: skip

    # 3. the share count against the failure bounds SecAgg+ is sized for
    rows = []
    for rate in (0.01, 0.05, 0.1):
        b = failure_bounds(n_sites, k, t, corrupt=rate, dropout=rate)
        ks = sound_share_count(n_sites, corrupt=rate, dropout=rate)
        if ks is None:
            rows.append([f"{rate:.0%} / {rate:.0%}", f"{b['privacy']:.1e} / {b['skipped']:.1e}",
                         f"none up to {n_sites}", "", ""])  # fmt: skip
            continue
        ts = ks // 2 + 1
        pc = primitive_costs(ks, ts, n_params + 1, 1 << 32, reps=2 if args.quick else 5)
        site = 2 * (ks - 1) * pc["agreement"] + 2 * pc["split"] + ks * pc["mask"]
        rows.append([f"{rate:.0%} / {rate:.0%}", f"{b['privacy']:.1e} / {b['skipped']:.1e}",
                     f"k = {ks}, t = {ts}", f"{site * ms:.2f} ms",
                     f"{(pc['rebuild'] + pc['mask']) * ms:.2f} ms"])  # fmt: skip
    bench.table("share_count", [
        "colluding / dropped sites", f"default k = {k}, t = {t}: P[an update exposed] / "
        "P[round skipped]", "smallest k for 2**-40 / 2**-30", "sites' floor per site at that k",
        "server per site at that k"], rows,
        caption=f"The default share count against the failure bounds Bell et al. size SecAgg+ "
        f"for, {n_sites} sites (privml.fl.secagg.failure_bounds: union bounds, each other site "
        "colluding or dropping out independently at the given rate), and the per-site cost of "
        "the smallest odd share count that meets them (threshold k // 2 + 1; above 16 shares "
        "the Shamir sharing is PyCryptodome's)")  # fmt: skip
    # 4. against Flower's SecAgg+ on the same updates
    rng = np.random.default_rng(0)
    updates = rng.normal(0, 0.05, (n_sites, n_params))
    weights = rng.integers(10, 20, n_sites).astype(np.float64)
    ours = PrivmlRound(updates, weights, k, t)
    # 4a. what the consistency check adds to a round (the same fixed updates)
    t_cc = bench.interleave(
        {"with the check": PrivmlRound(updates, weights, k, t),
         "check patched out": PrivmlRound(updates, weights, k, t, check=False)},
        reps=3 if args.quick else 11, warmup=warmup, key="secure_round_seconds")  # fmt: skip
    r_cc = ratios(t_cc["with the check"], t_cc["check patched out"])
    sig_s = signature_seconds(reps=5 if args.quick else 25)
    added = t_cc["with the check"].median - t_cc["check patched out"].median
    bench.record("consistency_check_added_seconds", added)
    bench.record("ed25519_seconds", sig_s)
    bench.table("consistency", ["variant", "seconds per secure round"], [
        ["SecAgg+ as privml runs it (consistency check in every round)",
         fmt_spread(t_cc["with the check"], 1, 3, "s")],
        ["the same, signing and verifying patched out (measurement only; insecure)",
         fmt_spread(t_cc["check patched out"], 1, 3, "s")],
        ["added by the check: difference of medians / ratio",
         f"{added * 1e3:.1f} ms / {fmt_ratio(r_cc)}"],
        [f"its floor: {n_sites} Ed25519 signatures + {n_sites} verifications, timed alone",
         f"{n_sites * (sig_s['sign'] + sig_s['verify']) * 1e3:.1f} ms"],
    ], caption=f"one secure aggregation of the same {n_sites} fixed updates of {n_params:,} "
       f"values (k = {k}, t = {t}): each sender signs the list of senders with Ed25519 and "
       "each site checks every signature on it (the simulated sites share verified "
       "ones)")  # fmt: skip
    fl_out: dict[str, Any] = {}
    t_fl = bench.interleave(
        {"privml": ours,
         f"flower ({backend})": lambda: flower_round(updates, weights, k, t, backend, fl_out)},
        reps=reps, warmup=warmup, key="secure_round_seconds")  # fmt: skip
    name = f"flower ({backend})"
    r_fl = ratios(t_fl[name], t_fl["privml"])
    bench.record("privml_max_error", ours.err)
    bench.record("flower_max_error", fl_out["max_error"])
    bench.table("flower", ["variant", "seconds per secure round"], [
        ["privml SecAgg+ (SealMasked + MaskedSum)", fmt_spread(t_fl["privml"], 1, 3, "s")],
        [f"Flower SecAggPlusWorkflow + secaggplus_mod ({backend})",
         fmt_spread(t_fl[name], 1, 3, "s")],
        ["ratio Flower / privml (target >= 5)", fmt_ratio(r_fl)],
    ], caption=f"one secure aggregation of the same {n_sites} fixed updates of {n_params:,} "
       f"values; share count {k}, threshold {t}, quantization 2**22, modulus 2**32")  # fmt: skip
    met = {True: "met", False: "**not met**"}
    bench.table("targets", ["target", "measured", "status"], [
        [f"SecAgg+ round <= 2x a plain round ({n_sites} sites x {n_params:,} parameters)",
         fmt_ratio(r_over), met[r_over.median <= 2]],
        [f"SecAgg+ >= 5x faster than Flower's SecAggPlusWorkflow ({backend} backend)",
         fmt_ratio(r_fl), met[r_fl.median >= 5]],
        ["sum exact up to quantization (max abs error, privml / Flower)",
         f"{ours.err:.1e} / {fl_out['max_error']:.1e}", ""],
    ], caption="Targets of SecAgg+ masking (ratios: medians of the per-repetition ratios, "
       "min-max in brackets).")  # fmt: skip
    bench.write()
    print(
        f"overhead SecAgg+/plain: {fmt_ratio(r_over)} (target <= 2); Flower/privml: "
        f"{fmt_ratio(r_fl)} (target >= 5); privml max error {ours.err:.2e}, "
        f"Flower {fl_out['max_error']:.2e}"
    )


if __name__ == "__main__":
    main()
