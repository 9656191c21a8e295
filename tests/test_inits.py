"""Learned init distributions: the Gaussian over θ0 and learned per-layer gains over a standard init."""

from __future__ import annotations

import math

import pytest
import torch
from fd_check import fd_check
from torch import nn

from metalearn.inner import adapt
from metalearn.knowledge import GaussianInit, InnerSGD, MetaKnowledge, ScaledInit, check_part
from metalearn.models import MLP, Conv4
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks.task import TaskBatch

F64 = torch.float64


def _mlp(sizes=(2, 5, 1), seed=0) -> nn.Module:
    model = MLP(sizes).to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.6 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def _batch(n_tasks=3, n=6, d=2, seed=1) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def half():
        return torch.randn(n_tasks, n, d, generator=g, dtype=F64), torch.randn(n_tasks, n, 1, generator=g, dtype=F64)

    return TaskBatch(train=half(), val=half())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loop_vs_vmap(omega, batch, seed, steps=2):
    def grads(batching):
        omega.zero_grad(set_to_none=True)
        meta_gradient(omega, batch, steps, batching=batching, generator=_gen(seed))
        return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}

    loop, vm = grads("loop"), grads("vmap")
    assert set(loop) == set(vm) == {n for n, p in omega.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in loop.values())
    for n in loop:
        err = (loop[n] - vm[n]).abs().max().item()
        assert err <= 1e-10 * max(scale, 1.0), f"{n}: loop vs vmap differ by {err:.3g}"
    return loop


# ---------------------------------------------------------------- GaussianInit


def _gaussian_omega(init_scale=0.1, **kwargs):
    return MetaKnowledge(_mlp(), optimizer=InnerSGD(0.3), init=GaussianInit(init_scale, **kwargs)).to(F64)


def test_gaussian_init_draws_per_task_and_is_reproducible():
    omega = _gaussian_omega()
    a = omega.initial_params(4, _gen(0))
    b = omega.initial_params(4, _gen(0))
    c = omega.initial_params(4, _gen(1))
    for name, mu in omega.model_params().items():
        assert a[name].shape == (4, *mu.shape)
        assert torch.equal(a[name], b[name])  # same seed, same θ0
        assert not torch.equal(a[name], c[name])  # another seed, another θ0
        assert not torch.equal(a[name][0], a[name][1])  # each task its own draw


def test_gaussian_init_samples_have_the_learned_mean_and_scale():
    omega = _gaussian_omega(init_scale=0.2)
    with torch.no_grad():
        omega.init.log_scale["layers:0:weight"].fill_(math.log(0.5))
    theta = omega.initial_params(4000, _gen(3))
    for name, mu in omega.model_params().items():
        sigma = omega.init.scale(name).detach()
        draws = theta[name].detach()
        assert (draws.mean(0) - mu.detach()).abs().max() < 5 * sigma.max() / math.sqrt(4000)
        torch.testing.assert_close(draws.std(0), sigma, rtol=0.08, atol=0)


def test_gaussian_init_mean_mode_and_generator_errors():
    omega = _gaussian_omega()
    with pytest.raises(ValueError, match="torch.Generator"):
        omega.initial_params(2, None)
    with omega.init.mean_only():
        theta = omega.initial_params(2, None)  # no generator needed at the mean
    for name, mu in omega.model_params().items():
        assert torch.equal(theta[name], mu.expand(2, *mu.shape))
    assert omega.init.mode == "sample"  # restored
    omega.init.mode = "mean"
    adapted = adapt(omega, (torch.zeros(3, 2, dtype=F64), torch.zeros(3, 1, dtype=F64)), inner_steps=1)
    assert adapted.params["layers.0.weight"].shape == (5, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        omega.init.mode = "median"
    with pytest.raises(ValueError, match="positive"):
        GaussianInit(init_scale=0.0)


def test_gaussian_init_meta_gradient_wrt_mean_and_scale_matches_finite_differences():
    omega = _gaussian_omega(init_scale=0.3)
    batch = _batch()
    names = ["model.layers.0.weight", "model.layers.2.bias", "init.log_scale.layers:0:weight",
             "init.log_scale.layers:2:bias"]
    # the generator is re-seeded for every evaluation, so every evaluation sees the same noise
    fd_check(omega, lambda: meta_loss(omega, batch, 2, batching="loop", generator=_gen(7)), names)


def test_gaussian_init_loop_and_vmap_agree():
    omega = _gaussian_omega(init_scale=0.3)
    grads = _loop_vs_vmap(omega, _batch(n_tasks=4), seed=11)
    assert all(g.abs().max() > 0 for n, g in grads.items() if n.startswith("init.log_scale"))


# ---------------------------------------------------------------- ScaledInit


def _scaled_omega(model=None, **kwargs):
    model = model if model is not None else _mlp()
    return MetaKnowledge(model, optimizer=InnerSGD(0.3), init=ScaledInit(**kwargs)).to(F64)


def test_scaled_init_keeps_the_model_weights_out_of_omega():
    omega = _scaled_omega()
    names = [n for n, _ in omega.named_parameters()]
    assert names == ["init.log_gain.layers:0", "init.log_gain.layers:2", "init.shift.layers:0", "init.shift.layers:2"]
    net = _scaled_omega(per="network")
    assert [n for n, _ in net.named_parameters()] == ["init.log_gain.<model>", "init.shift.<model>"]


@pytest.mark.parametrize("scheme", ["kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal"])
def test_scaled_init_statistics_match_the_scheme_when_gains_are_one(scheme):
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10)).to(F64)
    omega = _scaled_omega(model, scheme=scheme)
    theta = {k: v.detach() for k, v in omega.initial_params(200, _gen(0)).items()}
    for name in ("0.weight", "2.weight"):
        fan_out, fan_in = model.get_parameter(name).shape
        if scheme.startswith("kaiming"):
            std = math.sqrt(2.0 / fan_in)  # gain √2 for relu
        else:
            std = math.sqrt(2.0 / (fan_in + fan_out))
        draws = theta[name]
        assert draws.std().item() == pytest.approx(std, rel=0.03)
        assert abs(draws.mean().item()) < 0.02 * std
        if scheme.endswith("uniform"):
            bound = math.sqrt(3.0) * std
            assert draws.abs().max().item() <= bound
            assert draws.abs().max().item() > 0.99 * bound
        else:
            kurtosis = ((draws / draws.std()) ** 4).mean().item()
            assert kurtosis == pytest.approx(3.0, rel=0.05)  # normal, not uniform (1.8)
    for name in ("0.bias", "2.bias"):
        assert torch.equal(theta[name], torch.zeros_like(theta[name]))


