"""From ``[privacy]`` and ``[model] features`` to the private stages of a run.

:func:`private_parts` is called by :func:`privml.fl.plan.build_from_config` before the rounds:
it checks the schema's bounds are public, plans every site's noise and spend
(:mod:`privml.dp.planning`), checks every site's whole planned spend against its budget (a
run that would overspend stops here: nothing is computed or spent), computes what is set up
once (a fixed feature map; each site's private input mean, booked), and returns the stages the
plan adds (:class:`PrivateParts`). On Flower each site builds its own part of the same stages
(:mod:`privml.fl.flower.site`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.data.federation import FederatedData, SiteData
from privml.dp.advice import client_level_warning
from privml.dp.features import HogFeatures, make_feature_map
from privml.dp.ledger import PrivacyLedger
from privml.dp.planning import (
    CENTER_CLIP,
    EpsilonCache,
    SampleBooker,
    check_dp_schema,
    plan_client_level,
    plan_sample_level,
    precheck,
)
from privml.dp.randomness import NoiseSource
from privml.errors import ConfigError
from privml.fl.rounds import Cohort, ServerStage, SiteStage, Stateful
from privml.fl.stages.cohort import UniformCohort, cohort_size
from privml.fl.stages.private import (
    CentralNoise,
    ClientAccounting,
    ClippedSum,
    ClipState,
    NoiseShare,
    SampleAccounting,
    client_cohort,
    client_privacy,
    dpsgd_rule,
    fold_shift,
    sample_privacy,
    site_centre,
)
from privml.models.nets import ModelSpec, build_model

__all__ = ["PrivateParts", "feature_map", "head_spec", "private_parts", "run_label"]


@dataclass
class PrivateParts:
    """What privacy (and a feature map) add to a run.

    Attributes:
        fed: the sites' records as the rounds train on them (feature-mapped, centred).
        spec: the spec of the trained model (the head on a feature map).
        make_rule: the DP-SGD rule factory (sample level), or None (plain SGD).
        cohort: the client sampler (client level), or None (uniform).
        site_stages, server_stages, stateful: stages the plan adds.
        combine: the combine step on plain updates (client level), or None.
        secure: secure aggregation's settings under client-level DP (clip, value bound,
            unweighted sum, fixed denominator, the noise share), or None.
        privacy: builds results.json ``privacy`` once the rounds are done.
        finalize: maps the trained parameters to the model on the sites' raw records (folds an
            input shift into the first layer's bias).
        model: wraps the trained model for its outputs (the feature map before the head).
        features: results.json ``features`` (the map), or None.
    """

    fed: FederatedData
    spec: ModelSpec
    make_rule: Callable[..., Any] | None = None
    cohort: Callable[[int], Cohort] | None = None
    site_stages: list[SiteStage] = field(default_factory=list)
    server_stages: list[ServerStage] = field(default_factory=list)
    stateful: list[Stateful] = field(default_factory=list)
    combine: Any | None = None
    secure: dict[str, Any] | None = None
    privacy: Callable[[], dict[str, Any]] = lambda: {"mode": "none"}
    finalize: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, p: p
    model: Callable[[nn.Module], nn.Module] = lambda m: m
    features: dict[str, Any] | None = None


def run_label(config: Any) -> str:
    """The run's label in the ledger (its charges are grouped by it)."""
    return f"{config.name}:{config.config_hash()[:12]}:{datetime.now(UTC).isoformat()}"


def feature_map(config: Any) -> HogFeatures | None:
    m = config.model
    return None if m.features == "none" else make_feature_map(m.features, m.image_shape)


def head_spec(spec: ModelSpec, fmap: HogFeatures | None) -> ModelSpec:
    """The spec of the model the rounds train: on the feature map's output when there is one."""
    if fmap is None:
        return spec
    if spec.n_features != fmap.n_inputs:
        raise ConfigError(
            f"[model] image_shape {list(fmap.image_shape)} has {fmap.n_inputs} pixels but the "
            f"data has {spec.n_features} encoded features"
        )
    return replace(spec, n_features=fmap.n_features, image_shape=None)


