"""DP-SGD engine: per-sample gradients, per-sample clipping, Poisson sampling, noise, Opacus."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privml.dp import sgd as sgd_module
from privml.dp.randomness import NoiseSource
from privml.dp.sgd import (
    DPSGDGradient,
    clipped_grad_sum,
    layerwise_supported,
    noise_generators,
    per_sample_gradients,
    poisson_batches,
    sampling_plan,
)
from privml.errors import UsageError
from privml.models.nets import ModelSpec, build_model, flat_params, load_flat_params
from privml.models.training import Batch, CohortData, per_sample_loss, train_cohort

SPECS = [
    (ModelSpec("logistic", 12, 1), True),
    (ModelSpec("mlp", 12, 3, hidden=(8, 5), activation="tanh"), False),
    (ModelSpec("cnn", 36, 4, hidden=(6,), image_shape=(6, 6), channels=(3, 4)), False),
]


def _batch(spec: ModelSpec, binary: bool, S: int = 3, B: int = 7, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(S, B, spec.n_features, generator=g)
    y = torch.randint(0, 2 if binary else spec.n_outputs, (S, B), generator=g)
    mask = (torch.rand(S, B, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    return Batch(X, y, mask)


def _stacked(spec: ModelSpec, S: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(spec)
    p = flat_params(model)
    return model, p + 0.3 * torch.randn(S, p.numel())


def _loop_reference(
    model: nn.Module, params: torch.Tensor, batch: Batch, C: float, binary: bool
) -> torch.Tensor:
    """Independent reference: one autograd call per record, clip, sum (plain Python loops)."""
    loss = per_sample_loss(binary)
    S, B = batch.y.shape
    out = torch.zeros_like(params)
    for s in range(S):
        load_flat_params(model, params[s])
        for b in range(B):
            if batch.mask[s, b] == 0:
                continue
            model.zero_grad()
            loss(model(batch.X[s, b : b + 1]), batch.y[s, b : b + 1]).sum().backward()
            g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            out[s] += g * min(1.0, C / (float(g.norm()) + 1e-6))
    return out


@pytest.mark.parametrize(("spec", "binary"), SPECS, ids=lambda v: getattr(v, "kind", ""))
def test_layerwise_equals_per_record_loop(spec: ModelSpec, binary: bool) -> None:
    model, params = _stacked(spec, 3)
    batch = _batch(spec, binary)
    assert layerwise_supported(model)
    fast, norms = clipped_grad_sum(model, params, batch, max_grad_norm=0.4, binary=binary)
    vm, vnorms = clipped_grad_sum(
        model, params, batch, max_grad_norm=0.4, binary=binary, method="vmap"
    )
    ref = _loop_reference(build_model(spec), params, batch, 0.4, binary)
    torch.testing.assert_close(fast, ref, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(vm, ref, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(norms, vnorms * batch.mask, atol=1e-4, rtol=1e-4)
    assert float(norms.max()) > 0.4  # the test exercises clipping, not only pass-through


def test_clipping_is_per_sample_with_one_huge_gradient() -> None:
    spec = ModelSpec("mlp", 5, 2, hidden=(4,))
    model, params = _stacked(spec, 1)
    X = torch.rand(1, 6, 5)
    X[0, 2] *= 1e4  # one record with an enormous gradient ...
    y = torch.tensor([[0, 1, 0, 1, 1, 0]])
    load_flat_params(model, params[0])
    y[0, 2] = int(model(X[0, 2:3]).argmin())  # ... labelled against the model's prediction
    mask = torch.ones(1, 6)
    C = 0.5
    total, norms = clipped_grad_sum(model, params, Batch(X, y, mask), max_grad_norm=C, binary=False)
    assert float(norms[0, 2]) > 1e3 * C
    others_mask = mask.clone()
    others_mask[0, 2] = 0
    others, _ = clipped_grad_sum(
        model, params, Batch(X, y, others_mask), max_grad_norm=C, binary=False
    )
    huge_part = total - others
    # The huge record contributes exactly C in norm, and the other records are untouched ...
    assert float(huge_part.norm()) == pytest.approx(C, rel=1e-3)
    G = per_sample_gradients(model, params, Batch(X, y, mask), binary=False)[0]
    keep = [i for i in range(6) if i != 2]
    expect_others = sum(G[i] * min(1.0, C / (float(G[i].norm()) + 1e-6)) for i in keep)
    torch.testing.assert_close(others[0], expect_others, atol=1e-6, rtol=1e-5)
    # ... whereas clipping the batch's summed gradient would have drowned them.
    batch_clipped = G.sum(0) * min(1.0, C / float(G.sum(0).norm()))
    assert float((batch_clipped - total[0]).norm()) > 0.1 * C


def _opacus_step(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, C: float, lr: float, binary: bool
):  # type: ignore[no-untyped-def]
    from opacus import PrivacyEngine

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(X, y), batch_size=len(y) // 4, shuffle=False)
    criterion: nn.Module = nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=C,
            poisson_sampling=False,
            criterion=criterion,
        )
        xb, yb = next(iter(loader))
        opt.zero_grad()
        out = gsm(xb)
        loss = criterion(out[:, 0], yb.float()) if binary else criterion(out, yb)
        loss.backward()
        opt.step()
    return flat_params(gsm._module), xb, yb


@pytest.mark.parametrize(("spec", "binary"), SPECS, ids=lambda v: getattr(v, "kind", ""))
def test_one_step_equals_opacus_without_noise(spec: ModelSpec, binary: bool) -> None:
    torch.manual_seed(3)
    model = build_model(spec)
    p0 = flat_params(model)
    X = torch.rand(32, spec.n_features) * 2
    y = torch.randint(0, 2 if binary else spec.n_outputs, (32,))
    C, lr = 0.3, 0.5
    after, xb, yb = _opacus_step(model, X, y, C, lr, binary)
    B = len(yb)
    rule = DPSGDGradient(
        build_model(spec),
        spec,
        binary=binary,
        max_grad_norm=C,
        noise_multipliers=[0.0],
        expected_batch=[float(B)],
        steps=[1],
        generators=noise_generators(0, 1, [0]),
    )
    g = rule(p0.reshape(1, -1), Batch(xb[None], yb[None], torch.ones(1, B)), 0)
    ours = p0 - lr * g[0]
    assert float((after - p0).norm()) > 1e-3  # the step moved the parameters
    torch.testing.assert_close(ours, after, atol=1e-6, rtol=0)


def test_sampling_plan_uses_batch_over_n() -> None:
    assert sampling_plan(1000, batch_size=64, epochs=3) == (0.064, 3 * 16)
    assert sampling_plan(100, batch_size=30, epochs=1) == (0.3, 3)  # not 1 / ceil(100 / 30)
    assert sampling_plan(20, batch_size=64, epochs=2) == (1.0, 2)
    with pytest.raises(UsageError, match="n_records"):
        sampling_plan(0, batch_size=8, epochs=1)
    with pytest.raises(TypeError, match="batch_size"):
        sampling_plan(10, batch_size=2.5, epochs=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["numpy", "secure"])
def test_poisson_batches_have_the_planned_rate_and_steps(kind: str) -> None:
    sizes = np.array([400, 100])
    # the secure keystream under a fixed key: the KS check at 1e-3 below has one outcome
    # (under NoiseSource.fresh() it failed a correct sampler once in 1,000 runs)
    source = NoiseSource(bytes(range(32)), secure=True)
    rngs: list[Any] = (
        [np.random.default_rng([1, s]) for s in range(2)]
        if kind == "numpy"
        else [source.stream("sampling", s) for s in range(2)]
    )
    pb = poisson_batches(sizes, batch_size=40, epochs=5, rngs=rngs)
    assert list(pb.steps) == [50, 15]
    np.testing.assert_allclose(pb.sampling_rates, [0.1, 0.4])
    np.testing.assert_allclose(pb.expected_batch, [40.0, 40.0])
    # Inactive steps of the shorter site are empty; indices are in range and distinct.
    assert pb.mask[1, 15:].sum() == 0
    for s, n in enumerate(sizes):
        for t in range(pb.steps[s]):
            real = pb.idx[s, t][pb.mask[s, t] > 0]
            assert len(set(real.tolist())) == len(real) and (real < n).all()
    # Each record joins each step with probability q: batch sizes are Binomial(N, q).
    counts = pb.mask[0, :50].sum(axis=1)
    assert stats.kstest(counts, stats.binom(400, 0.1).cdf).pvalue > 1e-3
    inclusion = np.zeros(400)
    for t in range(50):
        inclusion[pb.idx[0, t][pb.mask[0, t] > 0]] += 1
    assert inclusion.mean() / 50 == pytest.approx(0.1, rel=0.1)
    assert pb.mask[0, :50].sum() > 0 and (counts != 40).any()  # sizes vary


@pytest.mark.parametrize("kind", ["torch", "secure"])
def test_noise_has_the_calibrated_scale_and_skips_finished_sites(kind: str) -> None:
    source = NoiseSource(bytes(range(32)), secure=True)  # fixed key: as above
    spec = ModelSpec("logistic", 199, 1)
    model = build_model(spec)
    P = flat_params(model).numel()
    params = torch.zeros(2, P)
    batch = Batch(torch.zeros(2, 1, 199), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    sigma, C, expected = 2.0, 0.5, 10.0
    draws = []
    for rnd in range(20):
        rule = DPSGDGradient(
            model,
            spec,
            binary=True,
            max_grad_norm=C,
            noise_multipliers=[sigma, sigma],
            expected_batch=[expected, expected],
            steps=[1, 0],
            generators=noise_generators(0, rnd, [0, 1])
            if kind == "torch"
            else [source.stream("n", rnd, s) for s in range(2)],
        )
        g = rule(params, batch, 0)
        assert torch.all(g[1] == 0)  # site 1 has finished its steps: no noise, no move
        draws.append(g[0] * expected)
    z = torch.cat(draws).numpy()
    assert z.std() == pytest.approx(sigma * C, rel=0.05)
    assert stats.kstest(z / (sigma * C), "norm").pvalue > 1e-3


def test_noise_generators_depend_on_seed_round_and_site_only() -> None:
    a = noise_generators(5, 2, [3, 7])
    b = noise_generators(5, 2, [7])
    c = noise_generators(5, 3, [7])
    x, y, z = (torch.randn(4, generator=g) for g in (a[1], b[0], c[0]))
    assert torch.equal(x, y) and not torch.equal(x, z)


def test_cohort_equals_each_site_alone() -> None:
    spec = ModelSpec("mlp", 6, 2, hidden=(5,))
    model = build_model(spec)
    p0 = flat_params(model)
    rng = np.random.default_rng(0)
    Xs = [rng.random((n, 6), dtype=np.float32) for n in (30, 13, 45)]
    ys = [rng.integers(0, 2, n) for n in (30, 13, 45)]

    def train(ids: list[int]) -> torch.Tensor:
        data = CohortData.from_arrays([Xs[i] for i in ids], [ys[i] for i in ids])
        rngs = [np.random.default_rng([9, i]) for i in ids]
        pb = poisson_batches(data.sizes, batch_size=8, epochs=2, rngs=rngs)
        rule = DPSGDGradient(
            model,
            spec,
            binary=False,
            max_grad_norm=1.0,
            noise_multipliers=[1.1] * len(ids),
            expected_batch=pb.expected_batch,
            steps=pb.steps,
            generators=noise_generators(0, 1, ids),
        )
        return train_cohort(
            p0,
            data,
            rule=rule,
            lr=0.5,
            batch_size=8,
            epochs=2,
            rngs=rngs,
            batches=(pb.idx, pb.mask),
        )

    together = train([0, 1, 2])
    for k in range(3):
        torch.testing.assert_close(together[k], train([k])[0], atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused_with_the_value() -> None:
    spec = ModelSpec("logistic", 3, 1)
    model = build_model(spec)
    batch = _batch(spec, True, S=1, B=2)
    with pytest.raises(UsageError, match=r"'max_grad_norm'.*Got -1"):
        clipped_grad_sum(model, torch.zeros(1, 4), batch, max_grad_norm=-1, binary=True)
    with pytest.raises(UsageError, match="method"):
        clipped_grad_sum(
            model, torch.zeros(1, 4), batch, max_grad_norm=1, binary=True, method="ghost"
        )  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="one noise multiplier"):
        DPSGDGradient(
            model,
            spec,
            binary=True,
            max_grad_norm=1.0,
            noise_multipliers=[1.0],
            expected_batch=[1.0, 2.0],
            steps=[1],
            generators=noise_generators(0, 0, [0]),
        )
    with pytest.raises(UsageError, match="noise_multipliers"):
        DPSGDGradient(
            model,
            spec,
            binary=True,
            max_grad_norm=1.0,
            noise_multipliers=[-1.0],
            expected_batch=[1.0],
            steps=[1],
            generators=noise_generators(0, 0, [0]),
        )
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert not layerwise_supported(bn)
    with pytest.raises(UsageError, match="layerwise"):
        clipped_grad_sum(
            bn, torch.zeros(1, 12), batch, max_grad_norm=1, binary=False, method="layerwise"
        )


def test_stream_noise_of_a_site_does_not_depend_on_its_cohort_or_prefetching(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = ModelSpec("logistic", 7, 1)
    model = build_model(spec)
    P = flat_params(model).numel()
    source = NoiseSource.fresh()
    batch3 = Batch(torch.zeros(3, 1, 7), torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1))

    def noise_of(sites: list[int], prefetch: int) -> torch.Tensor:
        monkeypatch.setattr(sgd_module, "NOISE_PREFETCH", prefetch)
        rule = DPSGDGradient(
            model, spec, binary=True, max_grad_norm=1.0, noise_multipliers=[1.0] * len(sites),
            expected_batch=[1.0] * len(sites), steps=[4] * len(sites),
            generators=[source.stream("n", 1, s) for s in sites],
        )  # fmt: skip
        b = Batch(batch3.X[: len(sites)], batch3.y[: len(sites)], batch3.mask[: len(sites)])
        return torch.stack([rule(torch.zeros(len(sites), P), b, t) for t in range(4)], dim=1)

    alone = noise_of([2], 1 << 22)[0]
    with_others = noise_of([0, 1, 2], 1)[2]  # one step per refill, two other sites
    assert torch.equal(alone, with_others)
    rule = DPSGDGradient(
        model, spec, binary=True, max_grad_norm=1.0, noise_multipliers=[1.0],
        expected_batch=[1.0], steps=[4], generators=[source.stream("n", 9, 0)],
    )  # fmt: skip
    b1 = Batch(batch3.X[:1], batch3.y[:1], batch3.mask[:1])
    with pytest.raises(UsageError, match="step order"):
        rule(torch.zeros(1, P), b1, 2)


@pytest.mark.parametrize(
    ("spec", "binary"),
    [
        (ModelSpec("mlp", 12, 1, hidden=(8,), activation="relu"), True),
        (ModelSpec("mlp", 12, 3, hidden=(6, 5), activation="relu"), False),
        (ModelSpec("mlp", 12, 3, hidden=(6,), activation="square"), False),
        (ModelSpec("mlp", 12, 2, hidden=(5, 4), activation="poly2"), True),
        (ModelSpec("logistic", 12, 4), False),
    ],
    ids=lambda v: getattr(v, "activation", ""),
)
def test_hand_written_backward_of_linear_stacks_equals_the_loop(
    spec: ModelSpec, binary: bool
) -> None:
    """Linear stacks skip autograd (their backward is written out): same clipped sums."""
    from privml.dp.sgd import _chain_clipped_sum, _is_chain, _plan

    model, params = _stacked(spec, 3)
    ops = _plan(model)
    assert ops is not None and _is_chain(ops)
    batch = _batch(spec, binary)
    fast, norms = _chain_clipped_sum(ops, binary, params, batch, 0.4)
    ref = _loop_reference(build_model(spec), params, batch, 0.4, binary)
    torch.testing.assert_close(fast, ref, atol=2e-6, rtol=1e-4)
    _, vnorms = clipped_grad_sum(
        model, params, batch, max_grad_norm=0.4, binary=binary, method="vmap"
    )
    torch.testing.assert_close(norms, vnorms * batch.mask, atol=1e-4, rtol=1e-4)
