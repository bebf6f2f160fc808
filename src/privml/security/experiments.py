"""Federated security experiments built on :func:`privml.security.federated.federate`.

* :func:`dirichlet_resplit` -- the same training records dealt to non-IID hospitals (label
  skew, Dirichlet(alpha) per class; Hsu et al. 2019), the setting where honest updates
  disagree and defences are most likely to misfire;
* :func:`backdoor_defence_for` -- privml's backdoor defence adapted to the number of sites
  (a trimmed mean that trims at least one update per side; where no rule can run, it says so);
* :func:`choose_trigger` -- a tabular backdoor trigger the clean model does *not* already
  answer with the target class (features set to values that are rare in the attacker's own
  records and that, on the clean model, leave non-target records non-target);
* :func:`backdoor_audit` -- all of it: clean baseline, attack without and with the defence, on
  the given federation and on a non-IID re-split, with a verdict per setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from privml.config import TrainingConfig
from privml.data import partition
from privml.data.federation import FederatedData, SiteData
from privml.errors import UsageError
from privml.fl import aggregate as agg
from privml.models.nets import ModelSpec
from privml.security.attacks.backdoor import (
    BackdoorResult,
    Trigger,
    attack_success_rate,
    backdoor_experiment,
    feature_trigger,
)
from privml.security.defenses.robust import Defence
from privml.security.tabular import FeatureLayout

__all__ = [
    "backdoor_audit",
    "backdoor_defence_for",
    "choose_trigger",
    "dirichlet_resplit",
]

SUCCESS_WORKS = 0.2
"""A backdoor defence "works" when the attack success it leaves is at most this (or at most
the clean model's success plus 0.1)."""


def dirichlet_resplit(
    fed: FederatedData, n_sites: int, *, alpha: float = 0.5, seed: int = 0
) -> FederatedData:
    """The pooled training and test records of ``fed`` dealt to ``n_sites`` non-IID sites
    (per class, shares ~ Dirichlet(alpha); each site's test records follow the same shares).

    A simulation device for audits: the records never leave the process.
    """
    if n_sites < 2:
        raise UsageError(f"dirichlet_resplit needs n_sites >= 2. Got {n_sites} instead.")
    rng = np.random.default_rng([seed, 61])
    Xtr, ytr = fed.pooled_train()
    Xte, yte = fed.pooled_test()
    try:
        parts = partition.dirichlet(ytr, n_sites, alpha=alpha, rng=rng)
    except ValueError as exc:
        raise UsageError(f"cannot split the records into {n_sites} non-IID sites: {exc}") from None
    classes = np.unique(np.concatenate([ytr, yte]))
    share = np.zeros((n_sites, len(classes)))
    for s, p in enumerate(parts):
        for k, c in enumerate(classes):
            share[s, k] = (ytr[p] == c).sum()
    share /= np.maximum(share.sum(axis=0, keepdims=True), 1)
    test_parts: list[list[int]] = [[] for _ in range(n_sites)]
    for k, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(yte == c))
        cuts = (np.cumsum(share[:, k])[:-1] * len(idx)).astype(int)
        for s, chunk in enumerate(np.split(idx, cuts)):
            test_parts[s] += chunk.tolist()
    sites = [
        SiteData(f"noniid_{chr(ord('a') + s)}" if n_sites <= 26 else f"noniid_{s:03d}",
                 Xtr[p], ytr[p], Xte[np.sort(test_parts[s]).astype(np.int64)],
                 yte[np.sort(test_parts[s]).astype(np.int64)])  # fmt: skip
        for s, p in enumerate(parts)
    ]
    return FederatedData(sites, fed.encoder, fed.task, list(fed.inferred_columns),
                         [*fed.notes, f"re-split into {n_sites} sites, Dirichlet({alpha})"],
                         fed.truth)  # fmt: skip


def backdoor_defence_for(n_sites: int) -> tuple[Defence, list[str]]:
    """privml's backdoor defence for a round of ``n_sites`` updates, and what it had to leave
    out (with the reason).

    Anomaly filter (robust z-score threshold 4; at 3 it flagged about 6% of the honest updates
    of four IID demo hospitals without attack), median-norm clipping, a coordinate-wise
    trimmed mean and weak DP noise (multiplier 0.05). The trimmed mean trims ``beta = 0.2`` of
    each side from 5 sites on, and one update per side (``beta = 1 / n``; with 3 sites the
    coordinate-wise median) with 3 or 4; with fewer than 3 sites no robust rule has a majority
    to trust, nor the anomaly filter.
    """
    notes: list[str] = []
    if n_sites >= agg.min_clients("trimmed_mean", {"beta": 0.2}):
        rule, params = "trimmed_mean", {"beta": 0.2}
        label = "trimmed mean (beta 0.2)"
    elif n_sites >= 3:
        rule, params = "trimmed_mean", {"beta": 1.0 / n_sites}
        label = f"trimmed mean (one of {n_sites} updates trimmed per side)"
        notes.append(
            f"trimmed mean with beta 0.2 needs 5 sites, have {n_sites}: trims one update per "
            "side instead"
        )
    else:
        rule, params = "fedavg", {}
        label = "no robust rule"
        notes.append(f"robust aggregation and the anomaly filter need >= 3 sites, have {n_sites}")
    d = Defence(
        name=f"privml backdoor defence: anomaly filter (z > 4), median-norm clip, {label}, "
        "weak DP 0.05",
        anomaly_threshold=4.0 if n_sites >= 3 else None, clip="median", aggregator=rule,
        aggregator_params=params, noise_multiplier=0.05,
    )  # fmt: skip
    return d, notes


