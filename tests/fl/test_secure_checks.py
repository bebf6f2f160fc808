"""Norm bounding under CKKS encryption (privml.fl.stages.secure_checks): the server bounds
every update's norm on ciphertexts, the key holder decrypts only one scalar per site and the
bounded sum, and nobody sees an update.

The adversary tests play the server (it asks the key holder to decrypt an update as if it were
a norm, asks twice, asks for a one-update sum) and check the server's own material cannot
decrypt anything.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tenseal")

from privml.config import parse_config  # noqa: E402
from privml.data.federation import load_federation  # noqa: E402
from privml.errors import ConfigError, CryptoError  # noqa: E402
from privml.fl.aggregate import norm_bound  # noqa: E402
from privml.fl.engine import simulate  # noqa: E402
from privml.fl.rounds import Received, SiteUpdates  # noqa: E402
from privml.fl.stages.secure_checks import (  # noqa: E402
    CheckedSeal,
    CheckKeyHolder,
    EncryptedNormBound,
)
from privml.pipeline import model_spec  # noqa: E402

P = 5000  # two slices of 4,096 values


@pytest.fixture(scope="module")
def holder() -> CheckKeyHolder:
    return CheckKeyHolder(P, value_scale=1.0)


def _round(holder: CheckKeyHolder, updates: np.ndarray, counts: list[int], rnd: int) -> Any:
    seal = CheckedSeal(holder.public)
    combine = EncryptedNormBound(holder.public, 1.0, counts, P, holder.decrypt_scalars,
                                 holder.decrypt_sum)  # fmt: skip
    ids = np.arange(len(updates), dtype=np.int64)
    w = np.asarray(counts, dtype=np.float64)
    batch = SiteUpdates(rnd, ids, torch.zeros(1), updates.copy(), w,
                        np.zeros(len(ids), dtype=bool))  # fmt: skip
    seal.apply(batch)
    assert batch.updates.shape == (len(ids), 0)  # the plain updates never left the sites
    got = Received(ids, batch.updates, w, batch.malicious, sealed=batch.sealed)
    return combine(None, got, rnd), combine, batch.sealed  # type: ignore[arg-type]


def test_encrypted_norm_bound_equals_plaintext_norm_bound(holder: CheckKeyHolder) -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(0, 1, (5, P)) / np.sqrt(P) * np.array([[0.5], [0.9], [3.0], [10.0], [0.2]])
    counts = [40, 10, 25, 30, 20]
    out, combine, _ = _round(holder, u, counts, 1)
    ref = norm_bound(u, np.asarray(counts, dtype=float), max_norm=1.0)
    assert out.skipped is None and out.info["n_clipped"] == 2
    assert np.abs(out.update - ref.update).max() < 1e-5
    norms = combine.norms[-1]
    assert np.allclose(
        [norms[i] for i in range(5)], np.linalg.norm(u, axis=1), rtol=1e-4, atol=1e-4
    )


def test_the_key_holder_decrypts_only_one_scalar_per_site_and_sums_of_two(
    holder: CheckKeyHolder,
) -> None:
    import tenseal as ts

    rng = np.random.default_rng(1)
    u = rng.normal(0, 0.01, (3, P))
    _, _, sealed = _round(holder, u, [10, 10, 10], 2)
    # a curious server sends site 0's encrypted update as if it were its norm
    with pytest.raises(CryptoError, match="as one of a site's check scalars"):
        holder.decrypt_scalars(3, {0: [sealed[0][0]]})
    # the same site's norm twice in one round (to learn a second scalar) is refused
    ctx = ts.context_from(holder.public)
    one = ts.ckks_vector(ctx, [1.0]).serialize()
    holder.decrypt_scalars(4, {0: [one]})
    with pytest.raises(CryptoError, match="already decrypted"):
        holder.decrypt_scalars(4, {0: [one]})
    # two scalars for one site when only its norm is checked (a second functional of it)
    with pytest.raises(CryptoError, match="at most 1 per site"):
        holder.decrypt_scalars(5, {1: [one, one]})
    # a "sum" of one update
    with pytest.raises(CryptoError, match="at least 2"):
        holder.decrypt_sum(sealed[0], 1)


def test_the_servers_material_decrypts_nothing(holder: CheckKeyHolder) -> None:
    import tenseal as ts

    ctx = ts.context_from(holder.public)
    assert not ctx.is_private()
    rng = np.random.default_rng(2)
    _, _, sealed = _round(holder, rng.normal(0, 0.01, (2, P)), [5, 5], 5)
    v = ts.ckks_vector_from(ctx, sealed[0][0])
    with pytest.raises(ValueError):
        v.decrypt()


def test_malformed_encrypted_updates_are_rejected(holder: CheckKeyHolder) -> None:
    import tenseal as ts

    rng = np.random.default_rng(3)
    u = rng.normal(0, 0.01, (3, P))
    seal = CheckedSeal(holder.public)
    ids = np.arange(3, dtype=np.int64)
    batch = SiteUpdates(6, ids, torch.zeros(1), u, np.ones(3), np.zeros(3, dtype=bool))
    seal.apply(batch)
    sealed = list(batch.sealed)  # type: ignore[arg-type]
    ctx = ts.context_from(holder.public)
    sealed[1] = [ts.ckks_vector(ctx, [1.0] * 10).serialize()]  # wrong length
    sealed[2] = [b"garbage", b"more"]
    combine = EncryptedNormBound(holder.public, 1.0, [1, 1, 1], P, holder.decrypt_scalars,
                                 holder.decrypt_sum)  # fmt: skip
    got = Received(ids, batch.updates, np.ones(3), batch.malicious, sealed=sealed)
    out = combine(None, got, 6)  # type: ignore[arg-type]
    assert out.skipped == "too_few_updates" and [r for _, r in out.rejected] == ["shape"] * 2


def _raw(**training: Any) -> dict[str, Any]:
    return {
        "data": {"dataset": "breast_cancer", "n_sites": 10, "partition": "iid"},
        "training": {"rounds": 2, "secure_aggregation": "ckks", "aggregator": "norm_bound",
                     "aggregator_params": {"max_norm": 1.0},
                     "secure_aggregation_checks": "norm", **training},
        "inference": {"encrypted": False},
    }  # fmt: skip


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="computes each update's norm on CKKS"):
        parse_config(_raw(secure_aggregation="paillier"))
    with pytest.raises(ConfigError, match='needs aggregator = "norm_bound"'):
        parse_config(_raw(aggregator="fedavg", aggregator_params={}, max_update_norm=1.0))


@pytest.mark.slow
def test_sign_flipping_sites_are_bounded_without_decrypting_an_update() -> None:
    raw = _raw(rounds=4, local_epochs=5, batch_size=32, lr=8.0)
    raw["attack"] = {"kind": "sign_flip", "fraction": 0.2}
    cfg = parse_config(raw)
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    enc = simulate(fed, spec, cfg.training, attack=cfg.attack)
    plain = parse_config({**raw, "training": {**raw["training"], "secure_aggregation": "none",
                                              "secure_aggregation_checks": "none"}})  # fmt: skip
    ref = simulate(fed, spec, plain.training, attack=plain.attack)
    assert enc.metrics["accuracy"] == pytest.approx(ref.metrics["accuracy"], abs=0.01)
    assert torch.allclose(enc.params, ref.params, atol=1e-3)


@pytest.mark.slow
def test_cosine_check_gives_no_trust_to_sign_flipped_updates() -> None:
    raw = _raw(rounds=4, local_epochs=5, batch_size=32, lr=8.0,
               secure_aggregation_checks="norm+cosine")  # fmt: skip
    raw["attack"] = {"kind": "sign_flip", "fraction": 0.2}
    cfg = parse_config(raw)
    fed = load_federation(cfg)
    res = simulate(fed, model_spec(cfg, fed), cfg.training, attack=cfg.attack)
    sa = res.extra["federation"]["secure_aggregation"]
    assert sa["checks"] == "norm+cosine"
    # from round 2 on (round 1 has no reference) the two flipped updates get no trust
    fractions = sa["trusted_fraction_per_round"]
    assert len(fractions) == 3 and all(f <= 0.8 + 1e-9 for f in fractions)
    assert res.metrics["accuracy"] > 0.9
