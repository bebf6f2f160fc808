"""Distributed DP under SecAgg+ (privml.dp.distributed, privml.fl.stages.distributed): each site
adds its discrete Gaussian share before masking; the server only ever unmasks a noised sum of
at least ``m`` senders.

The adversary tests play the server: they keep every message it receives, unmask the sum the
way the protocol lets it, and try to get a less noisy sum (by regenerating the sites' noise
from the run's seed, by dropping sites below ``m``, by skipping or lying in the consistency
check that guards ``m``).
"""

from __future__ import annotations

import json
import math
import tomllib
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting.dp_event import SelfComposedDpEvent, ZCDpEvent
from dp_accounting.rdp import RdpAccountant

from privml.cli import main
from privml.config import parse_config
from privml.dp import distributed as D
from privml.dp.randomness import NoiseSource
from privml.errors import ConfigError
from privml.fl import secagg as S
from privml.fl.rounds import Received, SiteUpdates
from privml.fl.stages.distributed import DiscreteGaussianShare, StreamUniforms
from privml.fl.stages.masking import MaskedSum, MaskingServer, SealMasked, SimulatedSites

DEMO = Path(__file__).resolve().parents[2] / "src/privml/data/demo/demo.toml"
CLIP = 1.0
P = 40


def _plan(n: int = 20, t: int = 11, steps: int = 10, **kw: Any) -> D.DistributedPlan:
    """A plan for ``n`` sites with ``m = t``."""
    args: dict[str, Any] = dict(
        epsilon=1.0, noise_multiplier=None, delta=1e-5, clip=CLIP, clipping_range=CLIP,
        quantization_range=1 << 16, dim=P, steps=steps, min_senders=t, max_senders=n,
        modulus=None,
    )  # fmt: skip
    return D.plan_distributed(**{**args, **kw})


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def test_epsilon_is_that_of_m_shares_recomputed_with_dp_accounting() -> None:
    plan = _plan(n=20, t=11, steps=10)
    sigma = plan.sigma(11)
    # the rounded norm bound of Kairouz et al. 2021 (conditional randomized rounding)
    r = CLIP * plan.scale
    b = math.sqrt(r**2 + P / 4 + math.sqrt(2 * math.log(1 / D.BETA)) * (r + math.sqrt(P) / 2))
    assert plan.rounded_norm == pytest.approx(b) and plan.sensitivity == pytest.approx(2 * b)
    # 11 shares of N_Z(0, sigma^2): rho = (D2 / (sqrt(11) sigma))^2 / 2 (tau ~ 0 at this scale)
    rho = 0.5 * (plan.sensitivity / (math.sqrt(11) * sigma)) ** 2
    assert plan.rho_round == pytest.approx(rho, rel=1e-9)
    acc = RdpAccountant()
    acc.compose(SelfComposedDpEvent(ZCDpEvent(rho), 10))
    eps = acc.get_epsilon(1e-5)
    assert 0.99 <= eps <= 1.0 + 1e-6 and plan.epsilon == pytest.approx(eps, rel=2e-3)
    # the worst case is m: with one share fewer the same noise would not cover it
    fewer = 0.5 * (plan.sensitivity / (math.sqrt(10) * sigma)) ** 2
    assert D.zcdp_epsilon(10 * fewer, 1e-5) > 1.02
    assert plan.epsilon_with(10) == pytest.approx(D.zcdp_epsilon(10 * fewer, 1e-5), rel=1e-6)
    # more senders only add noise: the sum of 20 shares is the sum of 11 plus independent noise
    assert D.round_rho(sigma, 20, plan.sensitivity, P) < plan.rho_round
    # c colluding sites know their shares: the noise is that of m - c shares, each site adds
    # 1 / (m - c) of it, and a further colluder costs what the report says
    col = _plan(n=20, t=11, steps=10, colluding=3)
    assert col.honest_shares == 8 and col.site_sigma == pytest.approx(
        D.site_sigma(plan.rho_round, 8, plan.sensitivity, P))  # fmt: skip
    assert col.epsilon == pytest.approx(plan.epsilon, rel=1e-6)
    eps = col.colluding_epsilons()
    assert eps[3] == pytest.approx(col.epsilon, rel=1e-6) and eps[4] > 1.05 > eps[3]
    for bad in ({"colluding": 11}, {"t": 21}, {"t": 1}):
        with pytest.raises(ConfigError, match="distributed_"):
            _plan(**bad)


