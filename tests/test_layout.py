"""When the library's Conv-4 runs channels-last: CPU bf16 autocast only, outside vmap (metalearn.models.layout)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from metalearn import maml
from metalearn.models import Conv4
from metalearn.models.layout import channels_last, is_channels_last, runs_channels_last
from metalearn.outer import meta_step
from metalearn.tasks import TaskBatch

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}
#: conv biases in front of batch norm: their exact gradient is 0, so any value is rounding
PRE_NORM_BIASES = tuple(f"model.features.{4 * i}.bias" for i in range(4))


def test_channels_last_is_a_view_for_one_channel_and_a_copy_otherwise() -> None:
    one = torch.rand(3, 1, 5, 4)
    view = channels_last(one)
    assert view.data_ptr() == one.data_ptr() and torch.equal(view, one) and is_channels_last(view)
    assert not is_channels_last(one)  # NCHW strides, though its memory is the same
    three = torch.rand(3, 3, 5, 4)
    copied = channels_last(three)
    assert torch.equal(copied, three) and is_channels_last(copied) and not is_channels_last(three)
    assert channels_last(copied) is copied
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        channels_last(torch.rand(3, 4))


def test_runs_channels_last_only_under_cpu_bf16_autocast_outside_vmap() -> None:
    x = torch.rand(2, 1, 4, 4)
    assert not runs_channels_last(x)
    with torch.autocast(**BF16):
        assert runs_channels_last(x)
        assert not runs_channels_last(x[0])  # not 4-D
        assert not torch.func.vmap(lambda t: torch.tensor(runs_channels_last(t[None])))(x[:, :1]).any()


def _layouts_seen(model: Conv4, x: Tensor, bf16: bool) -> list[bool]:
    seen: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(is_channels_last(args[0])))
             for m in model.features if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    with torch.autocast(**BF16, enabled=bf16):
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_conv4_runs_channels_last_under_bf16_and_nchw_in_float32() -> None:
    torch.manual_seed(0)
    model = Conv4(5, hidden=8)
    x = torch.rand(6, 1, 28, 28)
    assert _layouts_seen(model, x, bf16=True) == [True] * 4  # every conv after the first keeps it
    assert _layouts_seen(model, x, bf16=False) == [False] * 4
    with torch.autocast(**BF16):
        out = model(x)
        reference = model.head(model.features(x))  # the same layers on the NCHW input
    assert torch.allclose(out.float(), reference.float(), rtol=0.05, atol=0.05)


def test_bf16_meta_gradient_is_as_close_to_float64_channels_last_as_in_nchw(monkeypatch) -> None:
    """The layout changes only bf16's rounding: against float64, the channels-last bf16 meta-gradient is
    about as close as the NCHW one (cosines 0.9900 / 0.9898 on this batch; bf16 itself costs the rest)."""
    g = torch.Generator().manual_seed(0)
    n, queries = 4, 5
    batch = TaskBatch(
        train=(torch.rand(n, 5, 1, 28, 28, generator=g), torch.arange(5).expand(n, -1).clone()),
        val=(torch.rand(n, 5 * queries, 1, 28, 28, generator=g),
             torch.arange(5).repeat_interleave(queries).expand(n, -1).clone()),
    )  # fmt: skip

    def meta_gradient_of(dtype: torch.dtype, precision: str) -> Tensor:
        torch.manual_seed(0)
        omega = maml(Conv4(5, hidden=32), lr=0.4).to(dtype)
        b = TaskBatch(train=(batch.train[0].to(dtype), batch.train[1]), val=(batch.val[0].to(dtype), batch.val[1]))
        meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.0), b, 1, precision=precision)
        return torch.cat([p.grad.double().flatten() for k, p in omega.named_parameters() if k not in PRE_NORM_BIASES])

    exact = meta_gradient_of(torch.float64, "float32")
    channels_last_bf16 = meta_gradient_of(torch.float32, "bf16")
    monkeypatch.setattr("metalearn.models.conv4.runs_channels_last", lambda x: False)
    nchw_bf16 = meta_gradient_of(torch.float32, "bf16")
    cos_cl, cos_nchw = (torch.nn.functional.cosine_similarity(g, exact, dim=0) for g in (channels_last_bf16, nchw_bf16))
    assert not torch.equal(channels_last_bf16, nchw_bf16)  # the two layouts did run
    assert cos_cl > 0.95 and cos_nchw > 0.95
    assert cos_cl > cos_nchw - 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_norm_takes_a_channels_last_input_as_its_rows(dtype: torch.dtype, monkeypatch) -> None:
    """A channels-last input is normalised as its ``[N·H·W, C]`` view: the values and first derivatives of
    the 4-D call bit for bit, the second derivatives the same up to the order of the sums."""
    from metalearn.models import BatchNorm

    torch.manual_seed(0)
    norm = BatchNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = channels_last((torch.randn(5, 6, 7, 3) * 3 + 1).to(dtype))
    grad_out = channels_last(torch.randn(5, 6, 7, 3).to(dtype))
    shapes: list[tuple[int, ...]] = []
    spy = torch.nn.functional.batch_norm

    def recorded(t: Tensor, *args, **kwargs) -> Tensor:
        shapes.append(tuple(t.shape))
        return spy(t, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "batch_norm", recorded)

    def derivatives(forward) -> list[Tensor]:
        xx = x.clone().requires_grad_()
        y = forward(xx)
        gx, gw, gb = torch.autograd.grad(y, (xx, norm.weight, norm.bias), grad_out, create_graph=True)
        second = torch.autograd.grad((gx.double() * torch.cos(x.double())).sum() + (gw * gb).sum(), (xx, norm.weight))
        return [y, gx, gw, gb, *second]

    rows = derivatives(norm)
    assert shapes[-1] == (5 * 7 * 3, 6) and is_channels_last(rows[0]) and is_channels_last(rows[1])
    whole = derivatives(lambda t: spy(t, None, None, norm.weight, norm.bias, training=True, eps=norm.eps))
    for got, want in zip(rows[:4], whole[:4], strict=True):
        assert torch.equal(got, want)
    for got, want in zip(rows[4:], whole[4:], strict=True):
        assert torch.allclose(got.double(), want.double(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-4,
                              atol=1e-2 * float(want.abs().max()))  # fmt: skip
        assert not torch.equal(got, torch.zeros_like(got))
