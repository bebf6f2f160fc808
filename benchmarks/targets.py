"""The targets tables of docs/benchmarks.md, collected from the benchmarks' JSON results.

Run:  .venv/bin/python benchmarks/targets.py [--results DIR] [--out FILE]
(run_all.py runs it after the benchmarks, before render_docs.py)

Each target names the benchmark whose JSON holds its figure, reads the figure (a median, with
its min-max spread where there is one), compares it with the threshold and says met, not met,
or not measured (no results yet). The tables are written to ``results/targets.json`` (through
:class:`harness.Bench`) and rendered into docs/benchmarks.md between markers like every other
table, so no figure on that page is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import RESULTS_DIR, Bench

Getter = Callable[[dict[str, Any]], tuple[float, str]]


@dataclass(frozen=True)
class Target:
    area: str
    what: str
    source: str  # benchmark name (results/<source>.json)
    get: Getter  # JSON -> (value compared with the threshold, text shown)
    at_least: float | None = None
    at_most: float | None = None

    def status(self, value: float) -> str:
        ok = (self.at_least is None or value >= self.at_least) and (
            self.at_most is None or value <= self.at_most
        )
        return "met" if ok else "**not met**"


def _ratio(key: str) -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        r = d["results"][key]
        return r["median"], f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"

    return get


def _dpsgd(key: str) -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        v, text = _ratio(f"{key}_privml_vs_best_opacus")(d)
        return v, f"{text} vs {d['results'][f'{key}_best_opacus']}"

    return get


def _plain(key: str) -> Getter:
    return _ratio(f"{key}_privml_vs_plain")


def _utility(name: str) -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        test = d["results"][name]["test"]
        sd = statistics.stdev(test) if len(test) > 1 else 0.0
        return statistics.mean(test), (
            f"{statistics.mean(test):.3f} (sd {sd:.3f}, {min(test):.3f}-{max(test):.3f}, "
            f"{len(test)} seeds)"
        )

    return get


def _client_gap(d: dict[str, Any]) -> tuple[float, str]:
    dp = statistics.mean(d["results"]["1,000 clients, client-level, epsilon 2"]["test"])
    plain = statistics.mean(d["results"]["1,000 clients, non-private"]["test"])
    return dp - plain, f"{dp:.3f} vs {plain:.3f} non-private ({100 * (dp - plain):+.1f} points)"


def _ddp_gap(d: dict[str, Any]) -> tuple[float, str]:
    gap = float(d["results"]["default_gap_points"])
    se = float(d["results"].get("default_gap_standard_error") or 0.0)
    seeds = d["params"]["seeds"]
    return gap, f"{gap:+.1f} +- {se:.1f} (s.e.) points below central (mean of {seeds} paired seeds)"


def _seconds(key: str, variant: str, unit: float = 1.0, label: str = "s") -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        s = d["results"][key][variant]
        return s["median"] * unit, (
            f"{s['median'] * unit:.2f} {label} ({s['min'] * unit:.2f}-{s['max'] * unit:.2f})"
        )

    return get


def _load_100k(d: dict[str, Any]) -> tuple[float, str]:
    key = next(k for k in d["results"] if k.startswith("load_100000x"))
    v, text = _seconds(key, "privml")(d)
    base = d["results"][key].get("per-site baseline")
    if base is not None:
        text += f"; previous per-site loader {base['median']:.0f} s"
    return v, text


def _memory(d: dict[str, Any]) -> tuple[float, str]:
    runs = d["results"]["memory_target"]
    peak = statistics.median(r["peak_rss"] for r in runs)
    records = runs[0]["records"]
    return peak / 1e9, f"{peak / 1e9:.2f} GB peak ({records / 1e6:.0f} M records)"


def _round(d: dict[str, Any]) -> tuple[float, str]:
    s = d["results"]["round_seconds"]
    text = f"{s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f})"
    share = d["results"].get("round_arithmetic_share")
    if share is not None:
        text += f"; arithmetic alone {100 * share:.0f}% of it"
    return s["median"], text


def _same_accuracy(d: dict[str, Any]) -> tuple[float, str]:
    acc = d["results"]["accuracy"]
    spread = max(acc.values()) - min(acc.values())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
    return spread, shown


def _robust(d: dict[str, Any]) -> tuple[float, str]:
    med = d["results"]["median"]
    clean = med["fedavg"]["none"]
    drops = [
        (clean - row[col], f"{agg} under {col}")
        for agg, row in med.items()
        if agg not in ("fedavg", "fltrust")
        for col in ("sign_flip", "scale", "gaussian")
    ]
    drop, who = max(drops)
    fl = min(med["fltrust"][c] for c in ("sign_flip", "scale", "gaussian"))
    return drop, (
        f"largest drop {100 * drop:.1f} points ({who}) from FedAvg's clean {clean:.3f}; "
        f"FedAvg under sign flip {med['fedavg']['sign_flip']:.3f}; FLTrust worst {fl:.3f}"
    )


def _flower_round(d: dict[str, Any]) -> tuple[float, str]:
    s = d["results"]["round_seconds"]["privml"]
    text = f"{s['median']:.2f} s ({s['min']:.2f}-{s['max']:.2f})"
    if "flower" in d["results"]["round_seconds"]:
        f = d["results"]["round_seconds"]["flower"]
        text += f"; Flower's own SuperNode {f['median']:.1f} s"
    return s["median"], text


def _demo_acc(d: dict[str, Any]) -> tuple[float, str]:
    r = d["results"]["demo"]
    text = f"{r['privml_acc']:.4f} (scikit-learn centralized {r['sklearn_acc']:.4f})"
    return r["privml_acc"], text


def _splits(d: dict[str, Any]) -> tuple[float, str]:
    worst, parts = 1.0, []
    for key, name in (("demo_splits", "demo"), ("iid_splits", "100 IID sites")):
        diff = d["results"][key]["diff_sk"]
        worst = min(worst, diff[0])
        parts.append(f"{name} {100 * diff[0]:+.2f} +- {100 * diff[1]:.2f} points")
    return worst, "; ".join(parts) + " (federated - centralized, over data seeds)"


def _speedup(key: str, label: str) -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        v, text = _ratio(key)(d)
        return v, f"{text} {label}".rstrip()

    return get


def _query(query: str) -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        r = d["results"][f"{query}_ratio_OpenDP (pre-listed)"]
        return r["median"], f"{r['median']:.1f}x ({r['min']:.1f}-{r['max']:.1f}) faster than OpenDP"

    return get


def _accountant(sigma: str, kind: str, lib: str) -> Getter:
    def get(d: dict[str, Any]) -> tuple[float, str]:
        r = d["results"][f"sigma_{sigma}_ratio_{lib}"]
        eps = d["results"][f"sigma_{sigma}_epsilon"]
        ours = eps[f"privml {kind}" + (" (automatic grid)" if kind == "PLD" else "")]
        return r["median"], (
            f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f}) the speed of {lib}; "
            f"epsilon {ours:.4f} vs {eps[lib]:.4f}"
        )

    return get


TARGETS: list[Target] = [
    # the data layer and simulation at scale
    Target("data", "100,000 sites x 20 rows loaded, checked and encoded <= 15 s", "data_scale",
           _load_100k, at_most=15.0),
    Target("data", "10,000 sites x 2,000 rows: peak memory of the whole run <= 4 GB",
           "data_scale", _memory, at_most=4.0),
    Target("data", "one round of 100,000 sites (logistic, all sites) <= 1.5 s", "sim_scale",
           _round, at_most=1.5),
    # private training
    Target("training", "DP-SGD >= 2x the best Opacus mode, breast cancer MLP 30-64-2, B 64",
           "dpsgd", _dpsgd("mlp"), at_least=2.0),
    Target("training", "DP-SGD >= 1.5x the best Opacus mode, digits CNN, B 64", "dpsgd",
           _dpsgd("cnn"), at_least=1.5),
    Target("training", "one round of 100 sites >= 20x the best Opacus mode site by site",
           "dpsgd", _speedup("round_speedup_vs_best_opacus", ""), at_least=20.0),
    Target("training", "DP-SGD >= 0.5x plain SGD (tensor indexing), MLP", "dpsgd",
           _plain("mlp"), at_least=0.5),
    Target("training", "DP-SGD >= 0.5x plain SGD (tensor indexing), CNN", "dpsgd",
           _plain("cnn"), at_least=0.5),
    Target("training", "demo, sample-level, epsilon 1: test accuracy >= 0.95", "dpsgd_utility",
           _utility("demo, epsilon 1"), at_least=0.95),
    Target("training", "digits, one site, epsilon 1: >= 0.93", "dpsgd_utility",
           _utility("digits, epsilon 1"), at_least=0.93),
    Target("training", "digits, one site, epsilon 3: >= 0.96", "dpsgd_utility",
           _utility("digits, epsilon 3"), at_least=0.96),
    Target("training", "1,000 clients, client-level, epsilon 2: within 3 points of non-private",
           "dpsgd_utility", _client_gap, at_least=-0.03),
    Target("training", "distributed DP under SecAgg+ (m = 90%), 100 sites, epsilon 1: within 2 "
           "points of central DP-FedAvg", "distributed_dp", _ddp_gap, at_most=2.0),
    # federation
    Target("federation", "simulation >= 50x Flower run_simulation on Ray (100 clients x 10 "
           "rounds)", "fl_flower_sim", _speedup("ratio_flower_ray", ""), at_least=50.0),
    Target("federation", "simulation >= 20x Flower run_simulation, in-process backend",
           "fl_flower_sim", _speedup("ratio_flower_inprocess", ""), at_least=20.0),
    Target("federation", "same accuracy as Flower (spread across engines)", "fl_flower_sim",
           _same_accuracy, at_most=1e-9),
    Target("federation", "robust aggregators within 2 points of clean FedAvg under sign flip, "
           "scale, gaussian (all but FLTrust)", "robustness", _robust, at_most=0.02),
    Target("federation", "Flower deployment, demo: <= 3 s per round on localhost",
           "flower_rounds", _flower_round, at_most=3.0),
    Target("federation", "Flower deployment, demo, 3 SuperNodes: SecAgg+ rounds within 2x of "
           "plain rounds", "flower_secagg", _speedup("ratio_secagg_vs_plain", "of plain"),
           at_most=2.0),
    # foundation
    Target("foundation", "demo pooled test accuracy >= 0.95", "fl_speed", _demo_acc,
           at_least=0.95),
    Target("foundation", "federated within 1 point of centralized scikit-learn", "fl_speed",
           _splits, at_least=-0.01),
    Target("foundation", "100 sites x 20 rounds: speed-up over a per-site PyTorch loop",
           "fl_speed", _speedup("iid_ratio_loop_vs_privml", "(same batches, same result)")),
    # differential privacy layer
    Target("dp", "bounded sum, 1,000,000 rows: speed-up over OpenDP", "dp_queries",
           _query("sum")),
    Target("dp", "bounded mean, 1,000,000 rows: speed-up over OpenDP", "dp_queries",
           _query("mean")),
    Target("dp", "PLD accountant, 10,000 steps, sigma 1.1", "dp_accounting",
           _accountant("1.1", "PLD", "dp-accounting PLD (grid 1e-4)")),
    Target("dp", "RDP accountant, 10,000 steps, sigma 1.1", "dp_accounting",
           _accountant("1.1", "RDP", "dp-accounting RDP")),
]  # fmt: skip

AREAS = {
    "data": "Data layer and simulation at scale",
    "training": "Private training",
    "federation": "Federation engine",
    "foundation": "Foundation",
    "dp": "Differential privacy layer",
}


def _run_of(data: dict[str, Any]) -> str:
    load = (data.get("load_before") or ["?"])[0]
    quick = ", quick" if data.get("quick") else ""
    return f"{data.get('started', '?')[:16].replace('T', ' ')} UTC, load {load}{quick}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=None, help="default RESULTS/targets.json")
    args = ap.parse_args(argv)
    bench = Bench("targets", out=args.out or args.results / "targets.json")
    bench.record("collected", True)
    cache: dict[str, dict[str, Any] | None] = {}
    for area, title in AREAS.items():
        rows = []
        for t in (t for t in TARGETS if t.area == area):
            if t.source not in cache:
                p = args.results / f"{t.source}.json"
                cache[t.source] = json.loads(p.read_text()) if p.is_file() else None
            data = cache[t.source]
            if data is None:
                rows.append([t.what, "not measured (no results)", "-", f"`bench_{t.source}.py`"])
                continue
            try:
                value, text = t.get(data)
            except (KeyError, StopIteration, TypeError, ValueError) as exc:
                rows.append([t.what, f"not measured ({type(exc).__name__}: {exc})", "-",
                             f"`bench_{t.source}.py`"])  # fmt: skip
                continue
            has_threshold = t.at_least is not None or t.at_most is not None
            status = t.status(value) if has_threshold else "-"
            bench.record(t.what, {"value": value, "status": status, "source": t.source})
            rows.append([t.what, text, status, f"`bench_{t.source}.py`, {_run_of(data)}"])
        bench.table(
            area,
            ["target", "measured", "status", "benchmark and run"],
            rows,
            caption=f"{title}: each figure read from its benchmark's JSON results.",
        )
    runs_table(bench, args.results)
    out = bench.out
    assert out is not None
    if out.is_file() and json.loads(out.read_text()).get("tables") == bench.tables:
        print(f"{out}: unchanged")  # kept as is: its date stays the date of the figures
        return 0
    bench.write()
    return 0


def stale(results: Path = RESULTS_DIR) -> bool:
    """Whether ``results/targets.json`` differs from what the other results give now (False
    when there is no targets.json: its tables are then missing wherever the docs use them)."""
    import tempfile

    committed = results / "targets.json"
    if not committed.is_file():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "targets.json"
        main(["--results", str(results), "--out", str(fresh)])
        return bool(
            json.loads(fresh.read_text())["tables"] != json.loads(committed.read_text())["tables"]
        )


def runs_table(bench: Bench, results: Path) -> None:
    """What each committed result cost: its command, when it ran, how long, at what load."""
    rows, total = [], 0.0
    for p in sorted(results.glob("*.json")):
        if p.stem == "targets":
            continue
        data = json.loads(p.read_text())
        try:
            secs = (
                datetime.fromisoformat(data["finished"]) - datetime.fromisoformat(data["started"])
            ).total_seconds()
        except (KeyError, ValueError):
            continue
        total += secs
        load = (data.get("load_before") or ["?"])[0], (data.get("load_after") or ["?"])[0]
        rows.append([f"`{data.get('command', p.stem)}`", _run_of(data).split(",")[0],
                     f"{secs / 60:.1f} min", f"{load[0]} -> {load[1]}"])  # fmt: skip
    rows.append(["all of the above, one after another", "-", f"{total / 60:.0f} min", "-"])
    bench.record("run_minutes_total", total / 60)
    bench.table(
        "runs",
        ["command (in benchmarks/)", "started", "wall time", "load average before -> after"],
        rows,
        caption=(
            "The run behind each results file: its command and repetitions as committed, when it "
            "started and how long it took (the wall time grows with the machine's load)."
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main())
