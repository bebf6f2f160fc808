"""A real Flower 1.42 deployment on 127.0.0.1: one SuperLink, three SuperNodes, one run.

The SuperLink runs with TLS (certificates from :func:`generate_certificates`), SuperNode
authentication and SuperExec authentication; each SuperNode is a separate
``privml flower supernode`` process with its own site; the coordinator runs the ServerApp in
this process. Every process started here is stopped by a finalizer (process groups are
killed), also when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from privml.config import load_config
from privml.errors import UsageError
from privml.fl.flower.certs import DeploymentKeys, generate_certificates
from privml.fl.flower.env import FLOWER_OFFLINE_ENV, flower_env
from privml.fl.flower.processes import (
    free_port,
    start_process,
    stop_process,
    stop_processes,
    superlink_command,
    wait_for_port,
)

pytestmark = pytest.mark.slow

SITES = ("hospital_a", "hospital_b", "hospital_c")


@dataclass
class Live:
    config_path: Path
    keys: DeploymentKeys
    superlink: str
    home: Path
    superlink_pid: int
    logs: Path


def _privml(*args: str) -> list[str]:
    return [sys.executable, "-c", "from privml.cli import main; main()", *args]


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("flower")
    logs = root / "logs"
    logs.mkdir()
    keys = generate_certificates(root / "certs", sites=SITES)
    demo = (Path(__file__).parents[2] / "src/privml/data/demo/demo.toml").read_text()
    config_path = root / "study.toml"
    config_path.write_text(
        demo.replace("rounds = 20", "rounds = 3").replace("encrypted = true", "encrypted = false")
    )
    home = root / "flwr-home"
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    procs: list[Any] = []

    def stop_all() -> None:
        stop_processes(procs)

    request.addfinalizer(stop_all)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in flower_env(home, base={}).items():
            mp.setenv(key, value)
        sl = start_process(
            superlink_command(port=port, certs=keys.folder, enable_supernode_auth=True),
            home=home,
            log=(logs / "superlink.log").open("wb"),
        )
        procs.append(sl)
        wait_for_port("127.0.0.1", port, timeout=300, proc=sl)
        from privml.fl.flower.run import register_supernode

        for site in SITES:
            register_supernode(
                keys.supernode_keys[site][1], superlink=superlink, root_certificates=keys.ca_cert
            )
            procs.append(
                start_process(
                    _privml(
                        "flower",
                        "supernode",
                        "--site",
                        site,
                        "--config",
                        str(config_path),
                        "--superlink",
                        superlink,
                        "--root-certificates",
                        str(keys.ca_cert),
                        "--auth-key",
                        str(keys.supernode_keys[site][0]),
                        "--home",
                        str(home),
                    ),
                    home=home,
                    log=(logs / f"{site}.log").open("wb"),
                )
            )
        yield Live(config_path, keys, superlink, home, sl.pid, logs)


def _logs(live: Live) -> str:
    return "\n".join(
        f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in live.logs.iterdir()
    )


def test_three_sites_train_like_the_simulation(live: Live, tmp_path: Path) -> None:
    from privml.fl.flower.run import Deployment, run_flower
    from privml.pipeline import run as run_simulation

    cfg = load_config(live.config_path)
    dep = Deployment(live.superlink, live.keys.ca_cert, live.keys.superexec_secret)
    t0 = time.perf_counter()
    try:
        out = run_flower(cfg, deployment=dep, out_dir=tmp_path / "run", wait_for_sites=300)
    except Exception:
        print(_logs(live))
        raise
    elapsed = time.perf_counter() - t0
    sim = run_simulation(cfg, write=False)
    flower_acc = out.results["metrics"]["accuracy"]
    sim_acc = sim.results["metrics"]["accuracy"]
    assert abs(flower_acc - sim_acc) <= 0.01, (flower_acc, sim_acc)
    assert [r["accuracy"] for r in out.results["rounds"]] == pytest.approx(
        [r["accuracy"] for r in sim.results["rounds"]], abs=0.01
    )
    assert [s["name"] for s in out.results["sites"]] == list(SITES)
    assert out.results["federation"]["engine"] == "flower"
    assert out.results["updates"]["accepted"] == 9
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"]["accuracy"] == flower_acc
    assert (tmp_path / "run" / "model.pt").is_file()
    timing = out.results["deployment"]["timing"]
    print(f"flower run: {elapsed:.1f} s, rounds {timing['round_seconds']}")


def test_task_claims_need_the_superexec_secret(live: Live) -> None:
    from privml.fl.flower.run import Deployment, serve_run, start_run

    cfg = load_config(live.config_path)
    thief = Deployment(live.superlink, live.keys.ca_cert, superexec_secret=None)
    run_id = start_run(cfg, thief)
    with pytest.raises(UsageError, match="refused to hand over run"):
        serve_run(cfg, thief, run_id, claim_timeout=120)
    wrong = Path(live.logs.parent / "wrong.secret")
    wrong.write_bytes(b"x" * 32)
    with pytest.raises(UsageError, match="refused to hand over run"):
        serve_run(cfg, Deployment(live.superlink, live.keys.ca_cert, wrong), run_id)
    from flwr.proto.control_pb2 import StopRunRequest

    from privml.fl.flower.run import _control_client

    client = _control_client(thief)
    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    finally:
        client.close()


_CONNECT = """
import sys
from flwr.supernode.fleet_http_connection import http_request_response
from privml.fl.flower.node import load_auth_key
superlink, key, ca = sys.argv[1:4]
with http_request_response(superlink, False, ca, load_auth_key(key), None, 3) as conn:
    print("CONNECTED as node", conn[0], flush=True)
"""


def test_unregistered_or_untrusting_supernodes_cannot_join(live: Live, tmp_path: Path) -> None:
    # Flower's Fleet client, exactly as privml's SuperNode opens it (run_node), in a light
    # process of its own: on failure Flower ends the process (flwr_exit).
    stranger = generate_certificates(tmp_path / "other", sites=["hospital_a"])
    attempts = {
        "unregistered key": (stranger.supernode_keys["hospital_a"][0], live.keys.ca_cert),
        "untrusted server certificate": (
            live.keys.supernode_keys["hospital_a"][0],
            stranger.ca_cert,
        ),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _CONNECT, live.superlink, str(key), str(ca)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=flower_env(live.home),
        )
        for name, (key, ca) in attempts.items()
    }
    outputs = {}
    try:
        for name, proc in procs.items():
            outputs[name] = proc.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        for proc in procs.values():
            stop_process(proc)  # type: ignore[arg-type]
    for name, proc in procs.items():
        assert proc.returncode != 0, (name, outputs[name][-2000:])
        assert "CONNECTED" not in outputs[name]
        assert "Failed to initialize the connection to the SuperLink" in outputs[name]
    assert "CERTIFICATE_VERIFY_FAILED" in outputs["untrusted server certificate"]
    assert "CERTIFICATE_VERIFY_FAILED" not in outputs["unregistered key"]


def test_flower_processes_run_offline(live: Live) -> None:
    environ = Path(f"/proc/{live.superlink_pid}/environ").read_bytes().split(b"\0")
    env = dict(kv.decode().split("=", 1) for kv in environ if b"=" in kv)
    for key, value in FLOWER_OFFLINE_ENV.items():
        assert env[key] == value
    assert env["FLWR_HOME"] == str(live.home.resolve())
    # nothing was installed for the run: no app bundle, no runtime environment
    assert not (live.home / "apps").exists()
    assert not (live.home / "runtime-envs").exists()
