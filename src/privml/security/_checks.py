"""Argument checks shared by the security modules (scikit-learn style messages)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from privml.errors import UsageError


def check_float(
    value: Any,
    name: str,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float inside the given interval, or a UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise UsageError(
            f"The {name!r} parameter of {where} must be a number. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad |= v <= low if low_open else v < low
    if high is not None:
        bad |= v >= high if high_open else v > high
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rng = " and ".join(s for s in (lo, hi) if s) or "finite"
        raise UsageError(f"The {name!r} parameter of {where} must be {rng}. Got {v!r} instead.")
    return v


def check_int(value: Any, name: str, where: str, *, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``, or a UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UsageError(
            f"The {name!r} parameter of {where} must be an integer. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = int(value)
    if v < low or (high is not None and v > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise UsageError(f"The {name!r} parameter of {where} must be {rng}. Got {v} instead.")
    return v


def check_choice(value: Any, name: str, where: str, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise UsageError(
            f"The {name!r} parameter of {where} must be one of {list(choices)}. "
            f"Got {value!r} instead."
        )
    return value


def as_features(X: Any, name: str, where: str, *, n_features: int | None = None) -> torch.Tensor:
    """A finite float32 ``[n, F]`` tensor (a copy detached from any graph)."""
    try:
        t = torch.as_tensor(np.asarray(X, dtype=np.float32)).clone()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"The {name!r} parameter of {where} must be numeric ({exc}).") from None
    if t.ndim != 2 or t.shape[0] == 0:
        raise UsageError(
            f"The {name!r} parameter of {where} must be a non-empty [n_records, n_features] "
            f"array. Got shape {tuple(t.shape)} instead."
        )
    if n_features is not None and t.shape[1] != n_features:
        raise UsageError(
            f"The {name!r} parameter of {where} must have {n_features} features (the model's "
            f"input size). Got {t.shape[1]} instead."
        )
    if not torch.isfinite(t).all():
        raise UsageError(f"The {name!r} parameter of {where} contains NaN or Inf.")
    return t


def as_labels(y: Any, n: int, n_classes: int, name: str, where: str) -> torch.Tensor:
    """Integer class labels ``[n]`` in ``[0, n_classes)`` as an int64 tensor."""
    arr = np.asarray(y)
    if arr.shape != (n,):
        raise UsageError(
            f"The {name!r} parameter of {where} must have shape ({n},), one label per record. "
            f"Got shape {arr.shape} instead."
        )
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise UsageError(
                f"The {name!r} parameter of {where} must hold integer class labels. "
                f"Got dtype {arr.dtype} instead."
            )
    arr = arr.astype(np.int64)
    if n and (arr.min() < 0 or arr.max() >= n_classes):
        raise UsageError(
            f"The {name!r} parameter of {where} must hold labels in [0, {n_classes - 1}]. "
            f"Got values in [{arr.min()}, {arr.max()}] instead."
        )
    return torch.from_numpy(arr)


def n_classes_of(n_outputs: int) -> int:
    """Number of classes of a model with ``n_outputs`` logits (1 logit = binary)."""
    return 2 if n_outputs == 1 else n_outputs
