"""The audit tells the truth: baselines, degenerate models, attack power, one-run canary
bounds, schema-respecting evasion and backdoor triggers the clean model does not obey."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privml.config import ColumnSchema, parse_config
from privml.data.encoding import Encoder, Task
from privml.data.federation import FederatedData, SiteData, load_federation
from privml.errors import UsageError
from privml.fl.anomaly import anomaly_rates
from privml.models.nets import ModelSpec
from privml.pipeline import model_spec
from privml.security.attacks.canary import (
    canary_audit,
    insert_canaries,
    one_run_epsilon,
    one_run_p_value,
)
from privml.security.attacks.membership import epsilon_lower_bound, max_certifiable_epsilon
from privml.security.baselines import majority_accuracy, model_quality
from privml.security.experiments import (
    backdoor_defence_for,
    choose_trigger,
    dirichlet_resplit,
)
from privml.security.tabular import FeatureLayout, check_valid, random_records, schema_pgd

from .conftest import train_plain


class _Const(torch.nn.Module):
    def __init__(self, logit: float, n_out: int = 1) -> None:
        super().__init__()
        self.logit, self.n_out = logit, n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], self.n_out), self.logit)
        return out + 1e-4 * x[:, :1]  # a hair of input dependence: near-constant


def _tabular_encoder() -> Encoder:
    return Encoder({
        "age": ColumnSchema(type="numeric", min=18, max=90),
        "dose": ColumnSchema(type="numeric", min=0, max=10, missing=True),
        "smoker": ColumnSchema(type="categorical", values=["never", "former", "current"]),
        "sex": ColumnSchema(type="binary", values=["f", "m"]),
    })  # fmt: skip


# ------------------------------------------------------------------ baselines, degenerate


def test_constant_model_is_degenerate_and_its_accuracy_is_the_majority_share() -> None:
    rng = np.random.default_rng(0)
    X = rng.random((400, 5)).astype(np.float32)
    y = (rng.random(400) < 0.3).astype(np.int64)
    q = model_quality(_Const(-0.2), X, y, classes=["neg", "pos"])
    assert q.degenerate and "predicts 'neg'" in (q.reason or "")
    assert q.accuracy == pytest.approx(majority_accuracy(y)) == pytest.approx(0.7, abs=0.05)
    assert q.balanced_accuracy == pytest.approx(0.5)
    # a model that separates the classes is not degenerate
    Xs = X.copy()
    Xs[:, 0] = y + 0.3 * rng.random(400)
    good = train_plain(Xs, y, ModelSpec("logistic", 5, 1), steps=300, lr=5e-2)
    g = model_quality(good, Xs, y)
    assert not g.degenerate and g.auc is not None and g.auc > 0.9 and g.reason is None


def test_membership_bound_reports_what_its_trials_could_certify() -> None:
    few, many = (max_certifiable_epsilon(n, n, delta=1e-5) for n in (30, 3000))
    assert 0 < few < many
    # a perfect attack reaches the ceiling; a useless one certifies 0 below it
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    perfect = epsilon_lower_bound(truth.astype(float), truth, delta=1e-5)
    assert perfect.epsilon == pytest.approx(perfect.max_certifiable)
    useless = epsilon_lower_bound(rng.random(120), truth, delta=1e-5)
    assert useless.epsilon == 0.0 < useless.max_certifiable


# ------------------------------------------------------------------ one-run canary audit


def _randomized_response(eps: float, m: int, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    inc = rng.random(m) < 0.5
    keep = rng.random(m) < np.exp(eps) / (1 + np.exp(eps))
    guess = np.where(keep, inc, ~inc)
    return guess + 0.01 * rng.random(m), inc


def test_one_run_bound_holds_for_an_exactly_dp_mechanism_and_is_not_vacuous() -> None:
    rng = np.random.default_rng(1)
    bounds = [canary_audit(*_randomized_response(1.0, 1000, rng)).epsilon for _ in range(60)]
    assert np.mean(np.asarray(bounds) <= 1.0) >= 0.95  # the guarantee: 95% confidence
    strong = canary_audit(*_randomized_response(6.0, 1000, rng))
    assert strong.epsilon > 2.0  # an eps-6 mechanism is caught in one run
    assert strong.epsilon <= strong.max_certifiable


def test_one_run_p_value_and_epsilon_are_monotone_and_delta_weakens_them() -> None:
    assert one_run_p_value(1000, 100, 90, 0.5) < one_run_p_value(1000, 100, 90, 2.0)
    e0 = one_run_epsilon(1000, 100, 90)
    assert e0 > one_run_epsilon(1000, 100, 70) > 0
    assert one_run_epsilon(1000, 100, 90, delta=1e-3) < e0
    assert one_run_epsilon(1000, 100, 50) == 0.0  # chance: nothing certified
    with pytest.raises(UsageError):
        one_run_p_value(10, 20, 5, 1.0)


def test_canaries_are_schema_valid_and_inserted_only_when_included() -> None:
    enc = _tabular_encoder()
    lay = FeatureLayout.from_encoder(enc, enc.n_features)
    X = random_records(lay, 50, rng=np.random.default_rng(0))
    assert check_valid(lay, X, X, 0.0) == []
    onehot = X[:, list(lay.categorical[0])]
    assert (onehot.sum(axis=1) == 1).all() and (X[:, list(lay.frozen)] == 0).all()
    sites = [SiteData(n, np.zeros((5, enc.n_features), np.float32), np.zeros(5, np.int64),
                      np.zeros((2, enc.n_features), np.float32), np.zeros(2, np.int64))
             for n in ("a", "b")]  # fmt: skip
    fed = FederatedData(sites, enc, Task("binary", "y", ("0", "1")))
    inc = np.arange(50) % 3 == 0
    out = insert_canaries(fed, X, np.ones(50, np.int64), inc)
    assert sum(s.n_train for s in out.sites) == 10 + inc.sum()
    assert [s.n_test for s in out.sites] == [2, 2]


# ------------------------------------------------------------------ tabular evasion


def test_schema_pgd_respects_bounds_and_categories_and_beats_numeric_only() -> None:
    enc = _tabular_encoder()
    lay = FeatureLayout.from_encoder(enc, enc.n_features)
    assert lay.numeric_names == ("age", "dose") and len(lay.categorical[0]) == 3
    rng = np.random.default_rng(0)
    X = random_records(lay, 600, rng=rng)
    # the label depends mostly on the category and a little on age
    cat = X[:, list(lay.categorical[0])].argmax(axis=1)
    y = ((cat == 2) ^ (X[:, 0] > 0.9)).astype(np.int64)
    model = train_plain(X, y, ModelSpec("mlp", enc.n_features, 1, hidden=(32,)), steps=400,
                        lr=2e-2)  # fmt: skip
    base = (model_quality(model, X, y)).accuracy
    frozen = schema_pgd(model, X, y, lay, eps=0.05, steps=10, max_category_changes=0)
    moved = schema_pgd(model, X, y, lay, eps=0.05, steps=10, max_category_changes=1)
    for adv in (frozen, moved):
        assert check_valid(lay, X, adv, 0.05) == []
    acc_frozen = model_quality(model, frozen, y).accuracy
    acc_moved = model_quality(model, moved, y).accuracy
    assert acc_moved < acc_frozen - 0.3 and acc_frozen > base - 0.3
    # an attack that changes a category to a fractional value would be caught
    bad = X.copy()
    bad[:, lay.categorical[0][0]] = 0.5
    assert check_valid(lay, X, bad, 0.05)


# ------------------------------------------------------------------ federated experiments


@pytest.fixture(scope="module")
def demo_fed():  # type: ignore[no-untyped-def]
    cfg = parse_config({"data": {"dataset": "breast_cancer", "n_sites": 3},
                        "training": {"rounds": 10, "local_epochs": 3, "lr": 4.0}})  # fmt: skip
    fed = load_federation(cfg)
    return cfg, fed, model_spec(cfg, fed)


def test_dirichlet_resplit_keeps_every_record_and_skews_labels(demo_fed) -> None:  # type: ignore[no-untyped-def]
    _cfg, fed, _spec = demo_fed
    nf = dirichlet_resplit(fed, 4, alpha=0.5, seed=0)
    assert len(nf.sites) == 4
    assert sum(s.n_train for s in nf.sites) == sum(s.n_train for s in fed.sites)
    assert sum(s.n_test for s in nf.sites) == sum(s.n_test for s in fed.sites)
    shares = [s.y_train.mean() for s in nf.sites]
    assert max(shares) - min(shares) > 0.3  # label skew


def test_backdoor_defence_adapts_to_the_number_of_sites() -> None:
    d5, notes5 = backdoor_defence_for(10)
    assert d5.aggregator == "trimmed_mean" and d5.aggregator_params["beta"] == 0.2 and not notes5
    d3, notes3 = backdoor_defence_for(3)
    assert d3.aggregator_params["beta"] == pytest.approx(1 / 3) and "needs 5 sites" in notes3[0]
    d2, notes2 = backdoor_defence_for(2)
    assert d2.aggregator == "fedavg" and d2.anomaly_threshold is None and notes2


def test_chosen_trigger_is_not_obeyed_by_the_clean_model(demo_fed) -> None:  # type: ignore[no-untyped-def]
    from privml.security.attacks.backdoor import attack_success_rate, feature_trigger
    from privml.security.federated import federate

    cfg, fed, spec = demo_fed
    clean = federate(fed, spec, cfg.training).model
    lay = FeatureLayout.from_encoder(fed.encoder, fed.n_features)
    site = fed.sites[0]
    trig, info = choose_trigger(clean, site.X_train, site.y_train, lay, target=1)
    X, y = fed.pooled_test()
    assert info["clean_success_selection"] <= 0.1
    chosen = attack_success_rate(clean, X, y, trig, 1)
    assert chosen <= 0.15
    # the old default (first three features at their maximum) is partly obeyed already
    naive = feature_trigger([0, 1, 2], 1.0)
    assert attack_success_rate(clean, X, y, naive, 1) > chosen + 0.2


def test_anomaly_rates_count_honest_and_malicious_updates() -> None:
    keys = ("clients", "malicious", "flagged_honest", "flagged_malicious")
    rounds = [dict(zip(keys, v, strict=True)) for v in ((4, 1, 0, 1), (4, 1, 1, 0), (4, 0, 0, 0))]
    r = anomaly_rates(rounds)
    assert (r.honest_updates, r.malicious_updates) == (10, 2)
    assert r.false_positive_rate == pytest.approx(0.1) and r.detection_rate == pytest.approx(0.5)


# ------------------------------------------------------------------ a real clinical table


@pytest.mark.slow
def test_audit_on_a_clinical_table_reports_no_false_success(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from privml.config import load_config
    from privml.security.attacks.backdoor import attack_success_rate, feature_trigger
    from privml.security.audit import run_audit
    from privml.security.federated import federate

    from .clinical import gbsg2_config

    path = gbsg2_config(tmp_path, extra=(
        "[training]\nrounds = 10\nlocal_epochs = 3\nlr = 2.0\n"
        f'[output]\ndir = "{tmp_path / "run"}"\nhtml = false\n'
        "[audit]\nevasion_budgets = [0.02]\nevasion_steps = 10\nadversarial_betas = [0.5, 6.0]\n"
        "backdoor_non_iid_sites = 0\n"
    ))  # fmt: skip
    cfg = load_config(path)
    rep = run_audit(cfg, attacks="evasion,backdoor", write=False)
    ev = rep.details["evasion"]
    assert ev["layout"]["categorical"] == {"horTh": 2, "menostat": 2, "tgrade": 3}
    assert "age +-1.44" in ev["budgets_in_schema_units"]["0.02"]["text"]  # 2% of [18, 90]
    for r in rep.rows:
        if r.attack.startswith("evasion (") and r.metric.startswith("robust accuracy"):
            # a defence is only "ok" when it is more robust than no defence; else it says why
            if r.status == "ok":
                assert r.with_defence is not None and r.with_defence > r.without_defence
            else:
                assert r.status in ("refused", "degenerate", "no effect") and r.reason
    # the backdoor's trigger is one the clean model does not already obey ...
    bd = rep.details["backdoor"]["configured"]
    assert bd["clean_success"] <= 0.1 and bd["success_without_defence"] >= 0.5
    succ = next(r for r in rep.rows if r.metric == "attack success rate")
    assert succ.baseline == bd["clean_success"] and succ.baseline_kind == "clean model"
    # ... unlike the old default (the first three columns -- age, tumour size, positive nodes --
    # at the top of their range), which the clean model already answers with "recurrence"
    fed = load_federation(cfg)
    clean = federate(fed, model_spec(cfg, fed), cfg.training).model
    X, y = fed.pooled_test()
    old = attack_success_rate(clean, X, y, feature_trigger([0, 1, 2], 1.0), 1)
    site = fed.sites[0]
    lay = FeatureLayout.from_encoder(fed.encoder, fed.n_features)
    chosen, _ = choose_trigger(clean, site.X_train, site.y_train, lay, target=1)
    new = attack_success_rate(clean, X, y, chosen, 1)
    assert old > 0.5 and new <= 0.15


def test_model_quality_equals_scikit_learn_binary_and_multiclass(digits) -> None:  # type: ignore[no-untyped-def]
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

    X, y = digits
    m = train_plain(X[:600], y[:600], ModelSpec("logistic", 64, 10), steps=60, lr=5e-2)
    q = model_quality(m, X[600:900], y[600:900])
    with torch.no_grad():
        p = torch.softmax(m(torch.from_numpy(X[600:900])), dim=1).numpy()
    assert q.accuracy == pytest.approx(accuracy_score(y[600:900], p.argmax(1)))
    assert q.balanced_accuracy == pytest.approx(balanced_accuracy_score(y[600:900], p.argmax(1)))
    assert q.auc == pytest.approx(roc_auc_score(y[600:900], p, multi_class="ovr"), abs=1e-6)
    yb = (y[:600] > 4).astype(np.int64)
    mb = train_plain(X[:600], yb, ModelSpec("logistic", 64, 1), steps=60, lr=5e-2)
    qb = model_quality(mb, X[:600], yb)
    with torch.no_grad():
        s = torch.sigmoid(mb(torch.from_numpy(X[:600]))[:, 0]).numpy()
    assert qb.auc == pytest.approx(roc_auc_score(yb, s))
    assert qb.majority_accuracy == pytest.approx(max(yb.mean(), 1 - yb.mean()))
