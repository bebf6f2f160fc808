"""From the settings of a run to its stages: which stage runs at each step of a round.

:func:`build_run` is called once per run, after the compatibility table
(:mod:`privml.fl.compat`) has accepted the combination. It decides, in order:

* the **cohort** sampler (uniform; Poisson for client-level DP);
* the **local update** rule (SGD or FedProx over any gradient rule: plain, DP-SGD,
  adversarial training);
* the **site** stages (a simulated attacker; clipping and a noise share under DP);
* **seal** and **combine**: secure aggregation (Paillier, CKKS: keys made at the key holder
  now), or the server checks on plain updates (validation, anomaly filter, robust rule,
  FLTrust's root data held out of one honest site);
* **central noise**, the server **optimizer**, **checkpoints**.

The result, :class:`Run`, holds the server side (:class:`~privml.fl.rounds.RoundsPlan`), the
site side (:class:`~privml.fl.rounds.SitePipeline`) and each stage's part of results.json.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.data.federation import FederatedData, SiteData
from privml.errors import ConfigError
from privml.fl.attacks import ATTACK_PARAMS, DATA_ATTACKS, UPDATE_ATTACKS
from privml.fl.checkpoint import ServerState
from privml.fl.plan_private import PrivateParts
from privml.fl.rounds import RoundsPlan, SitePipeline, SiteStage, Stateful
from privml.fl.stages.aggregate import CheckedAggregation, ServerPlan, init_server_state
from privml.fl.stages.attack import (
    OMNISCIENT,
    Poison,
    SimulatedAttack,
    attacker_indices,
    label_flipper,
)
from privml.fl.stages.checkpoint import Checkpointing
from privml.fl.stages.cohort import UniformCohort
from privml.fl.stages.local import LocalTraining, Sites, prox_weight, root_update
from privml.fl.stages.optimizer import ServerOptimizerStep
from privml.fl.stages.secure import KeyHolderService, SealUpdates, SecureSetup, SecureSum
from privml.models.nets import ModelSpec, build_model, flat_params
from privml.models.training import GradientRule, MeanGradient

__all__ = [
    "Run",
    "build_from_config",
    "config_fingerprint",
    "attacked_data",
    "build_run",
    "init_params",
    "make_attack",
    "run_fingerprint",
]


def init_params(spec: ModelSpec, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """Build the model and its initial flat parameters from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec)
    return model, flat_params(model)


def run_fingerprint(fed: FederatedData, spec: ModelSpec, training: Any, attack: Any | None) -> str:
    """SHA-256 of everything a run's result depends on: training settings, attack, model, and
    every site's encoded records. A checkpoint resumes only a run with the same fingerprint."""
    h = hashlib.sha256()
    desc = {
        "training": training.model_dump(mode="json"),
        "attack": attack.model_dump(mode="json") if attack is not None else None,
        "spec": spec.to_dict(),
        "task": fed.task.to_dict(),
    }
    h.update(json.dumps(desc, sort_keys=True).encode())
    for s in fed.sites:
        h.update(s.name.encode() + b"\0")
        for arr in (s.X_train, s.y_train, s.X_test, s.y_test):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Run:
    """A run's stages. ``fed`` holds the records as the rounds train on them (a feature map or
    an input centre applied); ``sections`` maps a results.json section to a function that
    builds it from the stages' state once the rounds are done; ``finalize`` maps the trained
    parameters to the model on the raw records and ``wrap`` the trained model to the one that
    is written (the feature map before it)."""

    plan: RoundsPlan
    pipeline: SitePipeline
    model: nn.Module
    spec: ModelSpec
    state: ServerState
    server: ServerPlan
    fed: FederatedData
    attack: SimulatedAttack | None = None
    sections: dict[str, Callable[[], Any]] = field(default_factory=dict)
    federation: dict[str, Any] = field(default_factory=dict)
    finalize: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, p: p
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m


# --------------------------------------------------------------------------------------------
# Attack, root data
# --------------------------------------------------------------------------------------------


def make_attack(
    attack: Any, names: Sequence[str], seed: int, n_classes: int, poison: Poison | None = None
) -> SimulatedAttack:
    """The attack stage of ``[attack]`` (``poison``: the backdoor's data poisoning, built by
    :mod:`privml.security.attacks.backdoor`, with its boost in ``attack``)."""
    malicious = attacker_indices(attack, names, seed)
    kind = attack.kind
    info = _attack_section(attack, names, malicious)
    if kind in UPDATE_ATTACKS:
        return SimulatedAttack(kind, malicious, kind, attack.kind_params(), seed=seed, info=info)
    if kind in DATA_ATTACKS:
        return SimulatedAttack(kind, malicious, poison=label_flipper(n_classes), seed=seed,
                               info=info)  # fmt: skip
    boost = attack.boost if attack.boost not in (None, "none", 0) else None
    boost = "replace" if attack.boost is None else boost
    return SimulatedAttack(kind, malicious, poison=poison, boost=boost,
                           start_round=attack.start_round or 1, seed=seed, info=info)  # fmt: skip


