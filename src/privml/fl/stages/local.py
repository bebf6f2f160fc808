"""Step ``local update``: each site trains from the global model on its own records.

:class:`LocalTraining` runs local SGD for a batch of sites at once (the cohort in simulation,
one site on Flower) with any :class:`~privml.models.training.GradientRule`: plain SGD, the
DP-SGD rule of :mod:`privml.dp.sgd` (with its Poisson batches), adversarial training. FedProx
adds its proximal term. Site ``i`` visits its records in the order
:func:`~privml.models.training.site_order` gives for (seed, round, epoch, i): a hash of those
and of each record's index, so a site computes the same update whichever engine or cohort it
runs in, and every site's order comes from a few array operations for the whole cohort
(:func:`~privml.models.training.cohort_schedule`), not from a generator per site.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from privml.data.federation import SiteData
from privml.models.training import CohortData, GradientRule, cohort_schedule, train_cohort

__all__ = ["DEFAULT_PROX_MU", "LocalTraining", "prox_weight", "root_update"]

DEFAULT_PROX_MU = 0.01
"""FedProx's proximal weight when ``strategy = "fedprox"`` and ``prox_mu`` is not given."""

#: The sites' records by site index: every site (a list, simulation) or some (a mapping, a
#: Flower site holds its own only).
Sites = Sequence[SiteData] | Mapping[int, SiteData]


def prox_weight(training: Any) -> float:
    """FedProx's proximal weight mu: ``prox_mu`` (default 0.01) with ``strategy = "fedprox"``,
    else 0 (plain local SGD)."""
    if training.strategy != "fedprox":
        return 0.0
    return float(training.prox_mu if training.prox_mu is not None else DEFAULT_PROX_MU)


@dataclass
class LocalTraining:
    """Local training of the sites in ``data(rnd)`` (indexed like the config's sites).

    Attributes:
        data: the sites' records as they train in a round, ``rnd -> {site index: SiteData}``
            or a fixed mapping; a simulated data attack (label flip, backdoor) swaps in the
            poisoned records of its sites.
        training: ``[training]`` (lr, batch size, local epochs, seed, strategy).
        rule: the gradient rule of one step; may depend on the round and the batch's sites
            through ``make_rule``.
        make_rule: ``(rnd, ids, data, rngs) -> (rule, batches)`` for rules with per-round
            state (DP-SGD's noise generators and Poisson batches ``(idx, mask)``); overrides
            ``rule``.
    """

    data: Callable[[int], Sites] | Sites
    training: Any
    rule: GradientRule | None = None
    make_rule: Callable[..., tuple[GradientRule, tuple[np.ndarray, np.ndarray] | None]] | None = (
        None
    )
    step = "local update"
    _sizes: tuple[Sites, NDArray[np.float64]] | None = field(default=None, init=False, repr=False)

    def records(self, rnd: int) -> Sites:
        return self.data(rnd) if callable(self.data) else self.data

    def weights(self, rnd: int, ids: NDArray[np.int64]) -> NDArray[np.float64]:
        """FedAvg's weights: the number of records each site trains on in round ``rnd``."""
        sites = self.records(rnd)
        if isinstance(sites, Sequence):  # every site: counted once per list of (frozen) sites
            if (
                self._sizes is None
                or self._sizes[0] is not sites
                or len(sites) != len(self._sizes[1])
            ):
                sizes = np.fromiter((s.n_train for s in sites), np.float64, count=len(sites))
                self._sizes = (sites, sizes)
            return self._sizes[1][np.asarray(ids, dtype=np.int64)]
        return np.array([sites[int(i)].n_train for i in ids], dtype=np.float64)

    def __call__(
        self, rnd: int, params: torch.Tensor, ids: NDArray[np.int64]
    ) -> NDArray[np.float64]:
        t = self.training
        sites = self.records(rnd)
        cohort = [sites[int(i)] for i in ids]
        data = cohort_data(cohort)
        batches = None
        rule = self.rule
        rngs: list[np.random.Generator] = []
        if self.make_rule is not None:
            rngs = [np.random.default_rng([t.seed, rnd, 2, int(i)]) for i in ids]
            rule, batches = self.make_rule(rnd, ids, data, rngs)
        assert rule is not None
        schedule = None
        if batches is None:
            # every site's shuffles at once: site i visits its records in site_order's order
            schedule = cohort_schedule(
                data.sizes, batch_size=t.batch_size, epochs=t.local_epochs, seed=t.seed,
                rnd=rnd, site_ids=np.asarray(ids, dtype=np.int64),
            )  # fmt: skip
        new = train_cohort(
            params, data, rule=rule, lr=t.lr, batch_size=t.batch_size, epochs=t.local_epochs,
            rngs=rngs, prox_mu=prox_weight(t), batches=batches, schedule=schedule,
        )  # fmt: skip
        return (new - params.reshape(1, -1)).numpy().astype(np.float64)


def cohort_data(cohort: Sequence[SiteData]) -> CohortData:
    """The cohort's training records, concatenated: a view of the loaded arrays when the cohort
    is a run of consecutive sites as loaded (every site of a round, in simulation), else a
    copy."""
    pool = cohort[0].pool if cohort else None
    run = pool.train_run(cohort) if pool is not None else None
    if run is not None:
        X, y, offsets = run
        return CohortData(torch.from_numpy(X), torch.from_numpy(y), offsets)
    return CohortData.from_arrays([s.X_train for s in cohort], [s.y_train for s in cohort])


def root_update(
    params: torch.Tensor, X_root: np.ndarray, y_root: np.ndarray, *, training: Any, rnd: int,
    rule: GradientRule,
) -> NDArray[np.float64]:  # fmt: skip
    """FLTrust's server update ``g0`` for round ``rnd``: the server trains on its clean root
    dataset exactly as a client trains (same lr, batch size, local epochs), float64 ``[P]``.

    Batches are shuffled with a generator seeded by ``(seed, rnd, 4)``.
    """
    data = CohortData.from_arrays([X_root], [y_root])
    new = train_cohort(
        params, data, rule=rule, lr=training.lr, batch_size=training.batch_size,
        epochs=training.local_epochs, rngs=[np.random.default_rng([training.seed, rnd, 4])],
    )  # fmt: skip
    return (new[0] - params.reshape(-1)).numpy().astype(np.float64)
