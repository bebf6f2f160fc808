"""Golden runs: the final parameters and round records of every non-private configuration.

Each case trains on data built here from scikit-learn's datasets (scaled by fixed bounds and
split by a fixed rule), not through the data layer, so the goldens pin the round engine alone:
a change to how sites load, split or encode their records does not move them. Cases run the
simulation engine, the Flower coordinator over an in-memory grid, and the audit's federated
experiments (adversary and defence).

Regenerate the fixtures (only when a change is *meant* to alter training) with::

    PYTHONPATH=src python -m tests.golden.make
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
NPZ = HERE / "golden.npz"
JSON = HERE / "golden.json"

BASE = {"rounds": 3, "local_epochs": 2, "lr": 4.0, "batch_size": 32, "seed": 3}

#: Keys of a round record that are timings, not results.
TIMING_KEYS = ("seconds",)

#: Keys of a round record derived from the parameters (checked through them), not recorded.
DERIVED_KEYS = ("per_site",)

#: Keys added to round records after the goldens were recorded (which sites missed the round,
#: how often it was sent; tests/fl/test_churn.py checks them).
NEW_KEYS = ("missed", "attempts")
SKIPPED_KEYS = TIMING_KEYS + DERIVED_KEYS + NEW_KEYS


def _federation(name: str = "bc", n_sites: int = 10) -> Any:
    """Every site's records, split by a fixed rule (record i goes to site i % n_sites after a
    seeded permutation; every 5th record of a site is held out)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    from privml.config import ColumnSchema
    from privml.data.encoding import Encoder, Task
    from privml.data.federation import FederatedData, SiteData

    if name == "bc":
        X, y = load_breast_cancer(return_X_y=True)
        lo, hi = X.min(axis=0), X.max(axis=0)
        X = (X - lo) / (hi - lo)
        task = Task("binary", "target", ("malignant", "benign"))
    else:
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
        task = Task("multiclass", "target", tuple(str(c) for c in range(10)))
    perm = np.random.default_rng(12345).permutation(len(y))
    X, y = X[perm].astype(np.float32), y[perm].astype(np.int64)
    schema = {f"x{j}": ColumnSchema(type="numeric", min=0.0, max=1.0) for j in range(X.shape[1])}
    sites = []
    for s in range(n_sites):
        Xs, ys = X[s::n_sites], y[s::n_sites]
        test = np.arange(len(ys)) % 5 == 4
        sites.append(SiteData(f"site_{s}", Xs[~test], ys[~test], Xs[test], ys[test]))
    return FederatedData(sites, Encoder(schema), task)


def _spec(fed: Any, kind: str = "logistic", **kw: Any) -> Any:
    from privml.models.nets import ModelSpec

    return ModelSpec(
        kind=kind,
        n_features=fed.n_features,
        n_outputs=fed.task.n_outputs,
        hidden=tuple(kw.get("hidden", ())),
        activation=kw.get("activation", "relu"),
        image_shape=kw.get("image_shape"),
    )


def _training(**kw: Any) -> Any:
    from privml.config import TrainingConfig

    return TrainingConfig(**{**BASE, **kw})


def _attack(**kw: Any) -> Any:
    from privml.config import AttackConfig

    return AttackConfig(**kw)


def _sim_result(res: Any) -> tuple[np.ndarray, dict[str, Any]]:
    rounds = [{k: v for k, v in r.to_dict().items() if k not in SKIPPED_KEYS} for r in res.history]
    updates = dict(res.extra.get("updates", {}))
    attack = res.extra.get("attack")
    info = {
        "rounds": rounds,
        "updates": updates,
        "attack": None
        if attack is None
        else {k: attack[k] for k in ("sites", "rounds_without_honest_client")},
        "accuracy": res.metrics["accuracy"],
    }
    return res.params.numpy().astype(np.float32), info


def _simulate(training: dict[str, Any], attack: dict[str, Any] | None = None, *,
              data: str = "bc", n_sites: int = 10, model: dict[str, Any] | None = None
              ) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:  # fmt: skip
    def run() -> tuple[np.ndarray, dict[str, Any]]:
        from privml.fl.engine import simulate

        fed = _federation(data, n_sites)
        spec = _spec(fed, **(model or {}))
        res = simulate(
            fed, spec, _training(**training), attack=_attack(**attack) if attack else None
        )
        return _sim_result(res)

    return run


