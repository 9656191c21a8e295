"""A hook on any module, or a global one, sends the models' own ``forward_with`` through functional_call
(`metalearn.models.MLP`, `metalearn.models.Conv4`), so the hook runs as it would under functional_call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn.models import MLP, Conv4


def _mlp() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = MLP((2, 4, 1))
    return model, model.layers[0], torch.randn(3, 2)


def _conv4() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = Conv4(3, hidden=4, image_size=16)
    return model, model.features[1], torch.randn(2, 1, 16, 16)


@pytest.mark.parametrize("make", [_mlp, _conv4], ids=["MLP", "Conv4"])
def test_a_hook_anywhere_sends_it_through_functional_call(make) -> None:
    torch.manual_seed(0)
    model, layer, x = make()
    g = torch.Generator().manual_seed(1)
    params = {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    seen: list[int] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(1))
    assert not model._direct()
    assert torch.equal(model.forward_with(params, x), functional_call(model, params, (x,)))
    assert len(seen) == 2  # the hook ran both times
    handle.remove()
    assert model._direct()
    glob = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not model._direct()
    finally:
        glob.remove()
