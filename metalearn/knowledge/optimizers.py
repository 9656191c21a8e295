r"""Inner optimizers with learned hyper-parameters, and a learned choice among update rules.

Each is an `OptimizerPart`: a pure, differentiable ``step(params, grads, state, k)`` with
its state passed in and returned (a flat ``dict[str, Tensor]`` keyed ``"<param>/<buffer>"``).
Hyper-parameters named in ``learn`` are meta-parameters, stored unconstrained so that any
value the outer optimizer reaches is valid:

* positive ones (learning rate, Adam's ε) as their log: ``lr = exp(log_lr)``;
* ones in (0, 1) (momentum, Adam's β1 and β2) as their logit: ``β = sigmoid(logit_β)``.

Hyper-parameters not learned stay plain floats, so with nothing learned each rule is
exactly its ``torch.optim`` counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from metalearn.knowledge.parts import OptimizerPart, Params, State, param_key
from metalearn.knowledge.temperature import AnnealedTemperature

__all__ = [
    "HYPER_GROUPS",
    "Adam",
    "Choice",
    "HyperOptimizer",
    "MomentumSGD",
    "OptimizerMixture",
    "geometric_anneal",
]

#: How learned hyper-parameters are shared: one for all parameters, one per parameter
#: tensor, or one per entry (like Meta-SGD's step sizes).
HYPER_GROUPS = ("shared", "tensor", "element")
_SHARED = "shared"
_POSITIVE, _UNIT = "positive", "unit"


def _to_raw(value: float, constraint: str) -> float:
    return math.log(value) if constraint == _POSITIVE else math.log(value / (1.0 - value))


def _from_raw(raw: Tensor, constraint: str) -> Tensor:
    return raw.exp() if constraint == _POSITIVE else torch.sigmoid(raw)


def _safe_sqrt(v: Tensor) -> Tensor:
    """``sqrt(v)`` for v >= 0 whose derivative at exactly 0 is 0 instead of inf.

    Same forward value as ``v.sqrt()``. An entry of v is exactly 0 only when every inner
    gradient of that entry so far was exactly 0 (e.g. a conv bias right before batch norm);
    there ``sqrt``'s infinite derivative times a zero upstream gradient would make the
    meta-gradient NaN. Written with the double-``where`` trick so every order of derivative
    stays finite.
    """
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))


class HyperOptimizer(OptimizerPart):
    """Base of inner optimizers whose hyper-parameters may be meta-learned.

    Subclasses declare ``HYPER = {name: "positive" | "unit"}`` and read hyper-parameters in
    `step` with ``self.hyper(name, param_name)``. Learned ones live in ``nn.ParameterDict``\\ s
    named ``log_<name>`` (positive) or ``logit_<name>`` (unit interval), created in `bind`
    with the adapted parameters' dtype and device, keyed ``"shared"`` or by `param_key`.

    Args:
        values: initial value of every hyper-parameter.
        learn: names of the hyper-parameters to meta-learn.
        per: one of `HYPER_GROUPS`.
    """

    HYPER: dict[str, str] = {}
    #: Names that ``learn`` accepts as shorthand for several hyper-parameters.
    ALIASES: dict[str, tuple[str, ...]] = {}

    def __init__(self, values: Mapping[str, float], learn: Iterable[str], per: str) -> None:
        super().__init__()
        if per not in HYPER_GROUPS:
            raise ValueError(f"per must be one of {HYPER_GROUPS}, got {per!r}")
        self.per = per
        learn = (learn,) if isinstance(learn, str) else tuple(learn)
        learned: list[str] = []
        for name in learn:
            for n in self.ALIASES.get(name, (name,)):
                if n not in self.HYPER:
                    known = sorted({*self.HYPER, *self.ALIASES})
                    raise ValueError(f"{type(self).__name__} cannot learn {name!r}; learnable: {known}")
                if n not in learned:
                    learned.append(n)
        self.learned: tuple[str, ...] = tuple(learned)
        self.initial: dict[str, float] = {}
        for name, constraint in self.HYPER.items():
            value = float(values[name])
            if constraint == _POSITIVE and not value > 0:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {value}")
            if constraint == _UNIT:
                if name in self.learned and not 0 < value < 1:
                    raise ValueError(
                        f"{type(self).__name__}: a learned {name} must lie strictly inside (0, 1) (it is stored as "
                        f"its logit), got {value}; start from e.g. 0.5, or leave {name!r} out of learn to keep it fixed"
                    )
                if not 0 <= value < 1:
                    raise ValueError(f"{type(self).__name__}: {name} must lie in [0, 1), got {value}")
            self.initial[name] = value
        for name in self.learned:
            setattr(self, self._raw_name(name), nn.ParameterDict())

    def _raw_name(self, name: str) -> str:
        return ("log_" if self.HYPER[name] == _POSITIVE else "logit_") + name

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        first = next(iter(adapted.values()), None)
        like = {"dtype": first.dtype, "device": first.device} if first is not None else {}
        for name in self.learned:
            raw_value = _to_raw(self.initial[name], self.HYPER[name])
            table: nn.ParameterDict = getattr(self, self._raw_name(name))
            if self.per == _SHARED:
                table[_SHARED] = nn.Parameter(torch.tensor(raw_value, **like))
                continue
            for pname, p in adapted.items():
                shape = p.shape if self.per == "element" else ()
                table[param_key(pname)] = nn.Parameter(torch.full(shape, raw_value, dtype=p.dtype, device=p.device))

    def hyper(self, name: str, param_name: str | None = None) -> Tensor | float:
        """The current value of hyper-parameter ``name`` used for parameter ``param_name``.

        A plain float if it is not learned; otherwise a differentiable tensor (a scalar, or
        θ's shape with ``per="element"``). ``param_name`` may be omitted with ``per="shared"``.
        """
        if name not in self.learned:
            return self.initial[name]
        table: nn.ParameterDict = getattr(self, self._raw_name(name))
        if self.per == _SHARED:
            key = _SHARED
        elif param_name is None:
            raise ValueError(
                f"{name} is learned per {self.per}: name the parameter, e.g. hyper({name!r}, 'head.weight')"
            )
        else:
            key = param_key(param_name)
        if key not in table:
            raise RuntimeError(
                f"{type(self).__name__} has no learned {name} for {param_name!r}: it is not bound to that parameter "
                "(build the MetaKnowledge with this optimizer, or call bind(adapted_params) first)"
            )
        return _from_raw(table[key], self.HYPER[name])

    def extra_repr(self) -> str:
        values = ", ".join(f"{k}={v}" for k, v in self.initial.items())
        return f"{values}, learn={self.learned}, per={self.per!r}"


class MomentumSGD(HyperOptimizer):
    r"""SGD with momentum (``torch.optim.SGD``'s convention) and learnable lr and momentum.

    .. math::

        b_{k} = \mu\, b_{k-1} + g_k \quad (b_{-1} = 0,\ \text{so } b_0 = g_0), \qquad
        \theta_{k+1} = \theta_k - \alpha\, b_k

    (Nesterov: :math:`\theta_{k+1} = \theta_k - \alpha (g_k + \mu b_k)`; Sutskever et al., 2013.)
    With nothing learned, a trajectory equals ``torch.optim.SGD(lr, momentum, nesterov)``'s
    step for step. No weight decay or dampening. State: ``"<param>/momentum"``.

    Args:
        lr: initial step size α (> 0; learned as log α).
        momentum: initial μ (learned as logit μ, so inside (0, 1); a fixed μ may be 0).
        learn: which of ``"lr"``, ``"momentum"`` are meta-parameters.
        per: one of `HYPER_GROUPS`: share each hyper-parameter, one per tensor, or one per entry.
        nesterov: Nesterov momentum.
    """

    HYPER = {"lr": _POSITIVE, "momentum": _UNIT}

    def __init__(
        self,
        lr: float,
        momentum: float = 0.9,
        learn: Iterable[str] = ("lr", "momentum"),
        per: str = "shared",
        nesterov: bool = False,
    ) -> None:
        super().__init__({"lr": lr, "momentum": momentum}, learn, per)
        self.nesterov = bool(nesterov)

    def init_state(self, params: Params) -> State:
        return {f"{n}/momentum": torch.zeros_like(p) for n, p in params.items()}

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        new_params, new_state = {}, {}
        for n, p in params.items():
            lr, mu = self.hyper("lr", n), self.hyper("momentum", n)
            buf = mu * state[f"{n}/momentum"] + grads[n]
            update = grads[n] + mu * buf if self.nesterov else buf
            new_params[n] = p - lr * update
            new_state[f"{n}/momentum"] = buf
        return new_params, new_state

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nesterov=True" if self.nesterov else "")


class Adam(HyperOptimizer):
    r"""Adam (Kingma & Ba, 2015) with learnable lr, β1, β2 and ε; ``torch.optim.Adam``'s exact update.

    With :math:`t = k + 1` at inner step k:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g^2, \quad
        \theta_t = \theta_{t-1} - \frac{\alpha}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    lr and ε are learned as logs, β1 and β2 as logits. The square root is exactly ``torch``'s
    except that its derivative at v = 0 (an entry whose inner gradients were all exactly 0)
    is taken as 0 rather than inf, which keeps the meta-gradient finite; elsewhere the
    meta-gradient is that of torch.optim's formula. No weight decay, amsgrad or maximize.
    State: ``"<param>/exp_avg"``, ``"<param>/exp_avg_sq"``.

    Args:
        lr: initial step size α.
        betas: initial (β1, β2); learned ones must lie strictly inside (0, 1).
        eps: initial ε (> 0).
        learn: which of ``"lr"``, ``"beta1"``, ``"beta2"`` (both: ``"betas"``), ``"eps"`` are learned.
        per: one of `HYPER_GROUPS`.
    """

    HYPER = {"lr": _POSITIVE, "beta1": _UNIT, "beta2": _UNIT, "eps": _POSITIVE}
    ALIASES = {"betas": ("beta1", "beta2")}

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        learn: Iterable[str] = ("lr", "betas", "eps"),
        per: str = "shared",
    ) -> None:
        beta1, beta2 = betas
        super().__init__({"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps}, learn, per)

    def init_state(self, params: Params) -> State:
        state = {}
        for n, p in params.items():
            state[f"{n}/exp_avg"] = torch.zeros_like(p)
            state[f"{n}/exp_avg_sq"] = torch.zeros_like(p)
        return state

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        t = step + 1
        new_params, new_state = {}, {}
        for n, p in params.items():
            lr, eps = self.hyper("lr", n), self.hyper("eps", n)
            beta1, beta2 = self.hyper("beta1", n), self.hyper("beta2", n)
            g = grads[n]
            m = beta1 * state[f"{n}/exp_avg"] + (1 - beta1) * g
            v = beta2 * state[f"{n}/exp_avg_sq"] + (1 - beta2) * (g * g)
            step_size = lr / (1 - beta1**t)
            denom = _safe_sqrt(v) / (1 - beta2**t) ** 0.5 + eps
            new_params[n] = p - step_size * (m / denom)
            new_state[f"{n}/exp_avg"] = m
            new_state[f"{n}/exp_avg_sq"] = v
        return new_params, new_state


class Choice(NamedTuple):
    """Which rule an `OptimizerMixture` uses: the name and every candidate's weight."""

    name: str
    weights: dict[str, float]


def geometric_anneal(start: float, end: float, steps: int) -> Callable[[int], float]:
    r"""A temperature schedule for `OptimizerMixture`: :math:`T(s) = T_0 (T_1 / T_0)^{\min(s / S, 1)}`.

    Args:
        start: T at outer step 0 (> 0).
        end: T from outer step ``steps`` on (> 0).
        steps: outer steps to go from ``start`` to ``end`` (> 0).
    """
    if not (start > 0 and end > 0 and steps > 0):
        raise ValueError(f"geometric_anneal needs start > 0, end > 0, steps > 0; got {start}, {end}, {steps}")

    def temperature(outer_step: int) -> float:
        return start * (end / start) ** min(max(outer_step, 0) / steps, 1.0)

    return temperature


class OptimizerMixture(AnnealedTemperature, OptimizerPart):
    r"""A learned choice among update rules: a softmax-weighted mixture of candidate steps.

    .. math::

        \theta_{k+1} = \sum_i w_i\, \mathrm{step}_i(\theta_k, g_k, s^{(i)}_k), \qquad
        w = \mathrm{softmax}(\ell / T)

    Every candidate steps from the same (mixed) θ_k with its own state, kept in one flat
    state dict under ``"<candidate>/<key>"``. The logits ℓ are meta-parameters (and so is
    anything the candidates learn). This is the continuous relaxation used for choices in
    DARTS (Liu et al., 2019), applied to the inner update rule.

    Temperature T is plain configuration, never a global: set it with `set_temperature`,
    or give ``anneal`` (a function of the outer step, e.g. `geometric_anneal`) and have the
    training loop call `set_outer_step` before each meta-step; a low T pushes the weights
    towards one rule. T and a fixed choice are saved in the state dict (buffers ``temperature_saved``,
    ``fixed_index``).

    For meta-test, `fix` keeps only the argmax rule (only it runs; its state only) and
    `chosen` reports the rule and the weights.

    Args:
        candidates: the update rules, as ``{name: part}`` or a sequence (named after their
            classes, lower-case, ``_1``, ``_2``... on repeats).
        temperature: initial T (> 0).
        anneal: optional schedule ``outer_step -> T``.
    """

    def __init__(
        self,
        candidates: Mapping[str, OptimizerPart] | Sequence[OptimizerPart],
        temperature: float = 1.0,
        anneal: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__(temperature, anneal)
        named = dict(candidates) if isinstance(candidates, Mapping) else self._name(candidates)
        if not named:
            raise ValueError("OptimizerMixture needs at least one candidate update rule")
        for name, part in named.items():
            if not isinstance(part, OptimizerPart):
                raise TypeError(f"candidate {name!r} is a {type(part).__name__}, not an OptimizerPart")
            if "/" in name or "." in name or not name:
                raise ValueError(f"candidate names must be non-empty without '/' or '.', got {name!r}")
        self.candidates = nn.ModuleDict(named)
        self.logits = nn.Parameter(torch.zeros(len(named)))
        # Saved in the state dict as a buffer; the Python mirror is what `step` reads (no
        # device sync per inner step) and is refreshed after load_state_dict.
        self.register_buffer("fixed_index", torch.tensor(-1))
        self._fixed: str | None = None
        self.register_load_state_dict_post_hook(OptimizerMixture._after_load)

    @staticmethod
    def _name(parts: Sequence[OptimizerPart]) -> dict[str, OptimizerPart]:
        named: dict[str, OptimizerPart] = {}
        for part in parts:
            base = type(part).__name__.lower()
            name, i = base, 0
            while name in named:
                i += 1
                name = f"{base}_{i}"
            named[name] = part
        return named

    @property
    def names(self) -> list[str]:
        """The candidates' names, in the order of the logits."""
        return list(self.candidates)

    @staticmethod
    def _after_load(module: OptimizerMixture, incompatible_keys: Any) -> None:
        index = int(module.fixed_index)
        module._fixed = module.names[index] if index >= 0 else None

    def weights(self) -> Tensor:
        """softmax(ℓ / T), differentiable w.r.t. the logits."""
        return torch.softmax(self.logits / self._temperature, dim=0)

    def chosen(self) -> Choice:
        """The rule in use (the fixed one, or else the argmax of the logits) and all weights."""
        w = self.weights().detach()
        name = self._fixed if self._fixed is not None else self.names[int(w.argmax())]
        return Choice(name, {n: float(x) for n, x in zip(self.names, w, strict=True)})

    def fix(self, name: str | None = None) -> str:
        """From now on use only one rule: ``name``, or the argmax of the logits. Returns its name."""
        name = name if name is not None else self.chosen().name
        if name not in self.candidates:
            raise ValueError(f"unknown candidate {name!r}; candidates: {self.names}")
        self._fixed = name
        self.fixed_index.fill_(self.names.index(name))
        return name

    def unfix(self) -> None:
        """Back to the soft mixture."""
        self._fixed = None
        self.fixed_index.fill_(-1)

    @property
    def fixed(self) -> str | None:
        """The name of the fixed rule, or ``None`` while mixing."""
        return self._fixed

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        first = next(iter(adapted.values()), None)
        if first is not None and (self.logits.dtype, self.logits.device) != (first.dtype, first.device):
            # follow θ's dtype and device, as the candidates' hyper-parameters do
            self.logits = nn.Parameter(self.logits.detach().to(dtype=first.dtype, device=first.device))
        for part in self.candidates.values():
            part.bind(adapted)

    def _active(self) -> list[str]:
        return [self._fixed] if self._fixed is not None else self.names

    def init_state(self, params: Params) -> State:
        state = {}
        for name in self._active():
            for key, value in self.candidates[name].init_state(params).items():
                state[f"{name}/{key}"] = value
        return state

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        new_state: State = {}
        steps = []
        for name in self._active():
            prefix = f"{name}/"
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            new_params, own = self.candidates[name].step(params, grads, own, step)
            new_state.update({prefix + k: v for k, v in own.items()})
            steps.append(new_params)
        if self._fixed is not None:
            return steps[0], new_state
        w = self.weights()
        mixed = {n: sum(w[i] * s[n] for i, s in enumerate(steps)) for n in params}
        return mixed, new_state

    def extra_repr(self) -> str:
        # configuration only: the temperature and the fixed choice change during a run (they are
        # buffers, saved in checkpoints), and a run's identity must not change with them
        return f"candidates={list(self.names)}, anneal={self.anneal is not None}"