def _with_features(fed: FederatedData, fmap: HogFeatures) -> FederatedData:
    sites = [SiteData(s.name, fmap.transform(s.X_train), s.y_train, fmap.transform(s.X_test),
                      s.y_test) for s in fed.sites]  # fmt: skip
    return replace(fed, sites=sites)


def _shifted(fed: FederatedData, center: np.ndarray) -> FederatedData:
    c = center.astype(np.float32)
    sites = [SiteData(s.name, s.X_train - c, s.y_train, s.X_test - c, s.y_test)
             for s in fed.sites]  # fmt: skip
    return replace(fed, sites=sites)


def _without(cohort: Callable[[int], Cohort], empty: np.ndarray) -> Callable[[int], Cohort]:
    """``cohort`` with the sites that hold no training record counted as dropped (DP-SGD
    needs records to sample)."""

    def sample(rnd: int) -> Cohort:
        c = cohort(rnd)
        idle = np.intersect1d(c.sampled, empty)
        stragglers = np.setdiff1d(c.stragglers, idle)
        return Cohort(c.sampled, np.union1d(c.dropped, idle).astype(np.int64), stragglers)

    return sample


def _composite(fmap: HogFeatures | None) -> Callable[[nn.Module], nn.Module]:
    if fmap is None:
        return lambda m: m
    return lambda head: nn.Sequential(fmap, *head.children())  # type: ignore[arg-type]


def _linear_first(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential) and isinstance(model[0], nn.Linear)


def _exact_centre(fed: FederatedData, fmap: HogFeatures) -> np.ndarray:
    """The exact mean feature (no DP: only for runs with privacy off)."""
    total, n = np.zeros(fmap.n_features), 0
    for s in fed.sites:
        if s.n_train:
            total += fmap.histogram_array(s.X_train).sum(0)
            n += s.n_train
    return total / max(n, 1)


def private_parts(
    config: Any,
    fed: FederatedData,
    spec: ModelSpec,
    *,
    ledger: PrivacyLedger | None,
    noise: NoiseSource,
    restored: dict[str, Any] | None = None,
) -> PrivateParts:
    """The private stages of ``config``'s run over ``fed`` (see the module docstring).

    ``restored`` is a resumed run's stage states (from its checkpoint): what was booked and
    set up then is continued, not done again.

    Raises:
        SchemaError: DP with bounds or categories read off the data (exit 2).
        ConfigError: a noise multiplier that overshoots the target epsilon (exit 2).
        BudgetExceededError: a site's planned spend does not fit its remaining budget (exit 3).
    """
    fmap = feature_map(config)
    hspec = head_spec(spec, fmap)
    mode = config.privacy.mode
    if mode == "none":
        if fmap is not None:
            fmap.set_center(_exact_centre(fed, fmap))
            fed = _with_features(fed, fmap)
        return PrivateParts(fed, hspec, model=_composite(fmap),
                            features=fmap.to_dict() if fmap else None)  # fmt: skip
    check_dp_schema(config, fed)
    assert ledger is not None
    if mode == "sample":
        return _sample_parts(config, fed, hspec, fmap, ledger, noise, restored or {})
    if config.training.secure_aggregation == "secagg+" and fmap is None:
        from privml.fl.stages.distributed import distributed_parts

        n_params = sum(x.numel() for x in build_model(hspec).parameters())
        return distributed_parts(config, fed, hspec, ledger, noise, restored or {},
                                 n_params=n_params, run_id=run_label(config))  # fmt: skip
    return _client_parts(config, fed, hspec, fmap, ledger, noise, restored or {})


