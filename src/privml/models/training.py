"""Local training of a whole cohort of sites in one vectorized computation.

Every sampled site holds a copy of the same architecture; their parameters are stacked into a
``[sites, n_params]`` tensor and each local SGD step of every site is one ``torch.func.vmap``
call. Sites with fewer batches than the largest get masked (empty) batches for the remaining
steps, which leave their parameters unchanged, so the result equals training each site in its
own loop with the same batches (tested in tests/fl/test_local.py).

The gradient of one step is pluggable (:class:`GradientRule`): plain mini-batch SGD here;
DP-SGD (per-sample clipping and noise) plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from privml.models.nets import ModelSpec, functional_forward, stacked_forward

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def per_sample_loss(binary: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss per record from logits and integer labels (BCE for binary, CE otherwise)."""
    if binary:

        def f(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(
                logits[..., 0], y.to(logits.dtype), reduction="none"
            )
    else:

        def f(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y, reduction="none")

    return f


@dataclass(frozen=True)
class Batch:
    """One local step for every site of the cohort: X [S, B, F], y [S, B], mask [S, B]."""

    X: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


class GradientRule(Protocol):
    """Computes the update direction of one local step for every site of the cohort."""

    def __call__(self, params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor: ...


class MeanGradient:
    """Plain SGD: the gradient of the mean loss over each site's (real) batch records.

    Sites are independent, so the gradient of the sum of the sites' losses with respect to the
    stacked parameters holds every site's own gradient: one forward and one backward pass for
    the whole cohort. For Linear stacks (logistic regression, MLPs) the backward pass is
    written out (:class:`LinearStackGradient`): on small models autograd's per-node overhead
    is most of the cost.
    """

    rows_independent = True  # a site's gradient depends on its own batch only

    def __init__(self, model: nn.Module, spec: ModelSpec, *, binary: bool) -> None:
        self._stack = LinearStackGradient.of(spec, binary=binary)
        fast = stacked_forward(spec)
        if fast is None:
            fast = vmap(functional_forward(model))
        self._forward = fast
        self._loss = per_sample_loss(binary)

    def __call__(self, params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        if self._stack is not None:
            return self._stack.mean_gradient(params, batch)
        with torch.enable_grad():
            p = params.detach().requires_grad_(True)
            logits = self._forward(p, batch.X)
            S, B = batch.y.shape
            losses = self._loss(logits.reshape(S * B, -1), batch.y.reshape(-1)).reshape(S, B)
            per_site = (losses * batch.mask).sum(dim=1) / batch.mask.sum(dim=1).clamp(min=1.0)
            (g,) = torch.autograd.grad(per_site.sum(), p)
        return g


def softmax_last(h: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(h, dim=-1)`` as a new tensor, fast for few classes and many rows.

    torch's CPU softmax works row by row along the last dimension; with two or a few classes
    over thousands of rows that costs several times a softmax over the transposed layout.
    """
    if h.shape[-1] < 16 and h.numel() > 4096:
        return torch.softmax(h.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2)
    return torch.softmax(h, dim=-1)


#: derivative of each activation of privml's Linear stacks, applied to the incoming gradient
#: ``g`` given the activation's input ``x``
_ACTIVATION_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "relu": lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.0),
    "tanh": lambda g, x: g * (1.0 - torch.tanh(x).square()),
    "square": lambda g, x: g * (2.0 * x),
    "poly2": lambda g, x: g * (0.25 * x + 0.5),
}


@dataclass(frozen=True)
class LinearStackGradient:
    """Forward and hand-written backward pass of a Linear stack on stacked parameters.

    Layers ``(offset, n_in, n_out)`` in :func:`~privml.models.nets.flat_params` layout (weight
    ``[out, in]`` then bias), the activation between them, and the loss (BCE on one logit or
    cross-entropy). :meth:`mean_gradient` gives each site's gradient of its mean batch loss,
    equal to autograd's (tested).
    """

    layers: tuple[tuple[int, int, int], ...]
    activation: str
    binary: bool

    @classmethod
    def of(cls, spec: ModelSpec, *, binary: bool) -> LinearStackGradient | None:
        if spec.kind not in ("logistic", "mlp") or spec.activation not in _ACTIVATION_BACKWARD:
            return None
        widths = [spec.n_features, *(spec.hidden if spec.kind == "mlp" else ()), spec.n_outputs]
        layers, offset = [], 0
        for i, o in zip(widths[:-1], widths[1:], strict=True):
            layers.append((offset, i, o))
            offset += i * o + o
        return cls(tuple(layers), spec.activation, binary)

    def mean_gradient(self, params: torch.Tensor, batch: Batch) -> torch.Tensor:
        S = params.shape[0]
        act = _ELEMENTWISE_FORWARD[self.activation]
        h = batch.X
        inputs, pre = [], []
        last = len(self.layers) - 1
        for k, (off, i, o) in enumerate(self.layers):
            W = params[:, off : off + i * o].reshape(S, o, i)
            b = params[:, off + i * o : off + i * o + o].reshape(S, 1, o)
            inputs.append(h)
            z = torch.baddbmm(b, h, W.transpose(1, 2))
            if k < last:
                pre.append(z)
                h = act(z)
            else:
                h = z
        # d(mean masked loss)/d logits: each record's weight is mask / (real records of its site)
        scale = batch.mask / batch.mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        if self.binary:
            g0 = (torch.sigmoid(h[..., 0]) - batch.y.to(h.dtype)).mul_(scale)
            if h.shape[-1] == 1:
                g = g0.unsqueeze(-1)
            else:
                g = torch.zeros_like(h)
                g[..., 0] = g0
        else:
            g = softmax_last(h)
            g.scatter_add_(-1, batch.y.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
            g.mul_(scale.unsqueeze(-1))
        pieces: list[torch.Tensor] = []
        back = _ACTIVATION_BACKWARD[self.activation]
        for k in range(last, -1, -1):
            off, i, o = self.layers[k]
            pieces.append(g.sum(1))  # bias
            pieces.append(torch.bmm(g.transpose(1, 2), inputs[k]).reshape(S, -1))  # weight
            if k > 0:
                W = params[:, off : off + i * o].reshape(S, o, i)
                g = back(torch.bmm(g, W), pre[k - 1])
        return torch.cat(pieces[::-1], dim=1)


_ELEMENTWISE_FORWARD: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "square": lambda x: x * x,
    "poly2": lambda x: 0.125 * x * x + 0.5 * x + 0.25,
}


@dataclass
class CohortData:
    """The cohort's training records concatenated, with each site's row offsets."""

    X: torch.Tensor
    y: torch.Tensor
    offsets: np.ndarray  # [S + 1]

    @classmethod
    def from_arrays(cls, Xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> CohortData:
        sizes = np.array([len(y) for y in ys], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        X = torch.from_numpy(np.concatenate(Xs).astype(np.float32, copy=False))
        y = torch.from_numpy(np.concatenate(ys).astype(np.int64, copy=False))
        return cls(X, y, offsets)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def shuffled_batches(
    sizes: np.ndarray, *, batch_size: int, epochs: int, rngs: Sequence[np.random.Generator]
) -> tuple[np.ndarray, np.ndarray]:
    """Index and mask arrays ``[S, steps, B]`` of shuffled mini-batches for each site.

    Each site shuffles its own records every epoch (``rngs[s]``) and walks them in batches of
    ``batch_size`` (the last one smaller), like a ``DataLoader(shuffle=True)``.
    """
    per_epoch = np.maximum(1, -(-sizes // batch_size))
    steps = int(per_epoch.max()) * epochs
    # no wider than the largest site: padding costs compute and changes nothing
    width = int(min(batch_size, max(1, int(sizes.max(initial=1)))))
    idx = np.zeros((len(sizes), steps, width), dtype=np.int64)
    mask = np.zeros((len(sizes), steps, width), dtype=np.float32)
    for s, n in enumerate(sizes):
        if n == 0:
            continue
        k = 0
        for _ in range(epochs):
            perm = rngs[s].permutation(int(n))
            for start in range(0, int(n), batch_size):
                chunk = perm[start : start + batch_size]
                idx[s, k, : len(chunk)] = chunk
                mask[s, k, : len(chunk)] = 1.0
                k += 1
    return idx, mask


_M64 = (1 << 64) - 1
_GAMMA_INT = 0x9E3779B97F4A7C15
_GAMMA = np.uint64(_GAMMA_INT)
_KEY_BITS = 44  # bits of the shuffle key kept below the cohort position in the sort key


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective hash."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _site_keys(seed: int, rnd: int, epoch: int, site_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per site for (seed, round, epoch): the root of its records' keys."""
    z = np.full(len(site_ids), seed & _M64, dtype=np.uint64)
    for v in (rnd, epoch):
        z = _mix(z + np.uint64((_GAMMA_INT * (v + 1)) & _M64))
    return _mix(z + _GAMMA * (np.asarray(site_ids, dtype=np.int64).astype(np.uint64) + 1))


def _record_keys(base: np.ndarray, counter: np.ndarray) -> np.ndarray:
    """Sort keys of records ``counter - 1`` of the sites whose roots are ``base``."""
    return _mix(base + _GAMMA * counter) >> np.uint64(64 - _KEY_BITS)


def site_order(seed: int, rnd: int, site: int, epoch: int, n: int) -> np.ndarray:
    """The order in which site ``site`` visits its ``n`` records in ``epoch`` of round ``rnd``.

    A pure function of (seed, round, epoch, site, record index): record ``j`` gets the key
    ``hash(seed, rnd, epoch, site, j)`` (SplitMix64, 44 bits) and the records go in increasing
    key order (ties by index). A site computes it alone (a Flower site, the per-site anchors of
    the benchmarks); every site of a cohort gets it at once from :func:`cohort_batches`.
    """
    base = _site_keys(seed, rnd, epoch, np.array([site]))
    keys = _record_keys(base, np.arange(1, n + 1, dtype=np.uint64))
    return np.argsort(keys, kind="stable")


@dataclass(frozen=True)
class CohortSchedule:
    """Every site's shuffled mini-batches for a round, kept compact (no ``[S, steps, B]``).

    Site ``s`` (``sizes[s]`` records, ``per_epoch[s] = ceil(sizes[s] / batch_size)`` batches
    per epoch) visits its records in epoch ``e`` in the order ``visits[e, offsets[s]:offsets[s
    + 1]]`` (local indices; see :func:`site_order`) and takes step ``k`` with batch
    ``k % per_epoch[s]`` of epoch ``k // per_epoch[s]``, until ``epochs * per_epoch[s]`` steps;
    then it is inactive. :meth:`step` gives one step's batches of the active sites only.
    """

    sizes: np.ndarray
    offsets: np.ndarray
    per_epoch: np.ndarray
    batch_size: int
    epochs: int
    visits: np.ndarray  # [epochs, n] int64, site after site

    @property
    def n_steps(self) -> int:
        return int(self.per_epoch.max(initial=1)) * self.epochs

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """Every step's batches as dense ``(idx, mask)`` ``[S, steps, width]`` arrays."""
        return _dense(self)

    def step(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(active, rows, mask)``: the sites active at step ``k`` (positions, ascending),
        their batches' record indices into the cohort's records ``[A, W]`` (``W`` the longest
        batch of the step; padding repeats a valid row) and the mask ``[A, W]`` float32."""
        active = np.flatnonzero((k < self.per_epoch * self.epochs) & (self.sizes > 0))
        if len(active) == 0:
            return active, np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32)
        local, valid = self.batches(active, np.asarray(k))
        return active, local + self.offsets[active][:, None], valid.astype(np.float32)

    def batches(self, sites: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(local, valid)`` of the batches sites ``sites`` take at steps ``k`` (broadcast
        together; a trailing axis of the batch's width, the longest batch among them): record
        indices local to each site, and which are real (a site past its last step, or past
        its records, gets invalid entries pointing at a valid row)."""
        B, pe = self.batch_size, self.per_epoch[sites]
        on = (k < pe * self.epochs) & (self.sizes[sites] > 0)
        epoch = np.where(on, k // pe, 0)
        start = (k % pe) * B
        length = np.where(on, np.clip(self.sizes[sites] - start, 0, B), 0)
        W = max(1, int(length.max(initial=1)))
        j = np.arange(W)
        valid = j < length[..., None]
        col = start[..., None] + np.where(valid, j, 0)
        n = int(self.offsets[-1])
        if n == 0:
            return np.zeros(valid.shape, np.int64), valid
        flat = epoch[..., None] * n + self.offsets[sites][..., None] + col
        flat = np.minimum(flat, n * self.epochs - 1)
        return np.where(valid, self.visits.reshape(-1)[flat], 0), valid


def _dense(sch: CohortSchedule) -> tuple[np.ndarray, np.ndarray]:
    """Every step of ``sch`` at once as ``(idx, mask)`` ``[S, steps, width]`` (indices local to
    each site, ``width = min(batch_size, largest site)``; a site past its last step gets an
    empty batch): the same batches :meth:`CohortSchedule.step` gives, vectorized over steps."""
    S = len(sch.sizes)
    W = int(min(sch.batch_size, max(1, int(sch.sizes.max(initial=1)))))
    local, valid = sch.batches(np.arange(S)[:, None], np.arange(sch.n_steps)[None, :])
    idx = np.zeros((S, sch.n_steps, W), np.int64)
    mask = np.zeros((S, sch.n_steps, W), np.float32)
    idx[..., : local.shape[-1]], mask[..., : valid.shape[-1]] = local, valid
    return idx, mask


def cohort_schedule(
    sizes: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    rnd: int,
    site_ids: np.ndarray,
) -> CohortSchedule:
    """The :class:`CohortSchedule` of round ``rnd``: each site's shuffles without a generator
    per site, every site's keys hashed and sorted in a few array operations per epoch (a
    row-wise sort of a sites x records matrix, or one sort of all records when site sizes
    differ widely). Site ``site_ids[s]`` gets exactly :func:`site_order`'s order."""
    sizes = np.asarray(sizes, dtype=np.int64)
    S = len(sizes)
    site_ids = np.asarray(site_ids, dtype=np.int64)
    if len(site_ids) != S:
        raise ValueError("cohort_schedule needs one site id per site")
    per_epoch = np.maximum(1, -(-sizes // batch_size))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    visits = np.zeros((epochs, n), dtype=np.int64)
    if n:
        longest = int(sizes.max())
        seg = np.repeat(np.arange(S, dtype=np.int64), sizes)
        local = np.arange(n, dtype=np.int64) - offsets[seg]
        dense = S * longest <= 2 * n + 1024  # a padded [S, longest] matrix is cheap
        if dense:
            counter = np.arange(1, longest + 1, dtype=np.uint64)[None, :]
            pad = np.arange(longest)[None, :] >= sizes[:, None]
        for e in range(epochs):
            base = _site_keys(seed, rnd, e, site_ids)
            if dense:
                keys = _record_keys(base[:, None], counter)
                keys[pad] = np.uint64(1 << 63)  # padding sorts last
                visits[e] = np.argsort(keys, axis=1, kind="stable")[~pad]  # site after site
            else:
                keys = _record_keys(base[seg], (local + 1).astype(np.uint64))
                if S < (1 << (64 - _KEY_BITS)):
                    sortkey = (seg.astype(np.uint64) << np.uint64(_KEY_BITS)) | keys
                    visits[e] = np.argsort(sortkey, kind="stable") - offsets[seg]
                else:
                    visits[e] = np.lexsort((keys, seg)) - offsets[seg]
    return CohortSchedule(sizes, offsets, per_epoch, int(batch_size), int(epochs), visits)


def cohort_batches(
    sizes: np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    rnd: int,
    site_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`cohort_schedule` as dense ``(idx, mask)`` arrays ``[S, steps, width]`` (indices
    local to each site; ``width = min(batch_size, largest site)``), the layout
    :func:`train_cohort`'s ``batches`` takes; site ``site_ids[s]`` walks its records in the
    order :func:`site_order` gives, like a ``DataLoader(shuffle=True)`` with that order."""
    sch = cohort_schedule(
        sizes, batch_size=batch_size, epochs=epochs, seed=seed, rnd=rnd, site_ids=site_ids
    )
    S = len(sch.sizes)
    width = int(min(batch_size, max(1, int(sch.sizes.max(initial=1)))))
    idx = np.zeros((S, sch.n_steps, width), dtype=np.int64)
    mask = np.zeros((S, sch.n_steps, width), dtype=np.float32)
    for k in range(sch.n_steps):
        active, rows, m = sch.step(k)
        W = rows.shape[1]
        idx[active, k, :W] = (rows - sch.offsets[active][:, None]) * m.astype(np.int64)
        mask[active, k, :W] = m
    return idx, mask


#: Gradient rules whose sites are independent (a site's direction depends on its own rows
#: only) may be called on the active sites of a step alone (:func:`train_cohort`).
ROW_INDEPENDENT = "rows_independent"


#: Up to this many sites, a schedule is expanded into dense ``[S, steps, width]`` batches up
#: front and every step is one call over all sites (a few sites pad little; per-step work
#: then dominates); beyond, each step gathers its active sites only.
FEW_SITES = 16


def _buckets(length: np.ndarray) -> list[np.ndarray]:
    """Split a step's sites by batch length so that little of the work is padding: up to three
    groups (lengths <= W/4, <= W/2, the rest), positions into ``length``."""
    W = int(length.max())
    out, lo = [], 0
    for hi in (W // 4, W // 2, W):
        sel = np.flatnonzero((length > lo) & (length <= hi)) if hi > lo else np.zeros(0, np.int64)
        if len(sel):
            out.append(sel)
        lo = max(lo, hi)
    return out


def train_cohort(
    params: torch.Tensor,
    data: CohortData,
    *,
    rule: GradientRule,
    lr: float,
    batch_size: int,
    epochs: int,
    rngs: Sequence[np.random.Generator],
    prox_mu: float = 0.0,
    batches: tuple[np.ndarray, np.ndarray] | None = None,
    schedule: CohortSchedule | None = None,
) -> torch.Tensor:
    """Run local SGD at every site from the same global ``params``; return ``[S, P]`` new params.

    ``prox_mu > 0`` adds FedProx's proximal term ``mu/2 ||w - w_global||^2`` (Li et al. 2020).
    The mini-batches come from ``schedule`` (:func:`cohort_schedule`, the engines'), else from
    ``batches`` (e.g. Poisson sampling for DP-SGD: ``(idx, mask)`` of shape ``[S, steps, B]``
    with indices local to each site), else from the generators ``rngs`` (one per site).

    With a schedule and a rule whose sites are independent (``rule.rows_independent``), each
    step computes only the sites that have a batch at that step, grouped by batch length (so
    little of the work is padding); other rules see every site each step, with empty batches
    masked.
    """
    if schedule is not None and len(data.sizes) <= FEW_SITES:
        batches, schedule = schedule.dense(), None
    if schedule is None:
        idx, mask = (
            batches
            if batches is not None
            else shuffled_batches(data.sizes, batch_size=batch_size, epochs=epochs, rngs=rngs)
        )
        return _train_dense(params, data, rule, lr, prox_mu, idx, mask)
    S = len(data.sizes)
    X2 = data.X.reshape(data.X.shape[0], -1)
    feature_shape = tuple(data.X.shape[1:])
    global_params = params.detach().reshape(1, -1)
    stacked = global_params.repeat(S, 1)
    independent = bool(getattr(rule, ROW_INDEPENDENT, False))
    for k in range(schedule.n_steps):
        active, rows, mask = schedule.step(k)
        if not len(active):
            continue
        if independent:
            groups = _buckets(mask.sum(axis=1).astype(np.int64))
        else:  # every site, the inactive ones with empty batches
            full_rows = np.zeros((S, rows.shape[1]), np.int64)
            full_mask = np.zeros((S, rows.shape[1]), np.float32)
            full_rows[active], full_mask[active] = rows, mask
            active, rows, mask = np.arange(S), full_rows, full_mask
            groups = [np.arange(S)]
        for sel in groups:
            sites = active[sel]
            W = int(mask[sel].sum(axis=1).max())
            r = torch.from_numpy(np.ascontiguousarray(rows[sel, :W])).reshape(-1)
            m = torch.from_numpy(np.ascontiguousarray(mask[sel, :W]))
            A = len(sites)
            batch = Batch(
                X2.index_select(0, r).reshape(A, W, *feature_shape),
                data.y.index_select(0, r).reshape(A, W),
                m,
            )
            with torch.no_grad():
                if independent and A == S:  # every site steps: no gather or scatter
                    g = rule(stacked, batch, k)
                    if prox_mu:
                        g = g + prox_mu * (stacked - global_params)
                    stacked = stacked - lr * g
                elif independent:
                    ts = torch.from_numpy(sites)
                    current = stacked.index_select(0, ts)
                    g = rule(current, batch, k)
                    if prox_mu:
                        g = g + prox_mu * (current - global_params)
                    stacked.index_copy_(0, ts, current - lr * g)
                else:
                    g = rule(stacked, batch, k)
                    if prox_mu:
                        on = (m.sum(dim=1) > 0).to(g.dtype)[:, None]
                        g = g + prox_mu * (stacked - global_params) * on
                    stacked = stacked - lr * g
    return stacked


def _train_dense(
    params: torch.Tensor,
    data: CohortData,
    rule: GradientRule,
    lr: float,
    prox_mu: float,
    idx: np.ndarray,
    mask: np.ndarray,
) -> torch.Tensor:
    S = len(data.sizes)
    W = idx.shape[2]
    # step-major copies, so each step's rows are one contiguous gather (index_select copies
    # whole rows; fancy indexing of [S, W] rows walks them element by element)
    gidx = torch.from_numpy(
        np.ascontiguousarray((idx + data.offsets[:-1, None, None]).transpose(1, 0, 2))
    )
    tmask = torch.from_numpy(np.ascontiguousarray(mask.transpose(1, 0, 2)))
    X2 = data.X.reshape(data.X.shape[0], -1)
    global_params = params.detach().reshape(1, -1)
    stacked = global_params.repeat(S, 1)
    for k in range(idx.shape[1]):
        rows = gidx[k].reshape(-1)
        Xb = X2.index_select(0, rows).reshape(S, W, *data.X.shape[1:])
        batch = Batch(Xb, data.y.index_select(0, rows).reshape(S, W), tmask[k])
        with torch.no_grad():
            g = rule(stacked, batch, k)
            if prox_mu:
                active = (tmask[k].sum(dim=1) > 0).to(g.dtype)[:, None]
                g = g + prox_mu * (stacked - global_params) * active
            stacked = stacked - lr * g
    return stacked
