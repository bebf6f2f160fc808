"""Noise samplers behind privml's mechanisms.

Secure samplers (the default everywhere) delegate to OpenDP's Rust samplers, which draw
*exactly* from discrete distributions using a cryptographically secure random source, so the
released bits carry no floating-point artefacts (Mironov 2012, "On significance of the least
significant bits for differential privacy", showed that textbook floating-point Laplace noise
leaks the input through the low-order bits):

* :func:`opendp_laplace` -- OpenDP ``make_laplace`` on floats: the input is rounded to a
  power-of-two grid and exact discrete Laplace noise on that grid is added (Canonne, Kamath &
  Steinke 2020, section 5.2); OpenDP's privacy map accounts for the rounding.
* :func:`opendp_discrete_laplace` -- OpenDP ``make_laplace`` on 64-bit integers (the geometric
  / discrete Laplace mechanism, Ghosh, Roughgarden & Sundararajan 2012).
* :func:`opendp_discrete_gaussian` -- OpenDP ``make_gaussian`` on 64-bit integers (the exact
  discrete Gaussian sampler of Canonne, Kamath & Steinke 2020).
* :func:`opendp_noisy_argmax` -- OpenDP ``make_noisy_max``: Gumbel noise (the exponential
  mechanism) or exponential noise (report-noisy-max, equivalent to permute-and-flip).
* :func:`opendp_randomized_response` -- OpenDP ``make_randomized_response``.

The ``numpy_*`` samplers are **INSECURE**: they use a seeded ``numpy.random.Generator`` and
floating-point arithmetic, are vulnerable to Mironov's attack, and exist only for simulations
and statistical tests that need speed or reproducibility. Mechanisms use them only when the
caller passes ``rng=`` explicitly, and then warn with
:class:`~privml.errors.InsecureOptionWarning`.

OpenDP's "contrib" feature flag is switched on lazily, the first time a secure sampler runs,
never at import time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from privml.errors import DataError, InsecureOptionWarning

__all__ = [
    "INSECURE_SAMPLER",
    "SECURE_SAMPLER",
    "certified_laplace_scale",
    "numpy_discrete_gaussian",
    "numpy_discrete_gaussian_noise",
    "numpy_discrete_laplace",
    "numpy_gaussian",
    "numpy_laplace",
    "numpy_noisy_argmax",
    "numpy_randomized_response",
    "opendp_discrete_gaussian",
    "opendp_discrete_laplace",
    "opendp_laplace",
    "opendp_noisy_argmax",
    "opendp_randomized_response",
    "warn_insecure",
]

SECURE_SAMPLER = "opendp"
INSECURE_SAMPLER = "numpy-insecure"
_INT_LIMIT = 2**62  # OpenDP i64 arithmetic plus headroom for the noise


@lru_cache(maxsize=1)
def _dp() -> Any:
    from privml.extras import require

    require("queries", "Exact DP noise (privml query, privml.dp.mechanisms)")
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def warn_insecure(func: str) -> None:
    """Warns that ``func`` is using the insecure numpy sampler because ``rng`` was given."""
    warnings.warn(
        f"{func} was given rng=: noise comes from numpy's floating-point sampler, which is "
        "NOT safe for releasing statistics (floating-point attacks, Mironov 2012). Use it "
        "only for simulations; omit rng to use OpenDP's exact samplers.",
        InsecureOptionWarning,
        stacklevel=3,
    )


def _float_space(vector: bool, metric: Literal["l1", "linf"] = "l1") -> tuple[Any, Any]:
    dp = _dp()
    atom = dp.atom_domain(T=float, nan=False)
    if not vector:
        return atom, dp.absolute_distance(T=float)
    if metric == "linf":
        return dp.vector_domain(atom), dp.linf_distance(T=float)
    return dp.vector_domain(atom), dp.l1_distance(T=float)


def _int_space(vector: bool, metric: Literal["l1", "l2"]) -> tuple[Any, Any]:
    dp = _dp()
    atom = dp.atom_domain(T="i64")
    if not vector:
        return atom, dp.absolute_distance(T="i64")
    if metric == "l2":
        return dp.vector_domain(atom), dp.l2_distance(T="i64")
    return dp.vector_domain(atom), dp.l1_distance(T="i64")


@lru_cache(maxsize=4096)
def certified_laplace_scale(*, sensitivity: float, epsilon: float, integer: bool = False) -> float:
    """Smallest float scale >= sensitivity / epsilon that OpenDP's privacy map certifies.

    OpenDP's Laplace map rounds conservatively; the scale is nudged up one ulp at a time
    until ``map(sensitivity) <= epsilon``, so the epsilon privml books is exactly the one the
    vetted library proves.
    """
    dp = _dp()
    scale = sensitivity / epsilon
    for _ in range(256):
        if integer:
            space = _int_space(False, "l1")
            meas = dp.m.make_laplace(*space, scale=scale)
            d_in: Any = int(sensitivity)
        else:
            meas = dp.m.make_laplace(*_float_space(False), scale=scale)
            d_in = float(sensitivity)
        if meas.map(d_in) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf) * (1 + 1e-15)
    raise RuntimeError("could not certify a Laplace scale with OpenDP")  # pragma: no cover


def _as_float_input(value: float | np.ndarray) -> tuple[Any, bool]:
    if isinstance(value, np.ndarray):
        return [float(v) for v in value.ravel()], True
    return float(value), False


def _check_int_range(values: np.ndarray | int) -> None:
    arr = np.asarray(values)
    if arr.size and int(np.max(np.abs(arr.astype(object)))) >= _INT_LIMIT:
        raise DataError(
            f"An integer query value is too large for exact noise (|value| must be < 2**62). "
            f"Got {int(np.max(np.abs(arr.astype(object))))}."
        )


def opendp_laplace(value: float | np.ndarray, *, scale: float) -> float | np.ndarray:
    """Adds OpenDP's exact, grid-snapped Laplace(``scale``) noise to a float or 1-D array."""
    dp = _dp()
    data, vector = _as_float_input(value)
    meas = dp.m.make_laplace(*_float_space(vector), scale=scale)
    out = meas(data)
    return np.asarray(out, dtype=np.float64) if vector else float(out)


