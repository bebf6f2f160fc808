"""Bearer API tokens, stored hashed.

A token is ``privml_`` followed by 32 random bytes from :mod:`secrets` (256 bits, URL-safe
base64). It is shown once, when it is created; the server keeps only its SHA-256 digest in
``<state_dir>/tokens.json`` (mode 0600, replaced atomically). A fast unsalted hash is the right
tool here: the token is uniformly random with 256 bits of entropy, so there is nothing to guess
and nothing a slow password hash would protect (scrypt or bcrypt are for low-entropy passwords,
and would cost tens of milliseconds on every request). Comparison is constant-time
(:func:`hmac.compare_digest` against every active digest).

Every worker process re-reads the file when its modification time or size changes, so a
revocation takes effect on the next request everywhere, without a restart. Changes (``add``,
``revoke``) hold an exclusive ``flock`` on ``tokens.json.lock`` across the read, the change and
the atomic replace, so concurrent operators never lose each other's tokens.

A token may carry a lifetime **budget in patients** (``tokens add NAME --budget N``); the server
counts every prediction against it (see :class:`privml.serve.store.StateStore`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privml.errors import UsageError

TOKEN_PREFIX = "privml_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
#: Longest Authorization value examined; anything longer is refused before hashing.
MAX_TOKEN_CHARS = 256
_FORMAT = "privml-serve-tokens/1"


def check_token_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(
            "The 'name' parameter must be 1-64 characters: letters, digits, '_', '.', '@', '-', "
            f"starting with a letter or digit. Got {name!r} instead."
        )
    return name


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def write_private_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class TokenInfo:
    """A token's public record (never the token, never its digest)."""

    name: str
    created: float
    revoked: float | None
    budget: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "created": self.created, "revoked": self.revoked,
                "budget_patients": self.budget}


class TokenStore:
    """The token file of one state folder.

    ``add`` and ``revoke`` are meant for the operator's command line (``privml serve tokens``);
    ``verify`` for the server, on every request.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "tokens.json"
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._active: list[tuple[str, str]] = []  # (digest, name)
        self._budgets: dict[str, int | None] = {}

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """An exclusive lock across processes for a read-modify-write of the file."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- file -------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": _FORMAT, "tokens": []}
        except OSError as exc:
            raise UsageError(f"cannot read {str(self.path)!r}: {exc.strerror or exc}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise UsageError(f"{str(self.path)!r} is not valid JSON ({exc}); restore it or "
                             "delete it and create new tokens") from None
        if (
            not isinstance(data, dict)
            or data.get("format") != _FORMAT
            or not isinstance(data.get("tokens"), list)
            or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                       for t in data["tokens"])
        ):
            raise UsageError(f"{str(self.path)!r} is not a privml token file")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_atomic(self.path, (json.dumps(data, indent=2) + "\n").encode())

    # -- operator ---------------------------------------------------------------------------

    def add(self, name: str, *, budget: int | None = None) -> str:
        """Create a token for ``name`` and return it. The caller shows it once; it is not kept.

        ``budget``: lifetime budget in patients (None: the server's default)."""
        check_token_name(name)
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
        ):
            raise UsageError(
                f"The 'budget' parameter must be a positive number of patients. Got {budget!r}."
            )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._exclusive():
            data = self._read()
            if any(t["name"] == name and t.get("revoked") is None for t in data["tokens"]):
                raise UsageError(
                    f"an active token named {name!r} exists; revoke it first "
                    f"(`privml serve tokens revoke {name}`) or pick another name"
                )
            data["tokens"].append(
                {"name": name, "sha256": _digest(token), "created": time.time(),
                 "revoked": None, "budget_patients": budget}
            )
            self._write(data)
        return token

    def revoke(self, name: str) -> int:
        """Revoke every active token named ``name``; returns how many were revoked."""
        check_token_name(name)
        with self._exclusive():
            data = self._read()
            n = 0
            for t in data["tokens"]:
                if t["name"] == name and t.get("revoked") is None:
                    t["revoked"] = time.time()
                    n += 1
            if not n:
                raise UsageError(f"no active token named {name!r}; see `privml serve tokens list`")
            self._write(data)
        return n

    def list(self) -> list[TokenInfo]:
        return [
            TokenInfo(str(t["name"]), float(t["created"]), t.get("revoked"),
                      t.get("budget_patients"))
            for t in self._read()["tokens"]
        ]

    def budget(self, name: str) -> int | None:
        """The lifetime budget (patients) of the active token ``name``; None: no own budget."""
        with self._lock:
            self._refresh()
            return self._budgets.get(name)

    # -- server -----------------------------------------------------------------------------

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            # a rewrite is a rename: the inode changes even within one mtime tick
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return
        data = self._read()
        active = [t for t in data["tokens"]
                  if t.get("revoked") is None and isinstance(t.get("sha256"), str)]
        self._active = [(str(t["sha256"]), str(t["name"])) for t in active]
        self._budgets = {
            str(t["name"]): b if isinstance(b := t.get("budget_patients"), int) else None
            for t in active
        }
        self._stamp = stamp

    def verify(self, token: str) -> str | None:
        """The name of the active token equal to ``token``, else None (constant-time compare)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            return None
        with self._lock:
            self._refresh()
            active = list(self._active)
        digest = _digest(token)
        found: str | None = None
        for stored, name in active:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(stored, digest):
                found = name
        return found

    def count_active(self) -> int:
        with self._lock:
            self._refresh()
            return len(self._active)
