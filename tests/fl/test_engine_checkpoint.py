"""Checkpoints: a run interrupted after any round and resumed ends with exactly the model of an
uninterrupted run; checkpoint files are written atomically and checked when read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privml.config import parse_config
from privml.data.federation import load_federation
from privml.errors import ConfigError, DataError, SignatureError, UsageError
from privml.fl import checkpoint as ck
from privml.fl.engine import RoundRecord, ServerPlan, init_server_state, simulate
from privml.fl.server_opt import ServerOptState
from privml.pipeline import model_spec, run

CONFIGS: dict[str, dict[str, Any]] = {
    # optimizer moments, the centered-clipping centre, sampling, dropouts, stragglers, noise
    "centered_clip+adam": {
        "training": {
            "rounds": 6,
            "local_epochs": 2,
            "lr": 2.0,
            "aggregator": "centered_clip",
            "server_optimizer": "adam",
            "server_lr": 0.5,
            "clients_per_round": 7,
            "dropout": 0.2,
            "straggler": 0.1,
        },
        "attack": {"kind": "gaussian", "fraction": 0.2, "sigma": 2.0},
    },
    # the server's root-data training, FedProx, an omniscient attack, server momentum
    "fltrust+fedprox+momentum": {
        "training": {
            "rounds": 6,
            "local_epochs": 2,
            "lr": 4.0,
            "aggregator": "fltrust",
            "aggregator_params": {"root_size": 15},
            "strategy": "fedprox",
            "prox_mu": 0.05,
            "server_optimizer": "momentum",
            "server_lr": 0.7,
        },
        "attack": {"kind": "alie", "sites": [0, 5]},
    },
}


def _cfg(name: str):
    return parse_config(
        {
            "data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid"},
            "output": {"html": False},
            **CONFIGS[name],
        },
        name="ckpt",
    )


class Crash(RuntimeError):
    pass


def _crash_after(n: int):
    def on_round(rec: RoundRecord) -> None:
        if rec.round == n:
            raise Crash(f"simulated crash after round {n}")

    return on_round


def _rounds(results: list[RoundRecord] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        d = dict(r.to_dict() if isinstance(r, RoundRecord) else r)
        d.pop("seconds")
        out.append(d)
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("crash_after", [1, 4])
def test_resumed_simulation_equals_uninterrupted(
    tmp_path: Path, name: str, crash_after: int
) -> None:
    cfg = _cfg(name)
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    whole = simulate(fed, spec, cfg.training, attack=cfg.attack)
    folder = tmp_path / "checkpoint"
    with pytest.raises(Crash):
        simulate(
            fed,
            spec,
            cfg.training,
            attack=cfg.attack,
            checkpoint_dir=folder,
            on_round=_crash_after(crash_after),
        )
    assert ck.load_checkpoint(folder).state.round == crash_after
    seen: list[int] = []
    resumed = simulate(
        fed,
        spec,
        cfg.training,
        attack=cfg.attack,
        checkpoint_dir=folder,
        resume=True,
        on_round=lambda r: seen.append(r.round),
    )
    assert seen == list(range(crash_after + 1, 7))
    assert torch.equal(resumed.params, whole.params)  # bit for bit
    assert _rounds(resumed.history) == _rounds(whole.history)
    assert resumed.extra["updates"] == whole.extra["updates"]
    assert resumed.extra["attack"] == whole.extra["attack"]
    assert resumed.metrics == whole.metrics
    assert resumed.extra["federation"]["resumed_after_round"] == crash_after


def test_pipeline_resume_writes_the_same_run(tmp_path: Path) -> None:
    cfg = _cfg("centered_clip+adam")
    whole = run(cfg, out_dir=tmp_path / "whole")
    target = tmp_path / "broken"
    with pytest.raises(Crash):
        run(cfg, out_dir=target, on_round=_crash_after(3))
    partial = tmp_path / "broken.partial"
    assert not target.exists() and (partial / "checkpoint" / ck.STATE_FILE).is_file()
    # starting the same folder again without --resume is refused, nothing is touched
    with pytest.raises(UsageError, match="--resume"):
        run(cfg, out_dir=target)
    other = _cfg("fltrust+fedprox+momentum")
    with pytest.raises(ConfigError, match="another config"):
        run(other, resume=target)
    out = run(cfg, resume=partial)  # either folder name works
    assert out.out_dir == target and target.is_dir() and not partial.exists()
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(target / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads((target / "results.json").read_text())
    assert _rounds(res["rounds"]) == _rounds(whole.results["rounds"])
    assert res["updates"] == json.loads(json.dumps(whole.results["updates"]))
    assert res["federation"]["resumed_after_round"] == 3
    assert res["attack"]["kind"] == "gaussian"
    with pytest.raises(UsageError, match="already finished"):
        run(cfg, resume=target)
    with pytest.raises(UsageError, match="No interrupted run"):
        run(cfg, resume=tmp_path / "nothing")


def test_run_interrupted_before_its_first_checkpoint_restarts(tmp_path: Path) -> None:
    cfg = _cfg("centered_clip+adam")
    partial = ck.partial_dir(tmp_path / "r")
    ck.write_run_config(partial, cfg)  # the run crashed while loading data
    out = run(cfg, resume=tmp_path / "r", write=True)
    assert out.results["federation"]["resumed_after_round"] is None
    assert (tmp_path / "r" / "results.json").is_file() and not partial.exists()


def _state(n: int = 5, rnd: int = 2) -> ck.ServerState:
    plan = ServerPlan.from_training(_cfg("centered_clip+adam").training)
    s = init_server_state(np.arange(n, dtype=np.float32), plan)
    opt = ServerOptState("adam", 3, np.full(n, 0.5), np.full(n, 0.25))
    return ck.ServerState(rnd, s.params, opt, np.linspace(-1, 1, n))


def test_checkpoint_round_trip_and_atomic_replace(tmp_path: Path, monkeypatch) -> None:
    st = _state()
    ck.save_checkpoint(tmp_path, st, fingerprint="abc", meta={"history": [1, 2]})
    got = ck.load_checkpoint(tmp_path, fingerprint="abc")
    assert got.state.round == 2 and got.meta == {"history": [1, 2]}
    np.testing.assert_array_equal(got.state.params, st.params)
    np.testing.assert_array_equal(got.state.opt.v, st.opt.v)
    np.testing.assert_array_equal(got.state.center, st.center)
    before = (tmp_path / ck.STATE_FILE).read_bytes()

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, _state(rnd=3), fingerprint="abc", meta={})
    monkeypatch.undo()
    assert (tmp_path / ck.STATE_FILE).read_bytes() == before  # the old checkpoint survives
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.STATE_FILE]  # no temp file left
    assert ck.load_checkpoint(tmp_path).state.round == 2


def test_checkpoint_refuses_damaged_foreign_or_missing_files(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, _state(), fingerprint="abc", meta={})
    with pytest.raises(ConfigError, match="another configuration"):
        ck.load_checkpoint(tmp_path, fingerprint="xyz")
    data = (tmp_path / ck.STATE_FILE).read_bytes()
    (tmp_path / ck.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(SignatureError, match="truncated"):
        ck.load_checkpoint(tmp_path)
    with pytest.raises(UsageError, match="No checkpoint"):
        ck.load_checkpoint(tmp_path / "empty")
    bad = ck.ServerState(1, np.array([np.nan, 1.0], dtype=np.float32), _state(2).opt, None)
    ck.save_checkpoint(tmp_path, bad, fingerprint="abc", meta={})
    with pytest.raises(DataError, match="NaN"):
        ck.load_checkpoint(tmp_path)


@pytest.mark.slow
def test_cli_run_killed_mid_run_resumes_to_the_same_model(tmp_path: Path) -> None:
    """``privml run`` killed with SIGKILL between rounds, then ``privml run --resume``."""
    rounds = 30
    toml = tmp_path / "c.toml"
    toml.write_text(
        'name = "killed"\n[data]\ndataset = "breast_cancer"\nn_sites = 3\n'
        f'[training]\nrounds = {rounds}\nlocal_epochs = 2\nlr = 4.0\naggregator = "median"\n'
        'server_optimizer = "yogi"\nserver_lr = 0.5\n[output]\nhtml = false\n'
    )
    out = tmp_path / "run"
    state = tmp_path / "run.partial" / "checkpoint" / ck.STATE_FILE
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "privml.cli", "run", "-c", str(toml), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    killed_at = ck.load_checkpoint(state.parent).state.round
    assert 1 <= killed_at < rounds
    done = subprocess.run(
        [sys.executable, "-m", "privml.cli", "run", "--resume", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert res["federation"]["resumed_after_round"] >= killed_at
    from privml.config import load_config

    whole = run(load_config(toml), write=False)
    got = torch.load(out / "model.pt", weights_only=True)
    flat = torch.cat([got["0.weight"].reshape(-1), got["0.bias"].reshape(-1)])
    assert torch.equal(flat, whole.training.params)
