"""Simulated Byzantine clients, for measuring how robust an aggregation rule is.

Model-update attacks rewrite the rows of a ``[n_clients, n_params]`` stack that belong to
malicious clients, given every client's honest update (the simulator trains the malicious
clients honestly first, then lets them lie). The omniscient attacks (ALIE, IPM) see the honest
updates of the other clients, the strongest threat model in their papers.

* ``sign_flip`` -- send ``-scale * u`` (own honest update reversed and amplified); default
  scale 10, the reference setting of the robustness table.
* ``scale`` -- send ``scale * u`` (boosted update, as in model replacement); default 10.
* ``gaussian`` -- send a vector of i.i.d. ``N(0, sigma^2)`` draws; default sigma 1.
* ``alie`` -- "A little is enough" (Baruch, Baruch and Goldberg 2019, NeurIPS): every
  malicious client sends ``mean - z * std`` of the honest updates (coordinate-wise), with
  ``z`` from the paper's formula :func:`alie_z` unless given. Small enough to pass
  distance- and median-based filters, consistent enough to bias them.
* ``ipm`` -- inner-product manipulation (Xie, Koyejo and Gupta 2020, "Fall of empires",
  UAI): every malicious client sends ``-epsilon * mean`` of the honest updates, whose inner
  product with the honest mean is negative; default epsilon 0.1 (the paper's setting against
  median and Krum; epsilon > (n - f) / f also reverses FedAvg).

``label_flip`` is a data attack: the engine trains malicious sites on labels rewritten by
:func:`flip_labels` and applies no update attack.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from privml.errors import DataError, UsageError

FloatArray = NDArray[np.float64]

__all__ = [
    "ATTACK_KINDS",
    "ATTACK_PARAMS",
    "DATA_ATTACKS",
    "UPDATE_ATTACKS",
    "alie_z",
    "apply_attack",
    "check_attack_params",
    "flip_labels",
]

UPDATE_ATTACKS: tuple[str, ...] = ("sign_flip", "scale", "gaussian", "alie", "ipm")
"""Attacks on the model updates, applied by :func:`apply_attack`."""

DATA_ATTACKS: tuple[str, ...] = ("label_flip",)
"""Attacks on a site's training data (see :func:`flip_labels`)."""

ATTACK_KINDS: tuple[str, ...] = UPDATE_ATTACKS + DATA_ATTACKS
"""Every ``[attack] kind`` the configuration accepts."""

ATTACK_PARAMS: dict[str, dict[str, float | None]] = {
    "sign_flip": {"scale": 10.0},
    "scale": {"scale": 10.0},
    "gaussian": {"sigma": 1.0},
    "alie": {"z": None},
    "ipm": {"epsilon": 0.1},
    "label_flip": {},
}
"""Each kind's parameters and their defaults (None: computed, see :func:`alie_z`)."""


