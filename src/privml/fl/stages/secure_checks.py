"""Robust checks under CKKS encryption (``secure_aggregation = "ckks"`` with
``secure_aggregation_checks = "norm"``): norm bounding that runs without anyone seeing an
update.

Three parties, as in :mod:`privml.fl.stages.secure` (TenSEAL's CKKS, N = 8192, coefficient
moduli [60, 40, 40, 60], scale 2**40: two multiplicative levels):

* :class:`CheckKeyHolder` -- one site (``key_holder``). It makes the CKKS context, keeps the
  secret key, hands out the public context (public, relinearization and Galois keys, no
  secret) and answers two requests: :meth:`~CheckKeyHolder.decrypt_scalars` (one size-1
  ciphertext per site per round: the squared norms) and :meth:`~CheckKeyHolder.decrypt_sum`
  (the bounded sum of at least 2 updates). Every decryption is flooded with fresh Gaussian
  noise (std ``2**-precision_bits`` times the value scale) so that what it returns does not
  expose the ciphertext noise (Li & Micciancio 2021).
* every site (:class:`CheckedSeal`, step ``seal``) encrypts its update as it is (it may or
  may not have clipped it: the server does not rely on it), in slices of 4,096 values.
* the server (:class:`EncryptedNormBound`, step ``combine``) computes each update's squared
  L2 norm on its ciphertexts (``dot`` with itself: one ciphertext multiplication,
  relinearization and rotations), sends the size-1 results to the key holder, which returns
  the scalars; it then scales each encrypted update by ``w_i min(1, max_norm / ||u_i||)``
  (a plaintext factor), sums the ciphertexts and has the key holder decrypt the sum, which it
  divides by the total weight. The result is ``aggregator = "norm_bound"`` with a fixed
  ``max_norm``, computed on ciphertexts up to CKKS's error and the flooding noise.

What each party learns: the key holder, one scalar per site per round and the bounded sum;
the server, the same scalars (each update's norm) and the sum; nobody, an update. What is left
to an adversary is in docs/threat-model.md (a server that sends the key holder something
other than a norm learns one scalar of its choosing per site per round).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import CryptoError, UsageError
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome, Received, SiteUpdates

__all__ = ["CheckKeyHolder", "CheckedSeal", "EncryptedNormBound", "checked_stages"]

_N = 8192
_COEFF = (60, 40, 40, 60)
_SCALE_BITS = 40
_SLICE = _N // 2
_MIN_SITES = 2


def _slices(vec: NDArray[np.float64]) -> list[list[float]]:
    return [vec[i : i + _SLICE].tolist() for i in range(0, max(len(vec), 1), _SLICE)]


class CheckKeyHolder:
    """The key-holder site: the CKKS context with its secret key, which never leaves it."""

    def __init__(self, n_params: int, *, value_scale: float, precision_bits: int = 24,
                 scalars_per_site: int = 1) -> None:  # fmt: skip
        import tenseal as ts

        t0 = time.perf_counter()
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=_N,
                         coeff_mod_bit_sizes=list(_COEFF))  # fmt: skip
        ctx.global_scale = 2.0**_SCALE_BITS
        ctx.generate_galois_keys()
        self._ctx = ctx
        self.public: bytes = ctx.serialize(save_public_key=True, save_secret_key=False,
                                           save_galois_keys=True, save_relin_keys=True)  # fmt: skip
        self.keygen_seconds = time.perf_counter() - t0
        self.n_params = int(n_params)
        self.flood_std = float(value_scale) * 2.0**-precision_bits
        self.scalars_per_site = int(scalars_per_site)
        self._answered: set[tuple[int, int]] = set()

    def _flood(self, n: int) -> NDArray[np.float64]:
        gen = np.random.default_rng(int.from_bytes(os.urandom(32), "big"))
        return gen.normal(0.0, self.flood_std, size=n)

    def decrypt_scalars(self, rnd: int, blobs: dict[int, list[bytes]]) -> dict[int, list[float]]:
        """Per site, its squared norm (and, with the cosine check, its inner product with the
        reference direction): at most ``scalars_per_site`` size-1 ciphertexts per site per
        round, each decrypted and flooded. A second request for the same site in the same
        round, more scalars, or a ciphertext of another size, is refused."""
        import tenseal as ts

        out: dict[int, list[float]] = {}
        for site, items in blobs.items():
            key = (int(rnd), int(site))
            if key in self._answered:
                raise CryptoError(f"site {site}'s checks were already decrypted in round {rnd}")
            if not 1 <= len(items) <= self.scalars_per_site:
                raise CryptoError(
                    f"refusing {len(items)} scalars for site {site}: at most "
                    f"{self.scalars_per_site} per site per round"
                )
            vals = []
            for blob in items:
                v = ts.ckks_vector_from(self._ctx, blob)
                if v.size() != 1:
                    raise CryptoError(
                        f"refusing to decrypt {v.size()} values as one of a site's check scalars"
                    )
                vals.append(float(v.decrypt()[0] + self._flood(1)[0]))
            self._answered.add(key)
            out[int(site)] = vals
        return out

    def decrypt_sum(self, blobs: Sequence[bytes], n_contributions: int) -> NDArray[np.float64]:
        """The (bounded, weighted) sum of at least 2 updates, flooded."""
        import tenseal as ts

        if n_contributions < _MIN_SITES:
            raise CryptoError(
                f"refusing to decrypt a sum of {n_contributions} update(s): at least "
                f"{_MIN_SITES} are required so no single update is revealed"
            )
        vals = np.concatenate([ts.ckks_vector_from(self._ctx, b).decrypt() for b in blobs])
        if len(vals) < self.n_params:
            raise CryptoError(f"the sum has {len(vals)} values, expected {self.n_params}")
        vals = vals[: self.n_params]
        return np.asarray(vals, dtype=np.float64) + self._flood(self.n_params)


@dataclass
class CheckedSeal:
    """Step ``seal``: each site encrypts its update under the public context (non-finite
    updates are not sent). An honest site has nothing to clip: the server bounds norms."""

    public: bytes
    encrypt_seconds: list[tuple[int, int, float]] = field(default_factory=list)
    name = "seal"
    step = "seal"

    def __post_init__(self) -> None:
        import tenseal as ts

        self._ctx = ts.context_from(self.public)

    def apply(self, batch: SiteUpdates) -> None:
        import tenseal as ts

        t0 = time.perf_counter()
        sealed: list[list[bytes] | None] = []
        for r in range(len(batch.ids)):
            u = np.asarray(batch.updates[r], dtype=np.float64)
            if not np.isfinite(u).all():
                sealed.append(None)
                continue
            sealed.append([ts.ckks_vector(self._ctx, s).serialize() for s in _slices(u)])
        batch.sealed = sealed  # type: ignore[assignment]
        batch.updates = np.zeros((len(batch.ids), 0))  # the plain update never leaves the site
        n = sum(b is not None for b in sealed)
        if n:
            self.encrypt_seconds.append((batch.rnd, n, time.perf_counter() - t0))


@dataclass
class _Cost:
    round: int
    sites: int
    norm_seconds: float
    sum_seconds: float
    decrypt_seconds: float
    n_bounded: int
    median_norm: float


@dataclass
class EncryptedNormBound:
    """Step ``combine``: norm bounding on ciphertexts (see the module docstring).

    ``decrypt_scalars`` and ``decrypt_sum`` reach the key holder (function calls in
    simulation). ``counts``: the sites' training-record counts (public), the weights.
    """

    public: bytes
    max_norm: float
    counts: Sequence[int]
    n_params: int
    decrypt_scalars: Callable[[int, dict[int, list[bytes]]], dict[int, list[float]]]
    decrypt_sum: Callable[[Sequence[bytes], int], NDArray[np.float64]]
    weighted: bool = True
    cosine: bool = False
    """Also weight each update by its trust ``max(0, cos(u_i, reference))``, the reference
    being the previous round's aggregate (public: the server applied it), FLTrust's rule with
    the last global step in place of a root dataset; round 1 has no reference."""
    reference: NDArray[np.float64] | None = None
    costs: list[_Cost] = field(default_factory=list)
    norms: list[dict[int, float]] = field(default_factory=list)
    trust: list[dict[int, float]] = field(default_factory=list)
    step = "combine"

    def __post_init__(self) -> None:
        import tenseal as ts

        self._ctx = ts.context_from(self.public)
        self._n_slices = len(_slices(np.zeros(self.n_params)))

    def _load(self, blobs: Any) -> list[Any] | None:
        import tenseal as ts

        if not isinstance(blobs, list) or len(blobs) != self._n_slices:
            return None
        try:
            vecs = [ts.ckks_vector_from(self._ctx, b) for b in blobs]
        except Exception:  # noqa: BLE001 - any malformed ciphertext is a rejected update
            return None
        sizes = [v.size() for v in vecs]
        want = [len(s) for s in _slices(np.zeros(self.n_params))]
        return vecs if sizes == want else None

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        sealed = list(received.sealed or [])
        if not sealed:
            return Outcome.skip("no_updates", [], [])
        vecs: dict[int, list[Any]] = {}
        rejected: list[tuple[int, str]] = []
        for p, blobs in enumerate(sealed):
            if blobs is None:
                rejected.append((p, "non_finite"))
                continue
            v = self._load(blobs)
            if v is None:
                rejected.append((p, "shape"))
            else:
                vecs[p] = v
        accepted = sorted(vecs)
        if len(accepted) < _MIN_SITES:
            return Outcome.skip("too_few_updates", accepted, rejected)
        ids = np.asarray(received.ids)
        t0 = time.perf_counter()
        ref = self.reference if self.cosine else None
        ref_norm = float(np.linalg.norm(ref)) if ref is not None else 0.0
        ref_slices = _slices(ref) if ref is not None and ref_norm > 0 else None
        sq: dict[int, list[bytes]] = {}
        for p, v in vecs.items():
            acc = v[0].dot(v[0])
            for part in v[1:]:
                acc = acc + part.dot(part)
            sq[int(ids[p])] = [acc.serialize()]
            if ref_slices is not None:
                d = v[0].dot(ref_slices[0])
                for part, r in zip(v[1:], ref_slices[1:], strict=True):
                    d = d + part.dot(r)
                sq[int(ids[p])].append(d.serialize())
        t1 = time.perf_counter()
        got = self.decrypt_scalars(rnd, sq)
        norms = {i: math.sqrt(max(0.0, x[0])) for i, x in got.items()}
        trust = {i: 1.0 for i in got}
        if ref_slices is not None:
            trust = {i: max(0.0, x[1] / (norms[i] * ref_norm)) if norms[i] > 0 else 0.0
                     for i, x in got.items()}  # fmt: skip
            self.trust.append(trust)
        self.norms.append(norms)
        if not any(trust[int(ids[p])] > 0 for p in accepted):
            return Outcome.skip("no_trusted_updates", accepted, rejected)
        counts = np.asarray(self.counts, dtype=np.float64)
        n_max = float(counts.max())
        total_w, n_bounded = 0.0, 0
        summed: list[Any] | None = None
        t2 = time.perf_counter()
        for p in accepted:
            i = int(ids[p])
            w = counts[i] / n_max if self.weighted else 1.0
            scale = min(1.0, self.max_norm / norms[i]) if norms[i] > 0 else 1.0
            n_bounded += int(scale < 1.0)
            w = w * trust[i]
            scaled = [part * float(w * scale) for part in vecs[p]]
            summed = (
                scaled if summed is None else [a + b for a, b in zip(summed, scaled, strict=True)]
            )
            total_w += w
        assert summed is not None
        t3 = time.perf_counter()
        total = self.decrypt_sum([s.serialize() for s in summed], len(accepted))
        t4 = time.perf_counter()
        self.costs.append(_Cost(rnd, len(accepted), t1 - t0, t3 - t2, t4 - t3, n_bounded,
                                float(np.median(list(norms.values())))))  # fmt: skip
        info = {"max_norm": self.max_norm, "n_clipped": n_bounded, "total_weight": total_w,
                "encrypted_norms": True}  # fmt: skip
        update = total / total_w
        if self.cosine:
            self.reference = update
        return Outcome(update, accepted, rejected, info=info)

    def describe(self, seal: CheckedSeal | None, keygen_seconds: float | None) -> dict[str, Any]:
        """results.json ``federation.secure_aggregation``."""
        med = statistics.median
        enc = [] if seal is None else [s / max(1, n) for _, n, s in seal.encrypt_seconds]
        return {
            "scheme": "ckks",
            "checks": "norm+cosine" if self.cosine else "norm",
            "cosine_reference": "the previous round's aggregate (trust max(0, cos))"
            if self.cosine else None,
            "trusted_fraction_per_round": [float(np.mean([t > 0 for t in r.values()]))
                                           for r in self.trust],
            "library": "TenSEAL",
            "parameters": {"poly_modulus_degree": _N, "coeff_mod_bit_sizes": list(_COEFF),
                           "scale_bits": _SCALE_BITS, "values_per_ciphertext": _SLICE},
            "max_norm": self.max_norm,
            "clipping": "none at the sites: the server computes each update's squared norm on "
            "its ciphertexts, the key holder decrypts only those scalars, and each encrypted "
            "update is scaled by min(1, max_norm / norm) before the encrypted sum",
            "weights": "training-record counts n_i / max n (public)" if self.weighted else
            "none",
            "key_holder_decrypts": "one squared norm per site per round and the bounded sum of "
            "at least 2 updates, each flooded with fresh Gaussian noise",
            "public_material_bytes": len(self.public),
            "keygen_seconds": keygen_seconds,
            "updates_bounded": sum(c.n_bounded for c in self.costs),
            "median_encrypt_seconds_per_site": med(enc) if enc else None,
            "median_norm_seconds": med([c.norm_seconds for c in self.costs])
            if self.costs else None,
            "median_decrypt_seconds": med([c.decrypt_seconds for c in self.costs])
            if self.costs else None,
            "per_round": [c.__dict__ for c in self.costs],
        }  # fmt: skip


def checked_stages(
    training: Any, counts: Sequence[int], n_params: int
) -> tuple[CheckedSeal, EncryptedNormBound, Callable[[], dict[str, Any]]]:
    """The key holder's keys (made before round 1), the sites' seal and the server's combine
    of a run with encrypted norm bounding."""
    max_norm = training.aggregator_params.get("max_norm")
    if training.aggregator != "norm_bound" or max_norm is None:
        raise UsageError("encrypted norm bounding needs aggregator = norm_bound with max_norm")
    cosine = training.secure_aggregation_checks == "norm+cosine"
    holder = CheckKeyHolder(n_params, value_scale=float(max_norm),
                            precision_bits=training.secure_aggregation_precision_bits,
                            scalars_per_site=2 if cosine else 1)  # fmt: skip
    seal = CheckedSeal(holder.public)
    combine = EncryptedNormBound(holder.public, float(max_norm), list(counts), n_params,
                                 holder.decrypt_scalars, holder.decrypt_sum,
                                 cosine=cosine)  # fmt: skip
    return seal, combine, lambda: combine.describe(seal, holder.keygen_seconds)
