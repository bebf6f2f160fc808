"""SecAgg+: secure aggregation by pairwise masking, without a key holder.

The protocol of Bonawitz et al. (CCS 2017) on the sparse neighbour graph of SecAgg+ (Bell et
al., CCS 2020), step for step the protocol of Flower's ``SecAggPlusWorkflow`` and
``secaggplus_mod`` (``flwr.server.workflow.secure_aggregation``, ``flwr.client.mod``), with the
same quantization and the same modular arithmetic. Each site hides its quantized update under
a random *self mask* and one *pairwise mask* per neighbour; the pairwise masks cancel in the
sum, the server removes the self masks of the sites whose vectors it summed (their seeds
rebuilt from Shamir shares held by their neighbours) and the pairwise masks of the sites that
vanished after masking (their mask keys rebuilt the same way). The server learns the sum, and
nothing else, as long as fewer than ``threshold`` neighbours of a site collude with it.

A round, between one :class:`ServerSession` and one :class:`SiteSession` per site::

    1. setup         site  -> server   two X25519 public keys (mask key, share key) and a
                                       SHA-256 commitment to its self-mask seed
    2. share keys    server -> site    its neighbours' public keys
                     site  -> server   per neighbour: its Shamir shares of the site's self-mask
                                       seed and mask-key seed, AES-256-GCM encrypted under a
                                       key the two sites agree on (X25519 + HKDF-SHA256)
    3. masked vector server -> site    the ciphertexts addressed to it (+ the training request)
                     site  -> server   [weight, update] quantized, + self mask,
                                       +/- one pairwise mask per neighbour, mod ``modulus``
    4. unmask        server -> site    which of its neighbours sent a vector, which did not
                     site  -> server   its share of each sender's self-mask seed and of each
                                       non-sender's mask-key seed (never both for one site)

In every round a consistency check precedes step 4, as in Bonawitz et al.'s actively secure
protocol: the server sends every sender the list of senders, each checks it and signs it with
its Ed25519 identity key (:meth:`SiteSession.confirm`), and a site answers step 4 only for the
list it signed, signed by every site on it and at least :meth:`SecAggParams.senders_needed`
long: more than half of the round's ``n`` sites plus the ``c`` that may collude with the
server (``[training] secagg_colluding_sites``, default ``threshold - 1``), and at least
``min_senders`` (distributed DP: every released sum must carry that many noise shares). Two
lists that both pass would need ``2 (m - c) > n - c`` honest signers, each signing once: there
is one list per round, and every honest neighbour of a site says the same of it (sent, or
dropped). A server that lies about a site's dropout, even with ``c`` colluding neighbours of
that site, gets shares of one of its two secrets only.

Building blocks, all vetted: X25519, HKDF-SHA256, AES-256-GCM and AES-256-CTR from
``cryptography`` (OpenSSL); Shamir secret sharing from SLIP-0039's reference implementation
(``shamir-mnemonic``, GF(256)) for up to 16 shares, else from PyCryptodome (GF(2^128), the
implementation Flower uses). Nothing cryptographic is written here; this module is the
protocol around them. Where privml departs from Flower, deliberately:

* **The mask generator** is AES-256-CTR under an HKDF-derived 256-bit key (a vetted stream
  cipher as a PRG). Flower expands masks with ``numpy.random.RandomState`` seeded by a 32-bit
  XOR-fold of the key: 2**32 seeds and a non-cryptographic generator.
* **Secret sizes.** The two secrets a site shares are 16-byte seeds (128-bit security, one
  Shamir chunk each); the X25519 mask key is derived from its seed with HKDF. Two is the
  fewest the protocol allows: the server rebuilds exactly one of them per site, and either
  one alone must not open the site's vector.
* **The Shamir implementation.** With up to 16 shares (the default share count up to 128
  sites), SLIP-0039's sharing: byte-wise over GF(256), with a digest share
  (HMAC-SHA256 of the secret, 4 bytes) that makes a wrong share fail the rebuild. Rebuilding
  a seed costs about 0.2 ms against 7 ms with PyCryptodome's pure-Python GF(2^128). The
  digest lets ``t - 1`` shares test a guess of the seed, which leaves a guesser 2**128
  candidates to try, as a guess checked against the site's public mask key or commitment
  already does.
* **The threshold must exceed half the share count**, and a site answers the unmask request
  once per round and refuses one that names a neighbour both as sender and as non-sender. A
  server that lies about who dropped out (telling some neighbours that site ``i`` sent its
  vector and others that it did not) would need ``threshold`` shares of both of ``i``'s
  secrets from disjoint sets of neighbours, more than ``share_count`` exist. This alone
  falls to one colluding neighbour (it hands over both its shares); the consistency check
  above is what stops the lie with up to ``c`` colluders. Flower's SecAgg+ has neither.
* **The consistency check in every round**, not only under distributed DP (Flower's
  workflow has none): one more exchange, one Ed25519 signature per sender and one
  verification per signature (sites simulated in one process share the verified ones).
* **Stochastic rounding** draws from a generator privml controls (the run's seed, or the
  secure noise source under distributed DP), not NumPy's global state.

What the server can still do (with up to ``c`` sites colluding): choose the neighbour graph
and the survivors, drop honest sites at will, and learn the sum of any set of at least
:meth:`SecAggParams.senders_needed` sites' updates of its choosing by declaring the others
dropped (it can release one list per round, not two). A site can send
any value in ``[0, modulus)`` for any coordinate: masking hides updates, it does not check
them (see :class:`~privml.fl.stages.masking.MaskedSum` for the one check on the sum). See
docs/threat-model.md.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.errors import UsageError

__all__ = [
    "RoundAborted",
    "SecAggParams",
    "ServerSession",
    "SiteSession",
    "check_settings",
    "cohort_problems",
    "default_share_count",
    "dequantize_sum",
    "failure_bounds",
    "identity_keys",
    "quantize_rows",
    "sound_share_count",
]

_SEED_BYTES = 16
_KEY_BYTES = 32
_SHARE_BYTES = 4 + 16  # index (little endian) + one GF(2^128) element
_INFO = b"privml secagg+/1 "


class RoundAborted(Exception):
    """The protocol cannot finish this round without breaking its guarantee; the round is
    skipped. ``reason`` is the round record's ``skipped`` code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def default_share_count(n: int) -> int:
    """``min(n, 2 * ceil(log2 n) + 1)``: SecAgg+'s logarithmic neighbourhood, odd."""
    if n <= 3:
        return n
    return min(n, 2 * math.ceil(math.log2(n)) + 1)


