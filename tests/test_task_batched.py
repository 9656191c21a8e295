"""The vmap batching run by a model's own task-batched forward (metalearn.task_batched): the meta-gradient
of torch.func's vmap and of the loop, and torch.func's vmap wherever a condition fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from metalearn import AdaptOnly, InnerSGD, MetaKnowledge, MetaSGD, NonFiniteError, maml
from metalearn.knowledge import InnerAdam, MomentumSGD, PerStepLR
from metalearn.models import MLP
from metalearn.modes import Truncated
from metalearn.outer import meta_gradient
from metalearn.task_batched import elementwise, runs_task_batched
from metalearn.tasks import TaskBatch

DT = torch.float64


def _batch(tasks: int = 4, classes: int | None = None, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x_tr, x_val = torch.randn(tasks, 6, 3, generator=g, dtype=DT), torch.randn(tasks, 5, 3, generator=g, dtype=DT)
    if classes is None:
        return TaskBatch((x_tr, torch.randn(tasks, 6, 2, generator=g, dtype=DT)),
                         (x_val, torch.randn(tasks, 5, 2, generator=g, dtype=DT)))  # fmt: skip
    return TaskBatch((x_tr, torch.randint(classes, (tasks, 6), generator=g)),
                     (x_val, torch.randint(classes, (tasks, 5), generator=g)))  # fmt: skip


def _grads(
    build: Callable[[], MetaKnowledge], batch: TaskBatch, steps: int, batching: str, first_order: bool = False,
    mode: str | Truncated = "unrolled",
) -> tuple[dict[str, Tensor], Any]:
    torch.manual_seed(0)
    omega = build().to(DT)
    stats = meta_gradient(omega, batch, steps, batching=batching, first_order=first_order, mode=mode)
    return {k: p.grad.clone() for k, p in omega.named_parameters() if p.grad is not None}, stats


def _torch_func_vmap(monkeypatch) -> None:
    monkeypatch.setattr("metalearn.modes.unrolled.runs_task_batched", lambda *args: False)


def _close(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12), k


RULES = {
    "sgd": lambda m: maml(m, 0.1),
    "meta-sgd": lambda m: MetaKnowledge(m, MetaSGD(0.1)),
    "lslr": lambda m: MetaKnowledge(m, PerStepLR(0.1, steps=3)),
    "momentum": lambda m: MetaKnowledge(m, MomentumSGD(0.1, momentum=0.5)),
    "adam": lambda m: MetaKnowledge(m, InnerAdam(0.05, learn=("lr", "betas"))),
    "anil": lambda m: MetaKnowledge(m, InnerSGD(0.1), adapt=AdaptOnly("layers.4.*")),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_the_meta_gradient_equals_torch_func_vmap_and_the_loop(rule, first_order, batched_calls, monkeypatch) -> None:
    build = lambda: RULES[rule](MLP((3, 8, 8, 2)))  # noqa: E731
    batch = _batch()
    ours, stats = _grads(build, batch, 3, "vmap", first_order)
    expected_calls = 0 if (first_order and rule == "anil") else 1  # first order with static θ: torch.func
    assert len(batched_calls) == expected_calls
    loop, loop_stats = _grads(build, batch, 3, "loop", first_order)
    _close(ours, loop)
    assert stats.meta_loss == pytest.approx(loop_stats.meta_loss, rel=1e-12)
    assert stats.inner_loss_last == pytest.approx(loop_stats.inner_loss_last, rel=1e-12)
    _torch_func_vmap(monkeypatch)
    vmapped, _ = _grads(build, batch, 3, "vmap", first_order)
    _close(ours, vmapped)


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_classification_and_any_number_of_steps(steps, batched_calls) -> None:
    build = lambda: maml(MLP((3, 8, 5)), 0.3)  # noqa: E731
    batch = _batch(classes=5)
    ours, stats = _grads(build, batch, steps, "vmap")
    loop, loop_stats = _grads(build, batch, steps, "loop")
    assert len(batched_calls) == 1
    _close(ours, loop)
    assert stats.val_metric == loop_stats.val_metric  # accuracy of the same predictions


def test_forward_batched_is_forward_with_of_each_task() -> None:
    torch.manual_seed(0)
    model = MLP((3, 8, 8, 2), activation=nn.Tanh).to(DT)
    model.layers[2].bias = None  # a layer without a bias: bmm alone
    assert model.task_batched_ready()
    params = {k: torch.randn(4, *p.shape, dtype=DT) for k, p in model.named_parameters()}
    x = torch.randn(4, 5, 7, 3, dtype=DT)  # more than one example dimension
    out = model.forward_batched(params, x)
    assert out.shape == (4, 5, 7, 2)
    for t in range(4):
        own = model.forward_with({k: v[t] for k, v in params.items()}, x[t])
        assert torch.allclose(out[t], own, rtol=1e-12, atol=1e-12)


def test_a_nan_names_its_task(batched_calls) -> None:
    batch = _batch()
    batch.train[0][2, 1, 0] = float("nan")
    omega = maml(MLP((3, 8, 2)), 0.1).to(DT)
    with pytest.raises(NonFiniteError, match="task 2") as err:
        meta_gradient(omega, batch, 2, batching="vmap")
    assert err.value.task == 2 and err.value.step == 0 and len(batched_calls) == 1
    assert all(p.grad is None for p in omega.parameters())  # raised before the backward


class NormalisingRule(InnerSGD):
    """A user's subclass that does not declare elementwise (its update could reduce over a tensor)."""


