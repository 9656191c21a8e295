"""`closed_form_batch_norm`: torch's batch norm on ``[M, C]`` rows with a closed-form double backward, checked
against finite differences, torch's composite double backward and float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from metalearn.models import BatchNorm
from metalearn.models.batchnorm_closed import CLOSED_FORM_MIN_NUMEL, closed_form_batch_norm
from metalearn.models.layout import channels_last

EPS = 1e-5


def _inputs(m: int, c: int, *rest: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, c, *rest, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).requires_grad_()
    w = torch.empty(c, dtype=torch.float64).uniform_(0.5, 1.5, generator=g).to(
        torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()  # fmt: skip
    b = torch.randn(c, generator=g, dtype=w.dtype).requires_grad_()
    return x, w, b


def _composite(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float = EPS) -> Tensor:
    return F.batch_norm(x, None, None, w, b, training=True, eps=eps)


def _second(fn, x: Tensor, w: Tensor, b: Tensor, seed: int = 1) -> list[Tensor]:
    """``y``, its first derivatives for a fixed cotangent, and the derivatives of a function of all of
    them (every cotangent of the double backward nonzero)."""
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).requires_grad_()
    y = fn(x, w, b, EPS)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
    cx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    loss = (gx.double() * cx).sum() + (gw.double() * torch.arange(1.0, w.numel() + 1, dtype=torch.float64)).sum()
    loss = loss + (gb.double() ** 2).sum() + (gx.double() ** 2).sum()
    second = torch.autograd.grad(loss, (x, w, gy))
    return [y, gx, gw, gb, *second]


@pytest.mark.parametrize("shape", [(7, 3), (40, 5), (2, 4), (3, 2, 4, 3), (2, 3, 5)])
def test_gradients_and_second_derivatives_match_finite_differences(shape) -> None:
    x, w, b = _inputs(*shape)
    fn = lambda x, w, b: closed_form_batch_norm(x, w, b, EPS)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_without_affine_weights_the_second_derivatives_match_finite_differences() -> None:
    x, _, _ = _inputs(9, 3)
    assert torch.autograd.gradgradcheck(lambda x: closed_form_batch_norm(x, None, None, EPS), (x,))


@pytest.mark.parametrize("shape", [(300, 8), (6, 8, 7, 5)], ids=["rows", "NCHW"])
def test_values_and_first_derivatives_are_torchs_bit_for_bit_and_second_ones_agree_in_float64(shape) -> None:
    x, w, b = _inputs(*shape)
    ours, torchs = _second(closed_form_batch_norm, x, w, b), _second(_composite, x, w, b)
    for got, want in zip(ours[:4], torchs[:4], strict=True):
        assert torch.equal(got, want)
    for got, want in zip(ours[4:], torchs[4:], strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
        assert float(want.abs().max()) > 0


@pytest.mark.parametrize("used", ["dx only", "dw and db only", "dx and db"])
def test_the_double_backward_of_a_part_of_the_first_derivatives(used: str) -> None:
    """Cotangents that are None (a derivative not used downstream, e.g. a frozen layer's dw): the same
    second derivatives as torch's composite."""
    x, w, b = _inputs(50, 4)

    def second(fn) -> tuple[Tensor, ...]:
        y = fn(x, w, b, EPS)
        gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.cos(y.detach()), create_graph=True)
        loss = {"dx only": (gx**2).sum(), "dw and db only": (gw * gb).sum() + gw.sum(),
                "dx and db": (gx * x.detach()).sum() + gb.sum() ** 2}[used]  # fmt: skip
        return torch.autograd.grad(loss, (x, w), allow_unused=True, materialize_grads=True)

    for got, want in zip(second(closed_form_batch_norm), second(_composite), strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mean, std", [(0.5, 2.0), (50.0, 0.5)], ids=["centred", "mean >> std"])
def test_bf16_second_derivatives_are_no_further_from_float64_than_torchs(mean: float, std: float) -> None:
    """bf16 inputs (float32 weights, as under autocast): the closed form's per-channel sums and factors are
    float32, its passes bf16; against float64 (on the same bf16-rounded input) it is about as close as
    torch's composite, also where a channel's mean is 100x its spread (x̂ must not cancel in bf16)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2000, 16, generator=g, dtype=torch.float64) * std + mean).to(torch.bfloat16).requires_grad_()
    w = torch.empty(16).uniform_(0.5, 1.5, generator=g).requires_grad_()
    b = torch.randn(16, generator=g).requires_grad_()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    exact = _second(_composite, x64, w64, b64)
    ours, torchs = _second(closed_form_batch_norm, x, w, b), _second(_composite, x, w, b)
    for i in (4, 5, 6):  # d/dx, d/dw, d/d(grad_out) of the double backward
        err_ours = float((ours[i].double() - exact[i]).norm() / exact[i].norm())
        err_torch = float((torchs[i].double() - exact[i]).norm() / exact[i].norm())
        assert err_ours < 0.01 and err_ours <= 1.5 * err_torch, (i, err_ours, err_torch)


def test_third_derivatives_match_finite_differences() -> None:
    """The double backward is differentiable too: the first derivatives (as a function of x, w and the
    cotangent) pass gradgradcheck, i.e. the third derivatives of the norm are right."""
    x, w, b = _inputs(8, 3)
    gy = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()

    def first(x: Tensor, w: Tensor, gy: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(closed_form_batch_norm(x, w, b, EPS), (x, w, b), gy, create_graph=True)

    assert torch.autograd.gradcheck(first, (x, w, gy))
    assert torch.autograd.gradgradcheck(first, (x, w, gy))


def test_shapes_it_cannot_normalise_are_refused_as_torch_refuses_them() -> None:
    with pytest.raises(ValueError, match=r"\[N, C, ...\]"):
        closed_form_batch_norm(torch.randn(5), None, None, EPS)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        closed_form_batch_norm(torch.randn(1, 3), None, None, EPS)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        closed_form_batch_norm(torch.randn(1, 3, 1, 1), None, None, EPS)


def test_batch_norm_takes_the_closed_form_for_a_large_channels_last_input_only() -> None:
    """`BatchNorm` on a channels-last CPU input: the closed form from `CLOSED_FORM_MIN_NUMEL` elements on
    (the 28x28 first layer of a Conv-4), torch's composite below it (small layers: Python overhead)."""
    norm = BatchNorm(64)
    big = channels_last(torch.randn(CLOSED_FORM_MIN_NUMEL // (64 * 16) + 1, 64, 4, 4, requires_grad=True))
    small = channels_last(torch.randn(2, 64, 4, 4, requires_grad=True))
    assert small.numel() < CLOSED_FORM_MIN_NUMEL <= big.numel()
    names = {}
    for name, x in (("big", big), ("small", small)):
        gx = torch.autograd.grad(norm(x).sin().sum(), x, create_graph=True)[0]
        names[name] = _node_names(gx.grad_fn)
    assert "_BatchNormBackwardBackward" in names["big"]
    assert "NativeBatchNormBackwardBackward0" in names["small"]
    assert "_BatchNormBackwardBackward" not in names["small"]


def _node_names(root) -> set[str]:
    seen, stack, names = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names
