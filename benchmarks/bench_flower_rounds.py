"""Seconds per federated round on a real Flower 1.42 deployment on localhost.

Same work, same SuperLink setup (TLS, process isolation, offline), same coordinator and
ClientApp code; only the SuperNodes differ:

* ``flower``: Flower's own ``flower-supernode`` (subprocess isolation: every message is run by
  a fresh ``flwr-clientapp`` process that installs the app bundle, imports privml/torch and
  loads the site's data), with privml's ClientApp found from ``--node-config``;
* ``privml``: ``privml flower supernode`` (Flower's Fleet client, the ClientApp in-process,
  site data encoded once, adaptive polling).

Run: ``python benchmarks/bench_flower_rounds.py [--rounds 3] [--reps 1] [--quick]``.
Each repetition deploys both, one after the other in rotating order (benchmarks/harness.py);
the summaries are over every round of every deployment (handshake excluded). A warm-up
deployment is not run: every deployment starts fresh processes. Also reported: the handshake,
the final accuracy of each (equal to the simulation's with the same seed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bench, add_common_args, fmt_spread, summarize  # noqa: E402

SITES = ("hospital_a", "hospital_b", "hospital_c")
#: Quick mode (a smoke run): the demo's first hospital alone, one SuperNode to start.
QUICK_SITES = 1


def deploy_and_run(kind: str, rounds: int, root: Path, *, quick: bool = False) -> dict[str, Any]:
    from privml.config import load_config
    from privml.fl.flower.certs import generate_certificates
    from privml.fl.flower.env import flower_env
    from privml.fl.flower.processes import (
        free_port,
        start_process,
        stop_processes,
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
    text = demo.replace("rounds = 20", f"rounds = {rounds}").replace(
        "encrypted = true", "encrypted = false"
    )
    sites = SITES[:QUICK_SITES] if quick else SITES
    if quick:  # a smoke run: the rounds only, no membership-inference audit after them
        text = text.replace("n_sites = 3", f"n_sites = {QUICK_SITES}")
        text += "\n[audit]\nenabled = false\n"
    config_path.write_text(text)
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
        for site in sites:
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
        stop_processes(procs)
    timing = out.results["deployment"]["timing"]
    return {
        "round_seconds": timing["round_seconds"],
        "handshake_seconds": timing["handshake_seconds"],
        "total_seconds": total,
        "accuracy": out.results["metrics"]["accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--rounds", type=int, default=None, help="rounds per deployment (default 3)")
    ap.add_argument("--reps", type=int, default=1, help="deployments of each (default 1)")
    ap.add_argument("--only", choices=("privml", "flower"))
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    import torch

    torch.set_num_threads(1)
    kinds = [args.only] if args.only else ["privml", "flower"]
    if args.quick and not args.only:
        kinds = ["privml"]  # Flower's own SuperNode takes about a minute per round
    n_nodes = QUICK_SITES if args.quick else len(SITES)
    bench = Bench("flower_rounds", quick=args.quick, out=args.out,
                  params={"rounds": rounds, "reps": args.reps, "kinds": kinds})  # fmt: skip
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        counter = [0]

        def deploy(kind: str) -> float:
            counter[0] += 1
            root = Path(tmp) / str(counter[0])
            root.mkdir()
            print(
                f"{kind}: {rounds} rounds of the demo, {n_nodes} SuperNodes on localhost",
                flush=True,
            )
            r = deploy_and_run(kind, rounds, root, quick=args.quick)
            res[kind].append(r)
            return float(statistics.median(r["round_seconds"]))

        bench.interleave({k: (lambda k=k: deploy(k)) for k in kinds}, reps=args.reps, warmup=0)
    from privml.config import load_config, parse_config
    from privml.pipeline import run as run_simulation

    raw = load_config(None).resolved()
    raw["training"]["rounds"] = rounds
    if args.quick:  # the accuracy only: no audit, no encrypted inference
        raw["data"]["n_sites"] = QUICK_SITES
        raw["audit"]["enabled"] = False
        raw["inference"]["encrypted"] = False
    sim = run_simulation(parse_config(raw), write=False)
    sim_acc = float(sim.results["metrics"]["accuracy"])
    per_round = {k: summarize([x for r in rs for x in r["round_seconds"]]) for k, rs in res.items()}
    bench.record("deployments", res)
    bench.record("round_seconds", {k: s.to_dict() for k, s in per_round.items()})
    bench.record("simulation_accuracy", sim_acc)
    rows = []
    for kind, s in per_round.items():
        hs = [r["handshake_seconds"] for r in res[kind]]
        acc = {round(r["accuracy"], 6) for r in res[kind]}
        label = "privml SuperNode" if kind == "privml" else "Flower's flower-supernode"
        ratio = "1"
        if kind != "privml" and "privml" in per_round:
            ratio = f"{s.median / per_round['privml'].median:.1f}x"
        accs = ", ".join(f"{a:.4f}" for a in sorted(acc))
        handshake = f"{statistics.median(hs):.1f} s"
        rows.append([label, fmt_spread(s, digits=2, unit="s"), ratio, handshake, accs])
    if "flower" not in per_round:
        rows.append(["Flower's flower-supernode", "not run (quick mode)", "-", "-", "-"])
    if "flower" in per_round and "privml" in per_round:
        bench.record("ratio_median_round", per_round["flower"].median / per_round["privml"].median)
    bench.table(
        "rounds",
        ["SuperNodes", "seconds per round", "ratio of medians", "handshake", "accuracy"],
        rows,
        caption=(
            f"The demo on a real Flower deployment on localhost (SuperLink with TLS, {n_nodes} "
            f"SuperNodes), {rounds} rounds per deployment, {args.reps} deployment(s) of each; "
            f"median (min-max) over all rounds. The simulation reaches {sim_acc:.4f} with the "
            "same seed."
        ),
    )
    bench.write()


if __name__ == "__main__":
    main()