def _attack_section(attack: Any, names: Sequence[str], malicious: np.ndarray) -> dict[str, Any]:
    params: dict[str, Any] = {**ATTACK_PARAMS.get(attack.kind, {}), **attack.kind_params()}
    kind_type = "data" if attack.kind in DATA_ATTACKS else "update"
    if attack.kind == "backdoor":
        kind_type = "data and update (trigger poisoning, model replacement)"
        params = {"boost": "replace" if attack.boost is None else attack.boost,
                  "poison_fraction": attack.poison_fraction or 0.5,
                  "start_round": attack.start_round or 1}  # fmt: skip
    return {
        "kind": attack.kind,
        "type": kind_type,
        "threat_model": "omniscient (sees the cohort's honest updates)"
        if attack.kind in OMNISCIENT
        else "own data and update only",
        "sites": [names[i] for i in malicious],
        "n_malicious": int(len(malicious)),
        "n_sites": len(names),
        "fraction": attack.fraction,
        "params": params,
    }


def _carve_root(
    sites: list[SiteData], malicious: np.ndarray, server_data: dict[str, Any], seed: int
) -> tuple[list[SiteData], np.ndarray, np.ndarray, dict[str, Any]]:
    """Hold out FLTrust's root dataset from one honest site's training records."""
    size = int(server_data["root_size"])
    names = [s.name for s in sites]
    bad = set(malicious.tolist())
    want = server_data.get("root_site")
    if want is not None:
        if want not in names:
            raise ConfigError(f"aggregator_params.root_site: no site named {want!r}")
        pos = names.index(want)
        if pos in bad:
            raise ConfigError(
                f"aggregator_params.root_site {want!r} is a simulated attacker; FLTrust's root "
                "data must be clean: choose an honest site"
            )
    else:
        honest = [i for i in range(len(sites)) if i not in bad]
        if not honest:
            raise ConfigError("fltrust needs an honest site to take the root dataset from")
        pos = max(honest, key=lambda i: sites[i].n_train)
    site = sites[pos]
    if site.n_train <= size:
        raise ConfigError(
            f"aggregator_params.root_size = {size} needs a site with more than {size} training "
            f"records; {site.name!r} has {site.n_train}. Lower root_size or pick root_site."
        )
    rng = np.random.default_rng([seed, 5])
    take = np.zeros(site.n_train, dtype=bool)
    take[rng.choice(site.n_train, size=size, replace=False)] = True
    out = list(sites)
    out[pos] = SiteData(site.name, site.X_train[~take], site.y_train[~take], site.X_test,
                        site.y_test)  # fmt: skip
    return out, site.X_train[take], site.y_train[take], {"site": site.name, "records": size}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def attacked_data(sites: Sites, attack: SimulatedAttack | None) -> Callable[[int], Sites]:
    """The sites' records as they train in a round: the attackers' poisoned records from the
    attack's first round on (``sites``: every site as a list, or some by index)."""
    by_index = dict(enumerate(sites)) if isinstance(sites, Sequence) else dict(sites)
    poisoned = attack.poisoned(by_index) if attack is not None else {}
    if not poisoned:
        return lambda rnd: sites
    attacked: Sites
    if isinstance(sites, Sequence):
        attacked = [poisoned.get(i, s) for i, s in enumerate(sites)]
    else:
        attacked = {**by_index, **poisoned}
    start = attack.start_round if attack is not None else 1
    return lambda rnd: attacked if rnd >= start else sites


def _secure_stages(
    training: Any, sites: list[SiteData], n_params: int, options: dict[str, Any] | None
) -> tuple[SealUpdates, SecureSum, KeyHolderService]:
    """Keys made at the key holder before round 1; public material to the server and sites.
    ``options``: client-level DP's settings (clip, value bound, unweighted sum, denominator,
    every share required, the noise share)."""
    o = dict(options or {})
    setup = SecureSetup.from_training(
        training, [s.name for s in sites], [s.n_train for s in sites], n_params=n_params,
        clip=o.get("clip"), value_bound=o.get("value_bound"),
    )  # fmt: skip
    holder = KeyHolderService(setup, setup.key_holder)
    public = holder.keygen()
    weighted = bool(o.get("weighted", True))
    seal = SealUpdates(setup, public, weighted=weighted, noise=o.get("noise"))
    combine = SecureSum(setup, public, decrypt=holder.decrypt, weighted=weighted,
                        denominator=o.get("denominator"),
                        require_all=bool(o.get("require_all", False)))  # fmt: skip
    return seal, combine, holder