class WithoutForwardBatched(MLP):
    """An MLP subclass: it does not define forward_batched / task_batched_ready itself."""


class CentreOverExamples(nn.Module):
    """No tensors of its own, but it mixes the rows of its input: over a task's examples in the per-task
    forward, over the tasks of a stack in a batched one (so it must not be trusted with the stack)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x - x.mean(0))


def _hooked() -> MLP:
    model = MLP((3, 8, 2))
    model.layers[0].register_forward_hook(lambda m, args, out: None)
    return model


CASES: dict[str, Callable[[], MetaKnowledge]] = {
    "a rule that does not declare elementwise": lambda: MetaKnowledge(MLP((3, 8, 2)), NormalisingRule(0.1)),
    "a loss of its own": lambda: MetaKnowledge(MLP((3, 8, 2)), InnerSGD(0.1), loss=nn.functional.l1_loss),
    "a model class without forward_batched": lambda: maml(WithoutForwardBatched((3, 8, 2)), 0.1),
    "a layer that mixes rows": lambda: maml(MLP((3, 8, 2), activation=CentreOverExamples), 0.1),
    "a norm between the layers": lambda: maml(
        MLP((3, 8, 2), activation=lambda: nn.BatchNorm1d(8, affine=False, track_running_stats=False)), 0.1
    ),
    "a hook on a layer": lambda: maml(_hooked(), 0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_func_vmap_runs_where_a_condition_fails(case, batched_calls) -> None:
    build = CASES[case]
    batch = _batch()
    ours, _ = _grads(build, batch, 2, "vmap")
    loop, _ = _grads(build, batch, 2, "loop")
    assert not batched_calls
    _close(ours, loop)


def test_other_modes_and_transforms_keep_torch_func(batched_calls) -> None:
    batch = _batch()
    build = lambda: maml(MLP((3, 8, 2)), 0.1)  # noqa: E731
    _grads(build, batch, 3, "vmap", mode=Truncated(1))
    assert not batched_calls
    omega = build().to(DT)
    theta0 = omega.model_params()
    assert runs_task_batched(omega, theta0, batch.train[0], first_order=False)
    inside = torch.func.vmap(lambda x: torch.tensor(runs_task_batched(omega, theta0, x[None], False)))(batch.train[0])
    assert not inside.any()
    with torch.no_grad():
        assert not runs_task_batched(omega, theta0, batch.train[0], first_order=False)
    assert not runs_task_batched(omega, theta0, batch.train[0][0], first_order=False)  # no task dimension


def test_elementwise_trusts_declaring_classes_only() -> None:
    assert elementwise(InnerSGD(0.1)) and elementwise(MetaSGD(0.1)) and elementwise(InnerAdam(0.1))
    assert elementwise(MomentumSGD(0.1)) and elementwise(PerStepLR(0.1, steps=2))
    assert not elementwise(NormalisingRule(0.1))
