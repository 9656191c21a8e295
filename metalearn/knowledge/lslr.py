r"""MAML++'s per-step inner-loop parts (Antoniou et al., 2019, "How to train your MAML").

* `PerStepLR` (LSLR): a learned step size per parameter tensor ("layer") and per inner step,
  :math:`\theta_{k+1} = \theta_k - \alpha_{n,k} \nabla_{\theta_n}`.
* `PerStepNormWeights` (BNWB): per-step batch-norm weights and biases. The norm's γ and β are
  not descended by gradient in the inner loop; θ_k carries the meta-learned γ_k, β_k of step k
  (θ_0's are the model's own), every other parameter is updated by the optimizer it wraps.
* `norm_parameter_names`: the affine parameters of a model's norm layers, the names
  `PerStepNormWeights` takes over.

Steps beyond the table (meta-test with more inner steps than meta-training) reuse the last
step's values.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from metalearn.knowledge.parts import OptimizerPart, Params, State, param_key

__all__ = ["PerStepLR", "PerStepNormWeights", "norm_parameter_names"]

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)


def _check_steps(cls: str, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{cls}: steps must be an int >= 1 (the inner steps K of meta-training), got {steps!r}")


class PerStepLR(OptimizerPart):
    r"""Learned per-layer, per-step inner step sizes (MAML++'s LSLR; Antoniou et al., 2019).

    .. math:: \theta_{n, k+1} = \theta_{n, k} - \alpha_{n, \min(k, K-1)}\, g_{n, k}

    for every adapted parameter tensor n and inner step k; α is a meta-parameter of shape
    ``[K]`` per tensor, stored in ``lrs`` (keyed by `param_key`), initialised to ``lr`` and not
    constrained to be positive (as in the paper's code). Steps k ≥ K use α of step K − 1.

    Args:
        lr: initial step size of every layer and step.
        steps: K, the inner steps of meta-training.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def __init__(self, lr: float, steps: int) -> None:
        super().__init__()
        _check_steps("PerStepLR", steps)
        self.init_lr, self.steps = float(lr), steps
        self.lrs = nn.ParameterDict()

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        for name, p in adapted.items():
            table = torch.full((self.steps,), self.init_lr, dtype=p.dtype, device=p.device)
            self.lrs[param_key(name)] = nn.Parameter(table)

    def lr(self, name: str, step: int) -> Tensor:
        """α of parameter ``name`` at inner step ``step``."""
        return self.lrs[param_key(name)][min(step, self.steps - 1)]

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        return {n: -(self.lr(n, step) * g) for n, g in grads.items()}, state

    def extra_repr(self) -> str:
        return f"lr={self.init_lr}, steps={self.steps}"


def norm_parameter_names(model: nn.Module) -> list[str]:
    """Names of the affine parameters (weight, bias) of ``model``'s norm layers, in its order.

    Norm layers: `metalearn.models.BatchNorm` and torch's batch, instance, layer and group norms.
    """
    from metalearn.models.batchnorm import BatchNorm  # models sits below knowledge; imported on use

    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, (BatchNorm, *_NORM_TYPES)):
            for pname, _ in module.named_parameters(recurse=False):
                names.append(f"{module_name}.{pname}" if module_name else pname)
    return names


class PerStepNormWeights(OptimizerPart):
    r"""Per-step norm weights and biases (MAML++'s BNWB), around an inner optimizer for the rest.

    For the parameters matching ``names`` (a norm layer's γ and β), the inner step does not
    descend the gradient: it sets them to the learned values of the next step,

    .. math:: \gamma_{k+1} = \Gamma_{\min(k, K-1)}, \qquad \beta_{k+1} = B_{\min(k, K-1)},

    so θ_k is normalised with γ_k, β_k (θ_0 with the model's own, meta-learned by the init) in
    both its train and its val forward. Γ and B are meta-parameters of shape ``[K, C]`` in
    ``values`` (keyed by `param_key`), initialised from the model's values. Every other adapted
    parameter is updated by ``optimizer`` (e.g. `PerStepLR`), which is bound to those only.

    The paper's code uses γ, β of step k for the val loss *after* update k (one table row fewer);
    here θ_{k+1} always carries the values of step k + 1, so every θ_k is one consistent model.
    Per-step running statistics (BNRS) are not kept: norms use batch statistics, MAML-style.

    Args:
        optimizer: the rule for the other adapted parameters.
        steps: K, the inner steps of meta-training.
        names: patterns (``fnmatch``) of the per-step parameters, e.g. the output of
            `norm_parameter_names`; each must match an adapted parameter.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, optimizer: OptimizerPart, steps: int, names: Sequence[str]) -> None:
        super().__init__()
        _check_steps("PerStepNormWeights", steps)
        if isinstance(names, str) or not names:
            raise ValueError(
                "PerStepNormWeights needs a list of parameter-name patterns, e.g. norm_parameter_names(model); "
                f"got {names!r}"
            )
        if not isinstance(optimizer, OptimizerPart):
            raise TypeError(f"PerStepNormWeights wraps an OptimizerPart, got {type(optimizer).__name__}")
        self.optimizer, self.steps, self.patterns = optimizer, steps, tuple(names)
        self.values = nn.ParameterDict()
        self.per_step: list[str] = []

    def _is_per_step(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        unmatched = [p for p in self.patterns if not any(fnmatch.fnmatchcase(n, p) for n in adapted)]
        if unmatched:
            raise ValueError(
                f"PerStepNormWeights: patterns {unmatched} match no adapted parameter of {list(adapted)}; "
                "pass names of adapted norm parameters (norm_parameter_names(model))"
            )
        self.per_step = [n for n in adapted if self._is_per_step(n)]
        for name in self.per_step:
            template = adapted[name].detach()
            self.values[param_key(name)] = nn.Parameter(template.expand(self.steps, *template.shape).clone())
        self.optimizer.bind({n: t for n, t in adapted.items() if n not in self.per_step})

    def _others(self, tensors: Mapping[str, Tensor]) -> Params:
        return {n: t for n, t in tensors.items() if n not in self.per_step}

    def init_state(self, params: Params) -> State:
        return self.optimizer.init_state(self._others(params))

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        others, state = self.optimizer.step(self._others(params), self._others(grads), state, step)
        row = min(step, self.steps - 1)
        stepped = {n: self.values[param_key(n)][row] for n in self.per_step if n in params}
        return {n: stepped[n] if n in stepped else others[n] for n in params}, state

    def extra_repr(self) -> str:
        return f"steps={self.steps}, names={list(self.patterns)}"
