"""SecAgg+ masking (privml.fl.secagg, privml.fl.stages.masking): the sum is right, the server
learns nothing else, dropouts are recovered up to the threshold and never give a wrong sum.

The adversary tests play the server: they keep every message it receives (``record=True``) and
try to read one site's update from them, the way a curious or lying server would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privml.cli import main
from privml.config import Config, parse_config
from privml.data import load_federation
from privml.errors import ConfigError, UsageError
from privml.fl import secagg as S
from privml.fl.engine import simulate
from privml.fl.rounds import Received, SiteUpdates
from privml.fl.stages.masking import (
    MaskedSum,
    MaskingServer,
    SealMasked,
    SimulatedSites,
    seeded_uniforms,
)
from privml.pipeline import model_spec

DEMO = Path(__file__).resolve().parents[2] / "src/privml/data/demo/demo.toml"
P = 200
CLIP = 1.0


def _params(**kw: Any) -> S.SecAggParams:
    base = dict(share_count=None, threshold=None, clipping_range=CLIP, quantization_range=1 << 22,
                modulus=1 << 32, max_weight=100.0, n_params=P)  # fmt: skip
    return S.SecAggParams(**{**base, **kw})  # type: ignore[arg-type]


class Round:
    """One SecAgg+ round of ``n`` sites on random updates, with every stage of the protocol."""

    def __init__(self, n: int, *, drop: dict[str, set[int]] | None = None, late: int = 0,
                 **kw: Any) -> None:  # fmt: skip
        self.params = _params(**kw)
        self.server = MaskingServer(self.params, record=True)
        self.sites = SimulatedSites(self.params, drop=dict(drop or {}))
        self.seal = SealMasked(self.params, self.server, self.sites, CLIP, seeded_uniforms(0))
        self.combine = MaskedSum(self.params, self.server, self.sites, CLIP)
        rng = np.random.default_rng(n)
        self.ids = np.arange(n - late, dtype=np.int64)
        self.late = np.arange(n - late, n, dtype=np.int64)
        self.updates = rng.normal(0, 0.03, (len(self.ids), P))  # norms ~0.42 < clip
        self.weights = rng.integers(20, 100, len(self.ids)).astype(np.float64)

    def run(self, rnd: int = 1) -> Any:
        batch = SiteUpdates(rnd, self.ids, torch.zeros(1), self.updates.copy(), self.weights,
                            np.zeros(len(self.ids), dtype=bool), late=self.late)  # fmt: skip
        self.seal.apply(batch)
        self.sealed = batch.sealed
        got = Received(self.ids, batch.updates, self.weights, batch.malicious, sealed=batch.sealed)
        return self.combine(None, got, rnd)  # type: ignore[arg-type]

    def expected(self, senders: list[int]) -> np.ndarray:
        w = self.weights[senders] / self.params.max_weight
        return (w @ self.updates[senders]) / w.sum()  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# The sum
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 10, 24])
def test_unmasked_sum_is_weighted_fedavg_within_quantization(n: int) -> None:
    r = Round(n)
    out = r.run()
    assert out.skipped is None
    step = 2 * CLIP / r.params.quantization_range  # one quantization step per site
    assert np.abs(out.update - r.expected(list(range(n)))).max() < 2 * n * step
    assert out.accepted == list(range(n))


@pytest.mark.parametrize(("modulus", "qrange"), [(1 << 12, 1 << 8), (1 << 40, 1 << 22),
                                               (1 << 62, 1 << 30)])  # fmt: skip
def test_masks_cancel_exactly_and_fill_the_modulus(modulus: int, qrange: int) -> None:
    """Below and above 2**32 (masks drawn as 32- or 64-bit words): the unmasked sum is the
    exact sum of the senders' quantized vectors mod the modulus, a recovered site's pairwise
    masks included, and each masked vector spreads over the whole of [0, modulus)."""
    r = Round(7, drop={"masked_vector": {3}}, modulus=modulus, quantization_range=qrange)
    batch = SiteUpdates(1, r.ids, torch.zeros(1), r.updates.copy(), r.weights,
                        np.zeros(7, dtype=bool))  # fmt: skip
    q = r.seal._quantize(batch, 4)
    r.seal.apply(batch)
    session = r.server.sessions[1]
    vectors = {i: v for i, v in enumerate(batch.sealed) if v is not None}
    assert sorted(vectors) == [0, 1, 2, 4, 5, 6]
    signed = session.on_confirmed(r.sites(1, "confirm", session.on_masked(vectors)))
    total = session.on_unmask(r.sites(1, "unmask", signed))
    assert q is not None and session.dropped == [3]
    expected = q[sorted(vectors)].sum(axis=0, dtype=np.uint64) & np.uint64(modulus - 1)
    assert np.array_equal(total, expected)
    y = np.concatenate(list(vectors.values()))
    assert int(y.max()) < modulus and int(y.max()) > 0.9 * modulus and int(y.min()) < 0.1 * modulus


def test_quantization_is_flowers_arithmetic() -> None:
    """Against Flower's own quantize/dequantize (flwr.common.secure_aggregation.quantization)
    with the same rounding draws."""
    quant = pytest.importorskip("flwr.common.secure_aggregation.quantization")
    rng = np.random.default_rng(3)
    rows = rng.uniform(-1.5, 1.5, (4, 50))  # some coordinates beyond the clipping range
    p = _params(n_params=50)
    u = rng.random((4, 50))
    ours = S.quantize_rows(rows, np.ones(4), p, u)
    state = np.random.get_state()
    try:
        for r in range(4):
            np.random.seed(0)
            np.random.set_state(("MT19937", *np.random.get_state()[1:]))
            # Flower draws its rounding from np.random.rand: feed it our draws
            orig = np.random.rand
            np.random.rand = lambda *shape, _u=u[r]: _u.reshape(shape)  # type: ignore[assignment]
            try:
                theirs = quant.quantize([rows[r]], CLIP, p.quantization_range)[0]
            finally:
                np.random.rand = orig  # type: ignore[assignment]
            assert np.array_equal(ours[r, 1:].astype(np.int64), theirs.astype(np.int64))
    finally:
        np.random.set_state(state)
    total = ours.sum(axis=0) % p.modulus
    summed, _ = S.dequantize_sum(total.astype(np.uint64), 4, p)
    flower = quant.dequantize([total[1:].astype(np.int64)], CLIP, p.quantization_range)[0]
    assert np.allclose(summed, flower - 3 * CLIP)  # Flower's offset -(n - 1) c


def test_secagg_run_equals_plain_fedavg_on_the_demo() -> None:
    raw = tomllib.loads(DEMO.read_text())
    raw.pop("inference", None)
    raw["training"] |= {"rounds": 4, "max_update_norm": 100.0}
    plain = parse_config(raw)
    raw["training"]["secure_aggregation"] = "secagg+"
    masked = parse_config(raw)
    fed = load_federation(plain)
    a = simulate(fed, model_spec(plain, fed), plain.training)
    b = simulate(fed, model_spec(masked, fed), masked.training)
    assert float((a.params - b.params).abs().max()) < 1e-3
    info = b.extra["federation"]["secure_aggregation"]
    assert info["scheme"] == "secagg+" and info["key_holder"] is None
    assert info["parameters"]["share_count"] == 3 and info["parameters"]["threshold"] == 2


# --------------------------------------------------------------------------------------------
# The server learns the sum only (adversary: the server, with every message it received)
# --------------------------------------------------------------------------------------------


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_no_message_the_server_receives_reveals_one_update() -> None:
    r = Round(10, drop={"masked_vector": {9}})  # one site recovered: its mask seed is rebuilt
    out = r.run()
    assert out.skipped is None
    session = r.server.sessions[1]
    steps = {step for step, _, _ in session.received}
    assert steps == {"setup", "share_keys", "masked_vector", "confirm", "unmask"}
    # everything the server holds about site 0: its masked vector and the shares it collected
    target = 0
    y = next(p for s, i, p in session.received if s == "masked_vector" and i == target)
    q = r.seal._quantize(SiteUpdates(1, r.ids, torch.zeros(1), r.updates.copy(), r.weights,
                                     np.zeros(10, dtype=bool)), session.t)  # fmt: skip
    assert q is not None
    # the masked vector alone is uniform noise: uncorrelated with the update, spread over [0, m)
    # (199 values: |r| > 0.4 by chance has probability 5e-9; 0.3 gave 1.7e-5 per check)
    assert abs(_corr(y[1:], q[target, 1:])) < 0.4
    assert y.max() > r.params.modulus * 0.9 and y.min() < r.params.modulus * 0.1
    # the best the server can do: remove the self mask it learns (it rebuilds the seed from
    # the unmask shares, as the protocol lets it), which leaves the pairwise masks
    shares = [p[target] for s, _, p in session.received if s == "unmask" and target in p]
    seed = S._combine(shares[: session.t])
    assert S._commit(seed, 1, target) == session.commits[target]  # it has the real seed
    m = r.params.modulus
    self_mask = S._prg(S._hkdf(seed, b"self mask" + S._ids(1, target)), P + 1, m)
    rest = (y - self_mask) & np.uint64(m - 1)
    assert abs(_corr(rest[1:], q[target, 1:])) < 0.4
    guess, _ = S.dequantize_sum(rest, 1, r.params)
    assert np.abs(guess - r.updates[target]).mean() > 10 * np.abs(r.updates[target]).mean()
    # and no share of site 0's mask-key seed ever reached the server (it sent its vector)
    mask_key = S._public_bytes(S._mask_private_key(seed))
    assert mask_key != session.keys[target][0]
    # control: with the mask seed too, the same attack reads the update exactly
    site = r.sites.sessions[target]
    sk = S._mask_private_key(site._mask_seed or b"\0" * 16)
    assert site._mask_seed == b""  # the site forgot its seeds after unmasking
    assert sk is not None


def test_with_both_secrets_the_attack_would_work() -> None:
    """Positive control for the test above: if the server held site 0's mask-key seed as well
    (what a site that answers two contradictory unmask requests would give away), it could
    strip every mask and read the update. The honest site refuses that (next tests)."""
    r = Round(5)
    batch = SiteUpdates(1, r.ids, torch.zeros(1), r.updates.copy(), r.weights,
                        np.zeros(5, dtype=bool))  # fmt: skip
    r.seal.apply(batch)
    session = r.server.sessions[1]
    site = r.sites.sessions[0]
    self_seed, mask_seed = site._self_seed, site._mask_seed  # what the attack needs
    m = r.params.modulus
    y = batch.sealed[0]  # type: ignore[index]
    self_mask = S._prg(S._hkdf(self_seed, b"self mask" + S._ids(1, 0)), P + 1, m)
    rest = (y - self_mask) & np.uint64(m - 1)
    sk = S._mask_private_key(mask_seed)
    for j in sorted(session.graph[0] - {0}):
        pm = S._prg(S._agree(sk, session.keys[j][0], b"mask" + S._ids(1, 0, j)), P + 1, m)
        rest = (rest + pm) & np.uint64(m - 1)  # site 0 < j subtracted it
    guess, w = S.dequantize_sum(rest, 1, r.params)
    assert np.abs(guess / w - r.updates[0]).max() < 1e-5


def _sealed(r: Round, rnd: int = 1) -> tuple[Any, S.ServerSession, dict[int, Any]]:
    """A round up to the masked vectors: the batch, the server's session, the vectors."""
    batch = SiteUpdates(rnd, r.ids, torch.zeros(1), r.updates.copy(), r.weights,
                        np.zeros(len(r.ids), dtype=bool))  # fmt: skip
    r.seal.apply(batch)
    vectors = {i: v for i, v in enumerate(batch.sealed) if v is not None}
    return batch, r.server.sessions[rnd], vectors


