"""The encrypted prediction service under load, against TenSEAL used directly (no HTTP).

    .venv/bin/python benchmarks/bench_serve.py [--model RUN_DIR] [--single-reps 300]
        [--clients 16] [--client-procs 16] [--seconds 30] [--paced-rps R] [--batch-clients 4]
        [--batch-seconds 20] [--json out.json]

What runs (one server process: ``python -m privml.serve`` on 127.0.0.1, 1 uvicorn worker, auth
on, one token per client, rate limits raised so they do not throttle the measurement):

1. **Single-patient round trip**, one client, sequential: ``PredictionClient.predict_logits`` on
   one patient = encrypt (CKKS), HTTP POST /v1/predict (JSON + base64), validate and evaluate on
   the server, decrypt. p50 / p99 over ``--single-reps`` patients. Interleaved with the anchor:
   TenSEAL's ``ckks_vector(x).dot(w).add(b).decrypt()`` in this process (the anchor of the HE
   issue: N=8192 [60, 40, 40, 60], scale 2**40, all Galois keys), and with privml.he in process
   (the same HE work without HTTP) to show what the service layer costs.
2. **Load tests**, ``--clients`` concurrent clients (threads spread over ``--client-procs``
   processes), single-patient round trips for ``--seconds``: closed loop (each client sends its
   next request as soon as the last one returns: the saturation throughput; by Little's law
   its latency is clients / throughput) and open loop (``--paced-rps`` requests per second
   offered in all, by default half the closed-loop throughput, at fixed times; latency counted
   from the scheduled send time, so a server that falls behind is charged for it). Throughput,
   p50, p99, errors, and the server process's CPU time per request.
3. **Batched**: ``--batch-clients`` concurrent clients sending 1,000-patient requests for
   ``--batch-seconds``, end to end (client encryption and decryption included): patients/s
   through the one server process; and the server alone (the same 1,000-patient requests,
   encrypted once beforehand, replayed): its capacity. Anchor: TenSEAL column packing (one
   ``ckks_vector`` of 1,000 patients per feature, scalar products, sum, decrypt) in process.

Everything runs on this machine: the clients and the server share its cores (2 here), so the
load-test and batch figures include the clients' own encryption work competing with the server.
The script prints the load average; absolute times follow the machine's load, ratios much less.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
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
        sys.executable, "-m", "privml.serve", "--model", str(model), "--state-dir", str(state),
        "--port", str(port), "--rate-limit", "1000000", "--patient-rate-limit", "1e9",
        "--max-contexts", "64", "--log-level", "warning",
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


def _client_proc(url: str, tokens: list[str], keys_dir: Path, X: np.ndarray, mode: str,
                 bodies: list[bytes] | None, ready: Any, go: Any, window: Any,
                 results: Any, interval: float) -> None:
    """One process running ``len(tokens)`` client threads within the parent's time window."""
    from privml.serve.client import PredictionClient

    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    clients = [PredictionClient(url, token=t, keys_dir=keys_dir, passphrase=PASSPHRASE,
                                batch_size=BATCH) for t in tokens]
    for c in clients:  # warm up: keys loaded once per process, registration checked
        c.keyring = clients[0].keyring
        c.predict_logits(X[:1])
        if mode == "batch":
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
                    r = http.post(f"{url}/v1/predict", content=bodies[i % len(bodies)],
                                  headers={"Authorization": f"Bearer {tokens[i]}",
                                           "Content-Type": "application/json"})
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


