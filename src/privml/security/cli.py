"""Command-line commands of the security audit: ``privml audit``, ``verify``, ``sign``,
``keygen``. :func:`register` adds them to the main typer app (``privml.cli``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from privml.console import PlainWhenPiped

_out = PlainWhenPiped()
_err = PlainWhenPiped(stderr=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


_NUMERIC = ("baseline", "without defence", "with defence", "cost")


def audit_table(audit: dict[str, Any], title: str = "privml audit") -> Table:
    """The audit rows as a rich table: attack, metric, baseline, without / with defence,
    defence, cost, status (degenerate / not run / refused / no effect in red)."""
    t = Table(title=title)
    for col in ("attack", "metric", "baseline", "without defence", "with defence", "defence",
                "cost", "status"):  # fmt: skip
        t.add_column(col, justify="right" if col in _NUMERIC else "left")
    for r in audit.get("rows", []):
        base = _fmt(r.get("baseline"))
        if r.get("baseline_kind") and r.get("baseline") is not None:
            base = f"{base} ({r['baseline_kind']})"
        status = r.get("status", "ok")
        with_d = _fmt(r["with_defence"])
        if status != "ok":
            status = f"[red]{status.upper()}[/red]"
        t.add_row(
            r["attack"], r["metric"], base, _fmt(r["without_defence"]), with_d,
            r.get("defence") or "-", _fmt(r.get("defence_cost")), status,
        )  # fmt: skip
    return t


def audit(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config (default: the embedded demo)",
                     dir_okay=False),  # fmt: skip
    ] = None,
    attacks: Annotated[
        str | None,
        typer.Option(
            "--attacks",
            help="comma-separated: membership, lira, canary, evasion, inversion, backdoor, "
            "poisoning, or all (default: the config's audit.attacks, all of them unless set)",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the audit section as JSON")
    ] = False,
    run_dir: Annotated[
        Path | None,
        typer.Option("--run", help="audit the signed model of this run folder instead of "
                     "training one", file_okay=False),  # fmt: skip
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run folder to write (default runs/<name>-<time>)")
    ] = None,
) -> None:
    """Attack the configured model with and without defences; write results.json's audit."""
    from privml.config import load_config
    from privml.security.audit import run_audit

    cfg = load_config(config)

    def stage(msg: str) -> None:
        if not as_json:
            _err.print(f"[dim]{msg}[/dim]")

    report = run_audit(cfg, attacks=attacks, run_dir=run_dir, out_dir=out_dir, on_stage=stage)
    data = report.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    _out.print(audit_table(data))
    for line in data.get("findings", []):
        _out.print(f"[red]finding:[/red] {line}", highlight=False)
    for name, msg in report.errors.items():
        _err.print(f"[yellow]{name}: not run:[/yellow] {msg}", highlight=False)
    if report.run_dir:
        _out.print(f"results: {report.run_dir}/results.json (audit section)")


def verify(
    folder: Annotated[Path, typer.Argument(help="run folder with model.json, model.pt, model.sig",
                                           file_okay=False)],  # fmt: skip
    public_key: Annotated[
        list[Path] | None,
        typer.Option("--public-key", "-k", help="trust this public key file (repeatable; "
                     "default $PRIVML_TRUSTED_KEYS or the deployment's key)"),  # fmt: skip
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Check a run folder's model signature; exit code 4 if it does not verify."""
    from privml.signing import verify_model_dir

    v = verify_model_dir(folder, public_keys=list(public_key) if public_key else None)
    if as_json:
        sys.stdout.write(json.dumps(v.to_dict(), indent=2) + "\n")
        return
    _out.print(
        f"signature OK: {folder} signed by trusted key {v.key_id} "
        f"({', '.join(f'{n} sha256 {h[:12]}' for n, h in v.files.items())})"
    )


def sign(
    folder: Annotated[Path, typer.Argument(help="folder with model.json and model.pt",
                                           file_okay=False)],  # fmt: skip
    key: Annotated[
        Path | None, typer.Option("--key", help="signing key (default the deployment's)")
    ] = None,
) -> None:
    """Sign a model folder with this deployment's key (only models you have reviewed)."""
    from privml.signing import sign_model_dir

    doc = sign_model_dir(folder, key, create=False)
    _out.print(f"signed {folder} with key {doc['key_id']}")


def keygen(
    key: Annotated[
        Path | None,
        typer.Option("--key", help="where to write the private key (default "
                     "$PRIVML_SIGNING_KEY or ~/.config/privml/signing-key.pem)"),  # fmt: skip
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing key")] = False,
) -> None:
    """Create this deployment's Ed25519 model-signing key (mode 0600) and its public key."""
    from privml.signing import generate_signing_key, key_id, load_public_key

    priv, pub = generate_signing_key(key, overwrite=force)
    _out.print(f"signing key: {priv} (mode 600; keep it out of run folders)")
    _out.print(f"public key:  {pub} (key id {key_id(load_public_key(pub))}); give it to "
               "verifiers (PRIVML_TRUSTED_KEYS)")  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add ``audit``, ``verify``, ``sign`` and ``keygen`` to the ``privml`` app."""
    app.command("audit")(audit)
    app.command("verify")(verify)
    app.command("sign")(sign)
    app.command("keygen")(keygen)
