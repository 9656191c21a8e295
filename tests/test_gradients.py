"""Meta-gradient modes (`metalearn.modes`): iMAML, Reptile and checkpointed second order.

Each is checked against a computation that shares none of its code: iMAML against the exact
meta-gradient through a closed-form inner solution, Reptile against its definition written
out by hand, checkpointing against the plain unrolled meta-gradient (float64).
"""

from __future__ import annotations

import pytest
import reference
import torch
from torch import Tensor, nn

from metalearn.errors import CheckpointMismatchError
from metalearn.inner import Proximal, inner_loop
from metalearn.knowledge import MetaKnowledge, anil, maml, meta_sgd
from metalearn.knowledge.optimizers import MomentumSGD
from metalearn.models import MLP, Conv4
from metalearn.modes import Checkpointed, Implicit, Reptile, conjugate_gradient, resolve_mode
from metalearn.outer import meta_gradient, meta_step
from metalearn.tasks import Task, TaskBatch
from metalearn.train import meta_train

DT = torch.float64


def seeded(model_fn, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_fn().to(DT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
    return model


def tiny_mlp(seed: int = 0) -> MLP:
    return seeded(lambda: MLP((1, 8, 8, 1), activation=nn.Tanh), seed)


def tiny_conv4(seed: int = 0) -> Conv4:
    return seeded(lambda: Conv4(3, in_channels=1, hidden=4, image_size=16), seed)


def regression(n_tasks: int = 3, seed: int = 1) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(n_tasks, 5, 7, 1, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def images(n_tasks: int = 2, seed: int = 2) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.image_batch(n_tasks, 3, 1, 2, 1, 16, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def grads_of(omega: MetaKnowledge, batch: TaskBatch, steps: int, **kwargs) -> dict[str, Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, **kwargs)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in omega.named_parameters()}


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def scale(a: dict[str, Tensor]) -> float:
    return max(float(t.abs().max()) for t in a.values())


# ---------------------------------------------------------------- iMAML


def linear_regression(n_tasks: int = 2, dim: int = 3, n_train: int = 10, n_val: int = 8) -> TaskBatch:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n_tasks, dim, 1, generator=g, dtype=DT)

    def half(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n_tasks, n, dim, generator=g, dtype=DT)
        return x, x @ w + 0.3 + 0.1 * torch.randn(n_tasks, n, 1, generator=g, dtype=DT)

    return TaskBatch(train=half(n_train), val=half(n_val))


def exact_implicit_meta_gradient(weight: Tensor, bias: Tensor, batch: TaskBatch, lam: float) -> Tensor:
    r"""∇θ0 of mean_i L_val(φ*_i(θ0)), with φ* = argmin (1/n)||Zφ − y||² + λ/2||φ − θ0||² in closed form:
    φ* = (H + λI)^{-1}((2/n) Zᵀy + λθ0), H = (2/n) ZᵀZ, Z = [X, 1]; autograd through the solve."""
    theta0 = torch.cat([weight.detach().reshape(-1), bias.detach()]).requires_grad_()
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    total = theta0.new_zeros(())
    for i in range(len(batch)):
        z = torch.cat([x_tr[i], torch.ones_like(x_tr[i][:, :1])], dim=1)
        n = z.shape[0]
        h = 2.0 / n * z.T @ z
        rhs = 2.0 / n * z.T @ y_tr[i][:, 0] + lam * theta0
        phi = torch.linalg.solve(h + lam * torch.eye(len(theta0), dtype=DT), rhs)
        zv = torch.cat([x_val[i], torch.ones_like(x_val[i][:, :1])], dim=1)
        total = total + (zv @ phi - y_val[i][:, 0]).square().mean()
    (grad,) = torch.autograd.grad(total / len(batch), theta0)
    return grad


def test_implicit_meta_gradient_equals_exact_one_through_closed_form_inner_solution() -> None:
    model = seeded(lambda: MLP((3, 1)), 0)
    omega = maml(model, lr=0.1)
    batch = linear_regression()
    lam = 2.0
    got = grads_of(omega, batch, 300, mode=Implicit(lam=lam, cg_steps=20, cg_tol=1e-15))
    got_flat = torch.cat([got["model.layers.0.weight"].reshape(-1), got["model.layers.0.bias"]])
    exact = exact_implicit_meta_gradient(model.layers[0].weight, model.layers[0].bias, batch, lam)
    assert float((got_flat - exact).abs().max()) <= 1e-10 * float(exact.abs().max())
    # the implicit correction matters here: one CG step (≈ first order, up to scale) is far off
    rough = grads_of(omega, batch, 300, mode=Implicit(lam=lam, cg_steps=1))
    rough_flat = torch.cat([rough["model.layers.0.weight"].reshape(-1), rough["model.layers.0.bias"]])
    assert float((rough_flat - exact).abs().max()) > 1e-3 * float(exact.abs().max())


def test_implicit_cg_solution_equals_dense_solve_on_nonlinear_model() -> None:
    """On a tanh MLP (non-quadratic): the CG/HVP solve equals (I + H/(λ+δ))^{-1} ∇L_val with H built densely."""
    omega = maml(tiny_mlp(), lr=0.05)
    batch = regression(n_tasks=1)
    lam, steps, damping = 1.5, 4, 0.3
    got = grads_of(omega, batch, steps, mode=Implicit(lam=lam, cg_steps=200, damping=damping, cg_tol=1e-14))
    names = list(omega.model_params())
    anchor = {k: t.detach() for k, t in omega.model_params().items()}
    phi, _ = inner_loop(
        omega, anchor, batch.train[0][0], batch.train[1][0], steps, graph="none", regulariser=Proximal(lam, anchor)
    )
    shapes = [phi[k].shape for k in names]
    flat = torch.cat([phi[k].reshape(-1) for k in names])

    def unflat(v: Tensor) -> dict[str, Tensor]:
        parts = torch.split(v, [s.numel() for s in shapes])
        return {k: t.reshape(s) for k, t, s in zip(names, parts, shapes, strict=True)}

    def train_loss(v: Tensor) -> Tensor:
        return reference.task_loss(omega(unflat(v), batch.train[0][0]), batch.train[1][0])

    def val_loss(v: Tensor) -> Tensor:
        return reference.task_loss(omega(unflat(v), batch.val[0][0]), batch.val[1][0])

    hessian = torch.autograd.functional.hessian(train_loss, flat)
    rhs = torch.autograd.functional.jacobian(val_loss, flat)
    eye = torch.eye(len(flat), dtype=DT)
    exact = torch.linalg.solve(eye + hessian / (lam + damping), rhs)
    got_flat = torch.cat([got[f"model.{k}"].reshape(-1) for k in names])
    assert float((got_flat - exact).abs().max()) <= 1e-9 * float(exact.abs().max())


def test_conjugate_gradient_solves_spd_system() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=DT)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=DT)
    b = torch.randn(6, generator=g, dtype=DT)
    (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], 50, 1e-14)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-10)


