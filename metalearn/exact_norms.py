r"""Normalisation layers written from mean/var/rsqrt primitives, and a mode that routes torch's own to them.

Under ``torch.func.vmap`` over tasks, torch's fused norm kernels (``F.batch_norm``,
``F.layer_norm``, ``F.instance_norm``, ``F.group_norm``, ``F.rms_norm``) give silently
wrong *second-order* meta-gradients when their weight/bias adapt in the inner loop (torch
2.13; see ``docs/architecture.md``, "The vmap + batch norm trap"). The same functions
composed from primitives (mean, subtraction, rsqrt, multiplication) are exact there, since
every primitive has a batching rule for its backward and for the backward of its backward.

`exact_norms` is a ``torch.overrides.TorchFunctionMode`` that the library enters only
around its vmapped computations: it replaces each of those calls — whether it comes from
an ``nn.*Norm`` module or from a model's own ``forward`` — by the primitive version below,
and passes every other call through unchanged. Outside it nothing changes: the fused
kernels are exact (and faster) on the per-task loop path.

Both ``torch.nn.functional.<norm>`` (what the ``nn`` modules call) and ``torch.<norm>``
(what ``F`` calls, and what a user may call directly; also ``torch.native_layer_norm`` and
``torch.native_batch_norm``, measured wrong under vmap too) are routed; whichever comes
first is replaced, so a call is routed once.

Running statistics: a norm with ``training=True`` (``use_input_stats=True``) and running
statistics updates them in place, once per call, which cannot happen per task under vmap;
it is refused with an error naming the fix. With fixed statistics (``training=False``, or
``use_input_stats=False``) it is an affine map of the input, computed from the same
primitives.

Batch statistics on CUDA: with ``kernels="auto"`` (the default) or ``"triton"``, `batch_norm`
with batch statistics runs `metalearn.kernels.batch_norm_train` (one fused Triton pass forward and
one backward, exact to every order under vmap) where the dispatch (`metalearn.kernels.use_triton`)
picks Triton — CUDA tensors by default; elsewhere, and for what the kernel cannot serve, the
primitives below. `ExactNorms` carries the choice (``ExactNorms(kernels=...)``).

This module imports nothing from the rest of the library but `metalearn.kernels` (which imports
nothing of it either: both sit at the bottom of the layers), so models, the outer loop and
evaluation can all use it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from metalearn.kernels import use_triton

try:  # private helpers: which torch.func transforms are active
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - a torch without them: always take the exact primitive path
    TransformType = retrieve_all_functorch_interpreters = None  # type: ignore[misc, assignment]
try:  # private too: the active torch function modes (to read an ExactNorms' kernels choice)
    from torch.overrides import _get_current_function_mode_stack as _mode_stack
except ImportError:  # pragma: no cover - then batch_norm called directly uses kernels="auto"
    _mode_stack = None  # type: ignore[assignment]

__all__ = [
    "NORM_LAYERS",
    "ExactNorms",
    "active_kernels",
    "batch_norm",
    "exact_norms",
    "group_norm",
    "inside_vmap",
    "instance_norm",
    "layer_norm",
    "norm_free",
    "rms_norm",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def inside_vmap() -> bool:
    """Whether the caller runs inside ``torch.func.vmap`` (at any nesting level).

    Also True while ``torch.compile`` traces (the transforms are not visible there) and on a
    torch whose private functorch helpers are missing: callers use it to pick a path that
    is exact everywhere.
    """
    if retrieve_all_functorch_interpreters is None or torch.compiler.is_compiling():
        return True
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


# ---------------------------------------------------------------- shared pieces


def _upcast(x: Tensor) -> Tensor:
    """fp16/bf16 inputs are normalised in float32, as torch's fused kernels do."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _normalize(x: Tensor, dims: list[int], eps: float) -> Tensor:
    r"""(x − mean) / sqrt(var + eps) with mean and biased variance over ``dims``."""
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    var = centered.square().mean(dim=dims, keepdim=True)
    return centered * torch.rsqrt(var + eps)


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    """A per-channel ``[C]`` tensor shaped to broadcast against an ``[N, C, ...]`` input of ``ndim`` dims."""
    return t.reshape([1, -1] + [1] * (ndim - 2))


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Callable[[Tensor], Tensor]) -> Tensor:
    """``y * weight + bias`` (either may be None), each reshaped by ``shape`` to broadcast against ``y``."""
    if weight is not None:
        y = y * shape(weight)
    if bias is not None:
        y = y + shape(bias)
    return y


def _fixed_stats(
    x: Tensor,
    mean: Tensor | None,
    var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    what: str,
) -> Tensor:
    """Normalisation with given per-channel statistics (eval mode): an affine map of ``x``."""
    if mean is None or var is None:
        raise ValueError(
            f"{what} with fixed statistics (training=False / use_input_stats=False) needs running_mean and "
            "running_var; pass them, or normalise with the batch's own statistics (training=True)"
        )
    shape = (lambda t: _channel_view(t, x.ndim))  # noqa: E731 - a one-line reshape
    xf = _upcast(x)
    y = (xf - shape(mean.to(xf.dtype))) * torch.rsqrt(shape(var.to(xf.dtype)) + eps)
    return _affine(y, weight, bias, shape).to(x.dtype)


