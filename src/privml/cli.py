"""The ``privml`` command line.

Exit codes: 0 success; 2 usage, configuration or data error; 3 privacy budget refused;
4 signature verification failed; 1 any other failure. Errors are one clear message on stderr,
never a traceback (set PRIVML_DEBUG=1 to see one).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from privml.errors import PrivmlError

app = typer.Typer(
    name="privml",
    help="Federated, differentially private, encrypted machine learning on multi-site data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schema_app = typer.Typer(help="Public schemas: infer a draft for review.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")

err = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: the embedded demo)", dir_okay=False),
]


def _load(config: Path | None):
    from privml.config import load_config

    return load_config(config)


@app.command()
def run(
    config: ConfigOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run folder (default runs/<name>-<time>)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results.json to stdout")] = False,
) -> None:
    """Train across the configured sites and write results.json, the model and a report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from privml.pipeline import run as run_pipeline

    cfg = _load(config)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        transient=as_json,
        disable=as_json,
    )
    with progress:
        task = progress.add_task("rounds", total=cfg.training.rounds, info="")

        def on_round(rec: Any) -> None:
            info = f"acc {rec.accuracy:.3f}" if rec.accuracy is not None else ""
            progress.update(task, advance=1, info=info)

        def on_stage(msg: str) -> None:
            if not as_json:
                progress.console.print(f"[dim]{msg}[/dim]")

        output = run_pipeline(cfg, out_dir=out_dir, on_round=on_round, on_stage=on_stage)
    res = output.results
    if as_json:
        sys.stdout.write(json.dumps(res, indent=2, default=str) + "\n")
        return
    _summary(res, output.out_dir)


def _summary(res: dict[str, Any], folder: Path | None) -> None:
    m = res["metrics"]
    t = Table(title=f"privml run: {res['name']}", show_lines=False)
    for col in ("site", "train", "test", "accuracy", "auc"):
        t.add_column(col, justify="right" if col != "site" else "left")
    for s in res["sites"][:20]:
        ps = m["per_site"].get(s["name"], {})
        t.add_row(
            s["name"],
            str(s["n_train"]),
            str(s["n_test"]),
            _f(ps.get("accuracy")),
            _f(ps.get("auc")),
        )
    if len(res["sites"]) > 20:
        t.add_row(f"... {len(res['sites']) - 20} more", "", "", "", "")
    t.add_row(
        "[bold]pooled",
        str(sum(s["n_train"] for s in res["sites"])),
        str(m["n"]),
        f"[bold]{_f(m['accuracy'])}",
        f"[bold]{_f(m['auc'])}",
    )
    out.print(t)
    priv = res.get("privacy", {})
    if priv.get("mode", "none") == "none":
        out.print("privacy: none (non-private training)")
    else:
        out.print(
            f"privacy: {priv['mode']}-level DP, epsilon {_f(priv.get('epsilon'))}, "
            f"delta {priv.get('delta')}"
        )
    for section, key in (("encrypted_inference", "agreement"), ("audit", None)):
        if section in res and key:
            out.print(f"{section.replace('_', ' ')}: {key} {_f(res[section].get(key))}")
    if folder is not None:
        out.print(f"results: {folder}/results.json")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


@schema_app.command("infer")
def schema_infer(
    files: Annotated[list[Path], typer.Argument(help="site files (CSV or Parquet)")],
    target: Annotated[str | None, typer.Option(help="label column to leave out")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="columns to leave out")] = None,
) -> None:
    """Write a draft schema (TOML) inferred from FILES, for a person to review."""
    from privml.data.loading import read_site_file
    from privml.data.schema import infer_schema, schema_to_toml

    frames = {str(f): read_site_file(f, site=f.stem) for f in files}
    schema, skipped = infer_schema(frames, target=target, exclude=tuple(exclude or ()))
    header = (
        "Schema inferred by `privml schema infer` FROM PRIVATE DATA.\n"
        "Review every bound and category: bounds below are the data's own extremes (rounded\n"
        "out) and reveal them. Replace them with public knowledge (e.g. age 0..120) and set\n"
        "derived_from_data = false only for what you have reviewed."
    )
    if skipped:
        header += f"\nLeft out (look like identifiers; list them in data.exclude): {skipped}"
    sys.stdout.write(schema_to_toml(schema, header=header))
    err.print(
        f"[yellow]warning:[/yellow] schema of {len(schema)} columns inferred from private "
        "data; review it before use"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    err.print(f"[yellow]warning ({category.__name__}):[/yellow] {message}", highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``privml`` console script."""
    debug = bool(os.environ.get("PRIVML_DEBUG"))
    command = typer.main.get_command(app)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            command.main(args=argv, prog_name="privml", standalone_mode=False)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            err.print("interrupted")
            sys.exit(130)
        except PrivmlError as exc:
            if debug:
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if debug:
                raise
            print(
                f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr
            )
            sys.exit(2)


if __name__ == "__main__":
    main()
