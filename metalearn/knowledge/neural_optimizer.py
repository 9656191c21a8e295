r"""A learned *neural* inner optimizer: a small network maps per-entry features to the update.

As in learned optimizers (Andrychowicz et al., 2016; Metz et al., 2022), one small MLP is shared
by every entry of every adapted tensor (coordinate-wise), so it works for any model size. For
each entry, at inner step k, with gradient g and the running moments

.. math::

    m_k = \beta_1 m_{k-1} + (1 - \beta_1) g_k, \qquad v_k = \beta_2 v_{k-1} + (1 - \beta_2) g_k^2,

with Adam's bias corrections :math:`\hat m_k = m_k / (1 - \beta_1^{k+1})`,
:math:`\hat v_k = v_k / (1 - \beta_2^{k+1})`, the features are
:math:`f = [g,\ \hat m,\ g / \sqrt{\hat v + \epsilon^2},\ \hat m / \sqrt{\hat v + \epsilon^2},\ \tanh(k / \tau_j)_j]`
and the update is

.. math:: u = -\alpha\, g - s\, \mathrm{MLP}(f),

with a learned nominal step size α (as its log) and output scale s. The MLP's last layer starts
at 0, so before meta-training the rule is plain SGD with step size ``lr``; meta-training
(second order through the inner loop, like any other part) learns the correction.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.knowledge.parts import OptimizerPart, Params, State

__all__ = ["NeuralOptimizer"]


class NeuralOptimizer(OptimizerPart):
    """A coordinate-wise MLP inner optimizer (Andrychowicz et al., 2016; Metz et al., 2022).

    State per adapted tensor: ``"<param>/m"`` and ``"<param>/v"`` (the moments above). The
    meta-parameters are the MLP's weights (``layers``), ``log_lr`` (α) and ``output_scale`` (s).

    Args:
        lr: the initial nominal step size α (> 0).
        hidden: widths of the MLP's hidden layers.
        betas: decays (β1, β2) of the momentum and second-moment features (fixed).
        eps: ε of the normalised features.
        timescales: τ_j of the step features tanh(k / τ_j).
        output_scale: initial s.
        seed: seed of the MLP's initial weights (explicit randomness: not torch's global RNG).
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(
        self,
        lr: float,
        hidden: Sequence[int] = (16,),
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        timescales: Sequence[float] = (1.0, 3.0, 10.0),
        output_scale: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"NeuralOptimizer: lr must be positive, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"NeuralOptimizer: betas must lie in [0, 1), got {betas}")
        if not eps > 0 or not all(t > 0 for t in timescales):
            raise ValueError(f"NeuralOptimizer: eps and timescales must be positive, got {eps}, {timescales}")
        self.betas, self.eps, self.timescales = (float(betas[0]), float(betas[1])), float(eps), tuple(timescales)
        widths = [4 + len(self.timescales), *hidden, 1]
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            last = i == len(widths) - 2
            bound = 1.0 / math.sqrt(fan_in)
            uniform = (torch.rand(fan_out, fan_in, generator=generator) * 2 - 1) * bound
            weight = torch.zeros(fan_out, fan_in) if last else uniform  # the last layer at 0: SGD at first
            self.layers.append(nn.Parameter(weight))
            self.layers.append(nn.Parameter(torch.zeros(fan_out)))
        self.log_lr = nn.Parameter(torch.tensor(math.log(lr), dtype=torch.float64))  # bind casts it to θ's dtype
        self.output_scale = nn.Parameter(torch.tensor(float(output_scale)))

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        first = next(iter(adapted.values()), None)
        if first is not None:  # the meta-parameters follow θ's dtype and device
            self.to(dtype=first.dtype, device=first.device)

    def init_state(self, params: Params) -> State:
        state = {}
        for n, p in params.items():
            state[f"{n}/m"] = torch.zeros_like(p)
            state[f"{n}/v"] = torch.zeros_like(p)
        return state

    def _mlp(self, features: Tensor) -> Tensor:
        h = features
        weights = list(self.layers)
        for i in range(0, len(weights), 2):
            h = F.linear(h, weights[i], weights[i + 1])
            if i + 2 < len(weights):
                h = torch.tanh(h)
        return h[..., 0]

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        beta1, beta2 = self.betas
        correct1, correct2 = 1 - beta1 ** (step + 1), 1 - beta2 ** (step + 1)
        updates, new_state = {}, {}
        for n, g in grads.items():
            m = beta1 * state[f"{n}/m"] + (1 - beta1) * g
            v = beta2 * state[f"{n}/v"] + (1 - beta2) * (g * g)
            m_hat = m / correct1
            scale = torch.rsqrt(v / correct2 + self.eps**2)  # smooth at v = 0 (every order of derivative finite)
            steps = [torch.full_like(g, math.tanh(step / tau)) for tau in self.timescales]
            features = torch.stack([g, m_hat, g * scale, m_hat * scale, *steps], dim=-1)
            updates[n] = -(self.log_lr.exp() * g) - self.output_scale * self._mlp(features)
            new_state[f"{n}/m"] = m
            new_state[f"{n}/v"] = v
        return updates, new_state

    def extra_repr(self) -> str:
        hidden = [w.shape[0] for w in list(self.layers)[0:-2:2]]
        return f"hidden={hidden}, betas={self.betas}, eps={self.eps}, timescales={self.timescales}"
