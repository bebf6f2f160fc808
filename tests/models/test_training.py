"""Vectorized cohort training equals training each site in its own loop with the same batches.

The reference below is what a site would run on its own: a fresh torch model loaded with the
global weights, plain SGD steps ``p -= lr * grad`` (what ``torch.optim.SGD`` does without
momentum; the optimizer class itself is not used because constructing one imports
torch._dynamo, seconds on a busy machine), and its own shuffled mini-batches (each epoch a new
permutation from the site's generator, walked in order, the last batch smaller).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from privml.config import TrainingConfig
from privml.data.encoding import Encoder, Task
from privml.data.federation import FederatedData, SiteData
from privml.fl.engine import init_params, simulate
from privml.models.nets import ModelSpec, build_model, flat_params, load_flat_params
from privml.models.training import CohortData, MeanGradient, shuffled_batches, train_cohort

SIZES = (37, 5, 64, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is several times faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)  # uneven: sites with fewer batches idle through masked steps


def _site_data(spec: ModelSpec, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    Xs = [rng.random((n, spec.n_features), dtype=np.float32) for n in SIZES]
    k = max(spec.n_outputs, 2)
    ys = [rng.integers(0, k, n).astype(np.int64) for n in SIZES]
    return Xs, ys


def _reference_site(
    spec: ModelSpec,
    global_params: torch.Tensor,
    X: np.ndarray,
    y: np.ndarray,
    *,
    rng: np.random.Generator,
    lr: float,
    batch_size: int,
    epochs: int,
    prox_mu: float = 0.0,
) -> torch.Tensor:
    model = build_model(spec)
    load_flat_params(model, global_params)
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params]
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(epochs):
        perm = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            idx = torch.from_numpy(perm[start : start + batch_size])
            logits = model(Xt[idx])
            if spec.n_outputs == 1:
                loss = F.binary_cross_entropy_with_logits(logits[:, 0], yt[idx].float())
            else:
                loss = F.cross_entropy(logits, yt[idx])
            if prox_mu:
                loss = loss + prox_mu / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                )
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= lr * g
    return flat_params(model)


SPECS = {
    "logistic-binary": ModelSpec("logistic", 6, 1),
    "logistic-multiclass": ModelSpec("logistic", 6, 4),
    "mlp-tanh": ModelSpec("mlp", 6, 1, hidden=(8, 5), activation="tanh"),
    "mlp-relu-multiclass": ModelSpec("mlp", 6, 3, hidden=(7,), activation="relu"),
    "mlp-poly2": ModelSpec("mlp", 6, 1, hidden=(4,), activation="poly2"),
    "cnn": ModelSpec("cnn", 16, 3, hidden=(6,), image_shape=(4, 4), channels=(2, 3)),
}


@pytest.mark.parametrize("prox_mu", [0.0, 0.3])
@pytest.mark.parametrize("name", list(SPECS))
def test_cohort_equals_per_site_loops(name: str, prox_mu: float) -> None:
    spec = SPECS[name]
    if spec.kind == "cnn" and prox_mu:
        pytest.skip("one CNN case is enough (vmap fallback path)")
    model, global_params = init_params(spec, seed=1)
    Xs, ys = _site_data(spec)
    lr, batch_size, epochs = 0.5, 8, 3
    seeds = [[7, s] for s in range(len(SIZES))]
    new = train_cohort(
        global_params,
        CohortData.from_arrays(Xs, ys),
        rule=MeanGradient(model, spec, binary=spec.n_outputs == 1),
        lr=lr,
        batch_size=batch_size,
        epochs=epochs,
        rngs=[np.random.default_rng(s) for s in seeds],
        prox_mu=prox_mu,
    )
    assert new.shape == (len(SIZES), global_params.numel())
    for s in range(len(SIZES)):
        ref = _reference_site(
            spec,
            global_params,
            Xs[s],
            ys[s],
            rng=np.random.default_rng(seeds[s]),
            lr=lr,
            batch_size=batch_size,
            epochs=epochs,
            prox_mu=prox_mu,
        )
        torch.testing.assert_close(new[s], ref, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(new[s], global_params)  # it did train


def test_shuffled_batches_visit_every_record_once_per_epoch() -> None:
    sizes = np.array([10, 3, 0, 25])
    idx, mask = shuffled_batches(
        sizes, batch_size=4, epochs=2, rngs=[np.random.default_rng(i) for i in range(4)]
    )
    steps_per_epoch = 7  # ceil(25 / 4)
    assert idx.shape == mask.shape == (4, 2 * steps_per_epoch, 4)
    for s, n in enumerate(sizes):
        used = idx[s][mask[s] > 0]
        assert len(used) == 2 * n
        if n:
            per_epoch = np.bincount(used, minlength=n)
            assert (per_epoch == 2).all()
            # batches are full except the last of each epoch
            counts = mask[s].sum(axis=1)
            k = -(-n // 4)
            assert counts[: k - 1].tolist() == [4] * (k - 1)
    assert mask[2].sum() == 0  # an empty site never steps


def test_empty_batches_leave_parameters_unchanged() -> None:
    spec = ModelSpec("logistic", 3, 1)
    model, params = init_params(spec, seed=0)
    data = CohortData.from_arrays(
        [np.ones((4, 3), np.float32), np.ones((4, 3), np.float32)], [np.ones(4), np.zeros(4)]
    )
    idx = np.zeros((2, 1, 4), dtype=np.int64)
    mask = np.zeros((2, 1, 4), dtype=np.float32)
    mask[0] = 1.0  # site 0 trains one step, site 1 has an empty batch
    new = train_cohort(
        params,
        data,
        rule=MeanGradient(model, spec, binary=True),
        lr=1.0,
        batch_size=4,
        epochs=1,
        rngs=[],
        batches=(idx, mask),
    )
    assert not torch.equal(new[0], params)
    torch.testing.assert_close(new[1], params, atol=0, rtol=0)


def _fed(seed: int = 0) -> FederatedData:
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate((40, 25, 60)):
        X = rng.random((n, 5), dtype=np.float32)
        y = (X[:, 0] + 0.3 * rng.standard_normal(n) > 0.5).astype(np.int64)
        sites.append(SiteData(f"s{i}", X[:30], y[:30], X[30:], y[30:]))
    return FederatedData(sites, Encoder({}), Task("binary", "y", ("0", "1")))


def test_simulation_is_deterministic_for_a_seed() -> None:
    spec = ModelSpec("mlp", 5, 1, hidden=(6,))
    fed = _fed()
    training = TrainingConfig(rounds=4, local_epochs=2, batch_size=8, lr=0.5, seed=3)
    a = simulate(fed, spec, training)
    b = simulate(fed, spec, training)
    torch.testing.assert_close(a.params, b.params, atol=0, rtol=0)
    assert [r.loss for r in a.history] == [r.loss for r in b.history]
    c = simulate(fed, spec, training.model_copy(update={"seed": 4}))
    assert not torch.equal(a.params, c.params)


def test_simulation_does_not_touch_the_global_rng() -> None:
    spec = ModelSpec("logistic", 5, 1)
    torch.manual_seed(123)
    np.random.seed(5)
    expected_t, expected_np = torch.rand(1), np.random.rand()
    torch.manual_seed(123)
    np.random.seed(5)
    simulate(_fed(), spec, TrainingConfig(rounds=2, lr=0.5, seed=0))
    assert torch.equal(torch.rand(1), expected_t) and np.random.rand() == expected_np


@pytest.mark.parametrize(
    ("spec", "binary"),
    [
        (ModelSpec("logistic", 6, 1), True),
        (ModelSpec("logistic", 6, 3), False),
        (ModelSpec("mlp", 6, 1, hidden=(5,), activation="relu"), True),
        (ModelSpec("mlp", 6, 4, hidden=(5, 3), activation="tanh"), False),
        (ModelSpec("mlp", 6, 2, hidden=(4,), activation="square"), False),
        (ModelSpec("mlp", 6, 1, hidden=(4,), activation="poly2"), True),
    ],
    ids=lambda v: f"{v.kind}-{v.activation}" if isinstance(v, ModelSpec) else str(v),
)
def test_hand_written_mean_gradient_equals_autograd(spec: ModelSpec, binary: bool) -> None:
    from privml.models.training import Batch, LinearStackGradient

    torch.manual_seed(0)
    model = build_model(spec)
    S, B = 4, 7
    params = flat_params(model) + 0.3 * torch.randn(S, flat_params(model).numel())
    X = torch.rand(S, B, spec.n_features)
    y = torch.randint(0, 2 if binary else spec.n_outputs, (S, B))
    mask = (torch.rand(S, B) > 0.3).float()
    mask[1] = 0.0  # a site without records this step gets no gradient
    batch = Batch(X, y, mask)
    stack = LinearStackGradient.of(spec, binary=binary)
    assert stack is not None
    fast = stack.mean_gradient(params, batch)
    rule = MeanGradient(model, spec, binary=binary)
    rule._stack = None  # the autograd route
    torch.testing.assert_close(fast, rule(params, batch, 0), atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(fast[1]) == 0


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=12),
    batch=st.integers(1, 40),
    epochs=st.integers(1, 3),
    seed=st.integers(-5, 2**40),
    rnd=st.integers(1, 100),
    one_large=st.booleans(),
)
def test_cohort_batches_are_each_site_shuffling_alone(
    sizes: list[int], batch: int, epochs: int, seed: int, rnd: int, one_large: bool
) -> None:
    """A cohort's batches are what each site computes alone with site_order (so a site trains
    alike in any cohort or engine), every record once per epoch."""
    from privml.models.training import cohort_batches, site_order

    if one_large:
        sizes = [*sizes, 500]  # widely different sizes: the one-sort path
    ids = np.arange(len(sizes)) * 7 + 3
    idx, mask = cohort_batches(
        np.array(sizes), batch_size=batch, epochs=epochs, seed=seed, rnd=rnd, site_ids=ids
    )
    assert idx.shape[2] == min(batch, max(1, max(sizes)))
    for s, n in enumerate(sizes):
        k = 0
        for e in range(epochs):
            order = site_order(seed, rnd, int(ids[s]), e, n)
            assert sorted(order.tolist()) == list(range(n))
            for start in range(0, n, batch):
                chunk = order[start : start + batch]
                np.testing.assert_array_equal(idx[s, k, : len(chunk)], chunk)
                assert mask[s, k, : len(chunk)].all() and not mask[s, k, len(chunk) :].any()
                k += 1
            k += n == 0
        assert not mask[s, k:].any()
    other = cohort_batches(np.array(sizes), batch_size=batch, epochs=epochs, seed=seed + 1,
                           rnd=rnd, site_ids=ids)[0]  # fmt: skip
    if max(sizes) > 8:
        assert not np.array_equal(other, idx)  # the seed matters


@pytest.mark.parametrize("independent", [True, False])
@pytest.mark.parametrize("prox_mu", [0.0, 0.1])
def test_schedule_trains_as_the_dense_batches(independent: bool, prox_mu: float) -> None:
    """Training from the compact schedule (active sites only, grouped by batch length) equals
    training from the same batches laid out densely."""
    from privml.models.training import cohort_batches, cohort_schedule

    rng = np.random.default_rng(3)
    sizes = np.array([1, 5, 33, 70, 8, 0, 64, 2])
    spec = ModelSpec("mlp", 4, 1, hidden=(3,))
    Xs = [rng.random((n, 4)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, 2, n) for n in sizes]
    data = CohortData.from_arrays(Xs, ys)
    model, params = init_params(spec, 0)
    rule = MeanGradient(model, spec, binary=True)
    if not independent:

        class Shared:  # same gradients, but the trainer may not split the cohort
            def __call__(self, p: torch.Tensor, b: object, k: int) -> torch.Tensor:
                return rule(p, b, k)  # type: ignore[arg-type]

        used: object = Shared()
    else:
        used = rule
    kw = dict(batch_size=16, epochs=3, seed=5, rnd=2, site_ids=np.arange(len(sizes)) + 10)
    sch = cohort_schedule(sizes, **kw)  # type: ignore[arg-type]
    dense = cohort_batches(sizes, **kw)  # type: ignore[arg-type]
    common = dict(rule=used, lr=0.5, batch_size=16, epochs=3, rngs=(), prox_mu=prox_mu)
    a = train_cohort(params, data, schedule=sch, **common)  # type: ignore[arg-type]
    b = train_cohort(params, data, batches=dense, **common)  # type: ignore[arg-type]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.equal(a[5], params)  # the empty site keeps the global parameters
