"""Steps ``seal`` and ``combine`` under SecAgg+ masking (``secure_aggregation = "secagg+"``).

The protocol is :mod:`privml.fl.secagg`; these are its stages in the round loop:

* :class:`SealMasked` (step ``seal``, at the sites): each site clips its update to the L2 bound
  ``clip``, weights it by ``n_i / n_max``, quantizes it (Flower's arithmetic, the whole cohort
  at once) and masks it. Only the masked vector leaves the site.
* :class:`MaskedSum` (step ``combine``, at the server): sums the masked vectors, asks the
  senders for the shares that remove the masks (the ``unmask`` exchange), rebuilds the
  masks, dequantizes and divides by the total weight. A round the protocol cannot finish
  safely is skipped (``secagg_too_few_sites``, ``secagg_too_few_senders``,
  ``secagg_senders_unconfirmed``, ``secagg_too_few_shares``, ``secagg_bad_shares``,
  ``secagg_sum_out_of_bounds``): never a wrong sum.

A round needs five exchanges between the server and the sites (setup, share keys, masked
vector, confirm, unmask; confirm is the consistency check: every sender signs the list of
senders, and the sites unmask only that list); the engine carries them (:class:`Exchange`).
In simulation, :class:`SimulatedSites` holds every site's
:class:`~privml.fl.secagg.SiteSession` and answers the server's requests with function calls;
it can drop sites at any step (tests). The first two exchanges happen in the seal step, before
the sites mask (as in Flower's workflow, where they precede the training request); the last two
happen in the combine step. A cohort's stragglers
(``[training] straggler``) take part in the key exchange and then never send their vector:
exactly the sites SecAgg+ recovers from, by rebuilding their mask keys from their neighbours'
shares. Sites that drop out (``dropout``) leave before the protocol starts.

**What the server can check.** Nothing about an individual update. After unmasking, the sum of
updates clipped to ``clip`` and weighted by at most 1 has L2 norm at most ``clip`` times the
total weight: :class:`MaskedSum` skips a round whose sum breaks that bound (a site that did
not clip, or sent arbitrary residues). A malicious site that stays within it still moves the
average by up to that bound; see docs/threat-model.md.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from privml.fl.aggregate import clip_rows
from privml.fl.checkpoint import ServerState
from privml.fl.rounds import Outcome, Received, SiteUpdates
from privml.fl.secagg import (
    RoundAborted,
    SecAggParams,
    ServerSession,
    SiteSession,
    dequantize_sum,
    quantize_rows,
)

__all__ = ["Exchange", "MaskedSum", "MaskingServer", "SealMasked", "SimulatedSites"]

#: ``(round, step, requests by site) -> replies by site``: one exchange of the protocol; sites
#: that do not answer are missing from the replies.
Exchange = Callable[[int, str, Mapping[int, Any]], dict[int, Any]]

#: ``(round, site ids, n) -> [len(ids), n]`` uniforms in [0, 1) for stochastic rounding.
Uniforms = Callable[[int, NDArray[np.int64], int], NDArray[np.float64]]


def seeded_uniforms(seed: int) -> Uniforms:
    """Rounding draws from a generator seeded by ``(seed, round, 13, site)`` (per site, so a
    site rounds alike on every engine)."""

    def draw(rnd: int, ids: NDArray[np.int64], n: int) -> NDArray[np.float64]:
        out = np.empty((len(ids), n))
        for r, i in enumerate(ids):
            out[r] = np.random.default_rng([seed, rnd, 13, int(i)]).random(n)
        return out

    return draw


@dataclass
class MaskingServer:
    """The server's SecAgg+ sessions, one per round (``record``: keep what it receives)."""

    params: SecAggParams
    record: bool = False
    sessions: dict[int, ServerSession] = field(default_factory=dict)

    def open(self, rnd: int, ids: list[int]) -> ServerSession:
        session = ServerSession(rnd, ids, self.params, record=self.record)
        if not self.record:
            self.sessions.clear()
        self.sessions[rnd] = session
        return session


