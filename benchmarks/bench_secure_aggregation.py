"""Cost of encrypted aggregation per federated round (privml.fl.secure).

Two workloads:

* the demo: 3 sites, logistic regression with 31 parameters, 20 rounds of ``privml``'s
  simulator with ``secure_aggregation`` = none / paillier (3072 and 2048 bits) / ckks;
* 10 sites x 1,000-parameter updates: :meth:`SecureAggregation.round` on random updates
  (encrypt at every site, sum at the server, decrypt at the key holder, server step).

Anchor: python-paillier (phe) on the same work, one ``EncryptedNumber`` per float (encrypt
every value, add them at the server, decrypt the sums), with the same key size. For 10 x 1,000
the anchor times 2 sites x 100 floats (encrypt, add, decrypt) and scales linearly to
10 x 1,000, unless ``--anchor-full`` (2 sites x 1,000 floats timed).

    .venv/bin/python benchmarks/bench_secure_aggregation.py [--repeats 5] [--anchor-full]
"""

from __future__ import annotations

import argparse
import statistics
import time
import tomllib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from phe import paillier

from privml.config import parse_config
from privml.data import load_federation
from privml.fl.engine import ServerPlan, init_server_state, simulate
from privml.fl.secure import SecureAggregation
from privml.pipeline import model_spec

DEMO = Path(__file__).resolve().parents[1] / "src/privml/data/demo/demo.toml"


def _cfg(**training: Any) -> Any:
    raw = tomllib.loads(DEMO.read_text())
    raw.pop("inference", None)
    raw["training"] = {**raw["training"], **training}
    return parse_config(raw)


def demo(scheme: str, key_bits: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"max_update_norm": 100.0}
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


def big_round(scheme: str, key_bits: int, repeats: int) -> dict[str, Any]:
    n_sites, n_params = 10, 1000
    cfg = _cfg(
        secure_aggregation=scheme, secure_aggregation_key_bits=key_bits, max_update_norm=1.0
    )
    names = [f"site{i}" for i in range(n_sites)]
    counts = [100 + 10 * i for i in range(n_sites)]
    sa = SecureAggregation.from_training(cfg.training, names, counts, n_params=n_params)
    plan = ServerPlan.from_training(cfg.training)
    state = init_server_state(np.zeros(n_params, dtype=np.float32), plan)
    rng = np.random.default_rng(0)
    ids = np.arange(n_sites, dtype=np.int64)
    walls = []
    for _ in range(repeats):
        ups = rng.normal(0, 0.02, size=(n_sites, n_params))  # norms ~0.63 < clip 1
        t0 = time.perf_counter()
        out = sa.round(state, ups, ids, plan=plan)
        walls.append(time.perf_counter() - t0)
        w = np.asarray(counts, dtype=np.float64)
        err = float(np.abs(out.update - (w / w.sum()) @ ups).max())  # type: ignore[operator]
    d = sa.describe()
    return {
        "round_s": statistics.median(walls),
        "enc_site_s": d["median_encrypt_seconds_per_site"],
        "agg_s": d["median_aggregate_seconds"],
        "dec_s": d["median_decrypt_seconds"],
        "ct_bytes": d["ciphertext_bytes_per_site"],
        "max_err": err,
    }


def phe_anchor(n_sites: int, n_params: int, key_bits: int, *, measured: int) -> float:
    """Seconds for phe, one EncryptedNumber per float: every site encrypts its floats, the
    server adds them, the key holder decrypts the sums. ``measured`` floats per step are
    timed and scaled linearly to ``n_sites x n_params`` (all of them when equal)."""
    pk, sk = paillier.generate_paillier_keypair(n_length=key_bits)
    rng = np.random.default_rng(1)
    m = min(measured, n_params)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--anchor-full", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print("demo: 3 sites, 31 parameters, 20 rounds (medians per round)")
    for scheme, bits in (("none", 0), ("paillier", 3072), ("paillier", 2048), ("ckks", 0)):
        r = demo(scheme, bits)
        label = f"{scheme}{'-' + str(bits) if bits else ''}"
        extra = (
            f"  encrypt/site {r['enc_site_s'] * 1e3:.1f} ms  sum {r['agg_s'] * 1e3:.2f} ms  "
            f"decrypt {r['dec_s'] * 1e3:.1f} ms  ciphertext {r['ct_bytes']} B/site  "
            f"keygen {r['keygen_s']:.2f} s"
            if "enc_site_s" in r
            else ""
        )
        print(
            f"  {label:14s} round {r['round_s'] * 1e3:7.1f} ms  run {r['total_s']:.2f} s  "
            f"acc {r['accuracy']:.4f}{extra}"
        )
    anchor = phe_anchor(3, 31, 3072, measured=31)
    print(f"  phe anchor (3072, one number per float, 3 x 31): {anchor * 1e3:.0f} ms per round")
    print("10 sites x 1,000 parameters, one round (medians)")
    for scheme, bits in (("paillier", 2048), ("paillier", 3072), ("ckks", 0)):
        r = big_round(scheme, bits, args.repeats)
        label = f"{scheme}{'-' + str(bits) if bits else ''}"
        line = (
            f"  {label:14s} round {r['round_s']:.3f} s  encrypt/site {r['enc_site_s'] * 1e3:.1f} "
            f"ms  sum {r['agg_s'] * 1e3:.1f} ms  decrypt {r['dec_s'] * 1e3:.1f} ms  "
            f"ciphertext {r['ct_bytes']} B/site  max err vs plain {r['max_err']:.2e}"
        )
        if scheme == "paillier":
            measured = 1000 if args.anchor_full else 100
            a = phe_anchor(10, 1000, bits, measured=measured)
            tag = "" if args.anchor_full else " (2 sites x 100 floats timed, scaled)"
            line += f"\n    phe anchor {a:.1f} s{tag}; ratio {a / r['round_s']:.0f}x"
        print(line)


if __name__ == "__main__":
    main()
