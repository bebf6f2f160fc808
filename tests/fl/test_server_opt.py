"""Server optimizers: equality with Flower 1.42's strategies, hand cases, checkpoints."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from privml.errors import DataError, UsageError
from privml.fl.server_opt import (
    SERVER_OPTIMIZERS,
    ServerOptimizer,
    ServerOptState,
    init_state,
    make_server_optimizer,
    server_step,
)

N_PARAMS = 13
ROUNDS = 6


@pytest.fixture(autouse=True)
def _quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)


def _fit_res(params: np.ndarray) -> FitRes:
    return FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([params]),
        num_examples=10,
        metrics={},
    )


def _run_flower(strategy, x0: np.ndarray, deltas: list[np.ndarray], first_round: int):
    """Drive Flower's aggregate_fit with one client whose new params are x + delta."""
    x = x0
    out = []
    for r, delta in enumerate(deltas, start=first_round):
        params, _ = strategy.aggregate_fit(r, [(None, _fit_res(x + delta))], [])
        x = parameters_to_ndarrays(params)[0]
        out.append(x)
    return out


def _run_privml(opt: ServerOptimizer, x0: np.ndarray, deltas: list[np.ndarray]):
    state = init_state(opt, x0.size)
    x = x0
    out = []
    for delta in deltas:
        x, state = server_step(opt, state, x, delta)
        out.append(x)
    return out, state


def _inputs(seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=N_PARAMS)
    deltas = [rng.normal(scale=rng.uniform(0.01, 1.0), size=N_PARAMS) for _ in range(ROUNDS)]
    return x0, deltas


