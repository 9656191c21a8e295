"""Conv4.forward_with: what torch.func.functional_call computes, bit for bit, and functional_call itself
wherever a shortcut could differ (metalearn.models.conv4; MetaKnowledge.forward runs θ through it)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn import maml
from metalearn.models import Conv4
from metalearn.outer import meta_gradient
from metalearn.tasks import TaskBatch

DT = torch.float64


def _params(model: nn.Module, seed: int = 1) -> dict[str, Tensor]:
    """θ other than the module's own tensors (so a forward that read the modules would differ)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def _small(**kw) -> Conv4:
    torch.manual_seed(0)
    return Conv4(3, hidden=4, image_size=16, **kw)


class ThroughFunctionalCall(Conv4):
    """A Conv4 that MetaKnowledge runs with functional_call: its class does not define forward_with itself."""


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_forward_with_equals_functional_call_bit_for_bit(dtype) -> None:
    model = _small().to(dtype)
    params = _params(model)
    x = torch.randn(6, 1, 16, 16, dtype=dtype)
    assert model._direct()
    assert torch.equal(model.forward_with(params, x), functional_call(model, params, (x,)))
    some = {k: v for k, v in params.items() if k.startswith(("head.", "features.4."))}  # the rest: the module's own
    assert torch.equal(model.forward_with(some, x), functional_call(model, some, (x,)))


def test_forward_with_under_bf16_autocast_is_functional_call_channels_last_included() -> None:
    model = _small()
    params, x = _params(model), torch.randn(6, 1, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model.forward_with(params, x), functional_call(model, params, (x,))
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


def test_layers_without_affine_or_bias_and_an_embedding_head() -> None:
    model = Conv4(0, hidden=4, image_size=16)  # no head: an embedding network
    model.features[4] = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model.features[5] = type(model.features[5])(4, affine=False)
    assert model._direct()
    params, x = _params(model), torch.randn(3, 1, 16, 16)
    assert torch.equal(model.forward_with(params, x), functional_call(model, params, (x,)))


def _batch(n: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(3).repeat(2).expand(n, -1).clone()
    return TaskBatch(
        train=(torch.randn(n, 6, 1, 16, 16, generator=g, dtype=DT), y),
        val=(torch.randn(n, 6, 1, 16, 16, generator=g, dtype=DT), y.clone()),
    )


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_meta_gradients_equal_functional_calls_to_second_order(batching, monkeypatch) -> None:
    # the vmap path of torch.func itself (a Conv4's vmap path otherwise runs task-batched)
    monkeypatch.setattr("metalearn.modes.unrolled.runs_task_batched", lambda *args: False)
    batch = _batch()
    grads = []
    for cls in (Conv4, ThroughFunctionalCall):
        torch.manual_seed(0)
        omega = maml(cls(3, hidden=4, image_size=16), lr=0.3).to(DT)
        meta_gradient(omega, batch, 2, batching=batching)
        grads.append([p.grad for p in omega.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_other_layers_tied_weights_and_buffers_take_functional_call() -> None:
    x = torch.randn(2, 1, 16, 16)
    tied = _small()
    tied.features[8].weight = tied.features[4].weight  # one tensor under two names: functional_call unties it
    given = {"features.4.weight": torch.randn(4, 4, 3, 3)}
    reflect = _small()
    reflect.features[4] = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    torch_norm = _small()
    torch_norm.features[1] = nn.BatchNorm2d(4)  # buffers of its own (running statistics)
    prelu = _small()
    prelu.features[3] = nn.PReLU()  # an activation with a weight of its own, in θ
    buffered = _small()
    buffered.register_buffer("scale", torch.ones(1))
    for model, params in ((tied, given), (reflect, _params(reflect)), (torch_norm, _params(torch_norm)),
                          (prelu, _params(prelu)), (buffered, _params(buffered))):  # fmt: skip
        assert not model._direct()
        assert not model.task_batched_ready()
        assert torch.equal(model.forward_with(params, x), functional_call(model, params, (x,)))


def test_a_subclass_with_its_own_forward_runs_it() -> None:
    class Doubled(Conv4):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    torch.manual_seed(0)
    doubled = Doubled(3, hidden=4, image_size=16)
    params, x = _params(doubled), torch.randn(4, 1, 16, 16)
    assert not doubled._direct()  # even when called directly
    omega = maml(doubled, lr=0.1)
    plain = Conv4(3, hidden=4, image_size=16)
    expected = 2 * functional_call(plain, params, (x,))
    assert torch.equal(omega(params, x), expected)
    assert torch.equal(doubled.forward_with(params, x), expected)


def test_meta_knowledge_runs_forward_with(monkeypatch) -> None:
    model = _small()
    calls: list[int] = []
    own = Conv4.forward_with
    monkeypatch.setattr(Conv4, "forward_with", lambda self, p, x: (calls.append(1), own(self, p, x))[1])
    omega = maml(model, lr=0.1)
    omega(omega.model_params(), torch.randn(2, 1, 16, 16))
    assert calls == [1]
