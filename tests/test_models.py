"""The shipped backbones: Conv-4 shapes, BatchNorm equal to torch's batch norm, MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metalearn.models import MLP, BatchNorm, Conv4, conv4_feature_size

DT = torch.float64


@pytest.mark.parametrize(
    ("in_channels", "hidden", "image_size", "features"),
    [(1, 64, 28, 64), (3, 32, 84, 800), (1, 4, 16, 4)],
)
def test_conv4_shapes(in_channels: int, hidden: int, image_size: int, features: int) -> None:
    model = Conv4(5, in_channels=in_channels, hidden=hidden, image_size=image_size)
    assert model.feature_size == features == conv4_feature_size(image_size, hidden)
    x = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    assert model.features(x).shape == (2, features)
    assert model(x).shape == (2, 5)
    assert model.head.in_features == features


def test_conv4_without_head_is_an_embedding() -> None:
    model = Conv4(0, hidden=8, image_size=28)
    assert isinstance(model.head, nn.Identity)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 8)


def test_conv4_blocks_use_library_batch_norm_with_batch_statistics() -> None:
    model = Conv4(5, hidden=4)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | BatchNorm)]
    assert len(norms) == 4 and all(isinstance(m, BatchNorm) for m in norms)
    assert not list(model.buffers())  # no running statistics


def test_conv4_feature_size_rejects_too_small_images() -> None:
    assert conv4_feature_size(28) == 64
    with pytest.raises(ValueError, match="too small"):
        conv4_feature_size(8)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (4, 4, 5, 5), (3, 4, 2, 3, 3)])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_batch_norm_equals_torch_batch_norm_in_training_mode(shape: tuple[int, ...], eps: float) -> None:
    g = torch.Generator().manual_seed(0)
    norm = BatchNorm(4, eps=eps).to(DT)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(4, generator=g, dtype=DT))
        norm.bias.copy_(torch.randn(4, generator=g, dtype=DT))
    x = (3 * torch.randn(shape, generator=g, dtype=DT) + 1).requires_grad_(True)
    ours = norm(x)
    theirs = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=eps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-13)
    # first and second derivatives agree as well (MAML differentiates through them)
    v = torch.randn(shape, generator=g, dtype=DT)
    ours_grads = torch.autograd.grad((ours * v).sum(), (x, norm.weight), create_graph=True)
    theirs_grads = torch.autograd.grad((theirs * v).sum(), (x, norm.weight), create_graph=True)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    hvp_ours = torch.autograd.grad(ours_grads[1].square().sum(), x)[0]
    hvp_theirs = torch.autograd.grad(theirs_grads[1].square().sum(), x)[0]
    torch.testing.assert_close(hvp_ours, hvp_theirs, rtol=0, atol=1e-10)


def test_batch_norm_equals_native_module_with_batch_statistics() -> None:
    norm = BatchNorm(3).to(DT)
    native = nn.BatchNorm2d(3, track_running_stats=False).to(DT)
    x = torch.randn(4, 3, 5, 5, dtype=DT)
    torch.testing.assert_close(norm(x), native(x), rtol=0, atol=1e-13)


def test_batch_norm_without_affine_and_shape_errors() -> None:
    norm = BatchNorm(4, affine=False)
    assert norm.weight is None and not list(norm.parameters())
    x = torch.randn(8, 4, dtype=DT)
    torch.testing.assert_close(norm(x), F.batch_norm(x, None, None, training=True, eps=1e-5), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match=r"\[N, 4, \.\.\.\]"):
        norm(torch.randn(8, 3))
    assert "affine=False" in repr(norm)


def test_mlp_structure_and_forward() -> None:
    model = MLP((1, 40, 40, 1))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 40), (40, 40), (40, 1)]
    assert [n for n, _ in model.named_parameters()][:2] == ["layers.0.weight", "layers.0.bias"]
    assert model(torch.randn(7, 1)).shape == (7, 1)
    tanh = MLP((2, 3, 1), activation=nn.Tanh)
    assert isinstance(tanh.layers[1], nn.Tanh) and len(tanh.layers) == 3
    x = torch.randn(5, 2)
    expected = tanh.layers[2](torch.tanh(tanh.layers[0](x)))
    torch.testing.assert_close(tanh(x), expected)
    with pytest.raises(ValueError, match="at least an input and an output"):
        MLP((3,))
