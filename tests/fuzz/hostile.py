"""Strategies for hostile input and the harness the fuzz tests share (not a test module).

Every generated case runs through ``privml.cli.main`` in this process. A case passes when the
exit code is documented (0, 2, 3, 4; never 1, the internal-error code) and nothing on stdout or
stderr is a traceback or an internal error.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from privml.cli import main

#: What a hostile input may legitimately end with (docs/reliability.md).
DOCUMENTED = frozenset({0, 2, 3, 4, 5})

#: ``PRIVML_FUZZ_EXPLORE=N`` draws new examples, N times as many per category; otherwise every
#: run replays the same derandomized examples, so a CI result never depends on the draw.
EXPLORE = int(os.environ.get("PRIVML_FUZZ_EXPLORE", "0") or 0)

FUZZ_SETTINGS = dict(
    derandomize=EXPLORE <= 0,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=list(HealthCheck),
    print_blob=True,  # a failure prints the line that reproduces it
)


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n * max(EXPLORE, 1), **FUZZ_SETTINGS)  # type: ignore[arg-type]


@dataclass
class Tally:
    """How many cases ran and which exit codes they got (reported when a test fails)."""

    name: str
    codes: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.codes.values())

    def add(self, code: int) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1


def run_cli(argv: Sequence[str | os.PathLike[str]]) -> tuple[int, str, str]:
    """``privml ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([os.fspath(a) for a in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def check(tally: Tally, argv: Sequence[Any], *, expect: set[int] | None = None) -> int:
    """Run one case and assert the one-error-path property; returns the exit code."""
    code, out, err = run_cli(argv)
    tally.add(code)
    shown = f"privml {' '.join(map(str, argv))[:400]}\n--- stderr ---\n{err[-2000:]}"
    assert code in DOCUMENTED, f"undocumented exit code {code}: {shown}"
    assert "Traceback" not in err and "Traceback" not in out, shown
    assert "internal error" not in err, shown
    if expect is not None:
        assert code in expect, f"exit {code}, expected one of {sorted(expect)}: {shown}"
    return code


@contextlib.contextmanager
def cwd(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


# ---- values -----------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
NAME = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=10)
#: Integers that are never valid-but-expensive: <= 0, tiny, or beyond every bound privml has.
INTS = st.one_of(
    st.integers(min_value=-(2**70), max_value=0),
    st.integers(min_value=1, max_value=3),
    st.integers(min_value=2**31, max_value=2**80),
)
SPECIAL_FLOATS = [
    0.0, -0.0, 5e-324, 1e-320, 1e-300, 1e-12, 1.0, 1e12, 1e300, 1e308, -1e308,
    math.inf, -math.inf, math.nan,
]  # fmt: skip
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(SPECIAL_FLOATS))
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), TEXT)


@dataclass(frozen=True)
class Deep:
    """A list nested ``depth`` deep (written directly: no recursion to serialise it)."""

    depth: int


VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(NAME, inner, max_size=3),
    max_leaves=8,
)
HOSTILE = st.one_of(SCALARS, VALUES, st.integers(20, 5000).map(Deep))
NUMBER_TEXT = st.one_of(
    FLOATS.map(repr),
    INTS.map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e-320", "", "abc", "0x10", "1_000", " 1", "\uff11",
                     "1e999", "-0", "0.5", "1", "2"]),  # fmt: skip
    TEXT,
)


# ---- TOML and JSON writers (hostile values included) -------------------------------------------


def toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, Deep):
        return "[" * v.depth + "]" * v.depth
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml_doc(doc: dict[str, Any]) -> str:
    """Top-level scalars first, then one [table] per dict (nested dicts inline)."""
    lines = [f"{toml_str(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{toml_str(k)}]")
            lines += [f"{toml_str(str(kk))} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def json_text(v: Any) -> str:
    """JSON with NaN/Infinity tokens and :class:`Deep` nesting left as written."""
    import json

    if isinstance(v, Deep):
        return "[" * v.depth + "]" * v.depth
    if isinstance(v, list):
        return "[" + ",".join(json_text(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{json_text(x)}" for k, x in v.items()) + "}"
    return json.dumps(v)


def mutate_bytes(data: bytes, draw: Any) -> bytes:
    """One random byte-level edit: flip, truncate, insert, delete, duplicate, or replace."""
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "dup", "replace"]))
    n = len(data)
    at = draw(st.integers(0, max(n - 1, 0)))
    if kind == "flip" and n:
        bit = draw(st.integers(0, 7))
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1 :]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=64)) + data[at:]
    if kind == "delete" and n:
        end = draw(st.integers(at + 1, min(n, at + 64)))
        return data[:at] + data[end:]
    if kind == "dup":
        return data + data[at:]
    return draw(st.binary(max_size=256))


def python_recursion_ok() -> None:
    """The fuzzers must not depend on a raised recursion limit."""
    assert sys.getrecursionlimit() <= 10_000
