"""``privml sweep``: train at several epsilons and draw the privacy-utility curve.

Each point is a full private run of the config (:func:`privml.fl.training.train`,
the code ``privml run`` uses) with ``[privacy] epsilon`` set to the point's target and the
noise calibrated to it. Writes ``sweep.json`` (every point's target and reached epsilon,
accuracy, AUC, noise multiplier), ``sweep.png`` (accuracy and balanced accuracy against
epsilon, log scale) and ``report.html`` (the curve and the table of points in one
self-contained page).

Every run is real and books its spend in the ledger: the sweep costs the *sum* of its runs'
epsilons (and one delta per run) for every site, under the ledger's basic composition. The
whole sweep's spend is checked before the first run; if it does not fit, nothing is trained
and nothing is spent (:class:`~privml.errors.BudgetExceededError`, exit code 3), and the
message names the budget the sweep needs. The default epsilons (:data:`DEFAULT_EPSILONS`,
7.75 in all) fit a fresh ledger's default budget (10 per site). The test accuracies are
computed on the sites' held-out records without DP, as in ``privml run``, and listed in
``sweep.json``'s ``not_accounted``.

The non-private reference line is opt-in (``nonprivate_baseline=True``, ``privml sweep
--nonprivate-baseline``): a model trained on the records without DP is a release no budget
pays for, so it is listed in ``not_accounted`` when asked for, and absent otherwise.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from privml.config import Config, parse_config
from privml.data.federation import load_federation
from privml.errors import BudgetExceededError, UsageError

__all__ = ["SweepPoint", "SweepResult", "parse_epsilons", "run_sweep"]

SWEEP_SCHEMA = "privml-sweep/1"

#: ``privml sweep``'s default targets: 7.75 in all, within a fresh ledger's default budget.
DEFAULT_EPSILONS = "0.25,0.5,1,2,4"

_TEST_METRICS = (
    "test metrics: each point's accuracy and AUC, computed on the sites' held-out records "
    "without DP"
)
_BASELINE = (
    "non-private baseline: a model trained on the same records without DP (its accuracy and "
    "AUC); asked for with --nonprivate-baseline"
)


def parse_epsilons(text: str | Sequence[float]) -> list[float]:
    """Parses ``"0.5,1,2"`` (or a sequence) into sorted, distinct epsilons > 0.

    Raises:
        UsageError: an empty list, a value that is not a number, or one that is not > 0 and
            finite.
    """
    items: list[Any] = (
        [t.strip() for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    )
    if not items:
        raise UsageError(f"The '--epsilons' option needs at least one value. Got {text!r}.")
    values = []
    bad = []
    for item in items:
        try:
            v = float(item)
        except (TypeError, ValueError):
            bad.append(item)
            continue
        if not (v > 0 and math.isfinite(v)):
            bad.append(item)
        else:
            values.append(v)
    if bad:
        raise UsageError(
            f"The '--epsilons' option must be comma-separated numbers > 0, e.g. 0.5,1,2,4,8. "
            f"Got {', '.join(map(repr, bad))} in {text!r}."
        )
    return sorted(set(values))


@dataclass(frozen=True)
class SweepPoint:
    """One private run of the sweep (``epsilon``: the largest over the sites)."""

    epsilon_target: float
    epsilon: float
    epsilon_per_site: dict[str, float]
    accuracy: float | None
    auc: float | None
    noise_multiplier: float
    seconds: float
    balanced_accuracy: float | None = None
    f1: float | None = None
    majority_baseline: float | None = None


@dataclass(frozen=True)
class SweepResult:
    """The curve, the non-private reference and where they were written."""

    points: list[SweepPoint]
    nonprivate: dict[str, Any] | None
    mode: str
    delta: float
    accountant: str
    json_path: Path
    png_path: Path
    not_accounted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SWEEP_SCHEMA,
            "mode": self.mode,
            "delta": self.delta,
            "accountant": self.accountant,
            "relation": "replace_one",
            "points": [asdict(p) for p in self.points],
            "nonprivate": self.nonprivate,
            "not_accounted": list(self.not_accounted),
        }


def _variant(config: Config, **privacy: Any) -> Config:
    raw = config.resolved()
    raw["privacy"] = {**raw["privacy"], **privacy}
    cfg = parse_config(raw, name=config.name, source=config.source)
    return cfg


def _precheck(
    config: Config,
    site_names: Sequence[str],
    epsilons: Sequence[float],
    fingerprints: dict[str, str] | None = None,
    records: dict[str, Any] | None = None,
) -> None:
    from privml.dp.cli import ledger_from_config

    ledger = ledger_from_config(config, fingerprints=fingerprints, records=records)
    total = math.fsum(epsilons)
    delta = config.privacy.delta * len(epsilons)
    refused = []
    need_eps, need_delta = 0.0, 0.0
    for site in site_names:
        try:
            ledger.check(site=site, epsilon=total, delta=delta)
        except BudgetExceededError as exc:
            refused.append(str(exc))
            spent = ledger.spent(site)
            need_eps = max(need_eps, spent.epsilon + total)
            need_delta = max(need_delta, spent.delta + delta)
    if refused:
        b = ledger.budget
        raise BudgetExceededError(
            f"the sweep needs epsilon {total:g} and delta {delta:g} per site ({len(epsilons)} "
            f"runs); {len(refused)} site(s) cannot afford it, so nothing was trained or spent. "
            f"It fits a ledger budget of epsilon >= {max(need_eps, b.epsilon):.6g} and delta >= "
            f"{max(need_delta, b.delta):.6g} per record (now {b.epsilon:g} and {b.delta:g}; "
            f"`privml budget set --epsilon {max(need_eps, b.epsilon):.6g} --delta "
            f"{max(need_delta, b.delta):.6g}` changes it, recorded in the ledger's history), or "
            "fewer or smaller epsilons:\n  - " + "\n  - ".join(refused)
        )


def _plot(result: SweepResult) -> bytes:
    """The privacy-utility curve as PNG bytes: accuracy and balanced accuracy against epsilon
    (log scale, one labelled tick per point, labels thinned where they would overlap), the
    non-private model and the majority baseline as reference lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = sorted(result.points, key=lambda p: p.epsilon)
    xs = [p.epsilon for p in pts]

    def ys(key: str) -> list[float]:
        return [math.nan if getattr(p, key) is None else float(getattr(p, key)) for p in pts]

    ref = result.nonprivate or {}
    lines = (("accuracy", "accuracy", "tab:blue"),
             ("balanced_accuracy", "balanced accuracy", "tab:orange"))  # fmt: skip
    for key, label, color in lines:
        ax.plot(xs, ys(key), marker="o", color=color, label=f"{label}, {result.mode}-level DP")
        if ref.get(key) is not None:
            ax.axhline(ref[key], ls="--", lw=1, color=color,
                       label=f"{label}, non-private ({ref[key]:.3f})")  # fmt: skip
    base = ref.get("majority_baseline")
    if base is None and pts:
        base = pts[0].majority_baseline  # the same test records at every point
    if base is not None:
        ax.axhline(base, ls=":", lw=1.2, color="black", label=f"majority baseline ({base:.3f})")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())  # log-axis minor labels were what overlapped
    ax.xaxis.set_minor_formatter(NullFormatter())
    shown: list[float] = []
    for x in xs:  # one label per point, skipping any within 35 % of the previous one
        if not shown or x / shown[-1] >= 1.35:
            shown.append(x)
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.set_xticklabels([f"{x:.3g}" for x in shown])
    ax.set_xlabel("epsilon reached (per site)" if result.mode == "sample"
                  else "epsilon reached (per client)")  # fmt: skip
    ax.set_ylabel("on the held-out records")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"privacy-utility curve (delta {result.delta:g})", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def run_sweep(
    config: Config,
    *,
    epsilons: Sequence[float] | str,
    out_dir: Path | None = None,
    mode: str | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
    force: bool = False,
    nonprivate_baseline: bool = False,
) -> SweepResult:
    """Trains ``config`` at every epsilon of ``epsilons``; writes the curve.

    Args:
        config: the run config; its ``[privacy]`` settings are kept except ``epsilon`` (set
            per point) and ``noise_multiplier`` (removed: the noise is calibrated).
        epsilons: target epsilons (per site for sample level, per client for client level).
        out_dir: folder for ``sweep.json`` and ``sweep.png`` (default
            ``runs/<name>-sweep-<time>``).
        mode: ``"sample"`` or ``"client"``; default the config's mode, or ``"sample"`` when
            the config is non-private.
        on_point: called after each point.
        force: replace an existing ``out_dir`` that privml wrote
            (:func:`privml.artifacts.check_output_folder`); otherwise it must not exist.
        nonprivate_baseline: also train without DP as a reference line (a release no budget
            pays for; listed in ``not_accounted``).

    Raises:
        BudgetExceededError: the whole sweep does not fit a site's remaining budget (checked
            before any training; nothing spent).
        UsageError: bad epsilons or mode.
    """
    from privml.fl.engine import simulate
    from privml.fl.training import train
    from privml.pipeline import model_spec

    eps_list = parse_epsilons(epsilons if isinstance(epsilons, str) else list(epsilons))
    mode = mode or (config.privacy.mode if config.privacy.mode != "none" else "sample")
    if mode not in ("sample", "client"):
        raise UsageError(
            f"The 'mode' parameter of run_sweep must be 'sample' or 'client'. Got {mode!r}."
        )
    if out_dir is None:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
        out_dir = Path("runs") / f"{config.name}-sweep-{stamp}"
    out = Path(out_dir)
    from privml.artifacts import atomic_folder, check_output_folder, write_json
    from privml.pipeline import protected_paths

    check_output_folder(out, force=force, protected=protected_paths(config))
    configs = [_variant(config, mode=mode, epsilon=e, noise_multiplier=None) for e in eps_list]
    from privml.dp.cli import open_ledger

    open_ledger(configs[0])  # a config asking for another budget stops before anything runs
    fed = load_federation(configs[0])
    spec = model_spec(config, fed)
    from privml.dp.planning import check_dp_schema

    check_dp_schema(configs[0], fed)
    _precheck(
        configs[0], [s.name for s in fed.sites], eps_list, fed.fingerprints or None,
        fed.record_hashes or None,
    )  # fmt: skip

    not_accounted = [_TEST_METRICS]
    nonprivate: dict[str, Any] | None = None
    if nonprivate_baseline:
        reference = _variant(config, mode="none", epsilon=None, noise_multiplier=None)
        t0 = time.perf_counter()
        if reference.model.features != "none":
            ref_result = train(reference, fed, spec).result
        else:
            ref_result = simulate(fed, spec, reference.training)
        nonprivate = {
            "accuracy": ref_result.metrics["accuracy"],
            "auc": ref_result.metrics["auc"],
            "balanced_accuracy": ref_result.metrics.get("balanced_accuracy"),
            "f1": ref_result.metrics.get("f1"),
            "majority_baseline": ref_result.metrics.get("majority_baseline"),
            "seconds": time.perf_counter() - t0,
        }
        not_accounted.append(_BASELINE)
    points: list[SweepPoint] = []
    for eps, cfg in zip(eps_list, configs, strict=True):
        t0 = time.perf_counter()
        run = train(cfg, fed, spec)
        m = run.result.metrics
        point = SweepPoint(
            epsilon_target=eps,
            epsilon=float(run.privacy["epsilon"]),
            epsilon_per_site=dict(run.privacy["epsilon_per_site"]),
            accuracy=m["accuracy"],
            auc=m["auc"],
            noise_multiplier=float(run.privacy["noise_multiplier"]),
            seconds=time.perf_counter() - t0,
            balanced_accuracy=m.get("balanced_accuracy"),
            f1=m.get("f1"),
            majority_baseline=m.get("majority_baseline"),
        )
        points.append(point)
        if on_point is not None:
            on_point(point)
    result = SweepResult(
        points,
        nonprivate,
        mode,
        config.privacy.delta,
        config.privacy.accountant,
        out / "sweep.json",
        out / "sweep.png",
        not_accounted,
    )

    def fill(tmp: Path) -> None:
        from privml.report.sweep import render_sweep_report

        write_json(tmp / result.json_path.name, result.to_dict())
        png = _plot(result)
        (tmp / result.png_path.name).write_bytes(png)
        (tmp / "report.html").write_text(render_sweep_report(result.to_dict(), png))

    atomic_folder(out, fill, force=force)
    return result
