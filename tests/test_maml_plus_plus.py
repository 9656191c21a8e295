"""MAML++ (Antoniou et al., 2019): LSLR, per-step norm weights, the multi-step loss and its annealed weights,
derivative-order annealing, the recipe, and the run it trains in (meta_train, cosine annealing)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from fd_check import fd_check
from reference import image_task_batch, sine_task_batch
from torch import nn

from metalearn.knowledge import (
    InnerSGD,
    MetaKnowledge,
    PerStepLR,
    PerStepNormWeights,
    check_part,
    maml,
    maml_plus_plus,
    norm_parameter_names,
)
from metalearn.models import MLP, BatchNorm, Conv4
from metalearn.modes import MultiStepLoss, Unrolled, multi_step_weights
from metalearn.modes.multi_step import multi_step_objective
from metalearn.outer import meta_gradient, meta_step
from metalearn.tasks import Sinusoid, stack_tasks
from metalearn.tasks.task import TaskBatch
from metalearn.train import TrainConfig, meta_train

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP((1, 8, 8, 1)).to(F64)


class _NormMLP(nn.Module):
    """Linear, `BatchNorm`, tanh, linear: a model with one norm for the per-step norm weights."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 6)
        self.norm = BatchNorm(6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.layer(x))))


def _norm_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _NormMLP().to(F64)




def _perturb(omega: MetaKnowledge, seed: int = 3, scale: float = 0.05) -> None:
    """Moves every meta-parameter a little, so per-step tables differ across steps."""
    g = _gen(seed)
    with torch.no_grad():
        for p in omega.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _grads(omega: MetaKnowledge, batch: TaskBatch, steps: int, mode, batching: str = "loop") -> dict[str, torch.Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, batching=batching, mode=mode)
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- the multi-step weights


def _paper_weights(k: int, epoch: int, anneal: int) -> list[float]:
    """The schedule as the paper's code states it, written out independently: uniform 1/K, each
    non-final weight minus epoch/(K A) down to 0.03/K, the final one plus (K-1) epoch/(K A) up to
    1 - (K-1) 0.03/K."""
    out = []
    for i in range(k):
        if i < k - 1:
            out.append(max(1 / k - epoch / (k * anneal), 0.03 / k))
        else:
            out.append(min(1 / k + (k - 1) * epoch / (k * anneal), 1 - (k - 1) * 0.03 / k))
    return out


@pytest.mark.parametrize(("k", "anneal"), [(5, 15), (3, 10), (5, 50), (1, 4)])
def test_multi_step_weights_follow_the_papers_schedule_every_epoch(k: int, anneal: int) -> None:
    for epoch in range(anneal + 3):
        got = multi_step_weights(k, epoch, anneal)
        if epoch >= anneal:
            assert got is None  # the last step's loss only, as MAML
            continue
        assert got == pytest.approx(_paper_weights(k, epoch, anneal), abs=1e-15)
        assert got[-1] >= got[0]


def test_multi_step_weights_literal_values() -> None:
    assert multi_step_weights(5, 0, 15) == pytest.approx([0.2] * 5)
    assert multi_step_weights(5, 3, 15) == pytest.approx([0.16] * 4 + [0.36])
    assert multi_step_weights(5, 14, 15) == pytest.approx([1 / 75] * 4 + [0.2 + 56 / 75])
    assert multi_step_weights(5, 49, 50) == pytest.approx([0.006] * 4 + [0.976])  # both bounds bind
    assert sum(multi_step_weights(5, 7, 15)) == pytest.approx(1.0)


def test_multi_step_weights_refuse_bad_arguments() -> None:
    for args in ((0, 0, 15), (5, -1, 15), (5, 0, -1), (5, 1.0, 15)):
        with pytest.raises(ValueError, match="must be an int"):
            multi_step_weights(*args)


