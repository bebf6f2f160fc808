"""``privml audit``: run the attacks against the configured model, with and without defences.

:func:`run_audit` trains the configured model through the pipeline (or loads a signed run
folder), runs the chosen attacks and writes an ``audit`` section into the run's results.json:
one row per (attack, metric) with the value without the defence, with it, and what the defence
costs in clean accuracy. :func:`quick_audit` is the membership inference every ``privml run``
reports beside its epsilon (a fraction of a second).

Attacks (``--attacks``, default ``[audit] attacks``):

==============  =================================================  ==========================
name            attack                                             defence measured
==============  =================================================  ==========================
membership      loss threshold (Yeom et al. 2018)                  DP training ([privacy])
lira            offline LiRA with shadow models (Carlini 2022)     DP training ([privacy])
evasion         PGD at each budget (Madry et al. 2018)             PGD adversarial training
inversion       gradient inversion of one site's update (Geiping)  DP-SGD noise; secure agg.
backdoor        trigger poisoning + model replacement (Bagdasaryan) privml's backdoor defence
poisoning       the Byzantine update attack of [attack] per rule   robust aggregation rules
==============  =================================================  ==========================

The model is trained as configured but without the simulated attackers of ``[attack]`` (the
backdoor and poisoning attacks simulate them themselves, with and without defences).

For membership inference the "defence" is the configured DP training: with ``[privacy] mode``
set, the audit also trains the same model without DP to show what DP removes; without it, the
"with defence" column stays empty. The shadow models of LiRA are trained centrally with the
target's architecture and SGD settings (``rounds * local_epochs`` epochs), non-privately:
an attacker may calibrate however it likes, and the DP bound holds against any attack.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privml.config import Config
from privml.data.federation import FederatedData
from privml.errors import UsageError
from privml.models.nets import ModelSpec, load_flat_params
from privml.security.attacks.membership import PrivacyAuditError, loss_threshold_attack

__all__ = [
    "ATTACKS",
    "AuditReport",
    "AuditRow",
    "AuditSettings",
    "quick_audit",
    "run_audit",
]

ATTACKS: tuple[str, ...] = ("membership", "lira", "evasion", "inversion", "backdoor", "poisoning")
"""The attacks ``privml audit`` knows, in the order it runs them."""

AUDIT_SCHEMA = "privml-audit/1"


# --------------------------------------------------------------------------------------------
# Settings and report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditSettings:
    """How the audit runs each attack (from ``[audit]``; see docs/security.md)."""

    attacks: tuple[str, ...] = ATTACKS
    shadow_models: int = 8
    max_records: int = 2000
    confidence: float = 0.95
    strict: bool = True
    evasion_norm: str = "inf"
    evasion_budgets: tuple[float, ...] = (0.02, 0.05, 0.1)
    evasion_steps: int = 20
    adversarial_eps: float = 0.1
    adversarial_method: str = "pgd"
    inversion_records: int = 1
    inversion_noise_multiplier: float = 1.0
    inversion_iterations: int = 300
    poisoning_aggregators: tuple[str, ...] = ("fedavg", "median", "trimmed_mean", "krum")
    seed: int = 0

    @classmethod
    def from_config(cls, config: Config) -> AuditSettings:
        """Read ``[audit]``, keeping these defaults for keys the config does not have."""
        a = config.audit
        kw: dict[str, Any] = {"seed": config.training.seed}
        for f in cls.__dataclass_fields__:
            if f == "seed" or not hasattr(a, f):
                continue
            v = getattr(a, f)
            kw[f] = tuple(v) if isinstance(v, list) else v
        if "attacks" in kw:
            kw["attacks"] = check_attacks(kw["attacks"])
        return cls(**kw)


def check_attacks(names: Sequence[str] | str) -> tuple[str, ...]:
    """Validate attack names (a list, or a comma-separated string; ``all`` for every one)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if list(names) == ["all"]:
        return ATTACKS
    bad = [n for n in names if n not in ATTACKS]
    if bad or not names:
        raise UsageError(
            f"The 'attacks' parameter must list some of {list(ATTACKS)} (or 'all'). "
            f"Got {list(names)!r} instead."
        )
    return tuple(n for n in ATTACKS if n in names)