def _lists(session: S.ServerSession, *groups: list[int]) -> list[list[tuple[int, bytes]]]:
    return [[(i, session.keys[i][0]) for i in sorted(g)] for g in groups]


def _unmask_requests(
    session: S.ServerSession, listed: list[tuple[int, bytes]], sigs: dict[int, bytes],
    to: list[int],
) -> dict[int, dict[str, Any]]:  # fmt: skip
    a = {i for i, _ in listed}
    return {i: {"senders": sorted(session.graph[i] & a), "dropped": sorted(session.graph[i] - a),
                "all_senders": listed, "signatures": sigs} for i in to}  # fmt: skip


def test_a_site_refuses_contradictory_or_repeated_unmask_requests() -> None:
    r = Round(5)
    _, session, vectors = _sealed(r)
    # a server that skips the consistency check (Flower's workflow has none) gets nothing
    with pytest.raises(UsageError, match="before the list of senders was confirmed"):
        r.sites.sessions[1].unmask(senders=[0, 1, 2, 3, 4], dropped=[])
    r2 = Round(5)
    _, session, vectors = _sealed(r2)
    sigs = r2.sites(1, "confirm", session.on_masked(vectors))
    (listed,) = _lists(session, list(range(5)))
    site = r2.sites.sessions[1]
    with pytest.raises(UsageError, match="both as senders and as dropped"):
        site.unmask(senders=[0, 1, 2, 3, 4], dropped=[2], all_senders=listed, signatures=sigs)
    site2 = r2.sites.sessions[2]
    site2.unmask(senders=[0, 1, 2, 3, 4], dropped=[], all_senders=listed, signatures=sigs)
    with pytest.raises(UsageError, match="out of order"):  # a second request: refused
        site2.unmask(senders=[0, 1], dropped=[2, 3, 4], all_senders=listed, signatures=sigs)
    # the simulated sites share the signatures they verified: bytes moved from one signature
    # to the next (the same concatenation) do not pass for the verified list
    bad = {**sigs, 0: sigs[0][:-1], 1: sigs[0][-1:] + sigs[1]}
    with pytest.raises(UsageError, match="did not sign"):
        r2.sites.sessions[3].unmask(senders=[0, 1, 2, 3, 4], dropped=[], all_senders=listed,
                                    signatures=bad)  # fmt: skip


