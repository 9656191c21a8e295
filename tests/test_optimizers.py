"""Inner optimizers with learned hyper-parameters (MomentumSGD, Adam) and the learned choice among rules."""

from __future__ import annotations

import math

import pytest
import torch
from fd_check import fd_check
from torch import nn
from torch.func import functional_call

import metalearn.knowledge.rules as rules_module
from metalearn.knowledge import (
    InnerAdam,
    InnerSGD,
    MetaKnowledge,
    MomentumSGD,
    OptimizerMixture,
    check_part,
    geometric_anneal,
)
from metalearn.models import MLP
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks.task import TaskBatch

F64 = torch.float64


# ---------------------------------------------------------------- helpers


def _mlp(sizes=(2, 5, 1), seed=0) -> nn.Module:
    """A float64 MLP whose weights come from an explicit generator."""
    model = MLP(sizes).to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def _batch(n_tasks=3, n=6, d=2, seed=1, zero_feature=False) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def half():
        x = torch.randn(n_tasks, n, d, generator=g, dtype=F64)
        if zero_feature:
            x[..., 0] = 0.0
        y = torch.randn(n_tasks, n, 1, generator=g, dtype=F64)
        return x, y

    return TaskBatch(train=half(), val=half())


def _omega(optimizer, sizes=(2, 5, 1)) -> MetaKnowledge:
    return MetaKnowledge(_mlp(sizes), optimizer=optimizer).to(F64)


def _problem(seed=3):
    """A small regression problem: the model, its initial params and a loss of params."""
    model = _mlp((3, 6, 2), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(10, 3, generator=g, dtype=F64)
    y = torch.randn(10, 2, generator=g, dtype=F64)

    def loss(params):
        return (functional_call(model, params, (x,)) - y).square().mean()

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, loss


def _our_trajectory(part, params, loss, steps):
    state = part.init_state(params)
    out = []
    for k in range(steps):
        grads = torch.func.grad(loss)(params)
        params, state = part.step(params, grads, state, k)
        out.append({n: t.detach().clone() for n, t in params.items()})
    return out


def _torch_trajectory(make_optimizer, params, loss, steps):
    leaves = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = make_optimizer(list(leaves.values()))
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss(dict(leaves)).backward()
        opt.step()
        out.append({n: t.detach().clone() for n, t in leaves.items()})
    return out


def _assert_same_trajectory(ours, theirs, tol=1e-12):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for n in a:
            err = (a[n] - b[n]).abs().max().item()
            assert err <= tol, f"step {k}, {n}: differs from torch.optim by {err:.3g}"


def _value(part, hyper, name):
    """The effective value of a (possibly learned) hyper-parameter, as a float."""
    return float(torch.as_tensor(part.hyper(hyper, name)).detach().reshape(-1)[0])


def _loop_vs_vmap(omega, batch, steps=2, generator_seed=None):
    def grads(batching):
        omega.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
        meta_gradient(omega, batch, steps, batching=batching, generator=gen)
        return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}

    loop, vm = grads("loop"), grads("vmap")
    assert set(loop) == set(vm) == {n for n, p in omega.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in loop.values())
    for n in loop:
        err = (loop[n] - vm[n]).abs().max().item()
        assert err <= 1e-10 * max(scale, 1.0), f"{n}: loop vs vmap differ by {err:.3g}"
    return loop


# ---------------------------------------------------------------- torch.optim equality (frozen meta-parameters)


@pytest.mark.parametrize("per", ["shared", "tensor", "element"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_sgd_matches_torch_optim(per, nesterov):
    params, loss = _problem()
    part = MomentumSGD(lr=0.3, momentum=0.7, per=per, nesterov=nesterov)
    part.bind(params)
    part.to(F64)
    name = next(iter(params))
    lr, mu = _value(part, "lr", name), _value(part, "momentum", name)
    assert lr == pytest.approx(0.3, rel=1e-14) and mu == pytest.approx(0.7, rel=1e-14)
    ours = _our_trajectory(part, params, loss, steps=5)
    theirs = _torch_trajectory(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=mu, nesterov=nesterov), params, loss, 5)
    _assert_same_trajectory(ours, theirs)
    # the trajectory actually moved, and momentum mattered (plain SGD differs)
    plain = _torch_trajectory(lambda ps: torch.optim.SGD(ps, lr=lr), params, loss, 5)
    assert max((ours[-1][n] - plain[-1][n]).abs().max().item() for n in params) > 1e-3


def test_momentum_sgd_with_nothing_learned_is_exactly_torch():
    params, loss = _problem()
    part = MomentumSGD(lr=0.1, momentum=0.0, learn=())
    part.bind(params)
    assert list(part.parameters()) == []
    assert part.hyper("lr") == 0.1
    ours = _our_trajectory(part, params, loss, steps=5)
    theirs = _torch_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1), params, loss, 5)
    _assert_same_trajectory(ours, theirs, tol=1e-15)


