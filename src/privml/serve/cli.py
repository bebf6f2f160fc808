"""Command line of the service: ``privml serve ...``, ``privml serve tokens ...``,
``privml predict ...``. Registered in :mod:`privml.cli`; heavy imports happen inside the commands
so ``privml --help`` stays fast."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from privml.console import PlainWhenPiped
from privml.errors import UsageError

serve_app = typer.Typer(
    help="Serve a trained model for encrypted predictions (FastAPI on uvicorn). Without a "
    "subcommand: serve. `privml serve tokens ...` manages API tokens.",
    invoke_without_command=True,
    no_args_is_help=False,
)
tokens_app = typer.Typer(help="Bearer API tokens of a server (stored hashed).",
                         no_args_is_help=True)
serve_app.add_typer(tokens_app, name="tokens")

_err = PlainWhenPiped(stderr=True)
#: Most single-patient queries ``privml predict --prepare`` precomputes randomness for.
MAX_PREPARE = 100_000


@serve_app.callback()
def serve_command(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Option(
        "--model", help="run folder written by `privml run` (model.json + model.pt)",
        file_okay=False)] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind (0: any free port)")] = 8000,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate chain",
                                                  dir_okay=False)] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key",
                                                 dir_okay=False)] = None,
    workers: Annotated[int, typer.Option(help="worker processes (they share the state folder)")
                       ] = 1,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="tokens, registered contexts, budgets (default: the service's own "
        "folder under $XDG_STATE_HOME/privml/serve, never inside the run folder)",
        file_okay=False)] = None,
    schemes: Annotated[str | None, typer.Option(
        help="accepted HE schemes, comma-separated (default: all the model supports)")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="no bearer tokens: anyone who reaches the port can use the "
        "model (local demos only)")] = False,
    allow_plaintext: Annotated[bool, typer.Option(
        "--allow-plaintext", help="allow a non-loopback --host without TLS (behind a "
        "TLS-terminating proxy)")] = False,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", help="largest request body, MiB")
                           ] = 32.0,
    max_batch: Annotated[int, typer.Option(help="most patients per prediction request")] = 8192,
    max_contexts: Annotated[int, typer.Option(help="registered contexts per token")] = 16,
    rate_limit: Annotated[float, typer.Option(help="requests per second per token")] = 100.0,
    patient_rate_limit: Annotated[float, typer.Option(
        help="patients per second per token")] = 20_000.0,
    context_ttl_hours: Annotated[float, typer.Option(
        help="unused registered contexts expire after this many hours")] = 168.0,
    patient_budget: Annotated[int | None, typer.Option(
        "--patient-budget", help="lifetime budget of every token, in patients (a token's own "
        "--budget wins; default: no limit)")] = None,
    output_resolution: Annotated[float, typer.Option(
        "--output-resolution", help="noise on every returned score, logit units: coarser "
        "scores reveal less per answer")] = 2.0**-20,
    eval_timeout: Annotated[float, typer.Option(
        "--eval-timeout", help="longest evaluation of one request, seconds (503 above)")] = 60.0,
    eval_workers: Annotated[int, typer.Option(
        "--eval-workers", help="evaluation threads per worker process (0: one per core)")] = 0,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", help="seconds a connection may take to send its request "
        "headers")] = 10.0,
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", help="seconds a request may take to send its body (408 "
        "above)")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Serve encrypted predictions of a trained model."""
    if ctx.invoked_subcommand is not None:
        return
    if model is None:
        raise UsageError(
            "The '--model' option is required: pass the run folder written by `privml run`, "
            "e.g. `privml serve --model runs/demo`."
        )
    from privml.serve.server import run_server
    from privml.serve.settings import Limits, ServeSettings

    if log_level.lower() not in ("debug", "info", "warning", "error"):
        raise UsageError(f"The '--log-level' option must be debug, info, warning or error. "
                         f"Got {log_level!r} instead.")
    for flag, value, lo, hi in (
        ("--max-body-mb", max_body_mb, 0.004, 2048.0),
        ("--rate-limit", rate_limit, 0.01, 1e9),
        ("--patient-rate-limit", patient_rate_limit, 0.01, 1e12),
        ("--context-ttl-hours", context_ttl_hours, 0.001, 87600.0),
        ("--output-resolution", output_resolution, 2.0**-30, 1.0),
        ("--eval-timeout", eval_timeout, 0.1, 86400.0),
        ("--header-timeout", header_timeout, 0.1, 3600.0),
        ("--body-timeout", body_timeout, 0.1, 3600.0),
    ):
        _check_number(flag, value, lo, hi)
    limits = Limits(
        max_body_bytes=int(max_body_mb * (1 << 20)),
        max_batch=max_batch,
        max_contexts_per_token=max_contexts,
        rate_requests=rate_limit,
        rate_patients=patient_rate_limit,
        context_ttl_s=context_ttl_hours * 3600.0,
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
        eval_timeout_s=eval_timeout,
        eval_workers=eval_workers,
        patient_budget=patient_budget,
        output_resolution=output_resolution,
    )
    settings = ServeSettings(
        model_dir=model,
        state_dir=state_dir,
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        workers=workers,
        auth=not insecure_no_auth,
        schemes=tuple(s.strip() for s in schemes.split(",") if s.strip()) if schemes else None,
        limits=limits,
        allow_plaintext=allow_plaintext,
    )
    run_server(settings, log_level=log_level.lower())