@dataclass
class SimulatedSites:
    """Every site's side of the protocol, in this process: the server's requests are calls.

    ``drop``: step -> site ids that vanish at that step (they answer nothing from then on);
    steps are ``setup``, ``share_keys``, ``masked_vector``, ``confirm``, ``unmask``.
    ``refused``: sites whose :class:`SiteSession` raised, by round (an honest site refusing a
    bad request).
    """

    params: SecAggParams
    drop: dict[str, set[int]] = field(default_factory=dict)
    sessions: dict[int, SiteSession] = field(default_factory=dict)
    refused: dict[int, dict[int, str]] = field(default_factory=dict)
    _gone: set[int] = field(default_factory=set)
    _identity: dict[int, Any] = field(default_factory=dict)
    _registry: dict[int, bytes] = field(default_factory=dict)
    _verified: set[bytes] = field(default_factory=set)
    _memo: dict[Any, Any] = field(default_factory=dict)

    def open(self, rnd: int, ids: list[int]) -> None:
        from privml.fl.secagg import identity_keys

        # identity keys (the consistency check's PKI), made once per site
        new = [int(i) for i in ids if int(i) not in self._identity]
        if new:
            keys, pub = identity_keys(new)
            self._identity.update(keys)
            self._registry.update(pub)
        self._verified.clear()
        self._memo.clear()
        self.sessions = {
            int(i): SiteSession(int(i), rnd, self.params, identity=self._identity[int(i)],
                                registry=self._registry, verified=self._verified,
                                cohort=len(ids), memo=self._memo)
            for i in ids
        }  # fmt: skip
        self._gone = set()

    def gone(self, step: str) -> set[int]:
        self._gone |= set(self.drop.get(step, ()))
        return self._gone

    def __call__(self, rnd: int, step: str, requests: Mapping[int, Any]) -> dict[int, Any]:
        from privml.errors import UsageError

        gone = self.gone(step)
        out: dict[int, Any] = {}
        for i, req in requests.items():
            if i in gone:
                continue
            s = self.sessions[int(i)]
            try:
                if step == "setup":
                    out[i] = s.setup(**req)
                elif step == "share_keys":
                    out[i] = s.share_keys(req)
                elif step == "confirm":
                    out[i] = s.confirm(**req)
                elif step == "unmask":
                    out[i] = s.unmask(**req)
                else:
                    raise UsageError(f"unknown SecAgg+ step {step!r}")
            except UsageError as exc:
                self.refused.setdefault(rnd, {})[int(i)] = str(exc)
        return out


