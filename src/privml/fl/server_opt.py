"""Server optimizers for the FedAvg family: plain server learning rate, server momentum
(FedAvgM), FedAdam, FedYogi and FedAdagrad.

The server treats the round's aggregated update ``delta`` (an output of
:mod:`privml.fl.aggregate`: mean of the clients' new parameters minus the global parameters,
i.e. minus a pseudo-gradient) as a step direction and applies an optimizer to it
(Reddi et al. 2021, "Adaptive federated optimization", ICLR, Algorithm 2; Hsu et al. 2019,
"Measuring the effects of non-identical data distribution", for server momentum).

Everything is a pure function of a frozen :class:`ServerOptState` of float64 numpy arrays, so a
round can be checkpointed (:meth:`ServerOptState.as_arrays` for ``numpy.savez``,
:meth:`ServerOptState.to_json_dict` for JSON) and resumed to the same bits.

Update equations (element-wise; ``t`` = number of steps including this one):

* ``sgd``:      ``x <- x + lr * delta``  (``lr = 1`` is plain FedAvg)
* ``momentum``: ``m <- momentum * m + delta``; ``x <- x + lr * m``  (Flower's ``FedAvgM``)
* ``adam``:     ``m <- b1 m + (1-b1) delta``; ``v <- b2 v + (1-b2) delta^2``;
  ``x <- x + lr_t * m / (sqrt(v) + tau)`` with ``lr_t = lr sqrt(1-b2^t) / (1-b1^t)`` when
  ``bias_correction`` (Flower's ``FedAdam`` always corrects, with ``t = server_round + 1``,
  i.e. one step ahead of Kingma and Ba's count used here), else ``lr_t = lr`` (Reddi et al.)
* ``yogi``:     ``m`` as adam; ``v <- v - (1-b2) delta^2 sign(v - delta^2)``;
  ``x <- x + lr * m / (sqrt(v) + tau)``  (Flower's ``FedYogi``)
* ``adagrad``:  ``m`` as adam (``b1 = 0`` by default, as Flower's ``FedAdagrad``);
  ``v <- v + delta^2``; ``x <- x + lr * m / (sqrt(v) + tau)``

``m`` and ``v`` start at zero, as in Flower (Reddi et al. start ``v`` at ``tau^2``).
Defaults per kind are Flower 1.42's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from privml.errors import DataError, UsageError

FloatArray = NDArray[np.float64]

__all__ = [
    "SERVER_OPTIMIZERS",
    "ServerOptState",
    "ServerOptimizer",
    "init_state",
    "make_server_optimizer",
    "server_step",
]

SERVER_OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam", "yogi", "adagrad")
"""The server optimizer names the configuration accepts."""

# Flower 1.42 defaults: FedAvgM(server_learning_rate=1.0, server_momentum=0.0; privml uses the
# 0.9 of Hsu et al. since 0 would be plain sgd), FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99,
# tau=1e-9), FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3), FedAdagrad(eta=0.1,
# beta_1=0, tau=1e-9).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 1.0},
    "momentum": {"lr": 1.0, "momentum": 0.9},
    "adam": {"lr": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-9, "bias_correction": True},
    "yogi": {"lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "adagrad": {"lr": 0.1, "beta_1": 0.0, "tau": 1e-9},
}


def _number(value: Any, name: str, kind: str, *, low: float, high: float, low_open: bool) -> float:
    lo = "(" if low_open else "["
    domain = f"in {lo}{low}, {high})"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise UsageError(
            f"The '{name}' parameter of the {kind} server optimizer must be a number {domain}. "
            f"Got {value!r} ({type(value).__name__}) instead."
        )
    v = float(value)
    if math.isnan(v) or (v <= low if low_open else v < low) or v >= high:
        raise UsageError(
            f"The '{name}' parameter of the {kind} server optimizer must be a number {domain}. "
            f"Got {v} instead."
        )
    return v


@dataclass(frozen=True)
class ServerOptimizer:
    """Hyper-parameters of a server optimizer. Build it with :func:`make_server_optimizer`,
    which fills Flower's defaults for the kind.

    Attributes:
        kind: one of :data:`SERVER_OPTIMIZERS`.
        lr: server learning rate (Reddi et al.'s eta), > 0.
        momentum: server momentum in [0, 1) (``momentum`` kind only).
        beta_1: first-moment decay in [0, 1) (adam, yogi, adagrad).
        beta_2: second-moment decay in [0, 1) (adam, yogi).
        tau: adaptivity (denominator offset), > 0 (adam, yogi, adagrad).
        bias_correction: Adam bias correction of the step size (adam only).
    """

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta_1: float = 0.0
    beta_2: float = 0.0
    tau: float = 1e-9
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SERVER_OPTIMIZERS:
            raise UsageError(
                f"The 'server_optimizer' parameter must be one of {list(SERVER_OPTIMIZERS)}. "
                f"Got {self.kind!r} instead."
            )
        k = self.kind
        _number(self.lr, "lr", k, low=0.0, high=math.inf, low_open=True)
        _number(self.momentum, "momentum", k, low=0.0, high=1.0, low_open=False)
        _number(self.beta_1, "beta_1", k, low=0.0, high=1.0, low_open=False)
        _number(self.beta_2, "beta_2", k, low=0.0, high=1.0, low_open=False)
        _number(self.tau, "tau", k, low=0.0, high=math.inf, low_open=True)
        if not isinstance(self.bias_correction, bool):
            raise UsageError(
                f"The 'bias_correction' parameter of the {k} server optimizer must be true or "
                f"false. Got {self.bias_correction!r} instead."
            )

    def init(self, n_params: int) -> ServerOptState:
        """The zero state for a model of ``n_params`` parameters."""
        return init_state(self, n_params)

    def step(
        self, state: ServerOptState, params: ArrayLike, update: ArrayLike
    ) -> tuple[FloatArray, ServerOptState]:
        """Shorthand for :func:`server_step`."""
        return server_step(self, state, params, update)


def make_server_optimizer(kind: str = "sgd", **params: Any) -> ServerOptimizer:
    """Build a :class:`ServerOptimizer`, filling Flower 1.42's defaults for ``kind``.

    Args:
        kind: ``"sgd" | "momentum" | "adam" | "yogi" | "adagrad"``.
        **params: hyper-parameters the kind accepts (``lr``; ``momentum``; ``beta_1``,
            ``beta_2``, ``tau``, ``bias_correction``); an unknown one is an error.

    Raises:
        UsageError: unknown kind, a parameter the kind does not use, or a value out of range
            (all parameter problems in one message).
    """
    if kind not in _DEFAULTS:
        raise UsageError(
            f"The 'server_optimizer' parameter must be one of {list(SERVER_OPTIMIZERS)}. "
            f"Got {kind!r} instead."
        )
    allowed = _DEFAULTS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UsageError(
            f"The {kind} server optimizer does not take {unknown}; it accepts {sorted(allowed)}."
        )
    return ServerOptimizer(kind=kind, **{**allowed, **params})


@dataclass(frozen=True)
class ServerOptState:
    """Server optimizer state after ``step`` steps.

    Attributes:
        kind: the optimizer kind this state belongs to (checked on every step).
        step: number of steps taken, >= 0.
        m: first moment / momentum buffer, float64 ``[n_params]``.
        v: second moment, float64 ``[n_params]`` (zeros for sgd and momentum).
    """

    kind: str
    step: int
    m: FloatArray
    v: FloatArray

    def as_arrays(self) -> dict[str, NDArray[Any]]:
        """Arrays for ``numpy.savez(path, **state.as_arrays())``."""
        return {
            "kind": np.array(self.kind),
            "step": np.array(self.step, dtype=np.int64),
            "m": self.m.copy(),
            "v": self.v.copy(),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> ServerOptState:
        """Rebuild a state from :meth:`as_arrays` output (e.g. a loaded ``.npz``)."""
        try:
            kind = str(np.asarray(arrays["kind"]).item())
            step = int(np.asarray(arrays["step"]).item())
            m = np.asarray(arrays["m"], dtype=np.float64).copy()
            v = np.asarray(arrays["v"], dtype=np.float64).copy()
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"Server optimizer checkpoint is unreadable ({exc!r}); it needs 'kind', "
                "'step', 'm' and 'v'. Resume from another checkpoint or start a new run."
            ) from exc
        return _checked_state(kind, step, m, v)

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; floats round-trip exactly through ``json``."""
        return {
            "kind": self.kind,
            "step": self.step,
            "m": self.m.tolist(),
            "v": self.v.tolist(),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> ServerOptState:
        """Rebuild a state from :meth:`to_json_dict` output."""
        return cls.from_arrays(data)


def _checked_state(kind: str, step: int, m: FloatArray, v: FloatArray) -> ServerOptState:
    problems = []
    if kind not in SERVER_OPTIMIZERS:
        problems.append(f"unknown kind {kind!r}")
    if step < 0:
        problems.append(f"negative step {step}")
    if m.ndim != 1 or m.shape != v.shape:
        problems.append(f"m and v must be vectors of one length; got {m.shape} and {v.shape}")
    if not (np.isfinite(m).all() and np.isfinite(v).all()):
        problems.append("m or v contains NaN or Inf")
    if np.any(v < 0):
        problems.append("v has negative entries")
    if problems:
        raise DataError([f"Server optimizer checkpoint: {p}" for p in problems])
    return ServerOptState(kind=kind, step=step, m=m, v=v)


def init_state(opt: ServerOptimizer, n_params: int) -> ServerOptState:
    """The zero state of ``opt`` for a model of ``n_params`` parameters (>= 1)."""
    if isinstance(n_params, bool) or not isinstance(n_params, int | np.integer) or n_params < 1:
        raise UsageError(
            f"The 'n_params' parameter of init_state must be an integer >= 1. Got {n_params!r}."
        )
    zeros = np.zeros(int(n_params))
    return ServerOptState(kind=opt.kind, step=0, m=zeros, v=zeros.copy())


def _vector(value: ArrayLike, n: int, name: str) -> FloatArray:
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"The '{name}' parameter of server_step must be numeric ({exc}).") from exc
    if vec.shape != (n,):
        raise UsageError(
            f"The '{name}' parameter of server_step must have shape ({n},), the state's size. "
            f"Got shape {vec.shape} instead."
        )
    if not np.isfinite(vec).all():
        raise DataError(f"The '{name}' parameter of server_step contains NaN or Inf.")
    return vec


def server_step(
    opt: ServerOptimizer, state: ServerOptState, params: ArrayLike, update: ArrayLike
) -> tuple[FloatArray, ServerOptState]:
    """Apply one server optimizer step.

    Args:
        opt: the optimizer's hyper-parameters.
        state: its state before this round (``init_state(opt, n_params)`` at the start).
        params: the current global parameters, ``[n_params]``.
        update: the round's aggregated update ``delta`` (mean of new params - global params,
            the negative of the pseudo-gradient), ``[n_params]``.

    Returns:
        ``(new_params, new_state)``, both new objects; the inputs are not modified.

    Raises:
        UsageError: shapes disagree, or the state belongs to another optimizer kind.
        DataError: NaN or Inf in params or update.
    """
    if state.kind != opt.kind:
        raise UsageError(
            f"The server optimizer state is for {state.kind!r} but the optimizer is "
            f"{opt.kind!r}. Resume with the optimizer the run started with."
        )
    n = state.m.shape[0]
    x = _vector(params, n, "params")
    d = _vector(update, n, "update")
    t = state.step + 1
    m, v = state.m, state.v
    if opt.kind == "sgd":
        return x + opt.lr * d, ServerOptState(opt.kind, t, m.copy(), v.copy())
    if opt.kind == "momentum":
        m = opt.momentum * m + d
        return x + opt.lr * m, ServerOptState(opt.kind, t, m, v.copy())
    m = opt.beta_1 * m + (1.0 - opt.beta_1) * d
    d2 = d * d
    if opt.kind == "adam":
        v = opt.beta_2 * v + (1.0 - opt.beta_2) * d2
    elif opt.kind == "yogi":
        v = v - (1.0 - opt.beta_2) * d2 * np.sign(v - d2)
    else:  # adagrad
        v = v + d2
    lr = opt.lr
    if opt.kind == "adam" and opt.bias_correction:
        lr = opt.lr * math.sqrt(1.0 - opt.beta_2**t) / (1.0 - opt.beta_1**t)
    new_x = x + lr * m / (np.sqrt(v) + opt.tau)
    return new_x, ServerOptState(opt.kind, t, m, v)
