"""`Conv4.forward_batched`: the unrolled mode's vmap batching on a stack of tasks as grouped convolutions
(metalearn.task_batched), its val pass task by task; the meta-gradient of the loop and of torch.func's vmap."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from metalearn import AdaptOnly, MetaKnowledge, MetaSGD, NonFiniteError, maml
from metalearn.knowledge import InnerAdam, PerStepLR
from metalearn.models import Conv4
from metalearn.outer import meta_gradient, meta_step
from metalearn.task_batched import runs_task_batched
from metalearn.tasks import TaskBatch

DT = torch.float64
SIDE = 16  # the smallest image four 2x2 max-pools leave a pixel of


def _conv4(**kw) -> Conv4:
    return Conv4(3, in_channels=2, hidden=4, image_size=SIDE, **kw)


def _batch(tasks: int = 3, seed: int = 0, dtype: torch.dtype = DT) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, 2, SIDE, SIDE, generator=g, dtype=dtype)  # noqa: E731
    y = lambda n: torch.randint(3, (tasks, n), generator=g)  # noqa: E731
    return TaskBatch((x(3), y(3)), (x(6), y(6)))


def _grads(build, batch: TaskBatch, steps: int, batching: str, first_order: bool = False):
    torch.manual_seed(0)
    omega = build().to(DT)
    stats = meta_gradient(omega, batch, steps, batching=batching, first_order=first_order)
    return {k: p.grad.clone() for k, p in omega.named_parameters() if p.grad is not None}, stats


def _close(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    # a conv bias before a batch norm has a zero meta-gradient (the norm removes it): compared at ω's scale
    assert a.keys() == b.keys() and a
    scale = max(float(g.abs().max()) for g in b.values())
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-12 * scale), k


RULES = {
    "sgd": lambda m: maml(m, 0.1),
    "meta-sgd": lambda m: MetaKnowledge(m, MetaSGD(0.1)),
    "lslr": lambda m: MetaKnowledge(m, PerStepLR(0.1, steps=2)),
    "adam": lambda m: MetaKnowledge(m, InnerAdam(0.05, learn=("lr",))),
    "anil": lambda m: MetaKnowledge(m, MetaSGD(0.1), adapt=AdaptOnly("head.*")),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_the_meta_gradient_equals_the_loop_and_torch_func_vmap(rule, first_order, batched_calls, monkeypatch) -> None:
    build = lambda: RULES[rule](_conv4())  # noqa: E731
    batch = _batch()
    ours, stats = _grads(build, batch, 2, "vmap", first_order)
    assert len(batched_calls) == (0 if (first_order and rule == "anil") else 1)
    loop, loop_stats = _grads(build, batch, 2, "loop", first_order)
    _close(ours, loop)
    assert stats.meta_loss == pytest.approx(loop_stats.meta_loss, rel=1e-12)
    assert stats.val_metric == loop_stats.val_metric
    assert stats.inner_loss_first == pytest.approx(loop_stats.inner_loss_first, rel=1e-12)
    monkeypatch.setattr("metalearn.modes.unrolled.runs_task_batched", lambda *args: False)
    vmapped, _ = _grads(build, batch, 2, "vmap", first_order)
    _close(ours, vmapped)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_any_number_of_steps_and_a_frozen_layer(steps, batched_calls) -> None:
    def build() -> MetaKnowledge:
        model = _conv4()
        model.features[1].bias.requires_grad_(False)  # a frozen norm shift: a static θ without a gradient
        return MetaKnowledge(model, MetaSGD(0.2), adapt=AdaptOnly("head.*", "features.0.*", "features.12.*"))

    ours, _ = _grads(build, _batch(), steps, "vmap")
    loop, _ = _grads(build, _batch(), steps, "loop")
    assert len(batched_calls) == 1
    assert "model.features.1.bias" not in ours
    _close(ours, loop)


@pytest.mark.parametrize("stack", [1, 2, 5])
def test_stacks_of_fewer_tasks_give_the_same_meta_gradient(stack, batched_calls, monkeypatch) -> None:
    build = lambda: MetaKnowledge(_conv4(), MetaSGD(0.1))  # noqa: E731
    whole, stats = _grads(build, _batch(tasks=5), 2, "vmap")
    monkeypatch.setattr(Conv4, "task_stack_size", stack)
    ours, stacked_stats = _grads(build, _batch(tasks=5), 2, "vmap")
    loop, _ = _grads(build, _batch(tasks=5), 2, "loop")
    assert len(batched_calls) == 2
    _close(ours, loop)
    _close(ours, whole)
    assert stacked_stats.meta_loss == pytest.approx(stats.meta_loss, rel=1e-12)


def test_a_nan_in_a_later_stack_names_its_task(monkeypatch) -> None:
    monkeypatch.setattr(Conv4, "task_stack_size", 2)
    batch = _batch(tasks=5)
    batch.train[0][3, 1, 0, 2, 2] = float("inf")
    torch.manual_seed(0)
    omega = maml(_conv4(), 0.1).to(DT)
    with pytest.raises(NonFiniteError, match="task 3") as err:
        meta_gradient(omega, batch, 1, batching="vmap")
    assert err.value.task == 3


def test_forward_batched_is_forward_of_each_task() -> None:
    torch.manual_seed(0)
    model = _conv4().to(DT)
    assert model.task_batched_ready()
    params = {k: torch.randn(4, *p.shape, dtype=DT) for k, p in model.named_parameters()}
    x = torch.randn(4, 5, 2, SIDE, SIDE, dtype=DT)
    out = model.forward_batched(params, x)
    assert out.shape == (4, 5, 3)
    for t in range(4):
        own = torch.func.functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],))
        assert torch.allclose(out[t], own, rtol=1e-10, atol=1e-10)


def test_forward_batched_under_bf16_is_the_per_task_forward_channels_last() -> None:
    torch.manual_seed(0)
    model = _conv4()
    params = {k: torch.randn(2, *p.shape) * 0.5 for k, p in model.named_parameters()}
    x = torch.randn(2, 5, 2, SIDE, SIDE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_batched(params, x)
        own = [torch.func.functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],)) for t in range(2)]
    exact = model.forward_batched(params, x)
    for t in range(2):
        # both in bf16, in other orders of accumulation: as close to each other as each is to float32
        assert (out[t].float() - own[t].float()).abs().max() <= 2 * (own[t].float() - exact[t]).abs().max() + 1e-2


def test_a_meta_step_reports_vmap_and_equals_the_loop_step() -> None:
    rows, after = [], []
    for batching in ("vmap", "loop"):
        torch.manual_seed(0)
        omega = maml(_conv4(), 0.1).to(DT)
        rows.append(meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.1), _batch(), 1, batching=batching))
        after.append({k: p.detach().clone() for k, p in omega.named_parameters()})
    assert rows[0]["batching"] == "vmap" and rows[1]["batching"] == "loop"
    _close(after[0], after[1])


def test_a_nan_in_a_val_image_names_its_task_before_any_grad(batched_calls) -> None:
    batch = _batch()
    batch.val[0][2, 4, 0, 3, 3] = float("nan")
    torch.manual_seed(0)
    omega = maml(_conv4(), 0.1).to(DT)
    with pytest.raises(NonFiniteError, match="task 2") as err:
        meta_gradient(omega, batch, 1, batching="vmap")
    assert err.value.task == 2 and len(batched_calls) == 1
    assert all(p.grad is None for p in omega.parameters())


class OwnForward(Conv4):
    """A subclass with its own forward (a scaled output): not the function forward_batched computes."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)

    forward_batched = Conv4.forward_batched
    task_batched_ready = Conv4.task_batched_ready


