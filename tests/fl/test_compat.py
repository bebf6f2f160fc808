"""The compatibility table: every refused combination stops ``privml run`` with exit code 2 and
the table's reason, before any data is read or budget spent; the docs table is generated from
the same rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from privml.cli import main
from privml.config import parse_config
from privml.errors import ConfigError
from privml.fl import compat

REPO = Path(__file__).resolve().parents[2]


def _raw_for(row: compat.Combination) -> dict[str, Any] | None:
    """A demo config that takes, for each option the row names, its first value."""
    raw: dict[str, Any] = {
        "data": {"dataset": "breast_cancer", "n_sites": 6, "partition": "iid"},
        "training": {"rounds": 2},
        "inference": {"encrypted": False},
    }
    t = raw["training"]
    for option, values in row.when.items():
        v = values[0]
        if option == "engine":
            t["engine"] = v
        elif option == "privacy" and v != "none":
            raw["privacy"] = {"mode": v, "epsilon": 1.0}
        elif option == "secure_aggregation" and v != "none":
            t.update(secure_aggregation=v, max_update_norm=1.0)
        elif option == "aggregator":
            t["aggregator"] = v
        elif option == "attack" and v != "none":
            raw["attack"] = {"kind": v, "sites": [1]}
        elif option == "features" and v != "none":
            raw["data"]["dataset"] = "digits"
            raw["model"] = {"features": v, "image_shape": [8, 8]}
        elif option == "adaptive_clip":
            raw.setdefault("privacy", {"mode": "client", "epsilon": 1.0})["adaptive_clip"] = (
                v == "on"
            )
        elif option == "accountant":
            raw.setdefault("privacy", {"mode": "sample", "epsilon": 1.0})["accountant"] = v
        elif option == "secure_checks" and v != "none":
            t.update(secure_aggregation_checks=v, aggregator="norm_bound",
                     aggregator_params={"max_norm": 1.0})  # fmt: skip
        elif option == "secagg_modulus" and v == "above 2**32":
            t["secagg_modulus"] = 1 << 40
        elif option == "secagg_consistency" and v == "set":
            t["secagg_colluding_sites"] = 1
        elif option == "resume":
            return None  # a flag of privml run, checked below
    return raw


def _toml(raw: dict[str, Any]) -> str:
    """The (flat, two-level) config as TOML."""
    import json

    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


REFUSED = [r for r in compat.TABLE if not r.runs]


@pytest.mark.parametrize("row", REFUSED, ids=lambda r: r.label())
def test_every_refused_row_is_refused_by_the_config_with_its_reason(
    row: compat.Combination,
) -> None:
    raw = _raw_for(row)
    if raw is None:
        pytest.skip("a --resume row (tested through the command line)")
    with pytest.raises(ConfigError) as exc:
        cfg = parse_config(raw)
        assert row.at_run, "a config-time row let the config load"
        compat.check_combination(cfg)  # what privml run checks before reading data
    assert row.reason in " ".join(str(exc.value).split())


@pytest.mark.parametrize("row", REFUSED[:3], ids=lambda r: r.label())
def test_privml_run_exits_2_before_reading_data(
    row: compat.Combination, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import privml.pipeline as pipeline

    def no_data(*a: Any, **k: Any) -> Any:
        raise AssertionError("data were read")

    monkeypatch.setattr(pipeline, "load_federation", no_data)
    raw = _raw_for(row)
    assert raw is not None
    cfg = tmp_path / "c.toml"
    cfg.write_text(_toml(raw))
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and row.reason[:60] in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_rows_are_well_formed() -> None:
    for row in compat.TABLE:
        assert set(row.when) <= set(compat.OPTIONS), row
        assert row.reason and (row.runs or row.instead), row
    labels = [(r.label(), r.runs) for r in compat.TABLE]
    assert len(labels) == len(set(labels))


def test_docs_table_is_generated_from_the_rows() -> None:
    text = (REPO / "docs" / "architecture.md").read_text()
    start = text.index("<!-- compat:TABLE -->") + len("<!-- compat:TABLE -->\n")
    end = text.index("<!-- /compat -->")
    assert text[start:end] == compat.table_markdown(), (
        "docs/architecture.md's table is stale: run `python -m privml.fl.compat --write-docs`"
    )
