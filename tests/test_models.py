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


def test_inside_vmap_sees_vmap_at_any_level() -> None:
    from metalearn.models import inside_vmap

    seen = []

    def probe(x):
        seen.append(inside_vmap())
        return x.sum()

    probe(torch.ones(2))
    torch.func.grad(probe)(torch.ones(2))
    torch.func.vmap(probe)(torch.ones(3, 2))
    torch.func.grad(lambda x: torch.func.vmap(probe)(x).sum())(torch.ones(3, 2))
    assert seen == [False, False, True, True]


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_primitive_path_under_vmap_equals_the_fused_one(affine: bool) -> None:
    """Outside vmap BatchNorm is F.batch_norm; inside, the primitive formula: same values, same gradients."""
    g = torch.Generator().manual_seed(1)
    norm = BatchNorm(4, affine=affine).double()
    x = torch.randn(3, 6, 4, 5, 5, generator=g, dtype=torch.float64)  # 3 tasks of [6, 4, 5, 5]
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=g)
            norm.bias.normal_(generator=g)
    fused = torch.stack([norm(xi) for xi in x])
    assert torch.equal(fused[0], F.batch_norm(x[0], None, None, norm.weight, norm.bias, training=True, eps=norm.eps))
    torch.testing.assert_close(torch.func.vmap(norm)(x), fused, rtol=0, atol=1e-13)
    ct = torch.randn(fused.shape, generator=g, dtype=torch.float64)
    x.requires_grad_()
    gx_fused = torch.autograd.grad((torch.stack([norm(xi) for xi in x]) * ct).sum(), x)[0]
    gx_vmap = torch.autograd.grad((torch.func.vmap(norm)(x) * ct).sum(), x)[0]
    torch.testing.assert_close(gx_vmap, gx_fused, rtol=0, atol=1e-12)


def test_conv4_pools_before_the_relu_with_identical_values_and_gradients() -> None:
    torch.manual_seed(0)
    model = Conv4(5, hidden=8).double()
    blocks = list(model.features)
    assert [type(m).__name__ for m in blocks[:4]] == ["Conv2d", "BatchNorm", "MaxPool2x2", "ReLU"]
    # the paper's order, [conv, BN, ReLU, pool], from the same modules
    paper = nn.Sequential(*[blocks[i + j] for i in range(0, 16, 4) for j in (0, 1, 3, 2)], blocks[16])
    x = torch.randn(7, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(model.features(x), paper(x))
    ours = torch.autograd.grad(model.features(x).square().sum(), list(model.parameters())[:-2])
    theirs = torch.autograd.grad(paper(x).square().sum(), list(model.parameters())[:-2])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
