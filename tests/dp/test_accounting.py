"""Accounting: golden values, invariants, calibration, basic composition, event JSON.

Golden values were computed once with dp-accounting 0.6 directly (PLDAccountant with its
default value_discretization_interval=1e-4 and RdpAccountant with its default orders) and are
hard-coded below. At test time they are cross-checked against independent implementations:
Opacus's RDP accountant (Mironov et al. 2019 formulas, its own orders) and Opacus's PRV
accountant (Gopi et al. 2021, a different numerical composition).
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest

from privml.dp import accounting as acc
from privml.dp.events import (
    ApproxDpEvent,
    ComposedDpEvent,
    DiscreteGaussianDpEvent,
    DiscreteLaplaceDpEvent,
    GaussianDpEvent,
    LaplaceDpEvent,
    NonPrivateDpEvent,
    NoOpDpEvent,
    PoissonSampledDpEvent,
    PureDpEvent,
    RandomizedResponseDpEvent,
    SelfComposedDpEvent,
    event_from_dict,
    event_from_json,
    event_to_dict,
    event_to_json,
)
from privml.errors import UsageError

# (q, sigma, steps, delta, epsilon PLD, epsilon RDP) from dp-accounting 0.6 directly.
GOLDEN = [
    (0.01, 4.0, 10000, 1e-5, 0.9469993059852784, 1.0354900660362436),  # Abadi et al. 2016
    (0.01, 1.1, 10000, 1e-5, 5.192620131649874, 5.632010670081592),
    (0.004, 1.0, 5000, 1e-6, 1.7341875378237792, 1.961600997866028),
    (0.1, 2.0, 1000, 1e-5, 8.279293379674034, 8.946956795817709),
    (1.0, 10.0, 10, 1e-5, 1.1993696868306276, 1.3084972690274297),
    (0.05, 0.8, 200, 1e-3, 5.145900939675292, 6.181612728937871),
    (0.02, 1.5, 3000, 1e-6, 4.023411195490142, 4.3248197749954205),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "eps_pld", "eps_rdp"), GOLDEN)
def test_golden_values(
    q: float, sigma: float, steps: int, delta: float, eps_pld: float, eps_rdp: float
) -> None:
    pld = acc.compute_epsilon(delta=delta, sampling_rate=q, noise_multiplier=sigma, steps=steps)
    rdp = acc.compute_epsilon(
        delta=delta, sampling_rate=q, noise_multiplier=sigma, steps=steps, accountant="rdp"
    )
    # privml's automatic PLD grid is within 0.5% of the library's finest default...
    assert pld == pytest.approx(eps_pld, rel=5e-3)
    # ... and RDP is dp-accounting's own, to the last digits.
    assert rdp == pytest.approx(eps_rdp, rel=1e-9)
    assert pld < rdp  # PLD is the tighter accountant


@pytest.mark.slow  # importing Opacus imports torch (several seconds)
@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "eps_pld", "eps_rdp"), GOLDEN)
def test_golden_rdp_agrees_with_opacus(
    q: float, sigma: float, steps: int, delta: float, eps_pld: float, eps_rdp: float
) -> None:
    from opacus.accountants import RDPAccountant

    logging.getLogger("opacus").setLevel(logging.ERROR)
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = opacus.get_epsilon(delta)
    # Different grids of Renyi orders: agreement to 1%.
    assert theirs == pytest.approx(eps_rdp, rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "eps_pld", "eps_rdp"), GOLDEN)
def test_golden_pld_agrees_with_opacus_prv(
    q: float, sigma: float, steps: int, delta: float, eps_pld: float, eps_rdp: float
) -> None:
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = prv.get_epsilon(delta)
    assert theirs == pytest.approx(eps_pld, rel=2e-2)


def test_abadi_setting_shorthand_helpers() -> None:
    eps = acc.dpsgd_epsilon(sampling_rate=0.01, noise_multiplier=4.0, steps=10_000, delta=1e-5)
    assert eps == pytest.approx(0.947, abs=5e-3)
    fed = acc.dp_fedavg_epsilon(
        client_sampling_rate=0.01, noise_multiplier=4.0, rounds=10_000, delta=1e-5
    )
    assert fed == eps  # client-level DP-FedAvg is the same event with clients as the unit
    assert acc.dp_fedavg_event(
        client_sampling_rate=0.1, noise_multiplier=1.0, rounds=5
    ) == SelfComposedDpEvent(PoissonSampledDpEvent(0.1, GaussianDpEvent(1.0)), 5)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_noop_gives_zero(accountant: str) -> None:
    assert acc.compute_epsilon(delta=1e-5, event=NoOpDpEvent(), accountant=accountant) == 0.0  # type: ignore[arg-type]
    assert (
        acc.compute_epsilon(
            delta=1e-5,
            event=SelfComposedDpEvent(NoOpDpEvent(), 100),
            accountant=accountant,  # type: ignore[arg-type]
        )
        == 0.0
    )


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_steps_one_by_one_equal_self_composition(accountant: str) -> None:
    step = PoissonSampledDpEvent(0.05, GaussianDpEvent(2.0))
    one_by_one = acc.make_accountant(accountant, value_discretization_interval=1e-3)  # type: ignore[arg-type]
    for _ in range(6):
        one_by_one.compose(step)
    together = acc.make_accountant(accountant, value_discretization_interval=1e-3)  # type: ignore[arg-type]
    together.compose(SelfComposedDpEvent(step, 6))
    composed = acc.make_accountant(accountant, value_discretization_interval=1e-3)  # type: ignore[arg-type]
    composed.compose(ComposedDpEvent([step] * 6))
    e1 = one_by_one.get_epsilon(1e-5)
    assert e1 == pytest.approx(together.get_epsilon(1e-5), rel=1e-3)
    assert e1 == pytest.approx(composed.get_epsilon(1e-5), rel=1e-3)


def test_epsilon_decreases_with_noise_and_grows_with_steps() -> None:
    eps = [
        acc.compute_epsilon(delta=1e-5, sampling_rate=0.01, noise_multiplier=s, steps=300)
        for s in (1.5, 2.0, 4.0)
    ]
    assert eps == sorted(eps, reverse=True)
    eps_t = [
        acc.compute_epsilon(delta=1e-5, sampling_rate=0.01, noise_multiplier=2.0, steps=t)
        for t in (10, 100, 300)
    ]
    assert eps_t == sorted(eps_t)


def test_non_private_event_gives_infinity() -> None:
    event = ComposedDpEvent([GaussianDpEvent(1.0), NonPrivateDpEvent()])
    assert acc.compute_epsilon(delta=1e-5, event=event) == math.inf
    assert acc.basic_composition(NonPrivateDpEvent()).epsilon == math.inf


# ----------------------------------------------------------------------------- privml events


def test_pure_events_match_their_epsilon() -> None:
    # A single epsilon-DP event is (epsilon, 0)-DP and not better: eps(delta) -> epsilon.
    eps = acc.compute_epsilon(delta=1e-9, event=PureDpEvent(0.7))
    assert 0.69 <= eps <= 0.7 + 1e-6
    # RDP's conversion to (epsilon, delta) is lossy, but only slightly for one event.
    eps_rdp = acc.compute_epsilon(delta=1e-9, event=PureDpEvent(0.7), accountant="rdp")
    assert 0.7 <= eps_rdp <= 0.75
    # Composition beats basic composition for many small epsilon-DP steps.
    many = SelfComposedDpEvent(PureDpEvent(0.05), 400)
    assert acc.basic_composition(many).epsilon == pytest.approx(20.0)
    assert acc.compute_epsilon(delta=1e-6, event=many) < 6.0
    assert acc.compute_epsilon(delta=1e-6, event=many, accountant="rdp") < 8.0


def test_approx_event_in_pld_and_refused_by_rdp() -> None:
    eps = acc.compute_epsilon(delta=2e-6, event=ApproxDpEvent(0.5, 1e-6))
    assert eps <= 0.5 + 1e-3
    with pytest.raises(UsageError, match="RDP cannot represent"):
        acc.compute_epsilon(delta=1e-5, event=ApproxDpEvent(0.5, 1e-6), accountant="rdp")


def test_discrete_gaussian_event_is_close_to_continuous() -> None:
    dg = acc.compute_epsilon(delta=1e-5, event=DiscreteGaussianDpEvent(30.0, 10))
    g = acc.compute_epsilon(delta=1e-5, event=GaussianDpEvent(3.0))
    assert dg == pytest.approx(g, rel=0.02)
    rdp = acc.compute_epsilon(delta=1e-5, event=DiscreteGaussianDpEvent(30.0, 10), accountant="rdp")
    assert rdp == pytest.approx(
        acc.compute_epsilon(delta=1e-5, event=GaussianDpEvent(3.0), accountant="rdp"), rel=1e-6
    )


def test_basic_composition() -> None:
    event = ComposedDpEvent(
        [
            LaplaceDpEvent(2.0),  # 0.5
            DiscreteLaplaceDpEvent(noise_parameter=0.1, sensitivity=3),  # 0.3
            SelfComposedDpEvent(PureDpEvent(0.1), 4),  # 0.4
            ApproxDpEvent(0.2, 1e-6),
            RandomizedResponseDpEvent(noise_parameter=0.5, num_buckets=2),  # log 3
        ]
    )
    cost = acc.basic_composition(event)
    assert cost.epsilon == pytest.approx(0.5 + 0.3 + 0.4 + 0.2 + math.log(3))
    assert cost.delta == pytest.approx(1e-6)
    sampled = acc.basic_composition(PoissonSampledDpEvent(0.1, PureDpEvent(1.0)))
    assert sampled.epsilon == pytest.approx(math.log1p(0.1 * math.expm1(1.0)))
    with pytest.raises(UsageError, match="compute_epsilon"):
        acc.basic_composition(GaussianDpEvent(1.0))


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [
        (1.0, 0.01, 10_000, "pld"),
        (8.0, 0.01, 10_000, "pld"),
        (0.5, 0.004, 2_000, "rdp"),
        (3.0, 1.0, 1, "pld"),
    ],
)
def test_calibration_ends_at_most_target_and_within_one_percent(
    target: float, q: float, steps: int, accountant: str
) -> None:
    sigma = acc.calibrate_noise_multiplier(
        target_epsilon=target,
        delta=1e-5,
        sampling_rate=q,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
    )
    eps = acc.compute_epsilon(
        delta=1e-5,
        sampling_rate=q,
        noise_multiplier=sigma,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
    )
    assert 0.99 * target <= eps <= target
    # Smallest such multiplier: 2% less noise overshoots the target.
    less = acc.compute_epsilon(
        delta=1e-5,
        sampling_rate=q,
        noise_multiplier=0.98 * sigma,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
    )
    assert less > target


def test_calibration_validates_inputs() -> None:
    with pytest.raises(
        UsageError, match="'target_epsilon' parameter of calibrate_noise_multiplier"
    ):
        acc.calibrate_noise_multiplier(target_epsilon=0.0, delta=1e-5, sampling_rate=0.1, steps=10)
    with pytest.raises(UsageError, match="'sampling_rate'"):
        acc.calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sampling_rate=1.5, steps=10)
    with pytest.raises(UsageError, match="'tolerance'"):
        acc.calibrate_noise_multiplier(
            target_epsilon=1.0, delta=1e-5, sampling_rate=0.1, steps=10, tolerance=0.0
        )


def test_compute_epsilon_validates_inputs() -> None:
    with pytest.raises(
        UsageError, match=r"'delta' parameter of compute_epsilon must be in \(0, 1\)"
    ):
        acc.compute_epsilon(delta=0.0, event=GaussianDpEvent(1.0))
    with pytest.raises(UsageError, match="either 'event' or all of"):
        acc.compute_epsilon(delta=1e-5, sampling_rate=0.1)
    with pytest.raises(UsageError, match="not both"):
        acc.compute_epsilon(delta=1e-5, event=GaussianDpEvent(1.0), steps=3)
    with pytest.raises(UsageError, match="'accountant'"):
        acc.compute_epsilon(delta=1e-5, event=GaussianDpEvent(1.0), accountant="moments")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'steps' parameter of dpsgd_event must be an int"):
        acc.compute_epsilon(delta=1e-5, sampling_rate=0.1, noise_multiplier=1.0, steps=2.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- running epsilon


def test_running_epsilon_increments_sum_to_the_total() -> None:
    step = SelfComposedDpEvent(PoissonSampledDpEvent(0.05, GaussianDpEvent(2.0)), 20)
    running = acc.RunningEpsilon(delta=1e-5, value_discretization_interval=1e-3)
    increments = [running.add(step) for _ in range(5)]
    assert increments[0].delta == 1e-5 and all(i.delta == 0 for i in increments[1:])
    assert all(i.epsilon >= 0 for i in increments)
    total = acc.compute_epsilon(
        delta=1e-5, event=SelfComposedDpEvent(step, 5), value_discretization_interval=1e-3
    )
    assert math.fsum(i.epsilon for i in increments) == pytest.approx(total, rel=1e-3)
    assert running.epsilon == math.fsum(i.epsilon for i in increments)
    # The run's event is kept (dp-accounting merges the repeated self-compositions).
    assert running.event == SelfComposedDpEvent(step.event, 100)


# ----------------------------------------------------------------------------- event JSON


def test_event_json_round_trip() -> None:
    event = SelfComposedDpEvent(
        ComposedDpEvent(
            [
                PureDpEvent(0.5),
                PoissonSampledDpEvent(0.01, GaussianDpEvent(1.0)),
                DiscreteGaussianDpEvent(3.0, 2),
                LaplaceDpEvent(2.0),
            ]
        ),
        10,
    )
    assert event_from_json(event_to_json(event)) == event
    assert event_from_dict(event_to_dict(event)) == event


def test_event_decoding_only_instantiates_known_classes() -> None:
    with pytest.raises(UsageError, match="only dp_accounting and privml.dp.events"):
        event_from_dict({"module_name": "os", "class_name": "system"})
    with pytest.raises(UsageError, match="Unknown field"):
        event_from_dict(
            {"module_name": "privml.dp.events", "class_name": "PureDpEvent", "epsilon": 1, "x": 2}
        )
    with pytest.raises(UsageError, match="not valid JSON"):
        event_from_json("{")
