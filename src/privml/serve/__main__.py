"""``python -m privml.serve``: the same as ``privml serve`` (without loading the other commands)."""

from __future__ import annotations

import sys

import typer

from privml.errors import PrivmlError


def main() -> None:
    from privml.serve.cli import serve_app

    command = typer.main.get_command(serve_app)
    try:
        command.main(prog_name="privml serve", standalone_mode=False)
    except PrivmlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
