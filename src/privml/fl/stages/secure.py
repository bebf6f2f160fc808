"""Steps ``seal`` and ``combine`` under secure aggregation (``[training] secure_aggregation``).

Three parties, each with its own code path and its own :class:`~privml.he.SecureAggregator`
built from the same public configuration (:class:`SecureSetup`):

* :class:`KeyHolder` -- one site (``key_holder``, default the first site). Before round 1 it
  generates the key pair; the **secret key never leaves this object**. It hands out
  :attr:`KeyHolder.public` (bytes) and decrypts only aggregates of at least two updates.
* :class:`SecureSite` -- every site. It clips its update to the L2 bound, multiplies it by its
  weight and encrypts it under the public material (bytes in, bytes out).
* :class:`SecureServer` -- the server. It holds the public bytes only, sums ciphertext bytes
  (:meth:`SecureAggregator.aggregate`), and after the key holder returns the decrypted sum it
  divides by the total weight and applies the usual server optimizer step
  and the round goes on to the next steps (central noise, the server optimizer).

As stages: :class:`SealUpdates` runs at every site (step ``seal``), :class:`SecureSum` on the
server (step ``combine``); :class:`KeyHolderService` answers the two requests the key holder
gets (``keygen`` before round 1, ``decrypt`` each round). The engine carries the requests: in
simulation they are function calls, on Flower messages to the key holder's SuperNode. A
masking protocol (pairwise masks, no key holder) fits the same two steps: sites mask in
``seal``, and ``combine`` unmasks with the surviving sites' help through the same requests.

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

**With client-level DP** each site also adds its share of the Gaussian noise before it
encrypts (:class:`privml.fl.stages.noise.NoiseShare`): the key holder and the server only ever
see a noised sum.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import ConfigError, CryptoError, UsageError
from privml.fl.aggregate import clip_rows
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome, Received, SiteUpdates

if TYPE_CHECKING:
    from privml.he import SecureAggregator

__all__ = [
    "KeyHolder",
    "KeyHolderService",
    "SealUpdates",
    "SecureSetup",
    "SecureServer",
    "SecureSite",
    "SecureSum",
    "clip_bound",
    "clip_update",
]

_MIN_SITES = 2


def clip_bound(training: Any) -> float:
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
    clipped, _, over = clip_rows(np.asarray(update, dtype=np.float64).reshape(1, -1), bound)
    return np.clip(clipped[0], -bound, bound), bool(over[0])


@dataclass(frozen=True)
class SecureSetup:
    """The public parameters every party builds its aggregator from.

    ``value_bound`` is the bound on every encrypted coordinate: the clip, plus the noise share's
    tail bound under client-level DP. ``counts`` are the sites' training-record counts (public
    in this protocol: the server sees who contributed and their counts).
    """

    scheme: str
    site_names: tuple[str, ...]
    counts: tuple[int, ...]
    n_params: int
    clip: float
    value_bound: float
    precision_bits: int
    key_bits: int | None
    key_holder: str

    @classmethod
    def from_training(
        cls, training: Any, site_names: Sequence[str], counts: Sequence[int], *, n_params: int,
        value_bound: float | None = None, clip: float | None = None,
    ) -> SecureSetup:  # fmt: skip
        """Raises ConfigError: unknown key holder, fewer than 2 sites, or no clip bound."""
        scheme = training.secure_aggregation
        if scheme not in ("paillier", "ckks"):
            raise UsageError(f"secure_aggregation is {scheme!r}; nothing to set up")
        names = tuple(site_names)
        if len(names) < _MIN_SITES:
            raise ConfigError(
                f"secure aggregation needs at least {_MIN_SITES} sites (the key holder never "
                f"decrypts one site's update alone); this federation has {len(names)}"
            )
        holder = training.key_holder if training.key_holder is not None else names[0]
        if holder not in names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ConfigError(f"training.key_holder: no site named {holder!r} (sites: {shown})")
        bound = clip if clip is not None else clip_bound(training)
        return cls(
            scheme, names, tuple(int(c) for c in counts), int(n_params), bound,
            value_bound if value_bound is not None else bound,
            training.secure_aggregation_precision_bits,
            training.secure_aggregation_key_bits if scheme == "paillier" else None, holder,
        )  # fmt: skip

    @property
    def n_max(self) -> float:
        return float(max(self.counts))

    def aggregator(self, *, quiet: bool = False) -> SecureAggregator:
        """This party's aggregator (``quiet``: the key-size warning was given already)."""
        from privml.he import SecureAggregator

        kw = {
            "n_sites": len(self.site_names), "n_params": self.n_params,
            "value_bound": self.value_bound, "precision_bits": self.precision_bits,
            "min_sites": min(_MIN_SITES, len(self.site_names)),
        }  # fmt: skip
        if self.key_bits is not None:
            kw["key_bits"] = self.key_bits
        try:
            with warnings.catch_warnings():
                if quiet:
                    warnings.simplefilter("ignore")
                return SecureAggregator(self.scheme, **kw)  # type: ignore[arg-type]
        except (UsageError, CryptoError) as exc:
            raise ConfigError(f"training.secure_aggregation: {exc}") from None


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

    def encrypt(
        self, update: NDArray[np.float64], *, weight: float,
        noise: NDArray[np.float64] | None = None,
    ) -> tuple[bytes, bool]:  # fmt: skip
        """Clip ``update`` to ``clip``, multiply by ``weight`` (in [0, 1]), add ``noise`` (a
        noise share, already bounded) and encrypt it.

        Returns the ciphertext bytes and whether the update was clipped.
        """
        if not 0 <= weight <= 1:
            raise UsageError(f"The 'weight' parameter must be in [0, 1]. Got {weight!r} instead.")
        u, clipped = clip_update(update, self.clip)
        u = u * weight
        if noise is not None:
            u = u + noise
        return self._agg.encrypt_update(self.public, u), clipped


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


