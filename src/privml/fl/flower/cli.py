"""``privml flower ...`` commands (a typer sub-app) and ``privml certs``.

The lead registers them in :mod:`privml.cli`::

    from privml.fl.flower.cli import certs_command, flower_app
    app.add_typer(flower_app, name="flower")
    app.command("certs")(certs_command)

A deployment on three machines (see docs/flower.md)::

    coordinator$ privml certs deploy --host coordinator.example.org
    coordinator$ privml flower superlink --certs deploy --host 0.0.0.0
    site A$      privml flower supernode --site hospital_a --config study.toml \\
                     --superlink coordinator.example.org:9093 --root-certificates ca.crt
    coordinator$ privml flower run --config study.toml --superlink 127.0.0.1:9093 \\
                     --root-certificates deploy/ca.crt --superexec-secret deploy/superexec.secret
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from privml.console import PlainWhenPiped
from privml.errors import InsecureOptionWarning, UsageError
from privml.extras import require

__all__ = ["certs_command", "flower_app", "flower_run"]

flower_app = typer.Typer(
    help="Run privml on Flower across machines: SuperLink (coordinator), SuperNodes (sites), runs.",
    no_args_is_help=True,
)
err = PlainWhenPiped(stderr=True)
out = PlainWhenPiped()

DEFAULT_SUPERLINK = "127.0.0.1:9093"

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Flower's state folder (FLWR_HOME; default ./.privml-flower)"),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="DANGEROUS: plain HTTP without TLS, anyone on the network can read and alter "
        "model updates. Only for a test on one machine.",
    ),
]
SuperlinkOpt = Annotated[str, typer.Option("--superlink", help="SuperLink address host:port")]
RootCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--root-certificates",
        help="CA certificate that signed the SuperLink's (ca.crt from `privml certs`)",
        dir_okay=False,
    ),
]


def _warn_insecure(what: str) -> None:
    err.print(
        f"[bold red]WARNING: {what} runs WITHOUT TLS (--insecure). Model parameters and "
        "updates travel in clear text and can be read or altered by anyone on the network. "
        "Use this only for a test on one machine.[/bold red]"
    )
    warnings.warn(
        f"{what} started with --insecure: TLS is off", InsecureOptionWarning, stacklevel=2
    )


def _exec(cmd: list[str], home: Path | None, print_command: bool) -> None:
    from privml.fl.flower.env import flower_env

    if not print_command:
        require("flower", f"`{cmd[0]}`")

    env = flower_env(home, create=not print_command)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if print_command:
        shown = {k: env[k] for k in sorted(env) if k.startswith("FLWR_")}
        sys.stdout.write(json.dumps({"command": cmd, "env": shown}, indent=2) + "\n")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def certs_command(
    folder: Annotated[Path, typer.Argument(help="folder to write the keys and certificates to")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="DNS name or IP the SuperLink is reached at (repeatable)"),
    ] = None,
    site: Annotated[
        list[str] | None,
        typer.Option("--site", help="make a SuperNode authentication key for this site"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 365,
    overwrite: Annotated[bool, typer.Option(help="replace existing keys")] = False,
) -> None:
    """Generate a test CA, a SuperLink certificate, a SuperExec secret and SuperNode keys."""
    from privml.fl.flower.certs import generate_certificates

    keys = generate_certificates(
        folder, hosts=host or (), sites=site or (), days=days, overwrite=overwrite
    )
    out.print(f"CA certificate (give to every site): {keys.ca_cert}")
    out.print(f"SuperLink certificate and key:        {keys.server_cert}, {keys.server_key}")
    out.print(f"SuperExec secret (coordinator only):  {keys.superexec_secret}")
    for name, (priv, pub) in keys.supernode_keys.items():
        out.print(f"site {name}: private key {priv} (to the site), public key {pub}")
    out.print("[dim]private keys are mode 0600; keep ca.key offline[/dim]")


@flower_app.command("superlink")
def superlink(
    certs: Annotated[
        Path | None,
        typer.Option(
            "--certs", help="folder from `privml certs` (TLS on by default)", file_okay=False
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the Fleet, Control and Runtime APIs")] = 9093,
    insecure: InsecureOpt = False,
    enable_supernode_auth: Annotated[
        bool,
        typer.Option(
            "--enable-supernode-auth",
            help="accept only SuperNodes whose public key was registered "
            "(`privml flower register-node`)",
        ),
    ] = False,
    isolation: Annotated[
        str,
        typer.Option(
            help="'process': `privml flower run` executes the ServerApp itself (fast, "
            "authenticated); 'subprocess': Flower starts flwr-serverapp for each run"
        ),
    ] = "process",
    database: Annotated[
        str | None, typer.Option(help="SQLite file for the SuperLink state (default in memory)")
    ] = None,
    home: HomeOpt = None,
    print_command: Annotated[
        bool, typer.Option("--print-command", help="print the Flower command and exit")
    ] = False,
) -> None:
    """Start the coordinator's Flower SuperLink (offline: no dependency installs, no telemetry)."""
    from privml.fl.flower.processes import superlink_command

    if not 1 <= port <= 65535:
        raise UsageError(f"The '--port' option must be in [1, 65535]. Got {port} instead.")
    if insecure:
        _warn_insecure("the SuperLink")
    cmd = superlink_command(
        host=host,
        port=port,
        certs=certs,
        insecure=insecure,
        enable_supernode_auth=enable_supernode_auth,
        isolation=isolation,
        database=database,
    )
    if not print_command:
        err.print(
            f"SuperLink on {host}:{port} ({'no TLS' if insecure else 'TLS'}); Ctrl-C stops it"
        )
    _exec(cmd, home, print_command)