@dataclass
class AuditRow:
    """One line of the audit table.

    ``defence_cost`` is the clean accuracy the defence loses (0-1; negative: it gained),
    None when not applicable. ``worse`` says which direction is bad for the defender
    (``"higher"``: attack success, AUC, epsilon; ``"lower"``: accuracy, reconstruction error).
    """

    attack: str
    metric: str
    without_defence: float | None
    with_defence: float | None
    defence: str | None
    defence_cost: float | None = None
    worse: str = "higher"
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AuditReport:
    """Everything an audit measured: the table rows and each attack's detailed results."""

    rows: list[AuditRow]
    details: dict[str, Any]
    violations: list[str]
    seconds: float
    settings: AuditSettings
    run_dir: str | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "schema": AUDIT_SCHEMA,
            "attacks": list(s.attacks),
            "rows": [r.to_dict() for r in self.rows],
            "details": self.details,
            "violations": self.violations,
            "errors": self.errors,
            "seconds": self.seconds,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items()},
        }


# --------------------------------------------------------------------------------------------
# Quick audit (every run)
# --------------------------------------------------------------------------------------------


def _with_params(model: nn.Module, params: torch.Tensor | None) -> nn.Module:
    m = copy.deepcopy(model)
    if params is not None:
        load_flat_params(m, params.detach().to(torch.float32))
    m.eval()
    return m


