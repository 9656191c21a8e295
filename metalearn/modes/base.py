"""The interface of a meta-gradient mode, and the helpers modes share.

A mode is one object that says three things (`MetaGradientMode`):

* ``accumulate(omega, batch, inner_steps, batching, generator)`` — add the mode's meta-gradient of the
  batch's mean val loss (or the direction that replaces it, e.g. Reptile's) to the ``.grad`` of
  ω's parameters, and return the per-task val losses, val metrics and inner losses;
* ``batchings`` — which ways of mapping over the tasks it supports (``"loop"``, ``"vmap"``);
* ``meta_test_problem()`` — the inner problem meta-test must solve for what it trained
  (`metalearn.inner.InnerProblem`: plain, or iMAML's proximal one).

``metalearn.outer.meta_gradient`` calls only these, so a new mode is one class in one file.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from metalearn.inner import InnerProblem
from metalearn.knowledge.builtins import PointInit
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.mapping import resolve_batching
from metalearn.tasks.task import TaskBatch

__all__ = ["MetaGradientMode", "add_grad", "require_theta0_only", "with_kernels"]


class MetaGradientMode:
    """Base of the modes. Subclass it (a frozen dataclass, so `config` can list its options) and
    implement `accumulate`; set ``name``, ``batchings`` and, if meta-test must differ from the
    plain inner loop, `meta_test_problem`."""

    #: the mode's name in a run's identity (``config()["name"]``)
    name: ClassVar[str] = ""
    #: the batchings `accumulate` supports: ``("loop",)`` or ``("loop", "vmap")``
    batchings: ClassVar[tuple[str, ...]] = ("loop",)
    #: whether `accumulate` takes ``chunking=`` (a `metalearn.mapping.Chunking`) and runs its vmap
    #: path chunk by chunk; the loop needs none (it holds one task's graph at a time)
    chunked_vmap: ClassVar[bool] = False
    #: whether the inner gradients are treated as constants (FOMAML); read by callers that
    #: build a plain `meta_loss` from the mode
    first_order: bool = False

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable identity stored with a run: the name and every option."""
        return {"name": self.name, **(asdict(self) if is_dataclass(self) else {})}  # type: ignore[arg-type]

    def run_identity(self) -> dict[str, Any] | None:
        """What `meta_train` stores of the mode in a run's identity (`config`); ``None`` stores nothing."""
        return self.config()

    def resolve_batching(self, omega: MetaKnowledge, batching: str, device: torch.device) -> str:
        """``"loop"`` or ``"vmap"`` for the user's ``batching``, refusing one this mode does not support."""
        return resolve_batching(omega, batching, device, self.batchings, f"mode={self.name!r}")

    def meta_test_problem(self) -> InnerProblem:
        """The inner problem meta-test solves for θ0 trained by this mode (default: the plain inner loop)."""
        return InnerProblem()

    def accumulate(
        self,
        omega: MetaKnowledge,
        batch: TaskBatch,
        inner_steps: int,
        batching: str,
        generator: torch.Generator | None,
        *,
        kernels: str = "auto",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Adds this mode's meta-gradient of ``batch`` to the ``.grad`` of ω's parameters.

        Args:
            omega: the meta-knowledge.
            batch: the tasks (checked by the caller: non-empty, labels within the head).
            inner_steps: inner steps K.
            batching: ``"loop"`` or ``"vmap"``, one of `batchings` (resolved by the caller).
            generator: randomness for a stochastic init.
            kernels: how inner updates are applied (`metalearn.inner.inner_loop`); pass it on to the
                inner loop. A mode of your own may leave it out of its signature: it then runs with
                ``"auto"``, and another choice is refused (`with_kernels`).

        Returns:
            (val losses ``[tasks]``, val metrics ``[tasks]``, inner losses ``[tasks, inner_steps]``), detached
            or not; the caller detaches them.

        Raises:
            NonFiniteError: a NaN/Inf inner or val loss (`metalearn.mapping.check_losses`), raised
                before the gradient of a batch is complete where the mode can.

        A mode with `chunked_vmap` also takes ``chunking=`` (keyword), passed only when the user
        asked for chunks and ``batching`` is ``"vmap"``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement accumulate(omega, batch, inner_steps, ...)")


def with_kernels(fn: Callable, kernels: str, what: str) -> Callable:
    """``fn`` with ``kernels=`` bound: as is for ``"auto"`` (every inner loop's default), bound if ``fn``
    takes the keyword, else a TypeError naming the fix (for a user's mode written without it)."""
    if kernels == "auto":
        return fn
    if "kernels" in inspect.signature(fn).parameters:
        return partial(fn, kernels=kernels)
    raise TypeError(
        f"{what} takes no kernels= keyword, so kernels={kernels!r} cannot reach its inner loop; add "
        "`*, kernels='auto'` to its signature and pass it to inner_loop/adapt_params, or use kernels='auto'"
    )


def add_grad(p: Tensor, g: Tensor) -> None:
    """Adds ``g`` to ``p.grad`` (creating it as a copy of ``g``)."""
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad.add_(g)


def require_theta0_only(omega: MetaKnowledge, mode: str, allow_static: bool) -> None:
    """Refuses an ω with meta-parameters other than θ0 (they would silently get no gradient)."""
    if type(omega.init) is not PointInit:
        raise ValueError(
            f"mode={mode!r} gives a gradient to θ0 = the model's parameters only, so it needs ω built with "
            f"PointInit (MAML's init), not {type(omega.init).__name__}; use mode='unrolled' for other inits"
        )
    model = {id(p) for p in omega.model_params().values()}
    others = [name for name, p in omega.named_parameters() if id(p) not in model]
    if others:
        raise ValueError(
            f"mode={mode!r} gives a gradient to θ0 only, but ω has other meta-parameters that would get none: "
            f"{others[:5]}{' ...' if len(others) > 5 else ''} (e.g. Meta-SGD step sizes, a learned loss). "
            "Use a parameter-free inner optimizer such as InnerSGD(lr), or mode='unrolled'"
        )
    if not allow_static and omega.static_names:
        raise ValueError(
            f"mode={mode!r} differentiates only the adapted parameters, but {omega.static_names[:5]} do not adapt "
            "(AdaptOnly) and would get no meta-gradient; adapt every parameter (AdaptAll) or use mode='unrolled'"
        )
