"""The ``privml`` command line.

Exit codes: 0 success; 2 usage, configuration or data error; 3 privacy budget refused;
4 signature verification failed; 5 a privacy audit measured more leakage than the
accountant allows; 1 any other failure. Errors are one clear message on stderr,
never a traceback (set PRIVML_DEBUG=1 to see one).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.table import Table

from privml.console import PlainWhenPiped
from privml.errors import PrivmlError, UsageError

app = typer.Typer(
    name="privml",
    help="Federated, differentially private, encrypted machine learning on multi-site data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from privml import __version__

        sys.stdout.write(f"privml {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", help="print privml's version and exit",
                     callback=_version, is_eager=True),  # fmt: skip
    ] = False,
) -> None:
    """Federated, differentially private, encrypted machine learning on multi-site data."""
schema_app = typer.Typer(help="Public schemas: infer a draft for review.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")

err = PlainWhenPiped(stderr=True)
out = PlainWhenPiped()

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config (default: the embedded demo)", dir_okay=False),
]


SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="override one config value, e.g. --set training.rounds=5 (repeatable; TOML "
        "values; recorded in results.json)",
        metavar="SECTION.KEY=VALUE",
    ),
]


def _load(config: Path | None, sets: list[str] | None = None):
    from privml.config import load_config

    return load_config(config, overrides=sets or ())


@app.command()
def run(
    config: ConfigOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run folder (default runs/<name>-<time>)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results.json to stdout")] = False,
    engine: Annotated[
        str | None,
        typer.Option(
            "--engine",
            help="simulation (in-process, default) or flower (a running SuperLink and "
            "SuperNodes; see `privml flower --help` and docs/flower.md)",
        ),
    ] = None,
    superlink: Annotated[
        str, typer.Option(help="--engine flower: the SuperLink's address")
    ] = "127.0.0.1:9093",
    root_certificates: Annotated[
        Path | None, typer.Option(help="--engine flower: CA certificate of the SuperLink")
    ] = None,
    superexec_secret: Annotated[
        Path | None, typer.Option(help="--engine flower: the SuperExec secret file")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="--engine flower: no TLS (local tests only)")
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="continue an interrupted run (its run folder or .partial folder) from its "
            "last checkpoint; its own config is used unless --config is given",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="replace an existing --out folder (only one privml wrote; never other files)",
        ),
    ] = False,
    sets: SetOpt = None,
) -> None:
    """Train across the configured sites and write results.json, the model and a report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from privml.pipeline import run as run_pipeline

    if engine not in (None, "simulation", "flower"):
        raise UsageError(f"--engine must be 'simulation' or 'flower'. Got {engine!r} instead.")
    if engine is None and config is None and resume is not None and not sets:
        from privml.fl.checkpoint import locate_partial_run, read_run_config

        engine = read_run_config(locate_partial_run(resume)[1]).training.engine
    if engine == "flower" or (engine is None and _load(config, sets).training.engine == "flower"):
        if sets:
            raise UsageError(
                "--set is not supported with the Flower engine (the sites read the same config "
                "file): edit the config file instead"
            )
        from privml.fl.compat import check_combination

        if resume is None or config is not None:
            check_combination(_load(config), engine="flower", resume=resume is not None)
        from privml.fl.flower.cli import flower_run

        flower_run(
            config, superlink=superlink, root_certificates=root_certificates,
            superexec_secret=superexec_secret, insecure=insecure, out_dir=out_dir,
            as_json=as_json, force=force, resume=resume,
        )
        return
    if resume is not None and config is None:
        from privml.fl.checkpoint import locate_partial_run, read_run_config

        if sets:
            raise UsageError("--set cannot change an interrupted run's config; drop --set")
        cfg = read_run_config(locate_partial_run(resume)[1])
    else:
        cfg = _load(config, sets)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
        transient=as_json,
        disable=as_json,
    )
    # the bar starts at the first round, so an error while loading shows no empty bar
    with contextlib.ExitStack() as bar_stack:
        bar: list[Any] = []

        def on_round(rec: Any) -> None:
            if not bar:
                bar_stack.enter_context(progress)
                bar.append(progress.add_task("rounds", total=cfg.training.rounds, info=""))
            info = f"acc {rec.accuracy:.3f}" if rec.accuracy is not None else ""
            progress.update(bar[0], completed=rec.round, info=info)

        def on_stage(msg: str) -> None:
            if not as_json:
                progress.console.print(f"[dim]{msg}[/dim]")

        output = run_pipeline(
            cfg, out_dir=out_dir, on_round=on_round, on_stage=on_stage, resume=resume,
            force=force,
        )
    res = output.results
    if as_json:
        from privml.artifacts import dumps_json

        sys.stdout.write(dumps_json(res) + "\n")
        degraded_warning(res)
        return
    _summary(res, output.out_dir)


