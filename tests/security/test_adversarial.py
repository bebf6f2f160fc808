"""Adversarial training: measured by the robust accuracy it buys against PGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privml.errors import UsageError
from privml.models.nets import ModelSpec, build_model, flat_params
from privml.models.training import CohortData, train_cohort
from privml.security.attacks.evasion import robust_accuracy
from privml.security.defenses.adversarial import AdversarialGradient, adversarial_train

from .conftest import train_plain

SPEC = ModelSpec("mlp", 64, 10, hidden=(64,))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_buys_robustness(digits, method) -> None:
    X, y = digits
    Xtr, ytr, Xte, yte = X[:1000], y[:1000], X[1400:], y[1400:]
    plain = train_plain(Xtr, ytr, SPEC, steps=150)
    robust = adversarial_train(
        Xtr, ytr, SPEC, eps=0.1, method=method, steps=5, epochs=10, lr=3e-3, batch_size=100,
        warmup=0.2,
    )  # fmt: skip
    before = robust_accuracy(plain, Xte, yte, budgets=[0.1], steps=10)
    after = robust_accuracy(robust.model, Xte, yte, budgets=[0.1], steps=10)
    assert before.accuracy[0] < 0.45
    assert after.accuracy[0] > before.accuracy[0] + 0.2
    assert after.clean_accuracy > 0.85
    assert robust.settings["method"] == method


def test_rule_trains_several_sites_at_once(digits) -> None:
    """The rule plugs into the federated trainer: two sites train adversarially together and
    each equals its own single-site run."""
    X, y = digits
    torch.manual_seed(0)
    model = build_model(SPEC)
    p0 = flat_params(model)
    parts = [(X[:200], y[:200]), (X[200:400], y[200:400])]

    def run(ids):  # type: ignore[no-untyped-def]
        rule = AdversarialGradient(model, SPEC, binary=False, eps=0.1, steps=3, random_init=False)
        data = CohortData.from_arrays([parts[i][0] for i in ids], [parts[i][1] for i in ids])
        rngs = [np.random.default_rng(i) for i in ids]
        return train_cohort(p0, data, rule=rule, lr=0.5, batch_size=50, epochs=1, rngs=rngs)

    both = run([0, 1])
    alone = run([1])
    assert both.shape == (2, p0.numel())
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_bad_arguments(digits) -> None:
    X, y = digits
    with pytest.raises(UsageError, match="'eps' parameter of AdversarialGradient"):
        adversarial_train(X[:10], y[:10], SPEC, eps=0.0, epochs=1)
    with pytest.raises(UsageError, match="'method'"):
        adversarial_train(X[:10], y[:10], SPEC, eps=0.1, method="fgsm", epochs=1)
    with pytest.raises(UsageError, match="64 features"):
        adversarial_train(X[:10, :8], y[:10], SPEC, eps=0.1, epochs=1)
