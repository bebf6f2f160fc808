"""Nothing a user owns is ever deleted: output folders are refused when they exist (unless
--force, and then only a folder privml wrote), when they are files, or when they hold the data;
a refused or failed run leaves no partial folder, except a resumable checkpoint it names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privml import pipeline
from privml.artifacts import RUN_MARKER, atomic_folder, check_output_folder
from privml.config import load_config
from privml.errors import UsageError
from privml.fl import checkpoint as ck
from tests.data.sites import five_line_config, write_sites
from tests.test_cli import cli

QUICK = (
    "[training]\nrounds = 2\nlocal_epochs = 1\n[audit]\nenabled = false\n"
    "[output]\nhtml = false\n"
)


def _study(tmp: Path, extra: str = QUICK) -> Path:
    """A user's study folder: three site CSVs and the config, side by side."""
    study = tmp / "study"
    paths = write_sites(study, sizes=(60, 40, 30))
    return five_line_config(study, paths, extra)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def _no_partial(tmp: Path) -> None:
    left = [p for p in tmp.rglob("*") if p.name.endswith((".partial", ".tmp-")) or ".tmp-" in
            p.name or ".old-" in p.name]  # fmt: skip
    assert left == [], left


def test_out_is_the_study_folder_is_refused_even_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _study(tmp_path)
    study = config.parent
    before = _snapshot(study)
    for extra in ([], ["--force"]):
        code, out, err = cli(capsys, "run", "--config", config, "--out", study, *extra)
        assert code == 2 and "Traceback" not in err, err
        assert "which privml reads" in err and "privml.toml" in err
        assert _snapshot(study) == before
    _no_partial(tmp_path)


def test_out_above_the_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _study(tmp_path)
    before = _snapshot(tmp_path)
    code, _, err = cli(capsys, "run", "-c", config, "--out", tmp_path, "--force")
    assert code == 2 and "contains" in err and "site_0.csv" in err
    assert _snapshot(tmp_path) == before


def test_output_dir_naming_a_data_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _study(tmp_path, QUICK.replace("[output]\n", '[output]\ndir = "site_0.csv"\n'))
    before = _snapshot(config.parent)
    code, _, err = cli(capsys, "run", "-c", config)
    assert code == 2 and "[output] dir" in err and "site_0.csv" in err, err
    assert _snapshot(config.parent) == before
    _no_partial(tmp_path)


