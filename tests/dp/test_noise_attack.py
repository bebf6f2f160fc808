"""The attacker who regenerates the training noise from what a run publishes.

The server of a federation sees every site's update. With one DP-SGD step on all of a site's
records (q = 1), an update is ``-lr (g + sigma C z) / N``: whoever can predict ``z`` subtracts
it and recovers the clipped gradient sum ``g`` of the site's records, i.e. no privacy at all.
The attacker here knows everything results.json and the config publish (seed, sizes, noise
multiplier, clipping norm, learning rate) and, as DP allows, every record of the site; it
tries every way of regenerating the noise from the seed that privml has ever used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privml.config import parse_config
from privml.data.federation import load_federation
from privml.dp.randomness import NoiseSource, reproducible_noise
from privml.dp.sgd import clipped_grad_sum, noise_generators
from privml.fl.engine import init_params
from privml.fl.stages.aggregate import CheckedAggregation
from privml.fl.training import train
from privml.models.training import Batch
from privml.pipeline import model_spec, run

pytestmark = pytest.mark.filterwarnings("ignore::privml.errors.InsecureOptionWarning")


def _raw(tmp_path: Path) -> dict[str, Any]:
    return {
        "name": "attack",
        "data": {"dataset": "breast_cancer", "n_sites": 2, "partition": "hospitals"},
        # ~2,000 parameters, so that chance is a sharp figure (relative error ~1.41 +- 0.05)
        "model": {"kind": "mlp", "hidden": [64]},
        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 1024, "lr": 1.0, "seed": 0},
        "privacy": {
            "mode": "sample",
            "epsilon": 1.0,
            "center_inputs": False,
            "ledger": str(tmp_path / "ledger.sqlite"),
        },
        "audit": {"enabled": False},
    }


def _released_updates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> tuple[dict[str, Any], np.ndarray]:
    """Runs privml and returns (results.json, the updates the server received in round 1)."""
    seen: list[np.ndarray] = []
    real = CheckedAggregation.__call__

    def spy(self: CheckedAggregation, state: Any, received: Any, rnd: int) -> Any:
        seen.append(np.array(received.updates, dtype=np.float64))  # what left the sites
        return real(self, state, received, rnd)

    monkeypatch.setattr(CheckedAggregation, "__call__", spy)
    cfg = parse_config(_raw(tmp_path), name="attack")
    out = run(cfg, out_dir=tmp_path / name)
    assert out.out_dir is not None
    results = json.loads((out.out_dir / "results.json").read_text())
    return results, seen[0]


def _recovery_errors(results: dict[str, Any], updates: np.ndarray) -> dict[str, float]:
    """||g_hat - g|| / ||noise|| for each regeneration the attacker can try (1.0 = chance)."""
    cfg = parse_config(results["config"], name="attack")  # everything the file publishes
    t, priv = cfg.training, results["privacy"]
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    model, params0 = init_params(spec, t.seed)
    errors: dict[str, float] = {}
    for i, site in enumerate(fed.sites):
        ps = priv["per_site"][site.name]
        assert ps["sampling_rate"] == 1.0 and ps["steps"] == 1  # one step on every record
        n = site.n_train
        batch = Batch(
            torch.from_numpy(site.X_train)[None],
            torch.from_numpy(site.y_train)[None],
            torch.ones(1, n),
        )
        g, _ = clipped_grad_sum(
            model, params0[None], batch, max_grad_norm=priv["max_grad_norm"], binary=True
        )
        g64 = g[0].double().numpy()
        observed = -updates[i] * n / t.lr  # = g + sigma C z
        noise = observed - g64
        scale = ps["noise_multiplier"] * priv["max_grad_norm"]
        P = len(g64)
        guesses = {
            "seeded torch generator (previous privml)": torch.randn(
                P, generator=noise_generators(t.seed, 1, [i])[0]
            ),
            "reproducible-noise derivation of the seed": NoiseSource.reproducible(t.seed)
            .stream("dpsgd-noise", 1, i)
            .normal(P),
        }
        norm = float(np.linalg.norm(noise))
        errors[f"{site.name}: no guess"] = float(np.linalg.norm(observed - g64)) / norm
        for label, z in guesses.items():
            g_hat = observed - scale * z.double().numpy()
            errors[f"{site.name}: {label}"] = float(np.linalg.norm(g_hat - g64)) / norm
    return errors


def test_noise_cannot_be_regenerated_from_what_a_run_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, updates = _released_updates(tmp_path, monkeypatch, "secure")
    assert results["privacy"]["reproducible_noise"] is False
    assert results["privacy"]["noise"]["kind"] == "csprng"
    errors = _recovery_errors(results, updates)
    # No regeneration brings the attacker closer to the gradient than not subtracting
    # anything (error 1); an independent guess even doubles the squared error (~ sqrt 2).
    for label, err in errors.items():
        assert err >= 0.9, (label, err)
    assert min(v for k, v in errors.items() if "guess" not in k) > 1.2


def test_the_attack_works_on_the_reproducible_switch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: with the test-only switch on, the same attacker recovers the gradient."""
    with reproducible_noise():
        results, updates = _released_updates(tmp_path, monkeypatch, "insecure")
    assert results["privacy"]["reproducible_noise"] is True
    assert results["privacy"]["noise"]["kind"] == "reproducible-insecure"
    errors = _recovery_errors(results, updates)
    hits = [v for k, v in errors.items() if "reproducible-noise derivation" in k]
    assert len(hits) == 2 and max(hits) < 1e-3


def test_two_private_runs_of_one_config_differ(tmp_path: Path) -> None:
    cfg = parse_config(_raw(tmp_path), name="attack")
    fed = load_federation(cfg)
    spec = model_spec(cfg, fed)
    a = train(cfg, fed, spec).result.params
    b = train(cfg, fed, spec).result.params
    assert not torch.equal(a, b)
    assert float((a - b).norm()) > 1e-3  # by the noise, not by rounding
    with reproducible_noise():
        c = train(cfg, fed, spec).result.params
        d = train(cfg, fed, spec).result.params
    assert torch.equal(c, d)
