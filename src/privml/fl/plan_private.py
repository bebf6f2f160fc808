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
    OneUpdatePerRound,
    SampleAccounting,
    client_cohort,
    client_privacy,
    dpsgd_rule,
    fold_shift,
    sample_privacy,
    site_centre,
)
from privml.models.nets import ModelSpec, build_model

__all__ = [
    "CoordinatorPrivacy",
    "PrivateParts",
    "SitePrivacy",
    "coordinator_private_parts",
    "feature_map",
    "head_spec",
    "private_parts",
    "run_label",
    "site_private_parts",
]


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
    if m.features == "none":
        return None
    return make_feature_map(m.features, m.image_shape, **m.hog.options())


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
                                 n_params=n_params, run_id=run_label(config),
                                 parts_type=PrivateParts)  # fmt: skip
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


def _sample_plan(
    config: Any, names: list[str], sizes: list[int], center: bool, cache: EpsilonCache
) -> Any:  # fmt: skip
    """The sample-level plan of ``config`` for sites of these sizes (the schedule from the
    seeded, data-independent cohort sampler)."""
    t, p = config.training, config.privacy
    cohort = UniformCohort.from_training(len(names), t)
    schedule = [cohort(r).trained for r in range(1, t.rounds + 1)]
    return plan_sample_level(
        names, sizes, schedule, privacy=p, batch_size=t.batch_size,
        local_epochs=t.local_epochs, center=center, cache=cache,
    )  # fmt: skip


def _dpsgd_factory(config: Any, sigmas: np.ndarray, noise: NoiseSource) -> Callable[..., Any]:
    t, p = config.training, config.privacy
    return lambda model, spec, binary: dpsgd_rule(
        model, spec, binary=binary, sigmas=sigmas, max_grad_norm=p.max_grad_norm,
        batch_size=t.batch_size, local_epochs=t.local_epochs, noise=noise,
    )  # fmt: skip


def _centering(center: bool, features: bool) -> str | None:
    if not center:
        return None
    if features:
        return "hog features centred on a private mean"
    return (f"inputs centred on a private mean (records clipped to L2 norm {CENTER_CLIP}), "
            "folded into the first layer's bias")  # fmt: skip


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
    plan = _sample_plan(config, [s.name for s in fed.sites], [s.n_train for s in fed.sites],
                        center, cache)  # fmt: skip
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
    make_rule = _dpsgd_factory(config, sigmas, noise)
    centering = _centering(center, fmap is not None)
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
    parts = PrivateParts(fed, hspec, cohort=sample, stateful=[accounting, clip, centre],
                         model=_composite(fmap),
                         features=fmap.to_dict() if fmap else None)  # fmt: skip
    secure = t.secure_aggregation != "none"
    parts.combine, parts.server_stages, parts.secure = _client_server(t, p, plan, clip, noise)
    if parts.secure is not None:
        parts.secure["noise"] = client_noise_share(p, plan, noise)
    parts.privacy = lambda: client_privacy(p, plan, clip, accounting.run_id, ledger, noise, names,
                                           secure)  # fmt: skip
    return parts


def _client_server(
    t: Any, p: Any, plan: Any, clip: ClipState, noise: NoiseSource
) -> tuple[ClippedSum | None, list[ServerStage], dict[str, Any] | None]:
    """DP-FedAvg's server side: the combine step and central noise on plain updates, or the
    secure sum's settings (sites clip and add noise shares; the sum is unweighted, divided by
    the expected number of clients, and needs every share)."""
    denom = plan.sampling_rate * plan.n_clients
    if t.secure_aggregation != "none":
        share_std = plan.noise_multiplier * p.clip / np.sqrt(2.0)  # the smallest cohort (2)
        return None, [], {"clip": float(p.clip), "value_bound": float(p.clip + 8 * share_std),
                          "weighted": False, "denominator": denom,
                          "require_all": True}  # fmt: skip
    bound = t.aggregator_params.get("max_norm") if t.aggregator == "norm_bound" else None
    stages: list[ServerStage] = [CentralNoise(clip, plan.update_noise_multiplier, denom,
                                              plan.count_stddev, noise)]  # fmt: skip
    return ClippedSum(clip, t.max_update_norm, bound), stages, None