def test_the_rounding_bound_holds_for_every_rounded_update() -> None:
    plan = _plan()
    params = S.SecAggParams(None, None, CLIP, 1 << 16, plan.modulus, 1.0, P)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, P))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)  # every update at the clip
    u = rng.random((200, P))
    q = S.quantize_rows(rows, np.ones(200), params, u)
    norms = np.linalg.norm(q[:, 1:].astype(float) - (1 << 16) / 2, axis=1)
    # unconditional rounding exceeds the clip's norm; the bound leaves room for it
    assert norms.max() > CLIP * plan.scale and (norms <= plan.rounded_norm).mean() > 0.3


def test_the_modulus_keeps_the_noised_sum_from_wrapping_or_the_config_is_refused() -> None:
    plan = _plan(n=200, t=101, steps=50, quantization_range=1 << 24)
    assert plan.wrap_probability <= D.WRAP_PROBABILITY
    assert plan.modulus >= 200 * (1 << 24)
    with pytest.raises(ConfigError, match="secagg_modulus"):
        _plan(n=200, t=101, steps=50, quantization_range=1 << 24, modulus=1 << 32)


def test_noise_multiplier_above_target_and_bad_clipping_range_are_config_errors(
    tmp_path: Path,
) -> None:
    raw = _raw(tmp_path, privacy={"noise_multiplier": 0.5}, training={})
    with pytest.raises(ConfigError, match="above the target"):
        _run_config(raw)
    raw = _raw(tmp_path, training={"secagg_clipping_range": 0.5})
    with pytest.raises(ConfigError, match="secagg_clipping_range"):
        _run_config(raw)
    # the demo has 3 sites: m = 4 can never be met, c = 3 leaves no honest share
    for bad in ({"distributed_min_senders": 4}, {"distributed_colluding_sites": 3}):
        with pytest.raises(ConfigError, match="privacy.distributed_"):
            _run_config(_raw(tmp_path, privacy=bad))


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


def _keyed(i: int = 0) -> NoiseSource:
    """The secure keystream under a fixed key: a statistical check on it has one outcome
    (on NoiseSource.fresh() the checks below failed a correct sampler about once in 3,000
    runs: frequencies at 4.3 sd, variances at 3.7 sd)."""
    return NoiseSource(bytes(range(i, i + 32)), secure=True)


def test_discrete_gaussian_draws_follow_the_distribution() -> None:
    src = _keyed()
    sigma = 1.5
    x = D.discrete_gaussian_rows([src.stream("t", i) for i in range(4)], sigma, 25_000).ravel()
    ys = np.arange(-12, 13)
    pmf = np.exp(-(ys**2) / (2 * sigma**2))
    pmf /= pmf.sum()
    freq = np.array([(x == y).mean() for y in ys])
    assert np.abs(freq - pmf).max() < 0.006  # 100,000 draws: sd of a frequency <= 0.0016
    big = D.discrete_gaussian_rows([src.stream("u", 0)], 3e6, 50_000)[0]
    assert big.std() == pytest.approx(3e6, rel=0.02) and abs(big.mean()) < 3e6 * 0.02


def test_each_site_draws_its_own_noise_from_the_secure_source() -> None:
    src = NoiseSource.fresh()
    a = D.discrete_gaussian_rows([src.stream("ddg-share", 1, 0), src.stream("ddg-share", 1, 1)],
                                 50.0, 100)  # fmt: skip
    assert not np.array_equal(a[0], a[1])
    again = D.discrete_gaussian_rows([src.stream("ddg-share", 1, 0)], 50.0, 100)
    assert np.array_equal(a[0], again[0])  # one stream per (round, site): a site's share
    other = NoiseSource.fresh()  # another run: different keys, different noise
    assert not np.array_equal(a[0], D.discrete_gaussian_rows(
        [other.stream("ddg-share", 1, 0)], 50.0, 100)[0])  # fmt: skip