def test_a_list_changed_after_one_site_read_it_is_read_again() -> None:
    """The simulated sites read the same list object once; a server that changes it in place
    between two sites gets the change read, not the first site's reading."""
    r = Round(5)
    _, session, vectors = _sealed(r)
    session.on_masked(vectors)
    (listed,) = _lists(session, list(range(5)))
    assert r.sites(1, "confirm", {0: {"all_senders": listed}})
    listed[4] = (4, bytes(32))  # the same list, neighbour 4's key changed
    assert not r.sites(1, "confirm", {1: {"all_senders": listed}})
    assert "misstates neighbour 4" in r.sites.refused[1][1]


def _split_attack(
    r: Round, sent_side: list[int], dropped_side: list[int], colluders: list[int]
) -> tuple[Any, S.ServerSession, list[bytes], list[bytes]]:
    """A lying server against site 0 (every site sent its vector): it lists site 0 as a sender
    to ``sent_side`` and leaves it off the list it shows ``dropped_side``; the colluders sign
    both lists and hand over both of their shares of site 0's secrets. Returns the batch,
    the server's session and the shares of site 0's self-mask seed and mask-key seed the
    server ends with."""
    batch, session, vectors = _sealed(r)
    session.on_masked(vectors)  # the server's bookkeeping; the lie follows
    got: dict[bool, list[bytes]] = {True: [], False: []}
    for side, sent in ((sent_side, True), (dropped_side, False)):
        members = sorted({*side, *colluders, *([0] if sent else [])})
        (listed,) = _lists(session, members)
        honest = [i for i in members if i not in colluders]
        sigs = r.sites(1, "confirm", {i: {"all_senders": listed} for i in honest})
        msg = S._senders_message(1, listed)
        sigs |= {c: r.sites._identity[c].sign(msg) for c in colluders}
        answers = r.sites(1, "unmask", _unmask_requests(session, listed, sigs, honest))
        got[sent] += [a[0] for a in answers.values() if 0 in a]
    col = [r.sites.sessions[c] for c in colluders]
    self_shares = got[True] + [c._self_shares[0] for c in col]
    mask_shares = got[False] + [c._mask_shares[0] for c in col]
    return batch, session, self_shares, mask_shares