@flower_app.command("supernode")
def supernode(
    site: Annotated[str, typer.Option("--site", help="this site's name in the config")],
    config: Annotated[
        Path, typer.Option("--config", "-c", help="the deployment's TOML config", dir_okay=False)
    ],
    superlink_addr: SuperlinkOpt = DEFAULT_SUPERLINK,
    root_certificates: RootCertOpt = None,
    auth_key: Annotated[
        Path | None,
        typer.Option(
            "--auth-key", help="SuperNode private key (supernode-SITE.key)", dir_okay=False
        ),
    ] = None,
    insecure: InsecureOpt = False,
    stock: Annotated[
        bool,
        typer.Option(
            "--stock",
            help="run Flower's own flower-supernode (a new ClientApp process per message; slow)",
        ),
    ] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads for local training")] = 1,
    max_wait: Annotated[
        float,
        typer.Option(
            help="seconds to keep trying to reach the SuperLink (at start, and after it went "
            "away or restarted)"
        ),
    ] = 60.0,
    home: HomeOpt = None,
    print_command: Annotated[
        bool, typer.Option("--print-command", help="with --stock: print the Flower command")
    ] = False,
) -> None:
    """Serve this site's data to the federation (loads and encodes it once, trains per round)."""
    if not insecure and root_certificates is None:
        raise UsageError(
            "TLS is on by default: pass --root-certificates ca.crt (from the coordinator's "
            "`privml certs`), or --insecure for a test on one machine"
        )
    if insecure:
        _warn_insecure(f"the SuperNode of site {site!r}")
    if stock:
        from privml.fl.flower.processes import supernode_command

        cmd = supernode_command(
            superlink=superlink_addr,
            site=site,
            config=config,
            root_certificates=root_certificates,
            insecure=insecure,
            auth_key=auth_key,
        )
        _exec(cmd, home, print_command)
        return
    if threads < 1:
        raise UsageError(f"The '--threads' option must be >= 1. Got {threads} instead.")
    from privml.fl.flower.env import apply_flower_env

    apply_flower_env(home)
    import torch

    torch.set_num_threads(threads)
    from privml.fl.flower.node import run_node
    from privml.fl.flower.site import SiteRuntime

    runtime = SiteRuntime.from_file(config, site)
    err.print(
        f"site {site!r}: {runtime.data.n_train} training and {runtime.data.n_test} test records "
        f"encoded; connecting to {superlink_addr}"
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stats = run_node(
        runtime,
        superlink=superlink_addr,
        root_certificates=None if insecure else root_certificates,
        insecure=insecure,
        auth_key=auth_key,
        max_wait_time=max_wait,
        stop=stop,
        reconnect=max_wait,
        on_connect=lambda node: err.print(f"site {site!r}: connected as SuperNode {node}"),
        on_message=lambda kind, s: err.print(f"[dim]{kind}: {s * 1000:.0f} ms[/dim]"),
    )
    err.print(
        f"site {site!r} stopped: {stats.messages} messages, {stats.errors} errors, "
        f"{stats.refused_runs} refused"
    )


def flower_run(
    config_path: Path | None,
    *,
    superlink: str = DEFAULT_SUPERLINK,
    root_certificates: Path | None = None,
    superexec_secret: Path | None = None,
    insecure: bool = False,
    out_dir: Path | None = None,
    as_json: bool = False,
    wait_for_sites: float | None = None,
    round_timeout: float | None = None,
    home: Path | None = None,
    detach: bool = False,
    force: bool = False,
    resume: Path | None = None,
) -> None:
    """Body of ``privml flower run`` (and of ``privml run --engine flower``)."""
    import math

    from privml.config import load_config
    from privml.fl.flower.env import apply_flower_env

    for flag, value in (("--wait-for-sites", wait_for_sites), ("--round-timeout", round_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a number of seconds > 0. Got {value!r} instead.")
    if insecure:
        _warn_insecure("the coordinator's connection")
    apply_flower_env(home)
    from privml.fl.flower.run import Deployment, run_flower

    if resume is not None and config_path is None:
        from privml.fl.checkpoint import locate_partial_run, read_run_config

        cfg = read_run_config(locate_partial_run(resume)[1])
    else:
        cfg = load_config(config_path)
    dep = Deployment(
        superlink=superlink,
        root_certificates=root_certificates,
        superexec_secret=superexec_secret,
        insecure=insecure,
    )
    if detach:
        if resume is not None:
            raise UsageError("--detach cannot resume a run; drop --detach or --resume")
        from privml.fl.flower.run import start_run
        from privml.fl.flower.site import check_supported

        if out_dir is None:
            raise UsageError(
                "--detach needs --out: the SuperLink's own ServerApp process writes the run "
                "folder there (an absolute path on the SuperLink's machine)"
            )
        dep.check()
        check_supported(cfg)
        run_id = start_run(cfg, dep, out_dir=out_dir.resolve())
        out.print(
            f"run {run_id} submitted; the SuperLink's flwr-serverapp writes {out_dir.resolve()}"
        )
        return

    def on_round(rec: Any) -> None:
        if not as_json:
            acc = f"accuracy {rec.accuracy:.3f}" if rec.accuracy is not None else ""
            err.print(f"round {rec.round}: {rec.seconds:.2f} s {acc}")

    def on_stage(msg: str) -> None:
        if not as_json:
            err.print(f"[dim]{msg}[/dim]")

    output = run_flower(
        cfg,
        deployment=dep,
        out_dir=out_dir,
        force=force,
        on_round=on_round,
        on_stage=on_stage,
        wait_for_sites=wait_for_sites,
        round_timeout=round_timeout,
        resume=resume,
    )
    from privml.cli import _summary, degraded_warning

    if as_json:
        sys.stdout.write(json.dumps(output.results, indent=2, default=str) + "\n")
        degraded_warning(output.results)
        return

    _summary(output.results, output.out_dir)


@flower_app.command("run")
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML config (default: the embedded demo)", dir_okay=False
        ),
    ] = None,
    superlink_addr: SuperlinkOpt = DEFAULT_SUPERLINK,
    root_certificates: RootCertOpt = None,
    superexec_secret: Annotated[
        Path | None,
        typer.Option(
            "--superexec-secret",
            help="the SuperLink's SuperExec secret (superexec.secret from `privml certs`)",
            dir_okay=False,
        ),
    ] = None,
    insecure: InsecureOpt = False,
    out_dir: Annotated[Path | None, typer.Option("--out", help="run folder")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print results.json")] = False,
    wait_for_sites: Annotated[
        float | None,
        typer.Option(
            help="seconds to wait for the sites to connect (default: training.wait_for_sites "
            "of the config, 300)"
        ),
    ] = None,
    round_timeout: Annotated[
        float | None,
        typer.Option(
            help="seconds a round waits for replies (default: training.round_timeout of the "
            "config, 600)"
        ),
    ] = None,
    home: HomeOpt = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="only submit the run, for a SuperLink in --isolation subprocess: its own "
            "flwr-serverapp process runs privml's ServerApp and writes the run folder to --out",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="replace an existing --out folder (only one privml wrote)"),
    ] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="continue an interrupted Flower run (its run folder or .partial folder) from "
            "its last authenticated checkpoint; its own config is used unless --config is given",
        ),
    ] = None,
) -> None:
    """Train the config across the connected sites and write the run folder, as `privml run`."""
    flower_run(
        config,
        superlink=superlink_addr,
        root_certificates=root_certificates,
        superexec_secret=superexec_secret,
        insecure=insecure,
        out_dir=out_dir,
        as_json=as_json,
        wait_for_sites=wait_for_sites,
        round_timeout=round_timeout,
        home=home,
        detach=detach,
        force=force,
        resume=resume,
    )


@flower_app.command("register-node")
def register_node(
    public_key: Annotated[
        Path, typer.Argument(help="the site's public key (supernode-SITE.pub)", dir_okay=False)
    ],
    superlink_addr: SuperlinkOpt = DEFAULT_SUPERLINK,
    root_certificates: RootCertOpt = None,
    name: Annotated[str | None, typer.Option(help="a name for the SuperNode")] = None,
    home: HomeOpt = None,
) -> None:
    """Allow a SuperNode's key on a SuperLink started with --enable-supernode-auth."""
    if root_certificates is None:
        raise UsageError("SuperNode registration needs TLS: pass --root-certificates ca.crt")
    from privml.fl.flower.env import apply_flower_env

    apply_flower_env(home)
    from privml.fl.flower.run import register_supernode

    node_id = register_supernode(
        public_key, superlink=superlink_addr, root_certificates=root_certificates, name=name
    )
    out.print(f"SuperNode {node_id} registered ({public_key})")