def opendp_discrete_laplace(value: int | np.ndarray, *, scale: float) -> int | np.ndarray:
    """Adds exact discrete Laplace noise, P(k) proportional to exp(-|k| / scale)."""
    dp = _dp()
    _check_int_range(value)
    vector = isinstance(value, np.ndarray)
    meas = dp.m.make_laplace(*_int_space(vector, "l1"), scale=scale)
    if vector:
        return np.asarray(meas([int(v) for v in np.ravel(value)]), dtype=np.int64)
    return int(meas(int(value)))


def opendp_discrete_gaussian(value: int | np.ndarray, *, scale: float) -> int | np.ndarray:
    """Adds exact discrete Gaussian noise, P(k) proportional to exp(-k^2 / (2 scale^2))."""
    dp = _dp()
    _check_int_range(value)
    vector = isinstance(value, np.ndarray)
    meas = dp.m.make_gaussian(*_int_space(vector, "l2"), scale=scale)
    if vector:
        return np.asarray(meas([int(v) for v in np.ravel(value)]), dtype=np.int64)
    return int(meas(int(value)))


def opendp_noisy_argmax(
    scores: np.ndarray, *, scale: float, noise: Literal["gumbel", "exponential"]
) -> int:
    """Index of the largest ``score + noise`` with OpenDP's exact noisy-max.

    ``noise="gumbel"`` is the exponential mechanism (Gumbel-max trick); ``"exponential"`` is
    report-noisy-max with exponential noise (permute-and-flip, McKenna & Sheldon 2020).
    """
    dp = _dp()
    measure = dp.zero_concentrated_divergence() if noise == "gumbel" else dp.max_divergence()
    meas = dp.m.make_noisy_max(*_float_space(True, "linf"), measure, scale=scale)
    return int(meas([float(s) for s in scores]))