def _candidates(layout: FeatureLayout) -> list[tuple[str, list[int], list[float], int]]:
    """Single-column trigger pieces: ``(label, columns, values, column group id)``."""
    out: list[tuple[str, list[int], list[float], int]] = []
    for j, (i, name) in enumerate(zip(layout.numeric, layout.numeric_names, strict=True)):
        out.append((f"{name}=max", [i], [1.0], j))
        out.append((f"{name}=min", [i], [0.0], j))
    base = len(layout.numeric)
    for j, (name, grp) in enumerate(zip(layout.categorical_names, layout.categorical,
                                        strict=True)):  # fmt: skip
        for c in grp:
            out.append((f"{name}[{c - grp[0]}]", list(grp), [float(k == c) for k in grp],
                        base + j))  # fmt: skip
    base += len(layout.categorical)
    for j, b in enumerate(layout.binary):
        out.append((f"binary {b}=1", [b], [1.0], base + j))
        out.append((f"binary {b}=0", [b], [0.0], base + j))
    return out


def choose_trigger(
    clean_model: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    layout: FeatureLayout,
    *,
    target: int,
    n_columns: int = 3,
    max_clean_success: float = 0.05,
) -> tuple[Trigger, dict[str, Any]]:
    """A feature trigger the clean model does not already answer with ``target``.

    Works on the attacker's own records ``(X, y)`` and the global model it received (what a
    real attacker has). Each candidate piece sets one column to an extreme of its declared
    range (numeric) or one valid value (categorical, binary). Pieces are ranked by how rare
    their value is in ``X`` (a backdoor hides best where clean records never go), among those
    whose single-piece success on the clean model (non-target records of ``X`` labelled
    ``target`` once the piece is applied) stays at most ``max_clean_success``; ``n_columns``
    pieces on distinct columns are combined greedily while the combined clean success stays
    within the limit.

    Returns:
        ``(trigger, info)``; ``info["clean_success_selection"]`` is the trigger's success on
        the clean model over the attacker's records (the report measures it on test records).

    Raises:
        UsageError: no piece keeps the clean success within the limit.
    """
    from privml.security.attacks.evasion import predict

    keep = y != target
    if not keep.any():
        raise UsageError("choose_trigger needs attacker records whose label is not the target")
    Xn = np.asarray(X[keep], dtype=np.float32)

    def success(cols: list[int], vals: list[float]) -> float:
        Z = Xn.copy()
        Z[:, cols] = np.asarray(vals, dtype=np.float32)
        return float((predict(clean_model, Z).numpy() == target).mean())

    scored = []
    for label, cols, vals, group in _candidates(layout):
        rarity = float(np.abs(Xn[:, cols] - np.asarray(vals)).max(axis=1).mean())
        s = success(cols, vals)
        if s <= max_clean_success:
            scored.append((-rarity, s, label, cols, vals, group))
    if not scored:
        raise UsageError(
            f"no trigger keeps the clean model's success at or below {max_clean_success}: "
            "every feature value already moves records to the target class; give "
            "[attack] trigger_features yourself"
        )
    scored.sort(key=lambda t: (t[0], t[1]))
    cols_all: list[int] = []
    vals_all: list[float] = []
    used: set[int] = set()
    labels: list[str] = []
    for _r, _s, label, cols, vals, group in scored:
        if group in used:
            continue
        if success(cols_all + cols, vals_all + vals) > max_clean_success:
            continue
        cols_all += cols
        vals_all += vals
        used.add(group)
        labels.append(label)
        if len(used) >= n_columns:
            break
    trig = feature_trigger(cols_all, vals_all)
    return trig, {"pieces": labels, "clean_success_selection": success(cols_all, vals_all),
                  "selected_on": int(keep.sum())}  # fmt: skip