def test_multi_step_loss_multiplies_each_steps_val_loss_by_its_weight() -> None:
    omega = maml(_mlp(), lr=0.1)
    batch = sine_task_batch(n_tasks=1)
    (x, y), (xv, yv) = batch.train, batch.val
    weights = multi_step_weights(3, 2, 15)
    got, _, _ = multi_step_objective(omega, omega.model_params(), x[0], y[0], xv[0], yv[0], 3, False, weights=weights)
    # by hand: plain SGD with autograd, the val loss after every step, weighted and summed
    theta = dict(omega.model_params())
    expected = 0.0
    for w in weights:
        loss = omega.task_loss(theta, x[0], y[0])
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        theta = {n: p - 0.1 * g for (n, p), g in zip(theta.items(), grads, strict=True)}
        expected = expected + w * omega.task_loss(theta, xv[0], yv[0])
    assert torch.allclose(got, expected, rtol=1e-13, atol=0)
    g_got = torch.autograd.grad(got, list(omega.parameters()))
    g_exp = torch.autograd.grad(expected, list(omega.parameters()))
    for a, b in zip(g_got, g_exp, strict=True):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-14)


def test_multi_step_loss_after_annealing_is_mamls_meta_gradient() -> None:
    omega = maml(_mlp(), lr=0.1)
    batch = sine_task_batch()
    plain = _grads(omega, batch, 3, Unrolled())
    late = _grads(omega, batch, 3, MultiStepLoss(anneal_epochs=2, steps_per_epoch=10).at_outer_step(20))
    early = _grads(omega, batch, 3, MultiStepLoss(anneal_epochs=2, steps_per_epoch=10).at_outer_step(19))
    assert all(torch.equal(plain[n], late[n]) for n in plain)
    assert any(not torch.allclose(plain[n], early[n]) for n in plain)  # epoch 1 < 2: the weighted sum


def test_derivative_order_annealing_is_first_order_then_second_order() -> None:
    omega = maml(_mlp(), lr=0.3)
    batch = sine_task_batch()
    mode = MultiStepLoss(anneal_epochs=0, first_order_epochs=2, steps_per_epoch=5)
    fo, so = _grads(omega, batch, 2, Unrolled(first_order=True)), _grads(omega, batch, 2, Unrolled())
    at_9, at_10 = _grads(omega, batch, 2, mode.at_outer_step(9)), _grads(omega, batch, 2, mode.at_outer_step(10))
    assert mode.at_outer_step(9).uses_first_order() and not mode.at_outer_step(10).uses_first_order()
    assert all(torch.equal(fo[n], at_9[n]) for n in fo)
    assert all(torch.equal(so[n], at_10[n]) for n in so)
    assert any(not torch.allclose(fo[n], so[n]) for n in fo)


def test_multi_step_mode_identity_leaves_out_the_outer_step() -> None:
    mode = MultiStepLoss(anneal_epochs=3, steps_per_epoch=7, first_order_epochs=1)
    assert mode.at_outer_step(40).config() == mode.config() == {
        "name": "multi_step", "anneal_epochs": 3, "steps_per_epoch": 7, "first_order_epochs": 1, "first_order": False,
    }
    assert mode.at_outer_step(40).epoch == 5 and mode.epoch == 0
    assert TrainConfig(steps=1, inner_steps=1, meta_batch_size=1, mode=mode).identity()["mode"] == mode.config()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        MultiStepLoss(steps_per_epoch=0)
    with pytest.raises(ValueError, match="anneal_epochs"):
        MultiStepLoss(anneal_epochs=-1)


# ---------------------------------------------------------------- LSLR and per-step norm weights


def test_per_step_lr_uses_each_steps_rate_and_the_last_beyond_the_table() -> None:
    opt = PerStepLR(0.1, steps=2)
    params = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    opt.bind(params)
    with torch.no_grad():
        opt.lrs["w"].copy_(torch.tensor([0.5, 0.25], dtype=F64))
    g = {"w": torch.tensor([1.0, -1.0], dtype=F64)}
    for k, lr in [(0, 0.5), (1, 0.25), (2, 0.25), (7, 0.25)]:
        new, _ = opt.step(params, g, {}, k)
        assert torch.equal(new["w"], params["w"] - lr * g["w"])
    with pytest.raises(ValueError, match="steps must be an int"):
        PerStepLR(0.1, 0)


