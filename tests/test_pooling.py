"""MaxPool2x2: torch's nn.MaxPool2d(2), bit for bit, to every order, under vmap (metalearn.models.pooling)."""

from __future__ import annotations

import pytest
import reference
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from metalearn import maml
from metalearn.models import Conv4, MaxPool2x2, ResNet12, max_pool_2x2
from metalearn.models.layout import is_channels_last
from metalearn.models.pooling import _at_maxima, _MaxPool2x2, _MaxPoolBackward, _TorchMaxPool2x2
from metalearn.outer import meta_gradient
from metalearn.tasks import TaskBatch

DT = torch.float64


def with_ties(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> Tensor:
    """ReLU'd values, a third of them rounded: many windows hold equal entries (zeros and integers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    rounded = torch.rand(shape, generator=g) < 0.33
    return torch.where(rounded, x.round(), x).relu().to(dtype)


SHAPES = [(2, 3, 8, 8), (2, 3, 7, 7), (1, 2, 6, 9), (3, 5, 2, 2), (4, 28, 28), (2, 4, 3, 5)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_values_indices_and_gradients_equal_torchs_bit_for_bit(shape, dtype) -> None:
    x = with_ties(shape, dtype)
    ours_x, torch_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = max_pool_2x2(ours_x), F.max_pool2d(torch_x, 2)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(_MaxPool2x2.apply(x)[1], F.max_pool2d(x, 2, return_indices=True)[1])  # ties: the first
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (ga,) = torch.autograd.grad(ours, ours_x, g)
    (gb,) = torch.autograd.grad(theirs, torch_x, g)
    assert torch.equal(ga, gb)


def test_channels_last_input_gives_torchs_values_and_gradients() -> None:
    x = with_ties((2, 4, 8, 6), torch.float32).contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    assert torch.equal(max_pool_2x2(a), F.max_pool2d(b, 2))
    max_pool_2x2(a).square().sum().backward()
    F.max_pool2d(b, 2).square().sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_gradcheck_and_gradgradcheck_in_float64() -> None:
    x = torch.randn(2, 3, 5, 6, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(max_pool_2x2, (x,))


def test_second_order_through_an_inner_step_equals_torchs() -> None:
    """d/dx of a function of the gradient w.r.t. x (what MAML's meta-gradient takes) equals nn.MaxPool2d's."""
    x = torch.randn(2, 3, 6, 6, dtype=DT)
    w = torch.randn(3, 1, 1, dtype=DT)

    def meta(pool, x: Tensor) -> Tensor:
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((pool(x * w).square() * w).sum(), x, create_graph=True)
        (out,) = torch.autograd.grad(g.square().sum() + (pool(x) ** 3).sum(), x)
        return out

    assert torch.equal(meta(max_pool_2x2, x), meta(lambda t: F.max_pool2d(t, 2), x))


def test_under_vmap_equals_the_loop_to_second_order() -> None:
    xs = torch.randn(4, 3, 2, 6, 6, dtype=DT)

    def loss(x: Tensor) -> Tensor:
        return (max_pool_2x2(x) ** 3).sum()

    grads = torch.func.vmap(torch.func.grad(loss))(xs)
    assert torch.equal(grads, torch.stack([torch.func.grad(loss)(x) for x in xs]))
    small = xs[:, :1, :1, :4, :4]
    hessians = torch.func.vmap(torch.func.jacrev(torch.func.grad(loss)))(small)
    assert torch.equal(hessians, torch.stack([torch.func.jacrev(torch.func.grad(loss))(x) for x in small]))


def test_refuses_inputs_it_cannot_pool() -> None:
    with pytest.raises(ValueError, match="at least 2x2"):
        max_pool_2x2(torch.randn(2, 3, 1, 5))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        max_pool_2x2(torch.randn(5, 6))


def _with_torch_pooling(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MaxPool2x2):
                setattr(module, child_name, nn.MaxPool2d(2))
    return model


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_conv4_meta_gradient_equals_the_one_with_torchs_max_pool(batching: str, monkeypatch) -> None:
    """Conv-4 MAML meta-gradients (float64, second order, 2 steps) with MaxPool2x2 equal nn.MaxPool2d's."""
    # both under torch.func's vmap: the Conv-4 with nn.MaxPool2d does not run task-batched
    monkeypatch.setattr("metalearn.modes.unrolled.runs_task_batched", lambda *args: False)
    # 28 -> 14 -> 7 -> 3 -> 1: odd sizes too
    x_tr, y_tr, x_val, y_val = reference.image_batch(3, 3, 2, 2, 1, 28, seed=4)
    batch = TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))
    grads = []
    for swap in (False, True):
        torch.manual_seed(0)
        model = Conv4(3, hidden=4, image_size=28).to(DT)
        omega = maml(_with_torch_pooling(model) if swap else model, lr=0.3)
        meta_gradient(omega, batch, 2, batching=batching)
        grads.append({n: p.grad for n, p in omega.named_parameters()})
    assert sum(isinstance(m, MaxPool2x2) for m in Conv4(3).modules()) == 4
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[1])


