r"""Meta-testing: fine-tune θ on a target task's train half with ω fixed, score it on its val half.

.. math::

    \theta^*_i = \mathrm{adapt}_\omega(D^{train}_i, K), \qquad
    m_i = \mathrm{metric}\big(f_{\theta^*_i}(x^{val}_i), y^{val}_i\big)

reported as the mean of :math:`m_i` over a fixed set of target tasks (600 by convention,
following Finn et al., 2017 and Snell et al., 2017) with a 95% confidence interval. The
metric is accuracy for classification (integer targets) and mean squared error for
regression (floating targets). Fine-tuning solves the inner problem the meta-gradient mode
trained θ0 for (``mode.meta_test_problem()``, a `metalearn.inner.InnerProblem`: the plain
inner loop, or iMAML's proximal one) with the same inner loop as meta-training
(`metalearn.inner.inner_loop`), and may run more steps than training did.

Nothing here builds a graph for ω: θ0 is detached and everything runs under
``torch.no_grad`` (``torch.func.grad`` inside still takes the inner gradients, since a
function transform ignores an outer ``no_grad``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from metalearn.checks import check_labels, check_seed, check_steps, inner_steps_keyword
from metalearn.distributed import Shard, check_distributed_option, shard_scope
from metalearn.inner import Adapted, InnerProblem, check_finite_losses, check_finite_task_losses
from metalearn.kernels import check_kernels
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params
from metalearn.mapping import map_tasks, needs_norm_routing, resolve_batching, task_objective
from metalearn.modes import MetaGradientMode, resolve_mode
from metalearn.tasks.task import Task, TaskBatch, stack_tasks
from metalearn.tasks.taskset import task_seed

__all__ = ["Evaluation", "confidence_interval95", "evaluate", "fine_tune", "meta_test_problem", "omega_device"]

#: z-value of a two-sided 95% interval of the normal distribution.
Z95 = 1.96


def omega_device(omega: nn.Module) -> torch.device:
    """The device ω's tensors live on (CPU if it holds none)."""
    for p in omega.parameters():
        return p.device
    for b in omega.buffers():
        return b.device
    model = getattr(omega, "model", None)
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _detached_theta0(
    omega: MetaKnowledge, generator: torch.Generator | None, train: tuple[Tensor, Tensor]
) -> Params:
    """θ0 of one task (no task dimension); ``train`` is its train half, for a task-conditioned init."""
    x, y = train
    return {n: t[0].detach() for n, t in omega.initial_params(1, generator, train=(x[None], y[None])).items()}


@inner_steps_keyword
def fine_tune(
    omega: MetaKnowledge,
    train: tuple[Tensor, Tensor],
    inner_steps: int,
    *,
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode | None = None,
    kernels: str = "auto",
) -> Adapted:
    r"""θ* for one task: θ0 from ω, then ``inner_steps`` inner updates on ``train``; ω is not changed.

    No graph is kept: the result does not require grad and holds no reference to ω's
    autograd history (the meta-test counterpart of `metalearn.inner.adapt`).

    Args:
        omega: the meta-knowledge (fixed).
        train: the task's ``(x, y)`` train half, no task dimension; moved to ω's device.
        inner_steps: number of inner steps (may exceed the number used in meta-training).
        generator: randomness for a stochastic init.
        mode: the meta-gradient mode ω was trained with (a name or a `metalearn.modes` object);
            fine-tuning solves its ``meta_test_problem()``: e.g. ``Implicit(lam=λ)`` descends
            iMAML's proximal objective
            :math:`L^{train}(\phi) + \frac{\lambda}{2}\lVert\phi - \theta_0\rVert^2` (Rajeswaran et
            al., 2019). None: the plain inner loop.
        kernels: how inner updates are applied: ``"auto"``, ``"triton"`` or ``"reference"`` (`metalearn.kernels`).

    Returns:
        An `metalearn.inner.Adapted`: call it as the fine-tuned model (``adapted(x)`` runs ω's model
        with θ* bound, under ``torch.no_grad``); ``adapted.params`` is θ*, every parameter of the model
        by name, and ``adapted.losses`` the inner loss before each step ``[inner_steps]``.

    Example:
        >>> import torch
        >>> from metalearn import InnerSGD, MetaKnowledge, fine_tune
        >>> from metalearn.models import MLP
        >>> omega = MetaKnowledge(MLP((1, 8, 1)), InnerSGD(lr=0.1))
        >>> x, y = torch.randn(5, 1), torch.randn(5, 1)
        >>> adapted = fine_tune(omega, (x, y), inner_steps=5)
        >>> adapted(x).requires_grad, len(adapted.losses)
        (False, 5)

    Raises:
        NonFiniteError: the inner loss became NaN or Inf (names the step).
        TypeError, ValueError: ``inner_steps`` is not an int of at least 0, a negative class label, an
            unknown ``mode`` name.
    """
    check_steps("inner_steps", inner_steps)
    problem = meta_test_problem(mode)
    check_labels(omega, train[0], (("train", train[1]),), batched=False)
    device = omega_device(omega)
    check_kernels(kernels, device)
    x, y = (t.to(device) for t in train)
    with torch.no_grad():
        theta0 = _detached_theta0(omega, generator, (x, y))
        params, losses = problem.solve(omega, theta0, x, y, inner_steps, kernels=kernels)
    check_finite_losses(losses)
    return Adapted(params, losses, omega, differentiable=False)