def _attack_stage(
    attack: Any | None, fed: FederatedData, seed: int, poison: Poison | None
) -> tuple[SimulatedAttack | None, np.ndarray]:
    n = len(fed.sites)
    if attack is None:
        return None, np.zeros(n, dtype=bool)
    n_classes = 2 if fed.task.kind == "binary" else len(fed.task.classes)
    atk = make_attack(attack, [s.name for s in fed.sites], seed, n_classes, poison)
    return atk, atk.mask(n)


def _federation(training: Any, server: ServerPlan, n_sites: int, size: int | None,
                root_info: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    return {
        "strategy": training.strategy,
        "prox_mu": prox_weight(training) if training.strategy == "fedprox" else None,
        **server.to_dict(),
        "clients_per_round": size,
        "n_sites": n_sites,
        "dropout": training.dropout,
        "straggler": training.straggler,
        "straggler_policy": "late updates are discarded (synchronous rounds)",
        "min_sites_per_round": training.min_sites_per_round,
        "fltrust_root": root_info,
    }


def _masking_stages(
    training: Any, counts: list[int], n_params: int, *, record: bool = False,
    options: dict[str, Any] | None = None,
) -> tuple[Any, Any]:  # fmt: skip
    """SecAgg+'s seal and combine stages, with the sites' protocol sessions in this process.
    ``options``: distributed DP's settings (clip, modulus, unweighted sum, fixed denominator,
    the noise share, conditional rounding and its draws)."""
    from privml.fl.secagg import SecAggParams
    from privml.fl.stages.masking import (
        MaskedSum,
        MaskingServer,
        SealMasked,
        SimulatedSites,
        seeded_uniforms,
    )
    from privml.fl.stages.secure import clip_bound

    o = dict(options or {})
    clip = float(o["clip"]) if "clip" in o else clip_bound(training)
    params = SecAggParams.from_training(training, n_params=n_params, clip=clip,
                                        max_weight=float(max(counts)))  # fmt: skip
    if "modulus" in o:
        params = replace(params, modulus=int(o["modulus"]))
    if "min_senders" in o:
        params = replace(params, min_senders=int(o["min_senders"]))
    server = MaskingServer(params, record=record)
    sites = SimulatedSites(params)
    weighted = bool(o.get("weighted", True))
    uniforms = o.get("uniforms") or seeded_uniforms(training.seed)
    seal = SealMasked(params, server, sites, clip, uniforms, weighted=weighted,
                      noise=o.get("noise"), rounding_bound=o.get("rounding_bound"))  # fmt: skip
    combine = MaskedSum(params, server, sites, clip, weighted=weighted,
                        denominator=o.get("denominator"),
                        centered=o.get("noise") is not None)  # fmt: skip
    return seal, combine


def _sealing(
    training: Any, local: LocalTraining, n_sites: int, n_params: int, secure: Any
) -> tuple[SiteStage, Any, Callable[[], Any]]:
    """Secure aggregation's seal stage, combine stage and results.json section."""
    # the counts the sites report (an attacker's poisoned records included)
    reported = [local.records(training.rounds)[i] for i in range(n_sites)]
    if training.secure_aggregation == "secagg+":
        m_seal, m_combine = _masking_stages(training, [s.n_train for s in reported], n_params,
                                            options=secure)  # fmt: skip
        return m_seal, m_combine, lambda: m_combine.describe(m_seal)
    if getattr(training, "secure_aggregation_checks", "none") != "none":
        from privml.fl.stages.secure_checks import checked_stages

        return checked_stages(training, [s.n_train for s in reported], n_params)
    seal, combine, holder = _secure_stages(training, reported, n_params, secure)
    return seal, combine, lambda: combine.describe(seal, holder.keygen_seconds)


def build_run(
    fed: FederatedData,
    spec: ModelSpec,
    training: Any,
    *,
    attack: Any | None = None,
    poison: Poison | None = None,
    rule: GradientRule | None = None,
    checkpoint_dir: Path | None = None,
    parts: PrivateParts | None = None,
    fingerprint: str | None = None,
) -> Run:
    """The stages of a run of ``training`` over ``fed`` (``parts``: what privacy and a feature
    map add, :func:`privml.fl.plan_private.private_parts`).

    Raises:
        ConfigError: attack sites or FLTrust root settings that do not fit the data.
    """
    parts = parts if parts is not None else PrivateParts(fed, spec)
    fed, spec = parts.fed, parts.spec
    server = ServerPlan.from_training(training)
    model, params0 = init_params(spec, training.seed)
    binary = fed.task.kind == "binary"
    rule = rule if rule is not None else MeanGradient(model, spec, binary=binary)
    atk, malicious = _attack_stage(attack, fed, training.seed, poison)
    stages: list[SiteStage] = ([atk] if atk is not None else []) + list(parts.site_stages)
    stateful: list[Stateful] = ([atk] if atk is not None else []) + list(parts.stateful)
    sites, root_info = list(fed.sites), None
    combine: Any = parts.combine if parts.combine is not None else CheckedAggregation(server)
    if server.aggregator == "fltrust":
        sites, X_root, y_root, root_info = _carve_root(
            sites, np.flatnonzero(malicious), server.server_data, training.seed
        )
        combine.root = lambda rnd, params: root_update(
            params, X_root, y_root, training=training, rnd=rnd, rule=rule
        )
    state = init_server_state(params0, server)
    make_rule = parts.make_rule(model, spec, binary) if parts.make_rule is not None else None
    local = LocalTraining(attacked_data(sites, atk), training, rule, make_rule=make_rule)
    sections: dict[str, Callable[[], Any]] = {"privacy": parts.privacy}
    if training.secure_aggregation != "none":
        seal, combine, sections["secure_aggregation"] = _sealing(
            training, local, len(sites), int(state.params.shape[0]), parts.secure
        )
        stages.append(seal)
    if atk is not None:
        sections["attack"] = atk.describe
    if parts.features is not None:
        sections["features"] = lambda: parts.features
    checkpoint = None
    if checkpoint_dir is not None:
        fp = fingerprint or run_fingerprint(fed, spec, training, attack)
        checkpoint = Checkpointing(checkpoint_dir, fp)
    uniform = UniformCohort.from_training(len(sites), training)
    cohort = parts.cohort if parts.cohort is not None else uniform
    plan = RoundsPlan(training.rounds, cohort, combine, ServerOptimizerStep(server.optimizer),
                      list(parts.server_stages), stateful, checkpoint,
                      training.min_sites_per_round)  # fmt: skip
    federation = _federation(training, server, len(sites),
                             uniform.size if parts.cohort is None else None, root_info)  # fmt: skip
    return Run(plan, SitePipeline(local, stages, malicious), model, spec, state, server, fed,
               atk, sections, federation, parts.finalize, parts.model)  # fmt: skip


def build_from_config(
    config: Any,
    fed: FederatedData,
    spec: ModelSpec,
    *,
    poison: Poison | None = None,
    checkpoint_dir: Path | None = None,
    ledger: Any | None = None,
    noise: Any | None = None,
    restored: dict[str, Any] | None = None,
) -> Run:
    """Every stage of ``config``'s run (privacy, feature map, attack, secure aggregation,
    robust rule, server optimizer, checkpoints) over ``fed``.

    Args:
        config: the run's config (the compatibility table has accepted it).
        fed, spec: the sites' encoded records and the model.
        poison: the backdoor's data poisoning for ``[attack] kind = "backdoor"``.
        checkpoint_dir: where each round's checkpoint goes (None: none).
        ledger, noise: private training's ledger and noise source.
        restored: a resumed run's stage states (its checkpoint's ``meta["stages"]``).
    """
    from privml.dp.randomness import NoiseSource, run_noise_source
    from privml.fl.plan_private import private_parts

    if noise is None and config.privacy.mode != "none":
        noise = run_noise_source(config.training.seed)
    source = noise if noise is not None else NoiseSource.fresh()
    parts = private_parts(config, fed, spec, ledger=ledger, noise=source, restored=restored)
    return build_run(
        fed, spec, config.training, attack=config.attack, poison=poison,
        checkpoint_dir=checkpoint_dir, parts=parts,
        fingerprint=config_fingerprint(config, fed, spec),
    )  # fmt: skip


def config_fingerprint(config: Any, fed: FederatedData, spec: ModelSpec) -> str:
    """What a checkpoint of ``config``'s run is bound to: :func:`run_fingerprint` of its
    training, attack, model and data, and its privacy and feature settings."""
    extra = json.dumps({"privacy": config.privacy.model_dump(mode="json"),
                        "model": config.model.model_dump(mode="json")}, sort_keys=True)  # fmt: skip
    base = run_fingerprint(fed, spec, config.training, config.attack)
    return hashlib.sha256((base + extra).encode()).hexdigest()
