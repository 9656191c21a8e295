"""MLP.forward_with: what torch.func.functional_call computes, bit for bit, and functional_call itself
wherever a shortcut could differ (metalearn.models.mlp; MetaKnowledge.forward runs θ through it)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn import maml
from metalearn.models import MLP
from metalearn.outer import meta_gradient
from metalearn.tasks import Sinusoid

DT = torch.float64


def _params(model: nn.Module, seed: int = 1) -> dict[str, Tensor]:
    """θ other than the module's own tensors (so a forward that read the modules would differ)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


class ThroughFunctionalCall(MLP):
    """An MLP that MetaKnowledge runs with functional_call: its class does not define forward_with itself."""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh], ids=lambda a: a.__name__)
def test_forward_with_equals_functional_call_bit_for_bit(dtype, activation) -> None:
    model = MLP((3, 8, 8, 2), activation=activation).to(dtype)
    params = _params(model)
    x = torch.randn(5, 3, dtype=dtype)
    assert model._direct()
    assert torch.equal(model.forward_with(params, x), functional_call(model, params, (x,)))
    head_only = {k: v for k, v in params.items() if k.startswith("layers.4.")}  # the rest: the module's own
    assert torch.equal(model.forward_with(head_only, x), functional_call(model, head_only, (x,)))


def test_meta_gradients_equal_functional_calls_under_vmap_and_the_loop_to_second_order(monkeypatch) -> None:
    # torch.func's vmap itself (an MLP's vmap path otherwise runs task-batched: tests/test_task_batched.py)
    monkeypatch.setattr("metalearn.modes.unrolled.runs_task_batched", lambda *args: False)
    tasks = Sinusoid(5, 5, seed=0)
    batch = tasks.batch(range(6))
    batch = type(batch)(train=tuple(t.to(DT) for t in batch.train), val=tuple(t.to(DT) for t in batch.val))
    for batching in ("vmap", "loop"):
        grads = []
        for cls in (MLP, ThroughFunctionalCall):
            torch.manual_seed(0)
            omega = maml(cls((1, 16, 16, 1)), lr=0.3).to(DT)
            meta_gradient(omega, batch, 2, batching=batching)
            grads.append([p.grad for p in omega.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True)), batching


def test_tied_weights_and_a_layer_with_tensors_take_functional_call() -> None:
    tied = MLP((4, 4, 4, 4))
    tied.layers[2].weight = tied.layers[0].weight  # one tensor under two names: functional_call unties it
    assert not tied._direct()
    x = torch.randn(2, 4)
    given = {"layers.0.weight": torch.randn(4, 4)}
    assert torch.equal(tied.forward_with(given, x), functional_call(tied, given, (x,)))

    prelu = MLP((2, 3, 1), activation=nn.PReLU)  # an activation with a weight of its own, in θ
    assert not prelu._direct()
    params, x = _params(prelu), torch.randn(2, 2)
    assert torch.equal(prelu.forward_with(params, x), functional_call(prelu, params, (x,)))


def test_a_subclass_with_its_own_forward_runs_it() -> None:
    class Doubled(MLP):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * self.layers(x)

    doubled = Doubled((2, 3, 1))
    params, x = _params(doubled), torch.randn(4, 2)
    assert not doubled._direct()  # even when called directly
    omega = maml(doubled, lr=0.1)
    expected = 2 * functional_call(MLP((2, 3, 1)), params, (x,))
    assert torch.equal(omega(params, x), expected)
    assert torch.equal(doubled.forward_with(params, x), expected)