class KeyHolderService:
    """What the key-holder site answers: ``keygen`` (once) and ``decrypt`` (each round).

    Any other site answers neither: it holds no key.
    """

    def __init__(self, setup: SecureSetup, site: str) -> None:
        self.setup = setup
        self.site = site
        self._holder: KeyHolder | None = None

    def keygen(self) -> bytes:
        if self.site != self.setup.key_holder:
            raise UsageError(
                f"site {self.site!r} is not the key holder ({self.setup.key_holder!r})"
            )
        if self._holder is None:
            self._holder = KeyHolder(self.site, self.setup.aggregator())
        return self._holder.public

    @property
    def keygen_seconds(self) -> float | None:
        return None if self._holder is None else self._holder.keygen_seconds

    def decrypt(self, aggregate: bytes, n_contributions: int) -> NDArray[np.float64]:
        if self._holder is None:
            raise UsageError(f"site {self.site!r} holds no aggregation key")
        return self._holder.decrypt_sum(aggregate, n_contributions=n_contributions)


#: ``(site_rows [S, P], batch) -> noise [S, P]``: a noise share added before encryption.
NoiseSource = Callable[[SiteUpdates], NDArray[np.float64]]


@dataclass
class SealUpdates:
    """Step ``seal`` at the sites: clip, weight by ``n_i / n_max``, add the noise share (if
    any) and encrypt. A site whose update is not finite sends nothing (None)."""

    setup: SecureSetup
    public: bytes
    weighted: bool = True
    noise: NoiseSource | None = None
    n_clipped: int = 0
    encrypt_seconds: list[tuple[int, int, float]] = field(default_factory=list)
    name = "seal"
    step = "seal"

    def __post_init__(self) -> None:
        self._site = SecureSite(
            self.setup.aggregator(quiet=True), self.public, clip=self.setup.clip
        )

    def apply(self, batch: SiteUpdates) -> None:
        t0 = time.perf_counter()
        finite: NDArray[np.bool_] = np.zeros(len(batch.ids), dtype=bool)
        if len(batch.ids):
            finite = np.asarray(np.isfinite(batch.updates).all(axis=1))
        weights = batch.weights / self.setup.n_max if self.weighted else np.ones(len(batch.ids))
        noise = self.noise(batch) if self.noise is not None and len(batch.ids) else None
        sealed: list[bytes | None] = []
        for r in range(len(batch.ids)):
            if not finite[r]:
                sealed.append(None)
                continue
            share = None if noise is None else noise[r]
            blob, clipped = self._site.encrypt(batch.updates[r], weight=float(weights[r]),
                                               noise=share)  # fmt: skip
            sealed.append(blob)
            self.n_clipped += int(clipped)
        batch.sealed = sealed  # type: ignore[assignment]
        batch.updates = np.zeros((len(batch.ids), 0))  # the plain update never leaves the site
        n = sum(b is not None for b in sealed)
        if n:
            self.encrypt_seconds.append((batch.rnd, n, time.perf_counter() - t0))


#: ``(aggregate, n_contributions) -> sum``: the key holder's decryption, reached through the
#: engine (a function call in simulation, a message on Flower).
Decrypt = Callable[[bytes, int], NDArray[np.float64]]


@dataclass
class _RoundCost:
    round: int
    sites: int
    aggregate_seconds: float
    decrypt_seconds: float