def _resumed(training: dict[str, Any], attack: dict[str, Any] | None, crash_after: int
             ) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:  # fmt: skip
    """Crash after round ``crash_after`` (checkpoints on), resume, finish."""

    def run() -> tuple[np.ndarray, dict[str, Any]]:
        import tempfile

        from privml.fl.engine import simulate

        class Crash(RuntimeError):
            pass

        def crash(rec: Any) -> None:
            if rec.round == crash_after:
                raise Crash

        fed = _federation()
        spec = _spec(fed)
        t = _training(**training)
        a = _attack(**attack) if attack else None
        with tempfile.TemporaryDirectory() as d:
            ck = Path(d) / "checkpoint"
            with contextlib.suppress(Crash):
                simulate(fed, spec, t, attack=a, checkpoint_dir=ck, on_round=crash)
            res = simulate(fed, spec, t, attack=a, checkpoint_dir=ck, resume=True)
        return _sim_result(res)

    return run


def _federate(adversary: dict[str, Any] | None, defence: dict[str, Any] | None, *,
              data: str = "bc", model: dict[str, Any] | None = None, training: dict[str, Any]
              | None = None) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:  # fmt: skip
    """The audit's federated experiment loop (adversary and defence)."""

    def run() -> tuple[np.ndarray, dict[str, Any]]:
        from privml.security.attacks.backdoor import feature_trigger, poisoner
        from privml.security.defenses.robust import BACKDOOR_DEFENCE, Defence
        from privml.security.federated import Adversary, federate

        fed = _federation(data)
        spec = _spec(fed, **(model or {}))
        adv = None
        if adversary is not None:
            kw = dict(adversary)
            if kw.pop("backdoor", False):
                kw["poison"] = poisoner(feature_trigger([0, 1, 2], 1.0), target=0, fraction=0.5)
            adv = Adversary(**kw)
        if defence is None:
            d = Defence()
        elif defence == {"backdoor": True}:
            d = BACKDOOR_DEFENCE
        else:
            d = Defence(**defence)
        fr = federate(fed, spec, _training(**(training or {})), adversary=adv, defence=d)
        return fr.params.numpy().astype(np.float32), {"rounds": fr.rounds}

    return run


def _flower(training: dict[str, Any]) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:
    """The Flower coordinator and client apps over an in-memory grid (the demo's sites)."""

    def run() -> tuple[np.ndarray, dict[str, Any]]:
        from tests.golden.flower_grid import run_flower_in_memory

        res = run_flower_in_memory(training)
        rounds = [
            {k: v for k, v in r.to_dict().items() if k not in SKIPPED_KEYS} for r in res.history
        ]
        return res.params.numpy().astype(np.float32), {
            "rounds": rounds,
            "updates": dict(res.extra["updates"]),
        }

    return run


SECURE = {"max_update_norm": 2.0, "secure_aggregation_key_bits": 2048}