def _sample_centre(
    fed: FederatedData, fmap: HogFeatures | None, plan: Any, booker: SampleBooker,
    noise: NoiseSource,
) -> np.ndarray:  # fmt: skip
    """Every site's private mean (booked at the site), averaged with the public site sizes."""
    width = fmap.n_features if fmap is not None else fed.n_features
    total, n_total = np.zeros(width), 0
    for i, s in enumerate(fed.sites):
        X = fmap.histogram_array(s.X_train) if fmap is not None else s.X_train
        est = site_centre(X, index=i, plan=plan, booker=booker, noise=noise,
                          clip=1.0 if fmap is not None else CENTER_CLIP)  # fmt: skip
        if est is not None:
            total += est * s.n_train
            n_total += s.n_train
    return total / max(n_total, 1)


@dataclass
class _Centre:
    """The input (or feature) centre of a run, computed once, kept in the checkpoint."""

    value: list[float] | None = None
    name = "centre"

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = state.get("value")


def _sample_parts(
    config: Any, fed: FederatedData, hspec: ModelSpec, fmap: HogFeatures | None,
    ledger: PrivacyLedger, noise: NoiseSource, restored: dict[str, Any],
) -> PrivateParts:  # fmt: skip
    t, p = config.training, config.privacy
    cache = EpsilonCache(delta=p.delta, accountant=p.accountant)
    center = p.center_inputs and (fmap is not None or _linear_first(build_model(hspec)))
    cohort = UniformCohort.from_training(len(fed.sites), t)
    schedule = [cohort(r).trained for r in range(1, t.rounds + 1)]
    plan = plan_sample_level(
        [s.name for s in fed.sites], [s.n_train for s in fed.sites], schedule, privacy=p,
        batch_size=t.batch_size, local_epochs=t.local_epochs, center=center, cache=cache,
    )  # fmt: skip
    booker = SampleBooker(ledger, plan, cache, run_label(config))
    accounting, centre = SampleAccounting(booker), _Centre()
    if restored:  # a resumed run: what it booked and its centre
        accounting.load_state_dict(restored["accounting"])
        centre.load_state_dict(restored.get("centre", {}))
    spent = {sp.name: b.epsilon for sp, b in zip(plan.sites, booker.books, strict=True)}
    precheck(ledger, [(sp.name, max(0.0, sp.epsilon - spent[sp.name])) for sp in plan.sites
                      if sp.total_steps], p.delta)  # fmt: skip
    if center and centre.value is None:
        centre.value = _sample_centre(fed, fmap, plan, booker, noise).tolist()
    shift = None
    if centre.value is not None:
        if fmap is not None:
            fmap.set_center(np.asarray(centre.value))
        else:
            shift = np.asarray(centre.value)
            fed = _shifted(fed, shift)
    if fmap is not None:
        fed = _with_features(fed, fmap)
    sigmas = np.array([sp.noise_multiplier for sp in plan.sites])
    make_rule = lambda model, spec, binary: dpsgd_rule(  # noqa: E731
        model, spec, binary=binary, sigmas=sigmas, max_grad_norm=p.max_grad_norm,
        batch_size=t.batch_size, local_epochs=t.local_epochs, noise=noise,
    )  # fmt: skip
    centering = None if not center else (
        "hog features centred on a private mean" if fmap is not None else
        f"inputs centred on a private mean (records clipped to L2 norm {CENTER_CLIP}), "
        "folded into the first layer's bias")  # fmt: skip
    empty = np.flatnonzero([s.n_train == 0 for s in fed.sites]).astype(np.int64)
    return PrivateParts(
        fed, hspec, make_rule=make_rule, site_stages=[accounting],
        cohort=_without(cohort, empty) if len(empty) else None,
        stateful=[accounting, centre],
        privacy=lambda: sample_privacy(p, plan, booker, ledger, noise, centering),
        finalize=(lambda m, params: fold_shift(m, params, shift)) if shift is not None
        else (lambda m, params: params),
        model=_composite(fmap), features=fmap.to_dict() if fmap else None,
    )  # fmt: skip


