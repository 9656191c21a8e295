r"""Composable inner update rules, optax-style: a rule turns gradients into *updates*.

A rule is an `OptimizerPart` with a pure ``(init_state, update)`` pair:

* ``init_state(params) -> state``;
* ``update(grads, state, params, step) -> (updates, state)``.

Updates are applied in one place, `apply_updates` (θ + u): `OptimizerPart.step`, the one
entry point the inner loop calls, is ``update`` followed by ``apply_updates``. Rules chain
(`chain`): each transforms the updates of the one before, e.g.

    >>> from metalearn.knowledge.rules import chain, scale_by_adam, scale_by_learning_rate
    >>> adam = chain(scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), scale_by_learning_rate(1e-3))

Every hyper-parameter of a rule is either a plain float (fixed configuration) or a
`Learned` spec (a meta-parameter). `learned` turns any rule's hyper-parameter into a learned
one, shared, one per parameter tensor or one per entry; Meta-SGD is
``learned(scale_by_learning_rate(0.01), "lr", per="entry", constraint="real")``. Learned
values are stored unconstrained (``nn.ParameterDict``\ s created in `bind` with θ's dtype and
device, keyed ``"shared"`` or by `param_key`) so that any value the outer optimizer reaches is
valid:

* ``"positive"`` (a learning rate, Adam's ε) as its log, in ``log_<name>``;
* ``"unit"`` (momentum, Adam's β1 and β2: in (0, 1)) as its logit, in ``logit_<name>``;
* ``"real"`` (no constraint, e.g. Meta-SGD's signed step sizes) as itself, in ``<name>s``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from metalearn.kernels import fused_update, kernel_unsupported, use_triton
from metalearn.knowledge.parts import OptimizerPart, Params, State, apply_updates, param_key

__all__ = [
    "CONSTRAINTS",
    "HYPER_GROUPS",
    "Chain",
    "Learned",
    "LearnedHyper",
    "Rule",
    "apply_updates",
    "chain",
    "fused_plan",
    "fused_step",
    "learned",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "trace",
]

#: How a learned hyper-parameter is shared: one for all parameters, one per parameter tensor,
#: or one per entry ("entry" and "element" are the same; Meta-SGD's step sizes are per entry).
HYPER_GROUPS = ("shared", "tensor", "element", "entry")
#: The value ranges a hyper-parameter may be constrained to (see the module docstring).
CONSTRAINTS = ("positive", "unit", "real")
_SHARED = "shared"


def _to_raw(value: float, constraint: str) -> float:
    if constraint == "positive":
        return math.log(value)
    if constraint == "unit":
        return math.log(value / (1.0 - value))
    return value


def _from_raw(raw: Tensor, constraint: str) -> Tensor:
    if constraint == "positive":
        return raw.exp()
    if constraint == "unit":
        return torch.sigmoid(raw)
    return raw


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


@dataclass(frozen=True)
class Learned:
    """A hyper-parameter that is meta-learned rather than fixed: pass it instead of a float.

    Args:
        init: the initial (constrained) value, e.g. a learning rate of 0.01.
        per: one of `HYPER_GROUPS`.
        constraint: one of `CONSTRAINTS`; ``None`` keeps the rule's own (a learning rate is
            ``"positive"``, a momentum ``"unit"``).
    """

    init: float
    per: str = _SHARED
    constraint: str | None = None


def _check_value(rule: str, name: str, value: float, constraint: str, is_learned: bool) -> None:
    if constraint == "positive" and not value > 0:
        raise ValueError(f"{rule}: {name} must be positive, got {value}")
    if constraint == "unit" and is_learned and not 0 < value < 1:
        raise ValueError(
            f"{rule}: a learned {name} must lie strictly inside (0, 1) (it is stored as its logit), got {value}; "
            f"start from e.g. 0.5, or leave {name!r} fixed"
        )
    if constraint == "unit" and not 0 <= value < 1:
        raise ValueError(f"{rule}: {name} must lie in [0, 1), got {value}")


class LearnedHyper(nn.ParameterDict):
    """The meta-parameters of one learned hyper-parameter: raw (unconstrained) values by key.

    Empty until `bind` creates one entry (``per="shared"``) or one per adapted parameter.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # scalars or θ-shaped values, which broadcast: `metalearn.task_batched.elementwise`

    def __init__(self, rule: str, name: str, spec: Learned) -> None:
        super().__init__()
        if spec.per not in HYPER_GROUPS:
            raise ValueError(f"per must be one of {HYPER_GROUPS}, got {spec.per!r}")
        if spec.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {spec.constraint!r}")
        _check_value(rule, name, float(spec.init), spec.constraint, True)
        self.rule, self.name = rule, name
        self.init, self.per, self.constraint = float(spec.init), spec.per, spec.constraint

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        raw = _to_raw(self.init, self.constraint)
        if self.per == _SHARED:
            first = next(iter(adapted.values()), None)
            dtype, device = (first.dtype, first.device) if first is not None else (None, None)
            self[_SHARED] = nn.Parameter(torch.tensor(raw, dtype=dtype, device=device))
            return
        for pname, p in adapted.items():
            shape = p.shape if self.per in ("element", "entry") else ()
            self[param_key(pname)] = nn.Parameter(torch.full(shape, raw, dtype=p.dtype, device=p.device))

    def value(self, param_name: str | None) -> Tensor:
        """The constrained value used for ``param_name`` (a scalar, or θ's shape per entry)."""
        if self.per == _SHARED:
            key = _SHARED
        elif param_name is None:
            raise ValueError(
                f"{self.name} is learned per {self.per}: name the parameter, e.g. hyper({self.name!r}, 'head.weight')"
            )
        else:
            key = param_key(param_name)
        if key not in self:
            raise RuntimeError(
                f"{self.rule} has no learned {self.name} for {param_name!r}: it is not bound to that parameter "
                "(build the MetaKnowledge with this optimizer, or call bind(adapted_params) first)"
            )
        return _from_raw(self[key], self.constraint)

    def extra_repr(self) -> str:
        return f"init={self.init}, per={self.per!r}, constraint={self.constraint!r}"