def _check_number(flag: str, value: float, lo: float, hi: float) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise UsageError(f"The '{flag}' option must be a number in [{lo:g}, {hi:g}]. "
                         f"Got {value!r} instead.")


def _state(model: Path | None, state_dir: Path | None) -> Path:
    from privml.serve.settings import check_state_dir, default_state_dir

    if state_dir is not None:
        if model is not None:
            check_state_dir(state_dir, model)
        return state_dir
    if model is not None:
        if not model.is_dir():
            raise UsageError(f"The '--model' option must be a run folder. {str(model)!r} is not "
                             "a folder.")
        return default_state_dir(model)
    raise UsageError("pass --model DIR (the served run folder) or --state-dir DIR")


ModelOpt = Annotated[Path | None, typer.Option("--model", help="the served run folder",
                                               file_okay=False)]
StateOpt = Annotated[Path | None, typer.Option(
    "--state-dir", help="the server's state folder (default: derived from --model, under "
    "$XDG_STATE_HOME/privml/serve)", file_okay=False)]


@tokens_app.command("add")
def tokens_add(
    name: Annotated[str, typer.Argument(help="who the token is for, e.g. clinic-a")],
    model: ModelOpt = None,
    state_dir: StateOpt = None,
    budget: Annotated[int | None, typer.Option(
        "--budget", help="lifetime budget of this token, in patients (default: the "
        "server's --patient-budget)")] = None,
) -> None:
    """Create a token and print it once (only its SHA-256 is stored)."""
    from privml.serve.tokens import TokenStore

    token = TokenStore(_state(model, state_dir)).add(name, budget=budget)
    sys.stdout.write(token + "\n")
    _err.print(
        f"token for [bold]{name}[/bold] created; it is shown only now: give it to the client "
        "over a secure channel (the client passes it with --token or $PRIVML_TOKEN)",
        highlight=False,
    )


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="the token's name")],
    model: ModelOpt = None,
    state_dir: StateOpt = None,
) -> None:
    """Revoke a token (effective on the next request, in every worker) and drop its contexts."""
    from privml.serve.store import StateStore
    from privml.serve.tokens import TokenStore

    state = _state(model, state_dir)
    n = TokenStore(state).revoke(name)
    dropped = StateStore(state).delete_owner(name)
    _err.print(f"revoked {n} token(s) named {name!r}; forgot {dropped} registered context(s)",
               highlight=False)