# --------------------------------------------------------------------------------------------
# The server as adversary
# --------------------------------------------------------------------------------------------


class DPRound:
    """SecAgg+ rounds of ``n`` sites (dense graph unless ``k`` says otherwise) with distributed
    DP's seal and combine stages; the sites refuse a sum of fewer than ``plan.min_senders``.
    ``server_m``: the minimum the *server's* copy of the parameters holds (a server that
    ignores it)."""

    def __init__(self, n: int, plan: D.DistributedPlan, noise: NoiseSource,
                 drop: dict[str, set[int]] | None = None, dim: int = P,
                 server_m: int | None = None, **kw: Any) -> None:  # fmt: skip
        self.params = S.SecAggParams(kw.get("k"), kw.get("t"), CLIP, plan.quantization_range,
                                     plan.modulus, 1.0, dim, plan.min_senders,
                                     plan.colluding)  # fmt: skip
        sp = self.params if server_m is None else replace(self.params, min_senders=server_m)
        self.server = MaskingServer(sp, record=True)
        self.sites = SimulatedSites(self.params, drop=dict(drop or {}))
        self.share = DiscreteGaussianShare(plan, noise)
        self.seal = SealMasked(sp, self.server, self.sites, CLIP, StreamUniforms(noise),
                               weighted=False, noise=self.share,
                               rounding_bound=plan.rounded_norm)  # fmt: skip
        self.combine = MaskedSum(sp, self.server, self.sites, CLIP, weighted=False,
                                 denominator=1.0, centered=True)  # fmt: skip
        rng = np.random.default_rng(n)
        self.ids = np.arange(n, dtype=np.int64)
        u = rng.normal(0, 1, (n, dim))
        self.updates = u / np.linalg.norm(u, axis=1, keepdims=True) * 0.8

    def seal_round(self, rnd: int) -> Received:
        batch = SiteUpdates(rnd, self.ids, torch.zeros(1), self.updates.copy(), np.ones(len(
            self.ids)), np.zeros(len(self.ids), dtype=bool))  # fmt: skip
        self.seal.apply(batch)
        return Received(self.ids, batch.updates, batch.weights, batch.malicious,
                        sealed=batch.sealed)  # fmt: skip

    def run(self, rnd: int) -> Any:
        return self.combine(None, self.seal_round(rnd), rnd)  # type: ignore[arg-type]

    def masked(self, rnd: int) -> tuple[S.ServerSession, dict[int, Any]]:
        """A round up to the server's masked sum: the session and the confirm requests."""
        got = self.seal_round(rnd)
        session = self.server.sessions[rnd]
        vectors = {int(i): v for i, v in zip(got.ids, got.sealed or [], strict=True)
                   if v is not None}  # fmt: skip
        return session, session.on_masked(vectors)


def _residual_var(r: DPRound, senders: list[int], rounds: range) -> tuple[float, int]:
    resid = []
    for rnd in rounds:
        out = r.run(rnd)
        assert out.skipped is None and out.info["secagg_senders"] == len(senders)
        resid.append(out.update - r.updates[senders].sum(axis=0))
    x = np.concatenate(resid)
    return float(x.var()), len(x)


def test_the_sum_the_server_unmasks_carries_at_least_the_booked_noise() -> None:
    """Every site adds 1/m of the booked variance; with m of the n sites sending (the others
    vanished after the key exchange) the released sum carries exactly the booked noise, with
    all n it carries n/m of it; the variance is tested one-sided against the booking."""
    n, m, dim = 10, 7, 400
    plan = _plan(n=n, t=m, steps=30, dim=dim)
    booked = plan.sum_std() ** 2  # m shares of sigma^2, in real units
    drop = {"masked_vector": {0, 1, 2}}
    r = DPRound(n, plan, _keyed(1), drop=drop, dim=dim, k=n, t=6)
    var, k = _residual_var(r, list(range(3, n)), range(1, 7))
    # 2,400 draws: the sample variance's sd is sqrt(2/2400) = 2.9%; 4 sd below the booking
    # would be 0.885 of it
    assert var >= booked * (1 - 4 * math.sqrt(2 / k)) and var == pytest.approx(booked, rel=0.15)
    session = r.server.sessions[6]
    assert {step for step, _, _ in session.received} == {
        "setup", "share_keys", "masked_vector", "confirm", "unmask"}  # fmt: skip
    full = DPRound(n, plan, _keyed(2), dim=dim, k=n, t=6)
    var_all, k = _residual_var(full, list(range(n)), range(1, 4))
    assert var_all == pytest.approx(booked * n / m, rel=0.15)


