"""FGSM and PGD: identical to ART 1.20 from the same start, and they really break a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privml.errors import UsageError
from privml.models.nets import ModelSpec
from privml.security.attacks.evasion import accuracy, fgsm, pgd, robust_accuracy

from .conftest import train_plain

art_est = pytest.importorskip("art.estimators.classification")
art_ev = pytest.importorskip("art.attacks.evasion")


def _art(model: torch.nn.Module, n_classes: int = 10):  # type: ignore[no-untyped-def]
    return art_est.PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(64,),
        nb_classes=n_classes,
        clip_values=(0.0, 1.0),
    )


@pytest.mark.parametrize(("norm", "art_norm", "eps"), [("inf", np.inf, 0.1), ("2", 2, 0.6)])
def test_fgsm_equals_art(digits_mlp, digits, norm, art_norm, eps) -> None:
    X, y = digits[0][1200:1300], digits[1][1200:1300]
    ours = fgsm(digits_mlp, X, y, eps=eps, norm=norm)
    theirs = art_ev.FastGradientMethod(_art(digits_mlp), norm=art_norm, eps=eps).generate(X, y)
    assert np.abs(ours - theirs).max() < 1e-5


@pytest.mark.parametrize(("norm", "art_norm", "eps"), [("inf", np.inf, 0.1), ("2", 2, 0.6)])
def test_pgd_equals_art_without_random_start(digits_mlp, digits, norm, art_norm, eps) -> None:
    X, y = digits[0][1200:1260], digits[1][1200:1260]
    ours = pgd(digits_mlp, X, y, eps=eps, steps=6, step_size=eps / 4, norm=norm,
               random_init=False)  # fmt: skip
    theirs = art_ev.ProjectedGradientDescent(
        _art(digits_mlp), norm=art_norm, eps=eps, eps_step=eps / 4, max_iter=6,
        num_random_init=0, batch_size=128, verbose=False,
    ).generate(X, y)  # fmt: skip
    assert np.abs(ours - theirs).max() < 1e-4
    # and the two attacks agree on the outcome record by record
    assert np.array_equal(
        digits_mlp(torch.from_numpy(ours)).argmax(1).numpy(),
        digits_mlp(torch.from_numpy(theirs)).argmax(1).numpy(),
    )


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_pgd_stays_in_budget_and_box(digits_mlp, digits, norm) -> None:
    X, y = digits[0][1200:1300], digits[1][1200:1300]
    eps = 0.1 if norm == "inf" else 0.8
    adv = pgd(digits_mlp, X, y, eps=eps, steps=15, norm=norm, restarts=2)
    d = adv - X
    size = np.abs(d).max(axis=1) if norm == "inf" else np.linalg.norm(d, axis=1)
    assert size.max() <= eps + 1e-5
    assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_attacks_break_an_undefended_model(digits_mlp, digits) -> None:
    X, y = digits[0][1200:], digits[1][1200:]
    clean = accuracy(digits_mlp, X, y)
    r_pgd = robust_accuracy(digits_mlp, X, y, budgets=[0.0, 0.05, 0.1], steps=20)
    r_fgsm = robust_accuracy(digits_mlp, X, y, budgets=[0.1], attack="fgsm")
    assert clean > 0.9 and r_pgd.clean_accuracy == clean
    assert r_pgd.accuracy[0] == clean
    # monotone in the budget, and PGD-20 far below clean accuracy at 0.1
    assert r_pgd.accuracy[2] <= r_pgd.accuracy[1] <= clean
    assert r_pgd.accuracy[2] < clean - 0.4
    # PGD is the stronger attack
    assert r_pgd.accuracy[2] <= r_fgsm.accuracy[0] + 0.01


def test_feature_mask_leaves_other_features_alone(digits_mlp, digits) -> None:
    X, y = digits[0][:50], digits[1][:50]
    mask = np.zeros(64)
    mask[:32] = 1
    adv = pgd(digits_mlp, X, y, eps=0.2, feature_mask=mask)
    assert np.array_equal(adv[:, 32:], X[:, 32:])
    assert np.abs(adv[:, :32] - X[:, :32]).max() > 0.1


def test_binary_one_logit_model() -> None:
    rng = np.random.default_rng(0)
    X = rng.random((300, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 1).astype(np.int64)
    m = train_plain(X, y, ModelSpec("logistic", 5, 1), steps=300, lr=0.1)
    r = robust_accuracy(m, X, y, budgets=[0.1, 0.3], steps=10)
    assert r.clean_accuracy > 0.9
    assert r.accuracy[1] < r.accuracy[0] < r.clean_accuracy


def test_bad_arguments_name_the_parameter(digits_mlp, digits) -> None:
    X, y = digits[0][:10], digits[1][:10]
    with pytest.raises(UsageError, match="'eps' parameter of pgd must be > 0"):
        pgd(digits_mlp, X, y, eps=-1)
    with pytest.raises(UsageError, match="'norm' parameter of fgsm"):
        fgsm(digits_mlp, X, y, eps=0.1, norm="l1")
    with pytest.raises(UsageError, match="'y' parameter of pgd"):
        pgd(digits_mlp, X, y[:5], eps=0.1)
    with pytest.raises(UsageError, match=r"labels in \[0, 9\]"):
        pgd(digits_mlp, X, y + 10, eps=0.1)
    with pytest.raises(UsageError, match="NaN"):
        fgsm(digits_mlp, np.full((2, 64), np.nan), y[:2], eps=0.1)