def _verdict(r: BackdoorResult, clean_success: float) -> str:
    ok = r.success_with_defence <= max(SUCCESS_WORKS, clean_success + 0.1)
    if r.success_without_defence <= max(SUCCESS_WORKS, clean_success + 0.1):
        return "the attack did not take hold even without defence"
    return "defence works" if ok else "no defence works here: the backdoor survives"


def backdoor_audit(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
    *,
    trigger: Trigger | None,
    malicious: Sequence[int],
    target: int,
    fraction: float = 0.5,
    boost: float | str | None = "replace",
    non_iid_sites: int | None = 4,
    alpha: float = 0.5,
    seed: int = 0,
    attacker_trains_own_trigger: bool = True,
) -> dict[str, Any]:
    """The backdoor with its clean baseline, with and without defence, on ``fed`` and on a
    Dirichlet(``alpha``) re-split into ``non_iid_sites`` hospitals (None: skip).

    ``trigger`` None: in each setting the attacker chooses one (:func:`choose_trigger`, on the
    first malicious site's records and the model clean training produces). In the non-IID
    setting the first site is the attacker. Returns a dict with one entry per setting
    (``"configured"``, ``"non_iid"``): the :class:`BackdoorResult` rows (``clean`` included),
    the clean model's success (the baseline), the defence and what it left out, the anomaly
    filter's rates (in the rows), and a verdict.
    """
    from privml.security.defenses.robust import NO_DEFENCE
    from privml.security.federated import federate

    settings: dict[str, tuple[FederatedData, tuple[int, ...]]] = {
        "configured": (fed, tuple(int(i) for i in malicious))
    }
    if non_iid_sites is not None:
        nf = dirichlet_resplit(fed, max(non_iid_sites, 2), alpha=alpha, seed=seed)
        settings["non_iid"] = (nf, (0,))
    out: dict[str, Any] = {}
    for name, (f, mal) in settings.items():
        clean_run = federate(f, spec, training, defence=NO_DEFENCE)
        X_test, y_test = f.pooled_test()
        trig = trigger
        choice: dict[str, Any] | None = None
        if trig is None:
            # the attacker of this setting picks its trigger from its own records and the
            # model clean training gives (what it would receive as the global model)
            layout = FeatureLayout.from_encoder(f.encoder, f.n_features)
            site = f.sites[mal[0]]
            trig, choice = choose_trigger(clean_run.model, site.X_train, site.y_train, layout,
                                          target=target)  # fmt: skip
        assert trig is not None
        defence, left_out = backdoor_defence_for(len(f.sites))
        r = backdoor_experiment(
            f, spec, training, trigger=trig, malicious=mal, target=target, fraction=fraction,
            boost=boost, defence=defence, scenarios=("attack", "attack_defended",
                                                      "clean_defended"),
        )  # fmt: skip
        clean_success = attack_success_rate(clean_run.model, X_test, y_test, trig, target)
        from privml.security.attacks.evasion import accuracy

        clean_row = {
            "accuracy": accuracy(clean_run.model, X_test, y_test), "attack_success": clean_success,
            "flagged_malicious": 0.0, "flagged_honest": 0.0, "seconds": clean_run.seconds,
        }  # fmt: skip
        r.rows = {"clean": clean_row, **r.rows}
        entry = r.to_dict()
        entry.update(
            n_sites=len(f.sites), sites=[s.name for s in f.sites],
            site_sizes=[s.n_train for s in f.sites], clean_success=clean_success,
            defence_left_out=left_out, verdict=_verdict(r, clean_success),
            trigger_choice=choice,
        )  # fmt: skip
        out[name] = entry
    return out


def validation_split(
    fed: FederatedData, *, fraction: float = 0.2, seed: int = 0
) -> tuple[FederatedData, np.ndarray, np.ndarray]:
    """Each site keeps ``1 - fraction`` of its training records for training and sets the
    rest aside for validation (pooled and returned); test records are not touched."""
    rng = np.random.default_rng([seed, 71])
    sites: list[SiteData] = []
    Xv: list[np.ndarray] = []
    yv: list[np.ndarray] = []
    for s in fed.sites:
        idx = rng.permutation(s.n_train)
        k = int(round(fraction * s.n_train)) if s.n_train >= 5 else 0
        va, tr = np.sort(idx[:k]), np.sort(idx[k:])
        sites.append(SiteData(s.name, s.X_train[tr], s.y_train[tr], s.X_test, s.y_test))
        Xv.append(s.X_train[va])
        yv.append(s.y_train[va])
    out = FederatedData(sites, fed.encoder, fed.task, list(fed.inferred_columns),
                        list(fed.notes), fed.truth)  # fmt: skip
    return out, np.concatenate(Xv), np.concatenate(yv)