def _read_site_0(r: Round, batch: Any, session: S.ServerSession, self_shares: list[bytes],
                 mask_shares: list[bytes]) -> np.ndarray:  # fmt: skip
    """With both of site 0's seeds, strip every mask off its vector: its update."""
    self_seed, mask_seed = S._combine(self_shares), S._combine(mask_shares)
    assert S._commit(self_seed, 1, 0) == session.commits[0]
    sk = S._mask_private_key(mask_seed)
    assert S._public_bytes(sk) == session.keys[0][0]
    m = r.params.modulus
    rest = (batch.sealed[0] - S._prg(S._hkdf(self_seed, b"self mask" + S._ids(1, 0)), P + 1, m)
            ) & np.uint64(m - 1)  # fmt: skip
    for j in sorted(session.graph[0] - {0}):
        rest = (rest + S._prg(S._agree(sk, session.keys[j][0], b"mask" + S._ids(1, 0, j)),
                              P + 1, m)) & np.uint64(m - 1)  # fmt: skip
    guess, w = S.dequantize_sum(rest, 1, r.params)
    return guess / w  # type: ignore[no-any-return]


def test_a_lying_server_cannot_collect_both_secrets_of_a_site() -> None:
    """The server tells half of site 0's neighbours that it sent its vector and the other half
    that it dropped out. Each honest site signs one list and unmasks only a list every site on
    it signed, longer than the minimum: the server gets fewer than ``threshold`` shares of at
    least one secret."""
    r = Round(7)
    _, session, self_shares, mask_shares = _split_attack(r, [1, 2, 3], [4, 5, 6], [])
    assert len(self_shares) < session.t or len(mask_shares) < session.t
    assert r.sites.refused[1]


