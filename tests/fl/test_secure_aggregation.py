"""Encrypted aggregation in federated rounds (privml.fl.stages.secure, ``secure_aggregation``).

Keys are 2048-bit Paillier (the HE layer's InsecureOptionWarning filtered) to keep the file
fast; the demo run through the CLI uses the 3072-bit default.
"""

from __future__ import annotations

import json
import tomllib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privml.cli import main
from privml.config import Config, parse_config
from privml.data import load_federation
from privml.errors import ConfigError, InsecureOptionWarning
from privml.fl import aggregate as agg
from privml.fl.checkpoint import ServerState
from privml.fl.engine import TrainingResult, simulate
from privml.fl.rounds import Outcome, Received, SiteUpdates
from privml.fl.stages.aggregate import ServerPlan, init_server_state
from privml.fl.stages.optimizer import ServerOptimizerStep
from privml.fl.stages.secure import (
    KeyHolderService,
    SealUpdates,
    SecureSetup,
    SecureSum,
    clip_update,
)
from privml.he import SecureAggregator
from privml.pipeline import model_spec

pytestmark = pytest.mark.filterwarnings("ignore::privml.errors.InsecureOptionWarning")

DEMO = Path(__file__).resolve().parents[2] / "src/privml/data/demo/demo.toml"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**training: Any) -> Config:
    raw = tomllib.loads(DEMO.read_text())
    raw.pop("inference", None)
    raw["training"] = {**raw["training"], "rounds": 3, **training}
    return parse_config(raw)


def _simulate(cfg: Config) -> TrainingResult:
    fed = load_federation(cfg)
    return simulate(fed, model_spec(cfg, fed), cfg.training)


def _secure(scheme: str, **training: Any) -> dict[str, Any]:
    return {"secure_aggregation": scheme, "secure_aggregation_key_bits": 2048, **training}


# ---- the maths of one round, against the plain rules ---------------------------------------


class _Parties:
    """The three parties of one run, wired in-process: the sites' seal stage, the key holder,
    the server's secure sum."""

    def __init__(self, scheme: str, n_sites: int, n_params: int, **training: Any) -> None:
        cfg = _config(**_secure(scheme, **training))
        names = [f"site{i}" for i in range(n_sites)]
        self.n_train = np.array([50 + 30 * i for i in range(n_sites)], dtype=np.float64)
        setup = SecureSetup.from_training(cfg.training, names, self.n_train.astype(int).tolist(),
                                          n_params=n_params)  # fmt: skip
        self.holder = KeyHolderService(setup, setup.key_holder)
        public = self.holder.keygen()
        self.seal = SealUpdates(setup, public)
        self.combine = SecureSum(setup, public, decrypt=self.holder.decrypt)
        self.optimize = ServerOptimizerStep(ServerPlan.from_training(cfg.training).optimizer)

    def round(self, state: ServerState, updates: np.ndarray, ids: np.ndarray
              ) -> tuple[ServerState, Outcome]:  # fmt: skip
        """Sites seal, the server sums, the key holder decrypts, the optimizer steps."""
        batch = SiteUpdates(1, ids, torch.zeros(1), np.array(updates, dtype=np.float64),
                            self.n_train[ids], np.zeros(len(ids), dtype=bool))  # fmt: skip
        self.seal.apply(batch)
        got = Received(ids, batch.updates, batch.weights, batch.malicious, sealed=batch.sealed)
        outcome = self.combine(state, got, state.round + 1)
        return self.optimize(state, outcome), outcome


def _setup(scheme: str, n_sites: int, n_params: int, **training: Any) -> _Parties:
    return _Parties(scheme, n_sites, n_params, **training)


@pytest.mark.parametrize("scheme", ["paillier", "ckks"])
def test_one_round_equals_norm_bounded_fedavg(scheme: str) -> None:
    """Clipped, weighted, encrypted, summed, decrypted and divided == plain norm bounding
    with sample-count weights (exact to 2**-25 for Paillier; CKKS within its flooding)."""
    n_sites, n_params, bound = 4, 300, 2.0
    sa = _setup(scheme, n_sites, n_params, max_update_norm=bound)
    rng = np.random.default_rng(5)
    # two updates far over the bound, two under it, one negative-heavy
    updates = rng.normal(0, 1, size=(n_sites, n_params)) * np.array([[0.01], [0.5], [1], [-0.05]])
    norms = np.linalg.norm(updates, axis=1)
    assert (norms > bound).sum() == 2 and (norms < bound).sum() == 2
    ids = np.arange(n_sites, dtype=np.int64)
    plan = ServerPlan.from_training(sa_training(scheme, bound))
    state = init_server_state(np.zeros(n_params, dtype=np.float32), plan)
    new_state, out = sa.round(state, updates, ids)
    want = agg.norm_bound(updates, sa.n_train[ids], max_norm=bound).update
    assert out.update is not None and out.skipped is None
    err = np.abs(out.update - want).max()
    total_w = float((sa.n_train / sa.n_train.max()).sum())
    if scheme == "paillier":
        # each site's weighted value is rounded to 2**-24 (error <= 2**-25); the sum of 4 such
        # errors is divided by the total weight
        assert err <= n_sites * 2.0**-25 / total_w
    else:
        assert err <= 7 * bound * 2.0**-24 / total_w  # flooding std, 7 sigma over 300 values
    assert err > 0 or scheme == "paillier"
    # sgd with lr 1: the new parameters are the update
    np.testing.assert_allclose(new_state.params, out.update.astype(np.float32), atol=1e-7)
    assert new_state.round == 1 and out.counts()["accepted"] == n_sites
    assert sa.seal.n_clipped == 2


