"""`higher_rule`: higher's differentiable optimizers as inner update rules (float64).

SGD and Adam through the adapter equal the built-in rules; every other optimizer runs a
second-order meta-gradient that matches central finite differences.
"""

from __future__ import annotations

import warnings

import pytest
import reference
import torch
from fd_check import fd_check
from torch.func import functional_call

from metalearn.knowledge import InnerAdam, InnerSGD, MetaKnowledge, learned
from metalearn.models import MLP
from metalearn.outer import meta_loss
from metalearn.tasks.task import TaskBatch

pytest.importorskip("higher")
from metalearn.knowledge.higher_rule import higher_rule  # noqa: E402

F64 = torch.float64


def _mlp(seed=0):
    model = MLP((2, 4, 1)).to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def _batch(n_tasks=2, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)

    def half():
        return torch.randn(n_tasks, n, 2, generator=g, dtype=F64), torch.randn(n_tasks, n, 1, generator=g, dtype=F64)

    return TaskBatch(train=half(), val=half())


def _trajectory(part, steps=4):
    model = _mlp()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 2, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)

    def loss(params):
        return (functional_call(model, params, (x,)) - y).square().mean()

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return reference.rule_trajectory(part, params, loss, steps)


_max_diff = reference.max_param_diff


def test_sgd_and_adam_through_the_adapter_equal_the_builtin_rules():
    # higher adds ε to √v before the bias correction (torch.optim adds it after): equal as ε → 0
    assert _max_diff(_trajectory(higher_rule(torch.optim.SGD, lr=0.2)), _trajectory(InnerSGD(0.2))) < 1e-12
    ours = _trajectory(InnerAdam(0.05, (0.8, 0.9), 1e-30, learn=()))
    theirs = _trajectory(higher_rule(torch.optim.Adam, lr=0.05, betas=(0.8, 0.9), eps=1e-30))
    assert _max_diff(ours, theirs) < 1e-12
    assert _max_diff(ours, _trajectory(InnerSGD(0.05))) > 1e-3  # the comparison could fail


def test_adam_meta_gradient_through_the_adapter_equals_the_builtin():
    batch = _batch()

    def grads(rule):
        omega = MetaKnowledge(_mlp(), optimizer=rule).to(F64)
        return torch.autograd.grad(meta_loss(omega, batch, 3, batching="loop"), list(omega.model.parameters()))

    builtin = grads(InnerAdam(0.05, (0.8, 0.9), 1e-30, learn=()))
    adapted = grads(higher_rule(torch.optim.Adam, lr=0.05, betas=(0.8, 0.9), eps=1e-30))
    for a, b in zip(builtin, adapted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


OTHERS = {
    "Adadelta": (torch.optim.Adadelta, {"lr": 0.5, "rho": 0.8}),
    "Adagrad": (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    "Adamax": (torch.optim.Adamax, {"lr": 0.05, "betas": (0.8, 0.9)}),
    "RMSprop": (torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9, "momentum": 0.5}),
    "Rprop": (torch.optim.Rprop, {"lr": 0.01}),
}


@pytest.mark.parametrize("name", sorted(OTHERS))
def test_each_higher_optimizer_runs_a_second_order_meta_gradient_matching_finite_differences(name):
    cls, hyper = OTHERS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # higher warns about RMSprop's masked gradients at v = 0 (none here)
        rule = higher_rule(cls, **hyper)
    if name != "Rprop":  # Rprop fills its state from a float lr: its lr cannot be learned
        rule = learned(rule, "lr")
    omega = MetaKnowledge(_mlp(), optimizer=rule).to(F64)
    batch = _batch()
    names = ["model.layers.0.weight", "model.layers.2.bias"] + (["optimizer.log_lr.shared"] if name != "Rprop" else [])
    fd_check(omega, lambda: meta_loss(omega, batch, 3, batching="loop"), names, rtol=1e-5, atol=1e-9)


def test_unsupported_optimizers_say_what_is_usable():
    with pytest.raises(ValueError, match=r"cannot wrap .*AdamW.*usable: \['Adadelta'"):
        higher_rule(torch.optim.AdamW, lr=0.1)
    with pytest.raises(ValueError, match="ASGD.*Python numbers"):
        higher_rule(torch.optim.ASGD, lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        higher_rule(torch.optim.Adagrad, lr=-0.1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "Adamax", "RMSprop"])
def test_vmap_safe_higher_rules_give_the_loops_meta_gradient(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rule = higher_rule(getattr(torch.optim, name), lr=0.05)
    omega = MetaKnowledge(_mlp(), optimizer=rule).to(F64)
    batch = _batch(n_tasks=3)
    loop, vmap = (
        torch.autograd.grad(meta_loss(omega, batch, 2, batching=b), list(omega.parameters())) for b in ("loop", "vmap")
    )
    for a, b in zip(loop, vmap, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
