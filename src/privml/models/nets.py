"""Model architectures: logistic regression, MLP, and a small CNN for image-like inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class Square(nn.Module):
    """x -> x**2: the HE-friendly activation of CryptoNets (exact under CKKS, depth 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Poly2(nn.Module):
    """x -> 0.125 x**2 + 0.5 x + 0.25: a degree-2 polynomial close to softplus/ReLU on [-2, 2].

    Being a polynomial it evaluates exactly under CKKS; unlike a pure square it keeps the sign
    of its input, which trains more stably.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.125 * x * x + 0.5 * x + 0.25


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "square": Square,
    "poly2": Poly2,
}

#: Activations that are polynomials, hence evaluable exactly under homomorphic encryption.
POLYNOMIAL_ACTIVATIONS = frozenset({"square", "poly2"})


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: architecture, input and output sizes.

    ``n_outputs`` is 1 for a binary task (one logit) and the number of classes otherwise.
    ``image_shape`` (height, width) is required for ``kind="cnn"``; inputs are then flat
    vectors of ``height * width`` values reshaped inside the model.
    """

    kind: str
    n_features: int
    n_outputs: int
    hidden: tuple[int, ...] = field(default=(32,))
    activation: str = "relu"
    image_shape: tuple[int, int] | None = None
    channels: tuple[int, ...] = field(default=(16, 32))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["channels"] = list(self.channels)
        d["image_shape"] = list(self.image_shape) if self.image_shape else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(
            kind=d["kind"],
            n_features=int(d["n_features"]),
            n_outputs=int(d["n_outputs"]),
            hidden=tuple(d.get("hidden", (32,))),
            activation=d.get("activation", "relu"),
            image_shape=tuple(d["image_shape"]) if d.get("image_shape") else None,  # type: ignore[arg-type]
            channels=tuple(d.get("channels", (16, 32))),
        )


    @property
    def n_params(self) -> int:
        """Number of trainable parameters of :func:`build_model` (computed, nothing built)."""
        out = self.n_outputs
        if self.kind == "mlp":
            widths = [self.n_features, *self.hidden, out]
            return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:], strict=True))
        if self.kind == "cnn" and self.image_shape is not None:
            h, w = self.image_shape
            c1, c2 = self.channels
            flat = c2 * math.ceil(h / 2) * math.ceil(w / 2)
            head = self.hidden[0] if self.hidden else 32
            return 10 * c1 + (9 * c1 + 1) * c2 + (flat + 1) * head + (head + 1) * out
        return (self.n_features + 1) * out


#: Largest model privml trains: every client update is a dense copy of the parameters.
MAX_PARAMS = 20_000_000


def check_spec(spec: ModelSpec) -> None:
    """Refuse a model that cannot be built for the data or is too large to train.

    Raises:
        ConfigError: a cnn without ``image_shape`` or one that does not fit the features, or a
            model with more than :data:`MAX_PARAMS` parameters; the message names the key.
    """
    from privml.errors import ConfigError

    if spec.kind == "cnn":
        if spec.image_shape is None:
            raise ConfigError("model.image_shape: a cnn needs image_shape = [height, width]")
        h, w = spec.image_shape
        if h * w != spec.n_features:
            raise ConfigError(
                f"model.image_shape: {h}x{w} = {h * w} pixels, but the data encodes to "
                f"{spec.n_features} input features; give the data's [height, width]"
            )
    n = spec.n_params
    if n > MAX_PARAMS:
        raise ConfigError(
            f"model: {spec.kind} with hidden = {list(spec.hidden)} on {spec.n_features} "
            f"features has {n:,} parameters; privml trains at most {MAX_PARAMS:,} (each client "
            "update is a dense copy). Use narrower or fewer hidden layers"
        )


class _Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build the torch module for ``spec`` (float32, default torch initialisation)."""
    if spec.activation not in ACTIVATIONS:
        raise ValueError(
            f"The 'activation' parameter must be one of {sorted(ACTIVATIONS)}. "
            f"Got {spec.activation!r} instead."
        )
    act = ACTIVATIONS[spec.activation]
    if spec.kind == "logistic":
        return nn.Sequential(nn.Linear(spec.n_features, spec.n_outputs))
    if spec.kind == "mlp":
        layers: list[nn.Module] = []
        width = spec.n_features
        for h in spec.hidden:
            layers += [nn.Linear(width, h), act()]
            width = h
        layers.append(nn.Linear(width, spec.n_outputs))
        return nn.Sequential(*layers)
    if spec.kind == "cnn":
        check_spec(spec)
        assert spec.image_shape is not None
        h, w = spec.image_shape
        c1, c2 = spec.channels
        conv: list[nn.Module] = [
            _Reshape((1, h, w)),
            nn.Conv2d(1, c1, 3, padding=1),
            act(),
            nn.Conv2d(c1, c2, 3, padding=1, stride=2),
            act(),
            nn.Flatten(),
        ]
        flat = c2 * math.ceil(h / 2) * math.ceil(w / 2)
        head_w = spec.hidden[0] if spec.hidden else 32
        return nn.Sequential(
            *conv, nn.Linear(flat, head_w), act(), nn.Linear(head_w, spec.n_outputs)
        )
    raise ValueError(
        f"The 'kind' parameter of [model] must be 'logistic', 'mlp' or 'cnn'. Got {spec.kind!r}."
    )


def param_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    """Names and shapes of the model's parameters, in flattening order."""
    return [(name, p.shape) for name, p in model.named_parameters()]


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float32)


def load_flat_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector back into the model's parameters, in place."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset : offset + n].reshape(p.shape))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the model needs {offset}")


def unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of ``flat`` shaped like the model's parameters (differentiable; vmap-friendly)."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, p in model.named_parameters():
        n = p.numel()
        out[name] = flat[offset : offset + n].reshape(p.shape)
        offset += n
    return out


def functional_forward(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(flat_params, X) -> logits`` for ``model``; composable with torch.func.vmap/grad."""

    def f(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, unflatten(model, flat), (x,))

    return f


_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "square": lambda x: x * x,
    "poly2": lambda x: 0.125 * x * x + 0.5 * x + 0.25,
}


def stacked_forward(
    spec: ModelSpec,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``f(stacked [S, P], X [S, B, F]) -> logits [S, B, out]`` for many copies of one model.

    Written with batched matrix products for the Linear-stack models (logistic, MLP): about
    15x faster here than ``vmap(functional_call)`` on small models, whose cost is all dispatch
    overhead. Returns None for architectures it does not cover (callers then use vmap).
    Parameter layout matches :func:`flat_params` (``weight`` [out, in] then ``bias`` per layer).
    """
    if spec.kind not in ("logistic", "mlp"):
        return None
    widths = [spec.n_features, *(spec.hidden if spec.kind == "mlp" else ()), spec.n_outputs]
    act = _ELEMENTWISE[spec.activation]
    layers: list[tuple[int, int, int]] = []  # (offset, in, out)
    offset = 0
    for i, o in zip(widths[:-1], widths[1:], strict=True):
        layers.append((offset, i, o))
        offset += i * o + o

    def f(stacked: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        S = stacked.shape[0]
        h = X
        for k, (off, i, o) in enumerate(layers):
            W = stacked[:, off : off + i * o].reshape(S, o, i)
            b = stacked[:, off + i * o : off + i * o + o].reshape(S, 1, o)
            h = torch.baddbmm(b, h, W.transpose(1, 2))
            if k < len(layers) - 1:
                h = act(h)
        return h

    return f