def _client_centre(
    fed: FederatedData, fmap: HogFeatures, plan: Any, sample: Callable[[int], Cohort],
    noise: NoiseSource,
) -> np.ndarray:  # fmt: skip
    """One extra sampled round: each sampled client sends its mean feature vector (norm <= 1),
    the server adds N(0, z^2) to the sum; accounted as one more DP-FedAvg round."""
    cohort = sample(0)
    total = torch.zeros(fmap.n_features, dtype=torch.float64)
    for i in cohort.trained:
        s = fed.sites[int(i)]
        if s.n_train:
            total += torch.from_numpy(fmap.histogram_array(s.X_train).mean(0).astype(np.float64))
    total += noise.stream("dp-fedavg", 0).normal(fmap.n_features, dtype=torch.float64) * (
        plan.noise_multiplier
    )
    return (total / (plan.sampling_rate * plan.n_clients)).numpy()


def _client_parts(
    config: Any, fed: FederatedData, hspec: ModelSpec, fmap: HogFeatures | None,
    ledger: PrivacyLedger, noise: NoiseSource, restored: dict[str, Any],
) -> PrivateParts:  # fmt: skip
    t, p = config.training, config.privacy
    n = len(fed.sites)
    cache = EpsilonCache(delta=p.delta, accountant=p.accountant)
    plan = plan_client_level(n, cohort_size(n, t) / n, t.rounds, privacy=p,
                             center=fmap is not None and p.center_inputs, cache=cache)  # fmt: skip
    _warn_noise(plan, hspec)
    names = [s.name for s in fed.sites]
    accounting = ClientAccounting(ledger, plan, names, run_label(config))
    clip = ClipState(float(p.clip), p.adaptive_clip, p.target_quantile, p.clip_lr)
    centre = _Centre()
    if restored:
        accounting.load_state_dict(restored["client accounting"])
        clip.load_state_dict(restored["clip"])
        centre.load_state_dict(restored.get("centre", {}))
    if not accounting.booked:
        precheck(ledger, [(nm, plan.epsilon) for nm in names], p.delta)
        accounting.book()  # every client's whole spend, before its first update leaves
    empty = [i for i, s in enumerate(fed.sites) if s.n_train == 0]
    sample = client_cohort(n, plan.sampling_rate, t.dropout, noise, empty)
    if fmap is not None:
        if p.center_inputs and centre.value is None:
            centre.value = _client_centre(fed, fmap, plan, sample, noise).tolist()
        if centre.value is not None:
            fmap.set_center(np.asarray(centre.value))
        fed = _with_features(fed, fmap)
    denom = plan.sampling_rate * plan.n_clients
    parts = PrivateParts(fed, hspec, cohort=sample, stateful=[accounting, clip, centre],
                         model=_composite(fmap),
                         features=fmap.to_dict() if fmap else None)  # fmt: skip
    secure = t.secure_aggregation != "none"
    if secure:
        share_std = plan.noise_multiplier * p.clip / np.sqrt(2.0)  # the smallest cohort (2)
        parts.secure = {"clip": float(p.clip), "value_bound": float(p.clip + 8 * share_std),
                        "weighted": False, "denominator": denom, "require_all": True,
                        "noise": NoiseShare(float(p.clip), plan.noise_multiplier, noise,
                                            8 * share_std)}  # fmt: skip
    else:
        bound = t.aggregator_params.get("max_norm") if t.aggregator == "norm_bound" else None
        parts.combine = ClippedSum(clip, t.max_update_norm, bound)
        parts.server_stages = [CentralNoise(clip, plan.update_noise_multiplier, denom,
                                            plan.count_stddev, noise)]  # fmt: skip
    parts.privacy = lambda: client_privacy(p, plan, clip, accounting, ledger, noise, names,
                                           secure)  # fmt: skip
    return parts


def _warn_noise(plan: Any, hspec: ModelSpec) -> None:
    advice = client_level_warning(
        noise_multiplier=plan.update_noise_multiplier,
        n_params=sum(x.numel() for x in build_model(hspec).parameters()),
        clients=plan.sampling_rate * plan.n_clients, n_sites=plan.n_clients,
        epsilon=plan.epsilon,
    )  # fmt: skip
    if advice is not None:
        warnings.warn(advice, UserWarning, stacklevel=3)