def opendp_randomized_response(value: Any, *, categories: Sequence[Any], prob: float) -> Any:
    """Keeps ``value`` with probability ``prob``, else returns one of the other categories."""
    dp = _dp()
    meas = dp.m.make_randomized_response(list(categories), prob=prob)
    return meas(value)


# ----------------------------------------------------------------------------- insecure (numpy)


def numpy_laplace(
    value: float | np.ndarray, *, scale: float, rng: np.random.Generator
) -> float | np.ndarray:
    """INSECURE floating-point Laplace noise from ``rng`` (simulations only)."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64) + rng.laplace(0.0, scale, size=value.shape)
    return float(value) + float(rng.laplace(0.0, scale))


def numpy_gaussian(
    value: float | np.ndarray, *, sigma: float, rng: np.random.Generator
) -> float | np.ndarray:
    """INSECURE continuous Gaussian noise N(0, sigma^2) from ``rng`` (simulations only)."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64) + rng.normal(0.0, sigma, size=value.shape)
    return float(value) + float(rng.normal(0.0, sigma))


def numpy_discrete_laplace(
    value: int | np.ndarray, *, scale: float, rng: np.random.Generator
) -> int | np.ndarray:
    """INSECURE discrete Laplace noise (difference of two geometrics) from ``rng``."""
    p = -math.expm1(-1.0 / scale)
    shape = np.shape(value)
    noise = rng.geometric(p, size=shape) - rng.geometric(p, size=shape)
    if isinstance(value, np.ndarray):
        return value.astype(np.int64) + noise.astype(np.int64)
    return int(value) + int(noise)


def numpy_discrete_gaussian_noise(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """INSECURE discrete Gaussian draws by CKS20's rejection from discrete Laplace."""
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)
    chunks: list[np.ndarray] = []
    need = size
    while need > 0:
        m = int(need * 1.6) + 16
        y = rng.geometric(p, size=m) - rng.geometric(p, size=m)
        accept = rng.random(m) < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        got = y[accept][:need]
        chunks.append(got)
        need -= got.size
    return np.concatenate(chunks).astype(np.int64)


def numpy_discrete_gaussian(
    value: int | np.ndarray, *, scale: float, rng: np.random.Generator
) -> int | np.ndarray:
    """INSECURE discrete Gaussian noise from ``rng`` (simulations only)."""
    if isinstance(value, np.ndarray):
        return value.astype(np.int64) + numpy_discrete_gaussian_noise(scale, value.size, rng)
    return int(value) + int(numpy_discrete_gaussian_noise(scale, 1, rng)[0])


def numpy_noisy_argmax(
    scores: np.ndarray,
    *,
    scale: float,
    noise: Literal["gumbel", "exponential"],
    rng: np.random.Generator,
    size: int | None = None,
) -> Any:
    """INSECURE noisy argmax with Gumbel or exponential noise from ``rng``.

    Returns one index, or an array of ``size`` independent draws (for simulations).
    """
    shape = scores.shape if size is None else (size, *scores.shape)
    if noise == "gumbel":
        noisy = scores + rng.gumbel(0.0, scale, size=shape)
    else:
        noisy = scores + rng.exponential(scale, size=shape)
    return int(np.argmax(noisy)) if size is None else np.argmax(noisy, axis=-1)


def numpy_randomized_response(
    value: Any,
    *,
    categories: Sequence[Any],
    prob: float,
    rng: np.random.Generator,
    size: int | None = None,
) -> Any:
    """INSECURE randomized response from ``rng``: one answer, or a list of ``size`` answers."""
    others = [c for c in categories if c != value]
    if size is None:
        if rng.random() < prob:
            return value
        return others[int(rng.integers(len(others)))]
    keep = rng.random(size) < prob
    pick = rng.integers(len(others), size=size)
    return [value if k else others[j] for k, j in zip(keep, pick, strict=True)]