def test_fewer_senders_than_m_release_no_sum() -> None:
    """SecAgg+ alone would unmask 6 senders (threshold 6); distributed DP needs m = 7: the
    round is skipped, no unmask request goes out, and what the server holds is masked."""
    n, m = 10, 7
    plan = _plan(n=n, t=m, steps=5)
    r = DPRound(n, plan, NoiseSource.fresh(), drop={"masked_vector": {0, 1, 2, 3}}, k=n, t=6)
    out = r.run(1)
    assert out.skipped == "dp_too_few_senders" and "at least 7" in out.info["detail"]
    session = r.server.sessions[1]
    steps = [step for step, _, _ in session.received]
    assert "confirm" not in steps and "unmask" not in steps
    # the server's only material: masked vectors; their sum decodes to noise the size of the
    # modulus, nowhere near the true sum (which needs the self masks it never got)
    vecs = [v for step, _, v in session.received if step == "masked_vector"]
    total = np.zeros(P + 1, dtype=np.uint64)
    for v in vecs:
        total = (total + v) & np.uint64(plan.modulus - 1)
    guess, _ = S.dequantize_sum(total, len(vecs), r.params, centered=True)
    err = np.abs(guess - r.updates[4:].sum(axis=0))
    assert np.median(err) > 1e3 * plan.sum_std()


def test_a_server_that_skips_the_check_gets_no_shares() -> None:
    """A server whose own copy of the parameters has no minimum shows the sites the short
    list of senders: they refuse to sign it, the round is skipped. One that skips the check
    and sends the unmask request straight away: every site refuses, nothing is unmasked."""
    n, m = 8, 6
    plan = _plan(n=n, t=m, steps=5)
    r = DPRound(n, plan, NoiseSource.fresh(), drop={"masked_vector": {0, 1, 2}}, server_m=0,
                k=n, t=5)  # fmt: skip
    out = r.run(1)
    assert out.skipped == "secagg_senders_unconfirmed"
    refused = r.sites.refused[1]
    assert set(refused) == set(range(3, n))
    assert all("needs at least 6 noise shares" in e for e in refused.values())
    session, _ = r.masked(2)
    r.sites.refused.clear()
    assert not r.sites(2, "unmask", session._unmask_requests({}))
    refused = r.sites.refused[2]
    assert set(refused) == set(range(3, n))
    assert all("before the list of senders was confirmed" in e for e in refused.values())


def _answers(r: DPRound, rnd: int, step: str, requests: dict[int, Any]) -> dict[int, Any]:
    r.sites.refused.pop(rnd, None)
    return r.sites(rnd, step, requests)


