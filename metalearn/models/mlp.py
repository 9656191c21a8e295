"""A fully connected network (MAML's sinusoid regressor)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.models.task_stack import ELEMENTWISE_ACTIVATIONS, global_hooks, hooked, tied

__all__ = ["MLP"]


class MLP(nn.Module):
    """A fully connected network, e.g. the 1-40-40-1 ReLU net of MAML's sinusoid experiment.

    Args:
        sizes: layer widths from input to output, e.g. ``(1, 40, 40, 1)``.
        activation: module class applied between layers.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, sizes: Sequence[int] = (1, 40, 40, 1), activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def forward_with(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """`forward` with the tensors ``params`` (by `named_parameters` name; a name left out: the module's
        own tensor) in place of the modules' own: what ``torch.func.functional_call(self, params, (x,))``
        computes, bit for bit (tested, also under vmap and to second order).

        `metalearn.knowledge.MetaKnowledge` runs θ through it. It calls ``F.linear`` on the given
        tensors instead of swapping them into the modules and back: on the sinusoid MLP (a 25-task vmap,
        10 points per task) functional_call's swaps and module calls cost more than the layers' own
        ops. Where that shortcut could differ from functional_call (a hook on any module or a global
        one, a layer that is not ``nn.Linear`` but holds tensors, a weight shared between layers, a
        subclass's own ``forward``, torch.jit tracing), it calls functional_call.
        """
        if not self._direct():
            return functional_call(self, dict(params), (x,))
        layers = self._modules["layers"]
        assert layers is not None  # `_direct` checked it
        for name, layer in layers._modules.items():
            if type(layer) is nn.Linear:
                own = layer._parameters
                weight = cast(Tensor, params.get(f"layers.{name}.weight", own["weight"]))  # a Linear has one
                x = F.linear(x, weight, params.get(f"layers.{name}.bias", own["bias"]))
            else:
                assert layer is not None
                x = layer(x)  # torch.nn's activations and the like: no tensors of their own
        return x

    def forward_batched(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """`forward_with` on a stack of tasks: every tensor of ``params`` (all of the model's, by name)
        has a leading task dimension T and ``x`` is ``[T, N, ..., in]``; row t of the ``[T, N, ..., out]``
        output is ``forward_with({k: v[t] for k, v in params.items()}, x[t])`` (up to rounding: one
        ``torch.baddbmm`` per layer instead of T ``F.linear`` calls).

        What the vmap batching of the unrolled mode runs the model with on the CPU
        (`metalearn.task_batched`); only when `task_batched_ready` says so.
        """
        layers = self._modules["layers"]
        assert layers is not None
        tasks, lead = x.shape[0], x.shape[1:-1]
        h = x.reshape(tasks, -1, x.shape[-1])
        for name, layer in layers._modules.items():
            if type(layer) is nn.Linear:
                weight, bias = params[f"layers.{name}.weight"], params.get(f"layers.{name}.bias")
                if bias is None:
                    h = torch.bmm(h, weight.transpose(1, 2))
                else:
                    h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            else:
                assert layer is not None
                h = layer(h)  # elementwise (`task_batched_ready`): the same on the stack as on each task
        return h.reshape(tasks, *lead, h.shape[-1])

    def task_batched_ready(self) -> bool:
        """Whether `forward_batched` computes what `forward_with` does for each task: `forward_with`'s
        own conditions, and every layer between the linear ones an elementwise activation of torch.nn
        (a norm or dropout layer would mix or draw across the stack)."""
        if not self._direct():
            return False
        layers = self._modules["layers"]
        assert layers is not None
        return all(type(m) is nn.Linear or type(m) in ELEMENTWISE_ACTIVATIONS for m in layers._modules.values())

    def _direct(self) -> bool:
        """Whether `forward_with` may call the layers itself (see there). It runs at every forward, so
        it reads the modules' own dicts rather than going through ``nn.Module.__getattr__``."""
        if type(self).forward is not MLP.forward or torch._C._get_tracing_state() or global_hooks():
            return False
        layers = self._modules.get("layers")
        if type(layers) is not nn.Sequential:
            return False
        children = list(layers._modules.values())
        for m in (self, layers, *children):
            if m is None or hooked(m):
                return False
            holds = m._parameters or m._buffers or m._modules
            if type(m) is not nn.Linear and m is not self and m is not layers and holds:
                return False
        return not tied(m for m in children if type(m) is nn.Linear)  # functional_call unties, this would not
