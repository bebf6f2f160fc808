"""PyTorch models privml trains, and the flat-parameter helpers the engines use.

Engines treat a model as a function of one flat float32 parameter vector, so that many
sites' copies of the same architecture can be stacked into one ``[sites, n_params]`` tensor
and trained in one vectorized computation (see :mod:`privml.models.training`).
"""

from privml.models.nets import (
    ACTIVATIONS,
    ModelSpec,
    build_model,
    flat_params,
    functional_forward,
    load_flat_params,
    param_shapes,
)

__all__ = [
    "ACTIVATIONS",
    "ModelSpec",
    "build_model",
    "flat_params",
    "functional_forward",
    "load_flat_params",
    "param_shapes",
]
