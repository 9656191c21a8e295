"""Meta-gradient modes as strategies (`metalearn.modes`) and the one inner loop (`metalearn.inner.inner_loop`).

`Truncated(k)` is checked against the modes it must equal exactly at its ends (k = K: `Unrolled`;
k = 0: first order), and for 0 < k < K against a hand-written float64 reference and central finite
differences of the k-step objective it is the gradient of (with SGD: ∇ w.r.t. θ_{K−k}). The rest
checks the interface a mode of one's own relies on: batchings refused before any work, the inner
problem meta-test solves.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import reference
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.evaluate import evaluate, fine_tune
from metalearn.inner import InnerProblem, Proximal, adapt_params, inner_loop
from metalearn.knowledge import MetaKnowledge, maml, meta_sgd
from metalearn.mapping import map_tasks
from metalearn.models import MLP
from metalearn.modes import Implicit, MetaGradientMode, Reptile, Truncated, Unrolled, resolve_mode
from metalearn.outer import meta_gradient, meta_step
from metalearn.tasks import Sinusoid, TaskBatch

DT = torch.float64
LR = 0.3


def tiny_mlp(seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP((1, 6, 6, 1), activation=nn.Tanh).to(DT)


def regression(n_tasks: int = 3, seed: int = 1) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(n_tasks, 5, 7, 1, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def grads_of(omega: MetaKnowledge, batch: TaskBatch, steps: int, **kwargs) -> dict[str, Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, **kwargs)
    return {n: p.grad.clone() for n, p in omega.named_parameters()}


def assert_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("recipe", [maml, meta_sgd])
def test_truncated_at_its_ends_is_unrolled_and_first_order_exactly(batching: str, recipe, monkeypatch) -> None:
    # bit for bit against torch.func's vmap (Unrolled's task-batched path rounds otherwise: test_task_batched.py)
    monkeypatch.setattr("metalearn.modes.unrolled.runs_task_batched", lambda *args: False)
    omega, batch, steps = recipe(tiny_mlp(), LR).to(DT), regression(), 3
    unrolled = grads_of(omega, batch, steps, batching=batching)
    first_order = grads_of(omega, batch, steps, batching=batching, mode="first_order")
    assert_equal(grads_of(omega, batch, steps, batching=batching, mode=Truncated(k=steps)), unrolled)
    assert_equal(grads_of(omega, batch, steps, batching=batching, mode=Truncated(k=steps + 2)), unrolled)
    assert_equal(grads_of(omega, batch, steps, batching=batching, mode=Truncated(k=0)), first_order)
    middle = grads_of(omega, batch, steps, batching=batching, mode=Truncated(k=1))
    assert max(float((middle[n] - unrolled[n]).abs().max()) for n in middle) > 1e-6  # the check can fail
    assert max(float((middle[n] - first_order[n]).abs().max()) for n in middle) > 1e-6


def truncated_by_hand(model: nn.Module, batch: TaskBatch, steps: int, k: int) -> dict[str, Tensor]:
    """SGD written out: steps j < K − k take the gradient at a detached θ_j (a constant), the last k
    are differentiated through; the mean val MSE is backpropagated to θ0."""
    theta0 = dict(model.named_parameters())
    total = 0.0
    for i in range(len(batch)):
        theta = dict(theta0)
        for j in range(steps):
            second = j >= steps - k
            at = theta if second else {n: t.detach().requires_grad_() for n, t in theta.items()}
            loss = (functional_call(model, at, (batch.train[0][i],)) - batch.train[1][i]).square().mean()
            grads = torch.autograd.grad(loss, list(at.values()), create_graph=second)
            theta = {n: t - LR * g for (n, t), g in zip(theta.items(), grads, strict=True)}
        total = total + (functional_call(model, theta, (batch.val[0][i],)) - batch.val[1][i]).square().mean()
    grads = torch.autograd.grad(total / len(batch), list(theta0.values()))
    return dict(zip(theta0, grads, strict=True))


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_truncated_equals_a_hand_written_reference(batching: str) -> None:
    model, batch, steps = tiny_mlp(), regression(), 4
    want = truncated_by_hand(model, batch, steps, k=2)
    got = grads_of(maml(model, LR).to(DT), batch, steps, batching=batching, mode=Truncated(k=2))
    for n in want:
        assert torch.allclose(got[f"model.{n}"], want[n], rtol=1e-10, atol=1e-13), n


def test_truncated_equals_finite_differences_of_the_last_k_steps() -> None:
    """With SGD (identity Jacobian through the first-order steps), Truncated(k)'s gradient w.r.t. θ0
    is ∇ of L_val(k steps from θ') at θ' = θ_{K−k}: central differences of that objective."""
    omega, batch, steps, k = maml(tiny_mlp(), LR).to(DT), regression(n_tasks=1), 3, 2
    got = grads_of(omega, batch, steps, batching="loop", mode=Truncated(k=k))
    theta0 = {n: p.detach() for n, p in omega.model_params().items()}
    start, _ = adapt_params(omega, theta0, batch.train[0][0], batch.train[1][0], steps - k, first_order=True)
    shifted = copy.deepcopy(omega)
    with torch.no_grad():
        for n, p in shifted.model_params().items():
            p.copy_(start[n])

    def objective() -> float:
        params, _ = adapt_params(shifted, shifted.model_params(), batch.train[0][0], batch.train[1][0], k)
        return float((shifted(params, batch.val[0][0]) - batch.val[1][0]).square().mean().detach())

    h = 1e-6
    params = shifted.model_params()
    for name in ("layers.0.weight", "layers.2.weight"):
        flat = params[name].data.view(-1)
        for i in range(2):
            orig = flat[i].item()
            flat[i] = orig + h
            up = objective()
            flat[i] = orig - h
            down = objective()
            flat[i] = orig
            fd = (up - down) / (2 * h)
            an = got[f"model.{name}"].reshape(-1)[i].item()
            assert abs(an) > 1e-8 and abs(fd - an) <= 1e-9 + 1e-6 * abs(an), (name, i, an, fd)


def test_truncated_refuses_a_bad_k() -> None:
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="Truncated"):
            Truncated(k=bad)  # type: ignore[arg-type]
    assert Truncated(k=3).config() == {"name": "truncated", "k": 3}
    assert Truncated().batchings == ("loop", "vmap")


@dataclass(frozen=True)
class Frozen(MetaGradientMode):
    """A mode of one's own: the val losses without any meta-gradient (a loop over tasks)."""

    name = "frozen"

    def accumulate(self, omega, batch, steps, batching, generator):
        def one_task(x_tr, y_tr, x_val, y_val):
            with torch.no_grad():
                params, losses = adapt_params(omega, omega.model_params(), x_tr, y_tr, steps, first_order=True)
                return omega.task_loss(params, x_val, y_val), torch.zeros(()), losses

        return map_tasks(one_task, (0, 0, 0, 0), *batch.train, *batch.val, batching=batching)


def test_a_mode_of_ones_own_runs_through_meta_step_and_refuses_vmap_before_any_work() -> None:
    omega, batch = maml(tiny_mlp(), LR).to(DT), regression()
    assert resolve_mode(Frozen()) == Frozen()
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    with pytest.raises(ValueError, match="mode='frozen' runs as a loop over tasks"):
        meta_step(omega, torch.optim.SGD(omega.parameters(), 0.1), batch, 2, mode=Frozen(), batching="vmap")
    stats = meta_step(omega, torch.optim.SGD(omega.parameters(), 0.1), batch, 2, mode=Frozen())
    assert stats["batching"] == "loop" and stats["grad_norm"] == 0.0 and stats["meta_loss"] > 0
    assert_equal({n: p.detach() for n, p in omega.named_parameters()}, before)  # no gradient, no step
    assert Frozen().meta_test_problem() == InnerProblem()
    with pytest.raises(TypeError, match="MetaGradientMode"):
        resolve_mode(object())  # type: ignore[arg-type]


def test_meta_test_problem_of_each_mode() -> None:
    assert Unrolled().meta_test_problem() == InnerProblem()
    assert Reptile().meta_test_problem() == InnerProblem()
    assert Implicit(lam=2.5).meta_test_problem() == InnerProblem(proximal=2.5)
    assert not InnerProblem(proximal=2.5).vmappable and InnerProblem().vmappable
    with pytest.raises(ValueError, match="proximal"):
        InnerProblem(proximal=0.0)


def test_evaluate_and_fine_tune_solve_the_modes_problem() -> None:
    omega = maml(MLP((1, 8, 8, 1)), lr=0.05)
    tasks = list(Sinusoid(5, 10, seed=6, length=4))
    by_mode = evaluate(omega, tasks, 3, mode=Implicit(lam=1.5))
    by_name = evaluate(omega, tasks, 3, mode=Implicit(lam=1.5, cg_steps=2))  # only λ names the inner problem
    assert by_mode.per_task_loss.tolist() == by_name.per_task_loss.tolist()
    plain = evaluate(omega, tasks, 3)
    assert evaluate(omega, tasks, 3, mode="reptile").per_task_loss.tolist() == plain.per_task_loss.tolist()
    assert by_mode.mean != plain.mean  # λ matters: the check can fail
    theta = fine_tune(omega, tasks[0].train, 3, mode="implicit").params  # Implicit() has λ = 1
    assert_equal(theta, fine_tune(omega, tasks[0].train, 3, mode=Implicit(lam=1.0)).params)
    with pytest.raises(TypeError, match="proximal"):  # the old proximal=λ alias is gone: the mode names it
        evaluate(omega, tasks, 3, proximal=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        fine_tune(omega, tasks[0].train, 3, mode="bogus")


def test_inner_loop_options() -> None:
    omega, batch = maml(tiny_mlp(), LR).to(DT), regression(n_tasks=1)
    x, y = batch.train[0][0], batch.train[1][0]
    theta0 = {n: p.detach() for n, p in omega.model_params().items()}
    proximal = Proximal(2.0, {n: theta0[n] for n in omega.adapted_names})
    none, none_losses = inner_loop(omega, theta0, x, y, 3, graph="none", regulariser=proximal)
    fo, fo_losses = inner_loop(omega, theta0, x, y, 3, graph="first_order", regulariser=proximal)
    plain, _ = inner_loop(omega, theta0, x, y, 3, graph="none")
    for n in none:  # the regulariser is descended the same way whatever the graph
        assert torch.allclose(none[n], fo[n], rtol=0, atol=1e-14) and not none[n].requires_grad, n
    assert torch.allclose(none_losses, fo_losses, rtol=0, atol=1e-14)
    assert not torch.allclose(none["layers.0.weight"], plain["layers.0.weight"], atol=1e-6)
    with pytest.raises(ValueError, match="graph must be one of"):
        inner_loop(omega, theta0, x, y, 1, graph="second")
