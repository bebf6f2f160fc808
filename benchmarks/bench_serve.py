"""The encrypted prediction service over HTTP, against TenSEAL at its best (no HTTP) and phe.

    .venv/bin/python benchmarks/bench_serve.py [--quick] [--model RUN_DIR] [--single-reps 200]
        [--clients 16] [--client-procs 16] [--seconds 30] [--paced-rps 40] [--batch-clients 4]
        [--batch-seconds 20] [--paillier-reps 20] [--out FILE]

What runs (one server process: ``python -m privml.serve`` on 127.0.0.1, 1 uvicorn worker, auth
on, one token per client, rate limits raised so they do not throttle the measurement; every
answer carries the protection of docs/threat-model.md from the server's precomputed pools):

1. **Single-patient round trip** (CKKS), one client, sequential:
   ``PredictionClient.predict_logits`` on one patient = encrypt, HTTP POST /v1/predict (JSON +
   base64, bearer token, validation of every ciphertext), evaluate, decrypt. Interleaved, in
   every repetition, with the anchor: TenSEAL at its best at equal precision in this process
   (symmetric encryption, 32-padded vector, N = 8192 [60, 40, 60] at 2**40: see
   bench_he_inference.py), and privml.he in process (the same HE work without HTTP).
2. **Paillier-3072, one patient through the service**: the client's randomness precomputed
   (``PredictionClient.prepare``; its offline cost reported) and the server's pool filled in
   the background; online latency of ``predict_logits``, interleaved with phe's documented use
   in process.
3. **Load tests**, ``--clients`` concurrent clients (one process each), CKKS single-patient
   round trips for ``--seconds``: open loop at ``--paced-rps`` requests per second in all (the
   stated request rate; latency counted from the scheduled send time, so a server that falls
   behind is charged for it), and closed loop (each client sends its next request when the
   last returns: the saturation throughput, latency = clients / throughput). p50, p99,
   errors, the server's CPU time per request.
4. **Responsiveness**: ``GET /healthz`` every 20 ms while one worker evaluates an
   8,192-patient Paillier-3072 request; p50 / p99 / max.
5. **Batched** (CKKS): ``--batch-clients`` clients sending 1,000-patient requests, end to end,
   and the server alone (pre-encrypted requests replayed).

Everything runs on this machine: the clients and the server share its cores (2 here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PASSPHRASE = "benchmark passphrase"
BATCH = 1000
PAILLIER_BIG = 8192


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model: Path, state: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "privml.serve",
        "--model",
        str(model),
        "--state-dir",
        str(state),
        "--port",
        str(port),
        "--rate-limit",
        "1000000",
        "--patient-rate-limit",
        "1e9",
        "--max-contexts",
        "64",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


# ------------------------------------------------------------------------------------------
# client processes of the load tests
# ------------------------------------------------------------------------------------------


def _client_proc(
    url: str,
    tokens: list[str],
    keys_dir: Path,
    X: np.ndarray,
    mode: str,
    bodies: list[bytes] | None,
    ready: Any,
    go: Any,
    window: Any,
    results: Any,
    interval: float,
    warm_batch: bool = True,
) -> None:
    """One process running ``len(tokens)`` client threads within the parent's time window."""
    from privml.serve.client import PredictionClient

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    clients = [
        PredictionClient(url, token=t, keys_dir=keys_dir, passphrase=PASSPHRASE, batch_size=BATCH)
        for t in tokens
    ]
    for c in clients:  # warm up: keys loaded once per process, registration checked
        c.keyring = clients[0].keyring
        c.predict_logits(X[:1])
        if mode == "batch" and warm_batch:
            c.predict_logits(X[:BATCH])
    ready.wait()
    go.wait()
    t_start, t_end = window[0], window[1]

    def loop(i: int, c: Any) -> None:
        rng = np.random.default_rng(int.from_bytes(tokens[i].encode()[-8:], "big"))
        phase = float(rng.random())  # spreads the clients' send times over the interval
        http = httpx.Client(timeout=120)
        k = 0
        while time.time() < t_start:
            time.sleep(0.0005)
        while time.time() < t_end:
            t0 = time.perf_counter()
            if mode == "paced":  # open loop: send at fixed times, latency from the schedule
                due = t_start + (k + phase) * interval
                k += 1
                wait = due - time.time()
                if wait > 0:
                    time.sleep(wait)
                if due >= t_end:
                    break
                t0 = time.perf_counter() - max(0.0, time.time() - due)
            try:
                if mode in ("single", "paced"):
                    c.predict_logits(X[int(rng.integers(len(X)))])
                elif mode == "batch":
                    start = int(rng.integers(len(X) - BATCH))
                    c.predict_logits(X[start : start + BATCH])
                else:  # replay pre-encrypted requests: the server alone
                    r = http.post(
                        f"{url}/v1/predict",
                        content=bodies[i % len(bodies)],
                        headers={
                            "Authorization": f"Bearer {tokens[i]}",
                            "Content-Type": "application/json",
                        },
                    )
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")
                ms = (time.perf_counter() - t0) * 1e3
                if time.time() <= t_end:  # completions inside the window only
                    with lock:
                        lat.append(ms)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, not raised
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
        http.close()

    threads = [threading.Thread(target=loop, args=(i, c)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put({"lat": lat, "errors": errors})


def run_load(
    url: str,
    tokens: list[str],
    keys_dir: Path,
    X: np.ndarray,
    *,
    procs: int,
    seconds: float,
    mode: str,
    server_pid: int,
    bodies: list[bytes] | None = None,
    rps: float = 0.0,
    warm_batch: bool = True,
) -> dict[str, Any]:
    """Start the client processes, wait until all are warmed up, then run them together for
    ``seconds`` and collect every request's latency (the window is measured by the parent)."""
    groups = [g for g in (tokens[i::procs] for i in range(procs)) if g]
    ctx = mp.get_context("fork")
    ready, go = ctx.Barrier(len(groups) + 1), ctx.Barrier(len(groups) + 1)
    window = ctx.Array("d", 2)
    results = ctx.Queue()
    children = [
        ctx.Process(
            target=_client_proc,
            args=(
                url,
                g,
                keys_dir,
                X,
                mode,
                bodies,
                ready,
                go,
                window,
                results,
                len(tokens) / rps if rps else 0.0,
                warm_batch,
            ),
        )
        for g in groups
    ]
    for c in children:
        c.start()
    ready.wait(timeout=600)
    window[0] = time.time() + 0.2
    window[1] = window[0] + seconds
    go.wait(timeout=60)
    while time.time() < window[0]:
        time.sleep(0.001)
    cpu0 = cpu_seconds(server_pid)
    while time.time() < window[1]:
        time.sleep(0.01)
    cpu1 = cpu_seconds(server_pid)
    parts = [results.get(timeout=600) for _ in children]
    for c in children:
        c.join(timeout=60)
    lat = [v for r in parts for v in r["lat"]]
    errors = [e for r in parts for e in r["errors"]]
    n = len(lat)
    per_req = BATCH if mode in ("batch", "replay") else 1
    return {
        "mode": mode,
        "offered_rps": rps or None,
        "clients": len(tokens),
        "client_processes": len(groups),
        "seconds": seconds,
        "requests": n,
        "errors": len(errors),
        "error_samples": errors[:5],
        "throughput_rps": n / seconds,
        "patients_per_s": n * per_req / seconds,
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_ms_per_request": (cpu1 - cpu0) / max(n, 1) * 1e3,
        "server_cpu_share": (cpu1 - cpu0) / seconds,
    }


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def healthz_during_paillier(
    url: str,
    token: str,
    keys_dir: Path,
    X: np.ndarray,
    seconds_cap: float,
    n_big: int = PAILLIER_BIG,
) -> dict[str, Any]:
    """/healthz latencies while the server evaluates one ``n_big``-patient Paillier request."""
    import base64

    import privml.he as he
    from privml.he.paillier import PaillierCiphertexts
    from privml.serve.client import PredictionClient

    with PredictionClient(
        url,
        token=token,
        keys_dir=keys_dir,
        passphrase=PASSPHRASE,
        scheme="paillier",
        batch_size=n_big,
    ) as c:
        kid = c.register()
        keys = c.keys()
        reqs = c.requirements()
        one = he.encrypt_features(keys, X[:64])
        assert isinstance(one, PaillierCiphertexts)
        chunks = -(-n_big // one.per_ct)
        n_chunks_one = -(-64 // one.per_ct)
        cts = [one.cts[i * n_chunks_one] for i in range(reqs["n_features"]) for _ in range(chunks)]
        big = PaillierCiphertexts(
            "features",
            keys.public.key_id,
            "columns",
            n_big,
            reqs["n_features"],
            one.slot_bits,
            one.per_ct,
            cts,
            holder=keys.public,
        )
        body = {"key_id": kid, "ciphertexts": base64.b64encode(big.to_bytes()).decode()}
    done: dict[str, Any] = {}

    def send() -> None:
        t0 = time.perf_counter()
        r = httpx.post(
            url + "/v1/predict",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=600,
        )
        done.update(status=r.status_code, seconds=time.perf_counter() - t0)

    worker = threading.Thread(target=send)
    with httpx.Client(timeout=30) as http:
        http.get(url + "/healthz")
        worker.start()
        lat: list[float] = []
        t_end = time.perf_counter() + seconds_cap
        while worker.is_alive() and time.perf_counter() < t_end:
            t0 = time.perf_counter()
            assert http.get(url + "/healthz").status_code == 200
            lat.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.02)
    worker.join()
    return {
        "patients": n_big,
        "request_status": done.get("status"),
        "request_seconds": done.get("seconds"),
        "probes": len(lat),
        "p50_ms": pct(lat, 50) if lat else None,
        "p99_ms": pct(lat, 99) if lat else None,
        "max_ms": max(lat) if lat else None,
    }


def main() -> None:
    from harness import Bench, add_common_args, fmt_ratio, ratios

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="run folder (default: train demo)")
    ap.add_argument("--single-reps", type=int, default=200)
    ap.add_argument("--paillier-reps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--client-procs", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument(
        "--paced-rps",
        type=float,
        default=40.0,
        help="offered load of the open-loop test, requests/s over all clients",
    )
    ap.add_argument("--batch-clients", type=int, default=4)
    ap.add_argument("--batch-seconds", type=float, default=20.0)
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:  # proof that it runs end to end: every part once, tiny
        args.single_reps, args.paillier_reps = 3, 1
        args.clients, args.client_procs = 2, 1
        args.seconds, args.batch_seconds, args.paced_rps = 0.5, 0.5, 10.0
        args.batch_clients = 1
    warmup = 0 if args.quick else 1

    import torch
    from bench_he_inference import LinearAnchor
    from phe import paillier as phe

    import privml.he as he
    from privml.artifacts import load_model
    from privml.config import load_config
    from privml.data.federation import load_federation
    from privml.serve.client import PredictionClient
    from privml.serve.tokens import TokenStore

    torch.set_num_threads(1)
    bench = Bench(
        "serve",
        quick=args.quick,
        out=args.out,
        params=vars(args) | {"model": str(args.model) if args.model else None, "out": None},
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = args.model
    if model_dir is None:  # train the demo; sign it with a throwaway key, trusted by the server
        from privml.pipeline import run

        os.environ["PRIVML_SIGNING_KEY"] = str(tmp / "signing" / "signing-key.pem")
        os.environ.pop("PRIVML_TRUSTED_KEYS", None)
        model_dir = tmp / "model"
        # quick: a 2-round demo without its audit (the service is what is measured)
        quick_demo = (
            ["training.rounds=2", "audit.enabled=false", "output.html=false"] if args.quick else []
        )
        run(load_config(None, overrides=quick_demo), out_dir=model_dir)
    model, _spec, _enc, _task, _ = load_model(model_dir)
    lin = model[0]
    w = lin.weight.detach().double().numpy()[0]
    b = float(lin.bias.detach().double().numpy()[0])
    fed = load_federation(load_config(None))
    Xtest = np.vstack([s.X_test for s in fed.sites] + [s.X_train for s in fed.sites])
    Xtest = np.clip(Xtest.astype(np.float64), 0.0, 1.0)
    with torch.no_grad():
        ref = model.double()(torch.as_tensor(Xtest)).numpy()[:, 0]
    Xbig = Xtest[np.arange(20 * BATCH) % len(Xtest)]

    state, keys_dir = tmp / "state", tmp / "keys"
    store = TokenStore(state)
    tokens = [store.add(f"client{i}") for i in range(max(args.clients, args.batch_clients) + 2)]
    proc, url = start_server(model_dir, state, tmp / "server.log")
    rows: list[list[str]] = []
    try:
        client = PredictionClient(
            url, token=tokens[-1], keys_dir=keys_dir, passphrase=PASSPHRASE, batch_size=BATCH
        )
        client.predict_logits(Xtest[:2])  # keys made, context registered
        keys = client.keys()
        served_ev = he.compile_model(model, _spec, scheme="ckks")
        server_pub = he.load_public(keys.public.to_bytes())
        pool = served_ev.make_pool(server_pub, patients=args.single_reps + 10)
        anchor = LinearAnchor((8192, [60, 40, 60], 40), w, b)
        k = iter(range(10**9))
        errs = {"anchor": 0.0, "privml_he": 0.0, "served": 0.0}

        def variant(name: str, f: Any) -> Any:
            def call() -> None:
                i = next(k) % len(Xtest)
                errs[name] = max(errs[name], abs(f(Xtest[i]) - ref[i]))

            return call

        def inproc(x: np.ndarray) -> float:
            out = served_ev.predict(he.encrypt_features(keys, x), pool=pool)
            return float(he.decrypt_scores(keys.secret, out)[0, 0])

        t = bench.interleave(
            {
                "anchor": variant("anchor", anchor.single),
                "privml_he": variant("privml_he", inproc),
                "served": variant("served", lambda x: float(client.predict_logits(x)[0, 0])),
            },
            reps=args.single_reps,
            warmup=warmup,
            key="single_ms",
        )
        r = ratios(t["anchor"], t["served"])
        bench.record(
            "single",
            {
                n: {
                    "p50_ms": t[n].median * 1e3,
                    "p99_ms": pct(t[n].values, 99) * 1e3,
                    "max_abs_error": errs[n],
                }
                for n in t
            }
            | {"ratio_anchor_over_served": r.to_dict()},
        )
        for name, label in (
            ("served", "privml serve, 1 patient, HTTP round trip (CKKS)"),
            ("privml_he", "privml.he in process, same HE work"),
            ("anchor", "TenSEAL at equal precision, in process, no HTTP"),
        ):
            rows.append(
                [
                    label,
                    f"{t[name].median * 1e3:.2f}",
                    f"{pct(t[name].values, 99) * 1e3:.2f}",
                    fmt_ratio(ratios(t["anchor"], t[name])) if name != "anchor" else "1",
                    f"{errs[name]:.1e}",
                ]
            )

        # ------------------------------------------------------------ Paillier-3072
        pclient = PredictionClient(
            url, token=tokens[-2], keys_dir=keys_dir, passphrase=PASSPHRASE, scheme="paillier"
        )
        pclient.register()
        prepared = args.paillier_reps + (0 if args.quick else 4)
        offline_s = pclient.prepare(prepared)
        if not args.quick:  # quick: no wait for the server's pool (the figures are not used)
            pclient.predict_logits(Xtest[0])  # the server's pool for this key starts filling
            time.sleep(min(30.0, 0.05 * args.paillier_reps + 5.0))
        apk, ask = phe.generate_paillier_keypair(n_length=3072)
        perr = {"phe": 0.0, "served": 0.0}

        def phe_query(x: np.ndarray) -> float:
            enc = [apk.encrypt(float(v)) for v in x]
            acc = enc[0] * float(w[0])
            for e, wi in zip(enc[1:], w[1:], strict=True):
                acc = acc + e * float(wi)
            return float(ask.decrypt(acc + b))

        def pvariant(name: str, f: Any) -> Any:
            def call() -> None:
                i = next(k) % len(Xtest)
                perr[name] = max(perr[name], abs(f(Xtest[i]) - ref[i]))

            return call

        tp = bench.interleave(
            {
                "phe": pvariant("phe", phe_query),
                "served": pvariant("served", lambda x: float(pclient.predict_logits(x)[0, 0])),
            },
            reps=args.paillier_reps,
            warmup=warmup,
            key="paillier_single_ms",
        )
        bench.record(
            "paillier_single",
            {
                "online_p50_ms": tp["served"].median * 1e3,
                "online_p99_ms": pct(tp["served"].values, 99) * 1e3,
                "phe_p50_ms": tp["phe"].median * 1e3,
                "client_offline_s_per_patient": offline_s / prepared,
                "client_pool_misses": pclient._pool.misses if pclient._pool else None,
                "max_abs_error": perr["served"],
            },
        )
        rows.append(
            [
                f"privml serve + client, Paillier-3072, 1 patient, online (client pool "
                f"offline {offline_s / prepared:.2f} s per patient)",
                f"{tp['served'].median * 1e3:.1f}",
                f"{pct(tp['served'].values, 99) * 1e3:.1f}",
                fmt_ratio(ratios(tp["phe"], tp["served"])) + " vs phe",
                f"{perr['served']:.1e}",
            ]
        )
        rows.append(
            [
                "phe, 1 patient, in process",
                f"{tp['phe'].median * 1e3:.0f}",
                f"{pct(tp['phe'].values, 99) * 1e3:.0f}",
                "1",
                f"{perr['phe']:.1e}",
            ]
        )
        pclient.close()
        bench.table(
            "single",
            ["measure", "p50 ms", "p99 ms", "anchor / measure", "max abs error"],
            rows,
            caption="One patient at a time, one client, sequential (anchor and privml "
            "interleaved in every repetition).",
        )

        # ------------------------------------------------------------ responsiveness
        hz = healthz_during_paillier(
            url, tokens[-2], keys_dir, Xtest, 600.0, 256 if args.quick else PAILLIER_BIG
        )
        bench.record("healthz_during_paillier_8192", hz)

        # ------------------------------------------------------------ load tests
        lp = run_load(
            url,
            tokens[: args.clients],
            keys_dir,
            Xtest,
            procs=args.client_procs,
            seconds=args.seconds,
            mode="paced",
            server_pid=proc.pid,
            rps=args.paced_rps,
        )
        ls = run_load(
            url,
            tokens[: args.clients],
            keys_dir,
            Xtest,
            procs=args.client_procs,
            seconds=args.seconds,
            mode="single",
            server_pid=proc.pid,
        )
        lb = run_load(
            url,
            tokens[: args.batch_clients],
            keys_dir,
            Xbig,
            procs=args.batch_clients,
            seconds=args.batch_seconds,
            mode="batch",
            server_pid=proc.pid,
            warm_batch=not args.quick,  # quick: no 1,000-patient warm-up request
        )
        bodies = []
        import base64

        for i in range(4):
            ct = he.encrypt_features(keys, Xbig[i * BATCH : (i + 1) * BATCH]).to_bytes()
            bodies.append(
                json.dumps(
                    {"key_id": keys.public.key_id, "ciphertexts": base64.b64encode(ct).decode()}
                ).encode()
            )
        lr_ = run_load(
            url,
            tokens[: args.batch_clients],
            keys_dir,
            Xbig,
            procs=min(2, args.batch_clients),
            seconds=args.batch_seconds,
            mode="replay",
            server_pid=proc.pid,
            bodies=bodies,
        )
        bench.record(
            "load",
            {
                "open_loop": lp,
                "closed_loop": ls,
                "batch": lb,
                "batch_server_only": lr_,
                "batch_request_bytes": len(bodies[0]),
            },
        )
        load_rows = [
            [
                f"open loop, {lp['clients']} clients, {lp['offered_rps']:.0f} requests/s offered",
                f"{lp['throughput_rps']:.0f}/s",
                f"{lp['p50_ms']:.1f}",
                f"{lp['p99_ms']:.1f}",
                str(lp["errors"]),
                f"{lp['server_cpu_ms_per_request']:.1f}",
            ],
            [
                f"closed loop, {ls['clients']} clients (saturation)",
                f"{ls['throughput_rps']:.0f}/s",
                f"{ls['p50_ms']:.1f}",
                f"{ls['p99_ms']:.1f}",
                str(ls["errors"]),
                f"{ls['server_cpu_ms_per_request']:.1f}",
            ],
            [
                f"batched, {lb['clients']} clients x {BATCH} patients, end to end",
                f"{lb['patients_per_s']:,.0f} patients/s",
                f"{lb['p50_ms']:.0f}",
                f"{lb['p99_ms']:.0f}",
                str(lb["errors"]),
                f"{lb['server_cpu_ms_per_request']:.1f}",
            ],
            [
                "batched, the server alone (pre-encrypted, replayed)",
                f"{lr_['patients_per_s']:,.0f} patients/s",
                f"{lr_['p50_ms']:.0f}",
                f"{lr_['p99_ms']:.0f}",
                str(lr_["errors"]),
                f"{lr_['server_cpu_ms_per_request']:.1f}",
            ],
            [
                f"GET /healthz every 20 ms during one {hz['patients']}-patient Paillier-3072 "
                f"request ({hz['request_seconds']:.1f} s, HTTP {hz['request_status']})",
                f"{hz['probes']} probes",
                f"{hz['p50_ms']:.1f}",
                f"{hz['p99_ms']:.1f}",
                "0" if hz["request_status"] == 200 else "1",
                "-",
            ],
        ]
        bench.table(
            "load",
            ["test", "throughput", "p50 ms", "p99 ms", "errors", "server CPU ms / request"],
            load_rows,
            caption=f"Concurrent clients ({args.seconds:g} s each, one process per "
            "client) and responsiveness; CKKS single-patient requests unless stated.",
        )
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res = bench.results
    single = res["single"]["served"]
    pai = res["paillier_single"]
    hz = res["healthz_during_paillier_8192"]
    lp, ls = res["load"]["open_loop"], res["load"]["closed_loop"]

    def status(ok: bool) -> str:
        return "met" if ok else "**not met**"

    bench.table(
        "targets",
        ["target", "measured", "status"],
        [
            [
                "1 patient through the service (CKKS): p50 <= 20 ms, p99 <= 50 ms, one client",
                f"p50 {single['p50_ms']:.1f} ms, p99 {single['p99_ms']:.1f} ms",
                status(single["p50_ms"] <= 20 and single["p99_ms"] <= 50),
            ],
            [
                f"same under load: {lp['clients']} clients, {lp['offered_rps']:.0f} requests/s "
                "offered (open loop)",
                f"p50 {lp['p50_ms']:.1f} ms, p99 {lp['p99_ms']:.1f} ms",
                status(lp["p50_ms"] <= 20 and lp["p99_ms"] <= 50),
            ],
            [
                f"0 errors under the {ls['clients']}-client load tests",
                f"{lp['errors'] + ls['errors']} errors in "
                f"{lp['requests'] + ls['requests']} requests",
                status(lp["errors"] + ls["errors"] == 0),
            ],
            [
                "Paillier-3072, 1 patient, privml serve + client, <= 50 ms online (pools)",
                f"p50 {pai['online_p50_ms']:.1f} ms (client offline "
                f"{pai['client_offline_s_per_patient']:.2f} s per patient)",
                status(pai["online_p50_ms"] <= 50),
            ],
            [
                "/healthz p99 <= 50 ms during an 8,192-patient Paillier request",
                f"p99 {hz['p99_ms']:.1f} ms over {hz['probes']} probes",
                status(hz["p99_ms"] is not None and hz["p99_ms"] <= 50),
            ],
        ],
        caption="Targets of the service (load average in the line below: on a shared machine "
        "the latencies follow it).",
    )
    bench.write()


if __name__ == "__main__":
    main()