def meta_test_problem(mode: str | MetaGradientMode | None) -> InnerProblem:
    """The inner problem meta-test solves: the mode's ``meta_test_problem()``, plain for None."""
    return InnerProblem() if mode is None else resolve_mode(mode).meta_test_problem()


@dataclass(frozen=True)
class Evaluation:
    r"""Meta-test result over ``n`` tasks.

    The interval is the normal approximation :math:`\bar m \pm 1.96\, s / \sqrt{n}` with
    :math:`s` the sample standard deviation (``ddof=1``) of the per-task metrics; it is
    ``nan`` for a single task.

    Attributes:
        mean: mean metric over the tasks.
        ci95: half-width of the 95% confidence interval of the mean.
        n: number of tasks.
        metric: ``"accuracy"`` or ``"mse"``.
        per_task: the metric of each task, in task order (float64, CPU).
        per_task_loss: the val loss (cross-entropy or MSE) of each task, in task order.
    """

    mean: float
    ci95: float
    n: int
    metric: str
    per_task: Tensor = field(repr=False)
    per_task_loss: Tensor = field(repr=False)

    def __str__(self) -> str:
        return f"{self.metric} {self.mean:.4f} ± {self.ci95:.4f} (95% CI, {self.n} tasks)"


def confidence_interval95(values: Tensor) -> tuple[float, float]:
    """``(mean, 1.96 * std / sqrt(n))`` with the sample standard deviation (``ddof=1``)."""
    values = values.to(torch.float64)
    n = values.numel()
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan")
    return mean, Z95 * float(values.std(correction=1)) / math.sqrt(n)


def _chunks(tasks: Iterable[Task] | TaskBatch, size: int) -> Iterator[list[Task]]:
    chunk: list[Task] = []
    for task in tasks:
        chunk.append(task)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _same_shapes(tasks: Sequence[Task]) -> bool:
    first = [(t.shape, t.dtype) for t in (*tasks[0].train, *tasks[0].val)]
    return all([(t.shape, t.dtype) for t in (*task.train, *task.val)] == first for task in tasks[1:])


def _batched_theta0(theta0s: list[Params]) -> tuple[Params, dict[str, int | None]]:
    """Stacks per-task θ0 for vmap; a tensor every task shares (a point init) goes in once, unbatched."""
    theta0: Params = {}
    dims: dict[str, int | None] = {}
    for name, first in theta0s[0].items():
        if all(t[name] is first or _same_view(t[name], first) for t in theta0s[1:]):
            theta0[name], dims[name] = first, None
        else:
            theta0[name], dims[name] = torch.stack([t[name] for t in theta0s]), 0
    return theta0, dims


def _stacked_theta0(theta0s: list[Params]) -> tuple[dict[str, list[Tensor]], dict[str, int | None]]:
    """Per-task θ0 for the loop of `map_tasks`: each task's own tensors, indexed by task (no copy)."""
    return {name: [t[name] for t in theta0s] for name in theta0s[0]}, dict.fromkeys(theta0s[0], 0)


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