def _with_layer(index: int, layer: nn.Module) -> Conv4:
    model = _conv4()
    model.features[index] = layer
    return model


NOT_READY = {
    "own forward": lambda: OwnForward(3, in_channels=2, hidden=4, image_size=SIDE),
    "grouped conv": lambda: _with_layer(4, nn.Conv2d(4, 4, 3, padding=1, groups=2)),
    "reflect padding": lambda: _with_layer(4, nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")),
    "torch's batch norm": lambda: _with_layer(1, nn.BatchNorm2d(4, track_running_stats=False)),
    "dropout": lambda: _with_layer(3, nn.Dropout(0.0)),
    "torch's max-pool": lambda: _with_layer(2, nn.MaxPool2d(2)),
}


@pytest.mark.parametrize("case", list(NOT_READY))
def test_a_model_forward_batched_does_not_know_falls_back(case, batched_calls) -> None:
    model = NOT_READY[case]()
    omega = maml(model, 0.1).to(DT)
    assert not runs_task_batched(omega, omega.model_params(), _batch().train[0], False)
    meta_gradient(omega, _batch(), 1, batching="vmap")
    assert not batched_calls


def test_a_hook_falls_back(batched_calls) -> None:
    model = _conv4()
    model.features[6].register_forward_hook(lambda module, args, out: out)
    assert not model.task_batched_ready()
    omega = maml(model, 0.1).to(DT)
    meta_gradient(omega, _batch(), 1, batching="vmap")
    assert not batched_calls


def _bf16_step(build, batching: str = "auto", **kw) -> tuple[dict, dict[str, Tensor]]:
    torch.manual_seed(0)
    omega = maml(build(), 0.1)
    row = meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.0), _batch(4, dtype=torch.float32), 1,
                    batching=batching, precision="bf16", **kw)  # fmt: skip
    return row, {k: p.grad.clone() for k, p in omega.named_parameters() if p.grad is not None}


def test_auto_runs_the_task_batched_path_under_cpu_bf16(batched_calls) -> None:
    """`batching="auto"` keeps the Conv-4 on the loop in float32 (memory) and runs it task-batched under
    CPU bf16 (faster there, docs/results.md): the very step ``batching="vmap"`` runs."""
    auto_row, auto_grads = _bf16_step(_conv4)
    assert auto_row["batching"] == "vmap" and len(batched_calls) == 1
    vmap_row, vmap_grads = _bf16_step(_conv4, batching="vmap")
    assert auto_grads.keys() == vmap_grads.keys()
    assert all(torch.equal(auto_grads[k], vmap_grads[k]) for k in auto_grads)
    loop_row, _ = _bf16_step(_conv4, batching="loop")
    assert loop_row["batching"] == "loop" and len(batched_calls) == 2
    torch.manual_seed(0)
    omega = maml(_conv4(), 0.1)
    row = meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.0), _batch(4, dtype=torch.float32), 1)
    assert row["batching"] == "loop" and len(batched_calls) == 2


@pytest.mark.parametrize("case", ["not ready", "chunks", "own mode"])
def test_auto_under_bf16_keeps_the_loop_where_the_task_batched_path_would_not_run(case, batched_calls) -> None:
    """Where vmap would be torch.func's (a layer the batched forward does not know, chunks of tasks, a
    mode of the user's own), ``auto`` keeps the loop under bf16 too: never torch.func's batched convolutions."""
    from metalearn.modes import Unrolled

    class OwnMode(Unrolled):
        pass

    build = NOT_READY["torch's max-pool"] if case == "not ready" else _conv4
    kw = {"chunk_size": 2} if case == "chunks" else {"mode": OwnMode()} if case == "own mode" else {}
    row, _ = _bf16_step(build, **kw)
    assert row["batching"] == "loop" and not batched_calls
