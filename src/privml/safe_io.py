"""Reading what users hand to privml, safely: regular files only, bounded sizes and nesting.

Every file privml reads on a user's behalf (configs, site files, checkpoints, model and
signature files) goes through :func:`check_regular_file` or :func:`open_regular` first, so a
FIFO (which would block forever), a device, a socket, a folder or a symbolic-link loop is
refused with a clear message before anything is opened for reading. Structured text is
parsed with a size limit and a nesting limit (:func:`loads_json_bounded`), so a hostile file
gets an error naming it, never a ``RecursionError`` or a memory blow-up.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from privml.errors import DataError, PrivmlError

__all__ = [
    "MAX_NESTING",
    "check_regular_file",
    "loads_json_bounded",
    "nesting_depth",
    "open_regular",
    "read_bytes_bounded",
    "read_json_bounded",
    "resolve_path",
]

#: Deepest nesting of lists/tables accepted in any JSON or TOML document privml reads.
MAX_NESTING = 64

ErrorFactory = Callable[[str], PrivmlError]


def resolve_path(path: str | Path) -> Path:
    """``Path(path).resolve()``, or the absolute, normalised path when resolving fails (a
    symbolic-link loop): the loop is then reported by whatever opens the file."""
    p = Path(path)
    try:
        return p.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(p))


def _describe(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a regular file"
    return "not a regular file"


def check_regular_file(
    path: str | Path, *, what: str = "file", error: ErrorFactory = DataError
) -> os.stat_result:
    """Refuse ``path`` unless it is (a symbolic link to) a regular file; nothing is opened.

    Raises:
        ``error(message)`` (default :class:`DataError`): missing, a folder, a FIFO, a device,
        a socket, a symbolic-link loop, or unreadable metadata.
    """
    p = str(path)
    try:
        st = os.stat(p)  # follows symbolic links; a loop raises ELOOP
    except FileNotFoundError:
        raise error(f"{what} {p!r} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{what} {p!r} is a symbolic link loop; point it at a real file") from None
        if exc.errno == errno.ENOTDIR:
            raise error(f"{what} {p!r} not found (a part of the path is a file)") from None
        raise error(f"{what} {p!r} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{what} {p!r} is {_describe(st.st_mode)}; privml reads regular files only"
        )
    return st


def open_regular(
    path: str | Path, *, what: str = "file", error: ErrorFactory = DataError
) -> IO[bytes]:
    """Open a regular file for reading (binary), refusing special files before and after.

    The file is opened non-blocking (so a FIFO swapped in after the check cannot block) and
    checked again on the open descriptor.
    """
    check_regular_file(path, what=what, error=error)
    p = str(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(p, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{what} {p!r} cannot be opened: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{what} {p!r} is {_describe(st.st_mode)}; privml reads regular files only"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes_bounded(
    path: str | Path, *, max_bytes: int, what: str = "file", error: ErrorFactory = DataError
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes (else ``error``)."""
    with open_regular(path, what=what, error=error) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise error(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(
            f"{what} {str(path)!r} is larger than {max_bytes:,} bytes; privml refuses it"
        )
    return data


def nesting_depth(obj: Any) -> int:
    """How deeply lists and dicts nest in ``obj`` (0 for a scalar); iterative, never recursive."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((c, depth) for c in children)
    return deepest


def loads_json_bounded(
    data: str | bytes,
    *,
    what: str,
    max_depth: int = MAX_NESTING,
    error: ErrorFactory = DataError,
) -> Any:
    """Parse JSON text, refusing invalid UTF-8 or JSON, non-standard numbers (``NaN``,
    ``Infinity``) and nesting deeper than ``max_depth``, with ``error`` naming ``what``."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"{what} is not UTF-8 text") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard number {name}")

    try:
        doc = json.loads(data, parse_constant=no_constants)
    except RecursionError:
        raise error(f"{what} nests lists/objects too deeply (limit {max_depth})") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON ({exc})") from None
    if nesting_depth(doc) > max_depth:
        raise error(f"{what} nests lists/objects too deeply (limit {max_depth})")
    return doc


def read_json_bounded(
    path: str | Path,
    *,
    max_bytes: int,
    what: str = "file",
    max_depth: int = MAX_NESTING,
    error: ErrorFactory = DataError,
) -> Any:
    """Read and parse a JSON file with the limits of :func:`read_bytes_bounded` and
    :func:`loads_json_bounded`."""
    data = read_bytes_bounded(path, max_bytes=max_bytes, what=what, error=error)
    return loads_json_bounded(data, what=f"{what} {str(path)!r}", max_depth=max_depth, error=error)
