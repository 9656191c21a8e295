"""Meta-test: fine_tune and evaluate (mean, 95% CI, batching, reproducibility)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

from metalearn.errors import NonFiniteError
from metalearn.evaluate import Evaluation, evaluate, fine_tune
from metalearn.knowledge import InitPart, MetaKnowledge, maml
from metalearn.knowledge.builtins import InnerSGD
from metalearn.mapping import metric
from metalearn.models import MLP
from metalearn.modes import Implicit
from metalearn.tasks import Sinusoid, Task


def _omega(seed: int = 0, lr: float = 0.02, hidden: int = 16) -> MetaKnowledge:
    torch.manual_seed(seed)
    return maml(MLP((1, hidden, hidden, 1)), lr=lr)


class NoisyInit(InitPart):
    """A stochastic init for the tests: the model's weights plus generator-drawn noise."""

    def initial_params(self, model_params, n_tasks, generator):
        return {
            n: p.expand(n_tasks, *p.shape) + 0.1 * torch.randn((n_tasks, *p.shape), generator=generator)
            for n, p in model_params.items()
        }


def test_fine_tune_improves_train_loss_without_graph_or_changing_omega():
    omega = _omega()
    task = Sinusoid(10, 20, seed=3, length=10)[0]
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    theta0 = fine_tune(omega, task.train, 0).params
    theta = fine_tune(omega, task.train, 50).params
    # the loss fine_tune descends: an untrained MLP fitted to 10 points need not generalise
    loss0 = omega.task_loss(theta0, *task.train)
    loss = omega.task_loss(theta, *task.train)
    assert float(loss) < 0.8 * float(loss0)
    assert all(not t.requires_grad and t.grad_fn is None for t in theta.values())
    for n, p in omega.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_fine_tune_raises_on_nan_data():
    omega = _omega()
    task = Sinusoid(5, 5, seed=0, length=1)[0]
    x, y = task.train
    y = y.clone()
    y[2] = float("nan")
    with pytest.raises(NonFiniteError, match="inner step 0"):
        fine_tune(omega, (x, y), 3)


def test_per_task_metrics_and_ci_match_a_hand_computation():
    omega = _omega()
    tasks = Sinusoid(5, 7, seed=11, length=9)
    ev = evaluate(omega, tasks, 3, batch_size=4)
    assert isinstance(ev, Evaluation) and ev.metric == "mse" and ev.n == 9
    by_hand = []
    for task in tasks:
        adapted = fine_tune(omega, task.train, 3)
        by_hand.append(float(metric(adapted(task.val[0]), task.val[1])))
    assert ev.per_task.tolist() == pytest.approx(by_hand, rel=1e-5)
    values = ev.per_task.tolist()
    assert ev.mean == pytest.approx(statistics.mean(values), rel=1e-12)
    assert ev.ci95 == pytest.approx(1.96 * statistics.stdev(values) / math.sqrt(9), rel=1e-12)
    assert "95% CI" in str(ev)


def test_single_task_has_nan_interval_and_no_task_is_an_error():
    omega = _omega()
    ev = evaluate(omega, Sinusoid(5, 5, seed=0, length=1), 1)
    assert ev.n == 1 and math.isnan(ev.ci95)
    with pytest.raises(ValueError, match="at least one task"):
        evaluate(omega, [], 1)


def test_evaluate_is_reproducible_and_depends_on_the_tasks():
    omega = _omega()
    a = evaluate(omega, Sinusoid(5, 5, seed=1, length=20), 2)
    b = evaluate(omega, Sinusoid(5, 5, seed=1, length=20), 2)
    c = evaluate(omega, Sinusoid(5, 5, seed=2, length=20), 2)
    assert torch.equal(a.per_task, b.per_task) and a.mean == b.mean
    assert not torch.equal(a.per_task, c.per_task)


