r"""CAVIA's context parameters (Zintgraf et al., 2019, "Fast context adaptation via meta-learning").

CAVIA adapts only a few *context parameters* φ fed to the model as extra inputs; they are reset
to 0 for every task, and the model's weights are meta-learned only (never adapted):

.. math:: \phi_0 = 0, \quad \phi_{k+1} = \phi_k - \alpha \nabla_\phi \mathcal{L}(D^{train}; \theta, \phi_k), \quad
          \min_\theta \mathcal{L}(D^{val}; \theta, \phi_K)

* `ConcatContext` — a model wrapper holding φ (the parameter ``context``) and concatenating it
  to the input along the feature / channel dimension (the paper's choice for regression);
* `ContextInit` — the init: the model's own weights (meta-learned, as `PointInit`) and φ_0 = 0.

With ``AdaptOnly("context")`` (the `metalearn.knowledge.cavia` recipe) this is CAVIA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metalearn.knowledge.parts import InitPart, Params

__all__ = ["ConcatContext", "ContextInit"]


class ConcatContext(nn.Module):
    """``body(cat([x, φ], dim=1))``: the context φ (``num_context`` values) appended to every example.

    For inputs ``[N, F]`` φ becomes ``num_context`` extra features; for ``[N, C, H, W]`` it becomes
    ``num_context`` constant channels. ``body`` must accept the wider input (e.g.
    ``MLP((1 + num_context, 40, 40, 1))``).

    φ is the parameter ``context``. It is the task-specific part: `ContextInit` starts every task
    at φ = 0 and it is not a meta-parameter (``requires_grad`` is off).

    Args:
        body: the model that reads the input and the context.
        num_context: number of context parameters.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, body: nn.Module, num_context: int) -> None:
        super().__init__()
        if isinstance(num_context, bool) or not isinstance(num_context, int) or num_context < 1:
            raise ValueError(f"ConcatContext: num_context must be an int >= 1, got {num_context!r}")
        self.body = body
        dtype = next((p.dtype for p in body.parameters()), torch.get_default_dtype())
        self.context = nn.Parameter(torch.zeros(num_context, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2:
            raise ValueError(f"ConcatContext expects inputs [N, features, ...], got shape {tuple(x.shape)}")
        shape = (x.shape[0], self.context.shape[0], *x.shape[2:])
        phi = self.context.reshape(1, -1, *([1] * (x.ndim - 2))).expand(shape)
        return self.body(torch.cat([x, phi.to(x.dtype)], dim=1))


class ContextInit(InitPart):
    """θ0: the model's own parameters (meta-learned, as `PointInit`), the context ones at 0 for every task.

    Args:
        names: the context parameters (default ``("context",)``, `ConcatContext`'s).
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, names: Sequence[str] = ("context",)) -> None:
        super().__init__()
        if isinstance(names, str) or not names:
            raise ValueError(f"ContextInit needs a list of context parameter names, got {names!r}")
        self.names = tuple(names)

    def bind(self, model: nn.Module) -> None:
        known = [n for n, _ in model.named_parameters()]
        missing = [n for n in self.names if n not in known]
        if missing:
            raise ValueError(
                f"ContextInit: the model has no parameters {missing} (it has {known}); wrap it in "
                "ConcatContext(model, num_context) or name its context parameters"
            )

    def initial_params(
        self, model_params: Mapping[str, Tensor], n_tasks: int, generator: torch.Generator | None
    ) -> Params:
        theta0 = {}
        for name, p in model_params.items():
            value = torch.zeros_like(p) if name in self.names else p
            theta0[name] = value.expand(n_tasks, *p.shape)
        return theta0