def _summary(res: dict[str, Any], folder: Path | None) -> None:
    from privml.baselines import baseline_warning

    m = res["metrics"]
    classes = res.get("task", {}).get("classes")
    binary = res.get("task", {}).get("kind") == "binary"
    t = Table(title=f"privml run: {res['name']}", show_lines=False)
    cols = ["site", "train", "test"]
    cols += ["positive" if binary else "", "majority", "accuracy", "bal. acc", "F1", "AUC"]
    cols = [c for c in cols if c]
    for col in cols:
        t.add_column(col, justify="right" if col != "site" else "left")

    def cells(x: dict[str, Any]) -> list[str]:
        row = [_f(x.get("prevalence"))] if binary else []
        return row + [_f(x.get(k)) for k in ("majority_baseline", "accuracy",
                                              "balanced_accuracy", "f1", "auc")]  # fmt: skip

    part = res.get("participation") or {}
    cover = part.get("metrics_cover") or {}
    unevaluated = set(cover.get("not_evaluated") or ())
    for s in res["sites"][:20]:
        ps = m["per_site"].get(s["name"], {})
        test = str(s["n_test"]) + (" (not evaluated)" if s["name"] in unevaluated else "")
        t.add_row(s["name"], str(s["n_train"]), test, *cells(ps))
    if len(res["sites"]) > 20:
        t.add_row(f"... {len(res['sites']) - 20} more", *[""] * (len(cols) - 1))
    pooled_n = str(m["n"])
    if cover and cover.get("n", m["n"]) < cover.get("of", 0):
        pooled_n = f"{cover['n']} of {cover['of']}"
    t.add_row(
        "[bold]pooled", str(sum(s["n_train"] for s in res["sites"])), pooled_n,
        *(f"[bold]{c}" for c in cells(m)),
    )  # fmt: skip
    out.print(t)
    out.print(
        "majority = accuracy of predicting the most frequent class for everyone; "
        "bal. acc = mean recall over the classes (chance: "
        f"{1 / max(2, len(classes or [0, 0])):.2f})",
        style="dim", highlight=False,
    )  # fmt: skip
    warning = baseline_warning(m, classes)
    if warning:
        err.print(f"[bold yellow]warning:[/bold yellow] {warning}", highlight=False)
    priv = res.get("privacy", {})
    if priv.get("mode", "none") == "none":
        out.print("privacy: none (non-private training)")
    else:
        out.print(
            f"privacy: {priv['mode']}-level DP, epsilon {_f(priv.get('epsilon'))}, "
            f"delta {priv.get('delta')}"
        )
        if priv.get("reproducible_noise"):
            out.print(
                "[bold red]WARNING: reproducible noise (PRIVML_INSECURE_REPRODUCIBLE_NOISE): "
                "the noise can be regenerated from the seed; this epsilon does not hold[/]"
            )
    if res.get("audit", {}).get("summary"):
        out.print(f"audit: {res['audit']['summary']}", highlight=False)
    for section, key in (("encrypted_inference", "agreement"), ("audit", None)):
        if section in res and key:
            out.print(f"{section.replace('_', ' ')}: {key} {_f(res[section].get(key))}")
    missed = part.get("missed") or {}
    if missed:
        rounds = len(res.get("rounds") or [])
        parts = [
            f"{name} {len({r for rs in causes.values() for r in rs})}/{rounds}"
            for name, causes in list(missed.items())[:10]
        ]
        more = f", ... {len(missed) - 10} more" if len(missed) > 10 else ""
        out.print(
            f"rounds missed (of {rounds}; which and why: results.json participation): "
            + ", ".join(parts) + more, highlight=False,
        )  # fmt: skip
    if folder is not None:
        # never wrapped, so the path can be copied or grepped whatever the terminal width
        out.print(f"results: {folder}/results.json", soft_wrap=True, markup=False, highlight=False)
        if (Path(folder) / "report.html").is_file():
            out.print(f"report:  {folder}/report.html", soft_wrap=True, markup=False,
                      highlight=False)  # fmt: skip
    degraded_warning(res)


