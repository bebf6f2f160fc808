"""DP-SGD for a whole cohort of sites at once: Poisson sampling, per-sample clipping, noise.

One local step of DP-SGD (Abadi et al. 2016) at site ``s`` draws a Poisson sample of its
records (each record independently with probability ``q_s``), computes every sampled record's
gradient, clips each to L2 norm ``C`` (``max_grad_norm``), sums them, adds Gaussian noise with
standard deviation ``sigma_s * C`` and divides by the *expected* batch size ``q_s * N_s``:

    g_s = (sum_i clip_C(grad_i) + N(0, sigma_s^2 C^2 I)) / (q_s N_s)

:class:`DPSGDGradient` is a :class:`privml.models.training.GradientRule`: it computes this for every
site of the cohort in one batched computation on stacked parameters ``[S, P]``, so 100 sites'
DP-SGD in a round is one computation, not 100 loops.

Per-sample gradients
    For ``nn.Sequential`` models made of ``Linear`` and ``Conv2d`` layers and parameter-free
    modules (activations, reshapes, flatten) -- every model :mod:`privml.models.nets` builds --
    the layer-wise route (:func:`clipped_grad_sum`) runs one forward and one backward pass for
    the whole cohort and recovers per-sample gradients from the layers' inputs and the
    backpropagated output gradients, as Opacus's grad samplers do, without hooks:

    * ``Linear``: the per-sample weight gradient is the outer product ``g_i a_i^T``, so its
      norm is ``||g_i|| ||a_i||`` ("ghost norm", Goodfellow 2015; Li et al. 2022) and the sum of
      clipped gradients is one batched product ``(c * g)^T a``: the ``[B, out, in]`` per-sample
      tensor is never built.
    * ``Conv2d``: inputs are unfolded (``F.unfold``) and per-sample gradients are
      ``einsum(g, unfold(a))`` (Opacus's conv grad sampler), materialised per layer.

    Anything else falls back to ``torch.func.vmap`` over ``torch.func.grad`` (per sample, and
    over sites), which is generic but slower (measured in ``benchmarks/bench_dpsgd.py``).

Sampling rate
    The accountant must be given the rate the sampler really uses. Here the sampler draws each
    record with exactly ``q_s = min(1, B / N_s)`` (:func:`poisson_batches`) and
    ``steps_per_epoch = max(1, round(N_s / B))``, and those two numbers go to the accountant.
    (Opacus's ``DPDataLoader`` samples at ``1 / len(data_loader) = 1 / ceil(N / B)``, which is
    not ``B / N`` when ``B`` does not divide ``N``; accounting with ``B / N`` there would be
    wrong.) An empty Poisson batch is still a step: it adds noise and moves the parameters.

Noise and sampling
    Private training gives every site one :class:`privml.dp.randomness.NoiseStream` for its
    Gaussian noise and one for its Poisson sampling (AES-256-CTR keystreams under a fresh
    OS-random key per run): nobody can predict or regenerate them, not even from the seed, and
    a site's draws do not depend on which other sites are in the cohort. The noise of many
    sites and several steps is drawn in one vectorized call. The Gaussian is computed in
    floating point and is not hardened against floating-point attacks on the Gaussian mechanism
    (Mironov 2012; Jin et al. 2022); see :mod:`privml.dp.randomness`. Seeded
    ``torch.Generator`` noise (:func:`noise_generators`) and numpy generators remain accepted
    for simulations that release nothing (an auditor's shadow models), never by private
    training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from privml.dp.randomness import NoiseStream, normal_rows
from privml.errors import UsageError
from privml.models.nets import ModelSpec, Poly2, Square, functional_forward
from privml.models.training import Batch, per_sample_loss, softmax_last

__all__ = [
    "DPSGDGradient",
    "PoissonBatches",
    "clipped_grad_sum",
    "layerwise_supported",
    "noise_generators",
    "per_sample_gradients",
    "poisson_batches",
    "sampling_plan",
]

#: Opacus's guard against division by zero in the clipping factor ``C / (norm + 1e-6)``.
CLIP_EPS = 1e-6

#: Most noise numbers :class:`DPSGDGradient` draws at once (several steps of every site).
NOISE_PREFETCH = 1 << 22


class UniformSource(Protocol):
    """Anything with numpy's ``random(size)``: a NoiseStream or a ``numpy.random.Generator``."""

    def random(self, size: Any) -> Any: ...