def sa_training(scheme: str, bound: float) -> Any:
    return _config(**_secure(scheme, max_update_norm=bound)).training


def test_clip_bounds_the_norm_and_every_coordinate() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 1e3):
        u = rng.normal(0, scale, size=64)
        u[3] = 50 * scale  # one dominant coordinate
        c, clipped = clip_update(u, 1.5)
        assert np.linalg.norm(c) <= 1.5 * (1 + 1e-12) and np.abs(c).max() <= 1.5
        assert clipped == (np.linalg.norm(u) > 1.5)
        if not clipped:
            np.testing.assert_array_equal(c, u)
    one_hot = np.zeros(8)
    one_hot[2] = 7.0
    c, _ = clip_update(one_hot, 0.1)
    assert c[2] == 0.1  # the extreme case: the coordinate bound is reached exactly


def test_a_round_with_one_update_is_skipped_not_decrypted() -> None:
    sa = _setup("paillier", 3, 10, max_update_norm=1.0)
    plan = ServerPlan.from_training(sa_training("paillier", 1.0))
    state = init_server_state(np.ones(10, dtype=np.float32), plan)
    after, one = sa.round(state, np.full((1, 10), 0.1), np.array([1]))
    assert one.skipped == "too_few_updates" and one.update is None
    np.testing.assert_array_equal(after.params, state.params)
    bad = np.full((2, 10), 0.1)
    bad[0, 4] = np.nan
    _, out = sa.round(state, bad, np.array([0, 2]))  # the NaN site does not send
    assert out.skipped == "too_few_updates" and out.counts()["by_reason"]["non_finite"] == 1
    assert sa.combine.costs == []  # nothing was decrypted


# ---- whole runs: equal to plain FedAvg with the same clipping -------------------------------


@pytest.fixture(scope="module")
def plain_unclipped() -> TrainingResult:
    return _simulate(_config(max_update_norm=100.0))


@pytest.mark.parametrize(("scheme", "atol"), [("paillier", 1e-5), ("ckks", 2e-4)])
def test_secure_run_equals_plain_fedavg(
    scheme: str, atol: float, plain_unclipped: TrainingResult
) -> None:
    sec = _simulate(_config(**_secure(scheme, max_update_norm=100.0)))
    diff = float((sec.params - plain_unclipped.params).abs().max())
    assert diff <= atol, diff
    assert diff > 0 or scheme == "paillier"  # CKKS is approximate: an exact match is a bug
    assert sec.metrics["accuracy"] == pytest.approx(plain_unclipped.metrics["accuracy"])
    info = sec.extra["federation"]["secure_aggregation"]
    assert info["scheme"] == scheme and info["key_holder"] == "hospital_a"
    assert len(info["per_round"]) == 3 and info["updates_clipped"] == 0
    assert info["ciphertext_bytes_per_site"] > 0 and info["median_aggregate_seconds"] > 0
    assert sec.extra["federation"]["secure_aggregation"]["clip"] == 100.0
    assert plain_unclipped.extra["federation"]["secure_aggregation"] is None


def test_secure_norm_bound_equals_plain_norm_bound_when_clipping_binds() -> None:
    # The demo's first-round update norms are 11-15: a bound of 5 clips every update.
    common = {"aggregator": "norm_bound", "aggregator_params": {"max_norm": 5.0}}
    plain = _simulate(_config(**common))
    sec = _simulate(_config(**_secure("paillier", key_holder="hospital_c", **common)))
    assert float((sec.params - plain.params).abs().max()) <= 1e-5
    info = sec.extra["federation"]["secure_aggregation"]
    assert info["updates_clipped"] >= 3 and info["key_holder"] == "hospital_c"
    # and the clipping changed the model (the test is not vacuous)
    unclipped = _simulate(_config())
    assert float((unclipped.params - plain.params).abs().max()) > 1e-2


# ---- who sees what --------------------------------------------------------------------------


