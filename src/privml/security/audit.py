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
canary          one-run canary audit (Steinke et al. 2023)         DP training ([privacy])
evasion         schema-respecting PGD at each budget (Madry)       TRADES, beta on validation
inversion       gradient inversion of one site's update (Geiping)  DP-SGD noise; secure agg.
backdoor        trigger poisoning + model replacement (Bagdasaryan) privml's backdoor defence
                (also on non-IID hospitals)
poisoning       the Byzantine update attack of [attack] per rule   robust aggregation rules
==============  =================================================  ==========================

The model is trained as configured but without the simulated attackers of ``[attack]`` (the
backdoor and poisoning attacks simulate them themselves, with and without defences).

Every figure stands beside its trivial baseline (``baseline``, ``baseline_kind``): the
majority-class accuracy, chance AUC and balanced accuracy, the clean model's attack success,
zero leakage; a membership bound also says the largest value its trials could certify. A
defence whose model is degenerate (:mod:`privml.security.baselines`: near-constant, or AUC or
balanced accuracy below 0.55) is marked ``degenerate`` (its "robustness" is the majority
share), a defence that cannot run with the given number of sites is shown as ``not run`` with
the reason, and ``findings`` lists these for the exit summary.

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

ATTACKS: tuple[str, ...] = (
    "membership", "lira", "canary", "evasion", "inversion", "backdoor", "poisoning"
)  # fmt: skip
"""The attacks ``privml audit`` knows, in the order it runs them."""