# ----------------------------------------------------------------------------- validation


def _positive(name: str, func: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(
            f"The '{name}' parameter of {func} must be a real number. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = float(value)
    ok = v >= 0 if allow_zero else v > 0
    if not (ok and math.isfinite(v)):
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(
            f"The '{name}' parameter of {func} must be {bound} and finite. Got {value!r} instead."
        )
    return v


def _count(name: str, func: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"The '{name}' parameter of {func} must be an int. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    if int(value) < minimum:
        raise UsageError(
            f"The '{name}' parameter of {func} must be >= {minimum}. Got {value!r} instead."
        )
    return int(value)


# ----------------------------------------------------------------------------- sampling


def sampling_plan(n_records: int, *, batch_size: int, epochs: int) -> tuple[float, int]:
    """Poisson sampling rate and number of steps for one site's local training.

    Args:
        n_records: the site's training records N (>= 1).
        batch_size: the expected batch size B (>= 1).
        epochs: local epochs per round (>= 1).

    Returns:
        ``(q, steps)`` with ``q = min(1, B / N)`` and ``steps = epochs * max(1, round(N / B))``
        (halves rounded up),
        so that ``steps * q * N`` is about ``epochs * N`` records. These are the exact numbers
        the sampler uses and the accountant must be given.
    """
    func = "sampling_plan"
    n = _count("n_records", func, n_records)
    b = _count("batch_size", func, batch_size)
    e = _count("epochs", func, epochs)
    q = min(1.0, b / n)
    return q, e * max(1, (2 * n + b) // (2 * b))


@dataclass(frozen=True)
class PoissonBatches:
    """Poisson-sampled batches for every site of a cohort.

    Attributes:
        idx: ``[S, T, Bmax]`` record indices local to each site (padding entries are 0).
        mask: ``[S, T, Bmax]`` float32, 1 for a sampled record, 0 for padding.
        steps: ``[S]`` number of real steps of each site (``T = steps.max()``); a site's steps
            beyond its own count are inactive (no noise, no update).
        sampling_rates: ``[S]`` the rate q_s each site's sampler used.
        expected_batch: ``[S]`` ``q_s * N_s``, the divisor of the noisy gradient sum.
    """

    idx: np.ndarray
    mask: np.ndarray
    steps: np.ndarray
    sampling_rates: np.ndarray
    expected_batch: np.ndarray


def poisson_batches(
    sizes: Sequence[int] | np.ndarray,
    *,
    batch_size: int,
    epochs: int,
    rngs: Sequence[UniformSource],
) -> PoissonBatches:
    """Draws every site's Poisson batches for one round of local DP-SGD.

    Site ``s`` (``N_s = sizes[s]`` records) takes ``steps_s`` steps; at each step every record
    joins the batch independently with probability ``q_s`` (see :func:`sampling_plan`). The
    batch size is therefore random (Binomial(N_s, q_s)) and may be 0. Sampled by geometric
    skipping: the gaps between consecutive sampled records are independent
    Geometric(q_s) variables, ``floor(log(1 - u) / log(1 - q_s))`` for a uniform ``u``, which
    has exactly the distribution of independent coin flips and needs about ``q_s N_s`` uniforms
    per step instead of ``N_s``.

    Args:
        sizes: ``[S]`` training records per site (each >= 1).
        batch_size: expected batch size B.
        epochs: local epochs per round.
        rngs: one source of uniforms per site: a :class:`privml.dp.randomness.NoiseStream`
            (what private training uses: unpredictable) or a ``numpy.random.Generator``
            (seeded simulations, e.g. an auditor's shadow models).
    """
    func = "poisson_batches"
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.ndim != 1 or len(sizes) == 0:
        raise UsageError(f"The 'sizes' parameter of {func} must be a non-empty 1-D sequence.")
    if len(rngs) != len(sizes):
        raise UsageError(
            f"The 'rngs' parameter of {func} needs one generator per site: got {len(rngs)} "
            f"for {len(sizes)} sites."
        )
    plans = [sampling_plan(int(n), batch_size=batch_size, epochs=epochs) for n in sizes]
    rates = np.array([p[0] for p in plans])
    steps = np.array([p[1] for p in plans], dtype=np.int64)
    chosen = [
        _poisson_steps(int(n), float(rates[s]), int(steps[s]), rngs[s])
        for s, n in enumerate(sizes)
    ]
    width = max([1] + [len(p) for picks in chosen for p in picks])
    T = int(steps.max())
    idx = np.zeros((len(sizes), T, width), dtype=np.int64)
    mask = np.zeros((len(sizes), T, width), dtype=np.float32)
    for s, picks in enumerate(chosen):
        for t, p in enumerate(picks):
            idx[s, t, : len(p)] = p
            mask[s, t, : len(p)] = 1.0
    return PoissonBatches(idx, mask, steps, rates, rates * sizes)


def _poisson_steps(n: int, q: float, steps: int, rng: UniformSource) -> list[np.ndarray]:
    """``steps`` independent Poisson samples (rate ``q``) of ``range(n)``, sorted indices."""
    if q >= 1.0:
        return [np.arange(n) for _ in range(steps)]
    log1mq = math.log1p(-q)
    # enough gaps to pass the end with high probability; rows that do not are extended
    width = int(math.ceil(q * n + 6.0 * math.sqrt(q * n) + 8))
    pos = np.full(steps, -1, dtype=np.int64)  # last sampled index of each step
    picks: list[list[np.ndarray]] = [[] for _ in range(steps)]
    rows = np.arange(steps)
    while len(rows):
        u = np.asarray(rng.random((len(rows), width)), dtype=np.float64)
        gaps = np.floor(np.log1p(-u) / log1mq)
        gaps = np.minimum(gaps, n).astype(np.int64)  # a gap past the end is as good as n
        at = pos[rows, None] + np.cumsum(gaps + 1, axis=1)
        for j, r in enumerate(rows):
            picks[r].append(at[j][at[j] < n])
        pos[rows] = at[:, -1]
        rows = rows[pos[rows] < n]
    return [np.concatenate(p) if len(p) > 1 else p[0] for p in picks]


def noise_generators(seed: int, rnd: int, site_ids: Sequence[int]) -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per site, from ``(seed, round, site)``: SIMULATIONS ONLY.

    Anyone who knows the seed regenerates this noise, so it must never protect a release;
    private training uses :class:`privml.dp.randomness.NoiseSource` streams instead. The seed
    is derived with numpy's ``SeedSequence``, so neighbouring seeds give unrelated streams.
    """
    gens = []
    for site in site_ids:
        ss = np.random.SeedSequence([int(seed), int(rnd), 7, int(site)])
        g = torch.Generator()
        g.manual_seed(int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        gens.append(g)
    return gens


# ----------------------------------------------------------------------------- model plan


@dataclass(frozen=True)
class _Linear:
    offset: int
    n_in: int
    n_out: int
    bias: bool


@dataclass(frozen=True)
class _Conv:
    offset: int
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bias: bool


@dataclass(frozen=True)
class _Fn:
    module: nn.Module


_Op = _Linear | _Conv | _Fn


def _plan(model: nn.Module) -> list[_Op] | None:
    """Layer plan for the layer-wise route, or None if the model needs the vmap fallback."""
    if not isinstance(model, nn.Sequential):
        return None
    ops: list[_Op] = []
    offset = 0
    for m in model:
        if isinstance(m, nn.Linear):
            ops.append(_Linear(offset, m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, nn.Conv2d):
            if (
                m.groups != 1
                or m.padding_mode != "zeros"
                or isinstance(m.padding, str)
                or any(isinstance(v, str) for v in (m.stride, m.dilation))
            ):
                return None
            ops.append(
                _Conv(
                    offset,
                    m.in_channels,
                    m.out_channels,
                    tuple(m.kernel_size),  # type: ignore[arg-type]
                    tuple(m.stride),  # type: ignore[arg-type]
                    tuple(m.padding),  # type: ignore[arg-type]
                    tuple(m.dilation),  # type: ignore[arg-type]
                    m.bias is not None,
                )
            )
        elif any(True for _ in m.parameters()):
            return None
        else:
            if isinstance(m, nn.Dropout | nn.BatchNorm1d | nn.BatchNorm2d):
                return None
            ops.append(_Fn(m))
        offset += sum(p.numel() for p in m.parameters())
    return ops


def layerwise_supported(model: nn.Module) -> bool:
    """Whether :func:`clipped_grad_sum` can use the fast layer-wise route for ``model``."""
    return _plan(model) is not None


def _forward_record(
    ops: list[_Op], params: torch.Tensor, X: torch.Tensor
) -> tuple[torch.Tensor, list[tuple[_Op, torch.Tensor, torch.Tensor]]]:
    """Stacked forward pass recording (op, layer input, layer output) of every layer."""
    S, B = X.shape[0], X.shape[1]
    h = X.reshape(S * B, *X.shape[2:])
    records: list[tuple[_Op, torch.Tensor, torch.Tensor]] = []
    for op in ops:
        if isinstance(op, _Linear):
            a = h.reshape(S, B, op.n_in)
            nw = op.n_in * op.n_out
            W = params[:, op.offset : op.offset + nw].reshape(S, op.n_out, op.n_in)
            if op.bias:
                b = params[:, op.offset + nw : op.offset + nw + op.n_out].reshape(S, 1, op.n_out)
                z = torch.baddbmm(b, a, W.transpose(1, 2))
            else:
                z = torch.bmm(a, W.transpose(1, 2))
            records.append((op, a, z))
            h = z.reshape(S * B, op.n_out)
        elif isinstance(op, _Conv):
            x = h.reshape(S * B, op.c_in, h.shape[-2], h.shape[-1])
            H, Wd = x.shape[-2], x.shape[-1]
            kh, kw = op.kernel
            U = F.unfold(x, op.kernel, dilation=op.dilation, padding=op.padding, stride=op.stride)
            K, L = U.shape[1], U.shape[2]
            U = U.reshape(S, B, K, L)
            nw = op.c_out * K
            W = params[:, op.offset : op.offset + nw].reshape(S, op.c_out, K)
            z = torch.einsum("sok,sbkl->sbol", W, U)
            if op.bias:
                b = params[:, op.offset + nw : op.offset + nw + op.c_out]
                z = z + b.reshape(S, 1, op.c_out, 1)
            records.append((op, U, z))
            ho = (H + 2 * op.padding[0] - op.dilation[0] * (kh - 1) - 1) // op.stride[0] + 1
            wo = (Wd + 2 * op.padding[1] - op.dilation[1] * (kw - 1) - 1) // op.stride[1] + 1
            h = z.reshape(S * B, op.c_out, ho, wo)
        else:
            h = op.module(h)
    return h.reshape(S, B, -1), records


_BACKWARD: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    # d(module(x))/dx applied to the incoming gradient g, for the elementwise modules of
    # privml's models (hand-written backward of Linear stacks, see _chain_clipped_sum)
    nn.ReLU: lambda g, x: torch.ops.aten.threshold_backward(g, x, 0.0),
    nn.Tanh: lambda g, x: g * (1.0 - torch.tanh(x).square()),
    nn.Identity: lambda g, x: g,
    Square: lambda g, x: g * (2.0 * x),
    Poly2: lambda g, x: g * (0.25 * x + 0.5),
}


def _is_chain(ops: list[_Op]) -> bool:
    """Linear layers and elementwise modules only (logistic regression, MLPs)."""
    return any(isinstance(op, _Linear) for op in ops) and all(
        isinstance(op, _Linear) or (isinstance(op, _Fn) and type(op.module) in _BACKWARD)
        for op in ops
    )


def _linear_weights(op: _Linear, params: torch.Tensor) -> torch.Tensor:
    nw = op.n_in * op.n_out
    return params[:, op.offset : op.offset + nw].reshape(params.shape[0], op.n_out, op.n_in)


def _chain_clipped_sum(
    ops: list[_Op], binary: bool, params: torch.Tensor, batch: Batch, max_grad_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_layerwise_clipped_sum` for Linear stacks, with the backward pass by hand.

    The gradient of the (masked) loss with respect to the logits is ``softmax - onehot``
    (cross-entropy) or ``sigmoid - y`` (BCE); it is carried back through each Linear layer
    (one batched matrix product) and elementwise module (its derivative). Same result as
    autograd, without its per-node overhead, which dominates on small models.
    """
    S, B = batch.y.shape
    h = batch.X
    inputs: list[torch.Tensor] = []
    for op in ops:
        inputs.append(h)
        if isinstance(op, _Linear):
            W = _linear_weights(op, params)
            if op.bias:
                nw = op.offset + op.n_in * op.n_out
                b = params[:, nw : nw + op.n_out].reshape(S, 1, op.n_out)
                h = torch.baddbmm(b, h, W.transpose(1, 2))
            else:
                h = torch.bmm(h, W.transpose(1, 2))
        else:
            assert isinstance(op, _Fn)
            h = op.module(h)
    mask = batch.mask
    if binary:  # BCE on the first logit (any others get no gradient)
        g0 = (torch.sigmoid(h[..., 0]) - batch.y.to(h.dtype)).mul_(mask)
        if h.shape[-1] == 1:
            g = g0.unsqueeze(-1)
        else:
            g = torch.zeros_like(h)
            g[..., 0] = g0
    else:
        g = softmax_last(h).contiguous()
        g.scatter_add_(-1, batch.y.unsqueeze(-1), torch.full((S, B, 1), -1.0, dtype=g.dtype))
        g.mul_(mask.unsqueeze(-1))
    first = next(i for i, op in enumerate(ops) if isinstance(op, _Linear))
    grads: list[torch.Tensor] = [g] * len(ops)  # entries of non-Linear ops are unused
    for i in range(len(ops) - 1, first - 1, -1):
        op = ops[i]
        if isinstance(op, _Linear):
            grads[i] = g
            if i > first:
                g = torch.bmm(g, _linear_weights(op, params))
        else:
            assert isinstance(op, _Fn)
            g = _BACKWARD[type(op.module)](g, inputs[i])
    sq: torch.Tensor | None = None
    for op, a, g in zip(ops, inputs, grads, strict=True):
        if isinstance(op, _Linear):
            an = a.square().sum(-1)
            if op.bias:
                an = an + 1.0
            term = g.square().sum(-1).mul_(an)
            sq = term if sq is None else sq.add_(term)
    assert sq is not None
    norms = sq.sqrt_()
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp_(max=1.0).mul_(mask)
    pieces: list[torch.Tensor] = []
    for op, a, g in zip(ops, inputs, grads, strict=True):
        if isinstance(op, _Linear):
            cg = g * c.unsqueeze(-1)
            pieces.append(torch.bmm(cg.transpose(1, 2), a).reshape(S, -1))
            if op.bias:
                pieces.append(cg.sum(1))
    return torch.cat(pieces, dim=1), norms * mask


def _layerwise_clipped_sum(
    ops: list[_Op],
    binary: bool,
    params: torch.Tensor,
    batch: Batch,
    max_grad_norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _is_chain(ops):
        return _chain_clipped_sum(ops, binary, params, batch, max_grad_norm)
    loss_fn = per_sample_loss(binary)
    S, B = batch.y.shape
    with torch.enable_grad():
        p = params.detach().requires_grad_(True)
        logits, records = _forward_record(ops, p, batch.X)
        outs = [z for _, _, z in records]
        losses = loss_fn(logits.reshape(S * B, -1), batch.y.reshape(-1)).reshape(S, B)
        grads = torch.autograd.grad((losses * batch.mask).sum(), outs)
    records = [(op, a.detach(), z) for op, a, z in records]
    sq = torch.zeros(S, B, dtype=params.dtype)
    conv_samples: list[torch.Tensor | None] = []
    for (op, a, _), g in zip(records, grads, strict=True):
        if isinstance(op, _Linear):
            gn = g.square().sum(-1)
            an = a.square().sum(-1) + (1.0 if op.bias else 0.0)
            sq = sq + gn * an
            conv_samples.append(None)
        else:
            assert isinstance(op, _Conv)
            G = torch.einsum("sbol,sbkl->sbok", g, a)
            sq = sq + torch.linalg.vector_norm(G, dim=(2, 3)).square_()
            if op.bias:
                sq = sq + g.sum(-1).square().sum(-1)
            conv_samples.append(G)
    norms = sq.sqrt()
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * batch.mask
    pieces: list[torch.Tensor] = []
    for (op, a, _), g, Gs in zip(records, grads, conv_samples, strict=True):
        if isinstance(op, _Linear):
            cg = g * c.unsqueeze(-1)
            pieces.append(torch.bmm(cg.transpose(1, 2), a).reshape(S, -1))
            if op.bias:
                pieces.append(cg.sum(1))
        else:
            assert isinstance(op, _Conv) and Gs is not None
            pieces.append(torch.einsum("sb,sbok->sok", c, Gs).reshape(S, -1))
            if op.bias:
                pieces.append(torch.einsum("sb,sbol->so", c, g))
    return torch.cat(pieces, dim=1), norms * batch.mask


def per_sample_gradients(
    model: nn.Module, params: torch.Tensor, batch: Batch, *, binary: bool
) -> torch.Tensor:
    """Per-sample gradients ``[S, B, P]`` with ``torch.func`` (vmap over sites and samples).

    The gradient of record ``(s, b)``'s loss with respect to site ``s``'s parameters; padded
    records (``mask == 0``) get zero. Generic (any model ``functional_forward`` supports) and
    the reference the layer-wise route is tested against.
    """
    f = functional_forward(model)
    loss = per_sample_loss(binary)

    def one(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(f(p, x.unsqueeze(0)), y.unsqueeze(0)).sum()

    per_site = vmap(grad(one), in_dims=(None, 0, 0))
    G = vmap(per_site, in_dims=(0, 0, 0))(params.detach(), batch.X, batch.y)
    return G * batch.mask.unsqueeze(-1)


def _vmap_clipped_sum(
    model: nn.Module, params: torch.Tensor, batch: Batch, max_grad_norm: float, binary: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    G = per_sample_gradients(model, params, batch, binary=binary)
    norms = G.norm(dim=-1)
    c = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * batch.mask
    return torch.einsum("sb,sbp->sp", c, G), norms


def clipped_grad_sum(
    model: nn.Module,
    params: torch.Tensor,
    batch: Batch,
    *,
    max_grad_norm: float,
    binary: bool,
    method: Literal["auto", "layerwise", "vmap"] = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of per-sample gradients clipped to ``max_grad_norm``, for every site.

    Args:
        model: the architecture (its own parameter values are not used).
        params: ``[S, P]`` stacked parameters, one row per site.
        batch: ``X [S, B, F]``, ``y [S, B]``, ``mask [S, B]`` (1 = real record).
        max_grad_norm: clipping norm C > 0 (L2, over all parameters of a record).
        binary: one-logit BCE loss (True) or cross-entropy (False).
        method: ``"layerwise"`` (Linear/Conv2d Sequential models), ``"vmap"`` (any model) or
            ``"auto"`` (layer-wise when supported).

    Returns:
        ``(sums [S, P], norms [S, B])``: the clipped sums and each record's unclipped gradient
        norm (0 for padding). Clipping factor ``min(1, C / (norm + 1e-6))`` as in Opacus.
    """
    C = _positive("max_grad_norm", "clipped_grad_sum", max_grad_norm)
    if method not in ("auto", "layerwise", "vmap"):
        raise UsageError(
            "The 'method' parameter of clipped_grad_sum must be 'auto', 'layerwise' or 'vmap'. "
            f"Got {method!r} instead."
        )
    ops = _plan(model) if method != "vmap" else None
    if method == "layerwise" and ops is None:
        raise UsageError(
            "clipped_grad_sum(method='layerwise') supports nn.Sequential models of Linear and "
            "Conv2d layers and parameter-free modules; use method='vmap' for this model."
        )
    if ops is not None:
        return _layerwise_clipped_sum(ops, binary, params, batch, C)
    return _vmap_clipped_sum(model, params, batch, C, binary)


# ----------------------------------------------------------------------------- the rule


class DPSGDGradient:
    """DP-SGD step direction for every site of a cohort (a ``GradientRule``).

    ``rule(params [S, P], batch, step)`` returns ``(sum of clipped per-sample gradients +
    N(0, (sigma_s C)^2 I)) / expected_batch[s]`` for each site ``s`` whose local training has
    not finished (``step < steps[s]``) and 0 for the others. Use it with
    :func:`privml.models.training.train_cohort` and ``batches=(pb.idx, pb.mask)`` from
    :func:`poisson_batches`.

    Args:
        model: the architecture.
        spec: its :class:`~privml.models.nets.ModelSpec` (kept for introspection).
        binary: one-logit BCE (True) or cross-entropy (False).
        max_grad_norm: per-sample clipping norm C > 0.
        noise_multipliers: ``[S]`` sigma_s >= 0 (0 = no noise, not private; for tests).
        expected_batch: ``[S]`` q_s N_s > 0, the divisor.
        steps: ``[S]`` number of real steps of each site.
        generators: ``[S]`` the noise of each site: :class:`~privml.dp.randomness.NoiseStream`
            (private training) or seeded ``torch.Generator`` (simulations only, see
            :func:`noise_generators`). With streams the rule must be called for steps 0, 1,
            ... in order.
        method: per-sample gradient route, see :func:`clipped_grad_sum`.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ModelSpec | None,
        *,
        binary: bool,
        max_grad_norm: float,
        noise_multipliers: Sequence[float] | np.ndarray,
        expected_batch: Sequence[float] | np.ndarray,
        steps: Sequence[int] | np.ndarray,
        generators: Sequence[torch.Generator] | Sequence[NoiseStream],
        method: Literal["auto", "layerwise", "vmap"] = "auto",
    ) -> None:
        func = "DPSGDGradient"
        self.model = model
        self.spec = spec
        self.binary = bool(binary)
        self.max_grad_norm = _positive("max_grad_norm", func, max_grad_norm)
        sig = [_positive("noise_multipliers", func, v, allow_zero=True) for v in noise_multipliers]
        exp = [_positive("expected_batch", func, v) for v in expected_batch]
        st = [_count("steps", func, int(v), minimum=0) for v in steps]
        S = len(sig)
        if not (len(exp) == len(st) == len(generators) == S) or S == 0:
            raise UsageError(
                f"{func} needs one noise multiplier, expected batch, step count and generator "
                f"per site; got {S}, {len(exp)}, {len(st)} and {len(generators)}."
            )
        self.noise_std = torch.tensor(sig, dtype=torch.float32) * self.max_grad_norm
        self.expected_batch = torch.tensor(exp, dtype=torch.float32)
        self.steps = np.asarray(st)
        self.generators = list(generators)
        kinds = {isinstance(g, NoiseStream) for g in self.generators}
        if len(kinds) > 1:
            raise UsageError(
                f"{func}: give every site a NoiseStream (private training) or every site a "
                "torch.Generator (seeded simulations), not a mix."
            )
        self._streams = kinds == {True}
        self._cache: torch.Tensor | None = None  # [S, K, P] noise of steps t0 .. t0 + K - 1
        self._cache_t0 = 0
        self.method = method
        # planned once (the plan walks the model): every step reuses it
        self._ops = _plan(model) if method != "vmap" else None
        if method == "layerwise" and self._ops is None:
            raise UsageError(f"{func}: this model needs method='vmap' or 'auto'.")

    def __call__(self, params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        if self._ops is not None:
            sums, _ = _layerwise_clipped_sum(
                self._ops, self.binary, params, batch, self.max_grad_norm
            )
        else:
            sums, _ = _vmap_clipped_sum(
                self.model, params, batch, self.max_grad_norm, self.binary
            )
        S, P = sums.shape
        active = step < self.steps
        if self._streams:
            noise = self._stream_noise(step, P, sums.dtype)
        else:
            noise = torch.zeros(S, P, dtype=sums.dtype)
            for s in np.flatnonzero(active):
                gen = self.generators[s]
                if self.noise_std[s] > 0 and isinstance(gen, torch.Generator):
                    noise[s] = torch.randn(P, generator=gen, dtype=sums.dtype)
        # sums is this step's own tensor; noise may be a view of the prefetched draws
        out = sums.add_(noise * self.noise_std[:, None]).div_(self.expected_batch[:, None])
        if not active.all():
            out.mul_(torch.from_numpy(active.astype(np.float32))[:, None])
        return out

    def _stream_noise(self, step: int, P: int, dtype: torch.dtype) -> torch.Tensor:
        """``[S, P]`` standard normals of ``step`` (0 for inactive or noiseless sites).

        Site ``s``'s noise at step ``t`` is normals ``t P .. (t + 1) P - 1`` of its stream,
        whatever the batching: they are drawn for several steps at once (up to
        ``NOISE_PREFETCH`` numbers per refill) through one vectorized call for all sites.
        """
        cache = self._cache
        if cache is None or cache.dtype != dtype or not (
            self._cache_t0 <= step < self._cache_t0 + cache.shape[1]
        ):
            expected = 0 if cache is None else self._cache_t0 + cache.shape[1]
            if step != expected:
                raise UsageError(
                    "DPSGDGradient draws noise in step order from step 0; it was called for "
                    f"step {step} when step {expected} was due."
                )
            S = len(self.generators)
            rows = np.flatnonzero((step < self.steps) & (self.noise_std.numpy() > 0))
            remaining = int(self.steps.max()) - step
            K = max(1, min(remaining, NOISE_PREFETCH // max(1, len(rows) * P)))
            cache = torch.zeros(S, K, P, dtype=dtype)
            if len(rows):
                streams = [g for i in rows if isinstance(g := self.generators[int(i)], NoiseStream)]
                drawn = normal_rows(streams, K * P, dtype=dtype)
                cache[torch.from_numpy(rows)] = drawn.view(len(rows), K, P)
            self._cache, self._cache_t0 = cache, step
        return cache[:, step - self._cache_t0]