@pytest.mark.parametrize(("n", "colluders", "declared"), [(7, [1], None), (7, [1, 2], 2)])
def test_colluding_neighbours_do_not_let_a_lying_server_read_a_site(
    n: int, colluders: list[int], declared: int | None
) -> None:
    """One colluding neighbour (default ``c = threshold - 1``), and ``c`` declared colluders,
    sign both of the server's contradictory lists and hand over both of their shares of site
    0's secrets. Every way of splitting the honest sites between the two lists leaves one list
    short of the minimum (refused when it is shown) or unsigned by some site on it (refused
    when the server asks to unmask): the server rebuilds at most one of site 0's seeds."""
    honest = [i for i in range(1, n) if i not in colluders]
    for size in range(len(honest) + 1):
        for sent in itertools.combinations(honest, size):
            r = Round(n, colluding=declared)
            rest = [i for i in honest if i not in sent]
            _, session, self_shares, mask_shares = _split_attack(r, list(sent), rest, colluders)
            assert session.k == n and len(colluders) < session.t
            assert len(self_shares) < session.t or len(mask_shares) < session.t, sent


def test_colluders_beyond_the_declared_count_break_the_check() -> None:
    """Positive control for the test above, and the check's assumption: declare no colluder
    (``secagg_colluding_sites = 0``) while one neighbour colludes, and the minimum (4 of 7)
    leaves room for two lists signed by disjoint halves: the server collects ``t`` shares of
    both of site 0's seeds and reads its update."""
    r = Round(7, colluding=0)
    batch, session, self_shares, mask_shares = _split_attack(r, [2, 3], [4, 5, 6], [1])
    assert (session.k, session.t) == (7, 4)
    assert len(self_shares) == len(mask_shares) == session.t
    update = _read_site_0(r, batch, session, self_shares, mask_shares)
    assert np.abs(update - r.updates[0]).max() < 1e-5


def test_two_lists_below_the_minimum_unmask_nothing() -> None:
    """The server shows each half of the sites a list of that half only (both under the
    minimum), then lists padded with the other half: the short lists are refused when shown,
    the padded ones lack the other half's signatures; no site hands over a single share."""
    n = 8
    r = Round(n)
    _, session, vectors = _sealed(r)
    session.on_masked(vectors)
    need = r.params.senders_needed(n)
    halves = [list(range(4)), list(range(4, 8))]
    assert need > 4
    for half, listed in zip(halves, _lists(session, *halves), strict=True):
        assert not r.sites(1, "confirm", {i: {"all_senders": listed} for i in half})
    refused = r.sites.refused[1]
    assert set(refused) == set(range(n))
    assert all(f"needs at least {need} senders" in e for e in refused.values())
    # lists padded with two sites of the other half: each half signs its own (long enough),
    # but the padding sites signed the other list and sign nothing more
    r = Round(n)
    _, session, vectors = _sealed(r)
    session.on_masked(vectors)
    padded = [halves[0] + [4, 5], halves[1] + [0, 1]]
    lists = _lists(session, *padded)
    sigs = [r.sites(1, "confirm", {i: {"all_senders": listed} for i in half})
            for half, listed in zip(halves, lists, strict=True)]  # fmt: skip
    assert [set(x) for x in sigs] == [set(h) for h in halves]
    answers: dict[int, Any] = {}
    for half, listed, got in zip(halves, lists, sigs, strict=True):
        pad = [i for i, _ in listed if i not in half]
        assert not r.sites(1, "confirm", {i: {"all_senders": listed} for i in pad})
        answers |= r.sites(1, "unmask", _unmask_requests(session, listed, got, half))
    assert not answers
    refused = r.sites.refused[1]
    assert all("did not sign" in e or "out of order" in e for e in refused.values())
    assert sum("did not sign" in e for e in refused.values()) >= 4


