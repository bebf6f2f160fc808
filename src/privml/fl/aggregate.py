"""Aggregation maths: pure functions from a stack of client updates to one update.

Every engine (the in-process simulator, the Flower adapter) calls these functions; none
re-implements them. An update is a flat float vector (a client's new parameters minus the
global parameters it started from); a stack is a ``[n_clients, n_params]`` array. All maths
is done in float64.

Two ways in:

* the functions themselves (:func:`fedavg`, :func:`coordinate_median`, :func:`trimmed_mean`,
  :func:`krum`, :func:`multi_krum`, :func:`bulyan`, :func:`norm_bound`, :func:`fltrust`,
  :func:`centered_clip`), with keyword-only hyper-parameters;
* the dispatcher :func:`aggregate` over the registry :data:`AGGREGATORS`, keyed by the names the
  configuration uses (``[training] aggregator = "krum"``), which takes the hyper-parameters as a
  mapping and the per-round extra inputs as an :class:`AggregationContext`.

Every rule except :func:`fedavg` returns an :class:`AggregateResult` that also says which
clients were selected or trusted (``selected``) and what the rule did (``info``, JSON-friendly),
so engines can report it.

Robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan, FLTrust, centered clipping) ignore
the clients' sample-count weights, as in their papers and in Flower: a sample count is
self-reported, so a Byzantine client could claim a huge one. Only FedAvg and norm bounding weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from privml.errors import DataError, UsageError

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

__all__ = [
    "AGGREGATORS",
    "AggregateResult",
    "AggregationContext",
    "AggregatorSpec",
    "SERVER_DATA_PARAMS",
    "aggregate",
    "bulyan",
    "centered_clip",
    "check_params",
    "clip_rows",
    "coordinate_median",
    "fedavg",
    "fltrust",
    "krum",
    "min_clients",
    "multi_krum",
    "norm_bound",
    "trimmed_mean",
]


# --------------------------------------------------------------------------------------------
# Result and context types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AggregateResult:
    """What an aggregation rule returns.

    Attributes:
        update: the aggregated update, float64 ``[n_params]``.
        selected: boolean ``[n_clients]`` marking the clients whose updates entered the result
            (Krum's choice, Multi-Krum's and Bulyan's selection, FLTrust's clients with a
            positive trust score), or None for rules that use every client (FedAvg, median,
            trimmed mean, norm bounding, centered clipping).
        info: JSON-friendly details of what the rule did (the ``f`` used, trust scores, how many
            updates were clipped, ...).
    """

    update: FloatArray
    selected: BoolArray | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AggregationContext:
    """Per-round extra inputs that some rules need besides the stack of updates.

    Attributes:
        center: the previous round's aggregated update, ``[n_params]``; centered clipping
            (Karimireddy et al. 2021) clips around it. None means the zero vector (first round).
        server_update: the server's own update computed on its small clean root dataset this
            round, ``[n_params]``; required by FLTrust (Cao et al. 2021).
    """

    center: ArrayLike | None = None
    server_update: ArrayLike | None = None


# --------------------------------------------------------------------------------------------
# Clipping (the one implementation: norm bounding, defences, DP, secure aggregation use it)
# --------------------------------------------------------------------------------------------


def clip_rows(stack: ArrayLike, bound: float) -> tuple[FloatArray, FloatArray, BoolArray]:
    """Scale every row of ``stack`` to L2 norm at most ``bound``: ``u * min(1, bound / ||u||)``.

    Returns ``(clipped, norms, over)``: the clipped float64 copy, each row's norm before
    clipping, and which rows were scaled down. Rows within the bound are returned exactly.
    """
    s = np.asarray(stack, dtype=np.float64)
    norms = np.linalg.norm(s, axis=1)
    over = norms > bound
    factor = np.ones_like(norms)
    factor[over] = bound / norms[over]
    return s * factor[:, None], norms, over


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_stack(updates: ArrayLike, *, rule: str = "aggregate") -> FloatArray:
    """Return ``updates`` as a finite float64 ``[n_clients, n_params]`` stack or raise."""
    try:
        stack = np.asarray(updates, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"The 'updates' parameter of {rule} must be a numeric [n_clients, n_params] array; "
            f"it could not be converted to float64 ({exc})."
        ) from exc
    if stack.ndim != 2 or stack.shape[0] == 0 or stack.shape[1] == 0:
        raise UsageError(
            f"The 'updates' parameter of {rule} must be a non-empty [n_clients, n_params] "
            f"stack. Got shape {stack.shape} instead."
        )
    finite = np.isfinite(stack).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        raise DataError(
            f"The updates of clients at rows {bad} contain NaN or Inf; {rule} never averages "
            "them in. Drop them first with privml.fl.validate.validate_updates."
        )
    return stack


def _as_weights(weights: ArrayLike | None, n: int, *, rule: str) -> FloatArray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise UsageError(
            f"The 'weights' parameter of {rule} must have shape ({n},), one weight per client. "
            f"Got shape {w.shape} instead."
        )
    if not np.isfinite(w).all() or np.any(w < 0) or w.sum() <= 0:
        raise UsageError(
            f"The 'weights' parameter of {rule} must be finite, >= 0 and not all zero "
            f"(usually the clients' sample counts). Got {w.tolist()} instead."
        )
    return w


def _as_vector(value: ArrayLike, n_params: int, *, name: str, rule: str) -> FloatArray:
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"The '{name}' input of {rule} must be a numeric vector of {n_params} floats; "
            f"it could not be converted ({exc})."
        ) from exc
    if vec.shape != (n_params,):
        raise UsageError(
            f"The '{name}' input of {rule} must have shape ({n_params},), the same as one "
            f"client update. Got shape {vec.shape} instead."
        )
    if not np.isfinite(vec).all():
        raise DataError(f"The '{name}' input of {rule} contains NaN or Inf.")
    return vec


def _check_int(value: Any, *, name: str, rule: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise UsageError(
            f"The '{name}' parameter of {rule} must be an integer >= {minimum}. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    if value < minimum:
        raise UsageError(
            f"The '{name}' parameter of {rule} must be an integer >= {minimum}. "
            f"Got {value} instead."
        )
    return int(value)


def _check_float(
    value: Any,
    *,
    name: str,
    rule: str,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
) -> float:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    domain = f"in {lo}{low}, {high}{hi}"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise UsageError(
            f"The '{name}' parameter of {rule} must be a number {domain}. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if math.isnan(v) or below or above:
        raise UsageError(f"The '{name}' parameter of {rule} must be a number {domain}. Got {v}.")
    return v


def _default_f(n: int, *, per: int, rule: str) -> int:
    """The largest f the rule tolerates with n clients: n >= per * f + 3."""
    if n < 3:
        raise UsageError(
            f"{rule} needs at least 3 client updates in a round; got {n}. Sample more clients "
            "per round or choose another aggregator."
        )
    return (n - 3) // per


def _check_f(f: Any, n: int, *, per: int, rule: str, paper: str) -> int:
    if f is None:
        return _default_f(n, per=per, rule=rule)
    f = _check_int(f, name="f", rule=rule, minimum=0)
    if n < per * f + 3:
        raise UsageError(
            f"The 'f' parameter of {rule} must satisfy n >= {per}f + 3 ({paper}); got f={f} "
            f"with n={n} client updates this round. Lower f to at most {max((n - 3) // per, 0)} "
            f"or sample at least {per * f + 3} clients per round."
        )
    return f


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def fedavg(updates: ArrayLike, weights: ArrayLike | None = None) -> FloatArray:
    """FedAvg (McMahan et al. 2017): the mean of the updates weighted by ``weights``.

    ``weights`` are usually the clients' sample counts; None gives equal weights. Same result
    as Flower's ``aggregate`` (weighted by ``num_examples``).
    """
    stack = _as_stack(updates, rule="fedavg")
    w = _as_weights(weights, stack.shape[0], rule="fedavg")
    if w is None:
        return stack.mean(axis=0)
    return (w / w.sum()) @ stack


def coordinate_median(updates: ArrayLike) -> AggregateResult:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-robust distributed learning").

    Each coordinate of the result is the median of that coordinate over the clients (the mean
    of the two middle values for an even count), as ``numpy.median`` and Flower's
    ``aggregate_median``. Tolerates fewer than half Byzantine clients.
    """
    stack = _as_stack(updates, rule="median")
    return AggregateResult(
        update=np.median(stack, axis=0), selected=None, info={"n_clients": int(stack.shape[0])}
    )