def _compare(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        # Flower computes delta as (x + delta) - x, so agreement is to rounding, not bits.
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_matches_flower_fedadam(seed: int) -> None:
    x0, deltas = _inputs(seed)
    flwr = FedAdam(
        initial_parameters=ndarrays_to_parameters([x0]), eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3
    )
    # Flower's bias correction uses t = server_round + 1; feeding rounds 0, 1, ... makes that
    # Kingma and Ba's t = 1, 2, ..., the count privml uses.
    theirs = _run_flower(flwr, x0, deltas, first_round=0)
    opt = make_server_optimizer("adam", lr=0.05, beta_1=0.8, beta_2=0.95, tau=1e-3)
    ours, state = _run_privml(opt, x0, deltas)
    _compare(ours, theirs)
    np.testing.assert_allclose(state.m, flwr.m_t[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state.v, flwr.v_t[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_yogi_matches_flower_fedyogi(seed: int) -> None:
    x0, deltas = _inputs(seed)
    flwr = FedYogi(initial_parameters=ndarrays_to_parameters([x0]))
    theirs = _run_flower(flwr, x0, deltas, first_round=1)
    ours, state = _run_privml(make_server_optimizer("yogi"), x0, deltas)
    _compare(ours, theirs)
    np.testing.assert_allclose(state.v, flwr.v_t[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [5, 6])
def test_adagrad_matches_flower_fedadagrad(seed: int) -> None:
    x0, deltas = _inputs(seed)
    flwr = FedAdagrad(initial_parameters=ndarrays_to_parameters([x0]), eta=0.3, tau=1e-2)
    theirs = _run_flower(flwr, x0, deltas, first_round=1)
    ours, _ = _run_privml(make_server_optimizer("adagrad", lr=0.3, tau=1e-2), x0, deltas)
    _compare(ours, theirs)


@pytest.mark.parametrize("seed", [7, 8])
def test_momentum_and_sgd_match_flower_fedavgm(seed: int) -> None:
    x0, deltas = _inputs(seed)
    flwr = FedAvgM(
        initial_parameters=ndarrays_to_parameters([x0]),
        server_learning_rate=0.7,
        server_momentum=0.9,
    )
    theirs = _run_flower(flwr, x0, deltas, first_round=1)
    ours, _ = _run_privml(make_server_optimizer("momentum", lr=0.7, momentum=0.9), x0, deltas)
    _compare(ours, theirs)
    flwr_sgd = FedAvgM(initial_parameters=ndarrays_to_parameters([x0]), server_learning_rate=0.5)
    theirs = _run_flower(flwr_sgd, x0, deltas, first_round=1)
    ours, _ = _run_privml(make_server_optimizer("sgd", lr=0.5), x0, deltas)
    _compare(ours, theirs)


def test_hand_cases() -> None:
    x = np.array([1.0, -1.0])
    d = np.array([0.5, -2.0])
    sgd = make_server_optimizer("sgd")
    new, st = server_step(sgd, sgd.init(2), x, d)
    np.testing.assert_allclose(new, x + d)  # lr 1 is plain FedAvg
    assert st.step == 1
    # momentum 0.5, two equal steps: m = d, then 1.5 d
    mom = make_server_optimizer("momentum", lr=1.0, momentum=0.5)
    x1, st = server_step(mom, mom.init(2), x, d)
    x2, st = server_step(mom, st, x1, d)
    np.testing.assert_allclose(x2, x + d + 1.5 * d)
    # adam without bias correction, one step: m = 0.1 d, v = 0.01 d^2 -> step lr * sign(d)
    adam = make_server_optimizer("adam", lr=0.1, beta_1=0.9, beta_2=0.99, tau=1e-12,
                                 bias_correction=False)  # fmt: skip
    new, _ = server_step(adam, adam.init(2), x, d)
    np.testing.assert_allclose(new, x + 0.1 * np.sign(d), rtol=1e-9)
    # with bias correction (t = 1) the step is lr * sqrt(1-b2)/(1-b1) * m / sqrt(v) = lr * sign
    adam_bc = make_server_optimizer("adam", lr=0.1, tau=1e-12)
    new, _ = server_step(adam_bc, adam_bc.init(2), x, d)
    np.testing.assert_allclose(new, x + 0.1 * np.sign(d), rtol=1e-9)
    # adagrad, one step: v = d^2, m = d -> lr * sign(d)
    ada = make_server_optimizer("adagrad", lr=0.2, tau=1e-12)
    new, _ = server_step(ada, ada.init(2), x, d)
    np.testing.assert_allclose(new, x + 0.2 * np.sign(d), rtol=1e-9)


def test_step_is_pure() -> None:
    opt = make_server_optimizer("adam")
    st0 = opt.init(3)
    x = np.ones(3)
    d = np.array([0.1, 0.2, 0.3])
    a, st1 = opt.step(st0, x, d)
    b, st1b = opt.step(st0, x, d)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(st0.m, 0.0)
    np.testing.assert_array_equal(x, 1.0)
    assert st1.step == st1b.step == 1


@pytest.mark.parametrize("kind", SERVER_OPTIMIZERS)
def test_checkpoint_round_trip_resumes_bit_for_bit(kind: str, tmp_path) -> None:
    x0, deltas = _inputs(11)
    opt = make_server_optimizer(kind)
    straight, _ = _run_privml(opt, x0, deltas)
    # run 3 steps, checkpoint through npz and JSON, resume
    st = opt.init(N_PARAMS)
    x = x0
    for d in deltas[:3]:
        x, st = opt.step(st, x, d)
    np.savez(tmp_path / "s.npz", **st.as_arrays())
    with np.load(tmp_path / "s.npz") as z:
        st_npz = ServerOptState.from_arrays(z)
    st_json = ServerOptState.from_json_dict(json.loads(json.dumps(st.to_json_dict())))
    for resumed in (st_npz, st_json):
        assert resumed.step == 3 and resumed.kind == kind
        xr = x
        for d in deltas[3:]:
            xr, resumed = opt.step(resumed, xr, d)
        np.testing.assert_array_equal(xr, straight[-1])


def test_validation() -> None:
    with pytest.raises(UsageError, match="must be one of"):
        make_server_optimizer("adamw")
    with pytest.raises(UsageError, match="does not take \\['momentum'\\]"):
        make_server_optimizer("adam", momentum=0.9)
    with pytest.raises(UsageError, match="'lr' parameter of the sgd server optimizer"):
        make_server_optimizer("sgd", lr=0.0)
    with pytest.raises(UsageError, match="'beta_2'"):
        make_server_optimizer("yogi", beta_2=1.0)
    with pytest.raises(UsageError, match="'tau'"):
        make_server_optimizer("adagrad", tau=-1.0)
    with pytest.raises(UsageError, match="'momentum'"):
        make_server_optimizer("momentum", momentum="0.9")
    opt = make_server_optimizer("adam")
    with pytest.raises(UsageError, match=r"shape \(3,\)"):
        opt.step(opt.init(3), np.zeros(4), np.zeros(3))
    with pytest.raises(DataError):
        opt.step(opt.init(3), np.zeros(3), [0.0, np.nan, 0.0])
    with pytest.raises(UsageError, match="state is for 'sgd'"):
        opt.step(make_server_optimizer("sgd").init(3), np.zeros(3), np.zeros(3))
    with pytest.raises(UsageError, match="n_params"):
        opt.init(0)
    with pytest.raises(DataError, match="checkpoint"):
        ServerOptState.from_arrays({"kind": "adam", "step": 1, "m": [0.0], "v": [-1.0]})
    with pytest.raises(DataError, match="checkpoint"):
        ServerOptState.from_arrays({"kind": "adam"})