def _tail(m: int, p: float, k: int) -> float:
    """``P(Binomial(m, p) >= k)``."""
    return float(sum(math.comb(m, i) * p**i * (1 - p) ** (m - i) for i in range(max(k, 0), m + 1)))


def failure_bounds(n: int, k: int, t: int, *, corrupt: float, dropout: float) -> dict[str, float]:
    """Union bounds on what can go wrong in a round of ``n`` sites with share count ``k`` and
    threshold ``t`` when each other site colludes with the server with probability
    ``corrupt`` and drops out with probability ``dropout``, independently (the graph is
    Flower's ring on a uniformly random order, so a site's ``k - 1`` neighbours are a uniform
    draw):

    * ``privacy``: some honest site's update is exposed to a semi-honest server: ``t`` of its
      neighbours collude (they hand over shares of both its seeds), or every neighbour
      colludes or drops out (then all its pairwise masks are known);
      ``n * (P[Bin(k-1, corrupt) >= t] + (corrupt + dropout)**(k-1))``. Sums of larger groups
      that a disconnected graph would expose are not counted.
    * ``skipped``: some dropped site has fewer than ``t`` live neighbours holding its shares
      (the round is skipped, never a wrong sum): ``n * P[Bin(k-1, dropout) >= k - t]``.

    Bell et al. (CCS 2020) size SecAgg+ for 2**-40 (privacy) and 2**-30 (correctness)."""
    k = min(k, n)
    privacy = n * (_tail(k - 1, corrupt, t) + (corrupt + dropout) ** (k - 1))
    skipped = n * _tail(k - 1, dropout, k - t)
    return {"privacy": min(1.0, privacy), "skipped": min(1.0, skipped)}


