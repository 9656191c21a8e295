"""The abstract parts that ω is made of. Subclass one to add a new kind of meta-knowledge.

Every part is an ``nn.Module``: the ``nn.Parameter``s it registers are meta-parameters
(trained in the outer loop), anything else it holds is fixed configuration. Every part
must honour the contract that `metalearn.knowledge.check_part` verifies:

* pure — it never changes its inputs in place and keeps no hidden state between calls;
  optimizer state is passed in and returned explicitly;
* differentiable w.r.t. its own meta-parameters (checked by a float64 gradient check);
* explicit randomness — a ``torch.Generator`` is passed in wherever it samples.

θ is always a ``Params = dict[str, Tensor]`` keyed by the model's parameter names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "AdaptPart", "ArchitecturePart", "InitPart", "OptimizerPart", "Params", "State", "apply_updates", "param_key",
]

Params = dict[str, Tensor]
"""θ: task-specific weights keyed by the model's parameter names (never an ``nn.Parameter``)."""
State = dict[str, Tensor]
"""An inner optimizer's state (e.g. momentum buffers), keyed like `Params`."""


def param_key(name: str) -> str:
    """A parameter name usable as an ``nn.ParameterDict`` key (module names may not hold '.')."""
    return name.replace(".", ":")


class InitPart(nn.Module, ABC):
    """Where θ starts: θ0 for each task of a batch.

    The model owned by `MetaKnowledge` is bound with `bind` before first use. A point init
    (MAML) uses the model's own parameters as θ0, so they are meta-parameters; an init that
    does not (e.g. a learned gain over a fresh Kaiming draw) sets `uses_model_parameters`
    to ``False``, and `MetaKnowledge` then keeps the model's parameters out of ω.
    """

    #: Whether the model's own ``nn.Parameter``s are meta-parameters (θ0 or its mean).
    uses_model_parameters: bool = True
    #: Whether θ0 depends on each task's train half (a task-conditioned init, e.g. prototype
    #: heads). If ``True``, `initial_params` takes a keyword ``train=(x, y)``, the batch's train
    #: half with a leading task dimension, and every caller that draws θ0 passes it; inits that
    #: leave this ``False`` are called without it.
    uses_train_data: bool = False

    def bind(self, model: nn.Module) -> None:
        """Called once by `MetaKnowledge` with the model; create meta-parameters here."""

    @abstractmethod
    def initial_params(
        self, model_params: Mapping[str, Tensor], n_tasks: int, generator: torch.Generator | None
    ) -> Params:
        """Returns θ0 for ``n_tasks`` tasks: every tensor has a leading task dimension.

        Args:
            model_params: the model's parameters by name (meta-parameters if
                `uses_model_parameters`).
            n_tasks: number of tasks in the batch.
            generator: the only source of randomness a stochastic init may use.

        An init with `uses_train_data` adds a keyword argument ``train: tuple[Tensor, Tensor]``
        (inputs ``[n_tasks, shots, ...]`` and targets ``[n_tasks, shots, ...]``).
        """


def apply_updates(params: Params, updates: Params) -> Params:
    """θ + u for every parameter: where `OptimizerPart.step` applies the updates of `update`.

    (Plain SGD's step computes θ - lr · g in one go, the same bits; the fused kernels plug in at
    `metalearn.knowledge.rules.fused_step`.)
    """
    return {n: p + updates[n] for n, p in params.items()}


class OptimizerPart(nn.Module):
    """The inner update rule, a pure ``(init_state, update)`` pair, optax-style.

    `update` turns gradients into *updates* (with the state passed in and returned);
    `step`, the one entry point the inner loop calls, applies them with `apply_updates`.
    A part defines `update` (and so composes, see `metalearn.knowledge.rules.chain`), or, for
    a rule that is not a sum θ + u, overrides `step` itself.

    ``params`` and ``grads`` hold only the adapted parameters. `bind` receives their
    template (names and shapes) once, so per-parameter meta-parameters (Meta-SGD's step
    sizes) can be created.
    """

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        """Called once by `MetaKnowledge` with the adapted parameters' templates."""

    def init_state(self, params: Params) -> State:
        """Returns the optimizer state before the first step (empty for plain SGD)."""
        return {}

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        """Returns the updates u (θ_{k+1} = θ_k + u) and the new state; must not modify its inputs.

        Args:
            grads: ∇θ of the inner loss at θ_k (adapted parameters only).
            state: as returned by `init_state` or the previous call.
            params: current θ_k.
            step: the inner step index k (0-based).
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define update(grads, state, params, step) -> (updates, state) "
            "(or override step(params, grads, state, step) -> (params, state))"
        )

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        """Returns the updated parameters and state (`update`, then `apply_updates`); must not modify its inputs.

        Args:
            params: current θ_k (adapted parameters only).
            grads: ∇θ of the inner loss at θ_k.
            state: as returned by `init_state` or the previous `step`.
            step: the inner step index k (0-based).
        """
        updates, state = self.update(grads, state, params, step)
        return apply_updates(params, updates), state


class AdaptPart(nn.Module, ABC):
    """Which parameters of the model adapt in the inner loop (the rest stay at θ0)."""

    @abstractmethod
    def select(self, names: list[str]) -> list[str]:
        """Returns the subset of ``names`` that adapts, in the given order."""


class ArchitecturePart(nn.Module):
    """Meta-parameters that shape the model itself rather than θ (e.g. DARTS mixing logits).

    A model module holds such a part as a registered submodule (its ``architecture``
    attribute) and reads it at forward time. θ is chosen by a filter
    (`metalearn.knowledge.theta_parameters`: every model parameter outside an
    `ArchitecturePart`), so no init samples the part and the inner loop never adapts it.
    `MetaKnowledge` finds every such part in its model and lists it once as
    ``omega.architecture``, so its parameters are meta-parameters (in ``omega.parameters()`` and
    in checkpoints) and receive the meta-gradient through the forward passes of the inner and
    outer loop; ``.to()``, ``.double()`` and ``.eval()`` reach it like any submodule.
    """
