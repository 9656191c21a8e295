"""The composable inner update rules: updates applied in one place, chains, learned hyper-parameters on any rule."""

from __future__ import annotations

import pytest
import reference
import torch
from torch.func import functional_call

from metalearn.knowledge import (
    InnerAdam,
    InnerSGD,
    MetaKnowledge,
    MetaSGD,
    MomentumSGD,
    OptimizerMixture,
    OptimizerPart,
    apply_updates,
    chain,
    learned,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from metalearn.models import MLP

F64 = torch.float64


def _problem(seed=0):
    model = MLP((3, 5, 2)).to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64))
    x, y = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)

    def loss(params):
        return (functional_call(model, params, (x,)) - y).square().mean()

    return {n: p.detach().clone() for n, p in model.named_parameters()}, loss


_trajectory = reference.rule_trajectory
_max_diff = reference.max_param_diff


def test_step_is_update_then_apply_updates_and_sgd_is_bit_for_bit_the_old_formula():
    params, loss = _problem()
    grads = torch.func.grad(loss)(params)
    part = InnerSGD(0.3)
    updates, _ = part.update(grads, {}, params, 0)
    new, _ = part.step(params, grads, {}, 0)
    assert all(torch.equal(new[n], apply_updates(params, updates)[n]) for n in params)
    assert all(torch.equal(new[n], params[n] - 0.3 * grads[n]) for n in params)


def test_meta_sgd_is_learned_scale_by_learning_rate_per_entry():
    params, loss = _problem()
    composed = learned(scale_by_learning_rate(0.1), "lr", per="entry", constraint="real")
    ours, builtin = _trajectory(composed, params, loss), _trajectory(MetaSGD(0.1), params, loss)
    assert _max_diff(ours, builtin) == 0.0
    assert sorted(dict(composed.named_parameters())) == _bound_names(MetaSGD(0.1), params)


def test_adam_and_momentum_are_chains_of_rules():
    params, loss = _problem(seed=1)
    adam = chain(scale_by_adam(0.8, 0.95, 1e-6), scale_by_learning_rate(0.05))
    preset_adam = InnerAdam(0.05, (0.8, 0.95), 1e-6, learn=())
    assert _max_diff(_trajectory(adam, params, loss), _trajectory(preset_adam, params, loss)) == 0
    heavy = chain(trace(0.7, nesterov=True), scale(-0.3))
    preset = MomentumSGD(0.3, 0.7, learn=(), nesterov=True)
    assert _max_diff(_trajectory(heavy, params, loss), _trajectory(preset, params, loss)) < 1e-15
    moved = _trajectory(chain(trace(0.7), scale(-0.3)), params, loss)
    assert _max_diff(moved, _trajectory(InnerSGD(0.3), params, loss)) > 1e-3  # momentum matters


def test_learned_makes_any_rules_hyper_parameter_a_meta_parameter_in_thetas_dtype():
    rule = learned(chain(trace(0.5), scale_by_learning_rate(0.1)), "momentum", per="tensor")
    omega = MetaKnowledge(MLP((2, 3, 1)), optimizer=rule).to(F64)
    names = [n for n, _ in omega.named_parameters() if n.startswith("optimizer.")]
    assert names == [f"optimizer.rules.0.logit_momentum.{k}" for k in ("layers:0:weight", "layers:0:bias",
                                                                        "layers:2:weight", "layers:2:bias")]
    assert all(p.dtype == F64 for p in omega.optimizer.parameters())
    assert set(names) <= {f"optimizer.{k}" for k in omega.optimizer.state_dict()}
    value = omega.optimizer.rules[0].hyper("momentum", "layers.0.weight")
    assert float(value.detach()) == pytest.approx(0.5, rel=1e-14)


