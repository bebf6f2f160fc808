"""Encrypted (secure) aggregation of federated rounds (``[training] secure_aggregation``).

Three parties, each with its own code path and its own :class:`~privml.he.SecureAggregator`
built from the same public configuration:

* :class:`KeyHolder` -- one site (``key_holder``, default the first site). Before round 1 it
  generates the key pair; the **secret key never leaves this object**. It hands out
  :attr:`KeyHolder.public` (bytes) and decrypts only aggregates of at least two updates.
* :class:`SecureSite` -- every site. It clips its update to the L2 bound, multiplies it by its
  weight and encrypts it under the public material (bytes in, bytes out).
* :class:`SecureServer` -- the server. It holds the public bytes only, sums ciphertext bytes
  (:meth:`SecureAggregator.aggregate`), and after the key holder returns the decrypted sum it
  divides by the total weight and applies the usual server optimizer step
  (:func:`apply_aggregate`, the same step as :func:`privml.fl.engine.aggregate_round`).

**Clipping replaces validation.** The server cannot check an encrypted update's norm, NaNs or
shape against its plaintext, so each site clips its own update to ``clip`` (``max_update_norm``;
with ``aggregator = "norm_bound"`` its ``max_norm``, or the smaller of the two) before
encrypting. An L2 norm ``<= clip`` also bounds every coordinate by ``clip``, which is the
``value_bound`` the fixed-point packing is sized for; a site's encoder refuses larger or
non-finite values. What the server still checks (in :mod:`privml.he`): the message envelope
and kind, the key id (an update under a foreign key is refused), the packing layout and length,
the contribution counts against the headroom, and the same ciphertext submitted twice. A
malicious site that skips clipping can still send any in-range values; robust rules that
compare individual updates (median, Krum, FLTrust...) are therefore refused with secure
aggregation, and ``norm_bound`` is applied client-side.

**Weights.** FedAvg weights by training-record counts. Here a site scales its clipped update
by ``n_i / n_max`` (``n_max`` the largest site's count) so the value stays within ``clip``; the
server divides the decrypted sum by ``sum(n_i / n_max)`` over the sites that contributed. The
counts are public in this protocol (the server sees who contributed and their counts, as it
does without encryption); only the updates are hidden.

The result equals plain FedAvg of the clipped updates within the fixed-point resolution
``2**-precision_bits`` (Paillier) or CKKS's approximation error plus its flooding noise
(``clip * 2**-precision_bits`` per value of the sum; see docs/threat-model.md).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import ConfigError, CryptoError, UsageError
from privml.fl.checkpoint import ServerState
from privml.fl.server_opt import server_step
from privml.he import SecureAggregator

if TYPE_CHECKING:
    from privml.config import TrainingConfig
    from privml.fl.engine import RoundOutcome, ServerPlan

__all__ = [
    "KeyHolder",
    "SecureAggregation",
    "SecureServer",
    "SecureSite",
    "apply_aggregate",
    "clip_bound",
    "clip_update",
]

_MIN_SITES = 2


def clip_bound(training: TrainingConfig) -> float:
    """The L2 bound every site clips its update to before encrypting (also the per-coordinate
    ``value_bound`` of the encryption): ``max_update_norm``; with ``aggregator = "norm_bound"``
    its ``max_norm`` (the smaller one when both are set).

    Raises:
        ConfigError: no bound configured.
    """
    bounds = []
    if training.max_update_norm is not None:
        bounds.append(float(training.max_update_norm))
    if training.aggregator == "norm_bound" and training.aggregator_params.get("max_norm"):
        bounds.append(float(training.aggregator_params["max_norm"]))
    if not bounds:
        raise ConfigError(
            "secure aggregation needs max_update_norm = ... in [training]: each site clips its "
            "update to it before encrypting"
        )
    return min(bounds)


def clip_update(update: NDArray[np.float64], bound: float) -> tuple[NDArray[np.float64], bool]:
    """``update * min(1, bound / ||update||)`` and whether it was clipped.

    The result has L2 norm ``<= bound``, hence every coordinate ``|v| <= bound`` (the final
    ``np.clip`` only absorbs floating-point rounding of the scale factor).
    """
    u = np.asarray(update, dtype=np.float64)
    norm = float(np.linalg.norm(u))
    clipped = norm > bound
    if clipped:
        u = u * (bound / norm)
    return np.clip(u, -bound, bound), clipped


def _make_aggregator(
    scheme: str, *, n_sites: int, n_params: int, bound: float, precision_bits: int, key_bits: int
) -> SecureAggregator:
    return SecureAggregator(
        scheme,
        n_sites=n_sites,
        n_params=n_params,
        value_bound=bound,
        precision_bits=precision_bits,
        key_bits=key_bits,
        min_sites=min(_MIN_SITES, n_sites),
    )


class KeyHolder:
    """The key-holder site: generates the aggregation keys and decrypts sums, nothing else.

    The secret key is created in ``__init__`` and kept in a private attribute; only
    :attr:`public` (bytes, no secret) is given to the server and the other sites.
    """

    def __init__(self, site: str, aggregator: SecureAggregator) -> None:
        self.site = site
        self._agg = aggregator
        t0 = time.perf_counter()
        keys = aggregator.keygen()
        self.keygen_seconds = time.perf_counter() - t0
        self._secret = keys.secret
        self.public: bytes = aggregator.public_material(keys)

    def decrypt_sum(self, aggregate: bytes, *, n_contributions: int) -> NDArray[np.float64]:
        """Decrypt an aggregate of exactly ``n_contributions`` (>= 2) updates: their **sum**.

        Raises:
            CryptoError: an individual update, too few contributions, or another count.
        """
        if not isinstance(aggregate, bytes):
            raise UsageError(
                f"The 'aggregate' parameter must be bytes. Got {type(aggregate).__name__}."
            )
        return self._agg.decrypt_aggregate(self._secret, aggregate, n_sites=n_contributions)

    def __repr__(self) -> str:
        return f"KeyHolder(site={self.site!r}, scheme={self._agg.scheme!r})"


class SecureSite:
    """A site's side: clip, weight and encrypt its update under the public material."""

    def __init__(self, aggregator: SecureAggregator, public: bytes, *, clip: float) -> None:
        if not isinstance(public, bytes):
            raise UsageError(
                f"The 'public' parameter must be bytes. Got {type(public).__name__} instead."
            )
        self._agg = aggregator
        self.public = public
        self.clip = float(clip)

    def encrypt(self, update: NDArray[np.float64], *, weight: float) -> tuple[bytes, bool]:
        """Clip ``update`` to ``clip``, multiply by ``weight`` (in [0, 1]) and encrypt it.

        Returns the ciphertext bytes and whether the update was clipped.
        """
        if not 0 <= weight <= 1:
            raise UsageError(f"The 'weight' parameter must be in [0, 1]. Got {weight!r} instead.")
        u, clipped = clip_update(update, self.clip)
        return self._agg.encrypt_update(self.public, u * weight), clipped