def degraded_warning(res: dict[str, Any]) -> None:
    """A degraded run (a site missed rounds it was not simulated to miss, or the metrics do
    not cover every test record) ends with a warning on stderr; the exit code stays 0."""
    part = res.get("participation") or {}
    if part.get("degraded"):
        for w in part.get("warnings") or ():
            err.print(f"[bold yellow]warning (degraded run):[/bold yellow] {w}", highlight=False)


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


@app.command()
def report(
    run_dir: Annotated[
        Path, typer.Argument(help="a run folder (holds results.json)", file_okay=False)
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="the HTML file (default RUN_DIR/report.html)"),
    ] = None,
) -> None:
    """Rebuild RUN_DIR/report.html from RUN_DIR/results.json."""
    from privml.report import write_report

    path = write_report(run_dir, output)
    out.print(f"report: {path}", soft_wrap=True, markup=False, highlight=False)


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
        "Review every bound, category and impute value: bounds below are the data's own\n"
        "extremes (rounded out) and impute values its medians; both reveal the data. Replace\n"
        "them with public knowledge (e.g. age 0..120; delete an impute line to impute the\n"
        "midpoint of the bounds) and set derived_from_data = false only for what you have\n"
        "reviewed."
    )
    if skipped:
        header += f"\nLeft out (look like identifiers; list them in data.exclude): {skipped}"
    sys.stdout.write(schema_to_toml(schema, header=header))
    err.print(
        f"[yellow]warning:[/yellow] schema of {len(schema)} columns inferred from private "
        "data (bounds, categories and impute medians); review it, then set "
        "derived_from_data = false for each column you replaced with public values"
    )


# Flower deployment: `privml flower superlink|supernode|run|register-node`
from privml.fl.flower.cli import certs_command, flower_app  # noqa: E402

app.add_typer(flower_app, name="flower")
app.command("certs")(certs_command)


@app.command()
def query(
    expression: Annotated[str, typer.Argument(help='e.g. "mean(age)", "histogram(sex)"')],
    site: Annotated[str, typer.Option(help="the site whose records are queried")],
    epsilon: Annotated[float, typer.Option(help="privacy cost of this query (per record)")],
    config: ConfigOpt = None,
    delta: Annotated[float | None, typer.Option(help="delta, for Gaussian-noise queries")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Answer one bounded query on a site's data with DP; the cost is booked first."""
    from privml.dp.cli import format_query_result, run_query

    result = run_query(_load(config), site=site, query=expression, epsilon=epsilon, delta=delta)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        out.print(format_query_result(result), highlight=False)


budget_app = typer.Typer(
    help="Privacy budget per site (spent, remaining), the ledger's budget and the history of "
    "charges, all under the replace-one relation; `privml budget set` changes the budget.",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@budget_app.callback(invoke_without_command=True)
def budget(
    ctx: typer.Context,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Privacy budget per site, the ledger's budget and the history of charges."""
    if ctx.invoked_subcommand is not None:
        return
    from privml.dp.cli import budget_report, format_budget_report

    report = budget_report(_load(config))
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        out.print(format_budget_report(report), highlight=False)


@budget_app.command("set")
def budget_set(
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="the new budget epsilon per record")
    ] = None,
    delta: Annotated[
        float | None, typer.Option("--delta", help="the new budget delta per record")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="the config whose ledger to change", dir_okay=False),
    ] = None,
    ledger: Annotated[
        Path | None,
        typer.Option("--ledger", help="the ledger file (default: the config's, else the user's)"),
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="why, recorded in the budget history")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the change as JSON")] = False,
) -> None:
    """Change the ledger's budget per record, recorded in its history (the only way to)."""
    from privml.dp.cli import format_budget_change, set_budget

    cfg = _load(config) if config is not None and ledger is None else None
    change = set_budget(cfg, ledger=ledger, epsilon=epsilon, delta=delta, reason=reason)
    if as_json:
        sys.stdout.write(json.dumps(change) + "\n")
    else:
        out.print(format_budget_change(change), highlight=False)


app.add_typer(budget_app, name="budget")


def _register_subapps() -> None:
    from privml.dp.cli import dp_app

    app.add_typer(dp_app, name="dp")


_register_subapps()


# Private training: `privml sweep`.
@app.command()
def sweep(
    config: ConfigOpt = None,
    epsilons: Annotated[
        str,
        typer.Option(
            "--epsilons",
            help="comma-separated target epsilons; the default (7.75 in all) fits a fresh "
            "budget of 10",
        ),
    ] = "0.25,0.5,1,2,4",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="output folder (default runs/<name>-sweep-<time>)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print sweep.json to stdout")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing --out folder privml wrote")
    ] = False,
    sets: SetOpt = None,
    nonprivate_baseline: Annotated[
        bool,
        typer.Option(
            "--nonprivate-baseline",
            help="also train without DP as a reference line (a release no budget pays for; "
            "listed in sweep.json's not_accounted)",
        ),
    ] = False,
) -> None:
    """Train at each epsilon and write a privacy-utility curve (sweep.png and sweep.json)."""
    from privml.sweep import parse_epsilons, run_sweep

    cfg = _load(config, sets)
    eps = parse_epsilons(epsilons)

    def on_point(p: Any) -> None:
        if not as_json:
            err.print(f"[dim]epsilon {p.epsilon:.3g}: accuracy {_f(p.accuracy)}[/dim]")

    res = run_sweep(
        cfg, epsilons=eps, out_dir=out_dir, on_point=on_point, force=force,
        nonprivate_baseline=nonprivate_baseline,
    )  # fmt: skip
    if as_json:
        from privml.artifacts import dumps_json

        sys.stdout.write(dumps_json(res.to_dict()) + "\n")
        return
    t = Table(title=f"privml sweep: {cfg.name} ({res.mode}-level DP, delta {res.delta:g})")
    for col in ("epsilon", "accuracy", "auc", "noise multiplier"):
        t.add_column(col, justify="right")
    for p in res.points:
        t.add_row(f"{p.epsilon:.3g}", _f(p.accuracy), _f(p.auc), f"{p.noise_multiplier:.3g}")
    if res.nonprivate is not None:
        t.add_row("non-private", _f(res.nonprivate["accuracy"]), _f(res.nonprivate["auc"]), "-")
    out.print(t)
    out.print(f"curve: {res.png_path}  data: {res.json_path}")


