"""`BatchNorm`: MAML-style batch norm (batch statistics only), exact under ``torch.func.vmap``.

Torch's fused batch norm outside ``vmap``; inside it, the formula from mean/var primitives
(`metalearn.exact_norms`), because the native op gives silently wrong second-order
meta-gradients under ``vmap`` when its affine weights are adapted (see ``docs/architecture.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn import exact_norms
from metalearn.exact_norms import inside_vmap
from metalearn.models.batchnorm_closed import CLOSED_FORM_MIN_NUMEL, closed_form_batch_norm
from metalearn.models.layout import is_channels_last

__all__ = ["BatchNorm", "batch_norm", "inside_vmap"]


class BatchNorm(nn.Module):
    r"""Batch normalisation with the statistics of the current batch only (MAML style).

    .. math:: y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{var}(x) + \epsilon}} \, \gamma + \beta

    with mean and (biased) variance over every dimension but the channel dimension (dim 1).
    No running statistics are kept: at meta-test time a task is normalised with the
    statistics of its own examples, as in MAML (Finn et al., 2017).

    Two implementations of the same function: outside ``torch.func.vmap`` torch's fused
    ``F.batch_norm`` (one pass forward and backward; ~1.1-1.5x faster Conv-4 meta-iterations
    on CPU than the primitives), and inside ``vmap`` the formula above from mean/var
    primitives, because the fused op gives silently wrong second-order meta-gradients there
    when ``weight``/``bias`` are adapted (a relative error of ~1e-2; the tests guard both).

    On CPU, an input of at least `metalearn.models.batchnorm_closed.CLOSED_FORM_MIN_NUMEL` elements
    takes the fused forward and backward with a closed-form double backward (what second-order MAML
    runs once per inner step and layer): the same values and first derivatives bit for bit, second
    derivatives equal up to the order of the sums (1e-15 in float64), in ~15 passes over the input
    instead of the composite's ~45 (1.4-3x faster per layer on the Conv-4's first two; smaller inputs
    keep torch's composite, where the Python overhead would cost more than the passes save).

    A channels-last CPU input ``[N, C, H, W]`` (the library's `Conv4` under CPU bf16:
    `metalearn.models.layout`) is normalised as the ``[N·H·W, C]`` matrix it is in memory (a view):
    the same values and first derivatives as the 4-D call, bit for bit, its per-channel sums over one
    contiguous dimension instead of three strided ones (with torch's composite double backward: a bf16
    Conv-4 meta-gradient with 5 second-order inner steps 311 → 234 ms per task, docs/results.md).

    Args:
        num_features: number of channels C of an input ``[N, C, ...]``.
        eps: added to the variance for stability.
        affine: learn a per-channel scale ``weight`` (γ) and shift ``bias`` (β).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """`forward` with ``weight`` and ``bias`` in place of the module's own (what
        `metalearn.models.Conv4.forward_with` calls: the same function as ``functional_call`` of this layer)."""
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm expects [N, {self.num_features}, ...], got {tuple(x.shape)}")
        # exact_norms.batch_norm, not F.batch_norm, inside any vmap: also one the library did not start
        if inside_vmap():
            return exact_norms.batch_norm(x, None, None, weight, bias, training=True, eps=self.eps)
        return batch_norm(x, weight, bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """`BatchNorm`'s function outside ``vmap``: torch's fused batch norm with batch statistics; on CPU, from
    `CLOSED_FORM_MIN_NUMEL` elements on, with the closed-form double backward of
    `metalearn.models.batchnorm_closed`, and a channels-last input ``[N, C, H, W]`` (C > 1) normalised as
    its ``[N·H·W, C]`` rows (see `BatchNorm`). Also what `metalearn.models.Conv4.forward_batched`
    normalises its stack of tasks with."""
    on_cpu = x.device.type == "cpu"
    norm = closed_form_batch_norm if on_cpu and x.numel() >= CLOSED_FORM_MIN_NUMEL else _torch_batch_norm
    if on_cpu and x.ndim == 4 and x.shape[1] > 1 and is_channels_last(x):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view: NHWC memory is [N·H·W, C]
        return norm(rows, weight, bias, eps).view(n, h, w, c).permute(0, 3, 1, 2)
    return norm(x, weight, bias, eps)


def _torch_batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)
