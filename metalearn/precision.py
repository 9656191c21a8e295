r"""Mixed precision for the meta-step: ``precision="float32" | "bf16" | "fp16"``.

The inner loop, the val forward and the backward through them run under ``torch.autocast``
(matrix products and convolutions in the lower precision); ω, its ``.grad``, the outer
optimizer and the losses stay float32 (autocast keeps parameters float32 and computes
losses in float32; `metalearn.outer.MetaStep` steps the optimizer outside autocast).

* ``"bf16"``: CPU and CUDA. bfloat16 has float32's exponent range, so no loss scaling. On a
  CPU with AMX a Conv-4 meta-gradient was 1.9x faster, with cosine 0.986 to float64's
  (``benchmarks/precision.py`` measures the error per mode).
* ``"fp16"``: CUDA only, with dynamic loss scaling (`LossScaler`, the scheme of
  ``torch.amp.GradScaler``; Micikevicius et al., 2018, "Mixed Precision Training"): the val
  loss's backward is multiplied by a scale S, ω's gradients are divided by S afterwards; a
  step whose meta-gradient is not finite is skipped (ω unchanged, counted in
  `LossScaler.skipped`) and S halves; after ``growth_interval`` finite steps S doubles.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PRECISIONS",
    "LossScaler",
    "autocast",
    "check_precision",
    "scale_for_backward",
]

PRECISIONS = ("float32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The scaler of the meta-step now running, if it scales (a context variable, set only inside
# `LossScaler.scaling`): how `scale_for_backward` reaches the val loss inside a mode without
# changing every mode's signature.
_ACTIVE_SCALER: contextvars.ContextVar[LossScaler | None] = contextvars.ContextVar(
    "metalearn_loss_scaler", default=None
)


def check_precision(precision: object, device: torch.device | None = None) -> str:
    """``precision`` checked: one of `PRECISIONS`, and ``"fp16"`` only on CUDA (when ``device`` is given).

    Raises:
        ValueError: an unknown precision, or ``"fp16"`` on a device other than CUDA.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {PRECISIONS}, got {precision!r}; 'bf16' runs on CPU and CUDA, 'fp16' on CUDA"
        )
    if precision == "fp16" and device is not None and device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (float16 autocast with loss scaling), but ω is on {device.type}; "
            "use precision='bf16' on CPU (same speed-up where the CPU has bfloat16 units, no loss scaling needed)"
        )
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast region of ``precision`` on ``device`` (nothing for ``"float32"``)."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


class _ScaleBackward(torch.autograd.Function):
    """Identity forward; the incoming gradient times ``scale`` in the backward (vmap-safe)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(loss: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        return loss.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def scale_for_backward(loss: Tensor) -> Tensor:
    """``loss`` itself, whose backward is scaled by the running `LossScaler`'s scale, if one is active.

    Called on the val loss by `metalearn.mapping.task_objective`; outside `LossScaler.scaling`
    (every precision but ``"fp16"``) it returns ``loss`` unchanged, the same tensor.
    """
    if torch.compiler.is_compiling():  # dynamo cannot trace a ContextVar; compile= refuses fp16 anyway
        return loss
    scaler = _ACTIVE_SCALER.get()
    if scaler is None:
        return loss
    scaler.applied = True
    return _ScaleBackward.apply(loss, scaler.scale)


class LossScaler:
    """Dynamic loss scale of the meta-gradient (``torch.amp.GradScaler``'s scheme), kept across steps.

    Args:
        init_scale: the first scale S (a power of two keeps the unscaled gradient exact).
        growth_interval: finite steps in a row after which S doubles.
        backoff: factor S is multiplied with after a skipped step.

    Attributes:
        scale: the current S.
        skipped: steps skipped so far because their meta-gradient was not finite.
        applied: whether the last `scaling` block scaled a backward (set by `scale_for_backward`).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 2000, backoff: float = 0.5) -> None:
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale}")
        if not 0 < backoff < 1:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be at least 1, got {growth_interval}")
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.backoff = backoff
        self.skipped = 0
        self.applied = False
        self._good_steps = 0

    @contextlib.contextmanager
    def scaling(self) -> Iterator[None]:
        """Within it, `scale_for_backward` multiplies the val loss's backward by `scale`."""
        self.applied = False
        token = _ACTIVE_SCALER.set(self)
        try:
            yield
        finally:
            _ACTIVE_SCALER.reset(token)

    def unscale_(self, grads: list[Tensor]) -> None:
        """Divides ``grads`` in place by the scale of the last `scaling` block (if it scaled)."""
        if self.applied and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """After a step: count and back off on a non-finite meta-gradient, grow after enough finite ones."""
        if not finite:
            self.skipped += 1
            self.scale *= self.backoff
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale *= 2.0
            self._good_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        """What a checkpoint needs to continue with the same scale."""
        return {"scale": self.scale, "skipped": self.skipped, "good_steps": self._good_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale = float(state["scale"])
        self.skipped = int(state["skipped"])
        self._good_steps = int(state["good_steps"])
