"""Step ``site``: simulated attackers, to measure how robust the server is.

The attacking sites are chosen once per run by :func:`attacker_indices` (the same choice for
``privml run`` and ``privml audit``). An attacker trains like an honest site, on its own
records or on poisoned ones (data attacks: ``label_flip``, the backdoor's triggered copies),
then rewrites its update before it leaves the site (update attacks of
:mod:`privml.fl.attacks`: ``sign_flip``, ``scale``, ``gaussian``, and the omniscient ``alie``
and ``ipm``, which read the cohort's honest updates and so run in simulation only) or boosts
it (the backdoor's model replacement). Each attacker draws its own randomness from a
generator seeded by ``(seed, round, 3, site)``, so it behaves the same on every engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.data.federation import SiteData
from privml.errors import ConfigError
from privml.fl.attacks import ATTACK_PARAMS, UPDATE_ATTACKS, apply_attack, flip_labels
from privml.fl.rounds import SiteUpdates

__all__ = ["OMNISCIENT", "SimulatedAttack", "attacker_indices", "boost_updates"]

OMNISCIENT: tuple[str, ...] = ("alie", "ipm")
"""Attacks that read the other sites' honest updates (simulation only)."""

#: ``(X, y, rng) -> (X', y')``: how a malicious site rewrites its training records.
Poison = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def attacker_indices(attack: Any, site_names: Sequence[str], seed: int) -> NDArray[np.int64]:
    """Indices of the sites that ``attack`` makes Byzantine, ascending.

    ``attack.sites`` lists names or positions (0-based); ``attack.fraction`` picks
    ``round(fraction * n_sites)`` sites at random (generator seeded by ``(seed, 7)``), fixed
    for the whole run. ``privml run`` and ``privml audit`` both choose with this function.

    Raises:
        ConfigError: an unknown site, or a fraction that rounds to no site (or to every site
            for an attack that imitates honest clients).
    """
    n = len(site_names)
    if attack.sites is not None:
        chosen = _named_sites(attack.sites, list(site_names))
    else:
        k = math.floor(attack.fraction * n + 0.5)
        if k < 1:
            raise ConfigError(
                f"attack.fraction = {attack.fraction} of {n} sites rounds to no attacker; "
                f"raise it to at least {0.5 / n:.3g} or list the sites"
            )
        rng = np.random.default_rng([seed, 7])
        chosen = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    if attack.kind in OMNISCIENT and len(chosen) >= n:
        raise ConfigError(
            f"the {attack.kind} attack imitates honest sites, but every site is an attacker; "
            "leave at least one honest site"
        )
    return chosen


def _named_sites(sites: Sequence[str | int], names: list[str]) -> NDArray[np.int64]:
    n = len(names)
    idx: list[int] = []
    problems = []
    for s in sites:
        if isinstance(s, int):
            if 0 <= s < n:
                idx.append(s)
            else:
                problems.append(f"attack.sites: position {s} is outside 0..{n - 1}")
        elif s in names:
            idx.append(names.index(s))
        else:
            shown = ", ".join(names[:5]) + (", ..." if n > 5 else "")
            problems.append(f"attack.sites: no site named {s!r} (sites: {shown})")
    if problems:
        raise ConfigError(problems)
    return np.unique(np.asarray(idx, dtype=np.int64))


def boost_updates(
    updates: np.ndarray, weights: np.ndarray, malicious: np.ndarray, boost: float | str
) -> np.ndarray:
    """Scale the malicious rows of ``updates`` (a copy): by ``boost``, or for ``"replace"`` by
    ``gamma = total weight / malicious weight`` (Bagdasaryan et al.'s model replacement: FedAvg
    of the round then lands on the attackers' own model)."""
    out = np.array(updates, dtype=np.float64, copy=True)
    mal = np.asarray(malicious, dtype=bool)
    if not mal.any():
        return out
    w = np.asarray(weights, dtype=np.float64)
    gamma = w.sum() / w[mal].sum() if boost == "replace" else float(boost)
    out[mal] *= gamma
    return out


