"""Differential privacy: mechanisms, bounded queries, privacy events, accountants, the ledger.

Public names are re-exported lazily (PEP 562), so ``import privml.dp.ledger`` in a short-lived
query process does not pay for OpenDP, SciPy and dp-accounting until they are used.

* :mod:`privml.dp.mechanisms` -- Laplace, Gaussian (classic / analytic), discrete Laplace and
  Gaussian, exponential mechanism, report-noisy-max, randomized response.
* :mod:`privml.dp.samplers` -- OpenDP's exact samplers (default) and the insecure numpy ones.
* :mod:`privml.dp.events` -- dp-accounting DpEvents plus privml's Pure/Approx/DiscreteGaussian.
* :mod:`privml.dp.accounting` -- PLD / RDP epsilon, basic composition, noise calibration.
* :mod:`privml.dp.ledger` -- the persistent per-site budget ledger.
* :mod:`privml.dp.queries` -- bounded count/sum/mean/variance/histogram/quantile/group-by.
* :mod:`privml.dp.cli` -- the ``privml dp`` sub-app and the query/budget command functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privml.dp.accounting import (
        PrivacyCost,
        RunningEpsilon,
        basic_composition,
        calibrate_noise_multiplier,
        compute_epsilon,
        dp_fedavg_epsilon,
        dp_fedavg_event,
        dpsgd_epsilon,
        dpsgd_event,
        make_accountant,
    )
    from privml.dp.events import (
        ApproxDpEvent,
        DiscreteGaussianDpEvent,
        PureDpEvent,
        event_from_dict,
        event_from_json,
        event_to_dict,
        event_to_json,
    )
    from privml.dp.ledger import BudgetStatus, ChargeRecord, PrivacyLedger, Spend
    from privml.dp.mechanisms import (
        Release,
        analytic_gaussian_delta,
        analytic_gaussian_sigma,
        classic_gaussian_sigma,
        discrete_gaussian,
        discrete_gaussian_delta,
        discrete_gaussian_sigma,
        discrete_laplace,
        exponential_mechanism,
        gaussian,
        laplace,
        randomized_response,
        report_noisy_max,
    )
    from privml.dp.queries import (
        QueryResult,
        QuerySpec,
        answer_query,
        bounded_count,
        bounded_histogram,
        bounded_mean,
        bounded_quantile,
        bounded_sum,
        bounded_variance,
        parse_query,
    )

_EXPORTS = {
    "privml.dp.accounting": (
        "PrivacyCost",
        "RunningEpsilon",
        "basic_composition",
        "calibrate_noise_multiplier",
        "compute_epsilon",
        "dp_fedavg_epsilon",
        "dp_fedavg_event",
        "dpsgd_epsilon",
        "dpsgd_event",
        "make_accountant",
    ),
    "privml.dp.events": (
        "ApproxDpEvent",
        "DiscreteGaussianDpEvent",
        "PureDpEvent",
        "event_from_dict",
        "event_from_json",
        "event_to_dict",
        "event_to_json",
    ),
    "privml.dp.ledger": ("BudgetStatus", "ChargeRecord", "PrivacyLedger", "Spend"),
    "privml.dp.mechanisms": (
        "Release",
        "analytic_gaussian_delta",
        "analytic_gaussian_sigma",
        "classic_gaussian_sigma",
        "discrete_gaussian",
        "discrete_gaussian_delta",
        "discrete_gaussian_sigma",
        "discrete_laplace",
        "exponential_mechanism",
        "gaussian",
        "laplace",
        "randomized_response",
        "report_noisy_max",
    ),
    "privml.dp.queries": (
        "QueryResult",
        "QuerySpec",
        "answer_query",
        "bounded_count",
        "bounded_histogram",
        "bounded_mean",
        "bounded_quantile",
        "bounded_sum",
        "bounded_variance",
        "parse_query",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "ApproxDpEvent",
    "BudgetStatus",
    "ChargeRecord",
    "DiscreteGaussianDpEvent",
    "PrivacyCost",
    "PrivacyLedger",
    "PureDpEvent",
    "QueryResult",
    "QuerySpec",
    "Release",
    "RunningEpsilon",
    "Spend",
    "analytic_gaussian_delta",
    "analytic_gaussian_sigma",
    "answer_query",
    "basic_composition",
    "bounded_count",
    "bounded_histogram",
    "bounded_mean",
    "bounded_quantile",
    "bounded_sum",
    "bounded_variance",
    "calibrate_noise_multiplier",
    "classic_gaussian_sigma",
    "compute_epsilon",
    "discrete_gaussian",
    "discrete_gaussian_delta",
    "discrete_gaussian_sigma",
    "discrete_laplace",
    "dp_fedavg_epsilon",
    "dp_fedavg_event",
    "dpsgd_epsilon",
    "dpsgd_event",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "exponential_mechanism",
    "gaussian",
    "laplace",
    "make_accountant",
    "parse_query",
    "randomized_response",
    "report_noisy_max",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'privml.dp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