@dataclass
class SealMasked:
    """Step ``seal`` in simulation: the key exchange with the server, then every
    participant's clipped, weighted, quantized and masked update (see the module docstring).

    ``noise``: integer noise added to each site's quantized coordinates before masking
    (distributed DP's noise share), ``(batch, threshold) -> int64 [S, P]`` (``threshold``: the
    round's SecAgg+ threshold, the fewest shares the server can ever unmask a sum of).
    ``rounding_bound``: conditional randomized rounding (distributed DP): a site whose rounded
    update, centred, has L2 norm above it draws its rounding again (``uniforms`` must then give
    fresh draws on every call).
    """

    params: SecAggParams
    server: MaskingServer
    sites: SimulatedSites
    clip: float
    uniforms: Uniforms
    weighted: bool = True
    noise: Callable[[SiteUpdates, int], NDArray[np.int64]] | None = None
    rounding_bound: float | None = None
    n_clipped: int = 0
    n_rerounded: int = 0
    seconds: list[tuple[int, int, float]] = field(default_factory=list)
    name = "seal"
    step = "seal"

    def apply(self, batch: SiteUpdates) -> None:
        t0 = time.perf_counter()
        rnd = batch.rnd
        joined = sorted({int(i) for i in batch.ids} | {int(i) for i in batch.late})
        batch.sealed = [None] * len(batch.ids)  # type: ignore[assignment,list-item]
        n_rows = len(batch.ids)
        if len(joined) < 2:
            batch.updates = np.zeros((n_rows, 0))
            return
        session = self.server.open(rnd, joined)
        self.sites.open(rnd, joined)
        try:
            keys = self.sites(rnd, "setup", session.setup_requests())
            fwd = session.on_shares(self.sites(rnd, "share_keys", session.on_keys(keys)))
        except RoundAborted as exc:
            session.aborted = exc
            batch.updates = np.zeros((n_rows, 0))
            return
        q = self._quantize(batch, session.t)
        gone = self.sites.gone("masked_vector")
        sealed: list[Any] = []
        for r, i in enumerate(batch.ids):
            i = int(i)
            s = self.sites.sessions[i]
            if i in gone or i not in fwd or q is None or not np.isfinite(batch.updates[r]).all():
                sealed.append(None)
                continue
            s.receive(fwd[i])
            sealed.append(s.mask(q[r]))
        batch.sealed = sealed
        batch.updates = np.zeros((n_rows, 0))  # the plain update never leaves the site
        self.seconds.append((rnd, n_rows, time.perf_counter() - t0))

    def _quantize(self, batch: SiteUpdates, threshold: int) -> NDArray[np.uint64] | None:
        if not len(batch.ids):
            return None
        rows = np.nan_to_num(np.asarray(batch.updates, dtype=np.float64), nan=0.0,
                             posinf=0.0, neginf=0.0)  # fmt: skip
        rows, _, over = clip_rows(rows, self.clip)
        self.n_clipped += int(over.sum())
        w = batch.weights / self.params.max_weight if self.weighted else np.ones(len(batch.ids))
        u = self.uniforms(batch.rnd, batch.ids, rows.shape[1])
        w = np.minimum(w, 1.0)
        q = quantize_rows(rows, w, self.params, u)
        if self.rounding_bound is not None:
            self._reround(q, rows, w, batch)
        if self.noise is not None:
            m = self.params.modulus
            noise = self.noise(batch, threshold).astype(np.int64) % m  # residues in [0, m)
            q[:, 1:] = (q[:, 1:] + noise.astype(np.uint64)) & np.uint64(m - 1)
        return q

    def _reround(self, q: NDArray[np.uint64], rows: NDArray[np.float64],
                 w: NDArray[np.float64], batch: SiteUpdates) -> None:  # fmt: skip
        """Conditional randomized rounding: rows whose rounded norm exceeds the bound are
        rounded again with fresh draws (each try fails with probability below ``beta``)."""
        assert self.rounding_bound is not None
        mid = self.params.quantization_range / 2
        for _ in range(10_000):
            norms = np.linalg.norm(q[:, 1:].astype(np.float64) - mid, axis=1)
            bad = np.flatnonzero(norms > self.rounding_bound)
            if not len(bad):
                return
            self.n_rerounded += len(bad)
            u = self.uniforms(batch.rnd, batch.ids[bad], rows.shape[1])
            q[bad] = quantize_rows(rows[bad], w[bad], self.params, u)
        raise RuntimeError("conditional rounding did not converge (bound below the norm)")


@dataclass
class _Cost:
    round: int
    sites: int
    senders: int
    dropped: int
    unmask_seconds: float
    confirm_seconds: float = 0.0


