"""`privml audit` and the quick audit of every run: rows written into results.json, leakage
above the accountant's epsilon fails loudly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from privml.cli import main
from privml.config import parse_config
from privml.data.encoding import Encoder, Task
from privml.data.federation import FederatedData, SiteData
from privml.errors import UsageError
from privml.models.nets import ModelSpec
from privml.security.attacks.membership import PrivacyAuditError
from privml.security.audit import ATTACKS, check_attacks, quick_audit, run_audit

from .conftest import train_plain


def _tiny(tmp_path: Path, **extra):  # type: ignore[no-untyped-def]
    raw = {
        "name": "tiny",
        "data": {"dataset": "breast_cancer", "n_sites": 3},
        "training": {"rounds": 10, "local_epochs": 3, "lr": 4.0},
        "output": {"dir": str(tmp_path / "run"), "html": False},
        "audit": {"shadow_models": 3, "evasion_budgets": [0.05], "evasion_steps": 5,
                  "inversion_iterations": 60, "max_records": 200},
    }  # fmt: skip
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v)
    return parse_config(raw)


def _memorized_federation():  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    X = rng.random((400, 10)).astype(np.float32)
    y = rng.integers(0, 2, 400)
    site = SiteData("a", X[:200], y[:200], X[200:], y[200:])
    fed = FederatedData([site], Encoder({}), Task("binary", "y", ("0", "1")))
    spec = ModelSpec("mlp", 10, 1, hidden=(64,))
    return fed, train_plain(X[:200], y[:200], spec, steps=500, lr=2e-2)


def test_quick_audit_reports_leakage_and_fails_above_the_accountant() -> None:
    fed, model = _memorized_federation()
    out = quick_audit(model, None, fed, privacy={"mode": "none"})
    assert out["quick"] and out["membership"]["auc"] > 0.8
    assert "non-private model" in out["summary"] and not out["violations"]
    with pytest.raises(PrivacyAuditError, match="does not hold"):
        quick_audit(model, None, fed, privacy={"mode": "sample", "epsilon": 0.1, "delta": 1e-5})
    flagged = quick_audit(
        model, None, fed, privacy={"mode": "sample", "epsilon": 0.1, "delta": 1e-5}, strict=False
    )
    assert flagged["membership"]["violation"] and flagged["violations"]
    assert flagged["membership"]["accountant_epsilon"] == 0.1


def test_attack_names_are_checked() -> None:
    assert check_attacks("all") == ATTACKS
    assert check_attacks("inversion, membership") == ("membership", "inversion")
    with pytest.raises(UsageError, match="'attacks' parameter"):
        check_attacks("membership,nope")


@pytest.mark.slow
def test_run_audit_writes_rows_into_results(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    rep = run_audit(cfg, attacks="membership,evasion,inversion,poisoning")
    assert rep.run_dir == str(tmp_path / "run") and not rep.errors
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    audit = res["audit"]
    assert audit["attacks"] == ["membership", "evasion", "inversion", "poisoning"]
    rows = {(r["attack"], r["metric"]): r for r in audit["rows"]}
    inv = rows[("gradient inversion", "relative reconstruction error")]
    assert inv["without_defence"] < 0.1 < inv["with_defence"]  # one record, exact gradient
    ev = rows[("evasion (PGD-5)", "robust accuracy, L-inf eps 0.05")]
    assert ev["with_defence"] > ev["without_defence"]
    assert rows[("membership (loss threshold)", "AUC")]["with_defence"] is None  # no DP here
    assert ("poisoning (sign_flip)", "accuracy drop (fedavg)") in rows
    # audit the saved, signed run again without retraining
    again = run_audit(cfg, attacks=["membership"], run_dir=tmp_path / "run")
    assert again.rows[0].without_defence == pytest.approx(rows[
        ("membership (loss threshold)", "AUC")]["without_defence"])  # fmt: skip
    (tmp_path / "run" / "model.sig").unlink()
    from privml.errors import SignatureError

    with pytest.raises(SignatureError):
        run_audit(cfg, attacks=["membership"], run_dir=tmp_path / "run")


@pytest.mark.slow
def test_cli_audit_json(tmp_path: Path, capsys) -> None:
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        'name = "t"\n[data]\ndataset = "breast_cancer"\nn_sites = 3\n'
        "[training]\nrounds = 3\nlr = 4.0\n"
        f'[output]\ndir = "{tmp_path / "out"}"\nhtml = false\n'
        '[audit]\nattacks = ["membership"]\n'
    )
    main(["audit", "--config", str(cfg_path), "--attacks", "membership,inversion", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["attacks"] == ["membership", "inversion"]
    assert {r["attack"] for r in data["rows"]} == {
        "membership (loss threshold)", "gradient inversion"
    }  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        main(["audit", "--config", str(cfg_path), "--attacks", "bogus"])
    assert exc.value.code == 2