def test_thresholds_at_most_half_are_refused() -> None:
    site = S.SiteSession(0, 1, _params())
    with pytest.raises(UsageError, match="must exceed half"):
        site.setup(rnd=1, share_count=6, threshold=3)


def test_a_site_refuses_keys_the_server_swapped() -> None:
    a, b = S.SiteSession(0, 1, _params()), S.SiteSession(1, 1, _params())
    ka, kb = a.setup(rnd=1, share_count=2, threshold=2), b.setup(rnd=1, share_count=2,
                                                               threshold=2)  # fmt: skip
    with pytest.raises(UsageError, match="other keys under its name"):
        a.share_keys({0: (kb[0], kb[1]), 1: (ka[0], ka[1])})


def test_shares_for_another_site_do_not_decrypt() -> None:
    r = Round(4)
    session = r.server.open(1, [0, 1, 2, 3])
    r.sites.open(1, [0, 1, 2, 3])
    keys = r.sites(1, "setup", session.setup_requests())
    cts = r.sites(1, "share_keys", session.on_keys(keys))
    # the server forwards site 1's ciphertext for site 2 to site 3 (as if from site 1)
    with pytest.raises(UsageError, match="do not decrypt"):
        r.sites.sessions[3].receive({1: cts[1][2], 0: cts[0][3], 2: cts[2][3]})


# --------------------------------------------------------------------------------------------
# Dropouts
# --------------------------------------------------------------------------------------------


def test_sites_that_vanish_after_the_key_exchange_are_recovered() -> None:
    r = Round(12, late=2, drop={"masked_vector": {3}})  # 2 stragglers + 1 drop after keys
    out = r.run()
    assert out.skipped is None
    senders = [i for i in range(10) if i != 3]
    assert out.info["secagg_recovered"] == 3 and out.info["secagg_senders"] == 9
    step = 2 * CLIP / r.params.quantization_range
    assert np.abs(out.update - r.expected(senders)).max() < 2 * 12 * step


def test_sites_that_vanish_before_sharing_keys_are_left_out() -> None:
    r = Round(12, drop={"share_keys": {4, 7}})
    out = r.run()
    assert out.skipped is None and out.info["secagg_senders"] == 10
    senders = [i for i in range(12) if i not in (4, 7)]
    assert np.abs(out.update - r.expected(senders)).max() < 1e-4


def test_sites_that_vanish_during_unmasking_are_tolerated_up_to_the_threshold() -> None:
    r = Round(9, share_count=9, threshold=5, drop={"unmask": {0, 1, 2}})
    out = r.run()
    assert out.skipped is None  # 6 of 9 share holders answered, 5 needed
    assert np.abs(out.update - r.expected(list(range(9)))).max() < 1e-4


@pytest.mark.parametrize(
    ("drop", "reason"),
    [
        ({"unmask": {0, 1, 2, 3, 4}}, "secagg_too_few_shares"),
        ({"masked_vector": {0, 1, 2, 3, 4}}, "secagg_too_few_sites"),
        ({"share_keys": set(range(1, 9))}, "secagg_too_few_sites"),
        ({"setup": set(range(5))}, "secagg_too_few_sites"),
    ],
)
def test_beyond_the_threshold_the_round_is_skipped_never_a_wrong_sum(
    drop: dict[str, set[int]], reason: str
) -> None:
    r = Round(9, share_count=9, threshold=5, drop=drop)
    out = r.run()
    assert out.update is None and out.skipped == reason and out.info["detail"]


def test_a_wrong_share_is_worked_around_or_the_round_skipped() -> None:
    r = Round(7, share_count=7, threshold=4)
    real = r.sites.__call__

    def tamper(rnd: int, step: str, requests: Any) -> dict[int, Any]:
        out = real(rnd, step, requests)
        if step == "unmask":
            out[1] = {k: v[:4] + bytes(16) for k, v in out[1].items()}  # site 1 lies
        return out

    r.combine.exchange = tamper
    out = r.run()
    assert out.skipped is None  # other subsets of 4 shares rebuild every committed seed
    assert np.abs(out.update - r.expected(list(range(7)))).max() < 1e-4

    r2 = Round(7, share_count=7, threshold=4)
    real2 = r2.sites.__call__

    def tamper_all(rnd: int, step: str, requests: Any) -> dict[int, Any]:
        out = real2(rnd, step, requests)
        if step == "unmask":
            for i in list(out)[:4]:
                out[i] = {k: v[:4] + bytes(16) for k, v in out[i].items()}
        return out

    r2.combine.exchange = tamper_all
    out2 = r2.run()
    assert out2.update is None and out2.skipped == "secagg_bad_shares"