@tokens_app.command("list")
def tokens_list(
    model: ModelOpt = None,
    state_dir: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List tokens (names and dates; tokens themselves are not stored)."""
    from rich.table import Table

    from privml.serve.store import StateStore
    from privml.serve.tokens import TokenStore

    state = _state(model, state_dir)
    infos = TokenStore(state).list()
    store = StateStore(state)
    used = {t.name: store.usage(t.name) for t in infos}
    if as_json:
        sys.stdout.write(json.dumps([{**t.to_dict(), "used_patients": used[t.name]}
                                     for t in infos], indent=2) + "\n")
        return

    def when(ts: float | None) -> str:
        return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")

    table = Table(title="API tokens")
    for col in ("name", "created (UTC)", "revoked (UTC)", "status", "patients used / budget"):
        table.add_column(col)
    for t in infos:
        table.add_row(t.name, when(t.created), when(t.revoked),
                      "active" if t.active else "revoked",
                      f"{used[t.name]:,} / {'-' if t.budget is None else f'{t.budget:,}'}")
    PlainWhenPiped().print(table)


def predict_command(
    server: Annotated[str, typer.Option("--server", help="server URL, e.g. https://host:8443")],
    input: Annotated[Path | None, typer.Option(
        "--input", help="CSV of patients (schema columns)", dir_okay=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="CSV to write: id, probabilities, label", dir_okay=False)] = None,
    token: Annotated[str | None, typer.Option(
        "--token", help="API token (prefer $PRIVML_TOKEN: options show in `ps`)",
        envvar="PRIVML_TOKEN", show_envvar=True)] = None,
    keys: Annotated[Path | None, typer.Option(
        "--keys", help="key folder (default ~/.config/privml/keys)", envvar="PRIVML_KEYS_DIR",
        file_okay=False)] = None,
    id_column: Annotated[str | None, typer.Option(
        "--id-column", help="column copied to the output (default: id/patient_id, else row "
        "numbers)")] = None,
    scheme: Annotated[str, typer.Option(help="ckks or paillier")] = "ckks",
    batch_size: Annotated[int, typer.Option(help="patients per request")] = 1000,
    ca_cert: Annotated[Path | None, typer.Option(
        "--ca-cert", help="CA certificate to verify the server with (self-signed servers)",
        dir_okay=False)] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    clip: Annotated[bool, typer.Option(
        "--clip", help="clip numeric values outside the schema's bounds (with a warning) "
        "instead of refusing the file")] = False,
    prepare: Annotated[int | None, typer.Option(
        "--prepare", help="Paillier: keep precomputed randomness for this many single-patient "
        "queries in the key folder (sealed like the secret key, each element used once): "
        "alone, only precompute (offline); with --input, top up after the predictions are "
        "written")] = None,
    summary_json: Annotated[Path | None, typer.Option(
        "--summary-json", help="also write what the command did as JSON (patients, requests, "
        "seconds, online seconds, precomputed randomness used)", dir_okay=False)] = None,
) -> None:
    """Predict encrypted: the server never sees the features or the scores.

    The secret key is kept encrypted under a passphrase: $PRIVML_KEY_PASSPHRASE, or asked.
    """
    from privml.serve.client import PASSPHRASE_ENV, OutOfRangeWarning, PredictionClient

    if (input is None) != (out is None) or (input is None and prepare is None):
        raise UsageError(
            "The '--input' and '--out' options go together: pass both to predict (e.g. "
            "`--input patients.csv --out scores.csv`), or only '--prepare N' to precompute "
            "Paillier randomness."
        )
    if prepare is not None and not 0 <= prepare <= MAX_PREPARE:
        raise UsageError(f"The '--prepare' option must be an int in [0, {MAX_PREPARE}]. "
                         f"Got {prepare} instead.")

    def ask(new: bool) -> str:
        env = os.environ.get(PASSPHRASE_ENV)
        if env:
            return env
        if not sys.stdin.isatty():
            raise UsageError(f"set {PASSPHRASE_ENV}: it protects the secret key on disk")
        if new:
            return str(typer.prompt("passphrase for the new secret key (8+ characters)",
                                    hide_input=True, confirmation_prompt=True))
        return str(typer.prompt("passphrase of the secret key", hide_input=True))

    report: dict[str, object] = {}
    with PredictionClient(
        server, token=token, keys_dir=keys, passphrase=ask, scheme=scheme,
        batch_size=batch_size, verify=str(ca_cert) if ca_cert else True,
    ) as client:
        if input is not None and out is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", OutOfRangeWarning)
                summary = client.predict_csv(input, out, id_column=id_column, clip=clip,
                                             progress=not no_progress and sys.stderr.isatty())
            for w in caught:
                _err.print(f"warning: {w.message}", highlight=False)
            spot = (f"; {summary.on_the_spot} ciphertext(s) without precomputed randomness "
                    "(`privml predict --prepare N` precomputes it)" if summary.on_the_spot
                    else "")
            _err.print(
                f"{summary.n_patients} predictions written to {summary.out} in "
                f"{summary.seconds:.1f} s, online {summary.online_seconds * 1e3:.0f} ms "
                f"({summary.n_requests} request(s); model {summary.model_hash[:16]}..., key "
                f"{summary.key_id[:16]}...{spot})",
                highlight=False,
            )
            report.update(summary.to_dict())
        if prepare is not None:
            done = client.prepare_stored(prepare)
            if done is None:
                _err.print("CKKS needs no precomputed randomness on the client", highlight=False)
            else:
                per = client.requirements()["n_features"]
                _err.print(
                    f"precomputed Paillier randomness ready for {done.available // per} "
                    f"single-patient queries; made {done.made} element(s) in "
                    f"{done.wall_s:.1f} s ({done.cpu_s:.1f} s CPU"
                    + (f", {done.cpu_s / done.made * per:.2f} s CPU per patient" if done.made
                       else "") + ")",
                    highlight=False,
                )
                report["prepare"] = {"patients_ready": done.available // per,
                                     "elements_made": done.made, "wall_s": done.wall_s,
                                     "cpu_s": done.cpu_s}
    if summary_json is not None:
        from privml.serve.tokens import write_private_atomic

        write_private_atomic(summary_json, (json.dumps(report, indent=2) + "\n").encode())
