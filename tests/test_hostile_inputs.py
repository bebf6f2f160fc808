"""One error path: every hostile input a tester tried becomes a regression test here. Each is
run through the command line in this process, and must give a documented exit code with one
clear message, no traceback, and no run or .partial folder left behind."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.data.sites import five_line_config, write_sites
from tests.test_cli import cli

QUICK = "[training]\nrounds = 2\nlocal_epochs = 1\n[audit]\nenabled = false\n"
SCHEMA = (
    '[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = 120\n'
    '[data.schema.sex]\ntype = "binary"\nvalues = ["F", "M"]\n'
    '[data.schema.chol]\ntype = "numeric"\nmin = 50\nmax = 400\nmissing = true\n'
    '[data.schema.smoker]\ntype = "categorical"\nvalues = ["never", "former", "current"]\n'
    "missing = true\n"
)


def _study(tmp: Path, extra: str = QUICK) -> Path:
    return five_line_config(tmp, write_sites(tmp, sizes=(60, 40, 30)), extra)


def _run(extra: str) -> Callable[[Path], list[str | Path]]:
    def make(tmp: Path) -> list[str | Path]:
        return ["run", "-c", _study(tmp, extra), "--out", tmp / "out"]

    return make


def _header(old: str, new: str, sites: tuple[int, ...] = (1,)) -> Callable[[Path], list]:
    def make(tmp: Path) -> list[str | Path]:
        config = _study(tmp)
        for i in sites:
            p = tmp / f"site_{i}.csv"
            lines = p.read_text().splitlines()
            lines[0] = lines[0].replace(old, new)
            p.write_text("\n".join(lines) + "\n")
        return ["run", "-c", config, "--out", tmp / "out"]

    return make


def _site_replaced(make_site: Callable[[Path], None], name: str = "site_1.csv") -> Callable:
    def make(tmp: Path) -> list[str | Path]:
        config = _study(tmp)
        (tmp / "site_1.csv").rename(tmp / "original.csv")
        make_site(tmp / name)
        if name != "site_1.csv":
            config.write_text(config.read_text().replace("site_1.csv", name))
        return ["run", "-c", config, "--out", tmp / "out"]

    return make


def _deep_toml(tmp: Path) -> list[str | Path]:
    p = tmp / "deep.toml"
    p.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    return ["run", "-c", p, "--out", tmp / "out"]


def _truncated_gz(path: Path) -> None:
    data = gzip.compress((path.parent / "original.csv").read_bytes())
    path.write_bytes(data[: len(data) // 2])


def _infer(header: str) -> Callable[[Path], list[str | Path]]:
    def make(tmp: Path) -> list[str | Path]:
        p = tmp / "a.csv"
        p.write_text(f"{header}\n1,2\n3,4\n")
        return ["schema", "infer", p]

    return make


def _signed_model(model_json: bytes) -> Callable[[Path], list[str | Path]]:
    """A model folder whose model.json is hostile, signed by this deployment's own key, so
    the parser (not the signature) is what refuses it."""

    def make(tmp: Path) -> list[str | Path]:
        from privml.signing import sign_model_dir

        d = tmp / "model"
        d.mkdir()
        (d / "model.json").write_bytes(model_json)
        (d / "model.pt").write_bytes(b"not torch")
        sign_model_dir(d)
        return ["audit", "--run", d, "--attacks", "membership", "-c", _study(tmp)]

    return make


def _sig(content: bytes) -> Callable[[Path], list[str | Path]]:
    def make(tmp: Path) -> list[str | Path]:
        d = tmp / "model"
        d.mkdir()
        (d / "model.json").write_text("{}")
        (d / "model.pt").write_bytes(b"x")
        (d / "model.sig").write_bytes(content)
        return ["verify", d]

    return make


CASES: dict[str, tuple[Callable[[Path], list[str | Path]], int, str]] = {
    # configuration
    "toml nested 5000 deep": (_deep_toml, 2, "nest too deeply"),
    "seed = -1": (_run("[training]\nseed = -1\n"), 2, "training.seed"),
    "data seed = -1": (_run("seed = -1\n" + QUICK), 2, "data.seed"),
    "batch_size = 1e12": (_run("[training]\nbatch_size = 1e12\n"), 2, "whole number"),
    "batch_size = 10**12": (_run("[training]\nbatch_size = 1000000000000\n"), 2, "batch_size"),
    "epsilon = 1e-300": (
        _run(SCHEMA + '[privacy]\nmode = "sample"\nepsilon = 1e-300\n' + QUICK), 2, "[0.01, 1000]"
    ),
    "epsilon = 1e300": (
        _run(SCHEMA + '[privacy]\nmode = "sample"\nepsilon = 1e300\n' + QUICK), 2, "[0.01, 1000]"
    ),
    "noise_multiplier = 1e-300": (
        _run(SCHEMA + '[privacy]\nmode = "sample"\nnoise_multiplier = 1e-300\n' + QUICK), 2,
        "noise_multiplier",
    ),
    "hidden = [1000000000]": (
        _run('[model]\nkind = "mlp"\nhidden = [1000000000]\n' + QUICK), 2, "model.hidden[0]"
    ),
    "hidden too many parameters": (
        _run('[model]\nkind = "mlp"\nhidden = [100000, 100000]\n' + QUICK), 2, "parameters"
    ),
    "cnn without image_shape": (_run('[model]\nkind = "cnn"\n' + QUICK), 2, "image_shape"),
    "cnn with a bad image_shape": (
        _run('[model]\nkind = "cnn"\nimage_shape = [3, 7]\n' + QUICK), 2, "model.image_shape"
    ),
    "ledger = '.'": (
        _run(SCHEMA + '[privacy]\nmode = "sample"\nepsilon = 1\nledger = "."\n' + QUICK), 2,
        "is a folder",
    ),
    "lr = inf": (_run("[training]\nlr = inf\n"), 2, "finite number"),
    "lr = nan": (_run("[training]\nlr = nan\n"), 2, "finite number"),
    "lr = 1e300 (every update rejected)": (
        _run("[training]\nrounds = 2\nlr = 1e300\n[audit]\nenabled = false\n"), 2,
        "never trained",
    ),
    "rounds = true": (_run("[training]\nrounds = true\n"), 2, "true/false is not one"),
    "rounds = '5'": (_run('[training]\nrounds = "5"\n'), 2, "not text"),
    "server_lr = 5.8e39 (the server step overflows float32)": (
        _run("[training]\nrounds = 1\nlocal_epochs = 1\nserver_lr = 5.8e39\n"
             "[audit]\nenabled = false\n"), 2, "training diverged",  # fmt: skip
    ),
    "max = inf in a schema": (
        _run('[data.schema.age]\ntype = "numeric"\nmin = 0\nmax = inf\n' + QUICK), 2,
        "finite number",
    ),
    "min/max span overflows": (
        _run('[data.schema.age]\ntype = "numeric"\nmin = -1e308\nmax = 1e308\n' + QUICK), 2,
        "max - min",
    ),
    "config is a FIFO": (
        lambda tmp: (os.mkfifo(tmp / "c.toml"), ["run", "-c", tmp / "c.toml"])[1], 2, "FIFO"
    ),
    "config is not UTF-8": (
        lambda tmp: ((tmp / "c.toml").write_bytes(b"\xff\xfe[data]\n"),
                     ["run", "-c", tmp / "c.toml"])[1], 2, "UTF-8",  # fmt: skip
    ),
    # site files
    "symlink loop as a site": (
        _site_replaced(lambda p: p.symlink_to(p)), 2, "symbolic link loop"
    ),
    "FIFO as a site": (_site_replaced(lambda p: os.mkfifo(p)), 2, "FIFO"),
    "device as a site": (_site_replaced(lambda p: p.symlink_to("/dev/zero")), 2, "device"),
    "folder as a site": (_site_replaced(lambda p: p.mkdir()), 2, "folder"),
    "garbage .csv.gz": (
        _site_replaced(lambda p: p.write_bytes(b"garbage" * 20), "site_1.csv.gz"), 2,
        "cannot read",
    ),
    "truncated .csv.gz": (_site_replaced(_truncated_gz, "site_1.csv.gz"), 2, "truncated"),
    "gzip of binary noise": (
        _site_replaced(lambda p: p.write_bytes(gzip.compress(bytes(range(256)) * 64)),
                       "site_1.csv.gz"), 2, "site 's1'",  # fmt: skip
    ),
    "non-UTF-8 site": (
        _site_replaced(lambda p: p.write_bytes(b"age,death\n\xff\xfe,1\n")), 2, "UTF-8"
    ),
    "padded and duplicated header": (
        _header("chol", "death ", (0, 1, 2)), 2, "names a column more than once"
    ),
    "exact duplicate header": (_header("chol", "age", (0, 1, 2)), 2, "more than once"),
    "empty header name": (_header("chol", "", (0, 1, 2)), 2, "has no name"),
    "schema infer: outcome,outcome ": (_infer("outcome,outcome "), 2, "more than once"),
    "schema infer: one huge value": (
        lambda tmp: ((tmp / "a.csv").write_text("x,death\n9007405637566464,1\n"),
                     ["schema", "infer", tmp / "a.csv"])[1], 0, "review it",  # fmt: skip
    ),
    "schema infer: values a denormal apart": (
        lambda tmp: ((tmp / "a.csv").write_text("x,death\n0,1\n5e-324,0\n"),
                     ["schema", "infer", tmp / "a.csv"])[1], 0, "review it",  # fmt: skip
    ),
    "schema infer: two values near the largest float (their mean overflows)": (
        lambda tmp: ((tmp / "a.csv").write_text("x,death\n1.7e308,1\n1.7e308,0\n1,1\n1.6e308,0\n"),
                     ["schema", "infer", tmp / "a.csv"])[1], 0, "review it",  # fmt: skip
    ),
    "schema infer: values spanning more than a float": (
        lambda tmp: ((tmp / "a.csv").write_text("x,death\n-1e308,1\n1e308,0\n"),
                     ["schema", "infer", tmp / "a.csv"])[1], 2, "declare its bounds",  # fmt: skip
    ),
    "carriage return inside a header name": (
        _site_replaced(lambda p: p.write_bytes(b"age\rx,death\n1,2\n")), 2, "header row"
    ),
    "run --resume ''": (lambda tmp: ["run", "--resume", ""], 2, "No interrupted run"),
    "run --resume /": (lambda tmp: ["run", "--resume", "/"], 2, "names no run folder"),
    "report on a results.json nested 100,000 deep": (
        lambda tmp: ((tmp / "r").mkdir(), (tmp / "r" / "results.json").write_text(
            "[" * 100_000 + "]" * 100_000), ["report", tmp / "r"])[-1], 2, "too deeply",
    ),  # fmt: skip
    "report on a results.json of the wrong shape": (
        lambda tmp: ((tmp / "r").mkdir(), (tmp / "r" / "results.json").write_text(
            '{"schema": "privml-results/1", "metrics": 5}'), ["report", tmp / "r"])[-1], 0,
        "",  # rendered as far as it goes, without a traceback
    ),  # fmt: skip
    "model.sig with an unknown algorithm or extra field": (
        _sig(b'{"format": "privml-signature/1", "algorithm": "none", "key_id": "k", '
             b'"public_key": "", "files": {}, "signature": "", "extra": 1}'), 4,
        "unexpected or missing fields",
    ),  # fmt: skip
    # queries and flags
    "query --epsilon 1e-320": (
        lambda tmp: ["query", "count()", "--site", "hospital_a", "--epsilon", "1e-320"], 2,
        "'epsilon'",
    ),
    "query --epsilon nan": (
        lambda tmp: ["query", "count()", "--site", "hospital_a", "--epsilon", "nan"], 2,
        "'epsilon'",
    ),
    "dp epsilon, PLD, tiny noise": (
        lambda tmp: ["dp", "epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1e-300",
                     "--steps", "10", "--delta", "1e-5"], 2, "noise_multiplier",  # fmt: skip
    ),
    "dp epsilon, RDP, huge noise": (
        lambda tmp: ["dp", "epsilon", "--sampling-rate", "0.1", "--noise-multiplier", "1e300",
                     "--steps", "10", "--delta", "1e-5", "--accountant", "rdp"], 2,
        "cannot evaluate",  # fmt: skip
    ),
    "dp noise, epsilon 1e-300": (
        lambda tmp: ["dp", "noise", "--sampling-rate", "0.1", "--epsilon", "1e-300",
                     "--steps", "10", "--delta", "1e-5"], 2, "target_epsilon",  # fmt: skip
    ),
    "flower run --round-timeout nan": (
        lambda tmp: ["flower", "run", "--round-timeout", "nan"], 2, "--round-timeout"
    ),
    "sweep --epsilons 1e-300": (
        lambda tmp: ["sweep", "-c", _study(tmp, SCHEMA + QUICK), "--epsilons", "1e-300",
                     "--out", tmp / "out"], 2, "[0.01, 1000]",  # fmt: skip
    ),
    "verify a missing folder": (lambda tmp: ["verify", tmp / "nonexistent"], 2, "not found"),
    "verify a file": (
        lambda tmp: ((tmp / "f").write_text("x"), ["verify", tmp / "f"])[1], 2, "is a file"
    ),
    # signatures and model files
    "model.sig nested 100,000 deep": (_sig(b"[" * 100_000 + b"]" * 100_000), 4, "model.sig"),
    "model.sig nested 20,000 deep": (_sig(b"[" * 20_000 + b"]" * 20_000), 4, "too deeply"),
    "model.sig a list": (_sig(b"[1, 2]"), 4, "not a valid privml signature"),
    "model.sig not UTF-8": (_sig(b"\xff\xfe\x00"), 4, "UTF-8"),
    "model.sig with NaN": (_sig(b'{"key_id": NaN}'), 4, "NaN"),
    "model.sig a FIFO": (
        lambda tmp: (_sig(b"{}")(tmp), (tmp / "model" / "model.sig").unlink(),
                     os.mkfifo(tmp / "model" / "model.sig"), ["verify", tmp / "model"])[-1],
        4, "FIFO",  # fmt: skip
    ),
    "signed model.json that is a list": (_signed_model(b"[1, 2, 3]"), 2, "unknown model format"),
    "signed model.json not UTF-8": (_signed_model(b"\xff\xfe{}"), 2, "UTF-8"),
    "signed model.json nested deep": (
        _signed_model(b'{"format": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 2, "too deeply"
    ),
    "signed model.json with a bad architecture": (
        _signed_model(json.dumps({"format": "privml-model/1", "architecture": [],
                                  "weights_sha256": "x"}).encode()),  # fmt: skip
        2, "weights_sha256",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_gets_one_clear_message(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default ledger (runs/...) lands here
    make, code, fragment = CASES[case]
    argv = make(tmp_path)
    got, out, err = cli(capsys, *argv)
    assert got == code, (got, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert fragment in err, (fragment, err)
    assert "interrupted\n" not in err  # never the Ctrl-C message
    left = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".partial") or p.name == "out"]
    assert left == [], left


def test_privml_debug_shows_the_traceback_and_nothing_else_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _deep_toml(tmp_path)
    for value in ("", "0", "false"):
        monkeypatch.setenv("PRIVML_DEBUG", value)
        code, _, err = cli(capsys, *argv)
        assert code == 2 and "Traceback" not in err
    monkeypatch.setenv("PRIVML_DEBUG", "1")
    from privml.cli import main
    from privml.errors import ConfigError

    with pytest.raises(ConfigError, match="too deeply"):
        main([str(a) for a in argv])


def test_an_unforeseen_error_is_an_internal_error_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import privml.config as config

    def boom(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(config, "load_config", boom)
    monkeypatch.delenv("PRIVML_DEBUG", raising=False)
    code, _, err = cli(capsys, "budget")
    assert code == 1 and "internal error: ZeroDivisionError: a bug" in err
    assert "PRIVML_DEBUG=1" in err and "Traceback" not in err
