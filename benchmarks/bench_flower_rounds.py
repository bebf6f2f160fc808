"""Seconds per federated round on a real Flower 1.42 deployment on localhost.

Same work, same SuperLink setup (TLS, process isolation, offline), same coordinator and
ClientApp code; only the SuperNodes differ:

* ``flower``: Flower's own ``flower-supernode`` (subprocess isolation: every message is run by
  a fresh ``flwr-clientapp`` process that installs the app bundle, imports privml/torch and
  loads the site's data), with privml's ClientApp found from ``--node-config``;
* ``privml``: ``privml flower supernode`` (Flower's Fleet client, the ClientApp in-process,
  site data encoded once, adaptive polling).

Run: ``python benchmarks/bench_flower_rounds.py [--rounds 5] [--only privml|flower]``.
Prints each round's wall time (handshake excluded), the medians and their ratio, and the final
accuracy of each (equal to the simulation's with the same seed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SITES = ("hospital_a", "hospital_b", "hospital_c")


def deploy_and_run(kind: str, rounds: int, root: Path) -> dict[str, Any]:
    from privml.config import load_config
    from privml.fl.flower.certs import generate_certificates
    from privml.fl.flower.env import flower_env
    from privml.fl.flower.processes import (
        free_port,
        start_process,
        stop_process,
        superlink_command,
        supernode_command,
        wait_for_port,
    )
    from privml.fl.flower.run import Deployment, run_flower

    work = root / kind
    work.mkdir()
    keys = generate_certificates(work / "certs")
    demo = (Path(__file__).parents[1] / "src/privml/data/demo/demo.toml").read_text()
    config_path = work / "demo.toml"
    config_path.write_text(
        demo.replace("rounds = 20", f"rounds = {rounds}").replace(
            "encrypted = true", "encrypted = false"
        )
    )
    home = work / "flwr-home"
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    procs = []
    saved = dict(os.environ)
    os.environ.update(flower_env(home, base={}))
    try:
        sl = start_process(
            superlink_command(port=port, certs=keys.folder),
            home=home,
            log=(work / "superlink.log").open("wb"),
        )
        procs.append(sl)
        wait_for_port("127.0.0.1", port, timeout=120, proc=sl)
        for site in SITES:
            if kind == "flower":
                cmd = supernode_command(
                    superlink=superlink,
                    site=site,
                    config=config_path,
                    root_certificates=keys.ca_cert,
                )
            else:
                cmd = [
                    sys.executable,
                    "-c",
                    "from privml.cli import main; main()",
                    "flower",
                    "supernode",
                    "--site",
                    site,
                    "--config",
                    str(config_path),
                    "--superlink",
                    superlink,
                    "--root-certificates",
                    str(keys.ca_cert),
                    "--home",
                    str(home),
                ]
            procs.append(start_process(cmd, home=home, log=(work / f"{site}.log").open("wb")))
        cfg = load_config(config_path)
        dep = Deployment(superlink, keys.ca_cert, keys.superexec_secret)
        t0 = time.perf_counter()
        out = run_flower(
            cfg,
            deployment=dep,
            write=False,
            wait_for_sites=600,
            on_round=lambda r: print(f"  {kind} round {r.round}: {r.seconds:.2f} s", flush=True),
        )
        total = time.perf_counter() - t0
    finally:
        os.environ.clear()
        os.environ.update(saved)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            stop_process(p)
    timing = out.results["deployment"]["timing"]
    return {
        "round_seconds": timing["round_seconds"],
        "handshake_seconds": timing["handshake_seconds"],
        "total_seconds": total,
        "accuracy": out.results["metrics"]["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", choices=("privml", "flower"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    kinds = [args.only] if args.only else ["privml", "flower"]
    res: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            print(f"{kind}: {args.rounds} rounds of the demo, 3 SuperNodes on localhost")
            res[kind] = deploy_and_run(kind, args.rounds, Path(tmp))
    from privml.config import load_config
    from privml.pipeline import run as run_simulation

    cfg = load_config(None)
    raw = cfg.resolved()
    raw["training"]["rounds"] = args.rounds
    from privml.config import parse_config

    sim = run_simulation(parse_config(raw), write=False)
    print()
    print(
        f"{'SuperNodes':<10} {'median s/round':>15} {'min':>7} {'max':>7} "
        f"{'handshake s':>12} {'accuracy':>9}"
    )
    for kind, r in res.items():
        rs = r["round_seconds"]
        print(
            f"{kind:<10} {statistics.median(rs):>15.2f} {min(rs):>7.2f} {max(rs):>7.2f} "
            f"{r['handshake_seconds']:>12.1f} {r['accuracy']:>9.4f}"
        )
    print(
        f"{'simulation':<10} {'':>15} {'':>7} {'':>7} {'':>12} "
        f"{sim.results['metrics']['accuracy']:>9.4f}"
    )
    if len(res) == 2:
        ratio = statistics.median(res["flower"]["round_seconds"]) / statistics.median(
            res["privml"]["round_seconds"]
        )
        print(f"\nratio (Flower's SuperNode / privml's SuperNode, median s/round): {ratio:.1f}x")
    if hasattr(os, "getloadavg"):
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
