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
    the whole cohort.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, *, binary: bool) -> None:
        fast = stacked_forward(spec)
        if fast is None:
            fast = vmap(functional_forward(model))
        self._forward = fast
        self._loss = per_sample_loss(binary)

    def __call__(self, params: torch.Tensor, batch: Batch, step: int) -> torch.Tensor:
        with torch.enable_grad():
            p = params.detach().requires_grad_(True)
            logits = self._forward(p, batch.X)
            S, B = batch.y.shape
            losses = self._loss(logits.reshape(S * B, -1), batch.y.reshape(-1)).reshape(S, B)
            per_site = (losses * batch.mask).sum(dim=1) / batch.mask.sum(dim=1).clamp(min=1.0)
            (g,) = torch.autograd.grad(per_site.sum(), p)
        return g


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
    idx = np.zeros((len(sizes), steps, batch_size), dtype=np.int64)
    mask = np.zeros((len(sizes), steps, batch_size), dtype=np.float32)
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
) -> torch.Tensor:
    """Run local SGD at every site from the same global ``params``; return ``[S, P]`` new params.

    ``prox_mu > 0`` adds FedProx's proximal term ``mu/2 ||w - w_global||^2`` (Li et al. 2020).
    ``batches`` overrides the shuffled mini-batches (e.g. Poisson sampling for DP-SGD):
    ``(idx, mask)`` of shape ``[S, steps, B]`` with indices local to each site.
    """
    S = len(data.sizes)
    idx, mask = (
        batches
        if batches is not None
        else shuffled_batches(data.sizes, batch_size=batch_size, epochs=epochs, rngs=rngs)
    )
    gidx = torch.from_numpy(idx + data.offsets[:-1, None, None])
    tmask = torch.from_numpy(mask)
    global_params = params.detach().reshape(1, -1)
    stacked = global_params.repeat(S, 1)
    for k in range(idx.shape[1]):
        rows = gidx[:, k, :]
        batch = Batch(data.X[rows], data.y[rows], tmask[:, k, :])
        with torch.no_grad():
            g = rule(stacked, batch, k)
            if prox_mu:
                active = (tmask[:, k, :].sum(dim=1) > 0).to(g.dtype)[:, None]
                g = g + prox_mu * (stacked - global_params) * active
            stacked = stacked - lr * g
    return stacked
