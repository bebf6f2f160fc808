"""Seconds per round of SecAgg+ against plain rounds on a real Flower 1.42 deployment.

Two deployments on localhost, started once and kept for every run (SuperLink with TLS, three
``privml flower supernode`` processes each): one with the demo's config, one with the same
config and ``secure_aggregation = "secagg+"`` (Flower's SecAggPlusWorkflow and
secaggplus_mod, four exchanges per round instead of one). Both configs set the same
``max_update_norm`` (nothing of the demo is clipped at it). Each repetition runs the demo for
``--rounds`` rounds on both, alternating, in an order that rotates (benchmarks/harness.py);
a run's figure is the median of its rounds (the handshake excluded); the ratio is SecAgg+ over
plain per repetition. One warm-up run of each is excluded.

Run: ``python benchmarks/bench_flower_secagg.py [--rounds 3] [--reps 3]``. Quick mode
(``--quick``) does not deploy: starting six SuperNodes takes 20-40 s on this machine, beyond a
quick run's budget; it prints why and writes a table saying so.
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

from harness import Bench, add_common_args, fmt_ratio, fmt_spread, ratios, summarize  # noqa: E402

SITES = ("hospital_a", "hospital_b", "hospital_c")
CLIP = 50.0
QUICK_REASON = (
    "skipped in quick mode: it starts two SuperLinks and six SuperNodes (20-40 s on this "
    "machine), beyond a quick run's 8 s"
)


EXCHANGES: list[tuple[str, int, str, float]] = []
"""(kind, round, what, seconds) of every message exchange the coordinator made."""


def time_exchanges(kind: list[str]) -> None:
    """Wrap the coordinator's one exchange function to time every exchange by what it
    carried (a SecAgg+ stage, or the message types), for the table of where the time goes."""
    from privml.fl.flower.server_app import Coordinator

    exchange = Coordinator.exchange

    def timed(self: Any, messages: list[Any], *, timeout: float) -> dict[int, Any]:
        t0 = time.perf_counter()
        out = exchange(self, messages, timeout=timeout)
        what = set()
        for m in messages:
            cfg = m.content.config_records.get("secaggplus_configs")
            what.add(str(cfg.get("stage")) if cfg is not None else m.metadata.message_type)
        EXCHANGES.append((kind[0], self._round, "+".join(sorted(what)),
                          time.perf_counter() - t0))  # fmt: skip
        return out

    Coordinator.exchange = timed  # type: ignore[method-assign]


class Deployment:
    """A SuperLink and three SuperNodes serving one config, kept for several runs."""

    def __init__(self, kind: str, root: Path, rounds: int) -> None:
        from privml.fl.flower.certs import generate_certificates

        self.kind = kind
        self.work = root / kind
        self.work.mkdir()
        self.keys = generate_certificates(self.work / "certs")
        demo = (Path(__file__).parents[1] / "src/privml/data/demo/demo.toml").read_text()
        extra = f"max_update_norm = {CLIP}\n"
        if kind == "secagg+":
            extra += 'secure_aggregation = "secagg+"\n'
        self.config_path = self.work / "demo.toml"
        self.config_path.write_text(
            demo.replace("rounds = 20", f"rounds = {rounds}\n{extra}").replace(
                "encrypted = true", "encrypted = false"
            )
        )
        self.home = self.work / "flwr-home"
        self.procs: list[Any] = []

    def start(self) -> None:
        from privml.fl.flower.processes import free_port, start_process, superlink_command

        port = free_port()
        self.port = port
        self.superlink = f"127.0.0.1:{port}"
        self.procs.append(start_process(superlink_command(port=port, certs=self.keys.folder),
                                        home=self.home,
                                        log=(self.work / "superlink.log").open("wb")))  # fmt: skip
        for site in SITES:
            cmd = [sys.executable, "-c", "from privml.cli import main; main()", "flower",
                   "supernode", "--site", site, "--config", str(self.config_path),
                   "--superlink", self.superlink, "--root-certificates", str(self.keys.ca_cert),
                   "--home", str(self.home)]  # fmt: skip
            log = (self.work / f"{site}.log").open("wb")
            self.procs.append(start_process(cmd, home=self.home, log=log))

    def run(self) -> dict[str, Any]:
        from privml.config import load_config
        from privml.fl.flower.env import flower_env
        from privml.fl.flower.processes import wait_for_port
        from privml.fl.flower.run import Deployment as Dep
        from privml.fl.flower.run import run_flower

        wait_for_port("127.0.0.1", self.port, timeout=120, proc=self.procs[0])
        saved = dict(os.environ)
        os.environ.update(flower_env(self.home, base={}))
        try:
            cfg = load_config(self.config_path)
            dep = Dep(self.superlink, self.keys.ca_cert, self.keys.superexec_secret)
            out = run_flower(cfg, deployment=dep, write=False, wait_for_sites=600)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        timing = out.results["deployment"]["timing"]
        rounds = out.results["rounds"]
        return {
            "round_seconds": timing["round_seconds"],
            "handshake_seconds": timing["handshake_seconds"],
            "accuracy": out.results["metrics"]["accuracy"],
            "skipped": [r["skipped"] for r in rounds],
            "clients": [r["clients"] for r in rounds],
        }

    def stop(self) -> None:
        from privml.fl.flower.processes import stop_processes

        stop_processes(self.procs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="runs of each (default 3)")
    args = ap.parse_args()
    bench = Bench("flower_secagg", quick=args.quick, out=args.out,
                  params={"rounds": args.rounds, "reps": args.reps, "clip": CLIP})  # fmt: skip
    columns = ["rounds", "seconds per round", "ratio to plain (per repetition)", "accuracy"]
    if args.quick:
        print(QUICK_REASON)
        bench.record("skipped", QUICK_REASON)
        bench.table("rounds", columns, [["SecAgg+ and plain", QUICK_REASON, "-", "-"]])
        bench.write()
        return
    import torch

    torch.set_num_threads(1)
    res: dict[str, list[dict[str, Any]]] = {"plain": [], "secagg+": []}
    current = ["warm-up"]
    time_exchanges(current)
    with tempfile.TemporaryDirectory() as tmp:
        deps = {k: Deployment(k, Path(tmp), args.rounds) for k in res}
        try:
            t0 = time.perf_counter()
            for d in deps.values():
                d.start()
            print("deployments started; waiting for the sites", flush=True)

            def run(kind: str) -> float:
                current[0] = kind if len(res[kind]) else "warm-up"
                r = deps[kind].run()
                res[kind].append(r)
                print(f"  {kind}: rounds {[round(s, 2) for s in r['round_seconds']]} s, "
                      f"accuracy {r['accuracy']:.4f}", flush=True)  # fmt: skip
                return float(statistics.median(r["round_seconds"]))

            got = bench.interleave({k: (lambda k=k: run(k)) for k in res}, reps=args.reps,
                                   warmup=1, key="median_round_seconds")  # fmt: skip
            bench.record("start_and_warmup_seconds", time.perf_counter() - t0)
        finally:
            for d in deps.values():
                d.stop()
    runs = {k: v[1:] for k, v in res.items()}  # the warm-up run excluded
    ratio = ratios(got["secagg+"], got["plain"])
    bench.record("runs", res)
    bench.record("ratio_secagg_vs_plain", ratio.to_dict())
    from privml.config import load_config, parse_config
    from privml.pipeline import run as run_simulation

    raw = load_config(None).resolved()
    raw["training"]["rounds"] = args.rounds
    sim_acc = float(run_simulation(parse_config(raw), write=False).results["metrics"]["accuracy"])
    bench.record("simulation_accuracy", sim_acc)
    rows = []
    for kind, label in (("plain", "plain (FedAvg)"), ("secagg+", "SecAgg+ (Flower's workflow)")):
        per_round = summarize([x for r in runs[kind] for x in r["round_seconds"]])
        accs = ", ".join(f"{a:.4f}" for a in sorted({round(r["accuracy"], 6) for r in runs[kind]}))
        rows.append([label, fmt_spread(per_round, digits=2, unit="s"),
                     fmt_ratio(ratio) if kind == "secagg+" else "1", accs])  # fmt: skip
    bench.table(
        "rounds", columns, rows,
        caption=(
            f"The demo on two Flower deployments on localhost (SuperLink with TLS, 3 "
            f"SuperNodes each), plain and SecAgg+ alternating, {args.rounds} rounds per run, "
            f"{args.reps} runs of each after a warm-up; seconds per round: median (min-max) "
            "over all rounds; ratio: median (min-max) over the repetitions of the runs' median "
            f"rounds. The plain simulation reaches {sim_acc:.4f} with the same seed."
        ),
    )  # fmt: skip
    stages: dict[tuple[str, str], list[float]] = {}
    for kind, rnd, what, secs in EXCHANGES:
        if kind != "warm-up" and rnd >= 1:
            stages.setdefault((kind, what), []).append(secs)
    bench.record("exchange_seconds", {f"{k} {w}": summarize(v).to_dict()
                                      for (k, w), v in stages.items()})  # fmt: skip
    bench.table(
        "exchanges", ["run", "exchange (what the coordinator sent)", "seconds", "exchanges"],
        [[k, w, fmt_spread(summarize(v), digits=2, unit="s"), str(len(v))]
         for (k, w), v in sorted(stages.items())],
        caption="Where a round's time goes: every message exchange of the timed runs, timed "
        "by the coordinator from pushing its messages to having every reply (or giving up), "
        "by what it carried; median (min-max). The training request rides on SecAgg+'s "
        "collect_masked_vectors stage; evaluation of the previous model rides on the training "
        "request (evaluate: the last model's).",
    )  # fmt: skip
    bench.write()


if __name__ == "__main__":
    main()