def _refuse_running_update(what: str) -> None:
    raise ValueError(
        f"{what} with running_mean/running_var and batch statistics updates those statistics in place, "
        "which cannot be done per task under vmap; build the norm with track_running_stats=False "
        "(MAML-style batch statistics), pass running_mean=None and running_var=None, or use batching='loop'"
    )


def _check_eps(eps: float, training: bool, what: str) -> None:
    """The checks ``F.batch_norm`` makes on ``eps`` (same messages)."""
    if training and eps <= 0.0:
        raise ValueError(f"{what} eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"{what} eps must be non-negative, but got {eps}")


# ---------------------------------------------------------------- the primitives (signatures of torch.nn.functional)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    kernels: str | None = None,
) -> Tensor:
    """``F.batch_norm`` from primitives: statistics over every dim but the channel dim 1.

    With batch statistics, ``kernels`` may pick the fused Triton kernel instead (see the module
    docstring): the same function, exact to every order. None: the choice of the innermost active
    `ExactNorms` (`active_kernels`), so a model calling this function directly inside the library's
    vmap (`metalearn.models.BatchNorm`) follows the caller's ``kernels=``.

    Raises:
        ValueError: batch statistics with running statistics to update (see the module
            docstring), fixed statistics without them, a bad ``eps``, or one value per channel.
    """
    _check_eps(eps, training, "batch_norm")
    if not training:
        return _fixed_stats(input, running_mean, running_var, weight, bias, eps, "batch_norm")
    if running_mean is not None or running_var is not None:
        _refuse_running_update("batch_norm")
    if input.ndim < 2:
        raise ValueError(f"batch_norm expects an input [N, C, ...], got shape {tuple(input.shape)}")
    if input.shape[0] * math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    kernels = active_kernels() if kernels is None else kernels
    if input.numel() and use_triton(kernels, [t for t in (input, weight, bias) if t is not None]):
        from metalearn.kernels.norm import batch_norm_train

        return batch_norm_train(input, weight, bias, eps)
    y = _normalize(_upcast(input), [0, *range(2, input.ndim)], eps)
    return _affine(y, weight, bias, lambda t: _channel_view(t, input.ndim)).to(input.dtype)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm`` from primitives: statistics of each example and channel over the spatial dims.

    Raises:
        ValueError: input statistics with running statistics to update, fixed statistics
            without them, or a single spatial element.
    """
    if not use_input_stats:
        return _fixed_stats(input, running_mean, running_var, weight, bias, eps, "instance_norm")
    if running_mean is not None or running_var is not None:
        _refuse_running_update("instance_norm")
    if input.ndim < 3 or math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    y = _normalize(_upcast(input), list(range(2, input.ndim)), eps)
    return _affine(y, weight, bias, lambda t: _channel_view(t, input.ndim)).to(input.dtype)


def _normalized_dims(input: Tensor, normalized_shape: int | Sequence[int], what: str) -> list[int]:
    """The trailing dims ``normalized_shape`` names, checked against the input as torch checks them."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or len(shape) > input.ndim or tuple(input.shape[input.ndim - len(shape):]) != shape:
        raise RuntimeError(
            f"{what}: given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}"
        )
    return list(range(input.ndim - len(shape), input.ndim))


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` from primitives: statistics over the trailing ``normalized_shape`` dims."""
    dims = _normalized_dims(input, normalized_shape, "layer_norm")
    y = _normalize(_upcast(input), dims, eps)
    return _affine(y, weight, bias, lambda t: t).to(input.dtype)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.group_norm`` from primitives: statistics of each example over each group of C/G channels and space."""
    if input.ndim < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.ndim}")
    n, c = input.shape[0], input.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}"
        )
    if n * c // num_groups * math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
    grouped = _upcast(input).reshape(n, num_groups, -1)
    y = _normalize(grouped, [2], eps).reshape(input.shape)
    return _affine(y, weight, bias, lambda t: _channel_view(t, input.ndim)).to(input.dtype)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """``F.rms_norm`` from primitives; ``eps=None`` is the machine epsilon of the computation dtype, as in torch."""
    dims = _normalized_dims(input, normalized_shape, "rms_norm")
    x = _upcast(input)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y = x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)
    return _affine(y, weight, None, lambda t: t).to(input.dtype)


# ---------------------------------------------------------------- torch.<norm> entry points (aten argument order)


def _aten_batch_norm(
    input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True, *, kernels="auto"
):
    return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, kernels=kernels)


def _aten_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                        cudnn_enabled=True):
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def _aten_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return layer_norm(input, normalized_shape, weight, bias, eps)


def _aten_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    return group_norm(input, num_groups, weight, bias, eps)


def _aten_native_layer_norm(input, normalized_shape, weight, bias, eps):
    """``torch.native_layer_norm``: (output, mean, rstd), the statistics with the normalised dims kept as 1."""
    dims = _normalized_dims(input, normalized_shape, "native_layer_norm")
    x = _upcast(input)
    mean = x.mean(dim=dims, keepdim=True)
    centered = x - mean
    rstd = torch.rsqrt(centered.square().mean(dim=dims, keepdim=True) + eps)
    return _affine(centered * rstd, weight, bias, lambda t: t).to(input.dtype), mean, rstd


def _aten_native_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, *, kernels="auto"):
    """``torch.native_batch_norm``: (output, saved mean ``[C]``, saved 1/std ``[C]``; empty when not training)."""
    out = batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, kernels=kernels)
    if not training:
        empty = input.new_empty(0)
        return out, empty, empty
    x, dims = _upcast(input), [0, *range(2, input.ndim)]
    mean = x.mean(dim=dims)
    invstd = torch.rsqrt((x - _channel_view(mean, x.ndim)).square().mean(dim=dims) + eps)
    return out, mean, invstd


def _routes() -> dict[Callable, tuple[str, Callable]]:
    """Each intercepted torch function → (the name it is counted under, its primitive version)."""
    routes: dict[Callable, tuple[str, Callable]] = {
        F.batch_norm: ("batch_norm", batch_norm),
        F.instance_norm: ("instance_norm", instance_norm),
        F.layer_norm: ("layer_norm", layer_norm),
        F.group_norm: ("group_norm", group_norm),
        torch.batch_norm: ("batch_norm", _aten_batch_norm),
        torch.instance_norm: ("instance_norm", _aten_instance_norm),
        torch.layer_norm: ("layer_norm", _aten_layer_norm),
        torch.group_norm: ("group_norm", _aten_group_norm),
        torch.native_layer_norm: ("layer_norm", _aten_native_layer_norm),
        torch.native_batch_norm: ("batch_norm", _aten_native_batch_norm),
    }
    if hasattr(F, "rms_norm"):  # torch >= 2.4
        routes[F.rms_norm] = ("rms_norm", rms_norm)
        routes[torch.rms_norm] = ("rms_norm", rms_norm)
    return routes


#: torch's fused norms and their primitive versions (a constant table, built once at import).
ROUTES: dict[Callable, tuple[str, Callable]] = _routes()


class ExactNorms(TorchFunctionMode):
    """A torch function mode that computes every norm of `ROUTES` from primitives.

    Enter it (``with ExactNorms():``) around a ``torch.func.vmap`` call; every other torch
    call passes through unchanged. ``routed`` counts the norm calls replaced, by name
    (``"batch_norm"``, ``"layer_norm"``, ...), so a test or a user can see that a model's
    norms were seen. ``kernels`` (``"auto"``, ``"triton"``, ``"reference"``) is how batch norm with
    batch statistics is computed (`batch_norm`).
    """

    def __init__(self, kernels: str = "auto") -> None:
        super().__init__()
        self.routed: Counter[str] = Counter()
        self.kernels = kernels

    def __torch_function__(self, func, types, args=(), kwargs=None):
        route = ROUTES.get(func)
        if route is None:  # the common case: one dict lookup per torch call
            return func(*args, **(kwargs or {}))
        name, exact = route
        self.routed[name] += 1
        if name == "batch_norm":
            return exact(*args, **(kwargs or {}), kernels=self.kernels)
        return exact(*args, **(kwargs or {}))


#: torch's norm layers: a module of one of these types calls a fused norm in its forward.
NORM_LAYERS: tuple[type[torch.nn.Module], ...] = tuple(
    t for t in (
        torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
        getattr(torch.nn, "RMSNorm", None), torch.nn.LocalResponseNorm, torch.nn.CrossMapLRN2d,
    ) if t is not None
)


def norm_free(module: torch.nn.Module) -> bool:
    """Whether ``module`` and its submodules are known to call none of torch's fused norms.

    True only when every module is either one of ``torch.nn``'s own layers other than a norm layer
    (`NORM_LAYERS`), or of a class that declares ``native_norm_free = True`` in its own body (a
    subclass that does not re-declare it is not trusted: its ``forward`` may differ). Anything
    else may call ``F.layer_norm`` and friends from its ``forward``, so it is not norm-free; the
    answer errs only towards routing (`ExactNorms`), which is always correct.

    Example:
        >>> norm_free(torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU()))
        True
        >>> norm_free(torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.LayerNorm(4)))
        False
    """
    for m in module.modules():
        cls = type(m)
        if isinstance(m, NORM_LAYERS):
            return False
        if cls.__dict__.get("native_norm_free", False) is True:
            continue
        if not cls.__module__.startswith("torch.nn.modules."):
            return False
    return True


def active_kernels() -> str:
    """The ``kernels`` choice of the innermost active `ExactNorms` mode, or ``"auto"`` outside one."""
    stack = _mode_stack() if _mode_stack is not None else []
    for mode in reversed(stack):
        if isinstance(mode, ExactNorms):
            return mode.kernels
    return "auto"


def exact_norms(kernels: str = "auto") -> ExactNorms:
    """A fresh `ExactNorms` mode, to use as ``with exact_norms(): vmap(...)(...)``."""
    return ExactNorms(kernels)