class SecureServer:
    """The server's side: public material and ciphertext bytes only."""

    def __init__(self, aggregator: SecureAggregator, public: bytes) -> None:
        if not isinstance(public, bytes):
            raise UsageError(
                f"The 'public' parameter must be bytes. Got {type(public).__name__} instead."
            )
        self._agg = aggregator
        self.public = public

    def sum_ciphertexts(self, blobs: Sequence[bytes]) -> bytes:
        """The encrypted sum of the sites' encrypted updates (the HE layer checks format, key,
        layout, counts and duplicates, raising CryptoError)."""
        if any(not isinstance(b, bytes) for b in blobs):
            raise UsageError("every encrypted update must be bytes")
        return self._agg.aggregate(list(blobs), public=self.public)


def apply_aggregate(
    state: ServerState,
    summed: NDArray[np.float64],
    total_weight: float,
    *,
    plan: ServerPlan,
) -> tuple[ServerState, NDArray[np.float64]]:
    """Server step after decryption: mean update ``summed / total_weight``, then the configured
    server optimizer (as :func:`privml.fl.engine.aggregate_round` does after its rule)."""
    if not total_weight > 0:
        raise UsageError(f"The 'total_weight' parameter must be > 0. Got {total_weight!r}.")
    update = np.asarray(summed, dtype=np.float64) / float(total_weight)
    new_params, new_opt = server_step(
        plan.optimizer, state.opt, state.params.astype(np.float64), update
    )
    new_state = ServerState(state.round + 1, new_params.astype(np.float32), new_opt, update.copy())
    return new_state, update