def run_load(url: str, tokens: list[str], keys_dir: Path, X: np.ndarray, *, procs: int,
             seconds: float, mode: str, server_pid: int,
             bodies: list[bytes] | None = None, rps: float = 0.0) -> dict[str, Any]:
    """Start the client processes, wait until all are warmed up, then run them together for
    ``seconds`` and collect every request's latency (the window is measured by the parent)."""
    groups = [g for g in (tokens[i::procs] for i in range(procs)) if g]
    ctx = mp.get_context("fork")
    ready, go = ctx.Barrier(len(groups) + 1), ctx.Barrier(len(groups) + 1)
    window = ctx.Array("d", 2)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_client_proc,
                    args=(url, g, keys_dir, X, mode, bodies, ready, go, window, results,
                          len(tokens) / rps if rps else 0.0))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="run folder (default: train demo)")
    ap.add_argument("--single-reps", type=int, default=300)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--client-procs", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--paced-rps", type=float, default=0.0,
                    help="offered load of the open-loop test, requests/s over all clients "
                    "(default: half the closed-loop throughput just measured)")
    ap.add_argument("--batch-clients", type=int, default=4)
    ap.add_argument("--batch-seconds", type=float, default=20.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import tenseal as ts
    import torch

    import privml.he as he
    from privml.artifacts import load_model
    from privml.serve.client import PredictionClient
    from privml.serve.tokens import TokenStore

    torch.set_num_threads(1)
    out: dict[str, Any] = {"loadavg_start": os.getloadavg(), "cores": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model_dir = args.model
    if model_dir is None:  # train the demo; sign it with a throwaway key, trusted by the server
        from privml.config import load_config
        from privml.pipeline import run

        os.environ["PRIVML_SIGNING_KEY"] = str(tmp / "signing" / "signing-key.pem")
        os.environ.pop("PRIVML_TRUSTED_KEYS", None)
        model_dir = tmp / "model"
        run(load_config(None), out_dir=model_dir)
    model, spec, encoder, task, _ = load_model(model_dir)
    lin = model[0]
    w = lin.weight.detach().double().numpy()[0]
    b = float(lin.bias.detach().double().numpy()[0])
    from privml.config import load_config
    from privml.data.federation import load_federation

    fed = load_federation(load_config(None))
    Xtest = np.vstack([s.X_test for s in fed.sites] + [s.X_train for s in fed.sites])
    Xtest = np.clip(Xtest.astype(np.float64), 0.0, 1.0)
    with torch.no_grad():
        ref = model.double()(torch.as_tensor(Xtest)).numpy()[:, 0]
    Xbig = Xtest[np.arange(20 * BATCH) % len(Xtest)]

    state, keys_dir = tmp / "state", tmp / "keys"
    store = TokenStore(state)
    tokens = [store.add(f"client{i}") for i in range(max(args.clients, args.batch_clients) + 1)]
    proc, url = start_server(model_dir, state, tmp / "server.log")
    try:
        client = PredictionClient(url, token=tokens[-1], keys_dir=keys_dir,
                                  passphrase=PASSPHRASE, batch_size=BATCH)
        client.predict_logits(Xtest[:2])  # keys made, context registered
        keys = client.keys()
        ev_reqs = client.requirements()

        # ------------------------------------------------------------ single patient
        actx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
        actx.global_scale = 2**40
        actx.generate_galois_keys()
        served_ev = he.compile_model(model, spec, scheme="ckks")
        assert served_ev.requirements.normalized == ev_reqs
        server_pub = he.load_public(keys.public.to_bytes())

        def anchor_single(x: np.ndarray) -> float:
            return float(ts.ckks_vector(actx, x.tolist()).dot(w.tolist()).add(b).decrypt()[0])

        def inproc_single(x: np.ndarray) -> float:
            q = he.encrypt_features(keys, x).to_bytes()
            r = served_ev.predict_bytes(q, server_pub)  # type: ignore[arg-type]
            return float(he.decrypt_scores(keys.secret, r)[0, 0])

        def served_single(x: np.ndarray) -> float:
            return float(client.predict_logits(x)[0, 0])

        times: dict[str, list[float]] = {"anchor": [], "privml_he": [], "served": []}
        errs: dict[str, float] = {"anchor": 0.0, "privml_he": 0.0, "served": 0.0}
        fns = {"anchor": anchor_single, "privml_he": inproc_single, "served": served_single}
        for f in fns.values():  # warm-up
            f(Xtest[0])
        for i in range(args.single_reps):
            x = Xtest[i % len(Xtest)]
            for name, f in fns.items():
                t0 = time.perf_counter()
                z = f(x)
                times[name].append((time.perf_counter() - t0) * 1e3)
                errs[name] = max(errs[name], abs(z - ref[i % len(Xtest)]))
        out["single"] = {
            name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99),
                   "max_abs_error": errs[name]}
            for name, v in times.items()
        }
        out["single"]["ratio_anchor_over_served_p50"] = (
            out["single"]["anchor"]["p50_ms"] / out["single"]["served"]["p50_ms"]
        )

        # ------------------------------------------------------------ batch, in process
        def anchor_batch(X: np.ndarray) -> np.ndarray:
            cols = [ts.ckks_vector(actx, X[:, i].tolist()) for i in range(X.shape[1])]
            acc = cols[0] * float(w[0])
            for i in range(1, X.shape[1]):
                acc += cols[i] * float(w[i])
            acc += b
            return np.array(acc.decrypt())

        def served_batch(X: np.ndarray) -> np.ndarray:
            return client.predict_logits(X)[:, 0]

        bt: dict[str, list[float]] = {"anchor": [], "served_sequential": []}
        berr: dict[str, float] = {"anchor": 0.0, "served_sequential": 0.0}
        for i in range(5):
            Xb = Xbig[i * BATCH : (i + 1) * BATCH]
            rb = ref[(np.arange(i * BATCH, (i + 1) * BATCH)) % len(Xtest)]
            for name, f in (("anchor", anchor_batch), ("served_sequential", served_batch)):
                t0 = time.perf_counter()
                z = f(Xb)
                bt[name].append((time.perf_counter() - t0) * 1e3)
                berr[name] = max(berr[name], float(np.max(np.abs(z - rb))))
        out["batch_in_process"] = {
            name: {"ms_per_1000": statistics.median(v),
                   "patients_per_s": BATCH / statistics.median(v) * 1e3,
                   "max_abs_error": berr[name]}
            for name, v in bt.items()
        }

        # ------------------------------------------------------------ load test
        out["load_single"] = run_load(
            url, tokens[: args.clients], keys_dir, Xtest, procs=args.client_procs,
            seconds=args.seconds, mode="single", server_pid=proc.pid,
        )
        out["load_paced"] = run_load(
            url, tokens[: args.clients], keys_dir, Xtest, procs=args.client_procs,
            seconds=args.seconds, mode="paced", server_pid=proc.pid,
            rps=args.paced_rps or 0.5 * out["load_single"]["throughput_rps"],
        )
        # ------------------------------------------------------------ batched
        out["load_batch"] = run_load(
            url, tokens[: args.batch_clients], keys_dir, Xbig, procs=args.batch_clients,
            seconds=args.batch_seconds, mode="batch", server_pid=proc.pid,
        )
        bodies = []
        for i in range(4):
            ct = he.encrypt_features(keys, Xbig[i * BATCH : (i + 1) * BATCH]).to_bytes()
            import base64

            bodies.append(json.dumps({"key_id": keys.public.key_id,
                                      "ciphertexts": base64.b64encode(ct).decode()}).encode())
        out["load_batch_server_only"] = run_load(
            url, tokens[: args.batch_clients], keys_dir, Xbig, procs=min(2, args.batch_clients),
            seconds=args.batch_seconds, mode="replay", server_pid=proc.pid, bodies=bodies,
        )
        out["batch_request_bytes"] = len(bodies[0])
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out["loadavg_end"] = os.getloadavg()
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


