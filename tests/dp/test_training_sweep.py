"""``privml sweep``: the privacy-utility curve, its booking and its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from privml.cli import main
from privml.config import parse_config
from privml.dp.cli import ledger_from_config
from privml.errors import BudgetExceededError, UsageError
from privml.sweep import parse_epsilons, run_sweep


def _config(tmp_path: Path, budget: float = 10.0) -> Any:
    return parse_config(
        {
            "data": {"dataset": "breast_cancer", "n_sites": 1, "partition": "hospitals"},
            "training": {"rounds": 2, "local_epochs": 2, "batch_size": 64, "lr": 8.0},
            "privacy": {
                "ledger": str(tmp_path / "l.sqlite"),
                "budget_epsilon": budget,
                "budget_delta": 1e-4,
            },
        },
        name="bc",
    )


def test_parse_epsilons() -> None:
    assert parse_epsilons("4, 0.5,1,1") == [0.5, 1.0, 4.0]
    assert parse_epsilons([2, 1]) == [1.0, 2.0]
    for bad in ("", "1,x", "0,1", "-1", "inf"):
        with pytest.raises(UsageError, match="--epsilons"):
            parse_epsilons(bad)


@pytest.mark.slow
def test_sweep_writes_curve_and_books_every_run(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    seen = []
    res = run_sweep(
        cfg, epsilons="1,4", out_dir=tmp_path / "sw", on_point=seen.append,
        nonprivate_baseline=True,
    )  # fmt: skip
    assert [p.epsilon_target for p in res.points] == [1.0, 4.0] == [p.epsilon_target for p in seen]
    data = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert data["mode"] == "sample" and data["accountant"] == "pld"
    assert data["relation"] == "replace_one"
    assert data["nonprivate"]["accuracy"] > 0.8  # asked for: listed as not accounted
    assert any("non-private baseline" in n for n in data["not_accounted"])
    assert any("test metrics" in n for n in data["not_accounted"])
    for p in data["points"]:
        assert 0.99 * p["epsilon_target"] <= p["epsilon"] <= p["epsilon_target"]
        assert 0.0 <= p["accuracy"] <= 1.0
    assert data["points"][0]["noise_multiplier"] > data["points"][1]["noise_multiplier"]
    png = (tmp_path / "sw" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for p in data["points"]:  # a balanced metric and the baseline beside accuracy
        assert 0.0 <= p["balanced_accuracy"] <= 1.0 and p["majority_baseline"] > 0.5
    page = (tmp_path / "sw" / "report.html").read_text()
    assert "privacy-utility curve" in page and "balanced accuracy" in page
    import base64

    assert base64.b64encode(png).decode()[:200] in page  # the same curve, inline
    ledger = ledger_from_config(cfg)
    for site in ("hospital_a",):
        spent = ledger.spent(site)
        # basic composition of the two runs, each booked per round; the reference run is free
        expected = math.fsum(p.epsilon_per_site[site] for p in res.points)
        assert spent.epsilon == pytest.approx(expected, rel=1e-9)
        assert spent.delta == pytest.approx(2e-5)


def test_sweep_over_budget_trains_and_spends_nothing(tmp_path: Path) -> None:
    cfg = _config(tmp_path, budget=3.0)
    with pytest.raises(BudgetExceededError, match="the sweep needs epsilon 5") as info:
        run_sweep(cfg, epsilons=[1, 4], out_dir=tmp_path / "sw")
    assert "epsilon >= 5" in str(info.value)  # names the budget it needs ...
    assert "privml budget set --epsilon 5" in str(info.value)  # ... and how to get it
    assert not (tmp_path / "sw").exists()
    assert ledger_from_config(cfg).sites() == []


def test_cli_sweep_rejects_bad_epsilons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sweep", "--epsilons", "1,two", "--out", str(tmp_path / "sw")])
    assert info.value.code == 2
    assert "'two'" in capsys.readouterr().err


def test_default_sweep_fits_a_fresh_budget_and_has_no_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's default epsilons fit the default budget of a fresh ledger; nothing
    non-private is trained unless asked for."""
    import privml.fl.training as tr
    from privml.dp.ledger import DEFAULT_BUDGET
    from privml.fl import engine
    from privml.sweep import DEFAULT_EPSILONS

    cfg = parse_config({"data": {"dataset": "breast_cancer"}, "privacy": {"mode": "sample"}})
    assert cfg.privacy.budget_epsilon is None  # a fresh ledger's budget: the default
    assert math.fsum(parse_epsilons(DEFAULT_EPSILONS)) <= DEFAULT_BUDGET.epsilon
    assert 5 * cfg.privacy.delta <= DEFAULT_BUDGET.delta
    calls: list[str] = []

    class _Stop(Exception):
        pass

    def fake_train(config: Any, *a: Any, **k: Any) -> Any:
        calls.append(config.privacy.mode)
        raise _Stop

    monkeypatch.setattr(tr, "train", fake_train)
    monkeypatch.setattr(engine, "simulate", lambda *a, **k: calls.append("simulate"))
    with pytest.raises(_Stop):  # the precheck passed: the first private run started
        run_sweep(cfg, epsilons=DEFAULT_EPSILONS, out_dir=tmp_path / "sw")
    assert calls == ["sample"]
    from privml.cli import sweep as sweep_command

    default = sweep_command.__defaults__[1]  # type: ignore[index]
    assert default == DEFAULT_EPSILONS
