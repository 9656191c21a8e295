r"""``compile=``: the meta-gradient of a step through ``torch.compile``, cached across steps.

Double backward (``autograd.grad(create_graph=True)`` then ``backward()``) is not supported by
``torch.compile``'s AOT autograd, so the compiled step is the functional form of MAML's
meta-gradient (Finn et al., 2017):

.. math:: g = \nabla_\omega\, \frac{1}{B}\sum_i \mathcal{L}\big(D^{val}_i;\ \theta_K(\omega, D^{train}_i)\big)

as ``torch.func.grad`` over the ``torch.func.vmap``-ped task objective (the inner gradients by
``torch.func.grad_and_value`` inside), traced with ``fullgraph=True`` under
``torch._dynamo.config.trace_autograd_ops`` (patched for the call only, restored after) and called
under ``torch.no_grad()``, so that it compiles to an inference graph (it computes its gradient
itself: an autograd graph to ω around it would only save activations for nothing). It
is the same function as the eager vmap path, so it gives the same meta-gradient (the tests
compare them in float64).

Where it cannot compile, the eager step runs instead, with a `CompileFallbackWarning` that
says why: another mode than ``"unrolled"``/``"first_order"``, the loop batching, an init other
than MAML's `PointInit`, norm layers (their exact vmap formula is not applied while tracing),
fp16 loss scaling, or a trace that failed (the error is quoted).

Cold compile takes tens of seconds even for a small MLP (``benchmarks/meta_iteration.py``
reports it); later steps with the same shapes reuse the compiled code.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge, native_norm_layers
from metalearn.mapping import task_in_dims, task_objective
from metalearn.models.batchnorm import BatchNorm
from metalearn.modes import MetaGradientMode, Unrolled
from metalearn.tasks.task import TaskBatch

__all__ = [
    "COMPILE_BACKENDS",
    "CompileFallbackWarning",
    "CompiledMetaGradient",
    "CompiledOuterStep",
    "check_compile",
    "compiles_outer_step",
    "compile_blocker",
]

#: what ``compile=`` accepts besides ``True``/``False`` (a ``torch.compile`` backend name)
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


class CompileFallbackWarning(UserWarning):
    """``compile=True`` was asked for, but this step runs eagerly (the message says why)."""


def check_compile(value: object) -> str | None:
    """``compile=`` as a backend name (``True`` is ``"inductor"``) or ``None`` (``False``).

    Raises:
        ValueError: anything else.
    """
    if value is False or value is None:
        return None
    if value is True:
        return "inductor"
    if isinstance(value, str) and value in COMPILE_BACKENDS:
        return value
    raise ValueError(
        f"compile must be True, False or a torch.compile backend in {COMPILE_BACKENDS}, got {value!r}; "
        "pass compile=True (inductor) or compile='aot_eager' (traces but does not generate code: quick to start)"
    )


def compile_blocker(omega: MetaKnowledge, mode: MetaGradientMode, batching: str, precision: str) -> str | None:
    """Why the meta-step of ``omega`` cannot be compiled, or ``None`` if it can."""
    if type(mode) is not Unrolled:
        return f"mode={mode.name!r} is not compiled (only 'unrolled' and 'first_order' are)"
    if batching != "vmap":
        return "batching='loop' is not compiled (the compiled form is torch.func.grad over the vmapped objective)"
    if type(omega.init) is not PointInit or omega.init.uses_train_data:
        return f"the init {type(omega.init).__name__} is not compiled (only MAML's PointInit is)"
    norms = native_norm_layers(omega.model) + [n for n, m in omega.model.named_modules() if isinstance(m, BatchNorm)]
    if norms:
        return f"norm layers {norms[:3]} are not compiled (their exact vmap formula is not applied while tracing)"
    if precision == "fp16":
        return "precision='fp16' (loss scaling) is not compiled"
    return None


class _MetaObjective(nn.Module):
    """ω's mean val loss over a batch as a module, so ``torch.func.functional_call`` can swap ω's parameters."""

    def __init__(self, omega: MetaKnowledge, adapt_fn: Callable[..., Any]) -> None:
        super().__init__()
        self.omega = omega
        self.adapt_fn = adapt_fn

    def forward(
        self, x_tr: Tensor, y_tr: Tensor, x_val: Tensor, y_val: Tensor, inner_steps: int, first_order: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        theta0 = self.omega.model_params()
        objective = partial(task_objective, adapt_fn=self.adapt_fn)
        in_dims = task_in_dims(dict.fromkeys(theta0))
        out = torch.func.vmap(objective, in_dims=in_dims)(
            self.omega, theta0, x_tr, y_tr, x_val, y_val, inner_steps, first_order
        )
        return out[0].mean(), out


class CompiledMetaGradient:
    """The compiled meta-gradient of one ω, kept across steps (recompiled only for new shapes).

    Args:
        omega: the meta-knowledge (not copied: its parameters are listed at the first call and read at
            every call).
        mode: an `Unrolled` mode.
        backend: a ``torch.compile`` backend (``"inductor"`` by default).

    Attributes:
        compile_seconds: wall time of the first call (the cold compile and one step), or ``None``.
        failed: why compiling failed (a `CompileFallbackWarning` was given), or ``None``.
    """

    def __init__(self, omega: MetaKnowledge, mode: Unrolled, backend: str = "inductor") -> None:
        self.omega = omega
        self.mode = mode
        self.compile_seconds: float | None = None
        self.failed: str | None = None
        self._named: dict[str, Tensor] | None = None  # ω's parameters by name, listed at the first call
        objective = _MetaObjective(omega, mode.adapt_task)

        def meta_grad(
            params: dict[str, Tensor], *batch: Any
        ) -> tuple[dict[str, Tensor], tuple[Tensor, ...], Tensor]:
            def mean_val_loss(p: dict[str, Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
                # ω's other parameters and buffers stay as they are (strict=False)
                return torch.func.functional_call(objective, p, batch, strict=False)

            grads, aux = torch.func.grad(mean_val_loss, has_aux=True)(params)
            aux = tuple(t.detach() for t in aux)
            return grads, aux, _step_summary(aux, list(grads.values()), batch[4]).detach()

        self._compiled = torch.compile(meta_grad, fullgraph=True, dynamic=False, backend=backend)

    def __call__(
        self, batch: TaskBatch, inner_steps: int
    ) -> tuple[list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor, Tensor], Tensor] | None:
        """ω's meta-gradients as (parameter, gradient) pairs, (val losses, metrics, inner losses) and
        their `_step_summary`, all computed in the compiled code; ``None`` if compiling failed (then the
        caller runs the eager step; warned once). ω's parameters are listed at the first call, as a
        `metalearn.outer.MetaStep` lists them once (not a walk over ω's modules at every step); one
        frozen between steps (``requires_grad_(False)``) is left out from then on."""
        if self.failed is not None:
            return None
        if self._named is None:
            self._named = dict(self.omega.named_parameters())
        named = {n: p for n, p in self._named.items() if p.requires_grad}
        params: dict[str, Tensor] = {f"omega.{n}": p for n, p in named.items()}
        args = (*batch.train, *batch.val, inner_steps, self.mode.first_order)
        began = time.perf_counter()
        try:
            # scoped: double backward inside the trace needs dynamo to trace autograd ops. Under no_grad
            # (torch.func.grad inside ignores it): with ω's parameters requiring grad, AOT autograd would
            # compile a forward/backward pair that saves every activation for a backward never run
            # (the sinusoid step took ~2x as long so)
            with torch._dynamo.config.patch(trace_autograd_ops=True), torch.no_grad():
                grads, aux, summary = self._compiled(params, *args)
        except Exception as err:  # noqa: BLE001 - any trace/compile failure falls back to the eager step
            lines = [line.strip() for line in str(err).splitlines() if line.strip()][:2]  # e.g. the backend's own error
            self.failed = f"{type(err).__name__}: {' '.join(lines)}"
            warnings.warn(
                f"compile=True: the meta-step could not be compiled ({self.failed[:300]}); it runs eagerly. "
                "Pass compile=False to silence this",
                CompileFallbackWarning,
                stacklevel=3,
            )
            return None
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - began
        pairs = [(named[n.removeprefix("omega.")], g) for n, g in grads.items()]
        return pairs, aux, summary  # type: ignore[return-value]


def _step_summary(outputs: tuple[Tensor, ...], grads: list[Tensor], inner_steps: int) -> Tensor:
    """What a meta-step reports, as one tensor: mean val loss, mean val metric, mean inner loss before the
    first and before the last inner step (NaN without inner steps), the 2-norm of ``grads`` (as
    `metalearn.outer` computes it eagerly: the norm of the per-tensor norms) and 1.0 if every loss
    is finite, else 0.0 — so the compiled step reads it all with one host sync.

    Args:
        outputs: (val losses ``[tasks]``, val metrics ``[tasks]``, inner losses ``[tasks, inner_steps]``).
        grads: the meta-gradient's tensors.
        inner_steps: K.
    """
    val_losses, metrics, inner = outputs
    first = inner[:, 0].mean() if inner_steps else torch.full_like(val_losses[0], float("nan"))
    last = inner[:, -1].mean() if inner_steps > 1 else first
    norm = (
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).to(val_losses.dtype)
        if grads else val_losses.new_zeros(())
    )
    finite = (torch.isfinite(inner).all() & torch.isfinite(val_losses).all()).to(val_losses.dtype)
    return torch.stack([val_losses.mean(), metrics.mean().to(val_losses.dtype), first, last, norm, finite])


def _hyper_parameters(optimizer: torch.optim.Optimizer) -> tuple:
    """The optimizer's settings that compiled code takes as constants: every non-parameter entry of each
    param group (lr, betas, ...), by value, or by identity for a tensor (read at run time, so a
    scheduler may change it in place)."""
    return tuple(
        tuple((k, id(v) if isinstance(v, Tensor) else v) for k, v in group.items() if k != "params")
        for group in optimizer.param_groups
    )


def _adam_at_zero_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's Adam (or AdamW, its subclass), whose compiled step divides by the
    learning rate, with a learning rate of exactly 0 (a float or a tensor) in a param group."""
    if not isinstance(optimizer, torch.optim.Adam):
        return False
    return any(float(group.get("lr", 1.0)) == 0.0 for group in optimizer.param_groups)


def compiles_outer_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `CompiledOuterStep` compiles ``optimizer``'s step: for torch.optim's own optimizers (their
    step is written for ``torch.compile``; LBFGS, which needs a closure, excepted). An optimizer of
    another class steps eagerly: how its step would split into graphs, and whether a failure to
    compile a later piece could come after an update, is not known."""
    cls = type(optimizer)
    return cls.__module__.startswith("torch.optim.") and cls is not torch.optim.LBFGS


class CompiledOuterStep:
    """``outer_optimizer.step()`` through ``torch.compile``, for a `metalearn.outer.MetaStep` with ``compile=``.

    One optimizer step is many small ops per parameter (Adam: about ten), run one by one eagerly on the
    CPU; compiled, they are a few fused kernels. The
    compiled code holds the learning rate and the other float settings as constants, so changing one
    (an LR scheduler) would compile again at every change: when the settings differ from those of
    the first call, this step runs the optimizer eagerly from then on, with a
    `CompileFallbackWarning` saying so (a learning rate held in a tensor, changed in place, stays
    compiled). Adam (and AdamW) with a learning rate of 0 in any group steps eagerly too, warned: traced,
    it takes its capturable form, which divides by the learning rate (with lr=0 every parameter became
    NaN, torch 2.13). Where compiling fails, the eager step runs too (warned once). The compiled update
    equals the eager one up to rounding (tested), with one difference of torch's own: compiled, Adam
    and its kin compute the bias corrections 1 - β^t in their float32 ``step`` tensor instead of in
    Python floats, so the first updates' size differs by up to ~5e-5 relatively (1 - 0.999 in
    float32), less as t grows.

    Args:
        optimizer: the outer optimizer, one of torch.optim's (`compiles_outer_step`); not copied: its
            parameters and state are updated in place.
        backend: a ``torch.compile`` backend.

    Raises:
        TypeError: an optimizer that `compiles_outer_step` refuses.

    Attributes:
        eager: why the optimizer now steps eagerly (a warning was given), or ``None``.
        compile_seconds: wall time of the first compiled step (the cold compile and one step), or ``None``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, backend: str = "inductor") -> None:
        self.optimizer = optimizer
        self.eager: str | None = None
        self.compile_seconds: float | None = None
        self._settings: tuple | None = None
        if not compiles_outer_step(optimizer):
            raise TypeError(
                f"CompiledOuterStep compiles torch.optim's own optimizers, not {type(optimizer).__name__}; "
                "step it eagerly (optimizer.step())"
            )
        # torch.optim's step breaks the graph on purpose around its body (torch/optim/optimizer.py,
        # `_use_grad`): the update itself is one graph, so a failure to compile it comes before any update
        self._compiled = torch.compile(optimizer.step, backend=backend)

    def __call__(self) -> None:
        if self.eager is None and _adam_at_zero_lr(self.optimizer):
            # traced, torch's Adam takes its capturable form, which divides by the learning rate
            # (`eps / step_size_neg`): a zero lr would make every parameter NaN
            name = type(self.optimizer).__name__
            self._fall_back(f"a param group's learning rate is 0, which torch's compiled {name} step divides by "
                            "(ω would become NaN)")
        if self.eager is None:
            settings = _hyper_parameters(self.optimizer)
            if self._settings is None:
                self._settings = settings
            elif settings != self._settings:
                self._fall_back("its settings changed since the first step (e.g. an LR scheduler set a new lr; "
                                "a learning rate held in a tensor and changed in place stays compiled)")
        if self.eager is not None:
            self.optimizer.step()
            return
        began = time.perf_counter()
        try:
            self._compiled()
        except Exception as err:  # noqa: BLE001 - a trace/compile failure (before any update): the eager step
            lines = [line.strip() for line in str(err).splitlines() if line.strip()][:2]
            self._fall_back(f"it could not be compiled ({type(err).__name__}: {' '.join(lines)[:300]})")
            self.optimizer.step()
            return
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - began

    def _fall_back(self, why: str) -> None:
        self.eager = why
        warnings.warn(
            f"compile=True: the outer optimizer ({type(self.optimizer).__name__}) steps eagerly from now on: {why}",
            CompileFallbackWarning,
            stacklevel=4,
        )