def _storage_name(name: str, constraint: str) -> str:
    return {"positive": "log_", "unit": "logit_"}.get(constraint, "") + name + ("s" if constraint == "real" else "")


class Rule(OptimizerPart):
    """Base of the built-in rules: declared hyper-parameters, each a float or `Learned`.

    Subclasses declare ``HYPER = {name: constraint}``, pass the values to ``__init__`` and read
    them in `update` with ``self.hyper(name, param_name)``.
    """

    HYPER: dict[str, str] = {}

    def __init__(self, **values: float | Learned) -> None:
        super().__init__()
        self.fixed_values: dict[str, float] = {}
        self._learned_at: dict[str, str] = {}
        for name, value in values.items():
            self.set_hyper(name, value)

    def set_hyper(self, name: str, value: float | Learned) -> None:
        """Makes hyper-parameter ``name`` the fixed float ``value`` or a `Learned` spec (before `bind`)."""
        if name not in self.HYPER:
            raise ValueError(f"{type(self).__name__} has no hyper-parameter {name!r}; it has {sorted(self.HYPER)}")
        if name in self._learned_at:
            delattr(self, self._learned_at.pop(name))
        if isinstance(value, Learned):
            constraint = value.constraint or self.HYPER[name]
            storage = _storage_name(name, constraint)
            setattr(self, storage, LearnedHyper(type(self).__name__, name, Learned(value.init, value.per, constraint)))
            self._learned_at[name] = storage
            self.fixed_values.pop(name, None)
            return
        _check_value(type(self).__name__, name, float(value), self.HYPER[name], False)
        self.fixed_values[name] = float(value)

    @property
    def learned(self) -> tuple[str, ...]:
        """Names of this rule's learned hyper-parameters."""
        return tuple(self._learned_at)

    def hyper(self, name: str, param_name: str | None = None) -> Tensor | float:
        """The value of hyper-parameter ``name`` for ``param_name``: a float if fixed, else a tensor."""
        if name in self._learned_at:
            table: LearnedHyper = getattr(self, self._learned_at[name])
            return table.value(param_name)
        return self.fixed_values[name]

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        for storage in self._learned_at.values():
            getattr(self, storage).bind(adapted)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.fixed_values.items())


class _ScaleByLearningRate(Rule):
    """u = -lr · g (a positive learning rate)."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    HYPER = {"lr": "positive"}

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        # -(lr * g), not (-lr) * g: with it θ + u is bit-for-bit θ - lr * g
        return {n: -(self.hyper("lr", n) * g) for n, g in grads.items()}, state

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        """θ - lr · g at once: bit for bit ``apply_updates(θ, update(...))`` (x + (-y) is x - y in IEEE
        arithmetic), with one operation fewer per tensor in the inner loop and in the graph that the
        meta-gradient differentiates. A subclass with its own `update` takes the general path."""
        if type(self).update is not _ScaleByLearningRate.update:
            return super().step(params, grads, state, step)
        return {n: p - self.hyper("lr", n) * grads[n] for n, p in params.items()}, state


class _Scale(Rule):
    """u = factor · g (any real factor)."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    HYPER = {"factor": "real"}

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        return {n: self.hyper("factor", n) * g for n, g in grads.items()}, state


