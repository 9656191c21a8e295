"""What a model's task-batched forward (``forward_batched``, `metalearn.task_batched`) relies on.

A model that runs a stack of tasks itself must compute, for each task, what its per-task forward
does. The layers it may apply to the whole stack unchanged are those that act on each entry alone
(`ELEMENTWISE_ACTIVATIONS`); a hook torch calls on every module (`global_hooks`) or on one of the
model's (`hooked`) would see the stack instead of each task, and weights tied between layers are untied
by ``torch.func.functional_call`` (`tied`), so `metalearn.models.MLP` and `metalearn.models.Conv4` check
for these.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.nn.modules import module as _module

__all__ = ["ELEMENTWISE_ACTIVATIONS", "global_hooks", "hooked", "tied"]

#: torch.nn activations that act on each entry alone, so on a stack of tasks as on each task
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity,
)


def global_hooks() -> bool:
    """Whether torch has a hook on every module (``nn.modules.module.register_module_forward_hook`` & co.);
    True also on a torch without these (private) names, so a model takes its general path."""
    try:
        return bool(
            _module._global_backward_pre_hooks or _module._global_backward_hooks
            or _module._global_forward_pre_hooks or _module._global_forward_hooks
        )  # fmt: skip
    except AttributeError:
        return True


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` itself has a forward, forward-pre, backward or backward-pre hook (read from its
    own dicts: this runs at every step)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)  # fmt: skip


def tied(modules: Iterable[nn.Module]) -> bool:
    """Whether a parameter tensor is held twice among the own parameters of ``modules``."""
    seen: set[int] = set()
    for m in modules:
        for t in m._parameters.values():
            if t is not None:
                if id(t) in seen:
                    return True
                seen.add(id(t))
    return False
