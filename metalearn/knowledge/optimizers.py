r"""Inner optimizers with learned hyper-parameters, and a learned choice among update rules.

Each is a composition of the rules in `metalearn.knowledge.rules` (an `OptimizerPart` whose
`update` returns updates, applied by `apply_updates`):

* ``MomentumSGD(lr, momentum)`` is ``chain(trace(momentum), scale_by_learning_rate(lr))``;
* ``InnerAdam(lr, betas, eps)`` is ``chain(scale_by_adam(*betas, eps), scale_by_learning_rate(lr))``;
* `OptimizerMixture` mixes its candidates' updates (the choice is a `SoftChoice`).

The hyper-parameters named in ``learn`` are `Learned` (meta-parameters, stored unconstrained:
positive ones as their log, ones in (0, 1) as their logit); the others stay plain floats, so
with nothing learned each rule is exactly its ``torch.optim`` counterpart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

from torch import Tensor, nn

from metalearn.knowledge.parts import OptimizerPart, Params, State
from metalearn.knowledge.rules import (
    HYPER_GROUPS,
    Chain,
    Learned,
    hyper_of,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from metalearn.knowledge.soft_choice import Choice, SoftChoice

__all__ = [
    "HYPER_GROUPS",
    "InnerAdam",
    "Choice",
    "MomentumSGD",
    "OptimizerMixture",
    "geometric_anneal",
]


def _learned_names(cls: str, learn: Iterable[str] | str, known: Sequence[str], aliases: Mapping[str, tuple[str, ...]]):
    """``learn`` with aliases expanded, checked against the hyper-parameters ``known``, in order."""
    learn = (learn,) if isinstance(learn, str) else tuple(learn)
    names: list[str] = []
    for name in learn:
        for n in aliases.get(name, (name,)):
            if n not in known:
                raise ValueError(f"{cls} cannot learn {name!r}; learnable: {sorted({*known, *aliases})}")
            if n not in names:
                names.append(n)
    return tuple(names)


def _specs(values: Mapping[str, float], learned: tuple[str, ...], per: str) -> dict[str, float | Learned]:
    if per not in HYPER_GROUPS:
        raise ValueError(f"per must be one of {HYPER_GROUPS}, got {per!r}")
    return {k: Learned(v, per) if k in learned else float(v) for k, v in values.items()}


class _Preset(Chain):
    """A named chain with a fixed set of hyper-parameters, readable by name with `hyper`."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def hyper(self, name: str, param_name: str | None = None) -> Tensor | float:
        """The value of hyper-parameter ``name`` for ``param_name`` (a float if fixed, else a tensor)."""
        return hyper_of(self, name).hyper(name, param_name)

    def extra_repr(self) -> str:
        return f"learn={self.learned}, per={self.per!r}"