def test_conjugate_gradient_stops_at_negative_curvature() -> None:
    """On an indefinite A, CG returns its iterate before the first direction with pᵀAp ≤ 0."""
    a = torch.diag(torch.tensor([1.0, 2.0, -3.0], dtype=DT))
    b = torch.tensor([1.0, 0.0, 0.0], dtype=DT)  # the first direction (b) has positive curvature...
    (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], 10)
    assert torch.allclose(x, torch.tensor([1.0, 0.0, 0.0], dtype=DT))  # ... and solves it in one step
    b = torch.tensor([1.0, 1.0, 1.0], dtype=DT)  # bᵀAb = 0: no step is defined, rhs comes back
    (x,) = conjugate_gradient(lambda v: [a @ v[0]], [b], 10)
    assert torch.equal(x, b)
    b = torch.tensor([2.0, 1.0, 1.0], dtype=DT)  # bᵀAb = 3 > 0, then the next direction has pᵀAp < 0
    calls = []

    def matvec(v: list[Tensor]) -> list[Tensor]:
        calls.append(v[0].clone())
        return [a @ v[0]]

    (x,) = conjugate_gradient(matvec, [b], 10)
    assert len(calls) == 2 and float(calls[1] @ a @ calls[1]) < 0
    step = float(b @ b) / float(b @ a @ b)
    assert torch.allclose(x, step * b)  # the first CG iterate, not a step along the bad direction
    assert torch.isfinite(x).all()


def test_implicit_damping_interpolates_to_first_order() -> None:
    """δ → ∞ gives ∇L_val at φ, unscaled (first order at the proximal solution)."""
    omega = maml(tiny_mlp(), lr=0.05)
    batch = regression(n_tasks=1)
    lam, steps = 1.5, 4
    anchor = {k: t.detach() for k, t in omega.model_params().items()}
    phi, _ = inner_loop(
        omega, anchor, batch.train[0][0], batch.train[1][0], steps, graph="none", regulariser=Proximal(lam, anchor)
    )
    leaves = {k: t.detach().requires_grad_() for k, t in phi.items()}
    val = reference.task_loss(omega(leaves, batch.val[0][0]), batch.val[1][0])
    direct = dict(zip(leaves, torch.autograd.grad(val, list(leaves.values())), strict=True))
    damped = grads_of(omega, batch, steps, mode=Implicit(lam=lam, cg_steps=50, damping=1e12, cg_tol=1e-14))
    for k, g in direct.items():
        assert torch.allclose(damped[f"model.{k}"], g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["implicit", "reptile"])