def adversarial_defence(
    fed: FederatedData,
    spec: ModelSpec,
    training: TrainingConfig,
    *,
    eps: float,
    method: str = "auto",
    betas: Sequence[float] = (0.5, 2.0, 6.0),
    norm: str = "inf",
    steps: int = 10,
    eval_steps: int = 10,
    category_changes: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Federated adversarial training that respects the schema, chosen so it does not collapse.

    Every site trains on adversarial versions of its own batches (numeric columns moved within
    ``eps``; one-hot and indicator columns left valid). ``method``:

    * ``"auto"``: TRADES (Zhang et al. 2019) with each trade-off of ``betas`` trained on 80%
      of every site's training records and judged on the other 20% (validation): clean AUC
      and balanced accuracy, and balanced accuracy under the schema-respecting attack at
      ``eps``. The non-degenerate candidate with the best robust balanced accuracy is the
      defended model (trained on the 80%). If every candidate is degenerate, or none keeps its
      balanced accuracy under attack above chance, the defence is **refused**
      (``model`` None, ``refused`` says why) rather than reported as robust.
    * ``"pgd"`` / ``"trades"``: that method as asked (TRADES at beta 6), no selection; a
      degenerate result is still reported, and flagged by the audit.

    Returns:
        ``{"model", "method", "beta", "candidates", "refused", "label"}``.
    """
    from sklearn.metrics import balanced_accuracy_score

    from privml.fl.plan import init_params
    from privml.security.attacks.evasion import predict
    from privml.security.baselines import model_quality
    from privml.security.defenses.adversarial import AdversarialGradient
    from privml.security.federated import federate
    from privml.security.tabular import schema_pgd

    layout = FeatureLayout.from_encoder(fed.encoder, fed.n_features)
    mask = layout.numeric_mask()
    binary = spec.n_outputs == 1

    def train(f: FederatedData, m: str, beta: float) -> nn.Module:
        arch, _ = init_params(spec, training.seed)
        rule = AdversarialGradient(
            arch, spec, binary=binary, eps=eps, norm=norm, method=m, beta=beta, steps=steps,
            seed=seed, feature_mask=mask,
        )  # fmt: skip
        return federate(f, spec, training, rule=rule).model

    if method in ("pgd", "trades"):
        beta = 6.0
        label = (
            f"PGD adversarial training (eps {eps:g})"
            if method == "pgd"
            else f"TRADES (eps {eps:g}, beta {beta:g})"
        )
        return {"model": train(fed, method, beta), "method": method,
                "beta": beta if method == "trades" else None, "candidates": [],
                "refused": None, "label": label}  # fmt: skip
    sub, Xv, yv = validation_split(fed, seed=seed)
    candidates: list[dict[str, Any]] = []
    models: list[nn.Module] = []
    for beta in betas:
        model = train(sub, "trades", float(beta))
        models.append(model)
        q = model_quality(model, Xv, yv, classes=fed.task.classes)
        adv = schema_pgd(model, Xv, yv, layout, eps=eps, steps=eval_steps,
                         max_category_changes=category_changes, seed=seed)  # fmt: skip
        rb = float(balanced_accuracy_score(yv, predict(model, adv).numpy()))
        candidates.append({"beta": float(beta), "val_auc": q.auc,
                           "val_balanced_accuracy": q.balanced_accuracy,
                           "val_robust_balanced_accuracy": rb, "degenerate": q.degenerate,
                           "reason": q.reason})  # fmt: skip
    chance = 1.0 / max(2, len(fed.task.classes))
    alive = [c for c in candidates if not c["degenerate"]]
    ok = [c for c in alive if c["val_robust_balanced_accuracy"] > chance]
    label = f"TRADES (eps {eps:g}, beta chosen on validation)"
    betas_txt = ", ".join(f"{c['beta']:g}" for c in candidates)
    if not alive:
        why = (f"every TRADES candidate (beta {betas_txt}) was degenerate on validation records ("
               + "; ".join(str(c["reason"]) for c in candidates) + ")")  # fmt: skip
    elif not ok:
        best_rb = max(c["val_robust_balanced_accuracy"] for c in alive)
        why = (f"no TRADES candidate (beta {betas_txt}) keeps its balanced accuracy under the "
               f"attack at eps {eps:g} above chance on validation records (best {best_rb:.3f} "
               f"<= {chance:.2f})")  # fmt: skip
    if not ok:
        return {"model": None, "method": "trades", "beta": None, "candidates": candidates,
                "refused": why + ": no adversarial training is offered for this model and "
                "budget", "label": label}  # fmt: skip
    best = max(ok, key=lambda c: (c["val_robust_balanced_accuracy"], c["val_auc"] or 0.0))
    b = float(best["beta"])
    label = f"TRADES (eps {eps:g}, beta {b:g} chosen on validation)"
    return {"model": models[candidates.index(best)], "method": "trades",
            "beta": best["beta"], "candidates": candidates, "refused": None,
            "label": label}  # fmt: skip