def test_a_server_that_lies_about_the_senders_cannot_get_the_sum_released() -> None:
    """Seven of ten sites sent (m = 8). The server tries to pass the list off as longer: with
    made-up sites, with a site that vanished (its signature forged, or replayed from an earlier
    round), or with a different list to each site. Honest sites sign only a list that names
    them with this round's key and registered sites only, and unmask only the list they signed,
    signed by every site on it: no lie gets a single share of a self-mask seed out."""
    n, m = 10, 8
    plan = _plan(n=n, t=m, steps=5)
    r = DPRound(n, plan, NoiseSource.fresh(), k=n, t=6)
    assert r.run(1).skipped is None  # round 1: everyone sends; the server keeps the signatures
    old = {i: sig for step, i, sig in r.server.sessions[1].received if step == "confirm"}
    r.sites.drop = {"masked_vector": {0, 1, 2}}
    r.params = replace(r.params, min_senders=0)  # the lying server's own rules: none
    r.server.params = r.seal.params = r.params
    for rnd, how in ((2, "fake"), (3, "forged"), (4, "replayed")):
        session, _ = r.masked(rnd)
        senders = session.senders
        assert senders == list(range(3, n))
        listed = [(i, session.keys[i][0]) for i in senders]
        gone = [(j, session.keys[j][0]) for j in (0, 1, 2)]
        if how == "fake":  # 1. made-up sites pad the list: refused at the confirmation
            fake = listed + [(100, bytes(32)), (101, bytes(range(32)))]
            assert not _answers(r, rnd, "confirm", {i: {"all_senders": fake} for i in senders})
            assert all("unknown site" in e for e in r.sites.refused[rnd].values())
            continue
        # 2. vanished sites listed as senders (with their true keys): the sites sign, but the
        # vanished ones cannot; a forged or replayed signature does not verify
        padded = listed + gone
        sigs = _answers(r, rnd, "confirm", {i: {"all_senders": padded} for i in senders})
        assert set(sigs) == set(senders)
        forged = {j: bytes(64) if how == "forged" else old[j] for j, _ in gone}
        req = {
            i: {
                "senders": sorted({*senders, 0, 1, 2}),
                "dropped": [],
                "all_senders": padded,
                "signatures": {**sigs, **forged},
            }
            for i in senders
        }
        assert not _answers(r, rnd, "unmask", req)
        assert all("did not sign" in e for e in r.sites.refused[rnd].values())
    # 3. the true list (too short) to one site, the padded one to the others: the site with
    # the short list refuses to sign it; the others' list still lacks the vanished sites'
    # signatures, so nobody unmasks
    r2 = DPRound(n, plan, NoiseSource.fresh(), drop={"masked_vector": {0, 1, 2}}, k=n, t=6,
                 server_m=0)  # fmt: skip
    s2, _ = r2.masked(3)
    l2 = [(i, s2.keys[i][0]) for i in s2.senders]
    g2 = [(j, s2.keys[j][0]) for j in (0, 1, 2)]
    reqs = {i: {"all_senders": l2 if i == 3 else l2 + g2} for i in s2.senders}
    sigs2 = _answers(r2, 3, "confirm", reqs)
    assert 3 not in sigs2 and "needs at least 8" in r2.sites.refused[3][3]
    # 4. an unmask request for a list other than the one signed, or omitting the site
    req = {i: {"senders": s2.senders, "dropped": [0, 1, 2], "all_senders": l2,
               "signatures": sigs2} for i in s2.senders if i != 3}  # fmt: skip
    assert not _answers(r2, 3, "unmask", req)
    assert all("differs from the one it confirmed" in e for e in r2.sites.refused[3].values())


def test_regenerating_the_noise_from_the_seed_does_not_denoise_the_sum() -> None:
    """A server that knows the run's seed regenerates each site's share with the reproducible
    source and subtracts it: under the secure source the residual keeps its full variance."""
    n, m, dim = 8, 6, 400
    plan = _plan(n=n, t=m, steps=20, dim=dim)
    secure = NoiseSource.fresh()
    r = DPRound(n, plan, secure, dim=dim, k=n, t=5)
    guess_src = NoiseSource.reproducible(0)
    resid = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(1, 4):
            out = r.run(rnd)
            guess = D.discrete_gaussian_rows(
                [guess_src.stream("ddg-share", rnd, i) for i in range(n)], plan.site_sigma, dim
            )
            denoised = out.update - guess.sum(axis=0) / plan.scale
            resid.append(denoised - r.updates.sum(axis=0))
    resid = np.concatenate(resid)
    expected = n * plan.site_sigma**2 / plan.scale**2
    assert resid.var() > 1.5 * expected  # the guess adds its own noise; nothing cancels


def test_decoding_is_exact_for_sums_pushed_below_zero_by_noise() -> None:
    p = S.SecAggParams(None, None, 1.0, 1 << 10, 1 << 20, 1.0, 3)
    n = 4
    ints = np.array([-5000, 0, 4 * (1 << 10) + 7000])  # below 0 and above n T
    total = np.concatenate([[4 << 10], ints % p.modulus]).astype(np.uint64)
    values, w = S.dequantize_sum(total, n, p, centered=True)
    assert w == 4.0
    assert np.allclose(values, ints * (2.0 / (1 << 10)) - n)


