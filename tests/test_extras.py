"""The lean core: with every optional package made unimportable (as in a fresh
``pip install privml``), `privml run` still trains and writes its report, and each feature that
needs an extra stops before any work with exit code 2 and the pip command to run.

Each case runs in a fresh interpreter with an import hook that refuses the optional packages:
``import tenseal`` raises ModuleNotFoundError as it does when the package is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from privml.extras import EXTRAS

OPTIONAL = sorted(
    {m for mods in EXTRAS.values() for m in mods}
    | {"fastapi", "starlette", "uvicorn", "httpx", "flwr", "grpc", "opacus", "art", "pyarrow"}
)

SCRIPT = textwrap.dedent(
    """
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from privml.cli import main
    try:
        main({argv!r})
    finally:
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
        if leaked:
            print("LEAKED", leaked, file=sys.stderr)
    """
)

pytestmark = pytest.mark.slow


def privml(tmp: Path, *argv: str, blocked: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("PRIVML_DEBUG", None)
    code = SCRIPT.format(blocked=blocked if blocked is not None else OPTIONAL, argv=list(argv))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True,
        timeout=300,
    )


def _config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "core.toml"
    path.write_text(
        '[data]\ndataset = "breast_cancer"\nn_sites = 3\n[training]\nrounds = 2\n'
        "[inference]\nencrypted = false\n" + extra
    )
    return path


def test_core_run_needs_no_optional_package(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    res = privml(tmp_path, "run", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert res.returncode == 0, res.stderr
    assert "LEAKED" not in res.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["metrics"]["accuracy"] is not None
    assert (tmp_path / "run" / "report.html").is_file()
    # the report command and every --help work on the core too
    for argv in (["report", str(tmp_path / "run")], ["--help"], ["flower", "--help"],
                 ["serve", "--help"], ["predict", "--help"]):
        res = privml(tmp_path, *argv)
        assert res.returncode == 0, (argv, res.stderr)
        assert "LEAKED" not in res.stderr


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["run"], "he"),  # the embedded demo checks encrypted inference
        (["run", "--config", "{cfg_secure}"], "he"),
        (["run", "--config", "{cfg}", "--engine", "flower", "--insecure"], "flower"),
        (["flower", "run", "--config", "{cfg}", "--insecure"], "flower"),
        (["serve", "--model", "{tmp}"], "serve"),
        (["query", "mean(mean_radius)", "--site", "hospital_a", "--epsilon", "1"], "queries"),
        (["run", "--config", "{cfg_parquet}"], "parquet"),
    ],
)
def test_missing_extra_names_the_pip_command(tmp_path: Path, argv: list[str], extra: str) -> None:
    cfg = _config(tmp_path)
    secure = tmp_path / "secure.toml"
    secure.write_text(
        '[data]\ndataset = "breast_cancer"\nn_sites = 3\n[training]\nrounds = 2\n'
        'secure_aggregation = "ckks"\nmax_update_norm = 5.0\n[inference]\nencrypted = false\n'
    )
    pq = tmp_path / "pq.toml"
    pq.write_text(
        '[data]\ntarget = "y"\nsites = [{name = "a", path = "a.parquet"}, '
        '{name = "b", path = "b.parquet"}]\n[inference]\nencrypted = false\n'
    )
    for name in ("a", "b"):
        (tmp_path / f"{name}.parquet").write_bytes(b"PAR1")
    args = [
        a.format(cfg=cfg, cfg_secure=secure, cfg_parquet=pq, tmp=tmp_path) for a in argv
    ]
    res = privml(tmp_path, *args)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert f"pip install 'privml[{extra}]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was trained or written