@pytest.mark.parametrize("per", ["shared", "tensor", "element"])
def test_adam_matches_torch_optim(per):
    params, loss = _problem()
    part = InnerAdam(lr=0.05, betas=(0.8, 0.95), eps=1e-6, per=per)
    part.bind(params)
    part.to(F64)
    name = next(iter(params))
    values = {k: _value(part, k, name) for k in ("lr", "beta1", "beta2", "eps")}
    for k, v in {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6}.items():
        assert values[k] == pytest.approx(v, rel=1e-13)
    ours = _our_trajectory(part, params, loss, steps=5)
    theirs = _torch_trajectory(
        lambda ps: torch.optim.Adam(ps, lr=values["lr"], betas=(values["beta1"], values["beta2"]), eps=values["eps"]),
        params, loss, 5,
    )
    _assert_same_trajectory(ours, theirs)


def test_adam_defaults_match_torch_optim_defaults():
    params, loss = _problem(seed=5)
    part = InnerAdam(lr=1e-3, learn=())
    part.bind(params)
    ours = _our_trajectory(part, params, loss, steps=5)
    theirs = _torch_trajectory(lambda ps: torch.optim.Adam(ps, lr=1e-3), params, loss, 5)
    _assert_same_trajectory(ours, theirs)


# ---------------------------------------------------------------- meta-gradients (float64 finite differences)


def _hyper_names(omega):
    return [n for n, _ in omega.named_parameters() if n.startswith("optimizer.")]


@pytest.mark.parametrize(
    "make",
    [
        lambda: MomentumSGD(lr=0.2, momentum=0.6),
        lambda: MomentumSGD(lr=0.2, momentum=0.6, per="tensor", nesterov=True),
        lambda: InnerAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-2),
        lambda: InnerAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-2, per="element"),
    ],
    ids=["momentum", "nesterov-per-tensor", "adam", "adam-per-element"],
)
def test_meta_gradient_wrt_hyper_parameters_matches_finite_differences(make):
    omega = _omega(make())
    batch = _batch()
    names = _hyper_names(omega)
    learned = {n.split(".")[3] for n in names}  # optimizer.rules.<i>.<storage>.<key>
    assert learned == {f"log_{k}" if k in ("lr", "eps") else f"logit_{k}" for k in omega.optimizer.learned}
    fd_check(omega, lambda: meta_loss(omega, batch, 3, batching="loop"), names + ["model.layers.0.weight"])


def test_loop_and_vmap_meta_gradients_agree():
    batch = _batch(n_tasks=4)
    for part in (MomentumSGD(0.2, 0.6, per="element"), InnerAdam(0.05, (0.8, 0.9), 1e-3, per="tensor")):
        grads = _loop_vs_vmap(_omega(part), batch, steps=3)
        assert all(g.abs().max() > 0 for n, g in grads.items() if n.startswith("optimizer."))


