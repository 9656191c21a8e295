"""The fused inner update as a differentiable, vmap-able op backed by the Triton kernels.

`fused_update(kind, inputs)` computes `metalearn.kernels.reference.update` with ONE kernel launch
over every entry of the flat inputs (all adapted tensors of θ at once). It is a
``torch.autograd.Function`` (`FusedUpdate`) whose backward is a second one (`FusedUpdateVJP`, one
more launch) whose own backward is the plain-torch VJP of `metalearn.kernels.reference.update_vjp`
(through ``torch.func.vjp``), so the op is differentiable to every order: second-order
meta-gradients, and gradients of those, pass through it. Both carry an explicit ``vmap`` rule
(``generate_vmap_rule=True`` cannot work: a Triton kernel reads raw storage): under
``torch.func.vmap`` over tasks, the task dimension is folded into the entries and the same kernel
runs once over every task's entries.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from metalearn.kernels import reference
from metalearn.kernels.dispatch import MAX_ENTRIES

__all__ = ["FusedUpdate", "FusedUpdateVJP", "fused_update", "launch", "launch_groups"]

#: the kernels' constexpr flag names of each update's hyper-parameters ("<name>_S": one value for all entries)
_HYPER_FLAGS = {"sgd": ("LR",), "momentum": ("LR", "MU"), "adam": ("LR", "B1", "C1", "B2", "C2", "EPS", "S1", "S2")}


_COMPILED_ON_CPU = (
    "the Triton kernels were loaded for the GPU (TRITON_INTERPRET was not 1 when they were first used), "
    "so they cannot run on CPU tensors; set TRITON_INTERPRET=1 before the first kernel launch, "
    "or use kernels='reference' on CPU"
)


@functools.cache
def _kernels() -> ModuleType:
    """The Triton kernel module, imported at the first launch (Triton fixes interpreter or compiled then)."""
    return importlib.import_module("metalearn.kernels.triton_update")


def _interpreted(kernel: Any) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _run(
    kernel: Any, grid: tuple[int] | None, entries: int, device: torch.device, args: tuple, constexprs: dict
) -> None:
    """Launches ``kernel`` on ``grid`` (None: one program per ``BLOCK`` entries) with a ``BLOCK`` (a power
    of 2) for ``entries`` entries, on ``device``."""
    import triton

    if device.type == "cpu" and not _interpreted(kernel):
        raise RuntimeError(_COMPILED_ON_CPU)
    # the interpreter runs a program as numpy arrays: large blocks are far faster there
    block = max(16, min(1024 if device.type == "cuda" else 65536, triton.next_power_of_2(entries)))
    grid = grid if grid is not None else (triton.cdiv(entries, block),)
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **constexprs, BLOCK=block)
    else:
        kernel[grid](*args, **constexprs, BLOCK=block)


def launch(kernel: Any, n: int, device: torch.device, *args: Any, **constexprs: Any) -> None:
    """Runs an elementwise ``kernel`` over ``n`` entries (``n`` is its last argument): ``cdiv(n, BLOCK)`` programs.

    Raises:
        RuntimeError: CPU tensors, but the kernels were defined compiled (Triton read
            ``TRITON_INTERPRET`` when they were first imported, and it was not 1 then).
    """
    _run(kernel, None, n, device, (*args, n), constexprs)


def launch_groups(kernel: Any, groups: int, entries: int, device: torch.device, *args: Any, **constexprs: Any) -> None:
    """Runs a per-group reduction ``kernel``: one program per group, ``BLOCK`` of its ``entries`` at a time."""
    _run(kernel, (groups,), entries, device, args, constexprs)


def _flags(kind: str, hypers: tuple[Tensor, ...], theta: Tensor) -> dict[str, bool]:
    flags = {f"{name}_S": h.ndim == 0 for name, h in zip(_HYPER_FLAGS[kind], hypers, strict=True)}
    flags["UPCAST"] = theta.dtype in (torch.float16, torch.bfloat16)
    return flags


def _forward(kind: str, nesterov: bool, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    n_tensors, _, n_out = reference.UPDATES[kind]
    inputs = tuple(x.contiguous() for x in inputs)
    theta = inputs[0]
    outs = tuple(torch.empty_like(theta) for _ in range(n_out))
    if theta.numel() == 0:
        return outs
    flags = _flags(kind, inputs[n_tensors:], theta)
    if kind == "momentum":
        flags["NESTEROV"] = nesterov
    launch(getattr(_kernels(), f"{kind}_forward"), theta.numel(), theta.device, *inputs, *outs, **flags)
    return outs


def _backward(
    kind: str, nesterov: bool, hyper: bool, inputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor, ...]
) -> tuple[Tensor, ...]:
    n_tensors, n_hyper, _ = reference.UPDATES[kind]
    theta = inputs[0]
    rest = tuple(x.contiguous() for x in inputs[1:])
    gouts = tuple(g.contiguous() for g in grad_outputs)
    outs = tuple(torch.empty_like(theta) for _ in range(n_tensors - 1 + (n_hyper if hyper else 0)))
    if theta.numel() == 0:
        return outs
    # without hyper-parameter gradients the kernel stores none: their pointers are placeholders
    slots = outs + (outs[0],) * (0 if hyper else n_hyper)
    flags = _flags(kind, inputs[n_tensors:], theta)
    if kind == "momentum":
        flags["NESTEROV"] = nesterov
    launch(getattr(_kernels(), f"{kind}_backward"), theta.numel(), theta.device, *rest, *gouts, *slots,
           HYPER=hyper, **flags)
    return outs


def _fold_tasks(batch_size: int, in_dims: tuple, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Inputs of an elementwise op over N entries (``[N]`` or one value ``[]``), batched over tasks,
    as inputs over the ``batch_size * N`` entries of every task: ``[B*N]`` (tasks first) or ``[]``."""
    logical = [t.ndim - (d is not None) for t, d in zip(tensors, in_dims, strict=True)]
    n = next(t.shape[-1] if d is None else t.movedim(d, 0).shape[1]
             for t, d, k in zip(tensors, in_dims, logical, strict=True) if k == 1)
    folded = []
    for t, d, k in zip(tensors, in_dims, logical, strict=True):
        if k == 1:
            t = t.movedim(d, 0) if d is not None else t.expand(batch_size, n)
            folded.append(t.reshape(batch_size * n))
        elif d is None:
            folded.append(t)
        else:  # one value per task
            folded.append(t.movedim(d, 0)[:, None].expand(batch_size, n).reshape(batch_size * n))
    return tuple(folded)