def report(out: dict[str, Any]) -> None:
    s = out["single"]
    print(f"load average at start {out['loadavg_start']}, at end {out['loadavg_end']}, "
          f"{out['cores']} cores")
    print("\nsingle-patient round trip (one client, sequential), ms")
    print(f"{'':44s}{'p50':>9s}{'p99':>9s}{'max |err|':>11s}")
    for name, label in (("anchor", "anchor: TenSEAL direct, no HTTP"),
                        ("privml_he", "privml.he in process, no HTTP"),
                        ("served", "privml serve: encrypt, HTTP, eval, decrypt")):
        print(f"{label:44s}{s[name]['p50_ms']:9.2f}{s[name]['p99_ms']:9.2f}"
              f"{s[name]['max_abs_error']:11.1e}")
    print(f"ratio anchor / served (p50): {s['ratio_anchor_over_served_p50']:.2f}x")
    ls = out["load_single"]
    print(f"\nclosed-loop load: {ls['clients']} concurrent clients, each sending its next request "
          f"when the last one returns, {ls['seconds']:.0f} s, one server process")
    print(f"  {ls['requests']} requests, {ls['throughput_rps']:.0f}/s, p50 {ls['p50_ms']:.1f} ms,"
          f" p99 {ls['p99_ms']:.1f} ms, errors {ls['errors']}; server CPU "
          f"{ls['server_cpu_ms_per_request']:.2f} ms/request "
          f"({ls['server_cpu_share']:.0%} of a core)")
    lp = out["load_paced"]
    print(f"open-loop load: {lp['clients']} clients sending {lp['offered_rps']:.0f} requests/s "
          f"in all, {lp['seconds']:.0f} s (latency from the scheduled send time)")
    print(f"  {lp['requests']} requests, {lp['throughput_rps']:.0f}/s, p50 {lp['p50_ms']:.1f} ms,"
          f" p99 {lp['p99_ms']:.1f} ms, errors {lp['errors']}; server CPU "
          f"{lp['server_cpu_ms_per_request']:.2f} ms/request ({lp['server_cpu_share']:.0%} of a "
          "core)")
    bi = out["batch_in_process"]
    print("\nbatched, 1,000-patient requests")
    print(f"  anchor (TenSEAL columns, in process): {bi['anchor']['patients_per_s']:,.0f}/s "
          f"(max |err| {bi['anchor']['max_abs_error']:.1e})")
    print(f"  served, one sequential client: {bi['served_sequential']['patients_per_s']:,.0f}/s "
          f"(max |err| {bi['served_sequential']['max_abs_error']:.1e}); ratio served / anchor "
          f"{bi['served_sequential']['patients_per_s'] / bi['anchor']['patients_per_s']:.1f}x")
    for key, label in (("load_batch", "end to end"), ("load_batch_server_only",
                                                      "server alone (pre-encrypted, replayed)")):
        lb = out[key]
        print(f"  {label}, {lb['clients']} concurrent clients: {lb['patients_per_s']:,.0f} "
              f"patients/s, p50 {lb['p50_ms']:.0f} ms, p99 {lb['p99_ms']:.0f} ms, errors "
              f"{lb['errors']}; server CPU {lb['server_cpu_ms_per_request']:.1f} ms per "
              f"request = {1e6 / max(lb['server_cpu_ms_per_request'], 1e-9):,.0f} patients per "
              "server CPU-second")
    print(f"  request body: {out['batch_request_bytes']:,} bytes per 1,000 patients")


if __name__ == "__main__":
    main()
