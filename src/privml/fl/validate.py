"""Validation of incoming client updates, before any of them is aggregated.

A client update is untrusted input: it may come from a buggy or malicious site. Every update
is checked (numpy array, floating dtype, the model's flat shape, finite, L2 norm within the
configured bound); an update that fails is rejected with a reason, counted in results.json and
never averaged in. Only the accepted ones go on to :mod:`privml.fl.aggregate`::

    result = validate_updates(updates, n_params=n, max_norm=cfg.max_update_norm)
    stack = stack_accepted(updates, result)          # [n_accepted, n_params] float64
    weights = counts[result.accepted_indices]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import UsageError

__all__ = ["REJECTION_REASONS", "ValidationResult", "stack_accepted", "validate_updates"]

REJECTION_REASONS: tuple[str, ...] = ("type", "dtype", "shape", "non_finite", "norm", "weight")
"""Reason codes, in the order the checks run (an update gets the first that fails):
``type`` not a numpy array; ``dtype`` not a floating dtype; ``shape`` not ``(n_params,)``;
``non_finite`` NaN or Inf; ``norm`` L2 norm above ``max_norm``; ``weight`` the client's
self-reported weight (sample count) is not a finite number >= 0 (checked only when weights
are given)."""


@dataclass(frozen=True)
class ValidationResult:
    """Outcome of :func:`validate_updates`.

    Attributes:
        accepted_indices: positions (in the input list) of the accepted updates, ascending.
        rejected: ``(index, reason)`` pairs, reason one of :data:`REJECTION_REASONS`.
        n_params: the expected update length the updates were checked against.
        details: a human-readable message per rejected index (for logs).
    """

    accepted_indices: list[int]
    rejected: list[tuple[int, str]]
    n_params: int
    details: dict[int, str] = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        """JSON-friendly summary for results.json:
        ``{"accepted": k, "rejected": r, "by_reason": {reason: count, ...}}``."""
        by_reason = {reason: 0 for reason in REJECTION_REASONS}
        for _, reason in self.rejected:
            by_reason[reason] += 1
        return {
            "accepted": len(self.accepted_indices),
            "rejected": len(self.rejected),
            "by_reason": by_reason,
        }


def _check_one(update: object, n_params: int, max_norm: float | None) -> tuple[str, str] | None:
    if not isinstance(update, np.ndarray):
        return "type", f"is a {type(update).__name__}, not a numpy array"
    if update.dtype.kind != "f":
        return "dtype", f"has dtype {update.dtype}, not a floating dtype"
    if update.shape != (n_params,):
        return "shape", f"has shape {update.shape}, expected ({n_params},)"
    finite = np.isfinite(update)
    if not finite.all():
        return "non_finite", f"has {int((~finite).sum())} NaN or Inf entries"
    if max_norm is not None:
        norm = float(np.linalg.norm(update.astype(np.float64, copy=False)))
        if not norm <= max_norm:
            return "norm", f"has L2 norm {norm:.6g} > max_norm {max_norm:.6g}"
    return None


def _check_weight(weight: object) -> tuple[str, str] | None:
    if isinstance(weight, bool) or not isinstance(weight, int | float | np.integer | np.floating):
        return "weight", f"has weight {weight!r} ({type(weight).__name__}), not a number"
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        return "weight", f"has weight {w}, not a finite number >= 0"
    return None


def validate_updates(
    updates_list: Sequence[object],
    *,
    n_params: int,
    max_norm: float | None = None,
    weights: Sequence[object] | NDArray[Any] | None = None,
) -> ValidationResult:
    """Check each client update; return which are accepted and why the others are rejected.

    Args:
        updates_list: one entry per client, each meant to be a flat float numpy array
            (the client's new parameters minus the global parameters).
        n_params: the model's number of parameters, >= 1.
        max_norm: the largest L2 norm (parameter units) an update may have, > 0; None
            disables the norm check.
        weights: optional, one self-reported weight per update (its client's sample count);
            an update whose weight is not a finite number >= 0 is rejected with reason
            ``weight``. None skips the check.

    Returns:
        :class:`ValidationResult`; no update is modified or "repaired".

    Raises:
        UsageError: ``updates_list`` not a sequence, bad ``n_params`` / ``max_norm``, or
            ``weights`` of another length than ``updates_list``.
    """
    if isinstance(updates_list, str | bytes) or not isinstance(updates_list, Sequence | np.ndarray):
        raise UsageError(
            "The 'updates_list' parameter of validate_updates must be a sequence of client "
            f"updates. Got {type(updates_list).__name__} instead."
        )
    if isinstance(n_params, bool) or not isinstance(n_params, int | np.integer) or n_params < 1:
        raise UsageError(
            "The 'n_params' parameter of validate_updates must be an integer >= 1. "
            f"Got {n_params!r} instead."
        )
    bound: float | None = None
    if max_norm is not None:
        if isinstance(max_norm, bool) or not isinstance(
            max_norm, int | float | np.integer | np.floating
        ):
            raise UsageError(
                "The 'max_norm' parameter of validate_updates must be a number > 0 or None. "
                f"Got {max_norm!r} ({type(max_norm).__name__}) instead."
            )
        bound = float(max_norm)
        if not (math.isfinite(bound) and bound > 0):
            raise UsageError(
                "The 'max_norm' parameter of validate_updates must be a finite number > 0 "
                f"(or None to skip the norm check). Got {bound} instead."
            )
    if weights is not None and (
        isinstance(weights, str | bytes)
        or not isinstance(weights, Sequence | np.ndarray)
        or len(weights) != len(updates_list)
    ):
        raise UsageError(
            "The 'weights' parameter of validate_updates must be a sequence with one weight per "
            f"update ({len(updates_list)}). Got {type(weights).__name__} of length "
            f"{len(weights) if hasattr(weights, '__len__') else 'unknown'} instead."
        )
    fast = _validate_stack(updates_list, int(n_params), bound, weights)
    if fast is not None:
        return fast
    accepted: list[int] = []
    rejected: list[tuple[int, str]] = []
    details: dict[int, str] = {}
    for i, update in enumerate(updates_list):
        problem = _check_one(update, int(n_params), bound)
        if problem is None and weights is not None:
            problem = _check_weight(weights[i])
        if problem is None:
            accepted.append(i)
        else:
            reason, message = problem
            rejected.append((i, reason))
            details[i] = f"update {i} {message}"
    return ValidationResult(
        accepted_indices=accepted, rejected=rejected, n_params=int(n_params), details=details
    )


def _as_stack(updates_list: Sequence[object] | NDArray[Any], n_params: int) -> NDArray[Any] | None:
    """The updates as one float ``[n, n_params]`` array when every one is a float numpy array
    of the model's shape (the engines' case), else None (checked one by one)."""
    if isinstance(updates_list, np.ndarray):
        if updates_list.ndim == 2 and updates_list.shape[1] == n_params:
            return updates_list if updates_list.dtype.kind == "f" else None
        return None
    if not all(
        type(u) is np.ndarray and u.dtype.kind == "f" and u.shape == (n_params,)
        for u in updates_list
    ):
        return None
    if not updates_list:
        return np.zeros((0, n_params))
    return np.stack(updates_list)  # type: ignore[arg-type]


def _validate_stack(
    updates_list: Sequence[object] | NDArray[Any],
    n_params: int,
    bound: float | None,
    weights: Sequence[object] | NDArray[Any] | None,
) -> ValidationResult | None:
    """:func:`validate_updates` in a few array operations when the updates allow it.

    Gives the same result as the update-by-update checks (the dtype and shape checks hold by
    construction; non-finite, norm and weight checks run on the whole stack), or None to fall
    back to them: thousands of clients cost milliseconds, not a Python call each.
    """
    stack = _as_stack(updates_list, n_params)
    if stack is None:
        return None
    w: NDArray[np.float64] | None = None
    if weights is not None:
        if not (isinstance(weights, np.ndarray) and weights.dtype.kind in "fiu"):
            return None  # self-reported weights of any type: checked one by one
        w = weights.astype(np.float64)
    finite = np.isfinite(stack)
    row_finite = finite.all(axis=1)
    reason = np.full(len(stack), "", dtype=object)
    message: dict[int, str] = {}
    for i in np.flatnonzero(~row_finite).tolist():
        reason[i] = "non_finite"
        message[i] = f"has {int((~finite[i]).sum())} NaN or Inf entries"
    if bound is not None:
        norms = np.linalg.norm(stack.astype(np.float64, copy=False), axis=1)
        over = row_finite & ~(norms <= bound)
        for i in np.flatnonzero(over).tolist():
            reason[i] = "norm"
            message[i] = f"has L2 norm {float(norms[i]):.6g} > max_norm {bound:.6g}"
    if w is not None:
        bad_w = (reason == "") & ~(np.isfinite(w) & (w >= 0))
        for i in np.flatnonzero(bad_w).tolist():
            reason[i] = "weight"
            message[i] = f"has weight {float(w[i])}, not a finite number >= 0"
    ok = reason == ""
    rejected = [(i, str(reason[i])) for i in np.flatnonzero(~ok).tolist()]
    return ValidationResult(
        accepted_indices=np.flatnonzero(ok).tolist(),
        rejected=rejected,
        n_params=n_params,
        details={i: f"update {i} {m}" for i, m in message.items()},
    )


def stack_accepted(updates_list: Sequence[object], result: ValidationResult) -> NDArray[np.float64]:
    """The accepted updates as a float64 ``[n_accepted, n_params]`` stack (in input order).

    With no accepted update the stack has zero rows; the engine must then skip the round
    (every aggregator refuses an empty stack).
    """
    try:
        rows = [np.asarray(updates_list[i], dtype=np.float64) for i in result.accepted_indices]
    except (IndexError, TypeError, ValueError) as exc:
        raise UsageError(
            "stack_accepted got a ValidationResult that does not belong to this updates_list; "
            "pass the same list that was validated."
        ) from exc
    if any(row.shape != (result.n_params,) for row in rows):
        raise UsageError(
            "stack_accepted got a ValidationResult that does not belong to this updates_list; "
            "pass the same list that was validated."
        )
    if not rows:
        return np.zeros((0, result.n_params), dtype=np.float64)
    return np.stack(rows)