@dataclass
class SecureSum:
    """Step ``combine`` on the server: sum the ciphertexts, have the key holder decrypt the
    sum (of at least 2 updates), divide by the total weight of the contributors.

    A round with no sealed update, or with fewer than 2 (the key holder would be decrypting
    one site's update), is skipped: the model does not change. A site that sent nothing
    (its update was not finite) counts as rejected, ``non_finite``.

    ``weighted``: FedAvg's weights ``n_i / n_max`` (the sites applied them); else each update
    counts 1 and ``denominator`` (if given) replaces the total weight (client-level DP's fixed
    denominator). ``require_all``: every site asked must have sent its update (each carries a
    share of the noise; with a share missing the sum would carry less noise than accounted,
    so the round is skipped, ``missing_noise_shares``, and nothing is decrypted).
    """

    setup: SecureSetup
    public: bytes
    decrypt: Decrypt
    weighted: bool = True
    denominator: float | None = None
    require_all: bool = False
    costs: list[_RoundCost] = field(default_factory=list)
    ciphertext_bytes: int | None = None
    step = "combine"

    def __post_init__(self) -> None:
        self._server = SecureServer(self.setup.aggregator(quiet=True), self.public)

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        sealed = list(received.sealed or [])
        accepted = [i for i, b in enumerate(sealed) if isinstance(b, bytes)]
        rejected = [(i, "non_finite") for i, b in enumerate(sealed) if not isinstance(b, bytes)]
        if not sealed:
            return Outcome.skip("no_updates", accepted, rejected)
        if not accepted:
            return Outcome.skip("all_rejected", accepted, rejected)
        if len(accepted) < _MIN_SITES:
            return Outcome.skip("too_few_updates", accepted, rejected)
        if self.require_all and len(accepted) < received.asked:
            return Outcome.skip("missing_noise_shares", accepted, rejected)
        ids = np.asarray(received.ids)[accepted]
        counts = np.asarray(self.setup.counts, dtype=np.float64)
        total = float((counts[ids] / self.setup.n_max).sum()) if self.weighted else float(len(ids))
        if self.denominator is not None:
            total = float(self.denominator)
        if not total > 0:
            return Outcome.skip("zero_weight", accepted, rejected)
        blobs = [sealed[i] for i in accepted]
        t0 = time.perf_counter()
        agg_blob = self._server.sum_ciphertexts(blobs)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        summed = self.decrypt(agg_blob, len(blobs))
        t2 = time.perf_counter()
        self.ciphertext_bytes = len(blobs[0])  # type: ignore[arg-type]
        self.costs.append(_RoundCost(rnd, len(blobs), t1 - t0, t2 - t1))
        update = np.asarray(summed, dtype=np.float64) / total
        info = {"clip": self.setup.clip, "total_weight": total}
        return Outcome(update, accepted, rejected, info=info)

    def describe(self, seal: SealUpdates | None, keygen_seconds: float | None) -> dict[str, Any]:
        """results.json ``federation.secure_aggregation``."""
        setup = self.setup
        agg = self._server._agg
        if setup.scheme == "paillier":
            params: dict[str, Any] = {"key_bits": setup.key_bits, "slot_bits": agg.slot_bits,
                                      "values_per_ciphertext": agg.codec.slots}  # fmt: skip
        else:
            params = {
                "poly_modulus_degree": agg.profile.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(agg.profile.coeff_bits),
                "values_per_ciphertext": agg.profile.poly_modulus_degree,
                "flooding_noise_std": setup.value_bound * 2.0**-setup.precision_bits,
            }
        enc = [] if seal is None else seal.encrypt_seconds
        per_site = [s / max(1, n) for _, n, s in enc]
        med = statistics.median
        return {
            "scheme": setup.scheme,
            "parameters": params,
            "precision_bits": setup.precision_bits,
            "clip": setup.clip,
            "value_bound": setup.value_bound,
            "clipping": "each site clips its update to L2 norm <= clip before encrypting "
            "(this also bounds every coordinate by clip); the server cannot check norms",
            "weights": "training-record counts n_i / max n (public); the server divides the "
            "decrypted sum by their total" if self.weighted else
            "none: every update counts 1 (client-level DP's fixed denominator)",
            "key_holder": setup.key_holder,
            "public_material_bytes": len(self.public),
            "keygen_seconds": keygen_seconds,
            "ciphertext_bytes_per_site": self.ciphertext_bytes,
            "updates_clipped": None if seal is None else seal.n_clipped,
            "server_checks": "envelope and kind, key id, packing layout and length, "
            "contribution counts, duplicates (privml.he); no plaintext validation",
            "median_encrypt_seconds_per_site": med(per_site) if per_site else None,
            "median_aggregate_seconds": med([c.aggregate_seconds for c in self.costs])
            if self.costs else None,
            "median_decrypt_seconds": med([c.decrypt_seconds for c in self.costs])
            if self.costs else None,
            "per_round": [c.__dict__ for c in self.costs],
        }  # fmt: skip