@inner_steps_keyword
def evaluate(
    omega: MetaKnowledge,
    tasks: Iterable[Task] | TaskBatch,
    inner_steps: int,
    *,
    batch_size: int = 32,
    batching: str = "auto",
    seed: int = 0,
    mode: str | MetaGradientMode | None = None,
    progress: bool | str = False,
    distributed: Any = None,
    kernels: str = "auto",
) -> Evaluation:
    """Meta-tests ω: fine-tunes on each task's train half, scores on its val half.

    Same-shaped tasks run ``batch_size`` at a time, under ``torch.func.vmap`` or as a loop
    (``batching``; ``"auto"`` uses `choose_batching`); a group of tasks of different shapes
    (variable ways or shots) runs one by one. The result does not depend on ``batch_size``
    or ``batching`` beyond floating-point rounding: task ``i``'s θ0 is drawn with its own
    generator seeded from ``(seed, i)``, so a stochastic init is reproducible too. ω is put
    in eval mode while evaluating (dropout off) and restored afterwards.

    Args:
        omega: the meta-knowledge (fixed).
        tasks: the target tasks, e.g. a `TaskSet` of length 600, a list of `Task` or a
            `TaskBatch`; moved to ω's device.
        inner_steps: inner steps per task (may exceed the number used in meta-training).
        batch_size: tasks fine-tuned together.
        batching: ``"auto"``, ``"loop"`` or ``"vmap"``.
        seed: seeds the per-task generators of a stochastic init.
        mode: the meta-gradient mode ω was trained with; tasks are fine-tuned on its
            ``meta_test_problem()`` (see `fine_tune`; iMAML's proximal problem runs task by task).
            None: the plain inner loop.
        progress: show a tqdm bar over the tasks (600 tasks x many steps take minutes on CPU); a
            string shows it with that label. The bar is removed when evaluate returns.
        distributed: ``None`` (default) shares the tasks among the ranks of an initialised
            ``torch.distributed`` group, ``True``/``False`` force it on/off, or a
            `metalearn.DistributedOptions`. The groups of ``batch_size`` tasks go round the ranks
            and every rank gets every task's metric back, so each rank returns exactly the
            `Evaluation` one process computes (collective: call it on every rank).
        kernels: how inner updates are applied: ``"auto"``, ``"triton"`` or ``"reference"`` (`metalearn.kernels`).

    Returns:
        An `Evaluation` (mean, 95% CI, per-task metrics).

    Raises:
        ValueError: no tasks, an unknown ``batching``, a negative ``inner_steps`` or class label (names
            the task), targets that do not fit the model's output, an unknown ``mode`` name.
        TypeError: ``inner_steps``, ``batch_size`` or ``seed`` not an int.
        NonFiniteError: a NaN/Inf inner or val loss; ``task`` is the index among ``tasks``.
    """
    check_steps("inner_steps", inner_steps)
    check_seed(seed)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {batch_size!r} ({type(batch_size).__name__})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(tasks, Sized) and len(tasks) == 0:
        raise ValueError("evaluate needs at least one task; got an empty task collection")
    problem = meta_test_problem(mode)
    _check_progress(progress)
    check_distributed_option(distributed)
    bar = None
    check_kernels(kernels, omega_device(omega))
    was_training = omega.training
    omega.eval()
    try:
        # chosen for ω as it runs here, in eval mode (dropout off); a bad value leaves ω's mode restored
        how = resolve_batching(omega, batching, omega_device(omega))
        if not problem.vmappable:
            how = "loop"  # the proximal problem takes plain autograd gradients: task by task
        with torch.no_grad(), shard_scope(distributed, omega_device(omega)) as shard:
            bar = _progress_bar(tasks, progress if shard is None or shard.is_main else False)  # one bar: rank 0's
            if shard is None:
                losses, metrics, kind = _evaluate_chunks(
                    omega, tasks, inner_steps, batch_size, how, seed, problem, bar, kernels=kernels
                )
            else:
                losses, metrics, kind = _evaluate_sharded(
                    shard, omega, tasks, inner_steps, batch_size, how, seed, problem, bar, kernels=kernels
                )
    finally:
        omega.train(was_training)
        if bar is not None:
            bar.close()
    if not metrics:
        raise ValueError("evaluate needs at least one task; got an empty task collection")
    per_task = torch.stack(metrics).to("cpu", torch.float64)
    mean, ci95 = confidence_interval95(per_task)
    return Evaluation(
        mean=mean,
        ci95=ci95,
        n=per_task.numel(),
        metric=kind or "mse",
        per_task=per_task,
        per_task_loss=torch.stack(losses).to("cpu", torch.float64),
    )


