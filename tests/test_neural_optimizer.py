"""The learned neural inner optimizer: SGD before meta-training, the part contract, exact meta-gradients."""

from __future__ import annotations

import pytest
import torch
from fd_check import fd_check

from metalearn.knowledge import InnerSGD, MetaKnowledge, NeuralOptimizer, check_part
from metalearn.models import MLP
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks.task import TaskBatch

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n_tasks: int = 3, n: int = 6, seed: int = 1) -> TaskBatch:
    g = _gen(seed)

    def half():
        x = torch.randn(n_tasks, n, 1, generator=g, dtype=F64)
        return x, torch.sin(2 * x) + 0.1 * torch.randn(n_tasks, n, 1, generator=g, dtype=F64)

    return TaskBatch(train=half(), val=half())


def _trained_looking(opt: NeuralOptimizer, seed: int = 2) -> NeuralOptimizer:
    """Gives the MLP's zero-initialised last layer random values, so every weight matters."""
    g = _gen(seed)
    with torch.no_grad():
        for p in list(opt.layers)[-2:]:
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        opt.output_scale.fill_(0.3)
    return opt


def _omega(opt: NeuralOptimizer, seed: int = 0) -> MetaKnowledge:
    torch.manual_seed(seed)
    return MetaKnowledge(MLP((1, 8, 1)).to(F64), optimizer=opt)


def test_untrained_neural_optimizer_is_sgd() -> None:
    batch = _batch()
    neural, sgd = _omega(NeuralOptimizer(lr=0.1)), _omega(InnerSGD(0.1))
    a = meta_loss(neural, batch, 3, batching="loop")
    b = meta_loss(sgd, batch, 3, batching="loop")
    assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_neural_optimizer_state_features_and_steps() -> None:
    opt = _trained_looking(NeuralOptimizer(lr=0.1, hidden=(4,)).double())
    params = {"w": torch.tensor([1.0, -2.0], dtype=F64)}
    opt.bind(params)
    state = opt.init_state(params)
    assert set(state) == {"w/m", "w/v"}
    g = {"w": torch.tensor([0.5, -0.25], dtype=F64)}
    u0, s1 = opt.update(g, state, params, 0)
    u1, _ = opt.update(g, state, params, 5)
    assert not torch.equal(u0["w"], u1["w"])  # the step features change the update
    assert torch.allclose(s1["w/m"], 0.1 * g["w"]) and torch.allclose(s1["w/v"], 0.001 * g["w"] ** 2)


def test_neural_optimizer_meta_parameters_follow_theta() -> None:
    omega = _omega(NeuralOptimizer(lr=0.1))
    assert all(p.dtype == F64 for p in omega.optimizer.parameters())
    names = {n for n, _ in omega.named_parameters()}
    assert {"optimizer.log_lr", "optimizer.output_scale", "optimizer.layers.0", "optimizer.layers.3"} <= names


def test_neural_optimizer_honours_the_contract() -> None:
    report = check_part(_trained_looking(NeuralOptimizer(lr=0.1, hidden=(4,))))
    assert "vmap-safe" in report.rules
    assert "optimizer.layers.0" not in report.meta_parameters  # the part's own names
    assert "layers.0" in report.meta_parameters


def test_neural_optimizer_meta_gradient_matches_finite_differences() -> None:
    omega = _omega(_trained_looking(NeuralOptimizer(lr=0.1, hidden=(4,)).double()))
    batch = _batch()
    names = ["optimizer.layers.0", "optimizer.layers.2", "optimizer.log_lr", "optimizer.output_scale",
             "model.layers.0.weight"]
    fd_check(omega, lambda: meta_loss(omega, batch, 3, batching="loop"), names, entries=3)


def test_neural_optimizer_loop_equals_vmap() -> None:
    omega = _omega(_trained_looking(NeuralOptimizer(lr=0.1, hidden=(4,)).double()))
    batch = _batch()
    grads = {}
    for batching in ("loop", "vmap"):
        omega.zero_grad(set_to_none=True)
        meta_gradient(omega, batch, 3, batching=batching)
        grads[batching] = {n: p.grad.clone() for n, p in omega.named_parameters()}
    for n, g in grads["loop"].items():
        assert torch.allclose(g, grads["vmap"][n], rtol=1e-10, atol=1e-13), n


def test_neural_optimizer_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="lr must be positive"):
        NeuralOptimizer(lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        NeuralOptimizer(lr=0.1, betas=(1.0, 0.9))
    a, b = NeuralOptimizer(0.1, seed=3), NeuralOptimizer(0.1, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
