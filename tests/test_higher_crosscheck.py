"""The MAML meta-gradient equals the one `higher` computes for the same model, data and steps (float64).

`higher` (Grefenstette et al., 2019) unrolls the inner loop with its own monkey-patched
modules and differentiable optimizers, sharing no code with metalearn; it is an optional
extra (``pip install torch-metalearn[higher]``), installed in CI.
"""

from __future__ import annotations

import pytest
import reference
import torch
from torch import Tensor, nn

from metalearn.knowledge import maml
from metalearn.models import MLP, Conv4
from metalearn.outer import meta_gradient
from metalearn.tasks import TaskBatch

higher = pytest.importorskip("higher")

DT = torch.float64


def build(kind: str) -> tuple[nn.Module, TaskBatch]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "mlp":
            model = MLP((1, 8, 8, 1)).to(DT)
            data = reference.regression_batch(3, 5, 7, 1, seed=1)
        else:
            model = Conv4(3, hidden=4, image_size=16).to(DT)
            data = reference.image_batch(2, 3, 2, 2, 1, 16, seed=2)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():  # batch norm γ, β away from 1, 0
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DT))
    x_tr, y_tr, x_val, y_val = data
    return model, TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def higher_meta_gradient(model: nn.Module, batch: TaskBatch, steps: int, lr: float) -> dict[str, Tensor]:
    """MAML second order with higher.innerloop_ctx and a plain SGD(lr) inner optimizer."""
    model.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(batch)
    for task in batch:
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(reference.task_loss(fmodel(task.train[0]), task.train[1]))
            (reference.task_loss(fmodel(task.val[0]), task.val[1]) / n).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_maml_meta_gradient_equals_higher(kind: str, steps: int, batching: str) -> None:
    model, batch = build(kind)
    lr = 0.3
    expected = higher_meta_gradient(model, batch, steps, lr)
    omega = maml(model, lr=lr)
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, batching=batching)
    got = {n[len("model."):]: p.grad for n, p in omega.named_parameters()}
    assert got.keys() == expected.keys()
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 1e-3
    error = max(float((got[n] - expected[n]).abs().max()) for n in expected)
    assert error <= 1e-10 * scale, f"{kind}, {steps} steps, {batching}: {error:.2e} (scale {scale:.2e})"