class _Trace(Rule):
    """Momentum, ``torch.optim.SGD``'s convention: b_k = μ b_{k-1} + g_k; u = b_k (Nesterov: g_k + μ b_k)."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    HYPER = {"momentum": "unit"}

    def __init__(self, momentum: float | Learned, nesterov: bool) -> None:
        super().__init__(momentum=momentum)
        self.nesterov = bool(nesterov)

    def init_state(self, params: Params) -> State:
        return {f"{n}/momentum": torch.zeros_like(p) for n, p in params.items()}

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        updates, new_state = {}, {}
        for n, g in grads.items():
            mu = self.hyper("momentum", n)
            buf = mu * state[f"{n}/momentum"] + g
            updates[n] = g + mu * buf if self.nesterov else buf
            new_state[f"{n}/momentum"] = buf
        return updates, new_state

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nesterov=True" if self.nesterov else "")


class _ScaleByAdam(Rule):
    r"""Adam's direction: :math:`\hat m / (\sqrt{\hat v} + \epsilon)` with torch.optim's bias corrections."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    HYPER = {"beta1": "unit", "beta2": "unit", "eps": "positive"}

    def init_state(self, params: Params) -> State:
        state = {}
        for n, p in params.items():
            state[f"{n}/exp_avg"] = torch.zeros_like(p)
            state[f"{n}/exp_avg_sq"] = torch.zeros_like(p)
        return state

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        t = step + 1
        updates, new_state = {}, {}
        for n, g in grads.items():
            beta1, beta2, eps = self.hyper("beta1", n), self.hyper("beta2", n), self.hyper("eps", n)
            m = beta1 * state[f"{n}/exp_avg"] + (1 - beta1) * g
            v = beta2 * state[f"{n}/exp_avg_sq"] + (1 - beta2) * (g * g)
            denom = _safe_sqrt(v) / (1 - beta2**t) ** 0.5 + eps
            updates[n] = (m / denom) / (1 - beta1**t)
            new_state[f"{n}/exp_avg"] = m
            new_state[f"{n}/exp_avg_sq"] = v
        return updates, new_state