@pytest.mark.parametrize("init", ["point", "noisy"])
def test_loop_vmap_and_batch_size_agree(init):
    torch.manual_seed(0)
    omega = MetaKnowledge(MLP((1, 16, 16, 1)), optimizer=InnerSGD(0.02), init=NoisyInit() if init == "noisy" else None)
    tasks = Sinusoid(5, 6, seed=4, length=13)
    ref = evaluate(omega, tasks, 3, batching="loop", batch_size=1)
    for batching, size in [("vmap", 5), ("vmap", 13), ("loop", 4), ("auto", 32)]:
        ev = evaluate(omega, tasks, 3, batching=batching, batch_size=size)
        torch.testing.assert_close(ev.per_task, ref.per_task, rtol=1e-5, atol=1e-6)
    if init == "noisy":  # the per-task generators come from the seed
        other = evaluate(omega, tasks, 3, seed=1)
        assert not torch.allclose(other.per_task, ref.per_task)


def test_variable_shape_tasks_run_one_by_one():
    omega = _omega()
    tasks = [Sinusoid(shots, 4 + shots, seed=shots, length=1)[0] for shots in (2, 5, 5, 3, 7)]
    ev = evaluate(omega, tasks, 2, batching="vmap", batch_size=3)
    singles = [evaluate(omega, [t], 2).per_task.item() for t in tasks]
    assert ev.per_task.tolist() == pytest.approx(singles, rel=1e-5)


def test_classification_reports_accuracy():
    torch.manual_seed(0)
    omega = maml(MLP((4, 16, 3)), lr=0.5)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(6):
        centres = 3 * torch.randn(3, 4, generator=g)
        y_tr, y_val = torch.arange(3).repeat(2), torch.arange(3).repeat(4)
        x_tr = centres[y_tr] + 0.1 * torch.randn(6, 4, generator=g)
        x_val = centres[y_val] + 0.1 * torch.randn(12, 4, generator=g)
        tasks.append(Task((x_tr, y_tr), (x_val, y_val)))
    before = evaluate(omega, tasks, 0)
    after = evaluate(omega, tasks, 10)
    assert after.metric == "accuracy"
    assert all(v * 12 == round(v * 12) and 0 <= v <= 1 for v in after.per_task.tolist())
    assert after.mean > before.mean


def test_eval_mode_is_restored_and_nan_task_is_named():
    omega = _omega()
    omega.train()
    tasks = list(Sinusoid(5, 5, seed=0, length=6))
    evaluate(omega, tasks, 1)
    assert omega.training
    x, y = tasks[4].train
    tasks[4] = Task((x, torch.full_like(y, float("inf"))), tasks[4].val)
    with pytest.raises(NonFiniteError, match="task 4") as info:
        evaluate(omega, tasks, 1, batch_size=3)
    assert info.value.task == 4
    assert omega.training


def test_evaluation_may_use_more_steps_than_training():
    omega = _omega()
    tasks = Sinusoid(10, 10, seed=5, length=8)
    assert evaluate(omega, tasks, 20).mean < evaluate(omega, tasks, 1).mean


def test_dropout_is_off_while_evaluating():
    torch.manual_seed(0)
    omega = maml(nn.Sequential(nn.Linear(1, 16), nn.Dropout(0.5), nn.Linear(16, 1)), lr=0.01)
    tasks = Sinusoid(5, 5, seed=0, length=4)
    a = evaluate(omega, tasks, 1, batching="loop")
    b = evaluate(omega, tasks, 1, batching="loop")
    assert torch.equal(a.per_task, b.per_task)


# ---------------------------------------------------------------- proximal (iMAML) meta-test


def _hand_proximal_gd(omega: MetaKnowledge, x, y, steps: int, lr: float, lam: float) -> dict:
    """Gradient descent on L_train(φ) + λ/2 ||φ − θ0||², written without library code."""
    theta0 = {n: p.detach().clone() for n, p in omega.model.named_parameters()}
    phi = {n: t.clone() for n, t in theta0.items()}
    for _ in range(steps):
        leaves = {n: t.requires_grad_() for n, t in phi.items()}
        out = torch.func.functional_call(omega.model, leaves, (x,))
        objective = (out - y).square().mean() + 0.5 * lam * sum(
            (leaves[n] - theta0[n]).square().sum() for n in leaves
        )
        grads = torch.autograd.grad(objective, list(leaves.values()))
        phi = {n: (t - lr * g).detach() for (n, t), g in zip(leaves.items(), grads, strict=True)}
    return phi


