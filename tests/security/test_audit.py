"""`privml audit` and the quick audit of every run: rows written into results.json, leakage
above the accountant's epsilon fails loudly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

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
                  "inversion_iterations": 60, "max_records": 200, "adversarial_betas": [0.5],
                  "canaries": 200},
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
    ev = rows[("evasion (schema PGD-5)", "robust accuracy, eps 0.05")]
    assert ev["with_defence"] > ev["without_defence"]
    assert ev["baseline_kind"] == "majority class" and 0.5 < ev["baseline"] < 0.75
    assert ev["status"] == "ok" and "mean_radius +-" in ev["note"]  # budget in schema units
    assert rows[("evasion", "clean AUC")]["with_defence"] >= 0.9
    mia = rows[("membership (loss threshold)", "empirical epsilon (lower bound)")]
    assert mia["with_defence"] is None and mia["baseline"] == 0.0  # no DP here
    assert "cannot certify above" in mia["note"]
    assert ("poisoning (sign_flip)", "accuracy drop (fedavg)") in rows
    # trimmed mean cannot run with 3 sites: shown as such, with the reason, and in findings
    tm = [r for r in audit["rows"] if r["defence"] == "trimmed_mean"]
    assert tm and tm[0]["status"] == "not run" and "needs 5 sites" in tm[0]["reason"]
    assert any("trimmed_mean" in f and "NOT RUN" in f for f in audit["findings"])
    text = (tmp_path / "run" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
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


class _Constant(torch.nn.Module):
    """A collapsed "robust" model: the same near-constant answer for every record."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1), -0.3) + 1e-4 * x[:, :1]


@pytest.mark.slow
def test_collapsed_defence_is_marked_degenerate_not_robust(tmp_path: Path, monkeypatch) -> None:
    import privml.security.experiments as ex

    def collapsed(*a, **k):  # type: ignore[no-untyped-def]
        return {"model": _Constant(), "method": "pgd", "beta": None, "candidates": [],
                "refused": None, "label": "PGD adversarial training (eps 0.1)"}  # fmt: skip

    monkeypatch.setattr(ex, "adversarial_defence", collapsed)
    cfg = _tiny(tmp_path, audit={"adversarial_method": "pgd"})
    rep = run_audit(cfg, attacks="evasion", write=False)
    rows = {(r.attack, r.metric): r for r in rep.rows}
    robust = rows[("evasion (schema PGD-5)", "robust accuracy, eps 0.05")]
    # its "robust accuracy" is exactly the majority share -- and it says so
    assert robust.with_defence == pytest.approx(robust.baseline)
    assert robust.degenerate and "predicts" in (robust.reason or "")
    assert any("DEGENERATE" in f for f in rep.findings())
    assert rep.to_dict()["degenerate"] == ["PGD adversarial training (eps 0.1)"]


@pytest.mark.slow
def test_adversarial_training_that_collapses_on_validation_is_refused(tmp_path: Path) -> None:
    # the demo at eps 0.1: TRADES with beta 12 predicts 'benign' for every validation record
    # (beta 6 sits on the edge: rounding differences of 1e-7 in the server step decide it)
    cfg = parse_config({
        "name": "demo-refusal",
        "data": {"dataset": "breast_cancer", "n_sites": 3, "partition": "hospitals"},
        "model": {"kind": "logistic"},
        "training": {"rounds": 20, "local_epochs": 5, "batch_size": 32, "lr": 8.0},
        "output": {"dir": str(tmp_path / "run"), "html": False},
        "audit": {"evasion_budgets": [0.05], "evasion_steps": 5, "adversarial_betas": [12.0]},
    })  # fmt: skip
    rep = run_audit(cfg, attacks="evasion", write=False)
    r = next(r for r in rep.rows if r.metric == "robust accuracy, eps 0.05")
    assert r.status == "refused" and r.with_defence is None
    # refused on validation records: degenerate, or no more robust than chance
    assert "on validation records" in (r.reason or "") and "no adversarial training" in r.reason
    assert any("REFUSED" in f for f in rep.findings())


@pytest.mark.slow
def test_canary_audit_of_dp_training_stays_below_the_accountant(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, privacy={"mode": "sample", "epsilon": 1.0, "delta": 1e-5,
                                   "budget_epsilon": 100.0, "budget_delta": 1e-3},
                attack={"kind": "backdoor", "sites": [0]})  # fmt: skip
    rep = run_audit(cfg, attacks="canary", write=False)
    row = next(r for r in rep.rows if r.metric == "epsilon lower bound (one run)")
    assert row.without_defence is not None and row.with_defence is not None
    assert row.with_defence <= 1.0 and not rep.violations
    d = rep.details["canary"]["with_defence"]
    assert d["m"] == 200 and 60 < d["included"] < 140 and d["accountant_epsilon"] <= 1.0 + 1e-6
    assert "cannot certify above" in (row.note or "") and d["max_certifiable"] > 1.0
