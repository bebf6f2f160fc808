"""Runs benchmark scripts, each in a forked child of one process that imported the heavy
modules (torch, pandas, scikit-learn, privml's pipeline) once (not a test module).

Every quick run in a fresh interpreter paid 3-5 s of imports before its first line of work;
a forked child starts with them done and otherwise runs the script as ``python SCRIPT ARGS``
would: ``__main__``, its own argv, working folder, environment, stdout and stderr, exit code,
and the interpreter's exit handlers at the end. Requests are JSON lines on stdin
(``{"script", "args", "cwd", "log", "timeout"}``); each answer is a JSON line
``{"code": exit code}`` (negative: killed by that signal, as subprocess reports it).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import sys
import traceback

import matplotlib

matplotlib.use("Agg")

import numpy  # noqa: E402,F401
import pandas  # noqa: E402,F401
import sklearn  # noqa: E402,F401
import torch  # noqa: E402,F401

import privml.pipeline  # noqa: E402,F401


def _child(req: dict[str, object]) -> int:
    os.chdir(str(req["cwd"]))
    fd = os.open(str(req["log"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.alarm(int(req["timeout"]))  # SIGALRM's default action ends the child
    script = str(req["script"])
    sys.argv = [script, *map(str, req["args"])]  # type: ignore[call-overload]
    sys.path.insert(0, os.path.dirname(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