@dataclass
class SimulatedAttack:
    """Simulated attackers at sites ``sites`` (indices in the config's site order).

    Attributes:
        kind: the ``[attack] kind`` (for reports).
        sites: the attacking sites, ascending.
        update_attack: the update attack of :mod:`privml.fl.attacks` they apply, or None.
        params: its parameters.
        poison: how they rewrite their training records (data attacks), or None.
        boost: scale of their updates (``"replace"``: model replacement), or None.
        start_round: the first round they attack (honest before).
        seed: the run's seed (their randomness: ``(seed, round, 3, site)``).
        info: results.json ``attack`` (filled by the plan).
    """

    kind: str
    sites: NDArray[np.int64]
    update_attack: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    poison: Poison | None = None
    boost: float | str | None = None
    start_round: int = 1
    seed: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    skipped_rounds: list[int] = field(default_factory=list)
    name = "attack"
    step = "site"

    def __post_init__(self) -> None:
        if self.update_attack is not None and self.update_attack not in UPDATE_ATTACKS:
            raise ConfigError(f"unknown update attack {self.update_attack!r}")

    def mask(self, n_sites: int) -> NDArray[np.bool_]:
        """Which of ``n_sites`` sites attack."""
        m = np.zeros(n_sites, dtype=bool)
        m[self.sites] = True
        return m

    def poisoned(self, sites: Mapping[int, SiteData]) -> dict[int, SiteData]:
        """The poisoned records of the attackers among ``sites`` (site index -> records),
        each drawn from a generator seeded by ``(seed, 97, site)``."""
        out: dict[int, SiteData] = {}
        if self.poison is None:
            return out
        for i in self.sites:
            s = sites.get(int(i))
            if s is None:
                continue
            X, y = self.poison(s.X_train, s.y_train, np.random.default_rng([self.seed, 97, int(i)]))
            out[int(i)] = SiteData(s.name, X, y, s.X_test, s.y_test)
        return out

    def apply(self, batch: SiteUpdates) -> None:
        """Rewrite (or boost) the attackers' rows of ``batch`` from round ``start_round`` on."""
        if batch.rnd < self.start_round:
            batch.malicious = np.zeros_like(batch.malicious)
            return
        mal = batch.malicious
        if not mal.any():
            return
        if self.update_attack is not None:
            self._rewrite(batch)
        elif self.boost is not None:
            batch.updates = boost_updates(batch.updates, batch.weights, mal, self.boost)

    def _rewrite(self, batch: SiteUpdates) -> None:
        assert self.update_attack is not None
        # attackers work from the finite updates (a broken honest site's NaN update is left
        # for validation to reject)
        finite: NDArray[np.bool_] = np.asarray(np.isfinite(batch.updates).all(axis=1))
        sub = batch.malicious[finite]
        if self.update_attack in OMNISCIENT and not (~sub).any():
            # nobody honest to imitate in this cohort: the attackers send honest updates
            self.skipped_rounds.append(batch.rnd)
            return
        if not sub.any():
            return
        if self.update_attack == "gaussian":
            self._gaussian(batch, finite)
            return
        batch.updates[finite] = apply_attack(
            self.update_attack, batch.updates[finite], sub,
            rng=np.random.default_rng([self.seed, batch.rnd, 3]), params=dict(self.params),
        )  # fmt: skip

    def _gaussian(self, batch: SiteUpdates, finite: NDArray[np.bool_]) -> None:
        sigma = float({**ATTACK_PARAMS["gaussian"], **self.params}["sigma"])  # type: ignore[arg-type]
        rows = np.flatnonzero(batch.malicious & finite)
        for r in rows:
            rng = np.random.default_rng([self.seed, batch.rnd, 3, int(batch.ids[r])])
            batch.updates[r] = rng.normal(0.0, sigma, size=batch.updates.shape[1])

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_without_honest_client": list(self.skipped_rounds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_rounds = list(state.get("rounds_without_honest_client", []))

    def describe(self) -> dict[str, Any]:
        """results.json ``attack``."""
        return {**self.info, "rounds_without_honest_client": list(self.skipped_rounds)}


def label_flipper(n_classes: int) -> Poison:
    """Label flipping as a :data:`Poison` (class ``c`` becomes ``n_classes - 1 - c``)."""

    def poison(
        X: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return X, flip_labels(y, n_classes)

    return poison