class MomentumSGD(_Preset):
    r"""SGD with momentum (``torch.optim.SGD``'s convention) and learnable lr and momentum.

    .. math::

        b_{k} = \mu\, b_{k-1} + g_k \quad (b_{-1} = 0,\ \text{so } b_0 = g_0), \qquad
        \theta_{k+1} = \theta_k - \alpha\, b_k

    (Nesterov: :math:`\theta_{k+1} = \theta_k - \alpha (g_k + \mu b_k)`; Sutskever et al., 2013.)
    With nothing learned, a trajectory equals ``torch.optim.SGD(lr, momentum, nesterov)``'s
    step for step. No weight decay or dampening. The chain
    ``chain(trace(momentum, nesterov), scale_by_learning_rate(lr))``; state ``"0/<param>/momentum"``.

    Args:
        lr: initial step size α (> 0; learned as log α).
        momentum: initial μ (learned as logit μ, so inside (0, 1); a fixed μ may be 0).
        learn: which of ``"lr"``, ``"momentum"`` are meta-parameters.
        per: one of `HYPER_GROUPS`: share each hyper-parameter, one per tensor, or one per entry.
        nesterov: Nesterov momentum.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def __init__(
        self,
        lr: float,
        momentum: float = 0.9,
        learn: Iterable[str] = ("lr", "momentum"),
        per: str = "shared",
        nesterov: bool = False,
    ) -> None:
        learned = _learned_names("MomentumSGD", learn, ("lr", "momentum"), {})
        spec = _specs({"lr": lr, "momentum": momentum}, learned, per)
        super().__init__(trace(spec["momentum"], nesterov), scale_by_learning_rate(spec["lr"]))
        self.learned, self.per, self.nesterov = learned, per, bool(nesterov)


class InnerAdam(_Preset):
    r"""Adam (Kingma & Ba, 2015) with learnable lr, β1, β2 and ε; ``torch.optim.Adam``'s update.

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
    The chain ``chain(scale_by_adam(β1, β2, ε), scale_by_learning_rate(lr))``; state
    ``"0/<param>/exp_avg"``, ``"0/<param>/exp_avg_sq"``.

    Args:
        lr: initial step size α.
        betas: initial (β1, β2); learned ones must lie strictly inside (0, 1).
        eps: initial ε (> 0).
        learn: which of ``"lr"``, ``"beta1"``, ``"beta2"`` (both: ``"betas"``), ``"eps"`` are learned.
        per: one of `HYPER_GROUPS`.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`
    elementwise = True  # updates each entry from that entry alone: `metalearn.task_batched.elementwise`

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        learn: Iterable[str] = ("lr", "betas", "eps"),
        per: str = "shared",
    ) -> None:
        known = ("lr", "beta1", "beta2", "eps")
        learned = _learned_names("InnerAdam", learn, known, {"betas": ("beta1", "beta2")})
        beta1, beta2 = betas
        spec = _specs({"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps}, learned, per)
        super().__init__(
            scale_by_adam(spec["beta1"], spec["beta2"], spec["eps"]), scale_by_learning_rate(spec["lr"])
        )
        self.learned, self.per = learned, per


def _updates_of(part: OptimizerPart, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
    """A candidate's updates: its `update`, or θ_{k+1} - θ_k for a part that overrides only `step`."""
    if type(part).update is not OptimizerPart.update:
        return part.update(grads, state, params, step)
    new_params, state = part.step(params, grads, state, step)
    return {n: new_params[n] - p for n, p in params.items()}, state


#: candidate names of the renamed built-ins: their names before the rename, so a mixture's names (and ω's
#: state-dict keys under ``optimizer.*``) did not change when ``SGD``/``Adam`` became ``InnerSGD``/``InnerAdam``
_RULE_NAMES = {"InnerSGD": "sgd", "InnerAdam": "adam"}


def _name_rules(parts: Sequence[OptimizerPart]) -> dict[str, OptimizerPart]:
    """Rules named after their classes, lower-case (``InnerSGD``: ``sgd``), with ``_1``, ``_2``... on repeats."""
    named: dict[str, OptimizerPart] = {}
    for part in parts:
        base = _RULE_NAMES.get(type(part).__name__, type(part).__name__.lower())
        name, i = base, 0
        while name in named:
            i += 1
            name = f"{base}_{i}"
        named[name] = part
    return named


def _checked_rules(candidates: Mapping[str, OptimizerPart] | Sequence[OptimizerPart]) -> dict[str, OptimizerPart]:
    """An `OptimizerMixture`'s candidates by name, checked: at least one, parts, names usable as keys."""
    named = dict(candidates) if isinstance(candidates, Mapping) else _name_rules(candidates)
    if not named:
        raise ValueError("OptimizerMixture needs at least one candidate update rule")
    for name, part in named.items():
        if not isinstance(part, OptimizerPart):
            raise TypeError(f"candidate {name!r} is a {type(part).__name__}, not an OptimizerPart")
        if not isinstance(name, str) or "/" in name or "." in name or not name:
            # '/' separates a candidate's state keys, '.' its parameters' names
            raise ValueError(f"candidate names must be non-empty strings without '/' or '.', got {name!r}")
    return named


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


class OptimizerMixture(SoftChoice, OptimizerPart):
    r"""A learned choice among update rules: a softmax-weighted mixture of candidate steps.

    .. math::

        \theta_{k+1} = \theta_k + \sum_i w_i\, u_i(g_k, s^{(i)}_k, \theta_k), \qquad
        w = \mathrm{softmax}(\ell / T)

    (the softmax-weighted mixture of the candidates' steps, written with their updates u_i).
    Every candidate updates from the same (mixed) θ_k with its own state, kept in one flat
    state dict under ``"<candidate>/<key>"``. The logits ℓ are meta-parameters (and so is
    anything the candidates learn). This is the continuous relaxation used for choices in
    DARTS (Liu et al., 2019), applied to the inner update rule.

    The choice itself (logits, temperature, fixing, `chosen`, `weights`) is the shared
    `SoftChoice` with one row, as for `ArchitectureWeights`; this class adds the rules
    (``candidates``, a `torch.nn.ModuleDict` by name) and mixes their updates. Temperature T
    is plain configuration, never a global: set it with `set_temperature`, or give ``anneal``
    (a function of the outer step, e.g. `geometric_anneal`) and have the training loop call
    `set_outer_step` before each meta-step; a low T pushes the weights towards one rule. T and
    a fixed choice are saved in the state dict (buffers ``temperature_saved``, ``fixed_index``).

    For meta-test, `fix` keeps only the argmax rule (only it runs; its state only) and
    `chosen` reports the rule and the weights.

    Args:
        candidates: the update rules, as ``{name: part}`` or a sequence (named after their
            classes, lower-case, ``_1``, ``_2``... on repeats).
        temperature: initial T (> 0).
        anneal: optional schedule ``outer_step -> T``.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(
        self,
        candidates: Mapping[str, OptimizerPart] | Sequence[OptimizerPart],
        temperature: float = 1.0,
        anneal: Callable[[int], float] | None = None,
    ) -> None:
        named = _checked_rules(candidates)
        super().__init__(list(named), None, temperature, anneal)
        self.candidates = nn.ModuleDict(named)

    def bind(self, adapted: Mapping[str, Tensor]) -> None:
        first = next(iter(adapted.values()), None)
        if first is not None:
            self.follow(first)  # the logits follow θ's dtype and device, as the candidates' hyper-parameters do
        for name in self.names:
            self._rule(name).bind(adapted)

    def _rule(self, name: str) -> OptimizerPart:
        return cast(OptimizerPart, self.candidates[name])

    def _active(self) -> list[str]:
        return self.names if self.fixed is None else [cast(str, self.fixed)]

    def init_state(self, params: Params) -> State:
        state = {}
        for name in self._active():
            for key, value in self._rule(name).init_state(params).items():
                state[f"{name}/{key}"] = value
        return state

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        new_state: State = {}
        updates = []
        for name in self._active():
            prefix = f"{name}/"
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            candidate_updates, own = _updates_of(self._rule(name), grads, own, params, step)
            new_state.update({prefix + k: v for k, v in own.items()})
            updates.append(candidate_updates)
        if self.fixed is not None:
            return updates[0], new_state  # only the fixed rule ran: its updates, unweighted
        w = self.probabilities()
        mixed = {n: cast(Tensor, sum(w[i] * u[n] for i, u in enumerate(updates))) for n in params}
        return mixed, new_state

    def extra_repr(self) -> str:
        # configuration only: the temperature and the fixed choice change during a run (they are
        # buffers, saved in checkpoints), and a run's identity must not change with them
        return f"candidates={list(self.names)}, anneal={self.anneal is not None}"
