"""Bounded queries: parser, declared bounds only, charge-before-release, accuracy."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from privml.dp import queries as Q
from privml.dp.accounting import basic_composition, compute_epsilon
from privml.dp.events import ComposedDpEvent, event_from_dict
from privml.dp.ledger import PrivacyLedger
from privml.errors import (
    BudgetExceededError,
    DataError,
    PrivacyLeakWarning,
    SchemaError,
    UsageError,
)

from .conftest import Col

# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("count()", Q.QuerySpec("count")),
        ("COUNT( age )", Q.QuerySpec("count", "age")),
        ("sum(income)", Q.QuerySpec("sum", "income")),
        ("mean(age)", Q.QuerySpec("mean", "age")),
        ("avg(age)", Q.QuerySpec("mean", "age")),
        ("var(age)", Q.QuerySpec("variance", "age")),
        ("histogram(sex)", Q.QuerySpec("histogram", "sex")),
        ("quantile(age, 0.9)", Q.QuerySpec("quantile", "age", 0.9)),
        ("quantile(age,.25)", Q.QuerySpec("quantile", "age", 0.25)),
        ("median(age)", Q.QuerySpec("quantile", "age", 0.5)),
        ("mean(age) by sex", Q.QuerySpec("mean", "age", by="sex")),
        ("mean(age) BY sex", Q.QuerySpec("mean", "age", by="sex")),
        (
            'mean("blood pressure") by `smoking status`',
            Q.QuerySpec("mean", "blood pressure", by="smoking status"),
        ),
    ],
)
def test_parse_valid_queries(text: str, expected: Q.QuerySpec) -> None:
    spec = Q.parse_query(text)
    assert spec == expected
    assert Q.parse_query(str(spec)) == spec  # canonical text round-trips


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("age", "unknown function .age."),
        ("mean age", r"expected \( at position 5"),
        ("max(age)", "unknown function 'max'"),
        ("mean()", "expected a column name"),
        ("mean(age", r"expected \) at the end"),
        ("mean(age))", "unexpected"),
        ("quantile(age)", "expected ,"),
        ("quantile(age, 1.5)", r"must be in \(0, 1\)"),
        ("quantile(age, x)", "expected number"),
        ("mean(age) by", "expected a column name"),
        ("mean(age) sex", "unexpected 'sex'"),
        ("mean(age); drop table", "unexpected character ';'"),
        ("count(a, b)", r"expected \)"),
    ],
)
def test_parse_rejects_everything_else(text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Q.parse_query(text)


def test_parse_error_lists_valid_forms() -> None:
    with pytest.raises(UsageError, match=r"Valid forms: count\(\), count\(col\)"):
        Q.parse_query("min(age)")


# ----------------------------------------------------------------------------- bounds


def test_undeclared_bounds_are_refused_with_config_hint(schema: dict, frame: pd.DataFrame) -> None:
    with pytest.raises(SchemaError) as info:
        Q.answer_query(frame, "mean(income)", schema=schema, epsilon=1.0)
    msg = str(info.value)
    assert "[data.schema.income]" in msg and 'type = "numeric"' in msg
    assert "min = " in msg and "max = " in msg
    with pytest.raises(
        SchemaError, match=r"(?s)not declared in the schema.*\[data.schema.weight\]"
    ):
        Q.answer_query(frame.assign(weight=1.0), "sum(weight)", schema=schema, epsilon=1.0)
    with pytest.raises(SchemaError, match="categorical"):
        Q.answer_query(frame, "mean(sex)", schema=schema, epsilon=1.0)
    with pytest.raises(SchemaError, match="declares no categories"):
        Q.answer_query(frame, "histogram(age)", schema=schema, epsilon=1.0)
    bad = {"age": Col("numeric", 10.0, 5.0)}
    with pytest.raises(SchemaError, match=r"min \(10.0\) must be < max \(5.0\)"):
        Q.answer_query(frame, "mean(age)", schema=bad, epsilon=1.0)


def test_bounds_never_come_from_the_data(schema: dict) -> None:
    """Sensitivity depends on declared bounds only: an outlier is clamped, not measured."""
    data = pd.DataFrame({"age": [30.0] * 99 + [1e9]})
    release = Q.bounded_sum(data["age"], lower=0, upper=100, epsilon=1.0)
    assert release.scale == pytest.approx(100.0, rel=1e-8)  # max(|min|, |max|) / epsilon
    same = Q.bounded_sum(data["age"].clip(upper=50), lower=0, upper=100, epsilon=1.0)
    assert same.scale == release.scale  # the data never changes the noise
    gen = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sums = [
            Q.bounded_sum(data["age"], lower=0, upper=100, epsilon=1.0, rng=gen).value
            for _ in range(300)
        ]
    # The clamped sum is 99 * 30 + 100 = 3070; the noise has scale 100.
    assert abs(np.mean(sums) - 3070) < 30


def test_exact_sum_is_order_independent_and_exact() -> None:
    gen = np.random.default_rng(2)
    x = gen.uniform(-100, 100, 200_001)
    total = Q.exact_sum(x, 100.0)
    assert total == Q.exact_sum(x[::-1].copy(), 100.0) == Q.exact_sum(gen.permutation(x), 100.0)
    assert total == pytest.approx(math.fsum(x), abs=200_001 * 100 * 2.0**-30)
    # Adding one record moves the sum by at most the stated sensitivity.
    for extra in (100.0, -100.0, 99.99999999):
        moved = Q.exact_sum(np.append(x, extra), 100.0) - total
        assert abs(moved) <= Q.sum_sensitivity(100.0)
    assert Q.sum_sensitivity(100.0) == pytest.approx(100.0, rel=2**-29)


def test_data_derived_bounds_need_explicit_consent(schema: dict, frame: pd.DataFrame) -> None:
    with pytest.raises(SchemaError, match="derived from the private data"):
        Q.answer_query(frame, "mean(score)", schema=schema, epsilon=1.0)
    with pytest.warns(PrivacyLeakWarning, match="score"):
        result = Q.answer_query(
            frame, "mean(score)", schema=schema, epsilon=1.0, allow_data_derived_bounds=True
        )
    assert 0 <= result.value <= 10


def test_binary_column_has_inherent_bounds(schema: dict, frame: pd.DataFrame) -> None:
    assert Q.declared_bounds(schema, "smoker") == (0.0, 1.0)
    assert Q.declared_categories(schema, "smoker") == [0, 1]
    res = Q.answer_query(frame, "histogram(smoker)", schema=schema, epsilon=2.0)
    assert set(res.value) == {"0", "1"}


def test_missing_columns_are_data_errors(schema: dict, frame: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="'age' is not in the site's data"):
        Q.answer_query(frame.drop(columns="age"), "mean(age)", schema=schema, epsilon=1.0)


# ----------------------------------------------------------------------------- ledger


def _ledger(tmp_path: Path, budget: float = 1.0) -> PrivacyLedger:
    return PrivacyLedger(
        tmp_path / "ledger.sqlite", dataset="heart", budget_epsilon=budget, budget_delta=1e-5
    )


def test_each_query_charges_before_release(
    schema: dict, frame: pd.DataFrame, tmp_path: Path
) -> None:
    ledger = _ledger(tmp_path, budget=1.0)
    res = Q.answer_query(frame, "mean(age)", schema=schema, epsilon=0.4, ledger=ledger, site="a")
    assert res.charge is not None and res.charge.label == "mean(age)"
    assert res.charge.epsilon == 0.4 and ledger.spent("a").epsilon == 0.4
    assert event_from_dict(res.charge.event) == res.event  # type: ignore[arg-type]
    Q.answer_query(frame, "histogram(sex)", schema=schema, epsilon=0.5, ledger=ledger, site="a")
    with pytest.raises(BudgetExceededError, match=r"only 0.1 of 1 remains"):
        Q.answer_query(frame, "count()", schema=schema, epsilon=0.2, ledger=ledger, site="a")
    assert [r.label for r in ledger.history("a")] == ["mean(age)", "histogram(sex)"]


def test_invalid_queries_spend_nothing(schema: dict, frame: pd.DataFrame, tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    for text, err in [
        ("mean(income)", SchemaError),
        ("mean(nope)", DataError),
        ("mode(age)", UsageError),
        ("mean(age) by age", SchemaError),
    ]:
        with pytest.raises(err):
            Q.answer_query(frame, text, schema=schema, epsilon=0.1, ledger=ledger, site="a")
    with pytest.raises(UsageError, match="'epsilon'"):
        Q.answer_query(frame, "count()", schema=schema, epsilon=-1.0, ledger=ledger, site="a")
    with pytest.raises(UsageError, match="'delta'"):
        Q.answer_query(
            frame, "count()", schema=schema, epsilon=1.0, delta=1.0, ledger=ledger, site="a"
        )
    with pytest.raises(UsageError, match="'site'"):
        Q.answer_query(frame, "count()", schema=schema, epsilon=1.0, ledger=ledger)
    assert ledger.history() == []


@pytest.mark.parametrize(
    "text",
    [
        "count()",
        "count(age)",
        "sum(age)",
        "mean(age)",
        "variance(age)",
        "histogram(sex)",
        "quantile(age, 0.3)",
        "mean(age) by sex",
    ],
)
@pytest.mark.parametrize("delta", [0.0, 1e-6])
def test_planned_event_matches_what_the_mechanisms_did(
    schema: dict, frame: pd.DataFrame, text: str, delta: float
) -> None:
    """The event booked before release is the event of the releases that follow."""
    spec = Q.parse_query(text)
    plan = Q._plan(
        spec, schema, epsilon=0.6, delta=delta, allow=False, rng=None, quantile_candidates=101
    )
    release = plan.run(frame)  # one group's release for a group-by
    assert release.event == (plan.unit_event or plan.event)
    share = 2 if spec.by else 1  # a group-by gives each group half: a record can change groups
    if spec.op != "quantile":
        assert release.epsilon == pytest.approx(plan.epsilon / share)
        assert release.delta == pytest.approx(plan.delta / share)
    if delta == 0:
        cost = basic_composition(plan.event)
        assert cost.epsilon <= 0.6 * (1 + 1e-9) and cost.delta == 0
    else:
        assert compute_epsilon(delta=max(plan.delta, 1e-12), event=plan.event) <= 0.6 * 1.01


# ----------------------------------------------------------------------------- answers


def test_query_answers_are_sane(schema: dict, frame: pd.DataFrame) -> None:
    eps = 5.0
    count = Q.answer_query(frame, "count()", schema=schema, epsilon=eps).value
    assert isinstance(count, int) and abs(count - 1000) < 10
    total = Q.answer_query(frame, "sum(age)", schema=schema, epsilon=eps).value
    # Laplace noise of scale 100 / 5 = 20 (secure, unseeded): |noise| >= 300 has probability
    # exp(-15) = 3e-7 (200 gave exp(-10) = 4.5e-5: one false failure in 22,000 runs)
    assert abs(total - frame["age"].sum()) < 300
    var = Q.answer_query(frame, "variance(age)", schema=schema, epsilon=eps).value
    assert abs(var - frame["age"].var(ddof=0)) < 60
    hist = Q.answer_query(frame, "histogram(sex)", schema=schema, epsilon=eps).value
    truth = frame["sex"].value_counts()
    assert set(hist) == {"F", "M"} and all(abs(hist[k] - truth[k]) < 10 for k in hist)
    median = Q.answer_query(frame, "median(age)", schema=schema, epsilon=eps).value
    assert abs(median - frame["age"].median()) < 5
    by = Q.answer_query(frame, "mean(age) by sex", schema=schema, epsilon=eps).value
    for k, v in by.items():
        assert abs(v - frame.loc[frame["sex"] == k, "age"].mean()) < 3
    gauss = Q.answer_query(frame, "mean(age)", schema=schema, epsilon=eps, delta=1e-6)
    assert gauss.mechanism == "gaussian" and abs(gauss.value - frame["age"].mean()) < 3


def test_group_by_is_parallel_composition(
    schema: dict, frame: pd.DataFrame, tmp_path: Path
) -> None:
    ledger = _ledger(tmp_path)
    res = Q.answer_query(
        frame, "mean(age) by sex", schema=schema, epsilon=0.5, ledger=ledger, site="a"
    )
    assert set(res.value) == {"F", "M"}
    assert ledger.spent("a").epsilon == 0.5  # each record is in one group: epsilon once
    assert isinstance(res.event, ComposedDpEvent)


def test_missing_and_undeclared_values_are_dropped(schema: dict) -> None:
    df = pd.DataFrame({"age": [10.0, None, 30.0, np.nan], "sex": ["F", None, "X", "M"]})
    hist = Q.bounded_histogram(df["sex"], categories=["F", "M"], epsilon=50.0)
    assert hist.value == {"F": 1, "M": 1}
    with pytest.raises(DataError, match="numeric"):
        Q.bounded_mean(["a", "b"], lower=0, upper=1, epsilon=1.0)


def test_quantile_clamps_and_uses_declared_candidates() -> None:
    gen = np.random.default_rng(3)
    data = gen.normal(50, 10, 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qs = [
            Q.bounded_quantile(
                data, lower=0, upper=100, q=0.9, epsilon=1.0, candidates=201, rng=gen
            ).value
            for _ in range(200)
        ]
    assert abs(np.median(qs) - np.quantile(data, 0.9)) < 1.0
    assert all(0 <= v <= 100 and round(v * 2, 9) == round(v * 2) for v in qs)  # on the grid
    with pytest.raises(UsageError, match="'q'"):
        Q.bounded_quantile(data, lower=0, upper=1, q=1.0, epsilon=1.0)


# ----------------------------------------------------------------------------- accuracy


def _skewed(n: int = 1000) -> np.ndarray:
    return np.random.default_rng(11).uniform(0, 40, n)  # mean 20 in bounds [0, 100]


@pytest.mark.parametrize("secure", [False, True])
def test_bounded_mean_error_matches_analytic_expectation(secure: bool) -> None:
    """E|error| at epsilon = 1 over 1,000 records within 10% of the analytic value.

    mean_hat - mean ~ (L_S - m L_N) / n with L_S ~ Lap(b_S), b_S = 50 / 0.5, L_N ~ Lap(2) and
    m = mean - 50 = -30; for independent Laplace(a), Laplace(b), E|X + Y| = (a^2 + ab + b^2) /
    (a + b).
    """
    x = _skewed()
    n, truth = x.size, float(np.mean(x))
    a, b = 50 / 0.5, abs(truth - 50) * 2
    expected = (a * a + a * b + b * b) / (a + b) / n
    reps = 1500 if secure else 2000
    gen = None if secure else np.random.default_rng(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errs = [
            Q.bounded_mean(x, lower=0, upper=100, epsilon=1.0, rng=gen).value - truth
            for _ in range(reps)
        ]
    mae = float(np.mean(np.abs(errs)))
    print(f"secure={secure}: mean |error| {mae:.5f}, analytic {expected:.5f}")
    # The seeded run has one outcome. The secure one cannot be seeded: over 1,500 draws the
    # mean |error| has a standard error of 0.0029 (2.3 % of 0.123, from 20,000 draws) and the
    # mean error 0.0043 around a ratio-estimator bias of -0.002; 10 % and 3 / sqrt(reps)
    # failed a correct sampler about once in 16,000 runs, 15 % and 5 / sqrt(reps) below 1e-7.
    # A noise scale off by a third (a wrong sensitivity or budget split) still fails the first.
    rel, k = (0.15, 5) if secure else (0.10, 3)
    assert mae == pytest.approx(expected, rel=rel)
    assert abs(float(np.mean(errs))) < k * expected / math.sqrt(reps) + 0.01  # ~unbiased