def _cap(X: np.ndarray, y: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if len(y) <= n:
        return X, y
    idx = np.sort(np.random.default_rng(seed).choice(len(y), size=n, replace=False))
    return X[idx], y[idx]


def _privacy_eps(privacy: Mapping[str, Any] | None) -> tuple[float | None, float]:
    """The accountant's epsilon (None for non-private training) and the delta to audit at."""
    if not privacy or privacy.get("mode", "none") == "none":
        return None, float((privacy or {}).get("delta") or 1e-5)
    eps = privacy.get("epsilon")
    if eps is None:
        eps = privacy.get("epsilon_spent")
    delta = privacy.get("delta") or 1e-5
    return (None if eps is None else float(eps)), float(delta)


def quick_audit(
    model: nn.Module,
    params: torch.Tensor | None,
    fed: FederatedData,
    *,
    privacy: Mapping[str, Any] | None = None,
    seed: int = 0,
    strict: bool = True,
    max_records: int = 2000,
) -> dict[str, Any]:
    """Membership inference (loss threshold) on a trained model: measured leakage for the report.

    Members are the sites' pooled training records, non-members their pooled held-out test
    records (balanced by subsampling; at most ``max_records`` each).

    Args:
        model: the trained architecture (a torch module mapping encoded records to logits).
        params: its final flat parameters (loaded into a copy), or None if already loaded.
        fed: the federation it was trained on.
        privacy: results.json's ``privacy`` section (``mode``, ``epsilon``, ``delta``); the
            empirical lower bound is compared with its epsilon.
        seed: seed of the subsampling and the threshold split.
        strict: raise :class:`PrivacyAuditError` when the lower bound exceeds the
            accountant's epsilon (the model should not be released).

    Returns:
        results.json's ``audit`` section: ``{"quick": True, "membership": {...}, "summary"}``.
    """
    t0 = time.perf_counter()
    m = _with_params(model, params)
    eps, delta = _privacy_eps(privacy)
    X_in, y_in = _cap(*fed.pooled_train(), max_records, seed)
    X_out, y_out = _cap(*fed.pooled_test(), max_records, seed + 1)
    res = loss_threshold_attack(
        m, (X_in, y_in), (X_out, y_out), delta=delta, accountant_epsilon=eps, seed=seed,
        strict=strict,
    )  # fmt: skip
    summary = (
        f"membership inference (loss threshold): AUC {res.auc:.3f}, TPR at 1% FPR "
        f"{res.tpr_at_fpr['0.01']:.3f}; empirical epsilon >= {res.empirical_epsilon:.2f}"
        + (f" vs accountant epsilon {eps:.2f}" if eps is not None else " (non-private model)")
    )
    return {
        "schema": AUDIT_SCHEMA,
        "quick": True,
        "membership": res.to_dict(),
        "violations": [summary] if res.violation else [],
        "summary": summary,
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------------------------
# Full audit
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    config: Config
    fed: FederatedData
    spec: ModelSpec
    model: nn.Module  # the configured (possibly DP) model, final parameters loaded
    privacy: dict[str, Any]
    settings: AuditSettings
    stage: Callable[[str], None]
    _plain: nn.Module | None = None

    @property
    def private(self) -> bool:
        return self.privacy.get("mode", "none") != "none"

    def plain_model(self) -> nn.Module:
        """The same model trained without DP (the configured one when DP is off)."""
        if not self.private:
            return self.model
        if self._plain is None:
            from privml.pipeline import run as run_pipeline

            self.stage("training the same model without DP (membership baseline)")
            cfg = _clean_config(self.config)
            cfg.privacy.mode = "none"
            cfg.inference.encrypted = False
            out = run_pipeline(cfg, write=False)
            self._plain = _with_params(out.training.model, out.training.params)
        return self._plain

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fed.pooled_test()

    def dp_label(self) -> str | None:
        if not self.private:
            return None
        eps = self.privacy.get("epsilon")
        return f"{self.privacy.get('mode')}-level DP" + (
            f" (epsilon {float(eps):.2f})" if eps is not None else ""
        )


def _acc(model: nn.Module, X: np.ndarray, y: np.ndarray) -> float:
    from privml.security.attacks.evasion import accuracy

    return accuracy(model, X, y)


def _membership(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    s = ctx.settings
    eps, delta = _privacy_eps(ctx.privacy)
    X_in, y_in = _cap(*ctx.fed.pooled_train(), s.max_records, s.seed)
    X_out, y_out = _cap(*ctx.fed.pooled_test(), s.max_records, s.seed + 1)
    plain = ctx.plain_model()
    r0 = loss_threshold_attack(plain, (X_in, y_in), (X_out, y_out), delta=delta, seed=s.seed)
    detail: dict[str, Any] = {"without_defence": r0.to_dict()}
    r1 = None
    if ctx.private:
        r1 = loss_threshold_attack(
            ctx.model, (X_in, y_in), (X_out, y_out), delta=delta, accountant_epsilon=eps,
            seed=s.seed, strict=False,
        )  # fmt: skip
        detail["with_defence"] = r1.to_dict()
        if r1.violation:
            violations.append(
                f"membership: empirical epsilon {r1.empirical_epsilon:.3f} > accountant "
                f"epsilon {eps}"
            )
    return _mia_rows("membership (loss threshold)", r0, r1, ctx), detail


def _mia_rows(name: str, r0: Any, r1: Any, ctx: _Context) -> list[AuditRow]:
    Xt, yt = ctx.test()
    cost = _acc(ctx.plain_model(), Xt, yt) - _acc(ctx.model, Xt, yt) if r1 is not None else None
    d = ctx.dp_label()
    eps = _privacy_eps(ctx.privacy)[0]
    note = None if r1 is None else f"accountant epsilon {eps}"
    return [
        AuditRow(name, "AUC", r0.auc, r1.auc if r1 else None, d, cost),
        AuditRow(
            name,
            "TPR at 1% FPR",
            r0.tpr_at_fpr["0.01"],
            r1.tpr_at_fpr["0.01"] if r1 else None,
            d,
            cost,
        ),  # fmt: skip
        AuditRow(
            name,
            "empirical epsilon (lower bound)",
            r0.empirical_epsilon,
            r1.empirical_epsilon if r1 else None,
            d,
            cost,
            note=note,
        ),  # fmt: skip
    ]


def _lira(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.security.attacks.membership import lira_attack, sgd_shadow_trainer

    s, t = ctx.settings, ctx.config.training
    eps, delta = _privacy_eps(ctx.privacy)
    n = min(s.max_records, 1000)
    X_in, y_in = _cap(*ctx.fed.pooled_train(), n, s.seed)
    X_out, y_out = _cap(*ctx.fed.pooled_test(), n, s.seed + 1)
    trainer = sgd_shadow_trainer(
        ctx.spec, lr=t.lr, epochs=max(1, t.rounds * t.local_epochs), batch_size=t.batch_size,
        init_seed=t.seed,
    )  # fmt: skip
    ctx.stage(f"LiRA: training {s.shadow_models} shadow models")
    r0 = lira_attack(
        ctx.plain_model(), (X_in, y_in), (X_out, y_out), trainer=trainer,
        n_shadows=s.shadow_models, delta=delta, seed=s.seed,
    )  # fmt: skip
    detail: dict[str, Any] = {"without_defence": r0.to_dict()}
    r1 = None
    if ctx.private:
        r1 = lira_attack(
            ctx.model, (X_in, y_in), (X_out, y_out), trainer=trainer,
            n_shadows=s.shadow_models, delta=delta, accountant_epsilon=eps, seed=s.seed,
            strict=False,
        )  # fmt: skip
        detail["with_defence"] = r1.to_dict()
        if r1.violation:
            violations.append(
                f"lira: empirical epsilon {r1.empirical_epsilon:.3f} > accountant epsilon {eps}"
            )
    return _mia_rows("membership (LiRA offline)", r0, r1, ctx), detail


def _evasion(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.security.attacks.evasion import robust_accuracy
    from privml.security.defenses.adversarial import AdversarialGradient
    from privml.security.federated import federate

    s = ctx.settings
    Xt, yt = ctx.test()
    Xt, yt = _cap(Xt, yt, s.max_records, s.seed)
    budgets = list(s.evasion_budgets)
    r0 = robust_accuracy(
        ctx.model, Xt, yt, budgets=budgets, norm=s.evasion_norm, steps=s.evasion_steps,
        seed=s.seed,
    )  # fmt: skip
    ctx.stage(f"adversarial training ({s.adversarial_method}, eps {s.adversarial_eps})")
    from privml.fl.engine import init_params

    arch, _ = init_params(ctx.spec, ctx.config.training.seed)
    rule = AdversarialGradient(
        arch, ctx.spec, binary=ctx.spec.n_outputs == 1, eps=s.adversarial_eps,
        norm=s.evasion_norm, method=s.adversarial_method, seed=s.seed,
    )  # fmt: skip
    robust_run = federate(ctx.fed, ctx.spec, ctx.config.training, rule=rule)
    r1 = robust_accuracy(
        robust_run.model, Xt, yt, budgets=budgets, norm=s.evasion_norm, steps=s.evasion_steps,
        seed=s.seed,
    )  # fmt: skip
    cost = r0.clean_accuracy - r1.clean_accuracy
    d = f"PGD adversarial training (eps {s.adversarial_eps})"
    norm = "L-inf" if s.evasion_norm == "inf" else "L2"
    rows = [AuditRow("evasion", "clean accuracy", r0.clean_accuracy, r1.clean_accuracy, d, cost,
                     worse="lower")]  # fmt: skip
    for b, a0, a1 in zip(budgets, r0.accuracy, r1.accuracy, strict=True):
        rows.append(
            AuditRow(
                f"evasion (PGD-{s.evasion_steps})",
                f"robust accuracy, {norm} eps {b:g}",
                a0,
                a1,
                d,
                cost,
                worse="lower",
            )  # fmt: skip
        )
    return rows, {"without_defence": r0.to_dict(), "with_defence": r1.to_dict()}


def _inversion(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.fl.engine import init_params
    from privml.security.attacks.inversion import gradient_inversion

    s = ctx.settings
    k = s.inversion_records
    batches = [(site.X_train[:k], site.y_train[:k]) for site in ctx.fed.sites if site.n_train]
    arch, params0 = init_params(ctx.spec, ctx.config.training.seed)
    # the run's own DP-SGD noise when it has one, else [audit] inversion_noise_multiplier
    # (sample-level DP only: with client-level DP the server adds the noise itself, after it
    # has seen the update, so it protects nothing against this server)
    own = ctx.privacy.get("noise_multiplier") if ctx.privacy.get("mode") == "sample" else None
    z = float(own or s.inversion_noise_multiplier)
    views = ["site", "dp"] + (["secure_aggregation"] if len(batches) > 1 else [])
    pool, _ = ctx.fed.pooled_train()
    res = gradient_inversion(
        arch, params0, batches, views=views, max_grad_norm=ctx.config.privacy.max_grad_norm,
        noise_multiplier=z, iterations=s.inversion_iterations, restarts=1,
        pool=pool[: s.max_records], seed=s.seed,
    )  # fmt: skip
    by = {r.view: r for r in res}
    site = by["site"]
    rows = [
        AuditRow(
            "gradient inversion",
            "relative reconstruction error",
            site.relative_error,
            by["dp"].relative_error,
            f"DP-SGD noise (multiplier {z:g})",
            None,
            worse="lower",
            note="1.0 = no better than guessing 0.5",
        ),  # fmt: skip
        AuditRow(
            "gradient inversion",
            "records identified",
            site.identified,
            by["dp"].identified,
            f"DP-SGD noise (multiplier {z:g})",
            None,
        ),  # fmt: skip
    ]
    if "secure_aggregation" in by:
        sa = by["secure_aggregation"]
        d = f"secure aggregation (sum of {sa.n_sites} sites)"
        rows += [
            AuditRow(
                "gradient inversion",
                "relative reconstruction error",
                site.relative_error,
                sa.relative_error,
                d,
                0.0,
                worse="lower",
            ),  # fmt: skip
            AuditRow(
                "gradient inversion", "records identified", site.identified, sa.identified, d, 0.0
            ),  # fmt: skip
        ]
    return rows, {r.view: r.to_dict() for r in res}


def _malicious_sites(ctx: _Context) -> tuple[int, ...]:
    from privml.security.federated import site_indices

    a = ctx.config.attack
    if a is not None and a.sites:
        return site_indices(ctx.fed, a.sites)
    if a is not None and a.fraction:
        n = max(1, int(round(a.fraction * len(ctx.fed.sites))))
        rng = np.random.default_rng([ctx.config.training.seed, 41])
        return tuple(sorted(int(i) for i in rng.choice(len(ctx.fed.sites), n, replace=False)))
    return (0,)


def _backdoor(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.security.attacks.backdoor import backdoor_experiment, trigger_from_config
    from privml.security.defenses.robust import BACKDOOR_DEFENCE

    trigger, target, fraction, boost = trigger_from_config(ctx.config, ctx.fed, ctx.spec)
    mal = _malicious_sites(ctx)
    ctx.stage(f"backdoor: {len(mal)} malicious site(s), 4 federated trainings")
    r = backdoor_experiment(
        ctx.fed, ctx.spec, ctx.config.training, trigger=trigger, malicious=mal, target=target,
        fraction=fraction, boost=boost, defence=BACKDOOR_DEFENCE,
    )  # fmt: skip
    d = "privml backdoor defence (anomaly filter, median clip, trimmed mean, weak DP)"
    rows = [
        AuditRow(
            "backdoor",
            "attack success rate",
            r.success_without_defence,
            r.success_with_defence,
            d,
            r.defence_cost,
        ),  # fmt: skip
        AuditRow(
            "backdoor",
            "main-task accuracy under attack",
            r.rows["attack"]["accuracy"],
            r.rows["attack_defended"]["accuracy"],
            d,
            r.defence_cost,
            worse="lower",
        ),  # fmt: skip
    ]
    return rows, r.to_dict()


def _poisoning(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.fl import aggregate as agg
    from privml.fl.attacks import UPDATE_ATTACKS
    from privml.security.attacks.evasion import accuracy
    from privml.security.defenses.robust import Defence
    from privml.security.federated import Adversary, federate

    a = ctx.config.attack
    kind = a.kind if a is not None and a.kind in UPDATE_ATTACKS else "sign_flip"
    params = a.kind_params() if a is not None and a.kind == kind else {}
    mal = _malicious_sites(ctx)
    adv = Adversary(mal, update_attack=kind, update_attack_params=params)
    Xt, yt = ctx.test()
    n = len(ctx.fed.sites)
    training = ctx.config.training

    def run(defence: Defence, attacked: bool) -> float:
        fr = federate(ctx.fed, ctx.spec, training, adversary=adv if attacked else None,
                      defence=defence)  # fmt: skip
        return accuracy(fr.model, Xt, yt)

    clean = run(Defence(), False)
    attacked = run(Defence(), True)
    rows: list[AuditRow] = []
    detail: dict[str, Any] = {"kind": kind, "malicious": list(mal), "clean_fedavg": clean,
                              "attacked_fedavg": attacked, "aggregators": {}}  # fmt: skip
    for rule in ctx.settings.poisoning_aggregators:
        if rule == "fedavg":
            continue
        if agg.min_clients(rule) > n:
            detail["aggregators"][rule] = f"needs {agg.min_clients(rule)} sites, have {n}"
            continue
        ctx.stage(f"poisoning ({kind}) against {rule}")
        d = Defence(name=rule, aggregator=rule)
        c, p = run(d, False), run(d, True)
        detail["aggregators"][rule] = {"clean": c, "attacked": p}
        rows.append(AuditRow(f"poisoning ({kind})", "accuracy under attack", attacked, p,
                             rule, clean - c, worse="lower"))  # fmt: skip
    rows.insert(
        0,
        AuditRow(
            f"poisoning ({kind})",
            "accuracy drop (fedavg)",
            clean - attacked,
            None,
            None,
            None,
            note="accuracy without attack minus with",
        ),
    )
    return rows, detail


_RUNNERS: dict[str, Callable[[_Context, list[str]], tuple[list[AuditRow], dict[str, Any]]]] = {
    "membership": _membership,
    "lira": _lira,
    "evasion": _evasion,
    "inversion": _inversion,
    "backdoor": _backdoor,
    "poisoning": _poisoning,
}


def _clean_config(config: Config) -> Config:
    """The config without its simulated ``[attack]``: the audit trains the model as the sites
    would, and simulates the attackers itself (backdoor, poisoning)."""
    cfg = config.model_copy(deep=True)
    cfg.attack = None
    cfg.source = config.source
    return cfg


def _write_results(run_dir: Path, audit: dict[str, Any]) -> None:
    path = run_dir / "results.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["audit"] = audit
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_audit(
    config: Config,
    *,
    attacks: Sequence[str] | str | None = None,
    run_dir: Path | None = None,
    out_dir: Path | None = None,
    write: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> AuditReport:
    """Train (or load) the configured model and run the chosen attacks with and without
    defences.

    Args:
        config: the run's config (data, model, training, privacy, ``[attack]``, ``[audit]``).
        attacks: names from :data:`ATTACKS` (default ``[audit] attacks``).
        run_dir: audit the signed model of this run folder (written by ``privml run`` with
            this config) instead of training one.
        out_dir: where the new run folder goes when training (default as ``privml run``).
        write: write the ``audit`` section into the run folder's results.json.
        on_stage: progress callback.

    Returns:
        :class:`AuditReport`. An attack that fails is reported in ``errors`` (the others run).

    Raises:
        PrivacyAuditError: (after writing) an empirical lower bound exceeded the
            accountant's epsilon and ``[audit] strict`` is on.
        SignatureError: ``run_dir``'s model signature does not verify.
    """
    from privml.data.federation import load_federation
    from privml.pipeline import model_spec
    from privml.pipeline import run as run_pipeline

    stage = on_stage or (lambda _s: None)
    settings = AuditSettings.from_config(config)
    if attacks is not None:
        settings = AuditSettings(**{**settings.__dict__, "attacks": check_attacks(attacks)})
    t0 = time.perf_counter()
    if run_dir is not None:
        from privml.artifacts import load_model

        run_dir = Path(run_dir)
        model, spec, _enc, _task, meta = load_model(run_dir)
        if meta.get("config_hash") not in (
            config.config_hash(),
            _clean_config(config).config_hash(),
        ):
            raise UsageError(
                f"the run in {str(run_dir)!r} was made with another config (hash "
                f"{str(meta.get('config_hash'))[:12]}); audit it with the config it was run "
                "with, or omit --run to train anew"
            )
        results = json.loads((run_dir / "results.json").read_text())
        privacy = dict(results.get("privacy") or {"mode": "none"})
        stage("loading and encoding the sites' data")
        fed = load_federation(config)
        spec = model_spec(config, fed)
    else:
        stage("training the configured model")
        out = run_pipeline(_clean_config(config), out_dir=out_dir, write=write, on_stage=stage)
        fed = out.data
        spec = model_spec(config, fed)
        model = _with_params(out.training.model, out.training.params)
        privacy = dict(out.results.get("privacy") or {"mode": "none"})
        run_dir = out.out_dir
    ctx = _Context(config, fed, spec, model, privacy, settings, stage)
    rows: list[AuditRow] = []
    details: dict[str, Any] = {}
    violations: list[str] = []
    errors: dict[str, str] = {}
    for name in settings.attacks:
        stage(f"attack: {name}")
        t1 = time.perf_counter()
        try:
            r, d = _RUNNERS[name](ctx, violations)
        except PrivacyAuditError:
            raise
        except UsageError as exc:
            errors[name] = str(exc)
            continue
        d["seconds"] = time.perf_counter() - t1
        rows += r
        details[name] = d
    report = AuditReport(
        rows, details, violations, time.perf_counter() - t0, settings,
        None if run_dir is None else str(run_dir), errors,
    )  # fmt: skip
    if write and run_dir is not None:
        _write_results(run_dir, report.to_dict())
    if violations and settings.strict:
        raise PrivacyAuditError(
            "the audit measured more leakage than the accountant allows: "
            + "; ".join(violations)
            + ". Do not release this model; check the noise, clipping and accounting."
        )
    return report