AUDIT_SCHEMA = "privml-audit/2"


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
    evasion_category_changes: int = 1
    adversarial_eps: float = 0.1
    adversarial_method: str = "auto"
    adversarial_betas: tuple[float, ...] = (0.5, 2.0, 6.0)
    canaries: int = 1000
    backdoor_non_iid_sites: int = 4
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
    ``baseline`` is the metric's trivial reference (``baseline_kind``: ``"majority class"``,
    ``"chance"``, ``"clean model"``, ``"no leakage"``). ``status``: ``"ok"``;
    ``"degenerate"`` (the defended model is near-constant or has AUC / balanced accuracy
    below 0.55: its figures are not robustness); ``"not run"`` or ``"refused"`` (``reason``
    says why; no ``with_defence`` value); ``"no effect"`` (no defence brought the attack back
    to its baseline).
    """

    attack: str
    metric: str
    without_defence: float | None
    with_defence: float | None
    defence: str | None
    defence_cost: float | None = None
    worse: str = "higher"
    note: str | None = None
    baseline: float | None = None
    baseline_kind: str | None = None
    status: str = "ok"
    reason: str | None = None

    @property
    def degenerate(self) -> bool:
        return self.status == "degenerate"

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "degenerate": self.degenerate}


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

    def findings(self) -> list[str]:
        """One line per degenerate, refused, not-run or ineffective defence (exit summary)."""
        out: list[str] = []
        seen: set[tuple[str, str | None, str]] = set()
        for r in self.rows:
            if r.status == "ok":
                continue
            key = (r.attack, r.defence, r.status)
            if key in seen:
                continue
            seen.add(key)
            what = f"{r.attack}: {r.defence or 'defence'}"
            out.append(f"{what}: {r.status.upper()}" + (f" ({r.reason})" if r.reason else ""))
        return out

    def to_dict(self) -> dict[str, Any]:
        s = self.settings
        out = {
            "schema": AUDIT_SCHEMA,
            "attacks": list(s.attacks),
            "rows": [r.to_dict() for r in self.rows],
            "findings": self.findings(),
            "degenerate": sorted({str(r.defence) for r in self.rows if r.degenerate}),
            "details": self.details,
            "violations": self.violations,
            "errors": self.errors,
            "seconds": self.seconds,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items()},
        }
        return dict(strict_json(out))


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


#: What the quick audit releases about training records without DP (privacy.not_accounted).
QUICK_AUDIT_NOT_ACCOUNTED = (
    "audit (quick membership audit of every run): AUC, TPR at fixed FPRs and an empirical "
    "epsilon lower bound of a loss-threshold attack on up to max_records training and held-out "
    "records, computed without DP; no per-record statistic (threshold, losses) is published"
)


#: What ``privml audit`` releases about the sites' records without DP (privacy.not_accounted).
AUDIT_NOT_ACCOUNTED = (
    "privml audit: every attack result in the audit section (membership, LiRA and canary "
    "figures on training records, including the attacks' thresholds; models trained without DP "
    "on the same records as baselines and shadow models; evasion, inversion, backdoor and "
    "poisoning measurements) is computed on the sites' records without DP; run it only where "
    "the audit's readers may see that"
)


def _aggregates_only(membership: dict[str, Any]) -> dict[str, Any]:
    """The quick audit's membership result without per-record statistics: the chosen
    threshold is one record's loss, and mean losses are statistics of the training records."""
    out = {k: v for k, v in membership.items() if not k.startswith("mean_loss")}
    out["bound"] = {k: v for k, v in membership.get("bound", {}).items() if k != "threshold"}
    return out


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
        f" (its {res.bound.n_members + res.bound.n_nonmembers} trials could certify at most "
        f"{res.bound.max_certifiable:.2f})"
        + (f" vs accountant epsilon {eps:.2f}" if eps is not None else " (non-private model)")
    )
    return {
        "schema": AUDIT_SCHEMA,
        "quick": True,
        "membership": _aggregates_only(res.to_dict()),
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


def _power_note(r0: Any, r1: Any) -> str:
    """"cannot certify above X with n trials" for each result."""
    parts = []
    for tag, r in (("without", r0), ("with", r1)):
        if r is None:
            continue
        b = r.bound
        parts.append(
            f"{tag} defence: cannot certify above {b.max_certifiable:.2f} with "
            f"{b.n_members + b.n_nonmembers} evaluation trials"
        )
    return "; ".join(parts)


def _mia_rows(name: str, r0: Any, r1: Any, ctx: _Context) -> list[AuditRow]:
    Xt, yt = ctx.test()
    cost = _acc(ctx.plain_model(), Xt, yt) - _acc(ctx.model, Xt, yt) if r1 is not None else None
    d = ctx.dp_label()
    eps = _privacy_eps(ctx.privacy)[0]
    note = _power_note(r0, r1) + ("" if r1 is None else f"; accountant epsilon {eps}")
    return [
        AuditRow(name, "AUC", r0.auc, r1.auc if r1 else None, d, cost, baseline=0.5,
                 baseline_kind="chance"),  # fmt: skip
        AuditRow(
            name, "TPR at 1% FPR", r0.tpr_at_fpr["0.01"], r1.tpr_at_fpr["0.01"] if r1 else None,
            d, cost, baseline=0.01, baseline_kind="chance",
        ),  # fmt: skip
        AuditRow(
            name, "empirical epsilon (lower bound)", r0.empirical_epsilon,
            r1.empirical_epsilon if r1 else None, d, cost, note=note, baseline=0.0,
            baseline_kind="no leakage",
        ),  # fmt: skip
    ]


def _canary(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    """One-run canary audit (Steinke et al. 2023) of the configured training, and of the same
    training without DP when DP is on. The canary models are audit-only: they are never
    saved, and DP runs book into a throw-away ledger."""
    from privml.fl.engine import simulate
    from privml.security.attacks.canary import run_canary_audit

    s, cfg = ctx.settings, ctx.config
    eps_acc, delta = _privacy_eps(ctx.privacy)

    def plain(f: FederatedData) -> tuple[nn.Module, float | None]:
        res = simulate(f, ctx.spec, cfg.training)
        return _with_params(res.model, res.params), None

    def private(f: FederatedData) -> tuple[nn.Module, float | None]:
        from privml.dp.ledger import PrivacyLedger
        from privml.fl.training import train

        with tempfile.TemporaryDirectory(prefix="privml-canary-") as tmp:
            ledger = PrivacyLedger(
                Path(tmp) / "ledger.sqlite", dataset="canary-audit",
                budget_epsilon=1e6, budget_delta=0.5,
            )  # fmt: skip
            run = train(_clean_config(cfg), f, ctx.spec, ledger=ledger)
        e = run.privacy.get("epsilon")
        return _with_params(run.result.model, run.result.params), (
            None if e is None else float(e)
        )

    ctx.stage(f"canary audit: {s.canaries} canaries, one training run")
    r0 = run_canary_audit(ctx.fed, plain, m=s.canaries, delta=delta, confidence=s.confidence,
                          seed=s.seed)  # fmt: skip
    detail: dict[str, Any] = {"without_defence": r0.to_dict()}
    r1 = None
    if ctx.private:
        ctx.stage("canary audit of the DP training")
        r1 = run_canary_audit(ctx.fed, private, m=s.canaries, delta=delta,
                              confidence=s.confidence, seed=s.seed)  # fmt: skip
        detail["with_defence"] = r1.to_dict()
        if r1.violation:
            violations.append(
                f"canary: one-run epsilon lower bound {r1.epsilon:.3f} > accountant epsilon "
                f"{r1.accountant_epsilon}"
            )
    note = "; ".join(
        f"{tag} defence: cannot certify above {r.max_certifiable:.2f} with {r.m} canaries "
        f"({r.correct} of {r.guesses} guesses right)"
        for tag, r in (("without", r0), ("with", r1))
        if r is not None
    )
    if r1 is not None:
        note += f"; accountant epsilon {r1.accountant_epsilon}"
    d = ctx.dp_label()
    rows = [
        AuditRow(
            "membership (one-run canaries)", "epsilon lower bound (one run)", r0.epsilon,
            None if r1 is None else r1.epsilon, d, None, note=note, baseline=0.0,
            baseline_kind="no leakage",
        ),  # fmt: skip
        AuditRow(
            "membership (one-run canaries)", "guess accuracy", r0.correct / max(r0.guesses, 1),
            None if r1 is None else r1.correct / max(r1.guesses, 1), d, None, baseline=0.5,
            baseline_kind="chance",
        ),  # fmt: skip
    ]
    return rows, detail


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
    from privml.security.baselines import majority_accuracy, model_quality
    from privml.security.experiments import adversarial_defence
    from privml.security.tabular import FeatureLayout, budget_in_units, schema_pgd

    s = ctx.settings
    Xt, yt = ctx.test()
    Xt, yt = _cap(Xt, yt, s.max_records, s.seed)
    classes = ctx.fed.task.classes
    layout = FeatureLayout.from_encoder(ctx.fed.encoder, ctx.spec.n_features)
    budgets = list(s.evasion_budgets)
    if s.evasion_norm != "inf":
        raise UsageError(
            "the schema-respecting evasion attack budgets each numeric column by a share of "
            "its declared range (L-inf); set [audit] evasion_norm = \"inf\""
        )
    kcat = s.evasion_category_changes if layout.has_categories else 0

    def attack(model: nn.Module) -> dict[str, Any]:
        clean = model_quality(model, Xt, yt, classes=classes)
        per = []
        for b in budgets:
            adv = schema_pgd(model, Xt, yt, layout, eps=b, steps=s.evasion_steps,
                             max_category_changes=kcat, seed=s.seed)  # fmt: skip
            q = model_quality(model, adv, yt, classes=classes)
            per.append({"eps": b, "accuracy": q.accuracy, "balanced_accuracy": q.balanced_accuracy,
                        "auc": q.auc})  # fmt: skip
        return {"clean": clean.to_dict(), "budgets": per}

    r0 = attack(ctx.model)
    ctx.stage(f"adversarial training ({s.adversarial_method}, eps {s.adversarial_eps})")
    defence = adversarial_defence(
        ctx.fed, ctx.spec, ctx.config.training, eps=s.adversarial_eps,
        method=s.adversarial_method, betas=s.adversarial_betas, norm=s.evasion_norm,
        category_changes=kcat, seed=s.seed,
    )  # fmt: skip
    d = str(defence["label"])
    r1 = None if defence["model"] is None else attack(defence["model"])
    maj = majority_accuracy(yt)
    chance_bal = 1.0 / max(2, len(classes))
    status, reason = "ok", None
    if defence["refused"]:
        status, reason = "refused", str(defence["refused"])
    elif r1 is not None and r1["clean"]["degenerate"]:
        status, reason = "degenerate", "defended model " + str(r1["clean"]["reason"])
    cost = None if r1 is None else r0["clean"]["accuracy"] - r1["clean"]["accuracy"]

    def w(key: str, i: int | None = None) -> float | None:
        if r1 is None:
            return None
        v = r1["clean"][key] if i is None else r1["budgets"][i][key]
        return None if v is None else float(v)

    units = {b: budget_in_units(layout, b)["text"] for b in budgets}
    mode = (
        f"numeric columns within eps of their declared range, up to {kcat} categorical "
        "column(s) moved to another valid value"
        if layout.has_categories
        else "every feature within eps of its declared range"
    )
    rows = [
        AuditRow("evasion", "clean accuracy", r0["clean"]["accuracy"], w("accuracy"), d, cost,
                 worse="lower", baseline=maj, baseline_kind="majority class", status=status,
                 reason=reason),  # fmt: skip
        AuditRow("evasion", "clean balanced accuracy", r0["clean"]["balanced_accuracy"],
                 w("balanced_accuracy"), d, cost, worse="lower", baseline=chance_bal,
                 baseline_kind="chance", status=status, reason=reason),  # fmt: skip
        AuditRow("evasion", "clean AUC", r0["clean"]["auc"], w("auc"), d, cost, worse="lower",
                 baseline=0.5, baseline_kind="chance", status=status, reason=reason),  # fmt: skip
    ]
    name = f"evasion (schema PGD-{s.evasion_steps})"
    for i, b in enumerate(budgets):
        p0 = r0["budgets"][i]
        note = f"eps {b:g} = {units[b]}"
        st, why = status, reason
        if st == "ok" and r1 is not None and r1["budgets"][i]["accuracy"] <= p0["accuracy"]:
            st, why = "no effect", f"the defended model is no more robust at eps {b:g}"
        rows += [
            AuditRow(name, f"robust accuracy, eps {b:g}", p0["accuracy"], w("accuracy", i), d,
                     cost, worse="lower", baseline=maj, baseline_kind="majority class",
                     status=st, reason=why, note=note),  # fmt: skip
            AuditRow(name, f"robust balanced accuracy, eps {b:g}", p0["balanced_accuracy"],
                     w("balanced_accuracy", i), d, cost, worse="lower", baseline=chance_bal,
                     baseline_kind="chance", status=st, reason=why),  # fmt: skip
            AuditRow(name, f"robust AUC, eps {b:g}", p0["auc"], w("auc", i), d, cost,
                     worse="lower", baseline=0.5, baseline_kind="chance", status=st,
                     reason=why),  # fmt: skip
        ]
    detail = {
        "threat_model": mode, "layout": layout.to_dict(),
        "budgets_in_schema_units": {str(b): budget_in_units(layout, b) for b in budgets},
        "without_defence": r0, "with_defence": r1,
        "defence": {k: v for k, v in defence.items() if k != "model"},
    }  # fmt: skip
    if r0["clean"]["degenerate"]:
        detail["undefended_degenerate"] = r0["clean"]["reason"]
    return rows, detail


def _inversion(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.fl.plan import init_params
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
    chance_id = 1.0 / max(len(pool[: s.max_records]), 1)
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
            baseline=1.0,
            baseline_kind="guessing 0.5",
        ),  # fmt: skip
        AuditRow(
            "gradient inversion",
            "records identified",
            site.identified,
            by["dp"].identified,
            f"DP-SGD noise (multiplier {z:g})",
            None,
            baseline=chance_id,
            baseline_kind="chance",
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
                baseline=1.0,
                baseline_kind="guessing 0.5",
            ),  # fmt: skip
            AuditRow(
                "gradient inversion", "records identified", site.identified, sa.identified, d, 0.0,
                baseline=chance_id, baseline_kind="chance",
            ),  # fmt: skip
        ]
    return rows, {r.view: r.to_dict() for r in res}


def _malicious_sites(ctx: _Context) -> tuple[int, ...]:
    """The attackers of ``[attack]``, chosen exactly as ``privml run`` chooses them
    (:func:`privml.fl.stages.attack.attacker_indices`); the first site without ``[attack]``."""
    from privml.fl.stages.attack import attacker_indices

    a = ctx.config.attack
    if a is None:
        return (0,)
    names = [s.name for s in ctx.fed.sites]
    return tuple(int(i) for i in attacker_indices(a, names, ctx.config.training.seed))


def _backdoor(ctx: _Context, violations: list[str]) -> tuple[list[AuditRow], dict[str, Any]]:
    from privml.security.attacks.backdoor import trigger_from_config
    from privml.security.baselines import majority_accuracy
    from privml.security.experiments import backdoor_audit

    trigger, target, fraction, boost = trigger_from_config(ctx.config, ctx.fed, ctx.spec)
    a = ctx.config.attack
    own = a is not None and a.kind == "backdoor" and bool(a.trigger_features)
    image = trigger.kind == "pixel"
    # tabular data without a trigger of the user's: the attacker picks one the clean model
    # does not already answer with the target (a trigger the model "obeys" untrained
    # measures nothing)
    chosen = trigger if (own or image) else None
    mal = _malicious_sites(ctx)
    k = ctx.settings.backdoor_non_iid_sites
    ctx.stage(f"backdoor: {len(mal)} malicious site(s)" + (f"; also {k} non-IID hospitals"
                                                             if k else ""))  # fmt: skip
    out = backdoor_audit(
        ctx.fed, ctx.spec, ctx.config.training, trigger=chosen, malicious=mal, target=target,
        fraction=fraction, boost=boost, non_iid_sites=k or None, seed=ctx.settings.seed,
    )  # fmt: skip
    Xt, yt = ctx.test()
    maj = majority_accuracy(yt)
    rows: list[AuditRow] = []
    for setting, e in out.items():
        tag = "backdoor" if setting == "configured" else (
            f"backdoor ({e['n_sites']} non-IID hospitals, Dirichlet 0.5)")  # fmt: skip
        d = e["defence"]["name"]
        works = e["verdict"] == "defence works"
        status = "ok" if works or "did not take hold" in e["verdict"] else "no effect"
        reason = None if status == "ok" else e["verdict"]
        left = "; ".join(e["defence_left_out"]) or None
        rws = e["rows"]
        ad = rws["attack_defended"]
        fpr, det = ad.get("false_positive_rate"), ad.get("detection_rate")
        rows += [
            AuditRow(tag, "attack success rate", e["success_without_defence"],
                     e["success_with_defence"], d, e["defence_cost"], baseline=e["clean_success"],
                     baseline_kind="clean model", status=status, reason=reason,
                     note=left),  # fmt: skip
            AuditRow(tag, "main-task accuracy under attack", rws["attack"]["accuracy"],
                     ad["accuracy"], d, e["defence_cost"], worse="lower",
                     baseline=rws["clean"]["accuracy"], baseline_kind="clean model",
                     note=f"majority class {maj:.3f}"),  # fmt: skip
            AuditRow(tag, "anomaly filter: honest updates flagged", None, fpr, d, None,
                     baseline=0.0, baseline_kind="no false alarm",
                     note=f"attacker's updates flagged: {det if det is None else round(det, 3)}"),
        ]  # fmt: skip
    return rows, out


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

    from privml.security.baselines import majority_accuracy

    maj = majority_accuracy(yt)
    clean = run(Defence(), False)
    attacked = run(Defence(), True)
    rows: list[AuditRow] = []
    detail: dict[str, Any] = {"kind": kind, "malicious": list(mal), "clean_fedavg": clean,
                              "attacked_fedavg": attacked, "aggregators": {}}  # fmt: skip
    for rule in ctx.settings.poisoning_aggregators:
        if rule == "fedavg":
            continue
        if agg.min_clients(rule) > n:
            why = f"needs {agg.min_clients(rule)} sites, have {n}"
            detail["aggregators"][rule] = {"not_run": why}
            rows.append(AuditRow(f"poisoning ({kind})", "accuracy under attack", attacked, None,
                                 rule, None, worse="lower", baseline=maj,
                                 baseline_kind="majority class", status="not run",
                                 reason=why))  # fmt: skip
            continue
        ctx.stage(f"poisoning ({kind}) against {rule}")
        d = Defence(name=rule, aggregator=rule)
        c, p = run(d, False), run(d, True)
        detail["aggregators"][rule] = {"clean": c, "attacked": p}
        rows.append(AuditRow(f"poisoning ({kind})", "accuracy under attack", attacked, p,
                             rule, clean - c, worse="lower", baseline=maj,
                             baseline_kind="majority class"))  # fmt: skip
    rows.insert(
        0,
        AuditRow(
            f"poisoning ({kind})", "accuracy without attack (fedavg)", clean, None, None, None,
            worse="lower", baseline=maj, baseline_kind="majority class",
        ),  # fmt: skip
    )
    rows.insert(
        1,
        AuditRow(
            f"poisoning ({kind})", "accuracy drop (fedavg)", clean - attacked, None, None, None,
            note="accuracy without attack minus with", baseline=0.0, baseline_kind="no attack",
        ),  # fmt: skip
    )
    return rows, detail


_RUNNERS: dict[str, Callable[[_Context, list[str]], tuple[list[AuditRow], dict[str, Any]]]] = {
    "membership": _membership,
    "lira": _lira,
    "canary": _canary,
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


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None and numpy scalars by Python ones,
    so ``json.dumps(..., allow_nan=False)`` accepts it (results.json is strict JSON)."""
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def _write_results(run_dir: Path, audit: dict[str, Any]) -> None:
    path = run_dir / "results.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["audit"] = strict_json(audit)
    privacy = data.get("privacy")
    if isinstance(privacy, dict) and privacy.get("mode", "none") != "none":
        listed = privacy.setdefault("not_accounted", [])
        if AUDIT_NOT_ACCOUNTED not in listed:
            listed.append(AUDIT_NOT_ACCOUNTED)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json", dir=run_dir)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)
    if (run_dir / "report.html").is_file():  # the report shows the audit too
        from privml.report import write_report

        write_report(run_dir)


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
