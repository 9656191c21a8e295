"""What a model's task-batched forward (``forward_batched``, `metalearn.task_batched`) relies on.

A model that runs a stack of tasks itself must compute, for each task, what its per-task forward
does. The layers it may apply to the whole stack unchanged are those that act on each entry alone
(`ELEMENTWISE_ACTIVATIONS`), and a hook torch calls on every module (`global_hooks`) would see the
stack instead of each task, so both `metalearn.models.MLP` and `metalearn.models.Conv4` check for one.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module

__all__ = ["ELEMENTWISE_ACTIVATIONS", "global_hooks"]

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
