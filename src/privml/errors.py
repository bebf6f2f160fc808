"""The privml exception tree.

Every error a user can cause derives from :class:`PrivmlError` and from the builtin that
describes it (``ValueError`` for a bad value, ``TypeError`` for a wrong type, ...), so callers
can catch either. Messages name the offending field and say how to recover.

The command line maps these to exit codes: 2 for usage, configuration and data errors
(:class:`ConfigError`, :class:`SchemaError`, :class:`DataError`), 3 for a refused privacy
spend (:class:`BudgetExceededError`).
"""

from __future__ import annotations

from collections.abc import Iterable


class PrivmlError(Exception):
    """Base class of every error privml raises on purpose."""

    exit_code: int = 1


class UsageError(PrivmlError, ValueError):
    """A command-line or API argument is invalid."""

    exit_code = 2


class ConfigError(PrivmlError, ValueError):
    """A configuration file is invalid; ``problems`` lists every problem found, not the first."""

    exit_code = 2

    def __init__(self, problems: Iterable[str] | str, *, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        head = f"invalid configuration{f' in {source}' if source else ''}"
        if len(self.problems) == 1:
            msg = f"{head}: {self.problems[0]}"
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"{head} ({len(self.problems)} problems):\n{body}"
        super().__init__(msg)


class DataError(PrivmlError, ValueError):
    """A site's data file cannot be used. ``problems`` lists every problem found."""

    exit_code = 2

    def __init__(self, problems: Iterable[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"{len(self.problems)} problems in the data:\n{body}"
        super().__init__(msg)


class SchemaError(DataError):
    """Data does not match the declared public schema, or the schema itself is unusable."""


class BudgetExceededError(PrivmlError, ValueError):
    """A privacy spend was refused because it does not fit in the remaining budget."""

    exit_code = 3


class PrivacyLeakWarning(UserWarning):
    """Something was derived from private data without differential privacy."""


class InsecureOptionWarning(UserWarning):
    """An option that weakens security or privacy was explicitly turned on."""


class CryptoError(PrivmlError, ValueError):
    """Keys, contexts or ciphertexts are invalid, foreign or below the required security."""

    exit_code = 2


class SignatureError(PrivmlError, ValueError):
    """A model artifact's signature is missing or does not verify."""

    exit_code = 4
