"""Families of few-shot regression tasks: each task is one function drawn from a family.

A task holds ``K`` train points and ``Q`` val points of one function, ``x`` and ``y`` both
``float32`` of shape ``[K, 1]`` / ``[Q, 1]``. Subclass `RegressionFamily` for a new family:
implement `RegressionFamily.draw_function` (draw the parameters of a batch of functions from
their `TaskDraws`) and `RegressionFamily.function` (evaluate them, broadcasting over the task
dimension), and set ``x_range`` or override `RegressionFamily.draw_inputs`. A whole batch of
tasks is then a few tensor operations (`TaskSet.batch`), bit for bit the tasks indexing gives.
A family written against the generator API (``sample_function(generator)``,
``sample_inputs(n, generator, params)``) still works, one task at a time.

Streams of the built-in families: 0 for the function's parameters, 1 for the inputs, 2 for
the noise; the parameters take consecutive words of stream 0 in the order they are listed.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from metalearn.tasks.draws import TaskDraws
from metalearn.tasks.task import Task, TaskBatch
from metalearn.tasks.taskset import TaskSet

__all__ = ["Harmonics", "Linear", "Polynomial", "RegressionFamily", "Sinusoid", "Step"]

FunctionParams = dict[str, Tensor]

#: the streams of `TaskDraws` a regression family draws from
FUNCTION_STREAM, INPUT_STREAM, NOISE_STREAM = 0, 1, 2


def _uniform(low: float, high: float, generator: torch.Generator, size: tuple[int, ...] = ()) -> Tensor:
    """Draws from ``U[low, high]`` (float32)."""
    return low + (high - low) * torch.rand(size, generator=generator)


def _uniform_params(draws: TaskDraws, *ranges: tuple[float, float]) -> Tensor:
    """Per-task parameters ``[B, 1, P]``, parameter ``j`` uniform on ``ranges[j]`` from word ``j`` of
    stream 0 (one draw for all of them)."""
    lows, highs = zip(*ranges, strict=True)
    return draws.uniform(FUNCTION_STREAM, (1, len(ranges)), lows, highs)


def _check_range(name: str, bounds: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(b) for b in bounds)
    if not low <= high:
        raise ValueError(f"{name} range {bounds} has low > high; write it as (low, high)")
    return low, high


class RegressionFamily(TaskSet):
    """Base class of regression task families.

    Task ``i`` draws the parameters of one function with `draw_function`, then
    ``shots + queries`` inputs with `draw_inputs`, evaluates `function` on them (plus
    Gaussian noise of standard deviation ``noise_std`` if set), and keeps the first
    ``shots`` points as ``train`` and the rest as ``val``. All three work on a batch of tasks
    at once: parameters have the task dimension first and broadcast against inputs
    ``[n_tasks, n, 1]`` (a scalar per task is ``[n_tasks, 1, 1]``). `function_of` returns the
    parameters of task ``i`` (e.g. to plot its true curve), without the task dimension.

    Args:
        shots: train points per task (``K``).
        queries: val points per task (``Q``).
        noise_std: standard deviation of noise added to the targets (0 for none).
        seed: seed of the task set (see `TaskSet`).
        length: number of tasks, or ``None`` for an endless set.

    Attributes:
        x_range: ``(low, high)`` of the uniform input distribution used by the default
            `draw_inputs`.

    Raises:
        TypeError: if a subclass implements neither `draw_function` nor the generator API's
            ``sample_function``.
    """

    x_range: tuple[float, float] = (-5.0, 5.0)

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        noise_std: float = 0.0,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        if not self.batched and type(self).sample_function is RegressionFamily.sample_function:
            raise TypeError(
                f"{type(self).__name__} draws no functions: implement draw_function(draws) (a batch, see "
                "Sinusoid) or sample_function(generator) (one function at a time)"
            )
        super().__init__(seed=seed, length=length)
        for name, value in (("shots", shots), ("queries", queries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int of at least 1, got {value!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be non-negative, got {noise_std}")
        self.shots = shots
        self.queries = queries
        self.noise_std = float(noise_std)

    @property
    def batched(self) -> bool:
        """Whether the family draws a batch of functions at once (`draw_function`)."""
        return type(self).draw_function is not RegressionFamily.draw_function

    def draw_function(self, draws: TaskDraws) -> FunctionParams:
        """Draws the parameters of one function per task from ``draws`` (task dimension first)."""
        raise NotImplementedError(f"{type(self).__name__} draws one function at a time (sample_function)")

    @abstractmethod
    def function(self, params: FunctionParams, x: Tensor) -> Tensor:
        """Evaluates the functions with ``params`` at inputs ``x``: ``[n_tasks, n, 1]`` ->
        ``[n_tasks, n, 1]`` with batched parameters, ``[n, 1]`` -> ``[n, 1]`` with one task's."""

    def draw_inputs(self, draws: TaskDraws, n: int, params: FunctionParams) -> Tensor:
        """Draws ``n`` inputs per task, ``[n_tasks, n, 1]``; by default uniform on ``x_range``.

        ``params`` are the tasks' parameters, for families whose input distribution depends
        on the task; the default ignores them.
        """
        low, high = self.x_range
        return draws.uniform(INPUT_STREAM, (n, 1), low, high)

    def sample_batch(self, draws: TaskDraws) -> TaskBatch:
        params = self.draw_function(draws)
        x = self.draw_inputs(draws, self.shots + self.queries, params).to(torch.float32)
        y = self.function(params, x).to(torch.float32)
        if self.noise_std > 0:
            y = y + self.noise_std * draws.normal(NOISE_STREAM, tuple(y.shape[1:]))
        k = self.shots
        return TaskBatch(train=(x[:, :k], y[:, :k]), val=(x[:, k:], y[:, k:]))

    # -- the generator API, for families that draw one function at a time --------------------

    def sample_function(self, generator: torch.Generator) -> FunctionParams:
        """One function's parameters from ``generator`` (families without `draw_function`)."""
        raise NotImplementedError(f"{type(self).__name__} draws its functions in batches (draw_function)")

    def sample_inputs(self, n: int, generator: torch.Generator, params: FunctionParams) -> Tensor:
        """``n`` inputs ``[n, 1]`` from ``generator`` (families without `draw_function`); by
        default uniform on ``x_range``."""
        low, high = self.x_range
        return _uniform(low, high, generator, (n, 1))

    def sample(self, generator: torch.Generator) -> Task:
        if self.batched:
            return super().sample(generator)
        params = self.sample_function(generator)
        x = self.sample_inputs(self.shots + self.queries, generator, params).to(torch.float32)
        y = self.function(params, x).to(torch.float32)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=generator)
        return Task(train=(x[: self.shots], y[: self.shots]), val=(x[self.shots :], y[self.shots :]))

    # -----------------------------------------------------------------------------------------

    def function_of(self, index: int) -> FunctionParams:
        """The parameters of task ``index`` (the same function as ``self[index]`` uses), without
        the task dimension: ``self.function(self.function_of(i), x)`` evaluates it at ``x [n, 1]``."""
        index = self._check_index(index)
        if not self.batched:
            return self.sample_function(self.generator(index))
        return {name: value[0] for name, value in self.draw_function(self.draws([index])).items()}

    def describe(self) -> dict[str, Any]:
        """`TaskSet.describe`, with ``x_range`` even where it is the class's default."""
        return {**super().describe(), "x_range": list(self.x_range)}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shots={self.shots}, queries={self.queries}, seed={self.seed}, length={self.length})"
        )