def test_out_that_is_a_file_or_below_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _study(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target, expected in ((notes, "is a file"), (notes / "run", "which is a file")):
        code, _, err = cli(capsys, "run", "-c", config, "--out", target, "--force")
        assert code == 2 and expected in err, err
    assert notes.read_text() == "mine"


def test_existing_folders_need_force_and_a_privml_marker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _study(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = cli(capsys, "run", "-c", config, "--out", mine)
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = cli(capsys, "run", "-c", config, "--out", mine, "--force")
    assert code == 2 and "not written by privml" in err
    assert (mine / "thesis.tex").read_text() == "years of work"

    run = tmp_path / "run"
    code, _, err = cli(capsys, "run", "-c", config, "--out", run)
    assert code == 0, err
    marker = json.loads((run / RUN_MARKER).read_text())
    assert {"model.json", "model.pt", "model.sig", "results.json"} <= set(marker["files"])
    code, _, err = cli(capsys, "run", "-c", config, "--out", run)
    assert code == 2 and "already exists" in err
    first = (run / "results.json").read_bytes()
    code, _, err = cli(capsys, "run", "-c", config, "--out", run, "--force")
    assert code == 0, err
    assert (run / "results.json").read_bytes() != first  # replaced (new timestamp)

    # a file the user put into a run folder is never deleted, even with --force
    (run / "my-notes.md").write_text("reviewed")
    code, _, err = cli(capsys, "run", "-c", config, "--out", run, "--force")
    assert code == 2 and "my-notes.md" in err and "did not write" in err
    assert (run / "my-notes.md").read_text() == "reviewed"
    _no_partial(tmp_path)


def test_a_forged_or_damaged_marker_does_not_make_a_folder_replaceable(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.csv").write_text("a,b\n1,2\n")
    for marker in ('{"format": "privml-run-folder/1", "files": "data.csv"}', "[" * 100_000,
                   "not json", '{"format": "other", "files": ["data.csv"]}'):  # fmt: skip
        (victim / RUN_MARKER).write_text(marker)
        with pytest.raises(UsageError, match="not written by privml"):
            check_output_folder(victim, force=True)
    # a marker that lists the file does not help a symlink or a folder in its place
    (victim / RUN_MARKER).write_text(json.dumps({"format": "privml-run-folder/1",
                                                 "files": ["data.csv", "link"]}))  # fmt: skip
    (victim / "link").symlink_to(tmp_path)
    with pytest.raises(UsageError, match="did not write"):
        check_output_folder(victim, force=True)
    assert (victim / "data.csv").is_file()


def test_atomic_folder_refuses_what_check_output_folder_refuses(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        atomic_folder(f, lambda tmp: None, force=True)
    assert f.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ("[training]\nrounds = 2\nbatch_size = 0\n", 2),  # refused by the config
        # refused while training, after the run was recorded
        (QUICK + '[attack]\nkind = "sign_flip"\nsites = ["no-such-site"]\n', 2),
    ],
)
def test_refused_runs_leave_no_partial_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, code: int
) -> None:
    config = _study(tmp_path, extra)
    got, _, err = cli(capsys, "run", "-c", config, "--out", tmp_path / "run")
    assert got == code and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
    _no_partial(tmp_path)


def test_budget_refusal_leaves_no_partial_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
        '[data.schema.sex]\ntype = "binary"\nvalues = ["F", "M"]\n'
        '[data.schema.chol]\ntype = "numeric"\nmin = 50\nmax = 400\nmissing = true\n'
        '[data.schema.smoker]\ntype = "categorical"\nvalues = ["never", "former", "current"]\n'
        "missing = true\n"
        '[privacy]\nmode = "sample"\nepsilon = 5\nbudget_epsilon = 1\nledger = "l.sqlite"\n'
        + QUICK
    )
    config = _study(tmp_path, extra)
    code, _, err = cli(capsys, "run", "-c", config, "--out", tmp_path / "run")
    assert code == 3 and "budget" in err, err
    assert not (tmp_path / "run").exists()
    _no_partial(tmp_path)


def test_a_crash_keeps_the_checkpoint_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _study(tmp_path, QUICK.replace("rounds = 2", "rounds = 4"))
    out = tmp_path / "run"
    real = ck.save_checkpoint
    calls: list[int] = []

    def save_then_interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
        path = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return path

    import privml.fl.stages.checkpoint as checkpoint_stage

    monkeypatch.setattr(checkpoint_stage, "save_checkpoint", save_then_interrupt)
    code, _, err = cli(capsys, "run", "-c", config, "--out", out)
    assert code == 130 and "interrupted" in err, (calls, err)
    partial = tmp_path / "run.partial"
    assert f"the checkpoint after round 2 is kept in '{partial}'" in err
    assert f"privml run --resume {out}" in err
    assert not out.exists() and ck.checkpoint_round(partial / "checkpoint") == 2
    monkeypatch.undo()
    code, _, err = cli(capsys, "run", "--resume", out)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["federation"]["resumed_after_round"] == 2 and not partial.exists()


def test_api_failure_after_training_removes_the_partial_folder(tmp_path: Path) -> None:
    cfg = load_config(_study(tmp_path))
    with pytest.raises(UsageError, match="already exists"):
        (tmp_path / "run").mkdir()
        pipeline.run(cfg, out_dir=tmp_path / "run")
    _no_partial(tmp_path)