@dataclass
class MaskedSum:
    """Step ``combine`` under SecAgg+: the unmasked sum of the masked vectors, divided by the
    total weight (or by ``denominator``: client-level DP's fixed denominator).

    ``exchange`` carries the unmask requests to the senders (in simulation the
    :class:`SimulatedSites`; on Flower, messages).
    """

    params: SecAggParams
    server: MaskingServer
    exchange: Exchange
    clip: float
    weighted: bool = True
    denominator: float | None = None
    check_bound: bool = True
    centered: bool = False
    """The sum carries distributed DP's integer noise: decode residues around the middle."""
    costs: list[_Cost] = field(default_factory=list)
    step = "combine"

    def __call__(self, state: ServerState, received: Received, rnd: int) -> Outcome:
        session = self.server.sessions.get(rnd)
        sealed = list(received.sealed or [])
        ids = [int(i) for i in received.ids]
        if session is None or not sealed:
            return Outcome.skip("no_updates", [], [])
        if session.aborted is not None:
            return self._skip(session.aborted, [], [])
        vectors = {i: v for i, v in zip(ids, sealed, strict=True) if v is not None}
        t0 = time.perf_counter()
        try:
            requests = session.on_masked(vectors)
            t1 = time.perf_counter()  # the consistency check: the senders sign the list
            requests = session.on_confirmed(self.exchange(rnd, "confirm", requests))
            confirm_s = time.perf_counter() - t1
            replies = self.exchange(rnd, "unmask", requests)
            total = session.on_unmask(replies)
        except RoundAborted as exc:
            return self._skip(exc, *self._split(ids, sealed, session))
        accepted, rejected = self._split(ids, sealed, session)
        n = len(session.senders)
        summed, total_w = dequantize_sum(total, n, self.params, centered=self.centered)
        self.costs.append(_Cost(rnd, len(session.ids), n, len(session.dropped),
                                time.perf_counter() - t0, confirm_s))  # fmt: skip
        info: dict[str, Any] = {"clip": self.clip, "secagg_senders": n,
                                "secagg_recovered": len(session.dropped)}  # fmt: skip
        # the one check the server can make: the clipped, weighted sum's norm
        bound = self.clip * total_w + np.sqrt(summed.size) * 2 * n * self.params.clipping_range \
            / self.params.quantization_range  # fmt: skip
        norm = float(np.linalg.norm(summed))
        if self.check_bound and self.denominator is None and norm > bound:
            return self._skip(RoundAborted(
                "secagg_sum_out_of_bounds",
                f"the unmasked sum has L2 norm {norm:.4g} > clip x total weight {bound:.4g}: "
                "some site did not clip its update (or sent arbitrary residues)"),
                accepted, rejected)  # fmt: skip
        denom = float(self.denominator) if self.denominator is not None else (
            total_w if self.weighted else float(n))  # fmt: skip
        if not denom > 0:
            return Outcome.skip("zero_weight", accepted, rejected)
        info["total_weight"] = denom
        return Outcome(summed / denom, accepted, rejected, info=info)

    @staticmethod
    def _split(
        ids: list[int], sealed: list[Any], session: ServerSession
    ) -> tuple[list[int], list[tuple[int, str]]]:
        senders = set(session.senders)
        accepted = [p for p, i in enumerate(ids) if i in senders]
        rejected = [(p, session.rejected.get(i, "type")) for p, i in enumerate(ids)
                    if i not in senders and sealed[p] is not None]  # fmt: skip
        return accepted, rejected

    @staticmethod
    def _skip(exc: RoundAborted, accepted: list[int], rejected: list[tuple[int, str]]) -> Outcome:
        out = Outcome.skip(exc.reason, accepted, rejected)
        out.info["detail"] = exc.detail
        return out

    def describe(self, seal: SealMasked | None = None) -> dict[str, Any]:
        """results.json ``federation.secure_aggregation``."""
        med = statistics.median
        seal_s = [s / max(1, n) for _, n, s in (seal.seconds if seal is not None else [])]
        n_cohort = self.server.sessions and max(
            len(s.ids) for s in self.server.sessions.values())  # fmt: skip
        return {
            "scheme": "secagg+",
            "protocol": "SecAgg+ (Bell et al. 2020) over Bonawitz et al. 2017's masking, as "
            "Flower's SecAggPlusWorkflow: X25519 + HKDF-SHA256 key agreement, AES-256-GCM "
            "share transport, Shamir shares (SLIP-0039's shamir-mnemonic up to 16 shares, else "
            "PyCryptodome), AES-256-CTR masks; Bonawitz et al.'s consistency check in every "
            "round (each sender signs the list of senders with Ed25519, the sites unmask only "
            "a list every sender on it signed, longer than half the round plus the colluders)",
            "parameters": self.params.to_dict(int(n_cohort) if n_cohort else None),
            "clip": self.clip,
            "clipping": "each site clips its update to L2 norm <= clip, weights it by "
            "n_i / max n and quantizes every coordinate in [-clipping_range, clipping_range] "
            "to [0, quantization_range] with stochastic rounding",
            "key_holder": None,
            "server_checks": "masked vector type, length and range; after unmasking, the sum's "
            "L2 norm <= clip x total weight (else the round is skipped); no per-update check"
            if self.check_bound and self.denominator is None else "masked vector type, length "
            "and range; no per-update check (the unmasked sum carries distributed DP noise, "
            "its norm is not checked)",
            "updates_clipped": None if seal is None else seal.n_clipped,
            "rounding_redraws": None if seal is None else seal.n_rerounded,
            "median_seal_seconds_per_site": med(seal_s) if seal_s else None,
            "median_unmask_seconds": med([c.unmask_seconds for c in self.costs])
            if self.costs else None,
            "median_confirm_seconds": med([c.confirm_seconds for c in self.costs])
            if self.costs else None,
            "recovered_sites": sum(c.dropped for c in self.costs),
            "per_round": [c.__dict__ for c in self.costs],
        }  # fmt: skip
