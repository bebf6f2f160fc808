"""Optional parts of privml and the packages each needs (the ``[project.optional-dependencies]``
of pyproject.toml).

The core (data, differential privacy in training, the in-process federation, the report)
imports none of these. A feature that needs an extra calls :func:`require` before it starts,
so a missing package is one clear error naming the pip command (exit code 2), never an
``ImportError`` traceback after minutes of training.
"""

from __future__ import annotations

import importlib.util

from privml.errors import PrivmlError

__all__ = ["EXTRAS", "MissingExtraError", "missing", "require"]

EXTRAS: dict[str, tuple[str, ...]] = {
    "he": ("tenseal", "phe", "gmpy2"),
    "serve": ("fastapi", "uvicorn", "httpx", "tenseal", "phe", "gmpy2"),
    "flower": ("flwr", "httpx"),
    "parquet": ("pyarrow",),
    "queries": ("opendp",),
}
"""extra -> the importable modules it provides (import names, not distribution names)."""


class MissingExtraError(PrivmlError, ImportError):
    """A feature was asked for whose optional dependencies are not installed."""

    exit_code = 2


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (empty when all are present)."""
    return [m for m in EXTRAS[extra] if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def require(extra: str, feature: str, *, alternative: str | None = None) -> None:
    """Raises :class:`MissingExtraError` unless every package of ``extra`` is installed.

    Args:
        extra: a key of :data:`EXTRAS`.
        feature: what the user asked for, in their terms (a command, a config key).
        alternative: another fix to offer (e.g. the config key that turns the feature off).
    """
    absent = missing(extra)
    if not absent:
        return
    msg = (
        f"{feature} needs privml's optional '{extra}' dependencies ({', '.join(absent)} "
        f"not installed). Install them with: pip install 'privml[{extra}]'"
    )
    if alternative:
        msg += f"; or {alternative}"
    raise MissingExtraError(msg)