def _unfold(batch_size: int, outs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    return tuple(o.reshape(batch_size, -1) for o in outs), (0,) * len(outs)


class FusedUpdate(torch.autograd.Function):
    """`metalearn.kernels.reference.update` by one Triton launch; differentiable to every order; vmap rule."""

    @staticmethod
    def forward(kind: str, nesterov: bool, *inputs: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return _forward(kind, nesterov, inputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        kind, nesterov, *tensors = inputs
        ctx.kind, ctx.nesterov = kind, nesterov
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        inputs = ctx.saved_tensors
        n_tensors, n_hyper, _ = reference.UPDATES[ctx.kind]
        needs = ctx.needs_input_grad[2:]
        hyper = any(needs[n_tensors:])
        parts = list(FusedUpdateVJP.apply(ctx.kind, ctx.nesterov, hyper, *inputs, *grad_outputs))
        grads: list[Tensor | None] = [grad_outputs[0], *parts[: n_tensors - 1]]
        for h, part in zip(inputs[n_tensors:], parts[n_tensors - 1:] if hyper else [None] * n_hyper, strict=True):
            grads.append(None if part is None else part.sum() if h.ndim == 0 else part)  # one value: the entries' sum
        return (None, None, *(g if need else None for g, need in zip(grads, needs, strict=True)))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, kind: str, nesterov: bool, *inputs: Tensor) -> tuple:
        folded = _fold_tasks(info.batch_size, in_dims[2:], inputs)
        if folded[0].numel() > MAX_ENTRIES:  # every task together is past 32-bit offsets: plain torch
            return _unfold(info.batch_size, reference.update(kind, folded, nesterov))
        return _unfold(info.batch_size, FusedUpdate.apply(kind, nesterov, *folded))


class FusedUpdateVJP(torch.autograd.Function):
    """`metalearn.kernels.reference.update_vjp` (per entry) by one Triton launch; its backward is plain torch."""

    @staticmethod
    def forward(kind: str, nesterov: bool, hyper: bool, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n_in = sum(reference.UPDATES[kind][:2])
        return _backward(kind, nesterov, hyper, tensors[:n_in], tensors[n_in:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        kind, nesterov, hyper, *tensors = inputs
        ctx.kind, ctx.nesterov, ctx.hyper = kind, nesterov, hyper
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        kind, nesterov = ctx.kind, ctx.nesterov
        n_tensors, n_hyper, _ = reference.UPDATES[kind]
        n_in, n_out = n_tensors + n_hyper, n_tensors - 1 + (n_hyper if ctx.hyper else 0)

        def vjp(*tensors: Tensor) -> tuple[Tensor, ...]:
            return reference.update_vjp(kind, tensors[:n_in], tensors[n_in:], nesterov)[:n_out]

        pullback = torch.func.vjp(vjp, *ctx.saved_tensors)[1]
        return (None, None, None, *pullback(tuple(grad_outputs)))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, kind: str, nesterov: bool, hyper: bool, *tensors: Tensor) -> tuple:
        folded = _fold_tasks(info.batch_size, in_dims[3:], tensors)
        if folded[0].numel() > MAX_ENTRIES:
            n_in = sum(reference.UPDATES[kind][:2])
            n_out = reference.UPDATES[kind][0] - 1 + (reference.UPDATES[kind][1] if hyper else 0)
            outs = reference.update_vjp(kind, folded[:n_in], folded[n_in:], nesterov)[:n_out]
            return _unfold(info.batch_size, outs)
        return _unfold(info.batch_size, FusedUpdateVJP.apply(kind, nesterov, hyper, *folded))


def fused_update(kind: str, inputs: tuple[Tensor, ...], nesterov: bool = False) -> tuple[Tensor, ...]:
    """`metalearn.kernels.reference.update` computed by the Triton kernels (one launch), differentiably.

    Args:
        kind: ``"sgd"``, ``"momentum"`` or ``"adam"`` (`metalearn.kernels.reference.UPDATES`).
        inputs: flat ``[N]`` tensors (θ, g, state...), then hyper-parameters, each ``[N]`` or ``[]``;
            one device and dtype (see `metalearn.kernels.use_triton` for what is served).
        nesterov: Nesterov momentum (``kind="momentum"``).

    Returns:
        θ' and the new state, each ``[N]``.
    """
    n_tensors, n_hyper, _ = reference.UPDATES[kind]
    if len(inputs) != n_tensors + n_hyper:
        raise ValueError(
            f"the {kind!r} update takes {n_tensors} tensors and {n_hyper} hyper-parameters, got {len(inputs)} inputs"
        )
    return FusedUpdate.apply(kind, bool(nesterov), *inputs)

