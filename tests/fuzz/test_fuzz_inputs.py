"""Property-based fuzzing of everything a user hands to privml, through the command line.

Generated hostile configs (structured and raw TOML), site files (CSV, gzip, Parquet, raw
bytes), checkpoints, signature files and command-line flags: every case must end with a
documented exit code and one message, never a traceback or an internal error. The counts per
category are in docs/reliability.md; together they are over 1,000 generated bad inputs per run.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from privml.config import Config
from privml.fl import checkpoint as ck
from tests.data.sites import five_line_config, write_sites
from tests.fuzz.hostile import (
    FLOATS,
    HOSTILE,
    INTS,
    NAME,
    NUMBER_TEXT,
    TEXT,
    VALUES,
    Deep,
    Tally,
    check,
    cwd,
    fuzz_settings,
    json_text,
    mutate_bytes,
    toml_doc,
    toml_value,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

#: Cases per category and run (docs/reliability.md keeps this table).
N_CONFIG = 300
N_TOML_TEXT = 120
N_CSV = 300
N_CHECKPOINT = 150
N_SIGNATURE = 250
N_FLAGS = 250

BASE: dict[str, Any] = {
    "name": "fuzz",
    "data": {"target": "death", "positive": "dead"},
    "training": {"rounds": 1, "local_epochs": 1},
    "audit": {"enabled": False},
    "output": {"html": False},
}


def _sections() -> dict[str, list[str]]:
    """Every config key, by section, read off the config model itself."""
    out: dict[str, list[str]] = {"": ["name", "no_such_key"]}
    for name, f in Config.model_fields.items():
        ann = f.annotation
        model = next((a for a in getattr(ann, "__args__", (ann,)) if hasattr(a, "model_fields")),
                     None)  # fmt: skip
        if model is not None:
            out[name] = [*(fi.alias or k for k, fi in model.model_fields.items()), "no_such_key"]
    return out


SECTIONS = _sections()
KEYS = [(s, k) for s, keys in SECTIONS.items() for k in keys]
PATHS = st.sampled_from(
    ["site_0.csv", ".", "/", "/dev/null", "/dev/zero", "missing.csv", "privml.toml", "sub/x",
     "", "site_0.csv/inside", "loop.csv"]  # fmt: skip
)


def _sites(folder: Path) -> list[Path]:
    paths = write_sites(folder, sizes=(30, 20, 20))
    loop = folder / "loop.csv"
    if not loop.is_symlink():
        loop.symlink_to(loop)
    return paths


def _sites_entry(paths: list[Path]) -> list[dict[str, str]]:
    return [{"name": f"s{i}", "path": p.name} for i, p in enumerate(paths)]


@st.composite
def hostile_configs(draw: Any) -> dict[str, Any]:
    """The tiny base config with one to three keys set to hostile values."""
    doc = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 3))):
        section, key = draw(st.sampled_from(KEYS))
        if key in ("path", "ledger", "dir") or (section, key) == ("data", "sites"):
            value: Any = draw(st.one_of(PATHS, HOSTILE))
        else:
            value = draw(HOSTILE)
        if section == "data" and key == "sites" and draw(st.booleans()):
            value = [{"name": draw(NAME), "path": draw(PATHS)}]
        target = doc if not section else doc.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    return doc


def test_generated_configs(tmp_path: Path) -> None:
    tally = Tally("configs")
    paths = _sites(tmp_path)

    @fuzz_settings(N_CONFIG)
    @given(doc=hostile_configs(), with_out=st.booleans())
    def case(doc: dict[str, Any], with_out: bool) -> None:
        doc.setdefault("data", {}).setdefault("sites", _sites_entry(paths))
        if isinstance(doc["data"], dict) and doc["data"].get("sites") is None:
            doc["data"]["sites"] = _sites_entry(paths)
        cfg = tmp_path / "privml.toml"
        cfg.write_text(toml_doc(doc))
        out = tmp_path / f"out{tally.total}"
        argv: list[Any] = ["run", "-c", cfg] + (["--out", out] if with_out else [])
        with cwd(tmp_path):
            check(tally, argv)
        for p in tmp_path.iterdir():  # keep the data, drop whatever the case wrote
            if p.name.startswith(("out", "runs", "fuzz-")) or p.name.endswith(".partial"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    case()
    assert tally.total >= N_CONFIG, tally


@st.composite
def toml_texts(draw: Any) -> bytes:
    """A valid config's text with byte-level edits, or text assembled from TOML-ish tokens."""
    base = toml_doc({**BASE, "data": {**BASE["data"], "sites": [{"name": "s0",
                                                                   "path": "site_0.csv"}]}})
    if draw(st.booleans()):
        data = base.encode()
        for _ in range(draw(st.integers(1, 4))):
            data = mutate_bytes(data, draw)
        return data
    tokens = st.sampled_from(["[", "]", "{", "}", "=", ",", '"', "'", "\n", "[[data.sites]]",
                              "[data]", "x", "1", "inf", "nan", "true", "#", ".", " ", '"""'])
    return "".join(draw(st.lists(tokens, max_size=60))).encode()  # fmt: skip