def test_modes_for_theta0_refuse_other_meta_parameters(mode: str) -> None:
    with pytest.raises(ValueError, match="Meta-SGD"):
        meta_gradient(meta_sgd(tiny_mlp(), 0.1), regression(), 1, mode=mode)


def test_implicit_refuses_parameters_that_do_not_adapt() -> None:
    omega = anil(tiny_mlp(), 0.1, head="layers.4")
    with pytest.raises(ValueError, match="AdaptAll"):
        meta_gradient(omega, regression(), 1, mode="implicit")


def test_mode_argument_errors() -> None:
    omega = maml(tiny_mlp(), 0.1)
    with pytest.raises(ValueError, match="first_order=True"):
        meta_gradient(omega, regression(), 1, first_order=True, mode="reptile")
    with pytest.raises(ValueError, match="batching='loop'"):
        meta_gradient(omega, regression(), 1, batching="vmap", mode="implicit")
    with pytest.raises(ValueError, match="mode must be one of"):
        meta_gradient(omega, regression(), 1, mode="imaml")
    with pytest.raises(ValueError, match="lam"):
        Implicit(lam=0.0)
    with pytest.raises(TypeError, match="Checkpointed"):
        resolve_mode(object())  # type: ignore[arg-type]
    assert resolve_mode("first_order").config() == {"name": "unrolled", "first_order": True}
    assert resolve_mode("unrolled", first_order=True) == resolve_mode("first_order")


# ---------------------------------------------------------------- Reptile


def reptile_by_hand(model: MLP, batch: TaskBatch, steps: int, lr: float) -> tuple[dict[str, Tensor], dict]:
    """mean_i(θ0 − φ_K^{(i)}) and mean_i φ_K^{(i)}, with φ from plain SGD on each task's train half."""
    forward = reference.mlp_forward(3, torch.tanh)
    theta0 = {n: p.detach() for n, p in model.named_parameters()}
    (x_tr, y_tr) = batch.train
    direction = {n: torch.zeros_like(t) for n, t in theta0.items()}
    mean_phi = {n: torch.zeros_like(t) for n, t in theta0.items()}
    for i in range(len(batch)):
        phi = {n: t.clone().requires_grad_() for n, t in theta0.items()}
        for _ in range(steps):
            grads = torch.autograd.grad(reference.task_loss(forward(phi, x_tr[i]), y_tr[i]), list(phi.values()))
            phi = {n: (t - lr * g).detach().requires_grad_() for (n, t), g in zip(phi.items(), grads, strict=True)}
        for n in theta0:
            direction[n] += (theta0[n] - phi[n].detach()) / len(batch)
            mean_phi[n] += phi[n].detach() / len(batch)
    return direction, mean_phi


def test_reptile_gradient_equals_its_definition_and_sgd_lr1_lands_on_mean_adapted_weights() -> None:
    model = tiny_mlp()
    omega = maml(model, lr=0.05)
    batch = regression()
    direction, mean_phi = reptile_by_hand(model, batch, 3, 0.05)
    got = grads_of(omega, batch, 3, mode="reptile")
    assert max_diff(got, {f"model.{k}": v for k, v in direction.items()}) <= 1e-14
    assert scale(got) > 1e-3

    stats = meta_step(omega, torch.optim.SGD(omega.parameters(), lr=1.0), batch, 3, mode=Reptile())
    assert stats["batching"] == "loop"
    for n, p in model.named_parameters():
        assert torch.allclose(p, mean_phi[n], rtol=0, atol=1e-14)


def test_reptile_gives_zero_gradient_to_parameters_that_do_not_adapt() -> None:
    omega = anil(tiny_mlp(), 0.1, head="layers.4")
    got = grads_of(omega, regression(), 2, mode="reptile")
    assert all(float(got[k].abs().max()) == 0 for k in got if not k.startswith("model.layers.4"))
    assert float(got["model.layers.4.weight"].abs().max()) > 0


# ---------------------------------------------------------------- checkpointed second order


def momentum_maml(model: nn.Module) -> MetaKnowledge:
    return MetaKnowledge(model, optimizer=MomentumSGD(0.05, momentum=0.5))


