"""Regenerate the benchmark tables in docs/ from the benchmarks' JSON results.

Run:  .venv/bin/python benchmarks/render_docs.py [--check] [--results DIR]

A docs page marks a generated table with two comments::

    <!-- bench:dpsgd:mlp -->
    (everything here is replaced)
    <!-- /bench -->

``dpsgd`` names ``benchmarks/results/dpsgd.json`` (written by a benchmark through
:class:`harness.Bench`), ``mlp`` one of its tables. The table is written with its caption and a
line saying when, with which command, on what machine and at what load it was measured.
``--check`` changes nothing and exits 1 when a page differs from what its JSON gives, or names a
table no JSON has, or when ``results/targets.json`` is not what ``targets.py`` collects from the
other results now (CI runs it, so a figure typed by hand into a generated table fails the
suite). Without ``--check`` the targets are collected again first (when results/ has them).
Without ``--check`` the pages are rewritten and the exit status is 1 when a table had no results.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import targets
from harness import HERE, RESULTS_DIR, conditions_line, markdown_table

DOCS = HERE.parent / "docs"
MARK = re.compile(
    r"(<!-- bench:(?P<name>[A-Za-z0-9_.-]+):(?P<table>[A-Za-z0-9_.-]+) -->\n)(?P<body>.*?)"
    r"(<!-- /bench -->)",
    re.S,
)


def render_block(data: dict, table: str) -> str:
    t = data["tables"][table]
    parts = []
    if t.get("caption"):
        parts.append(t["caption"])
        parts.append("")
    parts.append(markdown_table(t["columns"], t["rows"]))
    parts.append("")
    parts.append(conditions_line(data))
    return "\n".join(parts) + "\n"


def render_page(text: str, results: Path, missing: list[str]) -> str:
    cache: dict[str, dict | None] = {}

    def sub(m: re.Match[str]) -> str:
        name, table = m.group("name"), m.group("table")
        if name not in cache:
            p = results / f"{name}.json"
            cache[name] = json.loads(p.read_text()) if p.is_file() else None
        data = cache[name]
        if data is None or table not in data.get("tables", {}):
            missing.append(f"{name}:{table}")
            return m.group(0)
        return m.group(1) + render_block(data, table) + m.group(5)

    return MARK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--docs", type=Path, default=DOCS)
    args = ap.parse_args(argv)
    stale, missing = [], []
    # the targets tables first: collected from the other results (targets.py), so that adding
    # or re-running a benchmark and rendering keeps them current
    with contextlib.redirect_stdout(io.StringIO()):
        if args.check:
            if targets.stale(args.results):
                print(
                    "results/targets.json: not what targets.py collects from the other "
                    "results now (run benchmarks/render_docs.py)",
                    file=sys.stderr,
                )
                stale.append("targets.json")
        elif (args.results / "targets.json").is_file():
            targets.main(["--results", str(args.results)])
    for page in sorted(args.docs.glob("*.md")):
        text = page.read_text()
        new = render_page(text, args.results, missing)
        if new != text:
            stale.append(page.name)
            if not args.check:
                page.write_text(new)
    for m in missing:
        print(f"no results for table {m} (run its benchmark)", file=sys.stderr)
    if args.check:
        for s in stale:
            print(f"{s}: generated tables differ from benchmarks/results/", file=sys.stderr)
        return 1 if stale or missing else 0
    for s in stale:
        print(f"updated docs/{s}")
    return 1 if missing else 0  # the pages are rendered; a table without results is an error


if __name__ == "__main__":
    sys.exit(main())