def sound_share_count(n: int, *, corrupt: float, dropout: float, privacy: float = 2.0**-40,
                      skipped: float = 2.0**-30) -> int | None:  # fmt: skip
    """The smallest odd share count ``k`` (threshold ``k // 2 + 1``) whose
    :func:`failure_bounds` stay below ``privacy`` and ``skipped`` in a round of ``n`` sites;
    None when even every site as every site's neighbour does not."""
    for k in range(3, n + 2, 2):
        kk = min(k, n)
        b = failure_bounds(n, kk, kk // 2 + 1, corrupt=corrupt, dropout=dropout)
        if b["privacy"] <= privacy and b["skipped"] <= skipped:
            return kk
    return None


def check_settings(training: Any) -> list[str]:
    """Problems of the ``secagg_*`` settings of ``[training]`` alone (every one, each naming
    its field); the cohort-dependent checks are :func:`cohort_problems`."""
    out: list[str] = []
    k, t = training.secagg_share_count, training.secagg_threshold
    if k is not None and k % 2 == 0:
        out.append(
            f"training.secagg_share_count must be odd (a site and as many neighbours on each "
            f"side of it); got {k}. Use {k + 1}."
        )
    if k is not None and t is not None and not k / 2 < t <= k:
        out.append(
            f"training.secagg_threshold must be > secagg_share_count / 2 and <= "
            f"secagg_share_count (got {t} of {k}): with at most half, a server that lies about "
            f"who dropped out can collect both secrets of one site. Use {k // 2 + 1}."
        )
    m, q = training.secagg_modulus, training.secagg_quantization_range
    if not (isinstance(m, int) and m >= 2**8 and m <= 2**62 and m & (m - 1) == 0):
        out.append(
            f"training.secagg_modulus must be a power of two in [2**8, 2**62] (masks are "
            f"uniform residues); got {m!r}. The default is 2**32."
        )
    elif q >= m:
        out.append(
            f"training.secagg_quantization_range ({q}) must be below secagg_modulus ({m}); "
            "lower the range or raise the modulus"
        )
    return out


def cohort_problems(training: Any, cohort: int) -> list[str]:
    """Problems that depend on how many sites take part in a round (``cohort``)."""
    out: list[str] = []
    q, m = training.secagg_quantization_range, training.secagg_modulus
    if cohort * q >= m:
        out.append(
            f"training: SecAgg+ sums {cohort} quantized values of up to "
            f"secagg_quantization_range = {q} per coordinate, which wraps around secagg_modulus "
            f"= {m} (needs cohort * range < modulus); raise secagg_modulus to "
            f"2**{math.ceil(math.log2(cohort * q + 1))} or lower the range"
        )
    t = training.secagg_threshold
    k = training.secagg_share_count
    k_eff = cohort if k is None or k >= cohort else k
    if t is not None and t > k_eff:
        out.append(
            f"training.secagg_threshold = {t} exceeds the {k_eff} shares a site can make "
            f"in a round of {cohort} sites; lower it to at most {k_eff}"
        )
        return out
    if cohort < 2:
        return out
    k_r, t_r = SecAggParams(k, t, 1.0, 2, 4, 1.0, 0).for_cohort(cohort)
    c = training.secagg_colluding_sites
    c_eff = t_r - 1 if c is None else int(c)
    m = training.secagg_min_senders
    if c is not None and c >= t_r:
        out.append(
            f"training.secagg_colluding_sites = {c} reaches the threshold {t_r} of a round of "
            f"{cohort} sites: colluders alone would rebuild a neighbour's secrets; declare at "
            f"most {t_r - 1} or raise secagg_threshold"
        )
    elif m is not None and 2 * m <= cohort + c_eff:
        out.append(
            f"training.secagg_min_senders = {m} is at most half of the round's {cohort} sites "
            f"plus the {c_eff} colluding ones: a lying server could get two disjoint lists of "
            f"senders unmasked and read a site's update; use at least "
            f"{(cohort + c_eff) // 2 + 1}, or remove it"
        )
    elif m is not None and m > cohort:
        out.append(
            f"training.secagg_min_senders = {m} exceeds the {cohort} sites of a round: no round "
            "could be unmasked; lower it"
        )
    elif (cohort + c_eff) // 2 + 1 > cohort:
        out.append(
            f"training: with {c_eff} colluding sites, SecAgg+'s consistency check needs "
            f"{(cohort + c_eff) // 2 + 1} senders of a round of {cohort} sites, more than "
            "there are; declare fewer secagg_colluding_sites or sample more sites per round"
        )
    return out


@dataclass(frozen=True)
class SecAggParams:
    """The public parameters of a run's SecAgg+ rounds.

    Attributes:
        share_count: shares per secret, one per neighbour including the site itself (None:
            :func:`default_share_count` of the round's cohort).
        threshold: shares needed to rebuild a secret (None: ``share_count // 2 + 1``).
        clipping_range: every coordinate is clipped to ``[-c, c]`` before quantization.
        quantization_range: coordinates become integers in ``[0, range]``.
        modulus: masks are uniform in ``[0, modulus)``; vectors and sums are mod it.
        max_weight: a site's weight is ``n_i / max_weight`` (at most 1).
        n_params: the update length (the masked vector has one more entry: the weight).
        min_senders: the fewest senders a released sum may have, at least (distributed DP:
            the sum must carry that many noise shares; ``[training] secagg_min_senders``);
            0: only the consistency check's own minimum (:meth:`senders_needed`). Each site
            holds its own copy, from its own config, and refuses to unmask a smaller sum.
        colluding: how many sites may collude with the server (the consistency check's
            ``c``; None: ``threshold - 1``, as many as the masking itself tolerates in one
            neighbourhood).
    """

    share_count: int | None
    threshold: int | None
    clipping_range: float
    quantization_range: int
    modulus: int
    max_weight: float
    n_params: int
    min_senders: int = 0
    colluding: int | None = None

    @classmethod
    def from_training(
        cls, training: Any, *, n_params: int, clip: float, max_weight: float
    ) -> SecAggParams:
        c = training.secagg_clipping_range
        m = training.secagg_min_senders
        return cls(
            training.secagg_share_count, training.secagg_threshold,
            float(c) if c is not None else float(clip), int(training.secagg_quantization_range),
            int(training.secagg_modulus), float(max_weight), int(n_params),
            int(m) if m is not None else 0, training.secagg_colluding_sites,
        )  # fmt: skip

    def for_cohort(self, n: int) -> tuple[int, int]:
        """``(share_count, threshold)`` in a round of ``n`` sites (Flower's rule: a share
        count of at least ``n`` means every site is every site's neighbour)."""
        k = default_share_count(n) if self.share_count is None else self.share_count
        k = n if k >= n else k
        t = k // 2 + 1 if self.threshold is None else self.threshold
        return k, t

    def colluding_for(self, n: int) -> int:
        """The consistency check's ``c`` in a round of ``n`` sites."""
        return self.for_cohort(n)[1] - 1 if self.colluding is None else int(self.colluding)

    def senders_needed(self, n: int) -> int:
        """The fewest senders a round of ``n`` sites may unmask: ``min_senders``, and more than
        ``(n + c) / 2`` (``c``: :meth:`colluding_for`). Every honest sender signs one list of
        senders per round and unmasks only a list signed by every site on it, so two lists
        that both pass have disjoint honest signers, at least ``m - c`` each; with
        ``2 (m - c) > n - c`` there is room for one list only, and every honest site answers
        the unmask request for the same senders (Bonawitz et al. 2017, section 4).

        Raises:
            UsageError: ``c`` reaches the threshold (then the colluders alone rebuild both
                secrets of a neighbour, whatever the server says).
        """
        t = self.for_cohort(n)[1]
        c = self.colluding_for(n)
        if not 0 <= c < t:
            raise UsageError(
                f"SecAgg+: {c} colluding sites reach the threshold {t} of a round of {n} "
                "sites: they could rebuild a neighbour's secrets on their own; raise "
                "secagg_threshold or declare fewer secagg_colluding_sites"
            )
        return max(int(self.min_senders), (n + c) // 2 + 1)

    def to_dict(self, n: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "share_count": self.share_count, "threshold": self.threshold,
            "clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
            "modulus": self.modulus, "max_weight": self.max_weight,
            "min_senders": self.min_senders or None, "colluding_sites": self.colluding,
        }  # fmt: skip
        if n is not None:
            out["share_count"], out["threshold"] = self.for_cohort(n)
            out["colluding_sites"] = self.colluding_for(n)
            out["min_senders"] = max(int(self.min_senders), (n + out["colluding_sites"]) // 2 + 1)
        return out


# --------------------------------------------------------------------------------------------
# Quantization (Flower's arithmetic)
# --------------------------------------------------------------------------------------------


def quantize_rows(
    rows: NDArray[np.float64], weights: NDArray[np.float64], params: SecAggParams,
    uniforms: NDArray[np.float64],
) -> NDArray[np.uint64]:  # fmt: skip
    """Each row's vector ``[q_w, quantize(w * row)]`` as Flower's ``secaggplus_mod`` builds it.

    ``q_w = round(w * T)`` (``T`` the quantization range) and ``w`` is replaced by
    ``q_w / T``; each coordinate of ``w * row`` is clipped to ``[-c, c]``, shifted by ``c``,
    scaled by ``T / 2c`` and rounded up or down at random (``uniforms``, one per coordinate,
    in [0, 1)) so that its expectation is the unrounded value. Entries are in ``[0, T]``.
    """
    T, c = params.quantization_range, params.clipping_range
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or np.any(w > 1 + 1e-12):
        raise UsageError(f"SecAgg+ weights must be in [0, 1]; got {w.min()}..{w.max()}")
    qw = np.rint(w * T)
    pre = (np.clip(rows * (qw / T)[:, None], -c, c) + c) * (T / (2 * c))
    up = np.ceil(pre)
    q = up - (uniforms < (up - pre))
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint64)
    out[:, 0] = qw.astype(np.uint64)
    out[:, 1:] = np.clip(q, 0, T).astype(np.uint64)
    return out


def dequantize_sum(
    total: NDArray[np.uint64], n: int, params: SecAggParams, *, centered: bool = False
) -> tuple[NDArray[np.float64], float]:
    """The weighted sum ``sum_i w_i x_i`` and the total weight ``sum_i w_i`` from the unmasked
    sum of ``n`` vectors (Flower's ``dequantize`` and offset ``-(n - 1) c``).

    ``centered``: the sum carries integer noise (distributed DP), so a coordinate may lie
    below 0 or above ``n T``; each residue is read as the integer nearest the middle of the
    noiseless range, ``n T / 2``, within half the modulus (exact unless the noise exceeds
    ``(modulus - n T) / 2``, which the modulus is chosen to make negligible)."""
    T, c = params.quantization_range, params.clipping_range
    total_w = float(total[0]) / T
    if centered:
        m, mid = params.modulus, (n * T) // 2
        r = total[1:].astype(np.int64)
        ints = (r - mid + m // 2) % m - m // 2 + mid
        values = ints.astype(np.float64) * (2 * c / T) - n * c
    else:
        values = total[1:].astype(np.float64) * (2 * c / T) - n * c
    return values, total_w


# --------------------------------------------------------------------------------------------
# Building blocks (thin wrappers around vetted primitives)
# --------------------------------------------------------------------------------------------


def _hkdf(secret: bytes, info: bytes, length: int = _KEY_BYTES) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=_INFO + info).derive(
        secret
    )


def _ids(*xs: int) -> bytes:
    return struct.pack(f"<{len(xs)}Q", *xs)


def _mask_private_key(seed: bytes) -> Any:
    """The X25519 mask key of a site, derived from its 16-byte seed (shared with Shamir)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(_hkdf(seed, b"mask key"))


def _public_bytes(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)  # type: ignore[no-any-return]


def _load_public(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    return X25519PublicKey.from_public_bytes(raw)


def _agree(private: Any, public: Any, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret of ``private`` and ``public`` (raw 32 bytes, or
    a public-key object already loaded)."""
    pub = _load_public(public) if isinstance(public, bytes) else public
    return _hkdf(private.exchange(pub), info)


def _word_dtype(modulus: int) -> np.dtype[Any]:
    """The narrowest unsigned word holding residues mod ``modulus`` (a power of two <= 2**64):
    sums of such words wrap mod 2**32 or 2**64, a multiple of the modulus, so masks can be
    added and subtracted without reducing after every step."""
    return np.dtype("<u4") if modulus <= 1 << 32 else np.dtype("<u8")


def _prg(key: bytes, n: int, modulus: int) -> NDArray[np.uint64]:
    """``n`` uniform residues mod ``modulus`` (a power of two): the AES-256-CTR keystream of
    ``key`` read as 32-bit words (64-bit above 2**32), masked to the modulus's bits."""
    return _masks([key], [], n, modulus)


def _masks(plus: Iterable[bytes], minus: Iterable[bytes], n: int,
           modulus: int) -> NDArray[np.uint64]:  # fmt: skip
    """``sum(_prg(k) for k in plus) - sum(_prg(k) for k in minus)`` mod ``modulus``, with one
    keystream buffer and in-place wrapping arithmetic (one reduction at the end)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    dt = _word_dtype(modulus)
    zeros = bytes(dt.itemsize * n)
    acc = np.zeros(n, dtype=dt)
    for keys, op in ((plus, np.add), (minus, np.subtract)):
        for key in keys:
            enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
            op(acc, np.frombuffer(enc.update(zeros), dtype=dt), out=acc)
    acc &= dt.type(modulus - 1)
    return acc.astype(np.uint64, copy=False)


#: Shares made by SLIP-0039's sharing (``shamir-mnemonic``) carry this tag in their index's top
#: byte; untagged shares are PyCryptodome's.
_SLIP39 = 1 << 24
#: SLIP-0039 makes at most 16 shares of a secret.
_SLIP39_MAX = 16


def _split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares of a 16-byte ``secret``, each ``index || value`` (20 bytes).

    Up to 16 shares and a threshold of at least 2: SLIP-0039's sharing over GF(256) (Trezor's
    reference implementation ``shamir-mnemonic``, its public ``split_ems`` on one group; 25x
    faster to rebuild than the GF(2^128) sharing below, and each rebuilt secret is checked
    against a digest share). Otherwise PyCryptodome's sharing over GF(2^128), the one Flower
    uses."""
    if 2 <= threshold <= count <= _SLIP39_MAX:
        from shamir_mnemonic.shamir import EncryptedMasterSecret, split_ems

        (group,) = split_ems(1, [(threshold, count)], EncryptedMasterSecret(0, False, 0, secret))
        return [struct.pack("<I", _SLIP39 | (sh.index + 1)) + sh.value for sh in group]
    from Crypto.Protocol.SecretSharing import Shamir

    return [struct.pack("<I", i) + v for i, v in Shamir.split(threshold, count, secret, ssss=False)]


def _combine(shares: list[bytes]) -> bytes:
    """The secret behind ``shares`` (exactly ``threshold`` of them, all of one scheme; a
    ``ValueError`` if they do not rebuild a secret)."""
    pairs = [(struct.unpack("<I", s[:4])[0], s[4:]) for s in shares]
    tags = {i & ~(_SLIP39 - 1) for i, _ in pairs}
    if tags == {_SLIP39}:
        from shamir_mnemonic.shamir import ShareGroup, recover_ems
        from shamir_mnemonic.share import Share
        from shamir_mnemonic.utils import MnemonicError

        group = ShareGroup()
        try:
            for i, v in pairs:
                x = (i & (_SLIP39 - 1)) - 1
                if not 0 <= x < _SLIP39_MAX:
                    raise ValueError(f"share index {x} out of range")
                group.add(Share(0, False, 0, 0, 1, 1, x, len(pairs), bytes(v)))
            return bytes(recover_ems({0: group}).ciphertext)
        except MnemonicError as exc:  # a wrong share: the digest does not match
            raise ValueError(str(exc)) from None
    if tags != {0}:
        raise ValueError("shares of different schemes")
    from Crypto.Protocol.SecretSharing import Shamir

    return bytes(Shamir.combine(pairs, ssss=False))


def _commit(seed: bytes, rnd: int, site: int) -> bytes:
    """SHA-256 commitment to a self-mask seed (hiding: the seed is 128 random bits)."""
    import hashlib

    return hashlib.sha256(_INFO + b"self seed" + _ids(rnd, site) + seed).digest()


def _senders_message(rnd: int, entries: Iterable[tuple[int, bytes]]) -> bytes:
    """What each sender signs in the consistency check: the round and the list of senders
    with this round's public mask keys (fresh per round: an old signature never fits)."""
    import hashlib

    h = hashlib.sha256(_INFO + b"senders" + _ids(rnd))
    for j, pk in entries:
        h.update(_ids(j) + pk)
    return h.digest()


def identity_keys(ids: Iterable[int]) -> tuple[dict[int, Any], dict[int, bytes]]:
    """Fresh Ed25519 identity keys for ``ids`` and the registry of their public keys (in
    a deployment each site makes its own and the registry is distributed out of band)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    keys = {int(i): Ed25519PrivateKey.generate() for i in ids}
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return keys, {i: k.public_key().public_bytes(*raw) for i, k in keys.items()}


def _aead(key: bytes) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


# --------------------------------------------------------------------------------------------
# A site's side
# --------------------------------------------------------------------------------------------


class SiteSession:
    """One site's side of one round. Its secrets (the two seeds, the share key) stay here.

    The methods are the site's answers to the server's four requests, in order; each checks
    what the server sends (it may be malicious) and raises :class:`UsageError` on anything
    that would weaken the protocol.
    """

    def __init__(
        self, site: int, rnd: int, params: SecAggParams, *, identity: Any = None,
        registry: Mapping[int, bytes] | None = None, verified: set[bytes] | None = None,
        cohort: int | None = None, memo: dict[Any, Any] | None = None,
    ) -> None:  # fmt: skip
        self.site = int(site)
        self.rnd = int(rnd)
        self.params = params
        # the consistency check: this site's Ed25519 identity key and every site's public
        # identity key (a PKI the sites share; the server only relays). Without them the
        # site signs nothing and so never unmasks.
        self._identity = identity
        self._registry = dict(registry or {})
        self._confirmed: tuple[tuple[int, bytes], ...] | None = None
        # how many sites take part in the round (the sites' own knowledge of the roster; by
        # default every registered site, the most a round can have)
        self._cohort = int(cohort) if cohort is not None else len(self._registry)
        # signatures already found valid (public key || message || signature): verification
        # is a pure function, so sites simulated in one process may share what they verified
        self._verified = verified if verified is not None else set()
        # lists of senders already parsed (the same list object shown to several simulated
        # sites is read once; a pure function of the list's content, compared on every use)
        self._memo = memo if memo is not None else {}
        self._stage = "new"
        self._k = self._t = 0
        self._mask_seed = b""
        self._self_seed = b""
        self._share_key: Any = None
        self._mask_key: Any = None
        self._neighbours: dict[int, tuple[bytes, bytes]] = {}
        self._pair_keys: dict[int, bytes] = {}
        self._transport: dict[int, Any] = {}
        self._self_shares: dict[int, bytes] = {}
        self._mask_shares: dict[int, bytes] = {}
        self._senders: list[int] = []

    def _advance(self, frm: str, to: str) -> None:
        if self._stage != frm:
            raise UsageError(
                f"site {self.site}: SecAgg+ request {to!r} out of order (after {self._stage!r})"
            )
        self._stage = to

    def setup(self, *, rnd: int, share_count: int, threshold: int) -> tuple[bytes, bytes, bytes]:
        """Step 1: fresh keys and seeds for this round; returns the public mask key, the public
        share key and the commitment to the self-mask seed."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._advance("new", "setup")
        if rnd != self.rnd:
            raise UsageError(f"site {self.site}: setup for round {rnd}, expected {self.rnd}")
        if not share_count / 2 < threshold <= share_count:
            raise UsageError(
                f"site {self.site}: refusing SecAgg+ threshold {threshold} of {share_count} "
                "shares (must exceed half)"
            )
        self._k, self._t = int(share_count), int(threshold)
        self._mask_seed = os.urandom(_SEED_BYTES)
        self._mask_key = _mask_private_key(self._mask_seed)
        self._share_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(_SEED_BYTES)
        commit = _commit(self._self_seed, self.rnd, self.site)
        return _public_bytes(self._mask_key), _public_bytes(self._share_key), commit

    def share_keys(self, neighbours: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Step 2: the neighbours' public keys (this site's own included) in; the encrypted
        shares of this site's two seeds out, one ciphertext per other neighbour."""
        self._advance("setup", "share_keys")
        nb = {int(j): (bytes(a), bytes(b)) for j, (a, b) in neighbours.items()}
        mine = (_public_bytes(self._mask_key), _public_bytes(self._share_key))
        if nb.get(self.site) != mine:
            raise UsageError(f"site {self.site}: the server sent other keys under its name")
        if not self._t <= len(nb) <= self._k:
            raise UsageError(
                f"site {self.site}: {len(nb)} neighbours, outside [threshold {self._t}, "
                f"share count {self._k}]"
            )
        keys = [k for pair in nb.values() for k in pair]
        if len(set(keys)) != len(keys) or any(len(k) != 32 for k in keys):
            raise UsageError(f"site {self.site}: repeated or malformed neighbour keys")
        try:
            # each neighbour's public keys parsed once (X25519 rejects malformed points here)
            loaded = {j: (_load_public(a), _load_public(b)) for j, (a, b) in nb.items()
                      if j != self.site}  # fmt: skip
        except ValueError:
            raise UsageError(f"site {self.site}: malformed neighbour keys") from None
        self._neighbours = nb
        order = sorted(nb)
        b_shares = _split(self._self_seed, self._t, len(order))
        s_shares = _split(self._mask_seed, self._t, len(order))
        out: dict[int, bytes] = {}
        for j, bs, ss in zip(order, b_shares, s_shares, strict=True):
            if j == self.site:
                self._self_shares[j], self._mask_shares[j] = bs, ss
                continue
            # the pair's transport key: agreed once, used for the shares both ways this round
            aead = _aead(_agree(self._share_key, loaded[j][1], b"share key" + self._pair(j)))
            self._transport[j] = aead
            # the pair's mask key, for step 3 (fresh keys each round, never reused)
            self._pair_keys[j] = _agree(self._mask_key, loaded[j][0], b"mask" + self._pair(j))
            nonce = os.urandom(12)
            aad = _ids(self.rnd, self.site, j)
            out[j] = nonce + aead.encrypt(nonce, bs + ss, aad)
        return out

    def _check_senders(
        self, s: set[int], d: set[int], listed: Any, signatures: Mapping[int, bytes] | None
    ) -> None:
        import hashlib

        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        entries, msg, _ = self._parsed(listed if listed is not None else ())
        if entries != self._confirmed:
            raise UsageError(
                f"site {self.site}: the list of senders differs from the one it confirmed; "
                "refusing to unmask"
            )
        sigs = dict(signatures or {})
        got = [sig if isinstance(sig := sigs.get(j, b""), bytes) else b"" for j, _ in entries]
        # the whole list's signatures (each length-prefixed), once all found valid, are one
        # entry of the shared cache
        h = hashlib.sha256()
        for sig in got:
            h.update(struct.pack("<I", len(sig)) + sig)
        whole = b"list" + msg + h.digest()
        for (j, _), sig in zip(entries if whole not in self._verified else (), got, strict=False):
            key = self._registry[j] + msg + sig
            if key in self._verified:
                continue
            try:
                Ed25519PublicKey.from_public_bytes(self._registry[j]).verify(bytes(sig), msg)
                self._verified.add(key)
            except (InvalidSignature, TypeError, ValueError):
                raise UsageError(
                    f"site {self.site}: site {j} did not sign the list of senders; refusing to "
                    "unmask"
                ) from None
        self._verified.add(whole)
        a = {j for j, _ in entries}
        if a & set(self._neighbours) != s or a & d:
            raise UsageError(
                f"site {self.site}: the server's list of senders disagrees with what it says "
                "of this site's neighbours; refusing to unmask"
            )

    def _pair(self, j: int) -> bytes:
        return _ids(self.rnd, min(self.site, j), max(self.site, j))

    def receive(self, forwarded: Mapping[int, bytes]) -> None:
        """Step 3, first half: decrypt and keep the shares the neighbours sent this site."""
        from cryptography.exceptions import InvalidTag

        self._advance("share_keys", "receive")
        if len(forwarded) + 1 < self._t:
            raise UsageError(
                f"site {self.site}: shares from {len(forwarded)} neighbours; the threshold is "
                f"{self._t}"
            )
        for j, ct in forwarded.items():
            j = int(j)
            if j == self.site or j not in self._neighbours or not isinstance(ct, bytes):
                raise UsageError(f"site {self.site}: shares from a non-neighbour ({j})")
            try:
                aad = _ids(self.rnd, j, self.site)
                plain = self._transport[j].decrypt(ct[:12], ct[12:], aad)
            except (InvalidTag, ValueError):
                raise UsageError(
                    f"site {self.site}: the shares from site {j} do not decrypt"
                ) from None
            if len(plain) != 2 * _SHARE_BYTES:
                raise UsageError(f"site {self.site}: malformed shares from site {j}")
            self._self_shares[j] = plain[:_SHARE_BYTES]
            self._mask_shares[j] = plain[_SHARE_BYTES:]
        self._senders = sorted(int(j) for j in forwarded)
        self._transport.clear()

    def mask(self, quantized: NDArray[np.uint64]) -> NDArray[np.uint64]:
        """Step 3, second half: the masked vector of this site's quantized ``[weight, update]``
        (:func:`quantize_rows`): + self mask, + mask with each neighbour of lower index,
        - mask with each of higher index, mod the modulus."""
        self._advance("receive", "mask")
        m = self.params.modulus
        n = len(quantized)
        own = _hkdf(self._self_seed, b"self mask" + _ids(self.rnd, self.site))
        plus = [own] + [self._pair_keys[j] for j in self._senders if self.site > j]
        minus = [self._pair_keys[j] for j in self._senders if self.site < j]
        masks = _masks(plus, minus, n, m)
        masks += np.asarray(quantized, dtype=np.uint64)
        masks &= np.uint64(m - 1)
        self._pair_keys.clear()
        return masks

    def confirm(self, *, all_senders: Any) -> bytes:
        """Step 4a, in every round: the consistency check of Bonawitz et al. 2017's actively
        secure protocol. The server sends every sender the list of senders,
        ``[(site, public mask key), ...]``; the site checks it (at least
        :meth:`SecAggParams.senders_needed` distinct registered sites, itself among them with
        this round's key, its neighbours with the keys it was given and only those it holds
        shares of) and signs it with its identity key, once per round."""
        self._advance("mask", "confirm")
        if self._identity is None or not self._registry or self._cohort < 2:
            raise UsageError(
                f"site {self.site}: no identity key or registry of the sites' keys; it cannot "
                "sign the list of senders and will not unmask"
            )
        entries, msg, listed = self._parsed(all_senders)
        m = self.params.senders_needed(self._cohort)
        if len(entries) < m:
            why = (
                "noise shares (distributed DP)"
                if m == self.params.min_senders
                else f"senders in a round of {self._cohort} sites (a list of senders no other "
                "list can rival)"
            )
            raise UsageError(
                f"site {self.site}: {len(entries)} sites sent a vector; a released sum needs at "
                f"least {m} {why}, refusing to go on"
            )
        if listed.get(self.site) != _public_bytes(self._mask_key):
            raise UsageError(f"site {self.site}: the list of senders misstates this site")
        unknown = listed.keys() - self._registry.keys()
        if unknown:
            raise UsageError(f"site {self.site}: unknown site {min(unknown)} among the senders")
        for j, (mask_key, _) in self._neighbours.items():
            if j in listed and (listed[j] != mask_key or j not in self._self_shares):
                raise UsageError(f"site {self.site}: the list of senders misstates neighbour {j}")
        self._confirmed = entries
        return self._identity.sign(msg)  # type: ignore[no-any-return]

    def _parsed(self, raw: Any) -> tuple[tuple[tuple[int, bytes], ...], bytes, dict[int, bytes]]:
        """``raw`` read as a list of senders: its sorted entries, the message each sender signs
        and the entries as a dict. A list of ``(int, bytes)`` tuples already read by another
        simulated site (the same object, still equal to what was read) is not read again."""
        key = (id(raw), self.rnd)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is raw and raw == hit[1]:
            return hit[2]  # type: ignore[no-any-return]
        entries = self._entries(raw)
        out = (entries, _senders_message(self.rnd, entries), dict(entries))
        if isinstance(raw, list) and all(
            type(x) is tuple and len(x) == 2 and type(x[0]) is int and type(x[1]) is bytes
            for x in raw
        ):
            self._memo[key] = (raw, list(raw), out)
        return out

    def _entries(self, raw: Any) -> tuple[tuple[int, bytes], ...]:
        try:
            entries = tuple(sorted((int(j), bytes(pk)) for j, pk in raw))
        except (TypeError, ValueError):
            raise UsageError(f"site {self.site}: malformed list of senders") from None
        if len({j for j, _ in entries}) != len(entries) or any(len(pk) != 32 for _, pk in entries):
            raise UsageError(f"site {self.site}: repeated or malformed senders in the list")
        return entries

    def unmask(
        self, *, senders: Iterable[int], dropped: Iterable[int], all_senders: Any = None,
        signatures: Mapping[int, bytes] | None = None,
    ) -> dict[int, bytes]:  # fmt: skip
        """Step 4 (answered once per round): this site's share of each sender's self-mask seed
        and of each dropped neighbour's mask seed, never both for one site.

        The site answers only after :meth:`confirm`, for the very list it confirmed
        (``all_senders``), signed by every site on it (``signatures``, checked against the
        registry of identity keys), and only if its neighbours named as senders are exactly
        the listed ones and no listed site is named dropped."""
        if self._stage in ("receive", "mask"):
            raise UsageError(
                f"site {self.site}: unmask request before the list of senders was confirmed; "
                "refusing to unmask"
            )
        if self._stage != "confirm":
            raise UsageError(
                f"site {self.site}: SecAgg+ unmask request out of order (after {self._stage!r})"
            )
        self._stage = "unmask"
        s, d = {int(x) for x in senders}, {int(x) for x in dropped}
        if s & d:
            raise UsageError(
                f"site {self.site}: the server names sites {sorted(s & d)} both as senders and "
                "as dropped; refusing to unmask"
            )
        held = set(self._self_shares)
        if not (s | d) <= held:
            raise UsageError(f"site {self.site}: asked for shares it does not hold")
        if len(s) < self._t:
            raise UsageError(
                f"site {self.site}: only {len(s)} of its neighbours sent a vector; the threshold "
                f"is {self._t}, refusing to unmask"
            )
        self._check_senders(s, d, all_senders, signatures)
        out = {j: self._self_shares[j] for j in s}
        out.update({j: self._mask_shares[j] for j in d})
        self._self_seed = self._mask_seed = b""  # nothing more to give this round
        return out


# --------------------------------------------------------------------------------------------
# The server's side
# --------------------------------------------------------------------------------------------


def _ring(ids: list[int], k: int) -> dict[int, frozenset[int]]:
    """Flower's SecAgg+ graph: ``ids`` in a random order on a ring, each site's neighbours the
    ``k // 2`` before and after it (itself included); everyone when ``k`` covers the ring."""
    order = list(ids)
    secrets.SystemRandom().shuffle(order)
    n, h = len(order), k // 2
    if k >= n:
        return {i: frozenset(ids) for i in ids}
    return {
        nid: frozenset(order[(p + off) % n] for off in range(-h, h + 1))
        for p, nid in enumerate(order)
    }


@dataclass
class ServerSession:
    """The server's side of one round: public keys, routing, the masked sum, reconstruction.

    ``record``: keep every message the server receives in :attr:`received` (``(step, site,
    payload)``), for tests that play the server as an adversary.
    """

    rnd: int
    ids: list[int]
    params: SecAggParams
    record: bool = False
    received: list[tuple[str, int, Any]] = field(default_factory=list)
    aborted: RoundAborted | None = None

    def __post_init__(self) -> None:
        self.ids = sorted(int(i) for i in self.ids)
        self.k, self.t = self.params.for_cohort(len(self.ids))
        if len(self.ids) * self.params.quantization_range >= self.params.modulus:
            raise UsageError(
                f"SecAgg+: {len(self.ids)} sites x quantization range "
                f"{self.params.quantization_range} wrap around the modulus {self.params.modulus}"
            )
        self.graph = _ring(self.ids, self.k)
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.commits: dict[int, bytes] = {}
        self.shared: set[int] = set()
        self.senders: list[int] = []
        self.dropped: list[int] = []
        self._sum: NDArray[np.uint64] | None = None
        self.rejected: dict[int, str] = {}
        self.listed: list[tuple[int, bytes]] = []

    def _log(self, step: str, replies: Mapping[int, Any]) -> None:
        if self.record:
            self.received.extend((step, int(i), r) for i, r in replies.items())

    def _need(self, alive: set[int], owners: Iterable[int], step: str) -> None:
        for i in owners:
            have = len(self.graph[i] & alive)
            if have < self.t:
                raise RoundAborted(
                    "secagg_too_few_sites",
                    f"after {step}, site {i} has {have} live neighbours (itself included) "
                    f"holding its shares; {self.t} are needed",
                )

    def setup_requests(self) -> dict[int, dict[str, int]]:
        return {i: {"rnd": self.rnd, "share_count": len(self.graph[i]), "threshold": self.t}
                for i in self.ids}  # fmt: skip

    def on_keys(self, replies: Mapping[int, Any]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Step 1's replies in; step 2's requests out (each site's live neighbours' keys)."""
        self._log("setup", replies)
        for i, r in replies.items():
            if (i in self.graph and isinstance(r, tuple) and len(r) == 3
                    and all(isinstance(x, bytes) and len(x) == 32 for x in r)):  # fmt: skip
                self.keys[int(i)] = (r[0], r[1])
                self.commits[int(i)] = r[2]
        alive = set(self.keys)
        self._need(alive, alive, "setup")
        return {i: {j: self.keys[j] for j in sorted(self.graph[i] & alive)} for i in alive}

    def on_shares(self, replies: Mapping[int, Any]) -> dict[int, dict[int, bytes]]:
        """Step 2's replies in; step 3's requests out (the ciphertexts addressed to each)."""
        self._log("share_keys", replies)
        fwd: dict[int, dict[int, bytes]] = {}
        ok: dict[int, dict[int, bytes]] = {}
        for i, r in replies.items():
            expected = (self.graph.get(int(i), frozenset()) & set(self.keys)) - {int(i)}
            if (
                int(i) in self.keys
                and isinstance(r, dict)
                and set(r) == expected
                and all(isinstance(c, bytes) for c in r.values())
            ):
                ok[int(i)] = r
        self.shared = set(ok)
        self._need(self.shared, self.shared, "share keys")
        for i in self.shared:
            fwd[i] = {}
        for src, cts in ok.items():
            for dst, ct in cts.items():
                if dst in self.shared:
                    fwd[dst][src] = ct
        return fwd

    def on_masked(self, vectors: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Step 3's replies (masked vectors) in: summed mod the modulus; step 4a's requests out
        (the list of senders, for each sender to check and sign: :meth:`on_confirmed`)."""
        self._log("masked_vector", vectors)
        n = self.params.n_params + 1
        m = self.params.modulus
        total = np.zeros(n, dtype=np.uint64)
        senders = []
        for i, v in sorted(vectors.items()):
            i = int(i)
            if i not in self.shared:
                self.rejected[i] = "type"  # never took part in the key exchange
                continue
            if not isinstance(v, np.ndarray) or v.dtype != np.uint64:
                self.rejected[i] = "type"
                continue
            if v.shape != (n,):
                self.rejected[i] = "shape"
                continue
            if int(v.max(initial=0)) >= m:
                self.rejected[i] = "shape"
                continue
            total += v  # wraps mod 2**64, a multiple of the modulus
            senders.append(i)
        total &= np.uint64(m - 1)
        self.senders = senders
        self.dropped = sorted(self.shared - set(senders))
        if len(senders) < max(2, self.t):
            raise RoundAborted(
                "secagg_too_few_sites",
                f"{len(senders)} masked vectors arrived; at least {max(2, self.t)} are needed "
                "(the threshold, and never one site's update alone)",
            )
        if len(senders) < self.params.min_senders:
            raise RoundAborted(
                "dp_too_few_senders",
                f"{len(senders)} masked vectors arrived; a released sum must carry the noise "
                f"shares of at least {self.params.min_senders} sites (distributed DP): the "
                "sites would refuse to unmask it",
            )
        try:
            need = self.params.senders_needed(len(self.ids))
        except UsageError as exc:
            raise RoundAborted("secagg_too_few_sites", str(exc)) from None
        if len(senders) < need:
            raise RoundAborted(
                "secagg_too_few_senders",
                f"{len(senders)} of the round's {len(self.ids)} sites sent a masked vector; the "
                f"consistency check needs {need} (more than half of the sites plus the "
                f"{self.params.colluding_for(len(self.ids))} that may collude): the sites "
                "would refuse to unmask",
            )
        s = set(senders)
        self._need(s, self.shared, "masking")
        self._sum = total
        # the consistency check first (:meth:`on_confirmed`)
        self.listed = [(i, self.keys[i][0]) for i in senders]
        return {i: {"all_senders": self.listed} for i in senders}

    def _unmask_requests(self, extra: dict[str, Any]) -> dict[int, dict[str, Any]]:
        s, d = set(self.senders), set(self.dropped)
        return {i: {"senders": sorted(self.graph[i] & s), "dropped": sorted(self.graph[i] & d),
                    **extra} for i in self.senders}  # fmt: skip

    def on_confirmed(self, replies: Mapping[int, Any]) -> dict[int, dict[str, Any]]:
        """Step 4a's replies (each sender's signature on the list of senders) in; step 4's
        requests out, with the list and every signature. A sender that does not sign (it
        vanished, or refused the list) leaves the sites nothing to unmask: the round is
        skipped."""
        self._log("confirm", replies)
        sigs = {int(i): r for i, r in replies.items() if isinstance(r, bytes)}
        missing = sorted(set(self.senders) - set(sigs))
        if missing:
            raise RoundAborted(
                "dp_senders_unconfirmed"
                if self.params.min_senders
                else "secagg_senders_unconfirmed",
                f"{len(missing)} of the {len(self.senders)} senders did not sign the list of "
                "senders (vanished or refused it); the sites unmask only a list every sender "
                "signed",
            )
        return self._unmask_requests({"all_senders": self.listed, "signatures": sigs})

    def on_unmask(self, replies: Mapping[int, Any]) -> NDArray[np.uint64]:
        """Step 4's replies in; the unmasked sum of the senders' quantized vectors out."""
        self._log("unmask", replies)
        assert self._sum is not None, "on_masked first"
        shares: dict[int, list[bytes]] = {i: [] for i in self.shared}
        s_set, d_set = set(self.senders), set(self.dropped)
        for holder, r in replies.items():
            if int(holder) not in s_set or not isinstance(r, dict):
                continue
            for owner, share in r.items():
                owner = int(owner)
                if (owner in shares and owner in self.graph[int(holder)]
                        and isinstance(share, bytes) and len(share) == _SHARE_BYTES):  # fmt: skip
                    shares[owner].append(share)
        m = self.params.modulus
        n = self.params.n_params + 1
        plus: list[bytes] = []  # the masks to add back, and those to remove
        minus: list[bytes] = []
        for owner in sorted(s_set | d_set):
            got = shares[owner]
            if len(got) < self.t:
                raise RoundAborted(
                    "secagg_too_few_shares",
                    f"{len(got)} shares of site {owner}'s "
                    f"{'self-mask' if owner in s_set else 'mask-key'} seed arrived; "
                    f"{self.t} are needed",
                )
            seed = self._rebuild(owner, got, owner in s_set)
            if owner in s_set:
                minus.append(_hkdf(seed, b"self mask" + _ids(self.rnd, owner)))
                continue
            sk = _mask_private_key(seed)
            for j in sorted(self.graph[owner] & s_set):
                pm = _agree(sk, self.keys[j][0], b"mask" + _ids(self.rnd, min(owner, j),
                                                                max(owner, j)))  # fmt: skip
                # j added +mask when j > owner: remove it
                (minus if j > owner else plus).append(pm)
        total = self._sum + _masks(plus, minus, n, m)
        total &= np.uint64(m - 1)
        self._sum = None
        return total

    def _rebuild(self, owner: int, shares: list[bytes], self_seed: bool) -> bytes:
        """The seed behind ``shares``, checked against what the owner published (the
        commitment to its self-mask seed, or its public mask key); a wrong share from a
        neighbour is worked around by other subsets of ``threshold`` shares (a bounded number
        of tries), else the round is skipped: never a wrong sum."""
        import itertools

        from cryptography.exceptions import InvalidKey

        def ok(seed: bytes) -> bool:
            if self_seed:
                return _commit(seed, self.rnd, owner) == self.commits[owner]
            return _public_bytes(_mask_private_key(seed)) == self.keys[owner][0]

        for tries, subset in enumerate(itertools.combinations(shares, self.t)):
            if tries >= 32:
                break
            try:
                seed = _combine(list(subset))
            except (ValueError, InvalidKey):
                continue
            if len(seed) == _SEED_BYTES and ok(seed):
                return seed
        raise RoundAborted(
            "secagg_bad_shares",
            f"the shares of site {owner}'s {'self-mask' if self_seed else 'mask-key'} seed do "
            "not rebuild the seed it committed to",
        )