def test_adam_meta_gradient_is_finite_when_an_inner_gradient_is_exactly_zero(monkeypatch):
    # a zero input feature gives exactly-zero inner gradients for a column of the first layer,
    # so v = 0 there; torch's sqrt has an infinite derivative at 0 (NaN meta-gradient)
    batch = _batch(zero_feature=True)
    omega = _omega(InnerAdam(0.05, (0.8, 0.9), 1e-3))
    grads = torch.autograd.grad(meta_loss(omega, batch, 3, batching="vmap"), list(omega.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    # the reference: the same update with a plain sqrt does give NaN here
    monkeypatch.setattr(rules_module, "_safe_sqrt", torch.sqrt)
    naive = torch.autograd.grad(meta_loss(omega, batch, 3, batching="vmap"), list(omega.parameters()))
    assert any(not bool(torch.isfinite(g).all()) for g in naive)


# ---------------------------------------------------------------- the mixture


def _mixture(**kwargs):
    return OptimizerMixture(
        {"sgd": MomentumSGD(0.2, 0.5, learn=("lr",)), "adam": InnerAdam(0.05, (0.8, 0.9), 1e-3, learn=("lr",))},
        **kwargs,
    )


def test_mixture_step_is_the_softmax_weighted_sum_of_candidate_steps():
    params, loss = _problem()
    mix = _mixture(temperature=0.7)
    mix.bind(params)
    mix.to(F64)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([0.3, -0.4], dtype=F64))
    grads = torch.func.grad(loss)(params)
    state = mix.init_state(params)
    assert set(state) == {f"sgd/0/{n}/momentum" for n in params} | {
        f"adam/0/{n}/{b}" for n in params for b in ("exp_avg", "exp_avg_sq")
    }
    new, new_state = mix.step(params, grads, state, 0)
    w = torch.softmax(torch.tensor([0.3, -0.4], dtype=F64) / 0.7, 0)
    sgd_p, sgd_s = mix.candidates["sgd"].step(params, grads, mix.candidates["sgd"].init_state(params), 0)
    adam_p, _ = mix.candidates["adam"].step(params, grads, mix.candidates["adam"].init_state(params), 0)
    for n in params:
        torch.testing.assert_close(new[n], w[0] * sgd_p[n] + w[1] * adam_p[n], rtol=0, atol=1e-14)
        torch.testing.assert_close(new_state[f"sgd/0/{n}/momentum"], sgd_s[f"0/{n}/momentum"], rtol=0, atol=0)


def test_mixture_chosen_fix_and_unfix():
    params, loss = _problem()
    mix = _mixture()
    mix.bind(params)
    mix.to(F64)
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([-1.0, 2.0]))
    choice = mix.chosen()
    assert choice.name == "adam"
    assert sum(choice.weights.values()) == pytest.approx(1.0)
    assert choice.weights["adam"] == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert mix.fix() == "adam" and mix.fixed == "adam"
    assert set(mix.init_state(params)) == {f"adam/0/{n}/{b}" for n in params for b in ("exp_avg", "exp_avg_sq")}
    # fixed: exactly the chosen rule, step for step
    adam = mix.candidates["adam"]
    fixed_traj = _our_trajectory(mix, params, loss, 4)
    adam_traj = _our_trajectory(adam, params, loss, 4)
    _assert_same_trajectory(fixed_traj, adam_traj, tol=0.0)
    # and so, with the learned hyper-parameter frozen, torch.optim.Adam's trajectory
    lr = _value(adam, "lr", None)
    theirs = _torch_trajectory(lambda ps: torch.optim.Adam(ps, lr=lr, betas=(0.8, 0.9), eps=1e-3), params, loss, 4)
    _assert_same_trajectory(fixed_traj, theirs)
    assert mix.fix("sgd") == "sgd" and mix.chosen().name == "sgd"
    mix.unfix()
    assert mix.fixed is None and mix.chosen().name == "adam"
    with pytest.raises(ValueError, match="unknown candidate"):
        mix.fix("rmsprop")


def test_mixture_temperature_and_anneal():
    mix = _mixture(anneal=geometric_anneal(4.0, 0.25, steps=4))
    with torch.no_grad():
        mix.logits.copy_(torch.tensor([1.0, 0.0]))
    assert mix.set_outer_step(0) == pytest.approx(4.0)
    soft = mix.chosen().weights["sgd"]
    assert mix.set_outer_step(2) == pytest.approx(1.0)
    assert mix.set_outer_step(100) == pytest.approx(0.25)
    sharp = mix.chosen().weights["sgd"]
    assert 0.5 < soft < sharp < 1.0
    assert sharp == pytest.approx(1 / (1 + math.exp(-4.0)))
    plain = _mixture(temperature=2.0)
    assert plain.set_outer_step(7) == 2.0  # no schedule: T stays
    with pytest.raises(ValueError, match="positive"):
        plain.set_temperature(0.0)
    with pytest.raises(ValueError):
        geometric_anneal(1.0, 0.0, 10)


