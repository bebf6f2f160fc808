"""Gradient inversion: a site's exact update gives its record away; DP noise and secure
aggregation's sum do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privml.errors import UsageError
from privml.models.nets import ModelSpec, build_model, flat_params
from privml.security.attacks.inversion import (
    gradient_inversion,
    infer_labels,
    invert_gradient,
    reconstruction_error,
    site_gradient,
)


def _model(spec: ModelSpec, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    m = build_model(spec)
    return m, flat_params(m)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_analytic_attack_is_exact_for_one_record(digits, kind) -> None:
    X, y = digits
    m, p = _model(ModelSpec(kind, 64, 10, hidden=(32,)))
    g = site_gradient(m, p, X[5:6], y[5:6])
    rec, labels, _ = invert_gradient(m, p, g, n_records=1, method="analytic")
    assert np.abs(rec - X[5:6]).max() < 1e-4
    assert labels[0] == y[5]


def test_label_inference_from_the_last_bias(digits) -> None:
    X, y = digits
    m, p = _model(ModelSpec("mlp", 64, 10, hidden=(32,)))
    for i in range(10):
        g = site_gradient(m, p, X[i : i + 1], y[i : i + 1])
        assert infer_labels(m, g, 1)[0] == y[i]
    g = site_gradient(m, p, X[:3], y[:3])
    assert sorted(infer_labels(m, g, 3).tolist()) == sorted(y[:3].tolist())


def test_reconstruction_error_matches_records_optimally() -> None:
    T = np.eye(3, dtype=np.float32)
    mse, per, match = reconstruction_error(T, T[[2, 0, 1]])
    assert mse == 0.0 and per.tolist() == [0, 0, 0]
    assert match.tolist() == [1, 2, 0]
    with pytest.raises(UsageError, match="same F"):
        reconstruction_error(T, np.ones((3, 4)))


def test_views_site_dp_secure_aggregation(digits) -> None:
    """The exact update leaks the record; DP noise and the sum of 8 sites destroy it."""
    X, y = digits
    m, p = _model(ModelSpec("mlp", 64, 10, hidden=(16,)), seed=1)
    batches = [(X[i : i + 1], y[i : i + 1]) for i in range(8)]
    res = gradient_inversion(
        m, p, batches, views=("site", "dp", "secure_aggregation"), noise_multiplier=1.0,
        iterations=250, restarts=1, pool=X[:500], seed=0,
    )  # fmt: skip
    site, dp, sa = res
    assert site.view == "site" and dp.view == "dp" and sa.view == "secure_aggregation"
    assert site.relative_error < 0.15 and site.identified == 1.0 and site.labels_correct == 1.0
    assert dp.relative_error > site.relative_error + 0.3
    assert sa.relative_error > site.relative_error + 0.3
    assert sa.n_sites == 8
    assert site.to_dict()["relative_error"] == pytest.approx(site.mse / site.baseline_mse)


def test_analytic_attack_needs_a_linear_first_layer(digits) -> None:
    X, y = digits
    m, p = _model(ModelSpec("cnn", 64, 10, image_shape=(8, 8)))
    g = site_gradient(m, p, X[:1], y[:1])
    with pytest.raises(UsageError, match="first layer is Linear"):
        invert_gradient(m, p, g, n_records=1, method="analytic")
    with pytest.raises(UsageError, match="'gradient' parameter"):
        invert_gradient(m, p, g[:-1], n_records=1)
