"""Distributed DP under SecAgg+ (privml.dp.distributed, privml.fl.stages.distributed): each site
adds its discrete Gaussian share before masking; the server only ever unmasks a noised sum.

The adversary tests play the server: they keep every message it receives, unmask the sum the
way the protocol lets it, and try to get the un-noised sum back (by regenerating the sites'
noise from the run's seed, or by relying on dropped sites' missing shares).
"""

from __future__ import annotations

import json
import math
import tomllib
import warnings
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
    args: dict[str, Any] = dict(
        epsilon=1.0, noise_multiplier=None, delta=1e-5, clip=CLIP, clipping_range=CLIP,
        quantization_range=1 << 16, dim=P, steps=steps, min_senders=t, max_senders=n,
        modulus=None,
    )  # fmt: skip
    return D.plan_distributed(**{**args, **kw})


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------


def test_epsilon_is_that_of_the_threshold_shares_recomputed_with_dp_accounting() -> None:
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
    # the worst case is the threshold: with one share fewer the same noise would not cover it
    fewer = 0.5 * (plan.sensitivity / (math.sqrt(10) * sigma)) ** 2
    assert D.zcdp_epsilon(10 * fewer, 1e-5) > 1.02
    # more senders only add noise: the sum of 20 shares is the sum of 11 plus independent noise
    assert D.round_rho(sigma, 20, plan.sensitivity, P) < plan.rho_round


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


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


def test_discrete_gaussian_draws_follow_the_distribution() -> None:
    src = NoiseSource.fresh()
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
    """SecAgg+ rounds of ``n`` sites with distributed DP's seal and combine stages."""

    def __init__(self, n: int, plan: D.DistributedPlan, noise: NoiseSource,
                 drop: dict[str, set[int]] | None = None, **kw: Any) -> None:  # fmt: skip
        self.params = S.SecAggParams(kw.get("k"), kw.get("t"), CLIP, plan.quantization_range,
                                     plan.modulus, 1.0, P)  # fmt: skip
        self.server = MaskingServer(self.params, record=True)
        self.sites = SimulatedSites(self.params, drop=dict(drop or {}))
        self.share = DiscreteGaussianShare(plan, noise)
        self.seal = SealMasked(self.params, self.server, self.sites, CLIP, StreamUniforms(noise),
                               weighted=False, noise=self.share,
                               rounding_bound=plan.rounded_norm)  # fmt: skip
        self.combine = MaskedSum(self.params, self.server, self.sites, CLIP, weighted=False,
                                 denominator=1.0, centered=True)  # fmt: skip
        rng = np.random.default_rng(n)
        self.ids = np.arange(n, dtype=np.int64)
        u = rng.normal(0, 1, (n, P))
        self.updates = u / np.linalg.norm(u, axis=1, keepdims=True) * 0.8

    def run(self, rnd: int) -> Any:
        batch = SiteUpdates(rnd, self.ids, torch.zeros(1), self.updates.copy(), np.ones(len(
            self.ids)), np.zeros(len(self.ids), dtype=bool))  # fmt: skip
        self.seal.apply(batch)
        got = Received(self.ids, batch.updates, batch.weights, batch.malicious,
                       sealed=batch.sealed)  # fmt: skip
        return self.combine(None, got, rnd)  # type: ignore[arg-type]


def test_the_sum_the_server_unmasks_carries_the_calibrated_noise() -> None:
    n, t = 12, 7
    plan = _plan(n=n, t=t, steps=30)
    r = DPRound(n, plan, NoiseSource.fresh(), k=n, t=t)
    true_sum = r.updates.sum(axis=0)
    resid = []
    for rnd in range(1, 31):
        out = r.run(rnd)
        assert out.skipped is None and out.info["secagg_senders"] == n
        # what the server holds: the messages it received, and the sum they unmask to
        session = r.server.sessions[rnd]
        assert {step for step, _, _ in session.received} == {
            "setup",
            "share_keys",
            "masked_vector",
            "unmask",
        }
        resid.append(out.update - true_sum)
    resid = np.concatenate(resid)
    # n shares of sigma_t^2 each, in real units; the calibration needs t of them
    expected = n * plan.sigma(t) ** 2 / plan.scale**2
    assert resid.var() == pytest.approx(expected, rel=0.15)
    assert resid.var() >= 0.8 * plan.sum_std(t) ** 2  # never below the threshold's noise
    assert abs(resid.mean()) < 4 * math.sqrt(expected / len(resid))


def test_regenerating_the_noise_from_the_seed_does_not_denoise_the_sum() -> None:
    """A server that knows the run's seed regenerates each site's share with the reproducible
    source and subtracts it: under the secure source the residual keeps its full variance."""
    n, t = 10, 6
    plan = _plan(n=n, t=t, steps=20)
    secure = NoiseSource.fresh()
    r = DPRound(n, plan, secure, k=n, t=t)
    guess_src = NoiseSource.reproducible(0)
    resid = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(1, 21):
            out = r.run(rnd)
            guess = D.discrete_gaussian_rows(
                [guess_src.stream("ddg-share", rnd, i) for i in range(n)], plan.sigma(t), P
            )
            denoised = out.update - guess.sum(axis=0) / plan.scale
            resid.append(denoised - r.updates.sum(axis=0))
    resid = np.concatenate(resid)
    expected = n * plan.sigma(t) ** 2 / plan.scale**2
    assert resid.var() > 1.5 * expected  # the guess adds its own noise; nothing cancels


def test_dropped_senders_leave_at_least_the_thresholds_noise() -> None:
    """Sites that vanish after the key exchange send no share; the sum of the survivors still
    carries at least the threshold's noise, and with fewer survivors no sum is released."""
    n, t = 12, 8
    plan = _plan(n=n, t=t, steps=20)
    drop = {"masked_vector": {0, 1, 2, 3}}  # 8 senders left: exactly the threshold
    r = DPRound(n, plan, NoiseSource.fresh(), drop=drop, k=n, t=t)
    senders = list(range(4, n))
    resid = []
    for rnd in range(1, 41):
        out = r.run(rnd)
        assert out.skipped is None and out.info["secagg_senders"] == t
        resid.append(out.update - r.updates[senders].sum(axis=0))
    resid = np.concatenate(resid)
    assert resid.var() == pytest.approx(plan.sum_std(t) ** 2, rel=0.15)
    worse = DPRound(n, plan, NoiseSource.fresh(), drop={"masked_vector": {0, 1, 2, 3, 4}},
                    k=n, t=t)  # fmt: skip
    assert worse.run(1).skipped == "secagg_too_few_sites"


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
    assert dd["calibrated_for_senders"] == 2 and dd["wrap_probability_bound"] <= 1e-9
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