class Sinusoid(RegressionFamily):
    r"""Sine waves as in MAML (Finn, Abbeel & Levine, 2017, "Model-Agnostic Meta-Learning
    for Fast Adaptation of Deep Networks", section 5.1).

    .. math:: y = A \sin(x - \varphi),\quad A \sim U[0.1, 5],\ \varphi \sim U[0, \pi],\
        x \sim U[-5, 5].

    The phase is subtracted, as in the MAML reference code (``amp * sin(x - phase)``); with
    ``\varphi`` uniform on ``[0, \pi]`` this is a different family from ``\sin(x + \varphi)``.

    Args:
        shots: train points per task (MAML used ``K`` = 5, 10 or 20).
        queries: val points per task.
        amplitude: range of ``A``.
        phase: range of ``\varphi``.
        x_range: range of the inputs.
        noise_std: see `RegressionFamily`.
        seed: see `RegressionFamily`.
        length: see `RegressionFamily`.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(shots, queries, noise_std=noise_std, seed=seed, length=length)
        self.amplitude = _check_range("amplitude", amplitude)
        self.phase = _check_range("phase", phase)
        self.x_range = _check_range("x", x_range)

    def draw_function(self, draws: TaskDraws) -> FunctionParams:
        u = _uniform_params(draws, self.amplitude, self.phase)
        return {"amplitude": u[:, :, 0:1], "phase": u[:, :, 1:2]}

    def function(self, params: FunctionParams, x: Tensor) -> Tensor:
        return params["amplitude"] * torch.sin(x - params["phase"])


class Linear(RegressionFamily):
    r"""Lines :math:`y = a x + b` with slope and intercept uniform on ``[-3, 3]`` and
    ``x ~ U[-5, 5]`` (the linear family of Finn, Xu & Levine, 2018, "Probabilistic
    Model-Agnostic Meta-Learning").

    Args:
        shots: train points per task.
        queries: val points per task.
        slope: range of ``a``.
        intercept: range of ``b``.
        x_range: range of the inputs.
        noise_std: see `RegressionFamily`.
        seed: see `RegressionFamily`.
        length: see `RegressionFamily`.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        slope: tuple[float, float] = (-3.0, 3.0),
        intercept: tuple[float, float] = (-3.0, 3.0),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(shots, queries, noise_std=noise_std, seed=seed, length=length)
        self.slope = _check_range("slope", slope)
        self.intercept = _check_range("intercept", intercept)
        self.x_range = _check_range("x", x_range)

    def draw_function(self, draws: TaskDraws) -> FunctionParams:
        u = _uniform_params(draws, self.slope, self.intercept)
        return {"slope": u[:, :, 0:1], "intercept": u[:, :, 1:2]}

    def function(self, params: FunctionParams, x: Tensor) -> Tensor:
        return params["slope"] * x + params["intercept"]


class Harmonics(RegressionFamily):
    r"""Sums of two sine waves with frequency ratio 2 (the harmonic family of Lacoste et al.,
    2018, "Uncertainty in Multitask Transfer Learning").

    .. math:: y = a_1 \sin(\omega x + b_1) + a_2 \sin(2 \omega x + b_2),\quad
        a_j \sim N(0, 1),\ b_j \sim U[0, 2\pi],\ \omega \sim U[5, 7].

    Each task also draws a centre :math:`\mu_x \sim U[-4, 4]`, and its inputs are
    :math:`x \sim N(\mu_x, 1)`, so tasks see different windows of their function.

    Args:
        shots: train points per task.
        queries: val points per task.
        frequency: range of ``\omega``.
        centre: range of ``\mu_x``.
        noise_std: see `RegressionFamily`.
        seed: see `RegressionFamily`.
        length: see `RegressionFamily`.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        frequency: tuple[float, float] = (5.0, 7.0),
        centre: tuple[float, float] = (-4.0, 4.0),
        noise_std: float = 0.0,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(shots, queries, noise_std=noise_std, seed=seed, length=length)
        self.frequency = _check_range("frequency", frequency)
        self.centre = _check_range("centre", centre)

    def draw_function(self, draws: TaskDraws) -> FunctionParams:
        # words 0-1 of stream 0: the amplitudes (normal); 2-5: phases, frequency, centre (uniform)
        amplitudes = draws.normal(FUNCTION_STREAM, (2,))
        phase = (0.0, 2 * math.pi)
        u = _uniform_params(draws, (0.0, 0.0), (0.0, 0.0), phase, phase, self.frequency, self.centre)
        return {
            "amplitudes": amplitudes.reshape(-1, 1, 2),
            "phases": u[:, :, 2:4],
            "frequency": u[:, :, 4:5],
            "centre": u[:, :, 5:6],
        }

    def draw_inputs(self, draws: TaskDraws, n: int, params: FunctionParams) -> Tensor:
        return params["centre"] + draws.normal(INPUT_STREAM, (n, 1))

    def function(self, params: FunctionParams, x: Tensor) -> Tensor:
        a, b, w = params["amplitudes"], params["phases"], params["frequency"]
        return a[..., 0:1] * torch.sin(w * x + b[..., 0:1]) + a[..., 1:2] * torch.sin(2 * w * x + b[..., 1:2])


class Polynomial(RegressionFamily):
    r"""Polynomials :math:`y = \sum_{j=0}^{d} c_j x^j` with coefficients uniform on
    ``[-1, 1]`` and ``x ~ U[-2, 2]``.

    Args:
        shots: train points per task.
        queries: val points per task.
        degree: the degree ``d``.
        coefficient: range of each ``c_j``.
        x_range: range of the inputs.
        noise_std: see `RegressionFamily`.
        seed: see `RegressionFamily`.
        length: see `RegressionFamily`.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        degree: int = 3,
        coefficient: tuple[float, float] = (-1.0, 1.0),
        x_range: tuple[float, float] = (-2.0, 2.0),
        noise_std: float = 0.0,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(shots, queries, noise_std=noise_std, seed=seed, length=length)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ValueError(f"degree must be a non-negative int, got {degree!r}")
        self.degree = degree
        self.coefficient = _check_range("coefficient", coefficient)
        self.x_range = _check_range("x", x_range)

    def draw_function(self, draws: TaskDraws) -> FunctionParams:
        low, high = self.coefficient
        coefficients = draws.uniform(FUNCTION_STREAM, (self.degree + 1,), low, high)
        return {"coefficients": coefficients.reshape(-1, 1, self.degree + 1)}

    def function(self, params: FunctionParams, x: Tensor) -> Tensor:
        # Horner's scheme, elementwise: the same bits whatever the batch (a matmul's may not be)
        c = params["coefficients"].to(x.dtype)
        y = c[..., self.degree :] * torch.ones_like(x)  # the leading coefficient, in x's shape
        for j in reversed(range(self.degree)):
            y = y * x + c[..., j : j + 1]
        return y


class Step(RegressionFamily):
    r"""Step functions :math:`y = h \cdot [x > s] + b` with jump ``h ~ U[-3, 3]``, position
    ``s ~ U[-4, 4]``, offset ``b ~ U[-1, 1]`` and ``x ~ U[-5, 5]``: a discontinuous family that
    smooth networks fit poorly from few points.

    Args:
        shots: train points per task.
        queries: val points per task.
        height: range of ``h``.
        position: range of ``s``.
        offset: range of ``b``.
        x_range: range of the inputs.
        noise_std: see `RegressionFamily`.
        seed: see `RegressionFamily`.
        length: see `RegressionFamily`.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        *,
        height: tuple[float, float] = (-3.0, 3.0),
        position: tuple[float, float] = (-4.0, 4.0),
        offset: tuple[float, float] = (-1.0, 1.0),
        x_range: tuple[float, float] = (-5.0, 5.0),
        noise_std: float = 0.0,
        seed: int = 0,
        length: int | None = 600,
    ) -> None:
        super().__init__(shots, queries, noise_std=noise_std, seed=seed, length=length)
        self.height = _check_range("height", height)
        self.position = _check_range("position", position)
        self.offset = _check_range("offset", offset)
        self.x_range = _check_range("x", x_range)

    def draw_function(self, draws: TaskDraws) -> FunctionParams:
        u = _uniform_params(draws, self.height, self.position, self.offset)
        return {"height": u[:, :, 0:1], "position": u[:, :, 1:2], "offset": u[:, :, 2:3]}

    def function(self, params: FunctionParams, x: Tensor) -> Tensor:
        return params["height"] * (x > params["position"]).to(x.dtype) + params["offset"]
