"""Encrypted aggregation: privml.he.SecureAggregator against phe one-number-per-float.

    .venv/bin/python benchmarks/bench_he_aggregation.py [--reps 3] [--subset 25] [--quick]

Work: 10 sites each encrypt a 1,000-float update (values in [-1, 1]), the server sums the
ciphertexts, the key holder decrypts the sum. Timed end to end in one process (all sites in
turn), key generation excluded.

Anchor: python-paillier (with gmpy2) the plain way: ``public_key.encrypt(float)`` per value,
``EncryptedNumber`` additions, ``private_key.decrypt`` per value. Running it on 10 x 1,000
values takes minutes on this machine, so it runs on ``--subset`` values per site and is
**extrapolated linearly** to 1,000 (every step is per value, so the cost is linear). Also
measured: privml with each site's randomness precomputed (a pool, the offline part of Paillier
encryption), and CKKS (privml vs a TenSEAL ``ckks_vector`` per site). Every repetition runs
each variant once in rotating order (benchmarks/harness.py), one warm-up each excluded;
medians with min-max; the ratios are per repetition.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tenseal as ts
from phe import paillier as phe

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios  # noqa: E402

import privml.he as he  # noqa: E402
from privml.errors import InsecureOptionWarning  # noqa: E402


def paillier_case(
    bench: Bench, bits: int, updates: list[np.ndarray], subset: int, reps: int
) -> list[list[str]]:
    """privml (with and without precomputed randomness) and phe per float, interleaved."""
    sites, n = len(updates), len(updates[0])
    plain_sum = np.sum(updates, axis=0)
    agg = he.SecureAggregator("paillier", n_sites=sites, n_params=n, value_bound=1.0, key_bits=bits)
    keys = agg.keygen()
    pub = agg.public_material(keys)
    apk, ask = phe.generate_paillier_keypair(n_length=bits)
    m = min(subset, n)
    got: dict[str, Any] = {}
    cpu: dict[str, list[float]] = {"privml": [], "online": [], "anchor": []}
    pool_s: list[float] = []

    def aggregate(pools: list[Any] | None) -> np.ndarray:
        blobs = [
            agg.encrypt_update(pub, u, pool=None if pools is None else pools[i])
            for i, u in enumerate(updates)
        ]
        return agg.decrypt_aggregate(  # type: ignore[no-any-return]
            keys.secret, agg.aggregate(blobs, public=pub), n_sites=sites
        )

    def ours() -> float:
        t, c = time.perf_counter(), time.process_time()
        got["privml"] = aggregate(None)
        cpu["privml"].append(time.process_time() - c)
        return time.perf_counter() - t

    def online() -> float:
        t0 = time.perf_counter()
        pools = [
            he.PaillierRandomnessPool(keys.public, size=agg.codec.n_plaintexts(n))
            for _ in range(sites)
        ]
        pool_s.append(time.perf_counter() - t0)
        t, c = time.perf_counter(), time.process_time()
        got["online"] = aggregate(pools)
        cpu["online"].append(time.process_time() - c)
        return time.perf_counter() - t

    def anchor() -> float:
        t, c = time.perf_counter(), time.process_time()
        encs = [[apk.encrypt(float(v)) for v in u[:m]] for u in updates]
        sums = encs[0]
        for site in encs[1:]:
            sums = [a + b for a, b in zip(sums, site, strict=True)]
        got["anchor"] = np.array([ask.decrypt(s) for s in sums])
        cpu["anchor"].append((time.process_time() - c) * n / m)
        return (time.perf_counter() - t) * n / m  # extrapolated: every step is per value

    names = {
        "privml": f"privml, Paillier-{bits}",
        "online": f"privml, Paillier-{bits}, randomness precomputed (online part)",
        "anchor": f"phe-{bits}, one EncryptedNumber per float" + ("*" if m < n else ""),
    }
    fns = {"privml": ours, "online": online, "anchor": anchor}
    t = bench.interleave({names[k]: fns[k] for k in fns}, reps=reps, key=f"paillier_{bits}")
    ours_s, online_s, anchor_s = (t[names[k]] for k in ("privml", "online", "anchor"))
    r, r_online = ratios(anchor_s, ours_s), ratios(anchor_s, online_s)
    err = float(np.max(np.abs(got["privml"] - plain_sum)))
    anchor_err = float(np.max(np.abs(got["anchor"] - plain_sum[:m])))
    bench.record(
        f"paillier_{bits}_summary",
        {
            "ratio_anchor_vs_privml": r.to_dict(),
            "ratio_anchor_vs_online": r_online.to_dict(),
            "pool_precompute_s_all_sites": float(np.median(pool_s)),
            "cpu_s_median": {k: float(np.median(v)) for k, v in cpu.items()},
            "anchor_values_timed_per_site": m,
            "ciphertexts_per_site": agg.codec.n_plaintexts(n),
            "values_per_ciphertext": agg.codec.slots,
            "slot_bits": agg.slot_bits,
            "privml_max_abs_error": err,
            "resolution": 2.0**-agg.precision_bits,
            "anchor_max_abs_error": anchor_err,
            "update_bytes": len(agg.encrypt_update(pub, updates[0])),
        },
    )
    return [
        [names["privml"], fmt_spread(ours_s, digits=2, unit="s"), fmt_ratio(r),
         f"{np.median(cpu['privml']):.2f} s", str(agg.codec.n_plaintexts(n)), f"{err:.1e}"],
        [names["online"], fmt_spread(online_s, digits=3, unit="s"), fmt_ratio(r_online),
         f"{np.median(cpu['online']):.3f} s",
         f"{agg.codec.n_plaintexts(n)} (pools: {np.median(pool_s):.2f} s offline)", f"{err:.1e}"],
        [names["anchor"], fmt_spread(anchor_s, digits=1, unit="s"), "-",
         f"{np.median(cpu['anchor']):.1f} s", str(n), f"{anchor_err:.1e}"],
    ]  # fmt: skip


def ckks_case(bench: Bench, updates: list[np.ndarray], reps: int) -> list[list[str]]:
    """privml's CKKS aggregation vs one TenSEAL ckks_vector per site, interleaved."""
    sites, n = len(updates), len(updates[0])
    plain_sum = np.sum(updates, axis=0)
    cagg = he.SecureAggregator("ckks", n_sites=sites, n_params=n, value_bound=1.0)
    ckeys = cagg.keygen()
    cpub = cagg.public_material(ckeys)
    actx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    actx.global_scale = 2**40
    pub_ctx = ts.context_from(actx.serialize(save_secret_key=False))
    got: dict[str, np.ndarray] = {}

    def ours() -> None:
        blobs = [cagg.encrypt_update(cpub, u) for u in updates]
        got["privml"] = cagg.decrypt_aggregate(
            ckeys.secret, cagg.aggregate(blobs, public=cpub), n_sites=sites
        )

    def anchor() -> None:
        blobs = [ts.ckks_vector(pub_ctx, u.tolist()).serialize() for u in updates]
        acc = ts.ckks_vector_from(pub_ctx, blobs[0])
        for bl in blobs[1:]:
            acc += ts.ckks_vector_from(pub_ctx, bl)
        acc.link_context(actx)
        got["anchor"] = np.array(acc.decrypt())

    fns: dict[str, Callable[[], None]] = {
        "privml, CKKS": ours,
        "TenSEAL, one ckks_vector per site": anchor,
    }
    t = bench.interleave(fns, reps=max(3, reps), key="ckks")
    ours_s, anchor_s = t["privml, CKKS"], t["TenSEAL, one ckks_vector per site"]
    r = ratios(anchor_s, ours_s)
    err = float(np.max(np.abs(got["privml"] - plain_sum)))
    anchor_err = float(np.max(np.abs(got["anchor"] - plain_sum)))
    bench.record("ckks_summary", {"ratio_anchor_vs_privml": r.to_dict(),
                                  "privml_max_abs_error": err,
                                  "anchor_max_abs_error": anchor_err})  # fmt: skip
    return [
        ["privml, CKKS", fmt_spread(ours_s, digits=3, unit="s"), fmt_ratio(r), "-", "-",
         f"{err:.1e}"],
        ["TenSEAL, one ckks_vector per site", fmt_spread(anchor_s, digits=3, unit="s"), "-",
         "-", "-", f"{anchor_err:.1e}"],
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=None, help="default 3 (quick 1)")
    ap.add_argument("--subset", type=int, default=None, help="phe values timed per site (25)")
    ap.add_argument("--bits", type=int, nargs="+", default=None, help="default 2048 3072")
    args = ap.parse_args()
    warnings.simplefilter("ignore", InsecureOptionWarning)
    reps = args.reps or (1 if args.quick else 3)
    subset = args.subset or (3 if args.quick else 25)
    bits_list = args.bits or ([2048] if args.quick else [2048, 3072])
    sites, n = (3, 40) if args.quick else (10, 1000)
    rng = np.random.default_rng(0)
    updates = [rng.uniform(-1, 1, n) for _ in range(sites)]
    bench = Bench("he_aggregation", quick=args.quick, out=args.out,
                  params={"reps": reps, "subset": subset, "bits": bits_list, "sites": sites,
                          "n_params": n})  # fmt: skip
    rows: list[list[str]] = []
    for bits in bits_list:
        rows += paillier_case(bench, bits, updates, subset, reps)
    rows += ckks_case(bench, updates, reps)
    extrapolated = (
        f" *phe timed on {subset} values per site and extrapolated linearly to {n:,} (every "
        "step of it is per value)."
        if subset < n
        else ""
    )
    bench.table(
        "aggregation",
        [
            "",
            "wall time",
            "anchor time / this",
            "CPU time",
            "ciphertexts per site",
            "max abs error of the sum",
        ],  # fmt: skip
        rows,
        caption=(
            f"{sites} sites each encrypt a {n:,}-float update (values in [-1, 1]), the server "
            "sums the ciphertexts, the key holder decrypts the sum; key generation excluded; "
            f"median (min-max) of {reps} interleaved repetitions (CKKS: {max(3, reps)}), the "
            "ratio per repetition. The online row times the aggregation with each site's "
            f"encryption randomness taken from a precomputed pool.{extrapolated}"
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
