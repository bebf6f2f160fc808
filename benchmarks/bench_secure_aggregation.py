"""Cost of encrypted aggregation per federated round (privml.fl.stages.secure).

Two workloads:

* the demo: 3 sites, logistic regression with 31 parameters, ``--rounds`` rounds of
  ``privml``'s simulator with ``secure_aggregation`` = none / paillier (3072 and 2048 bits) /
  ckks (seconds per round: the median of the run's rounds);
* 10 sites x 1,000-parameter updates: :meth:`SecureAggregation.round` on random updates
  (encrypt at every site, sum at the server, decrypt at the key holder, server step).

Anchor: python-paillier (phe) on the same work, one ``EncryptedNumber`` per float (encrypt
every value, add them at the server, decrypt the sums), with the same key size. For 10 x 1,000
the anchor times 2 sites x 100 floats (encrypt, add, decrypt) and scales linearly to
10 x 1,000 (phe's cost is the same for every float), unless ``--anchor-full`` (2 x 1,000
timed). Every repetition runs privml and the anchor once each in rotating order
(benchmarks/harness.py), one warm-up each excluded; medians with min-max.

    .venv/bin/python benchmarks/bench_secure_aggregation.py [--reps 3] [--anchor-full] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from phe import paillier

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

from privml.config import parse_config  # noqa: E402
from privml.data import load_federation  # noqa: E402
from privml.fl.engine import simulate  # noqa: E402
from privml.fl.rounds import Received, SiteUpdates  # noqa: E402
from privml.fl.stages.aggregate import ServerPlan, init_server_state  # noqa: E402
from privml.fl.stages.optimizer import ServerOptimizerStep  # noqa: E402
from privml.fl.stages.secure import (  # noqa: E402
    KeyHolderService,
    SealUpdates,
    SecureSetup,
    SecureSum,
)
from privml.pipeline import model_spec  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "src/privml/data/demo/demo.toml"


def _cfg(**training: Any) -> Any:
    raw = tomllib.loads(DEMO.read_text())
    raw.pop("inference", None)
    raw["training"] = {**raw["training"], **training}
    return parse_config(raw)


def demo(scheme: str, key_bits: int, rounds: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_update_norm": 100.0, "rounds": rounds}
    if scheme != "none":
        kw |= {"secure_aggregation": scheme, "secure_aggregation_key_bits": key_bits}
    cfg = _cfg(**kw)
    fed = load_federation(cfg)
    t0 = time.perf_counter()
    res = simulate(fed, model_spec(cfg, fed), cfg.training)
    total = time.perf_counter() - t0
    round_s = statistics.median(r.seconds for r in res.history)
    out = {"total_s": total, "round_s": round_s, "accuracy": res.metrics["accuracy"]}
    sa = res.extra["federation"]["secure_aggregation"]
    if sa is not None:
        out |= {
            "enc_site_s": sa["median_encrypt_seconds_per_site"],
            "agg_s": sa["median_aggregate_seconds"],
            "dec_s": sa["median_decrypt_seconds"],
            "ct_bytes": sa["ciphertext_bytes_per_site"],
            "keygen_s": sa["keygen_seconds"],
        }
    return out


class BigRound:
    """One secure round of ``n_sites`` x ``n_params`` random updates, set up once: the round
    engine's seal stage at the sites, the secure sum and the key holder's decryption, the
    server optimizer."""

    def __init__(self, scheme: str, key_bits: int, n_sites: int, n_params: int) -> None:
        cfg = _cfg(
            secure_aggregation=scheme, secure_aggregation_key_bits=key_bits, max_update_norm=1.0
        )
        names = [f"site{i}" for i in range(n_sites)]
        self.counts = [100 + 10 * i for i in range(n_sites)]
        setup = SecureSetup.from_training(cfg.training, names, self.counts, n_params=n_params)
        self.holder = KeyHolderService(setup, setup.key_holder)
        public = self.holder.keygen()
        self.seal = SealUpdates(setup, public)
        self.combine = SecureSum(setup, public, decrypt=self.holder.decrypt)
        self.plan = ServerPlan.from_training(cfg.training)
        self.optimize = ServerOptimizerStep(self.plan.optimizer)
        self.state = init_server_state(np.zeros(n_params, dtype=np.float32), self.plan)
        self.rng = np.random.default_rng(0)
        self.ids = np.arange(n_sites, dtype=np.int64)
        self.shape = (n_sites, n_params)
        self.err = 0.0

    def __call__(self) -> float:
        ups = self.rng.normal(0, 0.02, size=self.shape)  # norms ~0.63 < clip 1
        w = np.asarray(self.counts, dtype=np.float64)
        t0 = time.perf_counter()
        batch = SiteUpdates(1, self.ids, torch.zeros(1), ups.copy(), w,
                            np.zeros(len(self.ids), dtype=bool))  # fmt: skip
        self.seal.apply(batch)
        got = Received(self.ids, batch.updates, w, batch.malicious, sealed=batch.sealed)
        out = self.combine(self.state, got, 1)
        self.optimize(self.state, out)
        seconds = time.perf_counter() - t0
        err = float(np.abs(out.update - (w / w.sum()) @ ups).max())  # type: ignore[operator]
        self.err = max(self.err, err)
        return seconds

    def describe(self) -> dict[str, Any]:
        return self.combine.describe(self.seal, self.holder.keygen_seconds)


def phe_anchor(n_sites: int, n_params: int, key_bits: int, *, measured: int) -> Callable[[], float]:
    """Seconds for phe, one EncryptedNumber per float: every site encrypts its floats, the
    server adds them, the key holder decrypts the sums. ``measured`` floats per step are
    timed and scaled linearly to ``n_sites x n_params`` (all of them when equal)."""
    pk, sk = paillier.generate_paillier_keypair(n_length=key_bits)
    rng = np.random.default_rng(1)
    m = min(measured, n_params)

    def run() -> float:
        t0 = time.perf_counter()
        enc = [[pk.encrypt(float(x)) for x in rng.normal(0, 0.02, m)] for _ in range(2)]
        t_enc = (time.perf_counter() - t0) / (2 * m) * n_sites * n_params
        t0 = time.perf_counter()
        acc = list(enc[0])
        for _ in range(n_sites - 1):
            acc = [a + b for a, b in zip(acc, enc[1], strict=True)]
        t_add = (time.perf_counter() - t0) / m * n_params
        t0 = time.perf_counter()
        sums = [sk.decrypt(a) for a in acc]
        t_dec = (time.perf_counter() - t0) / m * n_params
        assert len(sums) == m
        return t_enc + t_add + t_dec

    return run


def _ms(r: dict[str, Any], key: str) -> str:
    return f"{r[key] * 1e3:.1f} ms" if key in r else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="default 3 (quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="demo rounds (default 10)")
    ap.add_argument("--anchor-full", action="store_true")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    rounds = args.rounds or (1 if args.quick else 10)
    n_sites, n_params = (2, 20) if args.quick else (10, 1000)
    measured = n_params if args.anchor_full else (5 if args.quick else 100)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    bench = Bench("secure_aggregation", quick=args.quick, out=args.out,
                  params={"reps": reps, "demo_rounds": rounds, "sites": n_sites,
                          "params": n_params, "anchor_floats_timed": measured})  # fmt: skip
    schemes = [("none", 0), ("paillier", 3072), ("paillier", 2048), ("ckks", 0)]
    if args.quick:
        schemes = [("none", 0), ("ckks", 0)]
    got: dict[str, dict[str, Any]] = {}

    def demo_variant(scheme: str, bits: int, label: str) -> Callable[[], float]:
        def run() -> float:
            got[label] = demo(scheme, bits, rounds)
            return float(got[label]["round_s"])

        return run

    labels = {f"{sc}{'-' + str(b) if b else ''}": (sc, b) for sc, b in schemes}
    demo_bits = 2048 if args.quick else 3072
    variants = {lab: demo_variant(sc, b, lab) for lab, (sc, b) in labels.items()}
    variants[f"phe-{demo_bits} anchor"] = phe_anchor(3, 31, demo_bits, measured=31)
    warm = 0 if args.quick else 1  # quick (a smoke run): no warm-up
    t = bench.interleave(variants, reps=reps, warmup=warm, key="demo_round_seconds")
    bench.record("demo", got)
    rows = []
    for lab, s in t.items():
        r = got.get(lab, {})
        rows.append([lab, fmt_spread(s, 1e3, 1, "ms"), _ms(r, "enc_site_s"), _ms(r, "agg_s"),
                     _ms(r, "dec_s"), f"{r['ct_bytes']:,} B" if "ct_bytes" in r else "-",
                     f"{r['accuracy']:.4f}" if "accuracy" in r else "-"])  # fmt: skip
    bench.table(
        "demo",
        ["setting", "time per round", "encrypt / site", "server sum", "decrypt",
         "ciphertext / site", "accuracy"],  # fmt: skip
        rows,
        caption=(
            f"The demo (3 sites, logistic regression, 31 parameters, {rounds} rounds): median "
            f"round time of each run, median (min-max) over {reps} interleaved repetitions; the "
            f"phe anchor encrypts, adds and decrypts the same 3 x 31 floats one EncryptedNumber "
            "per float."
        ),
    )
    rows = []
    for scheme, bits in ([("paillier", 2048), ("ckks", 0)] if args.quick else
                         [("paillier", 2048), ("paillier", 3072), ("ckks", 0)]):  # fmt: skip
        label = f"{scheme}{'-' + str(bits) if bits else ''}"
        big = BigRound(scheme, bits, n_sites, n_params)
        variants = {f"privml {label}": big}
        if scheme == "paillier":
            variants[f"phe-{bits} anchor"] = phe_anchor(n_sites, n_params, bits, measured=measured)
        t = bench.interleave(variants, reps=reps, warmup=warm, key=f"big_{label}")
        d = big.describe()
        ours = t[f"privml {label}"]
        for name, s in t.items():
            r = ratios(s, ours)
            if s is not ours:
                bench.record(f"big_{label}_ratio", r.to_dict())
            rows.append(
                [name, fmt_spread(s, digits=2, unit="s"),
                 f"{d['median_encrypt_seconds_per_site'] * 1e3:.1f} ms" if s is ours else "-",
                 f"{d['median_aggregate_seconds'] * 1e3:.1f} ms" if s is ours else "-",
                 f"{d['median_decrypt_seconds'] * 1e3:.1f} ms" if s is ours else "-",
                 f"{d['ciphertext_bytes_per_site']:,} B" if s is ours else "-",
                 f"{big.err:.1e}" if s is ours else "-",
                 "1" if s is ours else fmt_ratio(r)]  # fmt: skip
            )
    scaled = "" if measured >= n_params else (
        f"; the phe anchor timed 2 sites x {measured} floats and is scaled linearly"
    )  # fmt: skip
    bench.table(
        "big",
        ["setting", "round", "encrypt / site", "server sum", "decrypt", "ciphertext / site",
         "max error vs plain mean", "time / privml's"],  # fmt: skip
        rows,
        caption=(
            f"One round of {n_sites} sites x {n_params:,} parameters (encrypt at every site, "
            f"sum at the server, decrypt at the key holder), median (min-max) of {reps} "
            f"interleaved repetitions{scaled}."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