def test_generated_toml_text(tmp_path: Path) -> None:
    tally = Tally("toml text")
    _sites(tmp_path)

    @fuzz_settings(N_TOML_TEXT)
    @given(data=toml_texts())
    def case(data: bytes) -> None:
        cfg = tmp_path / "privml.toml"
        cfg.write_bytes(data)
        with cwd(tmp_path):
            check(tally, ["run", "-c", cfg, "--out", tmp_path / "out"])
        shutil.rmtree(tmp_path / "out", ignore_errors=True)

    case()
    assert tally.total >= N_TOML_TEXT, tally


# ---- site files -------------------------------------------------------------------------------

HEADER_NAMES = st.one_of(
    st.sampled_from(["age", "sex", "chol", "smoker", "death", " death", "death ", "", "age",
                     "Unnamed: 0", "a.1"]),  # fmt: skip
    TEXT,
)
CELLS = st.one_of(
    st.sampled_from(["", "NA", "inf", "-inf", "nan", "1e308", "-0", "F", "M", "dead", "alive",
                     "never", "current", "?", "1e-320", '"', "a,b"]),  # fmt: skip
    INTS.map(str),
    FLOATS.map(repr),
    TEXT,
)


@st.composite
def site_files(draw: Any) -> tuple[str, bytes]:
    """(file name, content) of a hostile site file."""
    kind = draw(st.sampled_from(["table", "table", "table", "raw", "gzip", "bad_gzip", "parquet",
                                 "utf16"]))  # fmt: skip
    if kind == "raw":
        return "site_1.csv", draw(st.binary(max_size=400))
    if kind == "parquet":
        return "site_1.parquet", draw(st.binary(max_size=300))
    header = draw(st.lists(HEADER_NAMES, max_size=7))
    if draw(st.booleans()):
        header = ["age", "sex", "chol", "smoker", "death"]
    rows = draw(st.lists(st.lists(CELLS, max_size=7), max_size=15))
    buf = io.StringIO()
    if draw(st.booleans()):
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
    else:  # no quoting: unbalanced quotes and stray separators as written
        buf.write("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    text = buf.getvalue()
    if kind == "utf16":
        return "site_1.csv", text.encode("utf-16")
    data = text.encode("utf-8", "surrogatepass")
    if kind == "gzip":
        return "site_1.csv.gz", gzip.compress(data)
    if kind == "bad_gzip":
        z = gzip.compress(data)
        return "site_1.csv.gz", mutate_bytes(z, draw)
    return "site_1.csv", data


def test_generated_site_files(tmp_path: Path) -> None:
    tally = Tally("site files")
    paths = _sites(tmp_path)

    @fuzz_settings(N_CSV)
    @given(site=site_files(), infer=st.booleans())
    def case(site: tuple[str, bytes], infer: bool) -> None:
        name, content = site
        for old in tmp_path.glob("site_1.*"):
            old.unlink()
        f = tmp_path / name
        f.write_bytes(content)
        files = [paths[0], f, paths[2]]
        config = five_line_config(
            tmp_path, files, "[training]\nrounds = 1\nlocal_epochs = 1\n[audit]\nenabled = "
            "false\n[output]\nhtml = false\n"
        )  # fmt: skip
        with cwd(tmp_path):
            if infer:
                check(tally, ["schema", "infer", f, "--target", "death"], expect={0, 2})
            else:
                check(tally, ["run", "-c", config, "--out", tmp_path / "out"], expect={0, 2})
        shutil.rmtree(tmp_path / "out", ignore_errors=True)

    case()
    assert tally.total >= N_CSV, tally


# ---- checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .partial folder of a run killed after round 2 of 3."""
    from privml.config import parse_config
    from privml.pipeline import run

    cfg = parse_config(
        {"data": {"dataset": "breast_cancer", "n_sites": 3},
         "training": {"rounds": 3, "local_epochs": 1}, "audit": {"enabled": False},
         "output": {"html": False}},
        name="fuzzck",
    )  # fmt: skip

    def crash(rec: Any) -> None:
        if rec.round == 2:
            raise KeyboardInterrupt

    folder = tmp_path_factory.mktemp("ck") / "run"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out_dir=folder, on_round=crash)
    return ck.partial_dir(folder)


