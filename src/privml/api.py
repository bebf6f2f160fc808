"""The Python API: run a study and read its results as typed objects and pandas tables.

    import privml

    result = privml.run("study.toml")          # or a dict shaped like the TOML, or a Config
    result.metrics.pooled.balanced_accuracy
    result.to_frame()                          # one row per site, and "pooled"
    result.to_frame("rounds")                  # one row per round and site (learning curves)
    again = privml.load_run(result.out_dir)    # the same, from the run folder's results.json

:func:`run` is the code path of ``privml run`` (same results, same run folder, same report).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd

    from privml.config import Config

__all__ = ["Metrics", "RoundMetrics", "RunResult", "SiteInfo", "load_run", "run"]


@dataclass(frozen=True)
class Metrics:
    """Test metrics of the final model on one set of held-out records (None: not defined)."""

    n: int
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    auc: float | None = None
    f1: float | None = None
    loss: float | None = None
    prevalence: float | None = None
    majority_baseline: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        return cls(**{f.name: d.get(f.name) for f in fields(cls) if f.name != "n"},
                   n=int(d.get("n") or 0))  # fmt: skip


@dataclass(frozen=True)
class SiteInfo:
    name: str
    n_train: int
    n_test: int


@dataclass(frozen=True)
class RoundMetrics:
    """One round: the pooled test metrics and each site's own (``per_site``, may be empty)."""

    round: int
    loss: float | None
    accuracy: float | None
    auc: float | None
    per_site: dict[str, dict[str, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class FinalMetrics:
    pooled: Metrics
    per_site: dict[str, Metrics]


@dataclass(frozen=True)
class RunResult:
    """What a run produced, typed; ``results`` is the whole results.json mapping (every
    section, docs/results.md), ``out_dir`` the run folder (None when nothing was written)."""

    name: str
    task: dict[str, Any]
    sites: list[SiteInfo]
    metrics: FinalMetrics
    rounds: list[RoundMetrics]
    privacy: dict[str, Any]
    results: dict[str, Any]
    out_dir: Path | None = None

    @classmethod
    def from_results(cls, results: Mapping[str, Any], out_dir: Path | None = None) -> RunResult:
        m = results.get("metrics") or {}
        return cls(
            name=str(results.get("name")),
            task=dict(results.get("task") or {}),
            sites=[SiteInfo(s["name"], int(s["n_train"]), int(s["n_test"]))
                   for s in results.get("sites", [])],  # fmt: skip
            metrics=FinalMetrics(
                Metrics.from_dict(m),
                {k: Metrics.from_dict(v) for k, v in (m.get("per_site") or {}).items()},
            ),
            rounds=[
                RoundMetrics(int(r["round"]), r.get("loss"), r.get("accuracy"), r.get("auc"),
                             dict(r.get("per_site") or {}))  # fmt: skip
                for r in results.get("rounds", [])
            ],
            privacy=dict(results.get("privacy") or {}),
            results=dict(results),
            out_dir=out_dir,
        )

    def to_frame(self, table: Literal["sites", "rounds"] = "sites") -> pd.DataFrame:
        """A pandas table.

        ``"sites"``: one row per site and a last row ``"pooled"`` (index ``site``), columns
        ``n_train``, ``n_test`` and every :class:`Metrics` field. ``"rounds"``: one row per round
        and site, ``site`` ``"pooled"`` for the pooled records, columns ``round``, ``site``,
        ``loss``, ``accuracy``, ``auc`` (long form, ready for ``pivot`` or plotting).
        """
        import pandas as pd

        if table == "sites":
            rows = []
            for s in self.sites:
                m = self.metrics.per_site.get(s.name, Metrics(n=0))
                rows.append({"site": s.name, "n_train": s.n_train, "n_test": s.n_test,
                             **m.__dict__})  # fmt: skip
            rows.append({"site": "pooled", "n_train": sum(s.n_train for s in self.sites),
                         "n_test": sum(s.n_test for s in self.sites),
                         **self.metrics.pooled.__dict__})  # fmt: skip
            return pd.DataFrame(rows).set_index("site")
        if table == "rounds":
            rows = []
            for r in self.rounds:
                rows.append({"round": r.round, "site": "pooled", "loss": r.loss,
                             "accuracy": r.accuracy, "auc": r.auc})  # fmt: skip
                for site, v in r.per_site.items():
                    rows.append({"round": r.round, "site": site, "loss": v.get("loss"),
                                 "accuracy": v.get("accuracy"), "auc": v.get("auc")})  # fmt: skip
            return pd.DataFrame(rows, columns=["round", "site", "loss", "accuracy", "auc"])
        from privml.errors import UsageError

        raise UsageError(f"to_frame() takes 'sites' or 'rounds'. Got {table!r}.")


def run(
    config: str | Path | Mapping[str, Any] | Config | None = None,
    *,
    out_dir: str | Path | None = None,
    write: bool = True,
    overrides: Sequence[str] = (),
    on_round: Callable[[Any], None] | None = None,
) -> RunResult:
    """Run a study as ``privml run`` does and return its results.

    Args:
        config: a TOML file's path, a mapping shaped like the TOML file (relative paths are
            taken from the current folder), a :class:`~privml.config.Config`, or None for the
            embedded demo.
        out_dir: the run folder (default ``[output] dir`` or ``runs/<name>-<time>``).
        write: False keeps everything in memory (no run folder, no report).
        overrides: ``"section.key=value"`` strings, as ``privml run --set`` takes them.
        on_round: called with each round's record as training goes.

    Raises:
        ConfigError, DataError, UsageError: bad config, data or arguments (nothing written).
        BudgetExceededError: the privacy spend does not fit the ledger's budget.
        MissingExtraError: the config needs an optional extra that is not installed.
    """
    from privml.config import load_config
    from privml.pipeline import run as run_pipeline

    cfg = load_config(config, overrides=overrides)
    out = run_pipeline(cfg, out_dir=Path(out_dir) if out_dir is not None else None, write=write,
                       on_round=on_round)  # fmt: skip
    return RunResult.from_results(out.results, out.out_dir)


def load_run(run_dir: str | Path) -> RunResult:
    """The results of a finished run, read from ``run_dir/results.json``.

    Raises:
        UsageError: no results.json there, or not one privml wrote.
    """
    from privml.report import read_results

    return RunResult.from_results(read_results(run_dir), Path(run_dir))
