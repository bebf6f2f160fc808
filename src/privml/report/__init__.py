"""The run report: one self-contained HTML file (plots inline) built from results.json."""

from __future__ import annotations

from pathlib import Path

from privml.errors import UsageError
from privml.report.html import render_report

__all__ = ["read_results", "render_report", "write_report"]


#: Largest results.json read (a run of 100,000 rounds and sites is well below it).
MAX_RESULTS_BYTES = 512 * 1024**2


def read_results(run_dir: str | Path) -> dict:
    """The parsed ``results.json`` of a run folder (strict JSON)."""
    folder = Path(run_dir)
    path = folder / "results.json" if folder.is_dir() else folder
    if not path.is_file():
        raise UsageError(
            f"{str(path)!r} not found; pass a run folder written by `privml run` "
            "(it holds results.json)"
        )
    from privml.safe_io import read_json_bounded

    data = read_json_bounded(
        path, max_bytes=MAX_RESULTS_BYTES, what="results file",
        error=lambda m: UsageError(f"{m}; rerun `privml run`"),
    )  # fmt: skip
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("privml-results/"):
        raise UsageError(f"{str(path)!r} is not a privml results.json (no 'schema' key)")
    return data


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Render ``run_dir/results.json`` to ``output`` (default ``run_dir/report.html``),
    written to a temporary name and renamed into place."""
    results = read_results(run_dir)
    target = Path(output) if output is not None else Path(run_dir) / "report.html"
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        html = render_report(results)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        raise UsageError(
            f"{str(run_dir)!r}: its results.json is not one this privml version writes "
            f"({type(exc).__name__}: {exc}); rerun `privml run`"
        ) from None
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(target)
    return target