def _header_edit(data: bytes, draw: Any) -> bytes:
    """Re-serialise the signed header with hostile changes; keep the old signature."""
    n = len(ck.MAGIC)
    hlen = int.from_bytes(data[n : n + 4], "big")
    header = json.loads(data[n + 4 : n + 4 + hlen])
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*header, "extra"]))
        header[key] = draw(HOSTILE)
    hb = json_text(header).encode()
    return data[:n] + len(hb).to_bytes(4, "big") + hb + data[n + 4 + hlen :]


def test_generated_checkpoints(tmp_path: Path, interrupted: Path) -> None:
    tally = Tally("checkpoints")
    counter = itertools.count()

    @fuzz_settings(N_CHECKPOINT)
    @given(data=st.data())
    def case(data: Any) -> None:
        which = data.draw(st.sampled_from([ck.STATE_FILE, ck.RUN_FILE]))
        how = data.draw(st.sampled_from(["bytes", "bytes", "header", "empty", "swap", "random"]))
        final = tmp_path / f"r{next(counter)}"
        partial = ck.partial_dir(final)
        shutil.copytree(interrupted, partial)
        target = partial / (which if which == ck.RUN_FILE else f"checkpoint/{which}")
        original = target.read_bytes()
        if how == "bytes":
            new = original
            for _ in range(data.draw(st.integers(1, 3))):
                new = mutate_bytes(new, data.draw)
        elif how == "header":
            new = _header_edit(original, data.draw)
        elif how == "empty":
            new = b""
        elif how == "swap":
            other = partial / ck.RUN_FILE if which == ck.STATE_FILE else (
                partial / "checkpoint" / ck.STATE_FILE)  # fmt: skip
            new = other.read_bytes()
        else:
            new = data.draw(st.binary(max_size=512))
        target.write_bytes(new)
        expect = {0} if new == original else {4}
        with cwd(tmp_path):
            check(tally, ["run", "--resume", final], expect=expect)
        if new != original:
            assert not final.exists()  # nothing signed from what did not verify
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)

    case()
    assert tally.total >= N_CHECKPOINT, tally


# ---- signatures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from privml.signing import sign_model_dir

    d = tmp_path_factory.mktemp("signed") / "model"
    d.mkdir()
    (d / "model.json").write_text(json.dumps({"format": "privml-model/1", "x": [1, 2]}))
    (d / "model.pt").write_bytes(b"\x80\x02weights")
    sign_model_dir(d)
    return d


@st.composite
def signature_edits(draw: Any) -> tuple[str, bytes | None]:
    """(file to change, new content); content None leaves everything as signed."""
    how = draw(st.sampled_from(["json", "field", "bytes", "deep", "binary", "model", "none"]))
    if how == "none":
        return "model.sig", None
    if how == "json":
        return "model.sig", json_text(draw(VALUES)).encode()
    if how == "deep":
        n = draw(st.integers(5, 200_000))
        opener = draw(st.sampled_from(["[", '{"a":']))
        closer = "]" if opener == "[" else "}"
        return "model.sig", (opener * n + "1" + closer * n).encode()
    if how == "binary":
        return "model.sig", draw(st.binary(max_size=512))
    return ("model.json" if draw(st.booleans()) else "model.pt"), b""  # placeholder, see below


def test_generated_signatures(tmp_path: Path, signed: Path) -> None:
    tally = Tally("signatures")
    counter = itertools.count()
    sig_doc = json.loads((signed / "model.sig").read_text())

    @fuzz_settings(N_SIGNATURE)
    @given(edit=signature_edits(), data=st.data())
    def case(edit: tuple[str, bytes | None], data: Any) -> None:
        d = tmp_path / f"m{next(counter)}"
        shutil.copytree(signed, d)
        name, content = edit
        if content is not None and name != "model.sig":  # edit a signed file's bytes
            original = (d / name).read_bytes()
            content = mutate_bytes(original, data.draw)
            changed = content != original
        elif content is None and data.draw(st.booleans()):  # edit one field of the signature
            doc = dict(sig_doc)
            doc[data.draw(st.sampled_from([*doc, "extra"]))] = data.draw(HOSTILE)
            content = json_text(doc).encode()
            changed = doc != sig_doc
        else:
            changed = content is not None
        if content is not None:
            (d / name).write_bytes(content)
        check(tally, ["verify", d], expect={4} if changed else {0, 4})
        shutil.rmtree(d)

    case()
    assert tally.total >= N_SIGNATURE, tally


# ---- command-line flags -----------------------------------------------------------------------

