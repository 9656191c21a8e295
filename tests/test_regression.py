"""Regression task families: shapes, MAML's sinusoid, parameters by index, subclassing."""

from __future__ import annotations

import math

import pytest
import torch

from metalearn.tasks import Harmonics, Linear, Polynomial, RegressionFamily, Sinusoid, Step

FAMILIES = [Sinusoid, Linear, Harmonics, Polynomial, Step]


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_dtypes_and_reproducibility(family):
    ts = family(5, 7, seed=1)
    task = ts[3]
    (xt, yt), (xv, yv) = task.train, task.val
    assert xt.shape == yt.shape == (5, 1) and xv.shape == yv.shape == (7, 1)
    assert {t.dtype for t in (xt, yt, xv, yv)} == {torch.float32}
    assert torch.isfinite(torch.cat([xt, yt, xv, yv])).all()
    again = family(5, 7, seed=1)[3]
    assert torch.equal(again.train[0], xt) and torch.equal(again.val[1], yv)
    assert not torch.equal(family(5, 7, seed=2)[3].train[1], yt)
    assert len(ts) == 600


@pytest.mark.parametrize("family", FAMILIES)
def test_function_of_agrees_with_the_task(family):
    ts = family(4, 6, seed=9)
    for i in (0, 5, 599):
        task = ts[i]
        params = ts.function_of(i)
        x = torch.cat([task.train[0], task.val[0]])
        y = torch.cat([task.train[1], task.val[1]])
        torch.testing.assert_close(ts.function(params, x), y)


@pytest.mark.parametrize("family", FAMILIES)
def test_tasks_stack_into_batches(family):
    batch = family(3, 4, length=None).batch(range(8))
    assert batch.train[0].shape == (8, 3, 1) and batch.val[1].shape == (8, 4, 1)


def test_sinusoid_is_mamls():
    ts = Sinusoid(10, 10, length=2000)
    amplitudes, phases, xs = [], [], []
    for i in range(2000):
        params = ts.function_of(i)
        task = ts[i]
        x = torch.cat([task.train[0], task.val[0]])
        y = torch.cat([task.train[1], task.val[1]])
        # y = A sin(x - phase): the phase is subtracted, as in MAML's reference code
        torch.testing.assert_close(y, params["amplitude"] * torch.sin(x - params["phase"]))
        amplitudes.append(float(params["amplitude"]))
        phases.append(float(params["phase"]))
        xs.append(x)
    amplitudes, phases, xs = torch.tensor(amplitudes), torch.tensor(phases), torch.cat(xs)
    assert 0.1 <= amplitudes.min() and amplitudes.max() <= 5.0
    assert 0.0 <= phases.min() and phases.max() <= math.pi
    assert -5.0 <= xs.min() and xs.max() <= 5.0
    # Uniform, not just in range: the ranges are nearly covered, and the means are within
    # Hoeffding's bound (range * sqrt(ln(2 / 1e-6) / (2 n)), false-positive rate 1e-6) of the
    # middle. A draw from a narrower or lopsided range fails.
    n = 2000
    slack = math.sqrt(math.log(2 / 1e-6) / (2 * n))
    assert amplitudes.min() < 0.2 and amplitudes.max() > 4.9
    assert phases.min() < 0.05 and phases.max() > math.pi - 0.05
    assert abs(amplitudes.mean() - 2.55) < 4.9 * slack
    assert abs(phases.mean() - math.pi / 2) < math.pi * slack


def test_linear_and_step_and_polynomial_functions():
    x = torch.tensor([[-1.0], [0.0], [2.0]])
    lin = Linear(2, 2)
    assert torch.equal(
        lin.function({"slope": torch.tensor(2.0), "intercept": torch.tensor(1.0)}, x).flatten(),
        torch.tensor([-1.0, 1.0, 5.0]),
    )
    step = Step(2, 2)
    params = {"height": torch.tensor(3.0), "position": torch.tensor(0.5), "offset": torch.tensor(-1.0)}
    assert torch.equal(step.function(params, x).flatten(), torch.tensor([-1.0, -1.0, 2.0]))
    poly = Polynomial(2, 2, degree=2)
    params = {"coefficients": torch.tensor([1.0, -2.0, 0.5])}  # 1 - 2x + x^2 / 2
    assert torch.equal(poly.function(params, x).flatten(), torch.tensor([3.5, 1.0, -1.0]))


def test_harmonics_inputs_centre_on_the_task():
    ts = Harmonics(50, 50)
    for i in range(5):
        task = ts[i]
        centre = ts.function_of(i)["centre"]
        x = torch.cat([task.train[0], task.val[0]])
        assert -4.0 <= centre <= 4.0
        # 100 standard normal draws have mean within 0.6 of 0 far beyond 1e-6 probability
        assert abs(x.mean() - centre) < 0.6


def test_configurable_ranges():
    ts = Sinusoid(5, 5, amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0))
    task = ts[0]
    assert (task.train[0] >= 0).all() and (task.train[0] <= 1).all()
    torch.testing.assert_close(task.train[1], torch.sin(task.train[0]))


def test_noise():
    clean, noisy = Linear(20, 20, seed=4), Linear(20, 20, seed=4, noise_std=0.5)
    residual = noisy[0].train[1] - clean.function(clean.function_of(0), noisy[0].train[0])
    assert 0.2 < residual.std() < 1.0
    torch.testing.assert_close(clean[0].train[1], clean.function(clean.function_of(0), clean[0].train[0]))


def test_user_subclass():
    class Quadratic(RegressionFamily):
        x_range = (-1.0, 1.0)

        def sample_function(self, generator):
            return {"a": torch.rand((), generator=generator)}

        def function(self, params, x):
            return params["a"] * x**2

    ts = Quadratic(3, 4, length=None)
    task = ts[11]
    assert task.train[0].shape == (3, 1)
    assert (task.val[0].abs() <= 1).all()
    torch.testing.assert_close(task.val[1], ts.function_of(11)["a"] * task.val[0] ** 2)


def test_errors():
    with pytest.raises(ValueError, match="shots"):
        Sinusoid(0, 5)
    with pytest.raises(ValueError, match="queries"):
        Linear(5, 0)
    with pytest.raises(ValueError, match="low > high"):
        Sinusoid(5, 5, amplitude=(5.0, 0.1))
    with pytest.raises(ValueError, match="noise_std"):
        Step(5, 5, noise_std=-1.0)
    with pytest.raises(ValueError, match="degree"):
        Polynomial(5, 5, degree=-1)
    with pytest.raises(TypeError):
        RegressionFamily(5, 5)  # abstract
    with pytest.raises(IndexError):
        Sinusoid(5, 5, length=10).function_of(10)