@pytest.mark.parametrize("count", [15, 17])
def test_shamir_shares_rebuild_only_from_the_threshold(count: int) -> None:
    """Both sharings (SLIP-0039 up to 16 shares, PyCryptodome above): any ``t`` shares rebuild
    the seed; ``t - 1`` shares, a wrong share or shares of the two schemes mixed do not."""
    t = count // 2 + 1
    seed = bytes(range(16))
    shares = S._split(seed, t, count)
    tagged = {struct.unpack("<I", sh[:4])[0] >> 24 for sh in shares}
    assert tagged == ({1} if count <= 16 else {0})
    assert len(shares) == count and all(len(sh) == S._SHARE_BYTES for sh in shares)
    assert S._combine(shares[:t]) == seed and S._combine(shares[-t:]) == seed
    # t - 1 shares are consistent with every secret: read as a (t - 1)-threshold sharing they
    # give some other value, never the seed (or, for SLIP-0039, fail its digest)
    with contextlib.suppress(ValueError):
        assert S._combine(shares[: t - 1]) != seed
    wrong = shares[:t]
    wrong[0] = wrong[0][:4] + bytes(16)
    if count <= 16:
        with pytest.raises(ValueError):  # the digest share catches it
            S._combine(wrong)
    else:
        assert S._combine(wrong) != seed  # caught by the seed's commitment (test above)
    other = S._split(seed, t, 17 if count <= 16 else 15)
    with pytest.raises(ValueError):
        S._combine(shares[: t - 1] + other[:1])


def test_failure_bounds_match_the_ring_the_server_draws() -> None:
    """The binomial model behind failure_bounds is the graph the server really draws: over
    many random rings, how often one site has ``t`` colluding neighbours matches it, and the
    union bound covers how often any site has."""
    n, k, t, rate = 30, 7, 4, 0.25
    rng = np.random.default_rng(0)
    trials, one, anyone = 3000, 0, 0
    for _ in range(trials):
        g = S._ring(list(range(n)), k)
        bad = set(np.flatnonzero(rng.random(n) < rate).tolist())
        hit = [len((g[i] - {i}) & bad) >= t for i in range(n)]
        one += hit[0]
        anyone += any(hit)
    p_one = S._tail(k - 1, rate, t)
    assert abs(one / trials - p_one) < 4 * np.sqrt(p_one / trials)
    assert anyone / trials <= S.failure_bounds(n, k, t, corrupt=rate, dropout=0.0)["privacy"]
    # the default share count at 100 sites is far from the paper's 2**-40 at 5% collusion, and
    # the smallest count that meets it is what the docs say
    assert S.failure_bounds(100, 15, 8, corrupt=0.05, dropout=0.05)["privacy"] > 2**-20
    assert S.sound_share_count(100, corrupt=0.05, dropout=0.05) == 35
    b = S.failure_bounds(100, 35, 18, corrupt=0.05, dropout=0.05)
    assert b["privacy"] <= 2**-40 and b["skipped"] <= 2**-30


def test_a_round_beyond_sixteen_shares_falls_back_to_pycryptodome() -> None:
    r = Round(18, share_count=17, drop={"masked_vector": {5}})
    out = r.run()
    assert out.skipped is None
    senders = [i for i in range(18) if i != 5]
    step = 2 * CLIP / r.params.quantization_range
    assert np.abs(out.update - r.expected(senders)).max() < 2 * 18 * step
    shares = [p for s, _, p in r.server.sessions[1].received if s == "unmask"]
    assert all(struct.unpack("<I", v[:4])[0] >> 24 == 0 for p in shares for v in p.values())


