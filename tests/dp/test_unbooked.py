"""Nothing released about the records without being booked or listed in not_accounted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privml.config import parse_config
from privml.security.audit import AUDIT_NOT_ACCOUNTED, run_audit


@pytest.mark.slow
def test_privml_audit_lists_what_it_releases_without_dp(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "name": "dp-audit",
            "data": {"dataset": "breast_cancer", "n_sites": 2},
            "training": {"rounds": 2, "local_epochs": 1, "batch_size": 64, "lr": 2.0},
            "privacy": {"mode": "sample", "ledger": str(tmp_path / "l.sqlite")},
            "output": {"dir": str(tmp_path / "run"), "html": False},
            "audit": {"max_records": 100},
        }
    )
    report = run_audit(cfg, attacks="membership")
    assert report.run_dir is not None
    results = json.loads((Path(report.run_dir) / "results.json").read_text())
    listed = results["privacy"]["not_accounted"]
    assert AUDIT_NOT_ACCOUNTED in listed and listed.count(AUDIT_NOT_ACCOUNTED) == 1
    assert any("quick membership audit" in n for n in listed)