def test_per_step_lr_untrained_is_inner_sgd_bit_for_bit() -> None:
    batch = sine_task_batch()
    a, b = maml(_mlp(), lr=0.1), MetaKnowledge(_mlp(), optimizer=PerStepLR(0.1, 3))
    ga, gb = _grads(a, batch, 3, Unrolled()), _grads(b, batch, 3, Unrolled())
    for n in ga:
        assert torch.equal(ga[n], gb[n])
    assert set(gb) - set(ga) == {f"optimizer.lrs.{k.replace('.', ':')}" for k in a.adapted_names}


def test_per_step_norm_weights_set_the_norms_to_the_next_steps_values() -> None:
    omega = maml_plus_plus(_norm_mlp(), lr=0.1, inner_steps=2)
    assert isinstance(omega.optimizer, PerStepNormWeights)
    assert omega.optimizer.per_step == ["norm.weight", "norm.bias"]
    _perturb(omega)
    params = {n: p.detach() for n, p in omega.model_params().items()}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    state = omega.optimizer.init_state(params)
    for k in range(3):
        new, state = omega.optimizer.step(params, grads, state, k)
        row = min(k, 1)
        assert torch.equal(new["norm.weight"], omega.optimizer.values["norm:weight"][row])
        assert torch.equal(new["norm.bias"], omega.optimizer.values["norm:bias"][row])
        lr = omega.optimizer.optimizer.lrs["layer:weight"][row]
        assert torch.equal(new["layer.weight"], params["layer.weight"] - lr * grads["layer.weight"])


def test_per_step_norm_weights_refuse_names_that_match_nothing() -> None:
    with pytest.raises(ValueError, match="match no adapted parameter"):
        MetaKnowledge(_mlp(), optimizer=PerStepNormWeights(InnerSGD(0.1), 2, ["norm.*"]))
    with pytest.raises(ValueError, match="list of parameter-name patterns"):
        PerStepNormWeights(InnerSGD(0.1), 2, "norm.weight")


def test_norm_parameter_names_and_the_recipe() -> None:
    conv = Conv4(5, hidden=4)
    names = norm_parameter_names(conv)
    assert names == [f"features.{i}.{p}" for i in (1, 5, 9, 13) for p in ("weight", "bias")]
    omega = maml_plus_plus(conv, lr=0.4, inner_steps=5)
    assert omega.optimizer.per_step == names
    assert omega.optimizer.values["features:1:weight"].shape == (5, 4)
    assert omega.optimizer.optimizer.lrs["features:0:weight"].shape == (5,)
    assert isinstance(maml_plus_plus(_mlp(), lr=0.1, inner_steps=3).optimizer, PerStepLR)  # no norms: LSLR alone
    assert isinstance(maml_plus_plus(Conv4(5, hidden=4), 0.4, 5, per_step_norms=False).optimizer, PerStepLR)


@pytest.mark.parametrize(
    "part",
    [PerStepLR(0.1, 3), PerStepNormWeights(PerStepLR(0.1, 3), 3, ["layer.bias"])],
    ids=["PerStepLR", "PerStepNormWeights"],
)
def test_per_step_parts_honour_the_contract(part) -> None:
    report = check_part(part)
    assert "differentiable" in report.rules and report.meta_parameters


# ---------------------------------------------------------------- the whole method


def _multi_step_mean(omega: MetaKnowledge, batch: TaskBatch, steps: int, weights) -> torch.Tensor:
    (x, y), (xv, yv) = batch.train, batch.val
    theta0 = omega.model_params()
    losses = [
        multi_step_objective(omega, theta0, x[i], y[i], xv[i], yv[i], steps, False, weights=weights)[0]
        for i in range(len(batch))
    ]
    return torch.stack(losses).mean()


def test_maml_plus_plus_meta_gradient_matches_finite_differences() -> None:
    omega = maml_plus_plus(_norm_mlp(), lr=0.1, inner_steps=3)
    _perturb(omega)
    batch = sine_task_batch(n_tasks=2)
    weights = multi_step_weights(3, 1, 5)
    names = [
        "optimizer.optimizer.lrs.layer:weight",
        "optimizer.optimizer.lrs.head:bias",
        "optimizer.values.norm:weight",
        "optimizer.values.norm:bias",
        "model.layer.weight",
    ]
    fd_check(omega, lambda: _multi_step_mean(omega, batch, 3, weights), names, entries=4)