def test_a_site_that_does_not_clip_makes_the_round_skip() -> None:
    r = Round(6)
    batch = SiteUpdates(1, r.ids, torch.zeros(1), r.updates.copy(), r.weights,
                        np.zeros(6, dtype=bool))  # fmt: skip
    r.seal.apply(batch)
    y = batch.sealed[2].copy()  # type: ignore[index]
    y[1:] = (y[1:] + np.uint64(r.params.quantization_range)) & np.uint64(r.params.modulus - 1)
    batch.sealed[2] = y  # type: ignore[index]
    got = Received(r.ids, batch.updates, r.weights, batch.malicious, sealed=batch.sealed)
    out = r.combine(None, got, 1)  # type: ignore[arg-type]
    assert out.update is None and out.skipped == "secagg_sum_out_of_bounds"


def test_malformed_masked_vectors_are_rejected_and_recovered() -> None:
    r = Round(6)
    batch = SiteUpdates(1, r.ids, torch.zeros(1), r.updates.copy(), r.weights,
                        np.zeros(6, dtype=bool))  # fmt: skip
    r.seal.apply(batch)
    batch.sealed[4] = batch.sealed[4][:-1]  # type: ignore[index]
    got = Received(r.ids, batch.updates, r.weights, batch.malicious, sealed=batch.sealed)
    out = r.combine(None, got, 1)  # type: ignore[arg-type]
    assert out.skipped is None and out.rejected == [(4, "shape")]
    assert np.abs(out.update - r.expected([0, 1, 2, 3, 5])).max() < 1e-4


# --------------------------------------------------------------------------------------------
# Config and the command line
# --------------------------------------------------------------------------------------------


def _cfg(**training: Any) -> Config:
    raw = tomllib.loads(DEMO.read_text())
    raw.pop("inference", None)
    raw["training"] |= {"max_update_norm": 1.0, "secure_aggregation": "secagg+", **training}
    return parse_config(raw)


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"secagg_share_count": 4}, "secagg_share_count must be odd"),
        ({"secagg_share_count": 5, "secagg_threshold": 2}, "must be > secagg_share_count / 2"),
        ({"secagg_modulus": 3000}, "power of two"),
        ({"secagg_quantization_range": 1 << 32}, "must be below secagg_modulus"),
        ({"secagg_quantization_range": 1 << 31}, "wraps around secagg_modulus"),
        ({"secagg_threshold": 4}, "exceeds the 3 shares"),
        ({"key_holder": "hospital_a"}, "SecAgg+ has no key holder"),
        ({"secure_aggregation": "none", "secagg_threshold": 2}, "apply to secure_aggregation"),
        ({"max_update_norm": None}, "needs max_update_norm"),
        ({"aggregator": "median"}, "only the masked sum"),
        ({"engine": "flower", "secagg_modulus": 1 << 40}, "overflows above 2**32"),
        ({"secagg_colluding_sites": 2}, "reaches the threshold 2"),
        ({"secagg_min_senders": 2}, "a lying server could get two disjoint lists"),
        ({"secagg_min_senders": 4}, "exceeds the 3 sites"),
        ({"engine": "flower", "secagg_colluding_sites": 0}, "has no consistency check"),
        ({"secure_aggregation": "none", "secagg_min_senders": 3}, "apply to secure_aggregation"),
    ],
)
def test_bad_settings_are_config_errors(training: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _cfg(**training)
    assert message in " ".join(str(exc.value).split())


def test_adaptive_clipping_with_secagg_is_refused_by_the_table() -> None:
    raw = tomllib.loads(DEMO.read_text())
    raw["training"] |= {"max_update_norm": 1.0, "secure_aggregation": "secagg+"}
    raw["privacy"] = {"mode": "client", "epsilon": 1.0, "adaptive_clip": True}
    with pytest.raises(ConfigError, match="masked sum does not carry"):
        parse_config(raw)


@pytest.mark.slow
def test_demo_with_secagg_runs_through_privml_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (
        DEMO.read_text()
        .replace(
            "[training]\n", '[training]\nsecure_aggregation = "secagg+"\nmax_update_norm = 100.0\n'
        )
        .replace("encrypted = true", "encrypted = false")
    )
    cfg = tmp_path / "demo_secagg.toml"
    cfg.write_text(text)
    out_dir = tmp_path / "run"
    code = main(["run", "--config", str(cfg), "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert not code, err
    res = json.loads((out_dir / "results.json").read_text())
    info = res["federation"]["secure_aggregation"]
    assert info["scheme"] == "secagg+" and info["key_holder"] is None
    assert len(info["per_round"]) == 20 and all(r["senders"] == 3 for r in info["per_round"])
    assert res["metrics"]["accuracy"] >= 0.95