class Chain(OptimizerPart):
    """Rules applied in sequence, each to the updates of the one before (optax's ``chain``).

    The state is one flat dict: rule i's keys under ``"<i>/"``.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def __init__(self, *rules: OptimizerPart) -> None:
        super().__init__()
        if not rules:
            raise ValueError("chain needs at least one rule, e.g. chain(trace(0.9), scale_by_learning_rate(0.1))")
        for i, rule in enumerate(rules):
            if not isinstance(rule, OptimizerPart):
                raise TypeError(f"chain's rule {i} is a {type(rule).__name__}, not an OptimizerPart")
        self.rules = nn.ModuleList(rules)

    def _rules(self) -> list[OptimizerPart]:
        return list(self.rules)  # type: ignore[arg-type]  # a ModuleList of OptimizerParts (checked above)

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        for rule in self._rules():
            rule.bind(adapted)

    def init_state(self, params: Params) -> State:
        return {f"{i}/{k}": v for i, rule in enumerate(self._rules()) for k, v in rule.init_state(params).items()}

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        updates, new_state = grads, {}
        for i, rule in enumerate(self._rules()):
            prefix = f"{i}/"
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            updates, own = rule.update(updates, own, params, step)
            new_state.update({prefix + k: v for k, v in own.items()})
        return updates, new_state


def _rules(part: nn.Module) -> Iterator[Rule]:
    yield from (m for m in part.modules() if isinstance(m, Rule))


def hyper_of(part: nn.Module, name: str) -> Rule:
    """The one rule inside ``part`` (itself, or in a chain) that has hyper-parameter ``name``."""
    owners = [r for r in _rules(part) if name in r.HYPER]
    if len(owners) != 1:
        found = sorted({h for r in _rules(part) for h in r.HYPER})
        what = "no rule" if not owners else f"{len(owners)} rules"
        raise ValueError(
            f"{type(part).__name__}: {what} with hyper-parameter {name!r} (hyper-parameters: {found}); "
            "wrap the one rule you mean, e.g. chain(learned(trace(0.9), 'momentum'), ...)"
        )
    return owners[0]


def learned(
    rule: OptimizerPart, name: str, per: str = _SHARED, init: float | None = None, constraint: str | None = None
) -> OptimizerPart:
    """A copy of ``rule`` whose hyper-parameter ``name`` is meta-learned (works on any built-in rule or chain).

    Args:
        rule: a rule, or a chain holding exactly one rule with hyper-parameter ``name``.
        name: the hyper-parameter, e.g. ``"lr"``, ``"momentum"``, ``"beta1"``, ``"eps"``.
        per: one of `HYPER_GROUPS`.
        init: the initial value (default: the rule's current fixed value).
        constraint: one of `CONSTRAINTS` (default: the rule's own).

    Example:
        >>> meta_sgd = learned(scale_by_learning_rate(0.01), "lr", per="entry", constraint="real")
    """
    rule = copy.deepcopy(rule)
    owner = hyper_of(rule, name)
    if init is None:
        if name not in owner.fixed_values:
            raise ValueError(f"{type(owner).__name__}'s {name} is learned already")
        init = owner.fixed_values[name]
    owner.set_hyper(name, Learned(init, per, constraint))
    return rule


def scale_by_learning_rate(lr: float | Learned) -> Rule:
    """Gradient descent's step, u = -lr · g (lr > 0; pass a `Learned` to meta-learn it)."""
    return _ScaleByLearningRate(lr=lr)


def scale(factor: float | Learned) -> Rule:
    """u = factor · g; ``scale(-lr)`` after a direction rule is gradient descent along it."""
    return _Scale(factor=factor)


def trace(momentum: float | Learned, nesterov: bool = False) -> Rule:
    """Heavy-ball momentum (``torch.optim.SGD``'s convention; state ``"<param>/momentum"``)."""
    return _Trace(momentum, nesterov)


def scale_by_adam(
    b1: float | Learned = 0.9, b2: float | Learned = 0.999, eps: float | Learned = 1e-8
) -> Rule:
    """Adam's bias-corrected direction (state ``"<param>/exp_avg"``, ``"<param>/exp_avg_sq"``)."""
    return _ScaleByAdam(beta1=b1, beta2=b2, eps=eps)


def chain(*rules: OptimizerPart) -> Chain:
    """Rules applied in sequence, e.g. ``chain(scale_by_adam(), scale_by_learning_rate(1e-3))``."""
    return Chain(*rules)


# ---------------------------------------------------------------- the fused-kernel hook


def _plain(part: OptimizerPart, cls: Any) -> bool:
    """Whether ``part`` is a ``cls`` computing exactly ``cls``'s formula (no override of it)."""
    kind: Any = type(part)
    return (
        isinstance(part, cls)
        and kind.update is cls.update
        and kind.init_state is cls.init_state
        and kind.step in (OptimizerPart.step, cls.step)  # cls's own step computes its formula too
    )


def fused_plan(part: OptimizerPart) -> tuple[str, tuple[Rule, ...]] | None:
    """The fused update (`metalearn.kernels.reference.UPDATES`) that computes ``part``'s step, with its
    rules, or None (a user's own rule, `scale`, a mixture, any other chain: the rule's own code runs).

    Recognised: ``scale_by_learning_rate`` alone (`InnerSGD`, `MetaSGD`, a learned step size of any
    grouping) → ``"sgd"``; ``chain(trace, scale_by_learning_rate)`` (`MomentumSGD`) → ``"momentum"``;
    ``chain(scale_by_adam, scale_by_learning_rate)`` (`InnerAdam`) → ``"adam"``.
    """
    if _plain(part, _ScaleByLearningRate):
        return "sgd", (part,)  # type: ignore[return-value]  # a _ScaleByLearningRate is a Rule
    if not _plain(part, Chain):
        return None
    rules = cast(Chain, part)._rules()
    if len(rules) != 2 or not _plain(rules[1], _ScaleByLearningRate):
        return None
    if _plain(rules[0], _Trace):
        return "momentum", cast(tuple[Rule, ...], tuple(rules))
    if _plain(rules[0], _ScaleByAdam):
        return "adam", cast(tuple[Rule, ...], tuple(rules))
    return None


def _flat_hyper(rule: Rule, name: str, params: Params, fn: Callable[[Any], Any] = lambda h: h) -> Tensor:
    """``fn`` of hyper-parameter ``name`` over the flat entries of ``params``: one value ``[]`` when it is
    fixed or shared, else ``[N]`` (a per-tensor value repeated over its tensor's entries)."""
    like = next(iter(params.values()))
    if name in rule.fixed_values:
        # a fill on the device, not a host-to-device copy (capturable in a CUDA graph)
        return like.new_full((), fn(rule.fixed_values[name]))
    table: LearnedHyper = getattr(rule, rule._learned_at[name])
    if table.per == _SHARED:
        return fn(table.value(None))
    return torch.cat([fn(table.value(n)).expand(p.shape).reshape(-1) for n, p in params.items()])


def _flat(tensors: list[Tensor]) -> Tensor:
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def _fused_inputs(
    kind: str, rules: tuple[Rule, ...], params: Params, grads: Params, state: State, step: int
) -> tuple[list[Tensor], list[str], tuple[Tensor, ...], bool]:
    """The flat inputs of the fused ``kind``: (θ, g and the state tensors, the state keys in output order,
    the hyper-parameters, Nesterov)."""
    names = list(params)
    flat = [_flat([params[n] for n in names]), _flat([grads[n] for n in names])]
    lr = _flat_hyper(rules[-1], "lr", params)
    if kind == "sgd":
        return flat, [], (lr,), False
    if kind == "momentum":
        trace_rule = cast(_Trace, rules[0])
        keys = ["0/{}/momentum"]
        mu = _flat_hyper(trace_rule, "momentum", params)
        return flat + [_flat([state[keys[0].format(n)] for n in names])], keys, (lr, mu), trace_rule.nesterov
    t = step + 1
    adam = rules[0]
    keys = ["0/{}/exp_avg", "0/{}/exp_avg_sq"]
    hypers = (
        lr,
        _flat_hyper(adam, "beta1", params),
        _flat_hyper(adam, "beta1", params, lambda b: 1 - b),
        _flat_hyper(adam, "beta2", params),
        _flat_hyper(adam, "beta2", params, lambda b: 1 - b),
        _flat_hyper(adam, "eps", params),
        _flat_hyper(adam, "beta1", params, lambda b: 1 - b**t),
        _flat_hyper(adam, "beta2", params, lambda b: (1 - b**t) ** 0.5),
    )
    return flat + [_flat([state[k.format(n)] for n in names]) for k in keys], keys, hypers, False


def fused_step(
    part: OptimizerPart, params: Params, grads: Params, state: State, step: int, kernels: str = "auto"
) -> tuple[Params, State]:
    """``part.step(params, grads, state, step)``, by one fused Triton launch where ``kernels`` picks one.

    The inner loop's one call of an update rule. With ``kernels="reference"``, or a rule the kernels
    do not compute (`fused_plan` is None), or tensors they cannot serve
    (`metalearn.kernels.use_triton`), it is exactly ``part.step``; otherwise every adapted tensor is
    updated by `metalearn.kernels.fused_update` at once and split back, with the same state keys.
    """
    if kernels == "reference" or not params:
        return part.step(params, grads, state, step)
    if kernels == "auto" and next(iter(params.values())).device.type != "cuda":
        # the common CPU case, on the inner loop's hot path: "auto" serves CUDA tensors only, so no plan
        # and no scan of every tensor are needed (`use_triton` would say the same after both)
        return part.step(params, grads, state, step)
    plan = fused_plan(part)
    tensors = [*params.values(), *grads.values(), *state.values()]
    if plan is None or not params or not use_triton(kernels, tensors):
        return part.step(params, grads, state, step)
    kind, rules = plan
    flat, keys, hypers, nesterov = _fused_inputs(kind, rules, params, grads, state, step)
    if kernel_unsupported([flat[0], *hypers]) is not None:
        return part.step(params, grads, state, step)
    outs = fused_update(kind, (*flat, *hypers), nesterov=nesterov)
    sizes = [p.numel() for p in params.values()]
    pieces = [o.split(sizes) for o in outs]
    new_params = {n: piece.view(p.shape) for (n, p), piece in zip(params.items(), pieces[0], strict=True)}
    new_state = dict(state)
    for key, out in zip(keys, pieces[1:], strict=True):
        for (n, p), piece in zip(params.items(), out, strict=True):
            new_state[key.format(n)] = piece.view(p.shape)
    return new_params, new_state
