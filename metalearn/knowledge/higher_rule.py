"""`higher_rule`: any of ``higher``'s differentiable optimizers as an inner update rule.

``higher`` (an optional extra, imported only when a rule is built) ships differentiable
versions of ``torch.optim``'s Adadelta, Adagrad, Adam, Adamax, ASGD, RMSprop, Rprop and SGD.
`higher_rule` wraps one as a rule of the library's shape: ``init_state(params) -> state``
and ``update(grads, state, params, step) -> (updates, state)``, applied by `apply_updates`.

What holds:

* **pure** — every `update` builds a fresh higher optimizer from the hyper-parameters, the
  state passed in and the step index; nothing is kept between calls.
* **same numbers as torch.optim** — the hyper-parameters and the initial state come from a
  ``torch.optim`` optimizer built on copies of θ (so its defaults and checks apply), and
  the update is higher's ``_update``; the update returned is θ_{k+1} - θ_k, so θ + u equals
  higher's θ_{k+1} to rounding (1e-16 relative).
* **learned learning rate** — ``learned(higher_rule(...), "lr")`` (shared or per tensor;
  each parameter is its own higher parameter group) works where higher accepts a tensor
  ``lr`` (all but Rprop, whose state is filled from a float ``lr``).
* **vmap** — SGD, Adam, Adagrad, Adamax and RMSprop run under ``batching="vmap"`` with the
  loop's meta-gradient (tested); Adadelta (reads ``.data``) and Rprop (``resize_as_``) do
  not: use them with ``batching="loop"``.
* **Adam** — higher adds ε to √v *before* the bias correction (torch.optim and the built-in
  `Adam` add it after), so the two agree only as ε → 0.

State entries that are not tensors (ASGD's ``eta`` and ``mu``) cannot be carried in the
flat tensor state, so ASGD is not supported.
"""

from __future__ import annotations

import collections
import importlib
from typing import Any

import torch
from torch import Tensor

from metalearn.knowledge.parts import Params, State
from metalearn.knowledge.rules import Learned, Rule

__all__ = ["higher_rule"]

_UNSUPPORTED = {"ASGD": "its state holds Python numbers (eta, mu), which a tensor state cannot carry"}


def _differentiable_class(optimizer_cls: type) -> type:
    try:
        higher_optim = importlib.import_module("higher.optim")
    except ImportError as err:
        raise ImportError(
            "higher_rule needs the optional package 'higher' (pip install higher==0.2.1)"
        ) from err
    mapping = higher_optim._opt_mapping  # higher's own table: torch.optim class -> differentiable class
    if optimizer_cls not in mapping or optimizer_cls.__name__ in _UNSUPPORTED:
        why = _UNSUPPORTED.get(getattr(optimizer_cls, "__name__", ""), "higher has no differentiable version of it")
        usable = sorted(c.__name__ for c in mapping if c.__name__ not in _UNSUPPORTED)
        raise ValueError(f"higher_rule cannot wrap {optimizer_cls!r}: {why}; usable: {usable}")
    return mapping[optimizer_cls]


class HigherRule(Rule):
    """A ``higher`` differentiable optimizer as a rule; build it with `higher_rule`."""

    HYPER = {"lr": "positive"}

    def __init__(self, optimizer_cls: type, lr: float | Learned, **hyper: Any) -> None:
        diff_cls = _differentiable_class(optimizer_cls)
        init_lr = float(lr.init if isinstance(lr, Learned) else lr)
        # torch.optim checks the hyper-parameters and supplies the defaults, before any work
        probe = optimizer_cls([torch.zeros(1, requires_grad=True)], lr=init_lr, **hyper)
        group = {k: v for k, v in probe.param_groups[0].items() if k in probe.defaults and k != "lr"}
        super().__init__(lr=lr)
        self.optimizer_cls, self.diff_cls, self.group, self.init_lr = optimizer_cls, diff_cls, group, init_lr

    def init_state(self, params: Params) -> State:
        # only shapes matter to a torch.optim's initial state (Adagrad's sum); plain leaves, so that
        # this also runs inside torch.func transforms
        leaves = [torch.zeros(p.shape, dtype=p.dtype, device=p.device, requires_grad=True) for p in params.values()]
        opt = self.optimizer_cls([{"params": [p]} for p in leaves], lr=self.init_lr, **self.group)
        state = {}
        for name, leaf in zip(params, leaves, strict=True):
            for key, value in opt.state.get(leaf, {}).items():
                if key != "step" and isinstance(value, Tensor):
                    state[f"{name}/{key}"] = value
        return state

    def update(self, grads: Params, state: State, params: Params, step: int) -> tuple[Params, State]:
        names = list(params)
        diff: Any = object.__new__(self.diff_cls)  # higher's __init__ needs a model; its _update needs only these
        diff.param_groups = [{**self.group, "lr": self.hyper("lr", n), "params": [params[n]]} for n in names]
        diff.state = [collections.defaultdict(dict) for _ in names]
        for i, n in enumerate(names):
            own = {k[len(n) + 1:]: v for k, v in state.items() if k.startswith(f"{n}/")}
            if own or step > 0:
                diff.state[i][0] = {"step": step, **own}
        diff._update([[grads[n]] for n in names])
        updates, new_state = {}, {}
        for i, n in enumerate(names):
            updates[n] = diff.param_groups[i]["params"][0] - params[n]
            for key, value in diff.state[i][0].items():
                if key != "step":
                    new_state[f"{n}/{key}"] = value
        return updates, new_state

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.group.items())
        return f"{self.optimizer_cls.__name__}, {super().extra_repr()}, {settings}"


def higher_rule(optimizer_cls: type, lr: float | Learned, **hyper: Any) -> HigherRule:
    """``higher``'s differentiable version of ``optimizer_cls`` as an inner update rule.

    Args:
        optimizer_cls: a ``torch.optim`` class higher supports, e.g. ``torch.optim.RMSprop``.
        lr: the learning rate (a `Learned` spec, or ``learned(rule, "lr")``, meta-learns it).
        **hyper: the optimizer's other settings (``alpha=0.9``, ``momentum=0.5``, ...).

    Example:
        >>> rule = higher_rule(torch.optim.Adagrad, lr=0.1)  # doctest: +SKIP
        >>> omega = MetaKnowledge(model, optimizer=rule)  # doctest: +SKIP
    """
    return HigherRule(optimizer_cls, lr, **hyper)