def test_scaled_init_gain_and_shift_act_as_documented():
    omega = _scaled_omega()
    base = omega.initial_params(3, _gen(4))
    with torch.no_grad():
        omega.init.log_gain["layers:0"].fill_(math.log(2.0))
        omega.init.shift["layers:2"].fill_(0.25)
    scaled = omega.initial_params(3, _gen(4))
    torch.testing.assert_close(scaled["layers.0.weight"], 2.0 * base["layers.0.weight"], rtol=1e-15, atol=0)
    assert torch.equal(scaled["layers.2.weight"], base["layers.2.weight"])
    assert torch.equal(scaled["layers.2.bias"], torch.full_like(base["layers.2.bias"], 0.25))
    assert torch.equal(scaled["layers.0.bias"], base["layers.0.bias"])


def test_scaled_init_transfers_to_a_model_of_another_width():
    omega = _scaled_omega(_mlp((2, 5, 1)))
    wide = _mlp((2, 16, 1))
    theta = omega.init.initial_params(dict(wide.named_parameters()), 2, _gen(0))
    assert theta["layers.0.weight"].shape == (2, 16, 2)
    assert theta["layers.2.weight"].shape == (2, 1, 16)
    assert theta["layers.2.weight"].std().item() == pytest.approx(math.sqrt(2 / 16), rel=0.5)
    other = nn.Sequential(nn.Linear(2, 3))
    with pytest.raises(KeyError, match="same layer names"):
        omega.init.initial_params(dict(other.named_parameters()), 1, _gen(0))


def test_scaled_init_on_a_conv_net_with_norm_layers():
    model = Conv4(num_classes=3, hidden=4, image_size=16).to(F64)
    omega = _scaled_omega(model)
    theta = omega.initial_params(2, _gen(0))
    for name, p in model.named_parameters():
        assert theta[name].shape == (2, *p.shape)
        if p.ndim >= 2:
            fan_in = math.prod(p.shape[1:])
            assert theta[name].detach().abs().max().item() <= math.sqrt(6.0 / fan_in)
        elif name.endswith("bias"):
            assert torch.equal(theta[name], torch.zeros_like(theta[name]))
        else:  # a norm layer's scale starts at its gain, 1
            assert torch.equal(theta[name], torch.ones_like(theta[name]))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 1, 16, 16, generator=g, dtype=F64)
    y = torch.randint(0, 3, (2, 6), generator=g)
    grads = _loop_vs_vmap(omega, TaskBatch(train=(x, y), val=(x, y)), seed=2, steps=1)
    assert all(bool(torch.isfinite(v).all()) for v in grads.values())


def test_scaled_init_meta_gradient_matches_finite_differences_and_loop_equals_vmap():
    omega = _scaled_omega()
    batch = _batch()
    names = [n for n, _ in omega.named_parameters()]
    fd_check(omega, lambda: meta_loss(omega, batch, 2, batching="loop", generator=_gen(9)), names, entries=1)
    grads = _loop_vs_vmap(omega, _batch(n_tasks=4), seed=9)
    assert all(bool(torch.isfinite(g).all()) and g.abs().max() > 0 for g in grads.values())


def test_scaled_init_validation():
    with pytest.raises(ValueError, match="scheme must be one of"):
        ScaledInit(scheme="orthogonal")
    with pytest.raises(ValueError, match="per must be one of"):
        ScaledInit(per="tensor")
    with pytest.raises(ValueError, match="positive"):
        ScaledInit(init_gain=0.0)
    omega = _scaled_omega()
    with pytest.raises(ValueError, match="torch.Generator"):
        omega.initial_params(1, None)


# ---------------------------------------------------------------- contract


@pytest.mark.parametrize(
    "make",
    [lambda: GaussianInit(0.1), lambda: ScaledInit(), lambda: ScaledInit("xavier_normal", per="network")],
    ids=["gaussian", "scaled-layer", "scaled-network"],
)
def test_inits_honour_the_part_contract(make):
    report = check_part(make())
    assert report.meta_parameters and set(report.meta_parameters) <= set(report.gradchecked)