@pytest.mark.parametrize("segment", [1, 2])
@pytest.mark.parametrize(
    ("recipe", "make"),
    [
        (lambda m: maml(m, 0.1), tiny_mlp),
        (lambda m: meta_sgd(m, 0.1), tiny_mlp),
        (momentum_maml, tiny_mlp),
        (lambda m: anil(m, 0.1, head="layers.4"), tiny_mlp),
        (lambda m: maml(m, 0.1), tiny_conv4),
    ],
    ids=["maml-mlp", "metasgd-mlp", "momentum-mlp", "anil-mlp", "maml-conv4"],
)
def test_checkpointed_equals_unrolled_second_order(recipe, make, segment: int) -> None:
    batch = images() if make is tiny_conv4 else regression()
    plain = grads_of(recipe(make()), batch, 3, batching="loop")
    omega = recipe(make())
    checked = grads_of(omega, batch, 3, mode=Checkpointed(segment=segment))
    assert max_diff(plain, checked) <= 1e-10 * scale(plain)
    assert scale(plain) > 1e-4
    # not first order in disguise
    fo = grads_of(recipe(make()), batch, 3, batching="loop", first_order=True)
    assert max_diff(plain, fo) > 1e-6 * scale(plain)


def test_meta_step_with_checkpointed_mode_reports_same_losses() -> None:
    batch = regression()
    a, b = maml(tiny_mlp(), 0.1), maml(tiny_mlp(), 0.1)
    sa = meta_step(a, torch.optim.SGD(a.parameters(), lr=0.1), batch, 2, batching="loop")
    sb = meta_step(b, torch.optim.SGD(b.parameters(), lr=0.1), batch, 2, mode="checkpointed")
    for key in ("meta_loss", "val_metric", "inner_loss_first", "inner_loss_last", "grad_norm"):
        assert sa[key] == pytest.approx(sb[key], rel=1e-12)


# ---------------------------------------------------------------- meta_train


def test_meta_train_passes_mode_and_records_it_in_run_identity(tmp_path) -> None:
    batch = regression(n_tasks=4)
    tasks = [
        Task(train=(batch.train[0][i], batch.train[1][i]), val=(batch.val[0][i], batch.val[1][i])) for i in range(4)
    ]
    omega = maml(tiny_mlp(), 0.05)
    before = [p.detach().clone() for p in omega.parameters()]
    kwargs = dict(inner_steps=2, meta_batch_size=2, progress=False, checkpoint_dir=tmp_path / "ck")
    meta_train(omega, tasks, torch.optim.SGD(omega.parameters(), lr=1.0), steps=1, mode="reptile", **kwargs)
    # one Reptile step with SGD(lr=1): ω is the mean of the adapted weights of the first meta-batch
    first = TaskBatch(train=(batch.train[0][:2], batch.train[1][:2]), val=(batch.val[0][:2], batch.val[1][:2]))
    fresh = tiny_mlp()
    _, mean_phi = reptile_by_hand(fresh, first, 2, 0.05)
    for (n, p), b in zip(omega.model.named_parameters(), before, strict=True):
        assert torch.allclose(p, mean_phi[n], atol=1e-14) and not torch.equal(p, b)
    other = maml(tiny_mlp(), 0.05)
    with pytest.raises(CheckpointMismatchError):
        meta_train(other, tasks, torch.optim.SGD(other.parameters(), lr=1.0), steps=2, mode="implicit", **kwargs)


def test_implicit_warns_when_the_proximal_problem_is_not_solved() -> None:
    """The implicit meta-gradient is exact only at the proximal minimiser: a far-off φ is reported."""
    import warnings

    omega = maml(seeded(lambda: MLP((3, 1)), 0), lr=0.1)
    batch = linear_regression()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # solved (300 steps): silent
        grads_of(omega, batch, 300, mode=Implicit(lam=2.0, cg_steps=20))
    with pytest.warns(RuntimeWarning, match="proximal inner problem is far from solved"):
        grads_of(omega, batch, 1, mode=Implicit(lam=2.0, cg_steps=20))


def test_implicit_warns_once_per_meta_batch_not_per_task() -> None:
    """Many tasks far from solved give one warning for the batch (with the worst ratio)."""
    import warnings

    omega = maml(seeded(lambda: MLP((3, 1)), 0), lr=0.1)
    batch = linear_regression(n_tasks=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grads_of(omega, batch, 1, mode=Implicit(lam=2.0, cg_steps=20))
    unsolved = [w for w in caught if "far from solved" in str(w.message)]
    assert len(unsolved) == 1 and "up to " in str(unsolved[0].message)


def test_conjugate_gradient_lets_nan_through() -> None:
    """A NaN Hessian-vector product is not mistaken for negative curvature: it reaches the result,
    where the meta-gradient's finiteness check reports it (never a silently finite gradient)."""
    b = torch.tensor([1.0, 2.0], dtype=DT)
    (x,) = conjugate_gradient(lambda v: [torch.full_like(v[0], float("nan"))], [b], 3)
    assert torch.isnan(x).all()
