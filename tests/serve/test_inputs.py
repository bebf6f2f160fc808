"""Hostile model folders and patient files: clean errors, documented exit codes, no traceback.

* `privml serve` checks the model's signature before it parses model.json beyond a bounded
  read: a deeply nested model.sig, a model.json that is a list, not UTF-8 or deeply nested
  (even signed by the trusted key) is refused with a message;
* `privml predict` refuses values outside the schema's declared ranges (or clips them with a
  warning under --clip) and names the input file and column, never an internal "site".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privml.errors import DataError
from privml.serve.client import OutOfRangeWarning, PredictionClient
from tests.serve.conftest import PASSPHRASE, Server, Trained, signing_env

pytestmark = pytest.mark.slow


def _serve(folder: Path, tmp_path: Path, signing_key: Path) -> subprocess.CompletedProcess[str]:
    env = dict(signing_env(signing_key), PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-m", "privml.serve", "--model", str(folder), "--state-dir",
         str(tmp_path / "state"), "--port", "0"],
        capture_output=True, text=True, timeout=300, env=env,
    )


@pytest.mark.parametrize(
    ("case", "resign", "code"),
    [
        ("deep_sig", False, 4),
        ("list_json", True, 2),
        ("binary_json", True, 2),
        ("deep_json", True, 2),
        ("list_json", False, 4),
    ],
)
def test_hostile_model_folders_are_refused_cleanly(
    trained: Trained, tmp_path: Path, signing_key: Path, case: str, resign: bool, code: int
) -> None:
    from privml.signing import sign_model_dir

    folder = tmp_path / "model"
    shutil.copytree(trained.folder, folder)
    if case == "deep_sig":
        (folder / "model.sig").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "list_json":
        (folder / "model.json").write_text("[1, 2, 3]")
    elif case == "binary_json":
        (folder / "model.json").write_bytes(b"\xff\xfe\x00{bad")
    elif case == "deep_json":
        (folder / "model.json").write_text('{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")
    if resign:
        sign_model_dir(folder, signing_key)
    r = _serve(folder, tmp_path, signing_key)
    assert r.returncode == code, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "error" in r.stderr.lower()


def _csv(trained: Trained, path: Path) -> pd.DataFrame:
    cols = list(trained.encoder.schema)
    rng = np.random.default_rng(0)
    rows = {}
    for c in cols:
        spec = trained.encoder.schema[c]
        if spec.type == "numeric":
            rows[c] = rng.uniform(spec.min, spec.max, 4)
        elif spec.type == "binary":
            rows[c] = [spec.values[0] if spec.values else 0] * 4
        else:
            rows[c] = [(spec.values or ["x"])[0]] * 4
    df = pd.DataFrame(rows)
    df.insert(0, "patient_id", [f"p{i}" for i in range(4)])
    df.to_csv(path, index=False)
    return df


def test_out_of_range_values_are_refused_or_clipped_with_a_warning(
    server: Server, trained: Trained, keys_dir: Path, tmp_path: Path
) -> None:
    numeric = [c for c, s in trained.encoder.schema.items() if s.type == "numeric"]
    col = numeric[0]
    spec = trained.encoder.schema[col]
    csv = tmp_path / "patients.csv"
    df = _csv(trained, csv)
    df.loc[2, col] = spec.max + 10 * (spec.max - spec.min)
    df.to_csv(csv, index=False)
    with PredictionClient(server.url, token=server.tokens["alice"], keys_dir=keys_dir,
                          passphrase=PASSPHRASE) as c:
        with pytest.raises(DataError) as err:
            c.predict_csv(csv, tmp_path / "out.csv", progress=False)
        msg = str(err.value)
        assert f"input file {str(csv)!r}" in msg and repr(col) in msg and "--clip" in msg
        assert "site" not in msg and "line" in msg
        assert not (tmp_path / "out.csv").exists()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            c.predict_csv(csv, tmp_path / "out.csv", progress=False, clip=True)
        assert any(issubclass(w.category, OutOfRangeWarning) and col in str(w.message)
                   for w in caught)
        # a missing column: named with the input file, not a site
        df.drop(columns=[col]).to_csv(csv, index=False)
        with pytest.raises(DataError) as err:
            c.predict_csv(csv, tmp_path / "out2.csv", progress=False)
        assert "site" not in str(err.value) and str(csv) in str(err.value)


def test_command_line_predict_exit_2_on_out_of_range(
    server: Server, trained: Trained, keys_dir: Path, tmp_path: Path
) -> None:
    numeric = [c for c, s in trained.encoder.schema.items() if s.type == "numeric"]
    csv = tmp_path / "patients.csv"
    df = _csv(trained, csv)
    df.loc[0, numeric[0]] = trained.encoder.schema[numeric[0]].min - 1e6
    df.to_csv(csv, index=False)
    env = dict(os.environ, PRIVML_TOKEN=server.tokens["alice"],
               PRIVML_KEY_PASSPHRASE=PASSPHRASE, PYTHONPATH=os.pathsep.join(sys.path))
    base = [sys.executable, "-m", "privml.cli", "predict", "--server", server.url, "--input",
            str(csv), "--out", str(tmp_path / "o.csv"), "--keys", str(keys_dir), "--no-progress"]
    r = subprocess.run(base, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "outside the declared range" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*base, "--clip"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "clipped" in r.stderr