# Encrypted prediction service: `privml serve [tokens add|revoke|list]`, `privml predict`.
from privml.serve.cli import predict_command, serve_app  # noqa: E402

app.add_typer(serve_app, name="serve")
app.command("predict")(predict_command)


# Security audit: `privml audit`, `privml verify DIR`, `privml sign DIR`, `privml keygen`.
from privml.security.cli import register as _register_security  # noqa: E402

_register_security(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    from rich.markup import escape

    err.print(
        f"[yellow]warning ({category.__name__}):[/yellow] {escape(str(message))}",
        highlight=False,
    )


@functools.cache
def _command() -> click.Command:
    """The click command tree of ``app``, built once per process (building it takes a few
    hundred milliseconds: every command's signature is inspected)."""
    return typer.main.get_command(app)


def _debug() -> bool:
    """PRIVML_DEBUG=1 (or true/yes) shows tracebacks; nothing else does."""
    return os.environ.get("PRIVML_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _fail(message: str, exc: BaseException, code: int) -> None:
    print(message, file=sys.stderr)
    for note in getattr(exc, "__notes__", ()):
        print(note, file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``privml`` console script.

    Every outcome is one of the documented exit codes with a message on stderr and no
    traceback (unless PRIVML_DEBUG=1): an error privml did not foresee is reported as an
    internal error (exit 1) naming the exception, so it can be reported and fixed.
    """
    debug = _debug()
    command = _command()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            # make_context + invoke rather than command.main: typer's main turns Ctrl-C into a
            # silent exit status and EOFError into "Aborted"; here each gets its own message
            args = list(argv) if argv is not None else sys.argv[1:]
            for i, arg in enumerate(args):
                if "\x00" in arg:
                    # no file name or value can hold one; Python's os calls raise ValueError
                    raise click.UsageError(
                        f"argument {i + 1} ({arg[:60]!r}) contains a NUL character (\\x00); "
                        "remove it"
                    )
            with command.make_context("privml", args) as ctx:
                command.invoke(ctx)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt) as exc:
            _fail("interrupted", exc, 130)
        except PrivmlError as exc:
            if debug:
                raise
            _fail(f"error: {exc}", exc, exc.exit_code)
        except OSError as exc:
            if debug:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"error: {exc.strerror or exc}{where}", exc, 2)
        except MemoryError as exc:
            if debug:
                raise
            _fail("error: out of memory; the input or the model is too large for this "
                  "machine", exc, 1)
        except Exception as exc:
            if debug:
                raise
            text = str(exc)
            text = text if len(text) <= 500 else text[:500] + "..."
            _fail(
                f"internal error: {type(exc).__name__}: {text} (this is a bug in privml; set "
                "PRIVML_DEBUG=1 to see the traceback, and please report it)",
                exc,
                1,
            )


if __name__ == "__main__":
    main()
