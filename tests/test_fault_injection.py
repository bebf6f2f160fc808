"""Fault injection: `privml run` killed (SIGKILL, no cleanup possible) while writing its run
folder and while resuming. Nothing already written is lost, nothing half-written is left where
a result belongs, and the run finishes with exactly the uninterrupted run's model.

(Killed during training: tests/fl/test_engine_checkpoint.py; during a query:
tests/dp/test_ledger.py; a server restarted during requests:
tests/serve/test_restart_during_requests.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from privml.config import load_config
from privml.fl import checkpoint as ck
from privml.pipeline import run

pytestmark = pytest.mark.slow

CONFIG = (
    'name = "faults"\n[data]\ndataset = "breast_cancer"\nn_sites = 3\n'
    "[training]\nrounds = 6\nlocal_epochs = 1\nlr = 4.0\n"
    '[audit]\nenabled = false\n[output]\nhtml = false\n'
)

# Runs `privml ARGV` with one function replaced by one that SIGKILLs the process after the
# N-th call of the original (the kill lands in the middle of what privml is doing).
KILLER = """
import os, signal, sys, importlib
module, name, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
parts = module.split(".")
for i in range(len(parts), 0, -1):  # "pathlib.Path" -> the class Path of pathlib
    try:
        mod = importlib.import_module(".".join(parts[:i]))
    except ImportError:
        continue
    for attr in parts[i:]:
        mod = getattr(mod, attr)
    break
real = getattr(mod, name)
calls = []
def wrapped(*a, **k):
    out = real(*a, **k)
    calls.append(1)
    if len(calls) >= after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(mod, name, wrapped)
from privml.cli import main
main(sys.argv[4:])
"""


def _killed(tmp: Path, target: str, after: int, *argv: str | Path) -> None:
    module, name = target.rsplit(".", 1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, module, name, str(after), *map(str, argv)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr[-2000:])


def _cli(tmp: Path, *argv: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "privml.cli", *map(str, argv)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp,
    )  # fmt: skip


def _model(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "c.toml").write_text(CONFIG)
    out = folder / "run"
    run(load_config(folder / "c.toml"), out_dir=out)
    return _model(out)


def test_killed_while_writing_the_run_folder(
    tmp_path: Path, whole: dict[str, torch.Tensor]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    # an earlier run in the same folder, replaced with --force ...
    done = _cli(tmp_path, "run", "-c", cfg, "--out", out)
    assert done.returncode == 0, done.stderr
    before = _snapshot(out)
    # ... killed after results.json of the new folder was written (model.pt is already there)
    _killed(tmp_path, "privml.pipeline.write_json", 1, "run", "-c", cfg, "--out", out, "--force")
    assert _snapshot(out) == before  # the earlier run is untouched
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the dead writer's litter
    partial = ck.partial_dir(out)
    assert ck.checkpoint_round(partial / "checkpoint") == 6  # training was complete
    done = _cli(tmp_path, "run", "--resume", out, "--force")
    assert done.returncode == 0, done.stderr
    assert _same(_model(out), whole) and not partial.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # cleaned up
    assert _cli(tmp_path, "verify", out).returncode == 0


def test_killed_between_moving_the_old_run_aside_and_replacing_it(tmp_path: Path) -> None:
    """The one moment the previous run is not at its name: it is put back, not deleted."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    assert _cli(tmp_path, "run", "-c", cfg, "--out", out).returncode == 0
    before = _snapshot(out)
    # Path.rename is called twice when replacing: final -> .old, then tmp -> final
    _killed(tmp_path, "pathlib.Path.rename", 1, "run", "-c", cfg, "--out", out, "--force")
    assert not out.exists()  # moved aside when the process died
    assert any(".old-" in p.name for p in tmp_path.iterdir())
    done = _cli(tmp_path, "run", "-c", cfg, "--out", out)  # the next run finds it put back
    assert done.returncode == 2 and "already exists" in done.stderr, done.stderr
    assert _snapshot(out) == before
    assert not any(".old-" in p.name or ".tmp-" in p.name for p in tmp_path.iterdir())


#: where the round engine's checkpoint stage writes a round's checkpoint
SAVE = "privml.fl.stages.checkpoint.save_checkpoint"


def test_killed_while_resuming(tmp_path: Path, whole: dict[str, torch.Tensor]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "run"
    _killed(tmp_path, SAVE, 2, "run", "-c", cfg, "--out", out)
    state = ck.partial_dir(out) / "checkpoint"
    assert ck.checkpoint_round(state) == 2
    # the resumed run is killed too, after one more checkpoint
    _killed(tmp_path, SAVE, 1, "run", "--resume", out)
    assert ck.checkpoint_round(state) == 3
    done = _cli(tmp_path, "run", "--resume", out)
    assert done.returncode == 0, done.stderr
    assert _same(_model(out), whole)