def test_resnet12_pools_with_it() -> None:
    model = ResNet12(5, image_size=16, channels=(2, 2, 2, 2))
    assert sum(isinstance(m, MaxPool2x2) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_channels_last_input_runs_torchs_kernel_and_nchw_the_views(monkeypatch) -> None:
    """A channels-last input goes to F.max_pool2d (vectorised over channels there); NCHW to the views.
    Both give the same values and second-order gradients."""
    calls = []
    real = _MaxPool2x2.apply
    monkeypatch.setattr(_MaxPool2x2, "apply", lambda x: calls.append(x.shape) or real(x))
    x = with_ties((2, 4, 8, 6), torch.float64)
    w = torch.randn(4, 1, 1, dtype=DT)

    def meta(x: Tensor) -> Tensor:
        x = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((max_pool_2x2(x * w).square() * w).sum(), x, create_graph=True)
        (out,) = torch.autograd.grad(g.square().sum() + (max_pool_2x2(x) ** 3).sum(), x)
        return out

    nchw = meta(x)
    assert len(calls) == 2
    cl = meta(x.contiguous(memory_format=torch.channels_last))
    assert len(calls) == 2, "the channels-last input took the views"
    assert torch.equal(nchw, cl)


@pytest.mark.parametrize("layout", ["NCHW", "channels-last"])
def test_the_double_backward_is_torchs_in_the_inputs_layout_with_nothing_for_the_input(layout: str) -> None:
    """Second-order gradients equal F.max_pool2d's bit for bit; the gather at the maxima comes back in the
    input's layout (torch's is NCHW for a channels-last input), and the backward's derivative w.r.t. the
    pooled input is None, not a zero tensor of its size."""
    x = with_ties((3, 8, 6, 7), torch.float32)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(2)
    w, c = torch.randn(8, 1, 1, generator=gen), torch.randn(x.shape, generator=gen)

    def second(pool) -> Tensor:
        xx = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(pool(xx * w).square().sum(), xx, create_graph=True)
        (out,) = torch.autograd.grad((g * c).sum() + pool(xx).sum(), xx)
        return out

    assert torch.equal(second(max_pool_2x2), second(lambda t: F.max_pool2d(t, 2)))
    pool = _TorchMaxPool2x2 if layout == "channels-last" else _MaxPool2x2
    _, indices = pool.apply(x)
    picked = _at_maxima(c.contiguous(memory_format=torch.channels_last), indices)
    assert is_channels_last(picked) == (layout == "channels-last")
    assert torch.equal(picked, c.reshape(3, 8, -1).gather(2, indices.reshape(3, 8, -1)).view(indices.shape))
    xx = x.clone().requires_grad_()
    dx = _MaxPoolBackward.apply(torch.ones(indices.shape), xx, indices)
    assert torch.autograd.grad(dx.sum(), xx, allow_unused=True) == (None,)


class _ZerosMade(TorchDispatchMode):
    """The zero tensors made while active (torch's ``zeros``, ``zeros_like``, ``new_zeros``)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[tuple[int, ...], torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default):
            self.made.append((tuple(out.shape), out.dtype))
        return out


@pytest.mark.parametrize("layout", ["NCHW", "channels-last"])
def test_backward_and_double_backward_make_no_zero_tensors(layout: str) -> None:
    """No int64 zeros for the indices' gradient (autograd materialises one per undefined output gradient
    unless told not to) and no zero tensor of the input's size for the double backward's share of it
    (torch's formula makes one, as the check on F.max_pool2d shows)."""
    x = torch.randn(2, 4, 6, 6)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 1, requires_grad=True)

    def zeros_made(pool) -> tuple[list, list]:
        (g,) = torch.autograd.grad(pool(x * w).square().sum(), w, create_graph=True)
        with _ZerosMade() as second:
            g.sum().backward()
        y = pool(x * w)
        with _ZerosMade() as first:
            y.sum().backward()
        return first.made, second.made

    assert zeros_made(max_pool_2x2) == ([], [])
    assert zeros_made(lambda t: F.max_pool2d(t, 2)) == ([], [((2, 4, 6, 6), torch.float32)])


@pytest.mark.parametrize("layout", ["NCHW", "channels-last"])
def test_the_pooled_input_is_not_kept_for_the_backward(layout: str) -> None:
    """Only the indices are saved: the input (in the Conv-4 the batch norm's output, which nothing else
    keeps) is freed after the forward; the backward's gradients are still torch's, in the input's layout."""
    x = with_ties((3, 8, 6, 7), torch.float32)
    if layout == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    xx = x.clone().requires_grad_()
    h = xx * 2  # what the pool gets: a non-leaf, as a layer's output is
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = max_pool_2x2(h)
    assert [t.dtype for t in saved] == [torch.int64]  # the indices alone
    assert all(t.untyped_storage().data_ptr() != h.untyped_storage().data_ptr() for t in saved)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (ours,) = torch.autograd.grad(y, xx, g)
    xt = x.clone().requires_grad_()
    (theirs,) = torch.autograd.grad(F.max_pool2d(xt * 2, 2), xt, g)
    assert torch.equal(ours, theirs) and is_channels_last(ours) == is_channels_last(theirs)