def client_noise_share(p: Any, plan: Any, noise: NoiseSource) -> NoiseShare:
    """Each site's share of DP-FedAvg's noise under secure aggregation (drawn at the site)."""
    share_std = plan.noise_multiplier * p.clip / np.sqrt(2.0)
    return NoiseShare(float(p.clip), plan.noise_multiplier, noise, 8 * share_std)


def _warn_noise(plan: Any, hspec: ModelSpec) -> None:
    advice = client_level_warning(
        noise_multiplier=plan.update_noise_multiplier,
        n_params=sum(x.numel() for x in build_model(hspec).parameters()),
        clients=plan.sampling_rate * plan.n_clients, n_sites=plan.n_clients,
        epsilon=plan.epsilon,
    )  # fmt: skip
    if advice is not None:
        warnings.warn(advice, UserWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# The same stages split between the parties of a deployment (Flower)
# --------------------------------------------------------------------------------------------


@dataclass
class SitePrivacy:
    """One site's part of private training in a deployment, built by the site from its own
    config, records, ledger and noise source: nothing in it comes from the server.

    Attributes:
        make_rule: DP-SGD's rule factory (sample level), or None.
        stages: the site's accounting stages (they book before the update leaves).
        secure: the seal's settings under client-level DP (clip, value bound, unweighted sum,
            the noise share drawn at the site), or None.
        centre: the site's private mean of its inputs (booked here), for the coordinator.
        centring: whether the run centres the inputs (the site then expects the centre).
        booked: the epsilon this site has booked for the run so far.
        planned: the epsilon this site planned for the whole run (checked against its budget).
    """

    make_rule: Callable[..., Any] | None = None
    stages: list[SiteStage] = field(default_factory=list)
    secure: dict[str, Any] | None = None
    centre: np.ndarray | None = None
    centring: bool = False
    booked: Callable[[], float] = lambda: 0.0
    planned: float = 0.0


def site_private_parts(
    config: Any, site: SiteData, index: int, names: list[str], spec: ModelSpec, *,
    ledger: PrivacyLedger, noise: NoiseSource, estimate_centre: bool = True,
) -> SitePrivacy:  # fmt: skip
    """Site ``index``'s private stages for one run: its plan (from the public config and its
    own size), the check of its whole planned spend against its own budget (refused: nothing
    computed or spent), and what it books before training (client level: the whole run;
    sample level: its private input mean, unless ``estimate_centre`` is False: a site that
    rejoins a run whose centre is already combined).

    Raises:
        BudgetExceededError: the site's planned spend does not fit its remaining budget.
    """
    t, p = config.training, config.privacy
    cache = EpsilonCache(delta=p.delta, accountant=p.accountant)
    if p.mode == "client":
        plan = plan_client_level(len(names), cohort_size(len(names), t) / len(names), t.rounds,
                                 privacy=p, center=False, cache=cache)  # fmt: skip
        accounting = ClientAccounting(ledger, plan, [site.name], run_label(config))
        precheck(ledger, [(site.name, plan.epsilon)], p.delta)
        accounting.book()  # the whole run's spend, before the first update leaves
        clip = ClipState(float(p.clip), p.adaptive_clip, p.target_quantile, p.clip_lr)
        secure = _client_server(t, p, plan, clip, noise)[2]
        if secure is not None:
            secure["noise"] = client_noise_share(p, plan, noise)
        once = OneUpdatePerRound(site.name, t.rounds)
        return SitePrivacy(stages=[once], secure=secure, booked=lambda: plan.epsilon,
                           planned=plan.epsilon)  # fmt: skip
    center = p.center_inputs and _linear_first(build_model(spec))
    sizes = [0] * len(names)
    sizes[index] = site.n_train
    splan = _sample_plan(config, names, sizes, center, cache)
    booker = SampleBooker(ledger, splan, cache, run_label(config))
    sp = splan.sites[index]
    if sp.total_steps:
        precheck(ledger, [(sp.name, sp.epsilon)], p.delta)
    est = None
    if center and estimate_centre:
        est = site_centre(site.X_train, index=index, plan=splan, booker=booker, noise=noise)
    sigmas = np.array([s.noise_multiplier for s in splan.sites])
    return SitePrivacy(
        make_rule=_dpsgd_factory(config, sigmas, noise), stages=[SampleAccounting(booker)],
        centre=est, centring=center, booked=lambda: booker.books[index].epsilon,
        planned=sp.epsilon,
    )  # fmt: skip


def _no_privacy(reported: dict[str, list[list[float]]], run: str) -> dict[str, Any]:
    return {"mode": "none"}


@dataclass
class CoordinatorPrivacy:
    """The coordinator's part of private training in a deployment: the cohort sampler, the
    combine step and central noise (client level), the secure sum's settings, whether the
    sites' private input means are to be combined, and results.json ``privacy`` built from
    what the sites report having booked (the coordinator books nothing: its view of the
    budgets is informational)."""

    cohort: Callable[[int], Cohort] | None = None
    combine: Any | None = None
    server_stages: list[ServerStage] = field(default_factory=list)
    stateful: list[Stateful] = field(default_factory=list)
    secure: dict[str, Any] | None = None
    centre: bool = False
    describe: Callable[[dict[str, list[list[float]]], str], dict[str, Any]] = _no_privacy


def coordinator_private_parts(
    config: Any, names: list[str], sizes: list[int], spec: ModelSpec, noise: NoiseSource
) -> CoordinatorPrivacy:
    """The coordinator's private stages for sites ``names`` of ``sizes`` training records
    (public: each site reports its count in the handshake)."""
    t, p = config.training, config.privacy
    n = len(names)
    cache = EpsilonCache(delta=p.delta, accountant=p.accountant)
    empty = [i for i, c in enumerate(sizes) if c == 0]
    if p.mode == "client":
        plan = plan_client_level(n, cohort_size(n, t) / n, t.rounds, privacy=p, center=False,
                                 cache=cache)  # fmt: skip
        _warn_noise(plan, spec)
        clip = ClipState(float(p.clip), p.adaptive_clip, p.target_quantile, p.clip_lr)
        combine, stages, secure = _client_server(t, p, plan, clip, noise)

        def client(reported: dict[str, list[list[float]]], run: str) -> dict[str, Any]:
            out = client_privacy(p, plan, clip, run, None, noise, names, secure is not None)
            return _reported(out, reported)

        return CoordinatorPrivacy(client_cohort(n, plan.sampling_rate, t.dropout, noise, empty),
                                  combine, stages, [clip], secure, describe=client)  # fmt: skip
    center = p.center_inputs and _linear_first(build_model(spec))
    splan = _sample_plan(config, names, sizes, center, cache)
    uniform = UniformCohort.from_training(n, t)

    def sample(reported: dict[str, list[list[float]]], run: str) -> dict[str, Any]:
        booker = SampleBooker(None, splan, cache, run)  # type: ignore[arg-type]  # a view
        for i, sp in enumerate(splan.sites):
            rows = [[int(r), float(e)] for r, e in reported.get(sp.name, [])]
            booker.books[i].by_round = rows
            booker.books[i].epsilon = max((e for _, e in rows), default=0.0)
        return _reported(sample_privacy(p, splan, booker, None, noise, _centering(center, False)),
                         reported)  # fmt: skip

    cohort = _without(uniform, np.asarray(empty, dtype=np.int64)) if empty else None
    return CoordinatorPrivacy(cohort, centre=center, describe=sample)


def _reported(out: dict[str, Any], reported: dict[str, list[list[float]]]) -> dict[str, Any]:
    """results.json ``privacy`` of a deployment: the sites' own figures where they sent them."""
    for name, rows in reported.items():
        if rows and name in out["epsilon_per_site"]:
            out["epsilon_per_site"][name] = max(float(e) for _, e in rows)
    out["epsilon"] = max(out["epsilon_per_site"].values(), default=0.0)
    out["booking"] = (out["booking"] + "; each site books in its own ledger and refuses a "
                      "round it cannot afford. The figures here are what the sites reported "
                      "(informational: the coordinator books nothing and cannot spend a "
                      "site's budget)")  # fmt: skip
    out["ledger"] = "at each site (its own)"
    out["reported_by_sites"] = {k: [list(r) for r in v] for k, v in reported.items()}
    return out