def test_server_side_receives_public_bytes_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    decrypted: list[dict[str, Any]] = []
    real_aggregate = SecureAggregator.aggregate
    real_decrypt = SecureAggregator.decrypt_aggregate

    def spy_aggregate(self: SecureAggregator, updates: Any, *, public: Any = None) -> bytes:
        seen.append(
            {
                "updates": list(updates),
                "public": public,
                "has_keys": self._keys is not None,
                "attrs": dict(vars(self)),
            }
        )
        return real_aggregate(self, updates, public=public)

    def spy_decrypt(self: SecureAggregator, secret: Any, aggregate: Any, **kw: Any) -> Any:
        decrypted.append({"has_keys": self._keys is not None, "aggregate": aggregate, **kw})
        return real_decrypt(self, secret, aggregate, **kw)

    monkeypatch.setattr(SecureAggregator, "aggregate", spy_aggregate)
    monkeypatch.setattr(SecureAggregator, "decrypt_aggregate", spy_decrypt)
    res = _simulate(_config(**_secure("paillier", max_update_norm=100.0)))
    assert len(seen) == 3 and len(decrypted) == 3
    secret_types = {"PaillierSecretKey", "CKKSSecretKey", "KeyPair"}
    for call in seen:
        assert all(type(u) is bytes for u in call["updates"]) and len(call["updates"]) == 3
        assert type(call["public"]) is bytes
        assert not call["has_keys"]  # the server's aggregator never generated keys
        assert not any(type(v).__name__ in secret_types for v in call["attrs"].values())
        assert b"lambda" not in call["public"] and b"secret" not in call["public"]
    for call in decrypted:
        # only the key holder (the aggregator that made the keys) decrypts, and only sums of 3
        assert call["has_keys"] and call["n_sites"] == 3 and type(call["aggregate"]) is bytes
    assert res.extra["federation"]["secure_aggregation"]["public_material_bytes"] > 0


def test_unknown_key_holder_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="key_holder: no site named 'nope'"):
        _simulate(_config(**_secure("paillier", max_update_norm=1.0, key_holder="nope")))


def test_2048_bit_keys_warn() -> None:
    cfg = _config(**_secure("paillier", max_update_norm=1.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SecureSetup.from_training(cfg.training, ["a", "b"], [1, 2], n_params=4).aggregator()
    assert any(issubclass(w.category, InsecureOptionWarning) for w in caught)


# ---- the command line -----------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _write(tmp: Path, training: str, extra: str = "") -> Path:
    path = tmp / "sa.toml"
    path.write_text(
        '[data]\ndataset = "breast_cancer"\nn_sites = 3\npartition = "hospitals"\n'
        f"[training]\nrounds = 2\n{training}\n{extra}"
    )
    return path


@pytest.mark.parametrize(
    ("training", "extra", "message"),
    [
        (
            'secure_aggregation = "paillier"\naggregator = "median"\nmax_update_norm = 1.0',
            "",
            "the server sees only the encrypted sum",
        ),
        ('secure_aggregation = "ckks"', "", "needs max_update_norm = ..."),
        (
            'secure_aggregation = "paillier"\naggregator = "norm_bound"',
            "",
            "needs a fixed aggregator_params.max_norm",
        ),
        (
            'secure_aggregation = "paillier"\nmax_update_norm = 1.0\n'
            "secure_aggregation_key_bits = 1024",
            "",
            "secure_aggregation_key_bits must be a multiple of 256 in [2048, 8192]",
        ),
        (
            'secure_aggregation = "paillier"\nmax_update_norm = 1.0\nclients_per_round = 1',
            "",
            "secure aggregation needs at least 2 updates per round",
        ),
        (
            'secure_aggregation = "paillier"\nmax_update_norm = 1.0',
            '[privacy]\nmode = "client"\nepsilon = 1.0\nadaptive_clip = true',
            "adaptive clipping releases a noisy count of unclipped updates",
        ),
    ],
)
def test_config_errors_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    training: str,
    extra: str,
    message: str,
) -> None:
    code, _, err = cli(capsys, "run", "--config", _write(tmp_path, training, extra))
    assert code == 2, err
    assert message in " ".join(err.split()) and "Traceback" not in err


@pytest.mark.slow
def test_demo_with_paillier_runs_through_privml_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo config plus two lines, default 3072-bit keys, through ``privml run``."""
    text = DEMO.read_text().replace(
        "[training]\n", '[training]\nsecure_aggregation = "paillier"\nmax_update_norm = 100.0\n'
    )
    text = text.replace("encrypted = true", "encrypted = false")
    cfg = tmp_path / "demo_sa.toml"
    cfg.write_text(text)
    out_dir = tmp_path / "run"
    code, out, err = cli(capsys, "run", "--config", cfg, "--out", out_dir, "--json")
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    info = res["federation"]["secure_aggregation"]
    assert info["scheme"] == "paillier" and info["parameters"]["key_bits"] == 3072
    assert info["key_holder"] == res["sites"][0]["name"]
    assert len(info["per_round"]) == 20 and all(r["sites"] == 3 for r in info["per_round"])
    assert res["metrics"]["accuracy"] >= 0.95
    assert res["updates"]["accepted"] == 60