def test_learned_names_the_fix_for_a_bad_request():
    with pytest.raises(ValueError, match="2 rules with hyper-parameter 'lr'"):
        learned(chain(scale_by_learning_rate(0.1), scale_by_learning_rate(0.2)), "lr")
    with pytest.raises(ValueError, match="no rule with hyper-parameter 'beta1'"):
        learned(trace(0.5), "beta1")
    with pytest.raises(ValueError, match="learned already"):
        learned(MetaSGD(0.1), "lr")
    with pytest.raises(ValueError, match="per must be one of"):
        learned(trace(0.5), "momentum", per="layer")
    with pytest.raises(ValueError, match="strictly inside"):
        learned(trace(0.0), "momentum")
    with pytest.raises(ValueError, match="positive"):
        scale_by_learning_rate(-1.0)
    with pytest.raises(TypeError, match="not an OptimizerPart"):
        chain(trace(0.5), torch.nn.Linear(1, 1))


def test_a_part_with_neither_update_nor_step_says_what_to_define():
    class Empty(OptimizerPart):
        pass

    with pytest.raises(NotImplementedError, match=r"define update\(grads, state, params, step\)"):
        Empty().step({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, {}, 0)


def test_a_mixture_candidate_that_overrides_only_step_contributes_its_step():
    class StepOnlySGD(OptimizerPart):
        def step(self, params, grads, state, step):
            return {n: p - 0.3 * grads[n] for n, p in params.items()}, state

    params, loss = _problem()
    mix = OptimizerMixture({"a": StepOnlySGD(), "b": InnerSGD(0.3)})
    assert _max_diff(_trajectory(mix, params, loss), _trajectory(InnerSGD(0.3), params, loss)) < 1e-14


def _bound_names(part, params):
    part.bind(params)
    return sorted(dict(part.named_parameters()))


def test_check_part_reports_a_rule_that_is_not_vmap_safe():
    from metalearn.knowledge import ContractError, check_part

    class SignSwitch(OptimizerPart):  # data-dependent Python control flow: fine alone, fails under vmap
        def update(self, grads, state, params, step):
            return {n: -0.1 * g if float(g.sum()) > 0 else -0.2 * g for n, g in grads.items()}, state

    with pytest.raises(ContractError, match=r"\[vmap-safe\].*data-dependent Python control flow"):
        check_part(SignSwitch())
    assert "vmap-safe" in check_part(chain(trace(0.5), scale(-0.1))).rules


@pytest.mark.parametrize("make", [lambda: InnerSGD(0.3), lambda: MetaSGD(0.3)], ids=["InnerSGD", "MetaSGD"])
def test_sgd_step_in_one_go_is_bit_for_bit_update_then_apply(make) -> None:
    """θ - lr·g equals apply_updates(θ, -(lr·g)) exactly, and so do its first and second derivatives."""
    rule = make()
    g0 = torch.Generator().manual_seed(5)
    params = {"w": torch.randn(3, 4, generator=g0, dtype=F64), "b": torch.randn(4, generator=g0, dtype=F64)}
    rule.bind(params)
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    grads = {n: (p.sin() * 2).requires_grad_() for n, p in params.items()}

    def outer_grads(new: dict) -> tuple:
        loss = sum((t**3).sum() for t in new.values())
        first = torch.autograd.grad(loss, [*leaves.values(), *grads.values()], create_graph=True)
        return first, torch.autograd.grad(sum(f.square().sum() for f in first), [*leaves.values(), *grads.values()])

    fast, _ = rule.step(leaves, grads, {}, 0)
    slow = apply_updates(leaves, rule.update(grads, {}, leaves, 0)[0])
    assert all(torch.equal(fast[n], slow[n]) for n in params)
    for a, b in zip(outer_grads(fast), outer_grads(slow), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_sgd_subclass_with_its_own_update_takes_the_general_step() -> None:
    class HalfSGD(InnerSGD):
        def update(self, grads, state, params, step):
            updates, state = super().update(grads, state, params, step)
            return {n: u / 2 for n, u in updates.items()}, state

    params, grads = {"w": torch.ones(2, dtype=F64)}, {"w": torch.ones(2, dtype=F64)}
    new, _ = HalfSGD(0.5).step(params, grads, {}, 0)
    assert torch.equal(new["w"], torch.full((2,), 0.75, dtype=F64))  # its update ran: 1 - 0.5 / 2