def _n_trimmed(beta: float, n: int) -> int:
    # int(beta * n), as Flower's _trim_mean and scipy.stats.trim_mean
    return int(beta * n)


def trimmed_mean(updates: ArrayLike, *, beta: float = 0.2) -> AggregateResult:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    For each coordinate, the ``k = floor(beta * n)`` largest and ``k`` smallest values are
    dropped and the rest averaged. Same as Flower's ``aggregate_trimmed_avg`` (``FedTrimmedAvg``,
    default beta 0.2) and ``scipy.stats.trim_mean(proportiontocut=beta)``.

    Args:
        updates: ``[n_clients, n_params]`` stack.
        beta: fraction trimmed from *each* end, in [0, 0.5). A beta > 0 that trims nobody with
            this many clients (``floor(beta * n) == 0``) is an error, not a silent FedAvg.

    Raises:
        UsageError: beta outside [0, 0.5), or too few clients for beta to trim anyone.
    """
    stack = _as_stack(updates, rule="trimmed_mean")
    beta = _check_float(beta, name="beta", rule="trimmed_mean", low=0.0, high=0.5)
    n = stack.shape[0]
    k = _n_trimmed(beta, n)
    if beta > 0 and k == 0:
        raise UsageError(
            f"The 'beta' parameter of trimmed_mean is {beta}, which trims floor({beta} * {n}) = 0 "
            f"of the {n} client updates from each end, i.e. no defence at all. Raise beta to "
            f"at least {1 / n:.3g} or sample at least {min_clients('trimmed_mean', {'beta': beta})}"
            " clients per round."
        )
    ordered = np.sort(stack, axis=0)
    update = ordered[k : n - k].mean(axis=0)
    return AggregateResult(
        update=update, selected=None, info={"beta": beta, "trimmed_each_end": k, "n_clients": n}
    )


def _pairwise_sq_dists(stack: FloatArray) -> FloatArray:
    """Squared Euclidean distances between rows, computed as sums of squared differences.

    Row by row (not via the Gram matrix) so there is no cancellation error: Krum's choice then
    matches a direct computation bit for bit on ordinary inputs. Memory O(n * n_params).
    """
    n = stack.shape[0]
    d = np.empty((n, n), dtype=np.float64)
    for i in range(n):
        diff = stack - stack[i]
        d[i] = np.einsum("ij,ij->i", diff, diff)
    return d


def _krum_scores(dists: FloatArray, f: int) -> FloatArray:
    """Krum score of each row: sum of squared distances to its n - f - 2 nearest others.

    ``max(1, n - f - 2)`` neighbours as in Flower's ``aggregate_krum`` (needed inside Bulyan,
    where the candidate set shrinks below 2f + 3).
    """
    n = dists.shape[0]
    if n == 1:
        return np.zeros(1)
    k = min(max(1, n - f - 2), n - 1)
    d = dists.copy()
    np.fill_diagonal(d, np.inf)
    nearest = np.partition(d, k - 1, axis=1)[:, :k]
    return nearest.sum(axis=1)


def krum(updates: ArrayLike, *, f: int | None = None) -> AggregateResult:
    """Krum (Blanchard et al. 2017, "Machine learning with adversaries: Byzantine tolerant
    gradient descent", NeurIPS).

    Scores each update by the sum of squared distances to its ``n - f - 2`` nearest other
    updates and returns the update with the lowest score. Same choice as Flower's
    ``aggregate_krum(to_keep=0)``.

    Args:
        updates: ``[n_clients, n_params]`` stack.
        f: assumed maximum number of Byzantine clients, an integer with ``n >= 2f + 3``.
            None uses the largest such f for this round's n, ``(n - 3) // 2``.

    Raises:
        UsageError: f negative, not an integer, or too large for n.
    """
    stack = _as_stack(updates, rule="krum")
    n = stack.shape[0]
    f = _check_f(f, n, per=2, rule="krum", paper="Blanchard et al. 2017")
    scores = _krum_scores(_pairwise_sq_dists(stack), f)
    best = int(np.argmin(scores))
    selected = np.zeros(n, dtype=bool)
    selected[best] = True
    return AggregateResult(
        update=stack[best].copy(),
        selected=selected,
        info={"f": f, "chosen": best, "scores": scores.tolist()},
    )


def multi_krum(
    updates: ArrayLike, *, f: int | None = None, m: int | None = None
) -> AggregateResult:
    """Multi-Krum (Blanchard et al. 2017, section 4): the plain mean of the ``m`` updates
    with the lowest Krum scores.

    The paper averages the selected updates without weights; Flower's ``aggregate_krum`` with
    ``to_keep=m`` weights them by ``num_examples``. Both agree when clients report equal sample
    counts; privml follows the paper because a Byzantine client can lie about its count.

    Args:
        updates: ``[n_clients, n_params]`` stack.
        f: assumed maximum number of Byzantine clients (``n >= 2f + 3``); None uses
            ``(n - 3) // 2``.
        m: number of updates averaged, ``1 <= m <= n``; None uses ``n - f``.

    Raises:
        UsageError: f or m out of range for this round's n.
    """
    stack = _as_stack(updates, rule="multi_krum")
    n = stack.shape[0]
    f = _check_f(f, n, per=2, rule="multi_krum", paper="Blanchard et al. 2017")
    if m is None:
        m = n - f
    m = _check_int(m, name="m", rule="multi_krum", minimum=1)
    if m > n:
        raise UsageError(
            f"The 'm' parameter of multi_krum must be <= the number of client updates ({n}) "
            f"this round. Got m={m}; lower m or sample more clients."
        )
    scores = _krum_scores(_pairwise_sq_dists(stack), f)
    chosen = np.argsort(scores, kind="stable")[:m]
    selected = np.zeros(n, dtype=bool)
    selected[chosen] = True
    return AggregateResult(
        update=stack[selected].mean(axis=0),
        selected=selected,
        info={"f": f, "m": m, "chosen": sorted(int(i) for i in chosen), "scores": scores.tolist()},
    )


def bulyan(updates: ArrayLike, *, f: int | None = None) -> AggregateResult:
    """Bulyan (El Mhamdi, Guerraoui and Rouault 2018, "The hidden vulnerability of distributed
    learning in Byzantium", ICML) over Krum.

    1. Select ``theta = n - 2f`` updates by applying Krum repeatedly, removing each choice from
       the candidates (Krum's neighbour count is recomputed on the shrinking set).
    2. For each coordinate, average the ``beta = theta - 2f`` selected values closest to the
       coordinate-wise median of the selection.

    Same result as Flower's ``aggregate_bulyan(aggregation_rule=aggregate_krum)``.
    Cost grows as ``n^3`` in the clients per round (about 6 ms for 100 clients, 4 s for 1,000
    on one core); it is meant for tens to a few hundred clients per round.

    Args:
        updates: ``[n_clients, n_params]`` stack.
        f: assumed maximum number of Byzantine clients; the paper requires ``n >= 4f + 3``.
            None uses the largest such f, ``(n - 3) // 4``.

    Raises:
        UsageError: f negative, not an integer, or ``n < 4f + 3``.
    """
    stack = _as_stack(updates, rule="bulyan")
    n = stack.shape[0]
    f = _check_f(f, n, per=4, rule="bulyan", paper="El Mhamdi et al. 2018")
    theta = n - 2 * f
    beta = theta - 2 * f
    dists = _pairwise_sq_dists(stack)
    remaining = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        sub = dists[np.ix_(remaining, remaining)]
        best = remaining[int(np.argmin(_krum_scores(sub, f)))]
        chosen.append(best)
        remaining.remove(best)
    sel = stack[chosen]
    med = np.median(sel, axis=0)
    order = np.argsort(np.abs(sel - med), axis=0, kind="stable")[:beta]
    update = np.take_along_axis(sel, order, axis=0).mean(axis=0)
    selected = np.zeros(n, dtype=bool)
    selected[chosen] = True
    return AggregateResult(
        update=update,
        selected=selected,
        info={"f": f, "theta": theta, "beta": beta, "chosen": sorted(chosen)},
    )


def norm_bound(
    updates: ArrayLike, weights: ArrayLike | None = None, *, max_norm: float | None = None
) -> AggregateResult:
    """Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?").

    Each update is scaled to L2 norm at most ``max_norm`` (``u * min(1, max_norm / ||u||)``),
    then the clipped updates are averaged with ``weights`` (sample counts, as in the paper;
    None gives equal weights).

    Args:
        updates: ``[n_clients, n_params]`` stack.
        weights: ``[n_clients]`` non-negative weights or None.
        max_norm: the L2 bound, > 0, in the units of the updates (parameter space). None uses
            the median of this round's update norms (privml's adaptive choice, not the
            paper's fixed bound; it is reported in ``info["max_norm"]``).

    Raises:
        UsageError: max_norm not a finite number > 0, or bad weights.
    """
    stack = _as_stack(updates, rule="norm_bound")
    w = _as_weights(weights, stack.shape[0], rule="norm_bound")
    if max_norm is None:
        bound = float(np.median(np.linalg.norm(stack, axis=1)))
    else:
        bound = _check_float(max_norm, name="max_norm", rule="norm_bound", low=0.0, low_open=True)
    clipped, _, over = clip_rows(stack, bound)
    update = clipped.mean(axis=0) if w is None else (w / w.sum()) @ clipped
    return AggregateResult(
        update=update,
        selected=None,
        info={"max_norm": bound, "n_clipped": int(over.sum()), "clipped": over.tolist()},
    )


def fltrust(updates: ArrayLike, *, server_update: ArrayLike) -> AggregateResult:
    """FLTrust (Cao, Fang, Liu and Gong 2021, "FLTrust: Byzantine-robust federated learning via
    trust bootstrapping", NDSS).

    With ``g0`` the server's update on its small clean root dataset:

    * trust score ``TS_i = ReLU(cos(g_i, g0))`` (an update with zero norm gets 0);
    * magnitude normalisation ``g_i' = (||g0|| / ||g_i||) g_i``;
    * result ``sum_i TS_i g_i' / sum_i TS_i``.

    If no client has a positive trust score the result is the zero update (the round changes
    nothing) and ``info["all_untrusted"]`` is True.

    Args:
        updates: ``[n_clients, n_params]`` stack.
        server_update: ``g0``, ``[n_params]``, the server's update this round (its new
            parameters after training on the root dataset minus the global parameters).

    Raises:
        UsageError: server_update of the wrong shape.
        DataError: server_update with NaN or Inf.
    """
    stack = _as_stack(updates, rule="fltrust")
    g0 = _as_vector(server_update, stack.shape[1], name="server_update", rule="fltrust")
    g0_norm = float(np.linalg.norm(g0))
    norms = np.linalg.norm(stack, axis=1)
    usable = norms > 0
    cos = np.zeros_like(norms)
    if g0_norm > 0:
        cos[usable] = (stack[usable] @ g0) / (norms[usable] * g0_norm)
    trust = np.maximum(cos, 0.0)
    total = float(trust.sum())
    info: dict[str, Any] = {
        "trust_scores": trust.tolist(),
        "server_update_norm": g0_norm,
        "all_untrusted": total == 0.0,
    }
    if total == 0.0:
        return AggregateResult(update=np.zeros(stack.shape[1]), selected=trust > 0, info=info)
    scale = np.zeros_like(norms)
    scale[usable] = g0_norm / norms[usable]
    update = (trust * scale) @ stack / total
    return AggregateResult(update=update, selected=trust > 0, info=info)


def centered_clip(
    updates: ArrayLike,
    *,
    tau: float | None = None,
    n_iter: int = 5,
    center: ArrayLike | None = None,
) -> AggregateResult:
    """Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from history for Byzantine
    robust optimization", ICML).

    Starting from ``v_0 = center`` (the previous round's aggregate), iterate ``n_iter`` times::

        v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) * min(1, tau / ||x_i - v_l||)

    Args:
        updates: ``[n_clients, n_params]`` stack.
        tau: clipping radius (L2, parameter units), > 0. None uses, at each iteration, the
            median of the clients' distances to the current centre (privml's scale-free
            default, not the paper's fixed radius; the radii used are in ``info["tau"]``).
        n_iter: number of clipping iterations L, >= 1 (5 as in common implementations; the
            paper reports a single iteration is enough when the centre is good).
        center: previous round's aggregated update ``[n_params]``; None means zeros.

    Raises:
        UsageError: tau not > 0, n_iter < 1, or center of the wrong shape.
    """
    stack = _as_stack(updates, rule="centered_clip")
    n, p = stack.shape
    n_iter = _check_int(n_iter, name="n_iter", rule="centered_clip", minimum=1)
    fixed_tau = (
        None
        if tau is None
        else _check_float(tau, name="tau", rule="centered_clip", low=0.0, low_open=True)
    )
    v = (
        np.zeros(p)
        if center is None
        else _as_vector(center, p, name="center", rule="centered_clip")
    )
    taus: list[float] = []
    n_clipped = 0
    for _ in range(n_iter):
        diff = stack - v
        dist = np.linalg.norm(diff, axis=1)
        radius = float(np.median(dist)) if fixed_tau is None else fixed_tau
        factor = np.ones(n)
        over = dist > radius
        factor[over] = radius / dist[over]
        v = v + (diff * factor[:, None]).mean(axis=0)
        taus.append(radius)
        n_clipped = int(over.sum())
    return AggregateResult(
        update=v,
        selected=None,
        info={"tau": taus, "n_iter": n_iter, "n_clipped_last_iter": n_clipped},
    )


# --------------------------------------------------------------------------------------------
# Registry and dispatcher
# --------------------------------------------------------------------------------------------

_Runner = Callable[
    [FloatArray, FloatArray | None, Mapping[str, Any], AggregationContext], AggregateResult
]


@dataclass(frozen=True)
class AggregatorSpec:
    """A registered aggregation rule.

    Attributes:
        name: the configuration name (``[training] aggregator``).
        run: ``run(stack, weights, params, context) -> AggregateResult``.
        params: the hyper-parameter names the rule accepts (all optional).
        uses_weights: whether sample-count weights change the result.
        needs: the :class:`AggregationContext` fields the rule requires each round.
        reference: the paper.
    """

    name: str
    run: _Runner
    params: tuple[str, ...]
    uses_weights: bool
    needs: tuple[str, ...]
    reference: str


def _run_fedavg(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return AggregateResult(update=fedavg(s, w), selected=None, info={"n_clients": int(s.shape[0])})


def _run_median(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return coordinate_median(s)


def _run_trimmed(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return trimmed_mean(s, beta=p.get("beta", 0.2))


def _run_krum(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return krum(s, f=p.get("f"))


def _run_multi_krum(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return multi_krum(s, f=p.get("f"), m=p.get("m"))


def _run_bulyan(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return bulyan(s, f=p.get("f"))


def _run_norm_bound(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return norm_bound(s, w, max_norm=p.get("max_norm"))


def _run_fltrust(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    if c.server_update is None:
        raise UsageError(
            "The fltrust aggregator needs context.server_update, the server's update on its "
            "root dataset this round. Give the server a root dataset in the config so the "
            "engine can compute it, or choose another aggregator."
        )
    return fltrust(s, server_update=c.server_update)


def _run_centered_clip(
    s: FloatArray, w: FloatArray | None, p: Mapping[str, Any], c: AggregationContext
) -> AggregateResult:
    return centered_clip(s, tau=p.get("tau"), n_iter=p.get("n_iter", 5), center=c.center)


AGGREGATORS: dict[str, AggregatorSpec] = {
    spec.name: spec
    for spec in (
        AggregatorSpec("fedavg", _run_fedavg, (), True, (), "McMahan et al. 2017"),
        AggregatorSpec("median", _run_median, (), False, (), "Yin et al. 2018"),
        AggregatorSpec("trimmed_mean", _run_trimmed, ("beta",), False, (), "Yin et al. 2018"),
        AggregatorSpec("krum", _run_krum, ("f",), False, (), "Blanchard et al. 2017"),
        AggregatorSpec(
            "multi_krum", _run_multi_krum, ("f", "m"), False, (), "Blanchard et al. 2017"
        ),
        AggregatorSpec("bulyan", _run_bulyan, ("f",), False, (), "El Mhamdi et al. 2018"),
        AggregatorSpec("norm_bound", _run_norm_bound, ("max_norm",), True, (), "Sun et al. 2019"),
        AggregatorSpec("fltrust", _run_fltrust, (), False, ("server_update",), "Cao et al. 2021"),
        AggregatorSpec(
            "centered_clip",
            _run_centered_clip,
            ("tau", "n_iter"),
            False,
            ("center",),
            "Karimireddy et al. 2021",
        ),
    )
}
"""The aggregation rules by configuration name."""

SERVER_DATA_PARAMS: dict[str, dict[str, Any]] = {"fltrust": {"root_size": 20, "root_site": None}}
"""Keys of ``[training] aggregator_params`` that configure the engine rather than the rule, with
their defaults. FLTrust's server needs a small clean root dataset: in simulation the engine
holds out ``root_size`` training records of ``root_site`` (default: the largest site that is not
a simulated attacker) as the server's data and trains on them each round to get
``context.server_update``. These keys are removed before the rule's own parameters are checked."""


def _unknown_aggregator(name: object) -> str:
    return f"The 'aggregator' parameter must be one of {sorted(AGGREGATORS)}. Got {name!r} instead."


def _spec(name: str) -> AggregatorSpec:
    if not isinstance(name, str) or name not in AGGREGATORS:
        raise UsageError(_unknown_aggregator(name))
    return AGGREGATORS[name]


def _param_problems(name: str, params: Mapping[str, Any]) -> list[str]:
    """Every problem with ``params`` that can be seen without knowing n."""
    spec = _spec(name)
    problems: list[str] = []
    for key in params:
        if key not in spec.params:
            allowed = ", ".join(repr(k) for k in spec.params) or "none"
            problems.append(
                f"Unknown parameter {key!r} for aggregator {name!r}; it accepts {allowed}."
            )
    checks: dict[str, Callable[[Any], object]] = {
        "beta": lambda v: _check_float(v, name="beta", rule=name, low=0.0, high=0.5),
        "f": lambda v: _check_int(v, name="f", rule=name, minimum=0),
        "m": lambda v: _check_int(v, name="m", rule=name, minimum=1),
        "max_norm": lambda v: _check_float(v, name="max_norm", rule=name, low=0.0, low_open=True),
        "tau": lambda v: _check_float(v, name="tau", rule=name, low=0.0, low_open=True),
        "n_iter": lambda v: _check_int(v, name="n_iter", rule=name, minimum=1),
    }
    for key, value in params.items():
        if key in spec.params and value is not None:
            try:
                checks[key](value)
            except UsageError as exc:
                problems.append(str(exc))
    return problems


def check_params(name: str, params: Mapping[str, Any] | None = None) -> list[str]:
    """Every problem with an aggregator name and its hyper-parameters, for config validation.

    Checks the name, unknown keys and each value's type and range; constraints that depend on
    the number of clients per round (``n >= 2f + 3``, ...) are checked by :func:`min_clients`
    and at aggregation time. Returns an empty list when all is well.
    """
    if not isinstance(name, str) or name not in AGGREGATORS:
        return [_unknown_aggregator(name)]
    return _param_problems(name, dict(params or {}))


def min_clients(name: str, params: Mapping[str, Any] | None = None) -> int:
    """The fewest client updates per round with which rule ``name`` accepts ``params``.

    Engines use it to refuse, before training, a ``clients_per_round`` (after expected
    dropouts) that the rule cannot aggregate: Krum and Multi-Krum need ``n >= 2f + 3``
    (3 when f is left to its default), Bulyan ``n >= 4f + 3``, a trimmed mean with beta > 0
    needs ``floor(beta * n) >= 1``, Multi-Krum also ``n >= m``.

    Raises:
        UsageError: unknown name or invalid params (all problems in one message).
    """
    p = dict(params or {})
    problems = check_params(name, p)
    if problems:
        raise UsageError("; ".join(problems))
    f = p.get("f")
    if name in ("krum", "multi_krum"):
        need = 3 if f is None else 2 * int(f) + 3
        if name == "multi_krum" and p.get("m") is not None:
            need = max(need, int(p["m"]))
        return need
    if name == "bulyan":
        return 3 if f is None else 4 * int(f) + 3
    if name == "trimmed_mean":
        beta = float(p.get("beta", 0.2))
        if beta == 0:
            return 1
        n = max(1, math.ceil(1 / beta) - 1)
        while _n_trimmed(beta, n) < 1:
            n += 1
        return n
    return 1


def aggregate(
    name: str,
    updates: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    params: Mapping[str, Any] | None = None,
    context: AggregationContext | None = None,
) -> AggregateResult:
    """Aggregate one round's stack of client updates with the rule configured by ``name``.

    Args:
        name: one of :data:`AGGREGATORS`: ``"fedavg" | "median" | "trimmed_mean" | "krum" |
            "multi_krum" | "bulyan" | "norm_bound" | "fltrust" | "centered_clip"``.
        updates: ``[n_clients, n_params]`` stack of updates (new params - global params).
        weights: ``[n_clients]`` sample counts or None; used by fedavg and norm_bound only
            (see the module docstring).
        params: the rule's hyper-parameters (``beta``; ``f``; ``f, m``; ``max_norm``;
            ``tau, n_iter``), all optional; unknown keys are an error.
        context: per-round extra inputs (``server_update`` for fltrust, ``center`` for
            centered_clip).

    Returns:
        :class:`AggregateResult` with ``info["aggregator"]`` set to ``name``.

    Raises:
        UsageError: unknown name, bad params (all listed), bad weights, missing context input.
        DataError: NaN or Inf in the updates or context vectors.
    """
    spec = _spec(name)
    p = dict(params or {})
    problems = _param_problems(name, p)
    if problems:
        raise UsageError("; ".join(problems))
    stack = _as_stack(updates, rule=name)
    w = _as_weights(weights, stack.shape[0], rule=name)
    result = spec.run(stack, w, p, context or AggregationContext())
    info = {"aggregator": name, **result.info}
    return AggregateResult(update=result.update, selected=result.selected, info=info)