# --------------------------------------------------------------------------------------------
# privml run
# --------------------------------------------------------------------------------------------


def _raw(tmp_path: Path, *, privacy: dict[str, Any] | None = None,
         training: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    raw = tomllib.loads(DEMO.read_text())
    raw["training"] |= {"secure_aggregation": "secagg+", "max_update_norm": 100.0,
                        **(training or {})}  # fmt: skip
    raw["inference"] = {"encrypted": False}
    raw["privacy"] = {"mode": "client", "epsilon": 1.0,
                      "ledger": str(tmp_path / "ledger.sqlite"), **(privacy or {})}  # fmt: skip
    return raw


def _run_config(raw: dict[str, Any]) -> Any:
    from privml.data import load_federation
    from privml.fl.training import train
    from privml.pipeline import model_spec

    cfg = parse_config(raw)
    fed = load_federation(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(cfg, fed, model_spec(cfg, fed))


def _toml(raw: dict[str, Any]) -> str:
    lines = [f"name = {json.dumps(raw['name'])}"] if "name" in raw else []
    for section, values in raw.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_demo_with_distributed_dp_runs_through_privml_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(tmp_path, training={"rounds": 5})
    cfg = tmp_path / "demo_ddp.toml"
    cfg.write_text(_toml(raw))
    out_dir = tmp_path / "run"
    code = main(["run", "--config", str(cfg), "--out", str(out_dir)])
    err = capsys.readouterr().err
    assert not code, err
    res = json.loads((out_dir / "results.json").read_text())
    priv = res["privacy"]
    assert priv["mode"] == "client" and 0.99 <= priv["epsilon"] <= 1.0
    dd = priv["distributed"]
    # 90% of 3 sites, rounded up: every site must send
    assert dd["min_senders"] == dd["calibrated_for_senders"] == 3
    assert dd["wrap_probability_bound"] <= 1e-9
    assert "before masking" in priv["noise_added"] and priv["reproducible_noise"] is False
    sa = res["federation"]["secure_aggregation"]
    assert sa["scheme"] == "secagg+" and all(r["senders"] == 3 for r in sa["per_round"])
    from privml.dp.cli import ledger_from_config

    ledger = ledger_from_config(parse_config(raw))
    for site in priv["epsilon_per_site"]:
        (charge,) = ledger.history(site)
        assert charge.epsilon == pytest.approx(priv["epsilon"])
        assert charge.event is not None and "ZCDpEvent" in json.dumps(charge.event)


@pytest.mark.slow
def test_sample_level_dp_with_secagg_runs(tmp_path: Path) -> None:
    raw = _raw(tmp_path, training={"rounds": 3})
    raw["privacy"] = {"mode": "sample", "epsilon": 3.0, "ledger": str(tmp_path / "l.sqlite")}
    out = _run_config(raw)
    assert out.privacy["mode"] == "sample" and out.privacy["epsilon"] <= 3.0
    assert out.result.metrics["accuracy"] > 0.5


def test_a_run_skips_the_rounds_with_fewer_than_m_senders(tmp_path: Path) -> None:
    """Through the round loop: with m = 3 of the demo's 3 sites and dropouts, a round that
    lost a site is skipped with its reason (never released with less noise than booked)."""
    from privml.dp.randomness import reproducible_noise

    raw = _raw(tmp_path, training={"rounds": 4, "dropout": 0.3},
               privacy={"distributed_min_senders": 3})  # fmt: skip
    with warnings.catch_warnings(), reproducible_noise():  # the same dropouts on every run
        warnings.simplefilter("ignore")
        out = _run_config(raw)
    skipped = out.result.extra["updates"]["skipped_rounds"]
    assert skipped["dp_too_few_senders"] == [2, 4]
    sa = out.result.extra["federation"]["secure_aggregation"]
    assert [r["round"] for r in sa["per_round"]] == [1] and sa["per_round"][0]["senders"] == 3