@dataclass
class _RoundCost:
    round: int
    sites: int
    encrypt_seconds: float
    aggregate_seconds: float
    decrypt_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "sites": self.sites,
            "encrypt_seconds_total": self.encrypt_seconds,
            "encrypt_seconds_per_site": self.encrypt_seconds / max(1, self.sites),
            "aggregate_seconds": self.aggregate_seconds,
            "decrypt_seconds": self.decrypt_seconds,
        }


@dataclass
class SecureAggregation:
    """The simulator's wiring of the three parties for one run (built before round 1).

    Use :meth:`from_training`, then :meth:`round` in place of ``aggregate_round`` each round,
    and :meth:`describe` for results.json ``federation.secure_aggregation``.
    """

    scheme: str
    clip: float
    precision_bits: int
    key_bits: int | None
    site_names: list[str]
    n_train: NDArray[np.float64]
    key_holder: KeyHolder
    sites: SecureSite
    server: SecureServer
    costs: list[_RoundCost] = field(default_factory=list)
    ciphertext_bytes: int | None = None
    n_clipped: int = 0

    @classmethod
    def from_training(
        cls,
        training: TrainingConfig,
        site_names: Sequence[str],
        n_train: Sequence[int],
        *,
        n_params: int,
    ) -> SecureAggregation:
        """Set up keys at the key holder and the public material at the server and sites.

        Raises:
            ConfigError: unknown key holder, fewer than 2 sites, or no clip bound.
        """
        scheme = training.secure_aggregation
        if scheme not in ("paillier", "ckks"):
            raise UsageError(f"secure_aggregation is {scheme!r}; nothing to set up")
        names = list(site_names)
        if len(names) < _MIN_SITES:
            raise ConfigError(
                f"secure aggregation needs at least {_MIN_SITES} sites (the key holder never "
                f"decrypts one site's update alone); this federation has {len(names)}"
            )
        holder = training.key_holder if training.key_holder is not None else names[0]
        if holder not in names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ConfigError(f"training.key_holder: no site named {holder!r} (sites: {shown})")
        bound = clip_bound(training)
        kw = {
            "n_sites": len(names),
            "n_params": n_params,
            "bound": bound,
            "precision_bits": training.secure_aggregation_precision_bits,
            "key_bits": training.secure_aggregation_key_bits,
        }
        try:
            key_holder = KeyHolder(holder, _make_aggregator(scheme, **kw))  # type: ignore[arg-type]
            with warnings.catch_warnings():
                # The key-size warning was given once, at the key holder.
                warnings.simplefilter("ignore")
                site_agg = _make_aggregator(scheme, **kw)  # type: ignore[arg-type]
                server_agg = _make_aggregator(scheme, **kw)  # type: ignore[arg-type]
        except (UsageError, CryptoError) as exc:
            raise ConfigError(f"training.secure_aggregation: {exc}") from None
        counts = np.asarray(n_train, dtype=np.float64)
        return cls(
            scheme=scheme,
            clip=bound,
            precision_bits=training.secure_aggregation_precision_bits,
            key_bits=training.secure_aggregation_key_bits if scheme == "paillier" else None,
            site_names=names,
            n_train=counts,
            key_holder=key_holder,
            sites=SecureSite(site_agg, key_holder.public, clip=bound),
            server=SecureServer(server_agg, key_holder.public),
        )

    def round(
        self,
        state: ServerState,
        updates: NDArray[np.float64],
        site_ids: NDArray[np.int64],
        *,
        plan: ServerPlan,
    ) -> RoundOutcome:
        """One encrypted round: sites encrypt, the server sums ciphertexts, the key holder
        decrypts the sum, the server divides by the total weight and steps its optimizer.

        A round with no update, or with fewer than 2 (the key holder would be decrypting one
        site's update), is skipped: the model does not change. A site whose update is not
        finite does not send it (counted as rejected, ``non_finite``).
        """
        from privml.fl.engine import RoundOutcome
        from privml.fl.validate import REJECTION_REASONS

        rnd = state.round + 1
        by_reason = dict.fromkeys(REJECTION_REASONS, 0)
        rows = np.asarray(updates, dtype=np.float64).reshape(len(site_ids), -1)
        finite = np.isfinite(rows).all(axis=1) if len(rows) else np.zeros(0, dtype=bool)
        rejected = [(int(i), "non_finite") for i in np.flatnonzero(~finite)]
        by_reason["non_finite"] = len(rejected)
        accepted = [int(i) for i in np.flatnonzero(finite)]
        counts = {"accepted": len(accepted), "rejected": len(rejected), "by_reason": by_reason}

        def skip(reason: str) -> RoundOutcome:
            carried = ServerState(rnd, state.params, state.opt, state.center)
            return RoundOutcome(carried, None, accepted, rejected, counts, skipped=reason)

        if len(site_ids) == 0:
            return skip("no_updates")
        if not accepted:
            return skip("all_rejected")
        if len(accepted) < _MIN_SITES:
            return skip("too_few_updates")
        n_max = float(self.n_train.max())
        weights = self.n_train[site_ids[accepted]] / n_max
        if not weights.sum() > 0:
            return skip("zero_weight")
        # Sites (each encrypts its own update; timed together, reported per site too).
        t0 = time.perf_counter()
        blobs = []
        for i, w in zip(accepted, weights, strict=True):
            blob, clipped = self.sites.encrypt(rows[i], weight=float(w))
            blobs.append(blob)
            self.n_clipped += int(clipped)
        t1 = time.perf_counter()
        self.ciphertext_bytes = len(blobs[0])
        # Server: ciphertext bytes and public material only.
        total = self.server.sum_ciphertexts(blobs)
        t2 = time.perf_counter()
        # Key holder: decrypts the sum of len(blobs) contributions, nothing else.
        summed = self.key_holder.decrypt_sum(total, n_contributions=len(blobs))
        t3 = time.perf_counter()
        new_state, update = apply_aggregate(state, summed, float(weights.sum()), plan=plan)
        self.costs.append(_RoundCost(rnd, len(blobs), t1 - t0, t2 - t1, t3 - t2))
        info = {"clip": self.clip, "total_weight": float(weights.sum())}
        return RoundOutcome(new_state, update, accepted, rejected, counts, info=info)

    def describe(self) -> dict[str, Any]:
        """results.json ``federation.secure_aggregation``."""

        def med(key: str) -> float | None:
            vals = [c.to_dict()[key] for c in self.costs]
            return statistics.median(vals) if vals else None

        agg = self.sites._agg
        if self.scheme == "paillier":
            params: dict[str, Any] = {
                "key_bits": self.key_bits,
                "slot_bits": agg.slot_bits,
                "values_per_ciphertext": agg.codec.slots,
            }
        else:
            params = {
                "poly_modulus_degree": agg.profile.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(agg.profile.coeff_bits),
                "values_per_ciphertext": agg.profile.poly_modulus_degree,
                "flooding_noise_std": self.clip * 2.0**-self.precision_bits,
            }
        return {
            "scheme": self.scheme,
            "parameters": params,
            "precision_bits": self.precision_bits,
            "clip": self.clip,
            "clipping": "each site clips its update to L2 norm <= clip before encrypting "
            "(this also bounds every coordinate by clip); the server cannot check norms",
            "weights": "training-record counts n_i / max n (public); the server divides the "
            "decrypted sum by their total",
            "key_holder": self.key_holder.site,
            "public_material_bytes": len(self.key_holder.public),
            "keygen_seconds": self.key_holder.keygen_seconds,
            "ciphertext_bytes_per_site": self.ciphertext_bytes,
            "updates_clipped": self.n_clipped,
            "server_checks": "envelope and kind, key id, packing layout and length, "
            "contribution counts, duplicates (privml.he); no plaintext validation",
            "median_encrypt_seconds_per_site": med("encrypt_seconds_per_site"),
            "median_aggregate_seconds": med("aggregate_seconds"),
            "median_decrypt_seconds": med("decrypt_seconds"),
            "per_round": [c.to_dict() for c in self.costs],
        }
