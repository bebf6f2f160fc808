"""The noise source: distribution, layout, freshness, and the one reproducible switch."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from privml.dp import randomness as rnd
from privml.dp.randomness import ENV_VAR, NoiseSource, normal_rows, reproducible_noise
from privml.errors import InsecureOptionWarning, UsageError


@pytest.fixture
def source() -> NoiseSource:
    """A secure source (the keystream and transforms of :meth:`NoiseSource.fresh`) under a
    fixed key: the statistical checks below then have one outcome. Under fresh keys their
    nine checks (KS at 1e-4, moments at 4 standard errors) failed a correct generator about
    once in 1,500 runs. Fresh keys are tested by themselves below (one correlation at 5
    standard errors: a false alarm below 1e-6)."""
    return NoiseSource(bytes(range(32)), secure=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normals_are_standard_normal(source: NoiseSource, dtype: torch.dtype) -> None:
    z = source.stream("ks", 1).normal(400_001, dtype=dtype)
    assert z.dtype == dtype and torch.isfinite(z).all()
    assert stats.kstest(z.double().numpy(), "norm").pvalue > 1e-4
    # mean, variance and a tail probability at their standard errors (4 sigma)
    assert abs(float(z.mean())) < 4 / np.sqrt(len(z))
    assert abs(float(z.var()) - 1) < 4 * np.sqrt(2 / len(z))
    tail = float((z.abs() > 3).double().mean())
    p3 = 2 * stats.norm.sf(3)
    assert abs(tail - p3) < 4 * np.sqrt(p3 / len(z))


def test_uniforms_are_uniform_with_53_bits(source: NoiseSource) -> None:
    u = source.stream("u").random((500, 400))
    assert u.shape == (500, 400) and u.dtype == np.float64
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u.ravel(), "uniform").pvalue > 1e-4
    assert np.all(u * 2.0**53 == np.floor(u * 2.0**53))  # exact 53-bit grid


def test_a_stream_is_a_fixed_sequence_whatever_the_grouping(source: NoiseSource) -> None:
    a, b = source.stream("g", 3), source.stream("g", 3)
    sizes = [1, 2, 511, 513, 1, 1030]
    parts = torch.cat([a.normal(k) for k in sizes])
    assert torch.equal(parts, b.normal(sum(sizes)))
    ua = np.concatenate([a.random(k) for k in sizes])
    assert np.array_equal(ua, b.random(sum(sizes)))
    # the batched call gives each stream exactly what it gives alone
    rows = normal_rows([source.stream("r", i) for i in range(7)], 2114)
    alone = torch.stack([source.stream("r", i).normal(2114) for i in range(7)])
    assert torch.equal(rows, alone)
    # normals and uniforms of one stream are independent keystreams
    c = source.stream("g", 3)
    c.random(10)
    assert torch.equal(c.normal(5), source.stream("g", 3).normal(5))


def test_streams_with_other_labels_or_sources_are_unrelated(source: NoiseSource) -> None:
    x = source.stream("dpsgd-noise", 1, 0).normal(4096).double().numpy()
    for other in (
        source.stream("dpsgd-noise", 1, 1),
        source.stream("dpsgd-noise", 2, 0),
        NoiseSource.fresh().stream("dpsgd-noise", 1, 0),
    ):
        y = other.normal(4096).double().numpy()
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / np.sqrt(4096)


def test_fresh_sources_never_repeat_and_keep_their_key_in_the_process() -> None:
    a, b = NoiseSource.fresh(), NoiseSource.fresh()
    assert a.secure and b.secure
    assert not torch.equal(a.stream("x").normal(64), b.stream("x").normal(64))
    for obj in (a, a.stream("x")):
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(obj)
    assert "key" not in repr(a).lower() or "fresh" in repr(a)
    assert a.describe()["kind"] == "csprng" and not a.describe()["reproducible"]


def test_reproducible_source_warns_and_is_a_function_of_the_seed() -> None:
    with pytest.warns(InsecureOptionWarning, match="reproducible"):
        a = NoiseSource.reproducible(7)
    with pytest.warns(InsecureOptionWarning):
        b = NoiseSource.reproducible(7)
        c = NoiseSource.reproducible(8)
    assert not a.secure and a.describe()["reproducible"]
    assert torch.equal(a.stream("x", 1).normal(100), b.stream("x", 1).normal(100))
    assert not torch.equal(a.stream("x", 1).normal(100), c.stream("x", 1).normal(100))


def test_switch_from_python_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not rnd.reproducible_noise_enabled()
    assert rnd.run_noise_source(0).secure
    with reproducible_noise(), pytest.warns(InsecureOptionWarning):
        assert not rnd.run_noise_source(0).secure
    monkeypatch.setenv(ENV_VAR, "1")
    with pytest.warns(InsecureOptionWarning):
        assert not rnd.run_noise_source(0).secure
    with reproducible_noise(False):  # forced secure inside, whatever the environment says
        assert rnd.run_noise_source(0).secure
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(UsageError, match=ENV_VAR):
        rnd.run_noise_source(0)


def test_switch_reaches_a_subprocess() -> None:
    code = (
        "import warnings, torch\n"
        "from privml.dp.randomness import run_noise_source\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    s = run_noise_source(3)\n"
        "print(s.secure, bool(w), float(s.stream('a').normal(1)[0]))\n"
    )
    env = {**os.environ, ENV_VAR: "1"}
    outs = [
        subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert outs[0][:2] == ["False", "True"] and outs[0] == outs[1]
    env.pop(ENV_VAR)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:2] == ["True", "False"]


def test_bad_arguments_are_refused(source: NoiseSource) -> None:
    s = source.stream("x")
    with pytest.raises(UsageError):
        s.normal(5, dtype=torch.float16)
    with pytest.raises(UsageError):
        normal_rows([s], -1)
    with pytest.raises(TypeError):
        source.stream(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError), warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureOptionWarning)
        NoiseSource.reproducible("7")  # type: ignore[arg-type]
