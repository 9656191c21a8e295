"""Fused ops for the inner loop: plain-torch references and Triton kernels, chosen by ``kernels=``.

* `metalearn.kernels.reference` — every op as plain torch, the definition of correct;
* `fused_update` — the inner update of every built-in rule (SGD, learned step sizes, momentum,
  Adam with learned hyper-parameters) over all adapted tensors in one Triton launch, differentiable
  to every order, with a vmap rule;
* `batch_norm_train` — batch norm with each task's batch statistics, one fused pass forward and
  one backward, exact to every order under vmap (what `metalearn.exact_norms` routes to on CUDA);
* `use_triton` — the dispatch: ``kernels="auto"`` (Triton on CUDA when it imports), ``"triton"``,
  ``"reference"``; a case a kernel cannot serve runs the reference.

This package imports nothing of the rest of the library; Triton is imported only when a kernel runs.
"""

from metalearn.kernels import reference
from metalearn.kernels.dispatch import (
    KERNELS,
    check_kernels,
    interpreter_enabled,
    kernel_unsupported,
    triton_available,
    use_triton,
)
from metalearn.kernels.norm import BatchNormGroups, BatchNormGroupsVJP, batch_norm_train
from metalearn.kernels.update import FusedUpdate, FusedUpdateVJP, fused_update

__all__ = [
    "KERNELS",
    "BatchNormGroups",
    "BatchNormGroupsVJP",
    "batch_norm_train",
    "FusedUpdate",
    "FusedUpdateVJP",
    "check_kernels",
    "fused_update",
    "interpreter_enabled",
    "kernel_unsupported",
    "reference",
    "triton_available",
    "use_triton",
]