def test_mixture_state_dict_keeps_temperature_and_choice():
    params, _ = _problem()
    mix = _mixture(temperature=0.3)
    mix.bind(params)
    mix.fix("sgd")
    fresh = _mixture()
    fresh.bind(params)
    fresh.load_state_dict(mix.state_dict())
    assert fresh.temperature == pytest.approx(0.3) and fresh.fixed == "sgd"


def test_mixture_names_and_validation():
    mix = OptimizerMixture([MomentumSGD(0.1), InnerAdam(0.01), MomentumSGD(0.2)])
    assert mix.names == ["momentumsgd", "adam", "momentumsgd_1"]
    assert OptimizerMixture([InnerSGD(0.1), InnerAdam(0.01)]).names == ["sgd", "adam"]  # unchanged by the rename
    with pytest.raises(TypeError, match="OptimizerPart"):
        OptimizerMixture({"a": nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="at least one"):
        OptimizerMixture([])
    with pytest.raises(ValueError, match="'/'"):
        OptimizerMixture({"a/b": InnerSGD(0.1)})


def test_mixture_is_the_shared_soft_choice_with_its_state_dict_keys():
    from metalearn.knowledge import Choice, SoftChoice, soft_choice

    assert Choice is soft_choice.Choice  # one Choice class in the library
    omega = _omega(_mixture())
    mix = omega.optimizer
    assert isinstance(mix, SoftChoice) and mix.names == ["sgd", "adam"]
    keys = set(omega.state_dict())
    assert {"optimizer.logits", "optimizer.fixed_index", "optimizer.temperature_saved"} <= keys
    assert any(k.startswith("optimizer.candidates.adam.") for k in keys)
    mix.fix("sgd")
    assert mix.weights().tolist() == [1.0, 0.0] and mix.chosen().name == "sgd"


def test_mixture_meta_gradient_wrt_logits_and_hypers_matches_finite_differences():
    omega = _omega(_mixture(temperature=0.8))
    with torch.no_grad():
        omega.optimizer.logits.copy_(torch.tensor([0.2, -0.1]))
    batch = _batch()
    names = _hyper_names(omega)
    assert "optimizer.logits" in names
    fd_check(omega, lambda: meta_loss(omega, batch, 3, batching="loop"), names, entries=2)
    grads = _loop_vs_vmap(omega, batch, steps=3)
    assert grads["optimizer.logits"].abs().max() > 0


# ---------------------------------------------------------------- configuration and contract


def test_hyper_parameter_validation():
    with pytest.raises(ValueError, match="strictly inside"):
        MomentumSGD(lr=0.1, momentum=0.0)  # learned momentum needs a logit
    with pytest.raises(ValueError, match="cannot learn 'beta'"):
        InnerAdam(lr=0.1, learn=("beta",))
    with pytest.raises(ValueError, match="positive"):
        InnerAdam(lr=-1.0)
    with pytest.raises(ValueError, match="per must be"):
        MomentumSGD(lr=0.1, per="layer")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        InnerAdam(lr=0.1, betas=(1.0, 0.9), learn=("lr",))
    assert MomentumSGD(lr=0.1, learn="lr").learned == ("lr",)
    assert InnerAdam(lr=0.1, learn=("betas",)).learned == ("beta1", "beta2")
    part = MomentumSGD(lr=0.1, per="tensor")
    part.bind({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="name the parameter"):
        part.hyper("lr")
    with pytest.raises(RuntimeError, match="not bound"):
        part.hyper("lr", "v")


def test_learned_hyper_parameters_are_meta_parameters_of_omega():
    omega = _omega(InnerAdam(0.01, learn=("lr", "eps")))
    names = _hyper_names(omega)
    assert names == ["optimizer.rules.0.log_eps.shared", "optimizer.rules.1.log_lr.shared"]
    assert all(p.dtype == F64 for p in omega.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda: MomentumSGD(0.1, 0.9),
        lambda: MomentumSGD(0.1, 0.9, per="element", nesterov=True),
        lambda: InnerAdam(0.01, eps=1e-3),
        lambda: InnerAdam(0.01, eps=1e-3, per="tensor"),
        lambda: _mixture(temperature=0.5),
    ],
    ids=["momentum", "nesterov-element", "adam", "adam-tensor", "mixture"],
)
def test_parts_honour_the_part_contract(make):
    report = check_part(make())
    meta = set(report.meta_parameters)
    assert meta and meta <= set(report.gradchecked)
