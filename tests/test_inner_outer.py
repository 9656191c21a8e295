"""The inner and outer loops: adapt(), NaN/Inf errors, meta_step, and vmap with native batch norm."""

from __future__ import annotations

import pytest
import reference
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metalearn.errors import NonFiniteError
from metalearn.inner import adapt
from metalearn.knowledge import AdaptOnly, InnerSGD, MetaKnowledge, maml, meta_sgd
from metalearn.mapping import choose_batching
from metalearn.models import MLP, Conv4
from metalearn.outer import meta_gradient, meta_loss, meta_step
from metalearn.tasks import TaskBatch

DT = torch.float64
BATCHINGS = ["loop", "vmap"]


def tiny_mlp(sizes: tuple[int, ...] = (1, 8, 8, 1), seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(sizes).to(DT)


def regression(n_tasks: int = 4, in_features: int = 1, seed: int = 1) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(n_tasks, 5, 6, in_features, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def native_bn_model(seed: int = 0) -> nn.Sequential:
    """conv -> torch's own BatchNorm2d (batch statistics) -> ReLU -> linear, on 1x8x8 images."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
            nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
        ).to(DT)
        with torch.no_grad():  # γ, β away from 1, 0
            model[1].weight.add_(0.3 * torch.randn(4, dtype=DT))
            model[1].bias.add_(0.3 * torch.randn(4, dtype=DT))
        return model


def images(n_tasks: int = 2, size: int = 8, seed: int = 2) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.image_batch(n_tasks, 3, 2, 3, 1, size, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def grads_of(omega: MetaKnowledge, batch: TaskBatch, steps: int, **kwargs) -> dict[str, Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, **kwargs)
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in b.values())
    return max(float((a[n] - b[n]).abs().max()) for n in a) / scale


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------- adapt()


@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_one_task_equals_reference_sgd(first_order: bool) -> None:
    model = tiny_mlp()
    omega = maml(model, lr=0.3)
    task = regression()[0]
    adapted = adapt(omega, task.train, inner_steps=3, first_order=first_order)
    theta0 = {n: p for n, p in model.named_parameters()}
    expected, losses = reference.adapt(reference.mlp_forward(3), theta0, *task.train, 3, 0.3, first_order=first_order)
    assert list(adapted.params) == list(expected)
    for n in expected:
        torch.testing.assert_close(adapted.params[n], expected[n], rtol=0, atol=1e-13)
    torch.testing.assert_close(adapted.losses, torch.stack(losses), rtol=0, atol=1e-13)
    # θK stays differentiable w.r.t. ω (the val loss can be backpropagated into the init)
    val_loss = omega.task_loss(adapted.params, *task.val)
    val_loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in omega.parameters())


def test_adapt_leaves_static_parameters_at_theta0() -> None:
    model = tiny_mlp()
    omega = MetaKnowledge(model, InnerSGD(0.3), adapt=AdaptOnly("layers.4"))
    adapted = adapt(omega, regression()[0].train, inner_steps=2)
    for n, p in model.named_parameters():
        moved = not torch.equal(adapted.params[n].detach(), p.detach())
        assert moved == n.startswith("layers.4."), n


def test_zero_steps_gives_theta0_and_empty_losses() -> None:
    model = tiny_mlp()
    adapted = adapt(maml(model, lr=0.3), regression()[0].train, inner_steps=0)
    assert adapted.losses.shape == (0,)
    assert all(torch.equal(adapted.params[n].detach(), p.detach()) for n, p in model.named_parameters())


# ---------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("batching", BATCHINGS)
def test_nan_in_one_tasks_train_inputs_names_the_task_and_step(batching: str) -> None:
    batch = regression(n_tasks=4)
    batch.train[0][2, 1, 0] = float("nan")
    omega = maml(tiny_mlp(), lr=0.3)
    with pytest.raises(NonFiniteError, match="task 2") as info:
        meta_gradient(omega, batch, inner_steps=2, batching=batching)
    assert (info.value.task, info.value.step) == (2, 0)
    assert "step 0" in str(info.value)


@pytest.mark.parametrize("batching", BATCHINGS)
def test_nan_in_one_tasks_val_inputs_names_the_task(batching: str) -> None:
    batch = regression(n_tasks=4)
    batch.val[0][1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="val loss") as info:
        meta_gradient(maml(tiny_mlp(), lr=0.3), batch, inner_steps=1, batching=batching)
    assert (info.value.task, info.value.step) == (1, None)  # a val loss belongs to no inner step
    assert "of task 1" in str(info.value) and "at inner step" not in str(info.value)
    with pytest.raises(NonFiniteError, match="val loss") as info:
        meta_loss(maml(tiny_mlp(), lr=0.3), batch, inner_steps=1, batching=batching)
    assert info.value.task == 1


def diverging_batch() -> TaskBatch:
    """Task 0 is benign; task 1's inputs are huge, so SGD with lr 0.1 blows up after a few steps."""
    batch = regression(n_tasks=2, in_features=2)
    (x_tr, y_tr), val = batch.train, batch.val
    x_tr = torch.stack([x_tr[0], x_tr[1] * 1e10])
    return TaskBatch(train=(x_tr, y_tr), val=val)


@pytest.mark.parametrize("batching", BATCHINGS)
def test_inner_loss_overflow_names_the_step(batching: str) -> None:
    model, batch, lr, steps = tiny_mlp((2, 1)), diverging_batch(), 0.1, 20
    theta0 = dict(model.named_parameters())
    forward = reference.mlp_forward(1)
    assert reference.first_nonfinite_step(forward, theta0, batch.train[0][0], batch.train[1][0], steps, lr) is None
    k = reference.first_nonfinite_step(forward, theta0, batch.train[0][1], batch.train[1][1], steps, lr)
    assert k is not None and k >= 2  # finite at first, then overflows at step k
    with pytest.raises(NonFiniteError, match=f"step {k} of task 1") as info:
        meta_gradient(maml(model, lr=lr), batch, inner_steps=steps, batching=batching)
    assert (info.value.task, info.value.step) == (1, k)


def test_adapt_raises_on_overflow_with_the_step() -> None:
    model, batch, lr = tiny_mlp((2, 1)), diverging_batch(), 0.1
    k = reference.first_nonfinite_step(reference.mlp_forward(1), dict(model.named_parameters()),
                                       batch.train[0][1], batch.train[1][1], 20, lr)
    with pytest.raises(NonFiniteError) as info:
        adapt(maml(model, lr=lr), batch[1].train, inner_steps=20)
    assert info.value.step == k


@pytest.mark.parametrize("recipe", [maml, meta_sgd])
@pytest.mark.parametrize("batching", BATCHINGS)
def test_omega_unchanged_after_a_meta_step_that_raised(batching: str, recipe) -> None:
    omega = recipe(tiny_mlp(), lr=0.3)
    outer = torch.optim.Adam(omega.parameters(), lr=0.1)
    before = snapshot(omega)
    bad = regression(n_tasks=4)
    bad.train[0][3, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError) as info:
        meta_step(omega, outer, bad, inner_steps=2, batching=batching)
    assert info.value.task == 3
    assert all(torch.equal(before[n], p) for n, p in omega.named_parameters())
    assert not outer.state  # the optimizer never stepped
    meta_step(omega, outer, regression(n_tasks=4), inner_steps=2, batching=batching)  # a clean step does move ω
    assert any(not torch.equal(before[n], p) for n, p in omega.named_parameters())


class NanGradient(nn.Module):
    """Finite outputs whose gradient w.r.t. ``weight`` is NaN (sqrt'(0) * 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.linear.weight
        return self.linear(x) + 0.0 * torch.sqrt(w - w).sum()


@pytest.mark.parametrize("batching", BATCHINGS)
def test_nonfinite_meta_gradient_raises_and_leaves_omega_unchanged(batching: str) -> None:
    omega = maml(NanGradient().to(DT), lr=0.1)
    outer = torch.optim.SGD(omega.parameters(), lr=0.1)
    before = snapshot(omega)
    batch = regression(n_tasks=2)
    assert torch.isfinite(meta_loss(omega, batch, inner_steps=0, batching=batching))  # the losses are finite
    with pytest.raises(NonFiniteError, match="meta-gradient"):
        meta_step(omega, outer, batch, inner_steps=0, batching=batching)
    assert all(torch.equal(before[n], p) for n, p in omega.named_parameters())


# ---------------------------------------------------------------- meta_step


def test_meta_step_is_one_optimizer_step_on_the_meta_gradient() -> None:
    omega, batch = maml(tiny_mlp(), lr=0.3), regression()
    expected_grads = grads_of(omega, batch, 2)
    before = snapshot(omega)
    result = meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.5), batch, inner_steps=2)
    for n, p in omega.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * expected_grads[n], rtol=0, atol=1e-14)
    norm = torch.cat([g.flatten() for g in expected_grads.values()]).norm()
    assert result["grad_norm"] == pytest.approx(float(norm), rel=1e-12)
    assert {"meta_loss", "val_metric", "inner_loss_first", "inner_loss_last", "batching"} <= result.keys()


def test_meta_step_clips_the_meta_gradient() -> None:
    omega, batch = maml(tiny_mlp(), lr=0.3), regression()
    before = snapshot(omega)
    result = meta_step(omega, torch.optim.SGD(omega.parameters(), lr=1.0), batch, inner_steps=1, clip_grad_norm=1e-3)
    moved = torch.cat([(p.detach() - before[n]).flatten() for n, p in omega.named_parameters()]).norm()
    assert result["grad_norm"] > 1e-2  # reported before clipping
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)  # torch divides by (norm + 1e-6)


def test_meta_loss_backward_equals_meta_gradient() -> None:
    omega, batch = maml(tiny_mlp(), lr=0.3), regression()
    expected = grads_of(omega, batch, 2, batching="loop")
    omega.zero_grad(set_to_none=True)
    meta_loss(omega, batch, 2, batching="vmap").backward()
    got = {n: p.grad.clone() for n, p in omega.named_parameters()}
    assert rel_diff(got, expected) <= 1e-12


# ---------------------------------------------------------------- vmap + native batch norm (see also test_vmap_norms)


def test_native_batch_norm_adapted_under_forced_vmap_second_order_is_exact() -> None:
    # once refused (torch's fused batch norm is wrong there); now routed to primitives (exact_norms)
    omega = maml(native_bn_model(), lr=0.4)
    assert omega.native_norms_adapted() == ["1"]
    batch = images()
    loop = grads_of(omega, batch, 2, batching="loop")
    assert rel_diff(grads_of(omega, batch, 2, batching="vmap"), loop) <= 1e-10
    omega.zero_grad(set_to_none=True)
    meta_loss(omega, batch, inner_steps=2, batching="vmap").backward()
    assert rel_diff({n: p.grad.clone() for n, p in omega.named_parameters()}, loop) <= 1e-10


def test_native_batch_norm_auto_picks_loop_for_a_conv_model_and_matches_a_hand_reference() -> None:
    model = native_bn_model()
    omega = maml(model, lr=0.4)
    batch = images()
    assert choose_batching(omega, torch.device("cpu")) == "loop"  # convolutional, on CPU: the faster path
    omega.zero_grad(set_to_none=True)
    stats = meta_gradient(omega, batch, inner_steps=2, batching="auto")
    assert stats.batching == "loop"
    got = {n[len("model."):]: p.grad.clone() for n, p in omega.named_parameters()}
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    expected, _ = reference.meta_gradient(reference.module_forward(model), theta0, (*batch.train, *batch.val), 2, 0.4)
    assert rel_diff(got, expected) <= 1e-12


def test_native_batch_norm_under_vmap_is_allowed_where_it_is_exact() -> None:
    # first order, or the norm's affine weights frozen in the inner loop (ANIL): measured exact
    batch = images()
    omega = maml(native_bn_model(), lr=0.4)
    loop = grads_of(omega, batch, 2, batching="loop", first_order=True)
    assert rel_diff(grads_of(omega, batch, 2, batching="vmap", first_order=True), loop) <= 1e-10
    head_only = MetaKnowledge(native_bn_model(), InnerSGD(0.4), adapt=AdaptOnly("4"))
    assert head_only.native_norms_adapted() == []
    loop = grads_of(head_only, batch, 2, batching="loop")
    assert rel_diff(grads_of(head_only, batch, 2, batching="vmap"), loop) <= 1e-10


def test_the_trap_still_exists_in_torch() -> None:
    """Documents why the interception is needed: raw torch.func, native batch norm, adapted γ/β, second order.

    If a torch release fixes it, this test skips (with that message) rather than fails:
    `metalearn.exact_norms` (which costs a little time under vmap) may then be dropped for it.
    """
    model = native_bn_model()
    names = [n for n, _ in model.named_parameters()]
    batch = images()
    x_tr, y_tr, x_val, y_val = (*batch.train, *batch.val)

    def loss(ps: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(model, dict(zip(names, ps, strict=True)), (x,)), y)

    def task(ps: tuple[Tensor, ...], xt: Tensor, yt: Tensor, xv: Tensor, yv: Tensor) -> Tensor:
        g = grad(loss)(ps, xt, yt)
        return loss(tuple(p - 0.4 * gi for p, gi in zip(ps, g, strict=True)), xv, yv)

    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    looped = torch.autograd.grad(sum(task(params, x_tr[i], y_tr[i], x_val[i], y_val[i]) for i in range(2)), params)
    batched = torch.autograd.grad(vmap(task, in_dims=(None, 0, 0, 0, 0))(params, x_tr, y_tr, x_val, y_val).sum(),
                                  params)
    scale = max(float(g.abs().max()) for g in looped)
    error = max(float((a - b).abs().max()) for a, b in zip(looped, batched, strict=True)) / scale
    if error <= 1e-6:
        pytest.skip(f"torch {torch.__version__} computes native batch norm under vmap correctly now "
                    f"(relative error {error:.1e}); metalearn.exact_norms may be dropped for it")
    assert error > 1e-6


def test_running_statistics_batch_norm_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        maml(model, lr=0.1)


def test_choose_batching_on_cpu() -> None:
    assert choose_batching(maml(tiny_mlp(), lr=0.1), torch.device("cpu")) == "vmap"
    conv = maml(Conv4(3, hidden=4, image_size=16).to(DT), lr=0.1)
    assert choose_batching(conv, torch.device("cpu")) == "loop"
    with pytest.raises(ValueError, match="batching must be one of"):
        meta_gradient(conv, images(size=16), inner_steps=1, batching="threads")


def _old_steps_calls(omega: MetaKnowledge, batch: TaskBatch) -> dict:
    """Each public function that takes an inner step count, called with the old keyword ``steps=``."""
    from metalearn.evaluate import evaluate, fine_tune
    from metalearn.inner import adapt_params, inner_loop

    train = batch[0].train
    theta0 = omega.model_params()
    outer = torch.optim.SGD(omega.parameters(), lr=0.1)
    return {
        "adapt": lambda: adapt(omega, train, steps=1),
        "fine_tune": lambda: fine_tune(omega, train, steps=1),
        "evaluate": lambda: evaluate(omega, [batch[0]], steps=1),
        "adapt_params": lambda: adapt_params(omega, theta0, *train, steps=1),
        "inner_loop": lambda: inner_loop(omega, theta0, *train, steps=1),
        "meta_gradient": lambda: meta_gradient(omega, batch, steps=1),
        "meta_loss": lambda: meta_loss(omega, batch, steps=1),
        "meta_step": lambda: meta_step(omega, outer, batch, steps=1),
    }


@pytest.mark.parametrize(
    "name", ["adapt", "fine_tune", "evaluate", "adapt_params", "inner_loop", "meta_gradient", "meta_loss", "meta_step"]
)
def test_old_steps_keyword_names_inner_steps(name: str) -> None:
    # the inner count was renamed inner_steps (steps= is meta_train's outer count): the old keyword says the fix
    omega = maml(tiny_mlp(), lr=0.3)
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    call = _old_steps_calls(omega, regression(n_tasks=2))[name]
    with pytest.raises(TypeError, match=rf"{name}\(\) takes inner_steps=, not steps=.*inner_steps=1"):
        call()
    assert all(torch.equal(p, before[n]) for n, p in omega.named_parameters())  # refused before any work
    assert all(p.grad is None for p in omega.parameters())


def test_inner_steps_positional_and_keyword_agree() -> None:
    omega = maml(tiny_mlp(), lr=0.3)
    task = regression(n_tasks=1)[0]
    by_position = adapt(omega, task.train, 2).params
    by_keyword = adapt(omega, task.train, inner_steps=2).params
    assert all(torch.equal(by_position[n], by_keyword[n]) for n in by_position)
    assert not torch.equal(by_position["layers.0.weight"], omega.model_params()["layers.0.weight"])
