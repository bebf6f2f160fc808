"""Encrypted aggregation: privml.he.SecureAggregator against phe one-number-per-float.

    .venv/bin/python benchmarks/bench_he_aggregation.py [--reps 3] [--subset 25] [--json out.json]

Work: 10 sites each encrypt a 1,000-float update (values in [-1, 1]), the server sums the
ciphertexts, the key holder decrypts the sum. Timed end to end in one process (all sites in
turn), key generation excluded.

Anchor: python-paillier (with gmpy2) the plain way: ``public_key.encrypt(float)`` per value,
``EncryptedNumber`` additions, ``private_key.decrypt`` per value. Running it on 10 x 1,000
values takes minutes on this machine, so it runs on ``--subset`` values per site and is
**extrapolated linearly** to 1,000 (every step is per value, so the cost is linear). privml and
the anchor run interleaved; medians and ratios are printed. Also measured: privml with each
site's randomness precomputed (a pool, the offline part of Paillier encryption), and CKKS
(privml vs a TenSEAL ``ckks_vector`` per site).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from typing import Any

import numpy as np
import tenseal as ts
from phe import paillier as phe

import privml.he as he
from privml.errors import InsecureOptionWarning

SITES, N = 10, 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--subset", type=int, default=25)
    ap.add_argument("--bits", type=int, nargs="+", default=[2048, 3072])
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore", InsecureOptionWarning)
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-1, 1, N) for _ in range(SITES)]
    plain_sum = np.sum(updates, axis=0)
    out: dict[str, Any] = {"loadavg_start": os.getloadavg(), "sites": SITES, "n_params": N}
    rows = []

    for bits in args.bits:
        agg = he.SecureAggregator(
            "paillier", n_sites=SITES, n_params=N, value_bound=1.0, key_bits=bits
        )
        keys = agg.keygen()
        pub = agg.public_material(keys)
        apk, ask = phe.generate_paillier_keypair(n_length=bits)
        m = args.subset

        def ours(
            pools: list[Any] | None = None, agg: Any = agg, keys: Any = keys, pub: bytes = pub
        ) -> np.ndarray:
            blobs = [
                agg.encrypt_update(pub, u, pool=None if pools is None else pools[i])
                for i, u in enumerate(updates)
            ]
            return agg.decrypt_aggregate(
                keys.secret, agg.aggregate(blobs, public=pub), n_sites=SITES
            )  # type: ignore[no-any-return]

        def anchor(apk: Any = apk, ask: Any = ask, m: int = m) -> np.ndarray:
            encs = [[apk.encrypt(float(v)) for v in u[:m]] for u in updates]
            sums = encs[0]
            for site in encs[1:]:
                sums = [a + b for a, b in zip(sums, site, strict=True)]
            return np.array([ask.decrypt(s) for s in sums])

        wall: dict[str, list[float]] = {"ours": [], "anchor": [], "online": []}
        cpu: dict[str, list[float]] = {"ours": [], "anchor": [], "online": []}
        pool_s: list[float] = []
        got = anchor_got = None
        for _ in range(args.reps):
            t, c = time.perf_counter(), time.process_time()
            got = ours()
            wall["ours"].append(time.perf_counter() - t)
            cpu["ours"].append(time.process_time() - c)
            t, c = time.perf_counter(), time.process_time()
            anchor_got = anchor()
            wall["anchor"].append((time.perf_counter() - t) * N / m)
            cpu["anchor"].append((time.process_time() - c) * N / m)
            t0 = time.perf_counter()
            pools = [
                he.PaillierRandomnessPool(keys.public, size=agg.codec.n_plaintexts(N))
                for _ in range(SITES)
            ]
            pool_s.append(time.perf_counter() - t0)
            t, c = time.perf_counter(), time.process_time()
            ours(pools)
            wall["online"].append(time.perf_counter() - t)
            cpu["online"].append(time.process_time() - c)
        med = {k: statistics.median(v) for k, v in wall.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        assert got is not None and anchor_got is not None
        res = {
            "privml_s": med["ours"],
            "privml_online_with_pool_s": med["online"],
            "pool_precompute_s_all_sites": statistics.median(pool_s),
            "anchor_s_extrapolated": med["anchor"],
            "anchor_measured_values_per_site": m,
            "ratio": med["anchor"] / med["ours"],
            "ratio_online": med["anchor"] / med["online"],
            "cpu_s": cmed,
            "cpu_ratio": cmed["anchor"] / cmed["ours"],
            "ciphertexts_per_site": agg.codec.n_plaintexts(N),
            "values_per_ciphertext": agg.codec.slots,
            "slot_bits": agg.slot_bits,
            "privml_max_abs_error": float(np.max(np.abs(got - plain_sum))),
            "resolution": 2.0**-agg.precision_bits,
            "anchor_max_abs_error": float(np.max(np.abs(anchor_got - plain_sum[:m]))),
            "update_bytes": len(agg.encrypt_update(pub, updates[0])),
        }
        out[f"paillier_{bits}"] = res
        rows += [
            (
                f"Paillier-{bits}: 10 sites x 1000 floats, s",
                f"{res['anchor_s_extrapolated']:.1f}*",
                f"{res['privml_s']:.2f}",
                f"{res['ratio']:.0f}x",
            ),
            (
                "  CPU s (process time)",
                f"{cmed['anchor']:.1f}*",
                f"{cmed['ours']:.2f}",
                f"{res['cpu_ratio']:.0f}x",
            ),
            (
                "  online, randomness precomputed per site, s",
                "",
                f"{res['privml_online_with_pool_s']:.3f}",
                f"{res['ratio_online']:.0f}x",
            ),
            (
                "  (offline pool precomputation, all sites, s)",
                "",
                f"{res['pool_precompute_s_all_sites']:.2f}",
                "",
            ),
            ("  ciphertexts per site", "1000", f"{res['ciphertexts_per_site']}", ""),
            (
                "  max abs error of the sum",
                f"{res['anchor_max_abs_error']:.1e}",
                f"{res['privml_max_abs_error']:.1e}",
                "",
            ),
        ]

    # CKKS: privml vs one TenSEAL ckks_vector per site
    cagg = he.SecureAggregator("ckks", n_sites=SITES, n_params=N, value_bound=1.0)
    ckeys = cagg.keygen()
    cpub = cagg.public_material(ckeys)
    actx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    actx.global_scale = 2**40
    pub_ctx = ts.context_from(actx.serialize(save_secret_key=False))

    def cours() -> np.ndarray:
        blobs = [cagg.encrypt_update(cpub, u) for u in updates]
        return cagg.decrypt_aggregate(
            ckeys.secret, cagg.aggregate(blobs, public=cpub), n_sites=SITES
        )

    def canchor() -> np.ndarray:
        blobs = [ts.ckks_vector(pub_ctx, u.tolist()).serialize() for u in updates]
        acc = ts.ckks_vector_from(pub_ctx, blobs[0])
        for bl in blobs[1:]:
            acc += ts.ckks_vector_from(pub_ctx, bl)
        acc.link_context(actx)
        return np.array(acc.decrypt())

    cw: dict[str, list[float]] = {"ours": [], "anchor": []}
    cg = ca = None
    for _ in range(max(3, args.reps)):
        t = time.perf_counter()
        cg = cours()
        cw["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ca = canchor()
        cw["anchor"].append(time.perf_counter() - t)
    assert cg is not None and ca is not None
    cm = {k: statistics.median(v) for k, v in cw.items()}
    out["ckks"] = {
        "privml_s": cm["ours"],
        "anchor_s": cm["anchor"],
        "ratio": cm["anchor"] / cm["ours"],
        "privml_max_abs_error": float(np.max(np.abs(cg - plain_sum))),
        "anchor_max_abs_error": float(np.max(np.abs(ca - plain_sum))),
    }
    r = out["ckks"]
    rows += [
        (
            "CKKS: 10 sites x 1000 floats, s",
            f"{r['anchor_s']:.3f}",
            f"{r['privml_s']:.3f}",
            f"{r['ratio']:.1f}x",
        ),
        (
            "  max abs error of the sum",
            f"{r['anchor_max_abs_error']:.1e}",
            f"{r['privml_max_abs_error']:.1e}",
            "",
        ),
    ]
    out["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {out['loadavg_start']}, end {out['loadavg_end']} (2 cores)")
    print(f"* phe measured on {args.subset} values per site, extrapolated linearly to 1000\n")
    print(f"| {'measure':48} | {'anchor':>10} | {'privml':>10} | {'ratio':>6} |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    for name, a, o, rr in rows:
        print(f"| {name:48} | {a:>10} | {o:>10} | {rr:>6} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