CASES: dict[str, Callable[[], tuple[np.ndarray, dict[str, Any]]]] = {
    # every aggregator
    "agg_fedavg": _simulate({}),
    "agg_median": _simulate({"aggregator": "median"}),
    "agg_trimmed_mean": _simulate(
        {"aggregator": "trimmed_mean", "aggregator_params": {"beta": 0.2}}
    ),
    "agg_krum": _simulate({"aggregator": "krum"}),
    "agg_multi_krum": _simulate({"aggregator": "multi_krum"}),
    "agg_bulyan": _simulate({"aggregator": "bulyan"}),
    "agg_norm_bound": _simulate({"aggregator": "norm_bound"}),
    "agg_norm_bound_fixed": _simulate(
        {"aggregator": "norm_bound", "aggregator_params": {"max_norm": 0.5}}
    ),
    "agg_fltrust": _simulate({"aggregator": "fltrust", "aggregator_params": {"root_size": 15}}),
    "agg_centered_clip": _simulate({"aggregator": "centered_clip", "rounds": 4}),
    # every server optimizer
    "opt_momentum": _simulate({"server_optimizer": "momentum", "server_lr": 0.7}),
    "opt_adam": _simulate({"server_optimizer": "adam", "server_lr": 0.3}),
    "opt_yogi": _simulate({"server_optimizer": "yogi", "server_lr": 0.1}),
    "opt_adagrad": _simulate({"server_optimizer": "adagrad", "server_lr": 0.2}),
    # FedProx, sampling, dropouts, stragglers, validation
    "fedprox": _simulate({"strategy": "fedprox", "prox_mu": 0.05}),
    "fedprox_default_mu": _simulate({"strategy": "fedprox"}),
    "sampling_dropouts": _simulate(
        {"rounds": 5, "clients_per_round": 6, "dropout": 0.25, "straggler": 0.2}
    ),
    "fraction": _simulate({"fraction": 0.35, "rounds": 4}),
    "max_update_norm": _simulate({"max_update_norm": 3.0}),
    # simulated attackers
    "attack_sign_flip_median": _simulate(
        {"aggregator": "median"}, {"kind": "sign_flip", "fraction": 0.2}
    ),
    "attack_scale_fedavg": _simulate({}, {"kind": "scale", "sites": [0, "site_3"], "scale": 5.0}),
    "attack_label_flip_krum": _simulate(
        {"aggregator": "krum"}, {"kind": "label_flip", "fraction": 0.3}
    ),
    "attack_alie_multi_krum": _simulate(
        {"aggregator": "multi_krum", "clients_per_round": 7}, {"kind": "alie", "sites": [1, 2]}
    ),
    "attack_gaussian_trimmed": _simulate(
        {"aggregator": "trimmed_mean"}, {"kind": "gaussian", "sites": [3, 7], "sigma": 0.5}
    ),
    "attack_ipm_trimmed": _simulate(
        {"aggregator": "trimmed_mean"}, {"kind": "ipm", "fraction": 0.2, "epsilon": 0.5}
    ),
    "attack_fltrust_sign_flip": _simulate(
        {"aggregator": "fltrust"}, {"kind": "sign_flip", "sites": [4]}
    ),
    # other models
    "mlp_digits": _simulate(
        {"lr": 0.5}, data="digits", n_sites=5, model={"kind": "mlp", "hidden": (16,)}
    ),
    "cnn_digits": _simulate(
        {"lr": 0.5, "rounds": 3, "local_epochs": 1},
        data="digits",
        n_sites=4,
        model={"kind": "cnn", "image_shape": (8, 8)},
    ),
    # secure aggregation (result independent of the keys within the fixed-point resolution)
    "secure_paillier": _simulate({**SECURE, "secure_aggregation": "paillier"}),
    "secure_ckks": _simulate({**SECURE, "secure_aggregation": "ckks"}),
    "secure_norm_bound": _simulate(
        {
            "secure_aggregation": "paillier",
            "secure_aggregation_key_bits": 2048,
            "aggregator": "norm_bound",
            "aggregator_params": {"max_norm": 0.7},
        }
    ),
    # resume after a crash equals the uninterrupted run
    "resume_adam_dropouts": _resumed(
        {"rounds": 5, "server_optimizer": "adam", "server_lr": 0.3, "dropout": 0.2}, None, 2
    ),
    "resume_centered_clip_attack": _resumed(
        {"rounds": 4, "aggregator": "centered_clip", "clients_per_round": 7},
        {"kind": "sign_flip", "fraction": 0.2},
        3,
    ),
    # the audit's federated experiments
    "federate_clean": _federate(None, None),
    "federate_sign_flip_median": _federate(
        {"sites": (1, 4), "update_attack": "sign_flip"}, {"aggregator": "median"}
    ),
    "federate_backdoor_replace": _federate(
        {"sites": (2,), "backdoor": True, "boost": "replace", "start_round": 2}, None
    ),
    "federate_backdoor_defended": _federate(
        {"sites": (2,), "backdoor": True, "boost": "replace"}, {"backdoor": True}
    ),
    # Flower: the coordinator and the sites' client apps (in-memory grid)
    "flower_fedavg": _flower({"rounds": 3}),
    "flower_median_dropouts": _flower(
        {"rounds": 3, "aggregator": "median", "clients_per_round": 3, "dropout": 0.2}
    ),
}

#: Cases whose result carries encryption noise or rounding beyond float32 (CKKS): compared
#: at this absolute tolerance instead of 1e-6.
TOLERANCE = {"secure_ckks": 1e-5}
