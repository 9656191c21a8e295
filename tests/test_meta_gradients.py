"""Float64 meta-gradients: finite differences, a hand-written reference, first order, vmap == loop.

Gradients are compared with a tolerance relative to the largest entry of the whole
meta-gradient, not per tensor: a conv bias right before batch norm has an exactly-zero
meta-gradient, where any relative error is meaningless.
"""

from __future__ import annotations

import pytest
import reference
import torch
from torch import Tensor, nn

from metalearn.knowledge import MetaKnowledge, anil, maml, meta_sgd
from metalearn.models import MLP, Conv4
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks import TaskBatch

DT = torch.float64


def jitter(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Moves every parameter off its default value (batch norm γ=1, β=0 are too special)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tiny_mlp(seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return jitter(MLP((1, 8, 8, 1), activation=nn.Tanh).to(DT), seed)


def tiny_conv4(seed: int = 0, size: int = 16, ways: int = 3) -> Conv4:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return jitter(Conv4(ways, in_channels=1, hidden=4, image_size=size).to(DT), seed)


def regression(n_tasks: int = 3, seed: int = 1) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(n_tasks, 5, 7, 1, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def images(n_tasks: int = 2, size: int = 16, seed: int = 2) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.image_batch(n_tasks, 3, 1, 2, 1, size, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def as_tuple(batch: TaskBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (*batch.train, *batch.val)


def library_gradient(omega: MetaKnowledge, batch: TaskBatch, steps: int, **kwargs) -> dict[str, Tensor]:
    """ω's meta-gradient by name (zeros where a parameter got none)."""
    omega.zero_grad(set_to_none=True)
    stats = meta_gradient(omega, batch, steps, **kwargs)
    if "batching" in kwargs and kwargs["batching"] != "auto":
        assert stats.batching == kwargs["batching"]
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in omega.named_parameters()}


def max_abs(grads: dict[str, Tensor]) -> float:
    return max(float(g.abs().max()) for g in grads.values())


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def split_reference_names(omega: MetaKnowledge, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Library names (model.x, optimizer.lrs.x:y) -> reference names (x, lr:x.y)."""
    out = {}
    for name, g in grads.items():
        if name.startswith("model."):
            out[name[len("model."):]] = g
        elif name.startswith("optimizer.lrs."):
            out["lr:" + name[len("optimizer.lrs."):].replace(":", ".")] = g
        else:
            raise AssertionError(f"unexpected meta-parameter {name}")
    return out


# ---------------------------------------------------------------- cases


def case(name: str) -> tuple[MetaKnowledge, TaskBatch, int]:
    if name == "maml-1":
        return maml(tiny_mlp(), lr=0.3), regression(), 1
    if name == "maml-3":
        return maml(tiny_mlp(), lr=0.3), regression(), 3
    if name == "meta-sgd":
        omega = meta_sgd(tiny_mlp(), lr=0.3)
        jitter(omega.optimizer, seed=5, scale=0.05)  # step sizes that differ per entry
        return omega, regression(), 2
    if name == "anil":
        return anil(tiny_conv4(), lr=0.4), images(), 2
    if name == "maml-conv4":
        return maml(tiny_conv4(), lr=0.2), images(), 2
    raise KeyError(name)


CASES = ["maml-1", "maml-3", "meta-sgd", "anil"]


# ---------------------------------------------------------------- finite differences


def central_difference(omega: MetaKnowledge, batch: TaskBatch, steps: int, p: Tensor, j: int, eps: float) -> float:
    flat = p.detach().view(-1)
    original = float(flat[j])
    values = []
    for shift in (eps, -eps):
        with torch.no_grad():
            flat[j] = original + shift
        values.append(float(meta_loss(omega, batch, steps, batching="loop").detach()))
    with torch.no_grad():
        flat[j] = original
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("name", CASES)
def test_meta_gradient_matches_central_finite_differences(name: str, batching: str) -> None:
    omega, batch, steps = case(name)
    grads = library_gradient(omega, batch, steps, batching=batching)
    g = torch.Generator().manual_seed(0)
    worst, checked = 0.0, []
    for pname, p in omega.named_parameters():
        for j in torch.randperm(p.numel(), generator=g)[:2].tolist():
            fd = central_difference(omega, batch, steps, p, j, eps=1e-6)
            worst = max(worst, abs(fd - float(grads[pname].view(-1)[j])))
            checked.append(pname)
    scale = max_abs(grads)
    assert scale > 1e-3
    assert worst <= 1e-8 * scale, f"{name}/{batching}: |fd - meta_gradient| = {worst:.2e} (scale {scale:.2e})"
    assert set(checked) == {n for n, _ in omega.named_parameters()}
    if name == "meta-sgd":  # the step sizes are meta-parameters and get a real meta-gradient
        lrs = [n for n in grads if n.startswith("optimizer.lrs.")]
        assert lrs and all(float(grads[n].abs().max()) > 0 for n in lrs)
    if name == "anil":  # the body is not adapted but is meta-learned: it gets a meta-gradient, the head too
        assert omega.adapted_names == ["head.weight", "head.bias"]
        assert float(grads["model.features.0.weight"].abs().max()) > 0
        assert float(grads["model.head.weight"].abs().max()) > 0


# ---------------------------------------------------------------- the hand-written reference


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("name", [*CASES, "maml-conv4"])
def test_meta_gradient_equals_hand_written_unrolled_reference(name: str, batching: str) -> None:
    omega, batch, steps = case(name)
    model = omega.model
    forward = reference.conv4_forward() if isinstance(model, Conv4) else reference.mlp_forward(3, torch.tanh)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    if name == "meta-sgd":
        lr = {n: omega.optimizer.lrs[n.replace(".", ":")].detach() for n in theta0}
    else:
        lr = omega.optimizer.lr
    adapted = omega.adapted_names if name == "anil" else None
    ref_theta, ref_lr = reference.meta_gradient(forward, theta0, as_tuple(batch), steps, lr, adapted)
    expected = {**ref_theta, **{f"lr:{n}": g for n, g in ref_lr.items()}}
    got = split_reference_names(omega, library_gradient(omega, batch, steps, batching=batching))
    assert max_diff(got, expected) <= 1e-12 * max_abs(expected)
    # the objective itself agrees too
    value = float(meta_loss(omega, batch, steps, batching=batching).detach())
    leaves = {n: t.clone().requires_grad_(True) for n, t in theta0.items()}
    expected_value = float(reference.meta_loss(forward, leaves, as_tuple(batch), steps, lr, adapted).detach())
    assert value == pytest.approx(expected_value, rel=1e-13)


# ---------------------------------------------------------------- first order


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("method", ["fomaml", "meta-sgd"])
def test_first_order_meta_gradient_equals_its_definition(method: str, batching: str) -> None:
    omega = maml(tiny_mlp(), lr=0.3) if method == "fomaml" else jitter(meta_sgd(tiny_mlp(), lr=0.3), 7, 0.05)
    batch, steps = regression(n_tasks=3), 3
    theta0 = {n: p.detach() for n, p in omega.model.named_parameters()}
    if method == "fomaml":
        lr = omega.optimizer.lr
    else:
        lr = {n: omega.optimizer.lrs[n.replace(".", ":")].detach() for n in theta0}
    d_theta, d_lr = reference.first_order_definition(reference.mlp_forward(3, torch.tanh), theta0, as_tuple(batch),
                                                     steps, lr)
    expected = {**d_theta, **{f"lr:{n}": g for n, g in d_lr.items()}}
    got = split_reference_names(omega, library_gradient(omega, batch, steps, first_order=True, batching=batching))
    assert max_diff(got, expected) <= 1e-12 * max_abs(expected)
    if method == "meta-sgd":
        assert max_abs(d_lr) > 0
    # and the first-order gradient is not the second-order one (the test can tell them apart)
    second = split_reference_names(omega, library_gradient(omega, batch, steps, batching=batching))
    assert max_diff(second, expected) > 1e-6 * max_abs(expected)


# ---------------------------------------------------------------- vmap == loop


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("recipe", [maml, meta_sgd])
def test_vmap_equals_loop_on_conv4_with_adapted_batch_norm(recipe, steps: int) -> None:
    omega = recipe(tiny_conv4(size=28), lr=0.2)
    assert any(n.startswith("features.1.") for n in omega.adapted_names)  # batch norm γ, β adapt
    batch = images(n_tasks=3, size=28)
    loop = library_gradient(omega, batch, steps, batching="loop")
    vmapped = library_gradient(omega, batch, steps, batching="vmap")
    scale = max_abs(loop)
    assert scale > 1e-3
    assert max_diff(vmapped, loop) <= 1e-10 * scale