def _positive(value: Any, name: str, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise UsageError(
            f"The '{name}' parameter of the {kind} attack must be a number > 0. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise UsageError(f"The '{name}' parameter of the {kind} attack must be > 0. Got {v}.")
    return v


def check_attack_params(kind: str, params: Mapping[str, Any] | None = None) -> list[str]:
    """Every problem with an attack kind and its parameters (empty list when valid)."""
    if kind not in ATTACK_PARAMS:
        return [f"The attack 'kind' must be one of {list(ATTACK_KINDS)}. Got {kind!r} instead."]
    problems = []
    allowed = ATTACK_PARAMS[kind]
    for key, value in (params or {}).items():
        if key not in allowed:
            accepted = ", ".join(repr(k) for k in allowed) or "none"
            problems.append(
                f"Unknown parameter {key!r} for the {kind} attack; it accepts {accepted}."
            )
            continue
        if value is None:
            continue
        try:
            _positive(value, key, kind)
        except UsageError as exc:
            problems.append(str(exc))
    return problems


def alie_z(n_clients: int, n_malicious: int) -> float:
    """ALIE's ``z_max`` (Baruch et al. 2019, section 4): with ``s = floor(n/2 + 1) - f``
    honest clients the attackers need on their side for a majority,
    ``z_max = Phi^{-1}((n - s) / n)``, Phi the standard normal CDF.

    Raises:
        UsageError: ``n_clients < 1``, ``n_malicious`` outside ``[1, n_clients)``, or
            ``s <= 0`` (the attackers already hold a majority; the formula gives infinity).
    """
    for name, value, low in (("n_clients", n_clients, 1), ("n_malicious", n_malicious, 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise UsageError(
                f"The '{name}' parameter of alie_z must be an integer >= {low}. Got {value!r}."
            )
    n, f = int(n_clients), int(n_malicious)
    if f >= n:
        raise UsageError(
            f"ALIE needs at least one honest client to imitate; got {f} malicious of {n}."
        )
    s = math.floor(n / 2 + 1) - f
    if s <= 0:
        raise UsageError(
            f"ALIE's z formula needs s = floor(n/2 + 1) - f > 0; with n={n} and f={f} the "
            "attackers already hold a majority. Give the attack an explicit 'z' or use fewer "
            "malicious clients."
        )
    return NormalDist().inv_cdf((n - s) / n)


def _stack(updates: ArrayLike) -> FloatArray:
    try:
        stack = np.array(updates, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"The 'updates' parameter of apply_attack must be numeric ({exc})."
        ) from exc
    if stack.ndim != 2 or stack.shape[0] == 0 or stack.shape[1] == 0:
        raise UsageError(
            "The 'updates' parameter of apply_attack must be a non-empty [n_clients, n_params] "
            f"stack. Got shape {stack.shape} instead."
        )
    if not np.isfinite(stack).all():
        raise DataError("The honest updates given to apply_attack contain NaN or Inf.")
    return stack


def _mask(mask: ArrayLike, n: int) -> NDArray[np.bool_]:
    m = np.asarray(mask)
    if m.dtype != np.bool_ or m.shape != (n,):
        raise UsageError(
            f"The 'malicious_mask' parameter of apply_attack must be a boolean array of shape "
            f"({n},), True for malicious clients. Got dtype {m.dtype} and shape {m.shape}."
        )
    return m


def apply_attack(
    kind: str,
    updates: ArrayLike,
    malicious_mask: ArrayLike,
    *,
    rng: np.random.Generator,
    params: Mapping[str, Any] | None = None,
) -> FloatArray:
    """Return a copy of ``updates`` whose malicious rows are replaced by the attack's.

    Args:
        kind: one of :data:`UPDATE_ATTACKS` (``label_flip`` is a data attack: use
            :func:`flip_labels` on the malicious sites' training labels instead).
        updates: ``[n_clients, n_params]`` honest updates (what every client would send).
        malicious_mask: boolean ``[n_clients]``, True for malicious clients.
        rng: the random generator (used by ``gaussian``); pass one seeded from the run's seed.
        params: the kind's parameters (see :data:`ATTACK_PARAMS`): ``scale`` (sign_flip,
            scale), ``sigma`` (gaussian), ``z`` (alie; default :func:`alie_z` of this stack's
            n and number of malicious rows), ``epsilon`` (ipm). All > 0.

    Returns:
        A new float64 stack; the honest rows are unchanged, the input is not modified.

    Raises:
        UsageError: unknown kind, label_flip, bad params, bad mask, or an omniscient attack
            (alie, ipm) with no honest client to imitate.
        DataError: NaN or Inf in the honest updates.
    """
    if kind in DATA_ATTACKS:
        raise UsageError(
            f"{kind!r} is a data attack: flip the malicious sites' training labels with "
            "privml.fl.attacks.flip_labels and send their updates unchanged."
        )
    if kind not in UPDATE_ATTACKS:
        raise UsageError(
            f"The attack 'kind' must be one of {list(ATTACK_KINDS)}. Got {kind!r} instead."
        )
    if not isinstance(rng, np.random.Generator):
        raise UsageError(
            "The 'rng' parameter of apply_attack must be a numpy.random.Generator "
            f"(numpy.random.default_rng(seed)). Got {type(rng).__name__} instead."
        )
    p = dict(params or {})
    problems = check_attack_params(kind, p)
    if problems:
        raise UsageError("; ".join(problems))
    out = _stack(updates)
    mal = _mask(malicious_mask, out.shape[0])
    n_mal = int(mal.sum())
    if n_mal == 0:
        return out
    values: dict[str, Any] = {
        **ATTACK_PARAMS[kind],
        **{k: v for k, v in p.items() if v is not None},
    }
    if kind == "sign_flip":
        out[mal] *= -float(values["scale"])
    elif kind == "scale":
        out[mal] *= float(values["scale"])
    elif kind == "gaussian":
        sigma = float(values["sigma"])
        out[mal] = rng.normal(0.0, sigma, size=(n_mal, out.shape[1]))
    else:
        honest = out[~mal]
        if honest.shape[0] == 0:
            raise UsageError(
                f"The {kind} attack imitates the honest updates, but every client is malicious."
            )
        mean = honest.mean(axis=0)
        if kind == "alie":
            z = values["z"]
            z_val = alie_z(out.shape[0], n_mal) if z is None else float(z)
            out[mal] = mean - z_val * honest.std(axis=0)
        else:  # ipm
            out[mal] = -float(values["epsilon"]) * mean
    return out


def flip_labels(y: ArrayLike, n_classes: int) -> NDArray[Any]:
    """Label flipping: class ``c`` becomes ``n_classes - 1 - c`` (binary: 0 <-> 1).

    The classic data-poisoning attack of malicious sites (e.g. Tolpegin et al. 2020, "Data
    poisoning attacks against federated learning systems"). Integer labels, or float labels
    holding whole numbers (as a float32 binary target), keep their dtype.

    Args:
        y: labels, each in ``[0, n_classes)``.
        n_classes: number of classes, >= 2 (2 for a binary task with one logit).

    Raises:
        UsageError: n_classes not an integer >= 2.
        DataError: labels that are not whole numbers in ``[0, n_classes)``.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int | np.integer) or n_classes < 2:
        raise UsageError(
            f"The 'n_classes' parameter of flip_labels must be an integer >= 2. Got {n_classes!r}."
        )
    arr = np.asarray(y)
    if arr.dtype.kind not in "iuf":
        raise DataError(f"flip_labels needs numeric class labels; got dtype {arr.dtype}.")
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr >= n_classes)
    if np.any(bad):
        examples = np.unique(arr[bad])[:5].tolist()
        raise DataError(
            f"flip_labels needs labels that are whole numbers in [0, {n_classes}); found "
            f"{examples}. Check n_classes or encode the target first."
        )
    return (n_classes - 1 - arr).astype(arr.dtype, copy=False)
