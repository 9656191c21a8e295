"""The Conv-4 backbone of MAML and ProtoNets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.models.batchnorm import BatchNorm, batch_norm
from metalearn.models.layout import channels_last, runs_channels_last
from metalearn.models.pooling import MaxPool2x2
from metalearn.models.task_stack import ELEMENTWISE_ACTIVATIONS, global_hooks, hooked, tied

__all__ = ["Conv4", "conv4_feature_size"]


def conv4_feature_size(image_size: int, hidden: int = 64, blocks: int = 4) -> int:
    """Number of features after ``blocks`` conv/pool blocks on a square ``image_size`` input."""
    size = image_size
    for _ in range(blocks):
        size //= 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {blocks} max-pool blocks")
    return hidden * size * size


class Conv4(nn.Module):
    """The Conv-4 backbone of MAML (Finn et al., 2017) and ProtoNets (Snell et al., 2017).

    Four blocks of [conv 3x3 (padding 1), `BatchNorm`, ReLU, max-pool 2], then a linear
    ``head``. Use 64 filters for Omniglot (1x28x28) and 32 for mini-ImageNet (3x84x84).
    Each block runs the max-pool before the ReLU: the same function (max commutes with the
    ReLU, values are bit-identical) with the ReLU and its backward on a quarter of the elements.
    The max-pool is `MaxPool2x2`, ``nn.MaxPool2d(2)`` with a vectorised forward (the same values
    and gradients). Under CPU bfloat16 autocast (``precision="bf16"``) the input is laid out
    channels-last, which every layer keeps (`metalearn.models.layout`: oneDNN's bf16 convolutions
    and torch's max-pool are fast in that layout; float32 stays NCHW: torch's channels-last batch
    norm is less accurate in float32).

    Args:
        num_classes: outputs of the head (the number of ways N); 0 gives no head (an
            embedding network, as ProtoNets use).
        in_channels: input channels (1 for Omniglot, 3 for mini-ImageNet).
        hidden: filters per conv layer.
        image_size: side of the square input images.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                BatchNorm(hidden),
                MaxPool2x2(),  # then ReLU: relu(maxpool(h)) == maxpool(relu(h)), 4x less ReLU work
                nn.ReLU(),
            ]
            channels = hidden
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_size = conv4_feature_size(image_size, hidden)
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()

    #: the task-batched vmap path (`metalearn.task_batched`) runs the val pass task by task: with the val
    #: pass on the stack too (8 tasks x 75 images, ``[75, 8·64, 28, 28]`` activations, bound by memory
    #: bandwidth) a meta-gradient was slower than the loop's, while the inner steps' 5-image stacks gain
    #: from the grouped convolutions
    batched_val_pass = False
    #: and its inner steps on stacks of 8 tasks: stacks of 32 were no faster than stacks of 8 and held
    #: ~3x the memory
    task_stack_size = 8

    def forward(self, x: Tensor) -> Tensor:
        if runs_channels_last(x):
            x = channels_last(x)
        return self.head(self.features(x))

    def forward_batched(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The forward of a stack of tasks: every tensor of ``params`` (all of the model's, by name) has a
        leading task dimension T and ``x`` is ``[T, N, C, H, W]``; row t of the ``[T, N, classes]`` output is
        the forward of task t's θ on ``x[t]`` (up to rounding).

        The T tasks run as one network of T groups: the images as ``[N, T·C, H, W]``, each convolution
        with ``groups=T`` (task t's filters see only task t's channels), the batch norm over the
        ``T·C`` channels (each channel's statistics are one task's, as per task), the max-pool and
        ReLU per channel, and the head as one ``torch.baddbmm``. What the vmap batching of the unrolled
        mode runs the inner steps with on the CPU (`metalearn.task_batched`), where
        `task_batched_ready` says so.
        """
        features = self._modules["features"]
        assert features is not None
        tasks, n = x.shape[0], x.shape[1]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
        if runs_channels_last(h):  # as `forward` lays its input out under CPU bf16
            h = channels_last(h)
        for name, layer in features._modules.items():
            if type(layer) is nn.Conv2d:
                weight, bias = params[f"features.{name}.weight"], params.get(f"features.{name}.bias")
                h = F.conv2d(
                    h, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                    layer.stride, layer.padding, layer.dilation, groups=tasks,
                )
            elif type(layer) is BatchNorm:
                gamma, beta = params.get(f"features.{name}.weight"), params.get(f"features.{name}.bias")
                h = batch_norm(h, None if gamma is None else gamma.reshape(-1),
                               None if beta is None else beta.reshape(-1), layer.eps)  # fmt: skip
            elif type(layer) is nn.Flatten:  # each task's [C, H, W] flattened: [T, N, C·H·W]
                h = h.reshape(n, tasks, -1).transpose(0, 1)
            else:
                assert layer is not None
                h = layer(h)  # MaxPool2x2 and the activations act per channel (`task_batched_ready`)
        if type(self.head) is nn.Linear:
            weight, bias = params["head.weight"], params["head.bias"]
            h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return h

    def forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """`forward` with the tensors ``params`` (by `named_parameters` name; a name left out: the module's
        own tensor) in place of the modules' own: what ``torch.func.functional_call(self, params, (x,))``
        computes, bit for bit (tested, also under vmap, under bf16 autocast and to second order).

        `metalearn.knowledge.MetaKnowledge` runs θ through it: it calls ``F.conv2d``, `BatchNorm.normalize`
        and ``F.linear`` on the given tensors instead of swapping them into the modules and back (a
        functional_call of the Conv-4 costs ~0.2 ms more per forward, 16 of them per task at 5 inner steps).
        Where that shortcut could differ from functional_call (see `_direct`), it calls functional_call.
        """
        if not self._direct():
            return functional_call(self, dict(params), (x,))
        if runs_channels_last(x):
            x = channels_last(x)
        features = self._modules["features"]
        assert features is not None  # `_direct` checked it
        for name, layer in features._modules.items():
            kind = type(layer)
            if kind is nn.Conv2d or kind is BatchNorm:
                own = layer._parameters  # type: ignore[union-attr]
                weight = params.get(f"features.{name}.weight", own["weight"])
                bias = params.get(f"features.{name}.bias", own["bias"])
                if kind is nn.Conv2d:
                    conv = cast(nn.Conv2d, layer)
                    x = F.conv2d(x, cast(Tensor, weight), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
                else:
                    x = cast(BatchNorm, layer).normalize(x, weight, bias)
            else:
                assert layer is not None
                x = layer(x)  # the max-pool, activations, Flatten: no tensors of their own (`_direct`)
        head = self._modules["head"]
        if type(head) is nn.Linear:
            own = head._parameters
            weight = cast(Tensor, params.get("head.weight", own["weight"]))
            return F.linear(x, weight, params.get("head.bias", own["bias"]))
        return x

    def _direct(self) -> bool:
        """Whether `forward_with` may call the layers itself: this class's own ``forward``, not while torch.jit
        traces, no hook on any module and no global one, ``features`` an ``nn.Sequential`` of ``nn.Conv2d``
        (zero padding mode), `BatchNorm` and layers without tensors or children of their own, a
        ``nn.Linear`` or ``nn.Identity`` head, no buffers and no parameter held twice (functional_call
        unties those). It runs at every forward, so it reads the modules' own dicts."""
        if type(self).forward is not Conv4.forward or torch._C._get_tracing_state() or global_hooks():
            return False
        features, head = self._modules.get("features"), self._modules.get("head")
        if type(features) is not nn.Sequential or type(head) not in (nn.Linear, nn.Identity):
            return False
        assert features is not None and head is not None
        layers = list(features._modules.values())
        modules = [self, features, head]
        for m in layers:
            if m is None:
                return False
            kind = type(m)
            if kind is nn.Conv2d:
                if cast(nn.Conv2d, m).padding_mode != "zeros":
                    return False
            elif kind is not BatchNorm and (m._parameters or m._buffers or m._modules):
                return False
            modules.append(m)
        if any(hooked(m) or m._buffers for m in modules):
            return False
        return not tied(modules)

    def task_batched_ready(self) -> bool:
        """Whether `forward_batched` computes `forward` task by task: `_direct`'s conditions, and the layers
        it knows: ``nn.Conv2d`` without groups and with a numeric padding, `BatchNorm`, `MaxPool2x2`,
        elementwise torch.nn activations, one ``nn.Flatten`` of every dimension after the batch's (the last
        layer), and a ``nn.Linear`` (with bias) or ``nn.Identity`` head."""
        if not self._direct():
            return False
        features, head = self._modules["features"], self._modules["head"]
        assert features is not None
        if type(head) is nn.Linear and head.bias is None:
            return False
        layers = list(features._modules.values())
        if not layers or type(layers[-1]) is not nn.Flatten or (layers[-1].start_dim, layers[-1].end_dim) != (1, -1):
            return False
        for m in layers[:-1]:
            if type(m) is nn.Conv2d:
                if m.groups != 1 or isinstance(m.padding, str):
                    return False
            elif type(m) is BatchNorm or type(m) is MaxPool2x2 or type(m) in ELEMENTWISE_ACTIVATIONS:
                continue
            else:
                return False
        return True