def test_maml_plus_plus_mode_gradient_is_the_multi_step_objectives() -> None:
    omega = maml_plus_plus(_norm_mlp(), lr=0.1, inner_steps=3)
    _perturb(omega)
    batch = sine_task_batch()
    mode = MultiStepLoss(anneal_epochs=5, steps_per_epoch=1).at_outer_step(1)
    got = _grads(omega, batch, 3, mode)
    expected = torch.autograd.grad(_multi_step_mean(omega, batch, 3, mode.weights(3)), list(omega.parameters()))
    for (n, _), e in zip(omega.named_parameters(), expected, strict=True):
        assert torch.allclose(got[n], e, rtol=1e-12, atol=1e-15), n


def test_maml_plus_plus_loop_equals_vmap_second_order_on_a_conv_net() -> None:
    torch.manual_seed(0)
    omega = maml_plus_plus(Conv4(3, hidden=3, image_size=16).to(F64), lr=0.3, inner_steps=2)
    _perturb(omega, scale=0.1)
    batch = image_task_batch()
    mode = MultiStepLoss(anneal_epochs=4, steps_per_epoch=1).at_outer_step(1)
    loop, vm = _grads(omega, batch, 2, mode, "loop"), _grads(omega, batch, 2, mode, "vmap")
    assert set(loop) == set(vm) == {n for n, p in omega.named_parameters()}
    scale = max(g.abs().max().item() for g in loop.values())
    for n in loop:
        assert (loop[n] - vm[n]).abs().max().item() <= 1e-10 * max(scale, 1.0), n


def test_meta_train_tells_the_mode_each_outer_step_and_cosine_annealing_runs() -> None:
    tasks = Sinusoid(shots=5, queries=5, seed=0, length=None)
    mode = MultiStepLoss(anneal_epochs=2, steps_per_epoch=1)
    torch.manual_seed(0)
    trained = maml_plus_plus(MLP((1, 8, 1)), lr=0.1, inner_steps=2)
    by_hand = copy.deepcopy(trained)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=1e-4)
    meta_train(trained, tasks, opt, steps=3, inner_steps=2, meta_batch_size=2, mode=mode, scheduler=cosine)
    opt2 = torch.optim.Adam(by_hand.parameters(), lr=1e-2)
    cosine2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=3, eta_min=1e-4)
    for step in range(3):
        batch = stack_tasks([tasks[2 * step], tasks[2 * step + 1]])
        meta_step(by_hand, opt2, batch, 2, mode=mode.at_outer_step(step))
        cosine2.step()
    for (n, a), b in zip(trained.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(a, b), n
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # the cosine schedule reached eta_min


def _record(seen: list, k: int, params: dict[str, torch.Tensor]) -> None:
    seen.append((k, params))


def test_inner_loop_after_step_sees_every_intermediate_theta() -> None:
    from metalearn.inner import inner_loop

    omega = maml(_mlp(), lr=0.1)
    batch = sine_task_batch(n_tasks=1)
    x, y = batch.train[0][0], batch.train[1][0]
    for graph in ("full", "first_order", "none"):
        seen: list[tuple[int, dict[str, torch.Tensor]]] = []
        final, _ = inner_loop(omega, omega.model_params(), x, y, 3, graph=graph, after_step=partial(_record, seen))
        assert [k for k, _ in seen] == [0, 1, 2]
        assert all(torch.equal(seen[-1][1][n], final[n]) for n in final)
        assert (seen[0][1]["layers.0.weight"].requires_grad) == (graph != "none")
        one, _ = inner_loop(omega, omega.model_params(), x, y, 1, graph=graph)
        assert torch.allclose(seen[0][1]["layers.0.weight"], one["layers.0.weight"])  # θ_1 after step 0
    with pytest.raises(ValueError, match="segment=None"):
        inner_loop(omega, omega.model_params(), x, y, 2, segment=1, after_step=lambda k, p: None)