def _evaluate_sharded(
    shard: Shard,
    omega: MetaKnowledge,
    tasks: Iterable[Task] | TaskBatch,
    inner_steps: int,
    batch_size: int,
    batching: str,
    seed: int,
    problem: InnerProblem,
    bar: Any = None,
    kernels: str = "auto",
) -> tuple[list[Tensor], list[Tensor], str | None]:
    """`_evaluate_chunks` with the chunks dealt round the ranks (chunk k to rank k mod N), then every
    rank's results gathered and put back in task order. Each chunk is computed exactly as in one
    process (same tasks together, same seeds), so the per-task values are the same bits."""
    world = shard.world_size
    error: Exception | None = None
    mine: tuple[list[Tensor], list[Tensor], str | None] = ([], [], None)
    try:
        mine = _evaluate_chunks(
            omega, tasks, inner_steps, batch_size, batching, seed, problem, bar,
            owned=lambda k: k % world == shard.rank, kernels=kernels,
        )
    except Exception as err:  # raised on every rank below, not only here
        error = err
    cpu = ([t.cpu() for t in mine[0]], [t.cpu() for t in mine[1]], mine[2])
    gathered = shard.all_gather_objects(cpu, "gathering the per-task metrics of evaluate")
    shard.raise_if_failed(error, "evaluating its share of the tasks")
    kind = next((g[2] for g in gathered if g[2] is not None), None)
    losses: list[Tensor] = []
    metrics: list[Tensor] = []
    taken = [0] * world
    k = 0
    while any(taken[r] < len(gathered[r][1]) for r in range(world)):  # chunk k came from rank k mod N
        r = k % world
        losses.extend(gathered[r][0][taken[r] : taken[r] + batch_size])
        metrics.extend(gathered[r][1][taken[r] : taken[r] + batch_size])
        taken[r] += batch_size
        k += 1
    return losses, metrics, kind


def _evaluate_chunks(
    omega: MetaKnowledge,
    tasks: Iterable[Task] | TaskBatch,
    inner_steps: int,
    batch_size: int,
    batching: str,
    seed: int,
    problem: InnerProblem,
    bar: Any = None,
    owned: Callable[[int], bool] | None = None,
    kernels: str = "auto",
) -> tuple[list[Tensor], list[Tensor], str | None]:
    """Fine-tunes and scores ``tasks`` ``batch_size`` at a time: (val losses, metrics, metric kind).

    ``owned(k)`` says whether this process computes chunk ``k`` (all when ``None``); the others are
    skipped, their tasks still counted, so task ``i`` keeps its seed ``(seed, i)``."""
    device = omega_device(omega)
    metrics: list[Tensor] = []
    losses: list[Tensor] = []
    kind: str | None = None
    offset = 0
    objective = partial(task_objective, adapt_fn=partial(problem.solve, kernels=kernels))
    route_norms = needs_norm_routing(omega, problem)  # the problem: a user's subclass keeps the interception
    for k, chunk in enumerate(_chunks(tasks, batch_size)):
        if owned is not None and not owned(k):
            if kind is None:
                kind = "mse" if chunk[0].val[1].is_floating_point() else "accuracy"
            offset += len(chunk)
            continue
        for j, task in enumerate(chunk):
            check_labels(
                omega, task.train[0], (("train", task.train[1]), ("val", task.val[1])), batched=False,
                task_offset=offset + j,
            )
        theta0s = [
            _detached_theta0(
                omega,
                torch.Generator().manual_seed(task_seed(seed, offset + j)),
                (task.train[0].to(device), task.train[1].to(device)),
            )
            for j, task in enumerate(chunk)
        ]
        if len(chunk) > 1 and _same_shapes(chunk):
            batch = stack_tasks(chunk).to(device)
            theta0, theta0_dims = (_batched_theta0 if batching == "vmap" else _stacked_theta0)(theta0s)
            val_loss, met, inner = map_tasks(
                objective, (None, theta0_dims, 0, 0, 0, 0, None, None),
                omega, theta0, *batch.train, *batch.val, inner_steps, True, batching=batching, kernels=kernels,
                route_norms=route_norms,
            )
            check_finite_losses(inner, task_offset=offset)
            check_finite_task_losses(val_loss, what="val loss (after fine-tuning)", task_offset=offset)
            losses.extend(val_loss.unbind())
            metrics.extend(met.unbind())
        else:  # tasks of different shapes cannot be stacked: one by one
            for j, (task, theta0) in enumerate(zip(chunk, theta0s, strict=True)):
                task = task.to(device)
                val_loss, met, inner = objective(omega, theta0, *task.train, *task.val, inner_steps, True)
                check_finite_losses(inner, task_offset=offset + j)
                check_finite_task_losses(val_loss[None], what="val loss (after fine-tuning)", task_offset=offset + j)
                losses.append(val_loss)
                metrics.append(met)
        if kind is None:
            kind = "mse" if chunk[0].val[1].is_floating_point() else "accuracy"
        offset += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    return losses, metrics, kind


def _check_progress(progress: object) -> None:
    if not isinstance(progress, (bool, str)):
        raise TypeError(f"progress must be a bool or a label (str), got {progress!r}")


def _progress_bar(tasks: Any, progress: bool | str) -> Any:
    """A tqdm bar over the tasks (disabled when ``progress`` is falsy), removed when closed."""
    total = len(tasks) if isinstance(tasks, Sized) else None
    label = progress if isinstance(progress, str) else "meta-test"
    return tqdm(total=total, disable=not progress, desc=label, unit="task", leave=False, dynamic_ncols=True)