def test_proximal_fine_tune_equals_hand_written_proximal_descent():
    omega = _omega(lr=0.05).double()
    task = Sinusoid(10, 20, seed=4, length=1)[0]
    x, y = (t.double() for t in task.train)
    got = fine_tune(omega, (x, y), 7, mode=Implicit(lam=2.0)).params
    want = _hand_proximal_gd(omega, x, y, 7, lr=0.05, lam=2.0)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=0, atol=1e-12), n
    plain = fine_tune(omega, (x, y), 7).params
    assert not torch.allclose(plain["layers.0.weight"], got["layers.0.weight"], atol=1e-6)  # λ matters


def test_proximal_evaluate_scores_proximal_fine_tune_and_checks_lambda():
    omega = _omega(lr=0.05)
    tasks = list(Sinusoid(5, 10, seed=6, length=6))
    ev = evaluate(omega, tasks, 5, mode=Implicit(lam=1.5), batching="vmap")  # proximal runs task by task
    want = []
    for task in tasks:
        theta = fine_tune(omega, task.train, 5, mode=Implicit(lam=1.5)).params
        want.append(float(omega.task_loss(theta, *task.val)))
    assert ev.per_task_loss.tolist() == pytest.approx(want, rel=1e-6)
    assert ev.mean == pytest.approx(statistics.fmean(want), rel=1e-6)  # regression: the metric is the MSE
    # a vanishing λ is the plain inner loop
    vanishing = evaluate(omega, tasks, 5, mode=Implicit(lam=1e-12))
    assert vanishing.mean == pytest.approx(evaluate(omega, tasks, 5).mean, rel=1e-6)
    for bad in (0.0, -1.0, float("nan")):  # a bad λ is refused where the mode is made
        with pytest.raises(ValueError, match="must be positive"):
            Implicit(lam=bad)
    # the mode names the inner problem: the old proximal=λ alias is gone
    with pytest.raises(TypeError, match="proximal"):
        evaluate(omega, tasks, 5, proximal=1.5)
    with pytest.raises(TypeError, match="proximal"):
        fine_tune(omega, tasks[0].train, 5, proximal=1.5)


def test_fine_tune_result_is_the_callable_fine_tuned_model():
    omega = _omega().double()
    task = Sinusoid(10, 20, seed=5, length=1)[0]
    train = tuple(t.double() for t in task.train)
    x_val = task.val[0].double()
    adapted = fine_tune(omega, train, inner_steps=4)
    out = adapted(x_val)
    assert torch.equal(out, omega(adapted.params, x_val).detach())  # θ* bound to ω's model
    assert not out.requires_grad and out.grad_fn is None  # meta-test builds no graph
    assert adapted.losses.shape == (4,) and bool(adapted.losses[-1] < adapted.losses[0])
    assert not torch.equal(out, omega(omega.model_params(), x_val).detach())  # θ* is not θ0


def test_adapt_result_is_callable_and_differentiable_wrt_omega():
    from metalearn.inner import Adapted, adapt

    omega = _omega().double()
    task = Sinusoid(10, 20, seed=5, length=1)[0]
    train = tuple(t.double() for t in task.train)
    adapted = adapt(omega, train, inner_steps=2)
    omega.task_loss(adapted.params, *(t.double() for t in task.val)).backward(retain_graph=True)
    want = {n: p.grad.clone() for n, p in omega.named_parameters()}
    omega.zero_grad()
    x_val, y_val = (t.double() for t in task.val)
    torch.nn.functional.mse_loss(adapted(x_val), y_val).backward()  # same loss through the call: same gradient
    for n, p in omega.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="holds no ω"):
        Adapted(adapted.params, adapted.losses)(x_val)