EPSILON_LISTS = st.lists(
    st.sampled_from(["0", "-1", "nan", "inf", "1e-300", "1e300", "x", "", "1e-320", "0.0"]),
    min_size=1, max_size=4,
).map(",".join)  # fmt: skip
QUERIES = st.one_of(
    st.sampled_from(["count()", "mean(age)", "histogram(sex)", "quantile(age, 2)", "count(",
                     "mean()", "sum(age) by sex", "(" * 3000, "count()" * 500]),  # fmt: skip
    TEXT,
)


@st.composite
def argvs(draw: Any, tmp: Path) -> list[str]:
    cmd = draw(st.sampled_from(["query", "dp epsilon", "dp noise", "verify", "schema", "run",
                                "sweep", "budget", "report", "garbage"]))  # fmt: skip
    num = NUMBER_TEXT
    if cmd == "query":
        argv = ["query", draw(QUERIES), "--site", draw(st.sampled_from(["hospital_a", "x"])),
                "--epsilon", draw(num)]  # fmt: skip
        if draw(st.booleans()):
            argv += ["--delta", draw(num)]
        return argv
    if cmd == "dp epsilon":
        return ["dp", "epsilon", "--sampling-rate", draw(num), "--noise-multiplier", draw(num),
                "--steps", draw(num), "--delta", draw(num), "--accountant",
                draw(st.sampled_from(["pld", "rdp", "x"]))]  # fmt: skip
    if cmd == "dp noise":
        return ["dp", "noise", "--sampling-rate", draw(num), "--steps", draw(num), "--epsilon",
                draw(num), "--delta", draw(num), "--tolerance", draw(num)]  # fmt: skip
    if cmd == "verify":
        return ["verify", draw(st.sampled_from([str(tmp), "/", "/dev/null", "/nonexistent",
                                                str(tmp / "loop")]))]  # fmt: skip
    if cmd == "schema":
        return ["schema", "infer", draw(st.sampled_from(["/dev/null", "/nonexistent",
                                                         str(tmp / "loop"), str(tmp)]))]
    if cmd == "run":
        flag = draw(st.sampled_from(["--engine", "--resume", "--set", "--config"]))
        value = draw(st.one_of(TEXT, st.sampled_from(
            ["training.rounds=true", "training.lr=inf", "x=1", "training=1", "data.seed=-1",
             "/dev/null", str(tmp / "loop"), "privacy.epsilon=1e-300", "a.b.c.d=1"])))
        return ["run", flag, value, "--out", str(tmp / "out")]  # fmt: skip
    if cmd == "sweep":
        return ["sweep", "--epsilons", draw(EPSILON_LISTS), "--out", str(tmp / "sw")]
    if cmd == "budget":
        return ["budget", "-c", draw(st.sampled_from(["/dev/null", str(tmp / "loop"), "/"]))]
    if cmd == "report":
        return ["report", str(tmp / "results")]
    return draw(st.lists(TEXT, max_size=4))


RESULT_KEYS = ["metrics", "sites", "rounds", "privacy", "audit", "task", "model", "name",
               "updates", "federation", "config", "created"]  # fmt: skip


def test_generated_command_lines(tmp_path: Path) -> None:
    tally = Tally("flags")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "results").mkdir()

    @fuzz_settings(N_FLAGS)
    @given(data=st.data())
    def case(data: Any) -> None:
        argv = data.draw(argvs(tmp_path))
        if argv[:1] == ["report"]:
            doc = data.draw(st.one_of(
                VALUES,
                st.integers(5, 100_000).map(Deep),
                st.dictionaries(st.sampled_from(RESULT_KEYS), HOSTILE, max_size=4).map(
                    lambda d: {"schema": "privml-results/1", **d}),
            ))  # fmt: skip
            (tmp_path / "results" / "results.json").write_text(json_text(doc))
        with cwd(tmp_path):
            check(tally, argv)
        for p in ("out", "sw"):
            shutil.rmtree(tmp_path / p, ignore_errors=True)

    case()
    assert tally.total >= N_FLAGS, tally


def test_the_strategies_write_what_the_parsers_read() -> None:
    """Sanity: the TOML writer's output is TOML, hostile values included."""
    import math
    import tomllib

    doc = {"a": {"x": math.inf, "y": -0.0, "z": "q\"\\\n\x00", "w": [1, "a", {"k": True}],
                 "d": Deep(3)}}  # fmt: skip
    got = tomllib.loads(toml_value(doc["a"]).join(["v = ", "\n"]))["v"]
    assert got["x"] == math.inf and got["z"] == "q\"\\\n\x00" and got["d"] == [[[]]]
    assert FLOATS and INTS and NAME
