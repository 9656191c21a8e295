r"""`check_part`: checks a part of ω against the contract every part must honour.

The rules (see `metalearn.knowledge.parts`):

* **pure** — a call changes neither its inputs nor the part's own parameters and buffers;
* **no hidden state** — the same call with the same inputs gives the same outputs (optimizer
  state is passed in and returned, never kept on the part);
* **explicit randomness** — a part samples only from the ``torch.Generator`` it is given,
  never from torch's global generator;
* **structure** — outputs have the keys, shapes and dtypes the library expects;
* **vmap-safe** — a part that runs inside the inner loop (an optimizer; a loss, an architecture
  part or a model's forward, checked as a module with ``call=`` and ``inputs``) run under
  ``torch.func.vmap`` over a small batch gives, for each entry, what it gives alone (float64);
  the inner loop maps them over tasks this way. An init's ``initial_params`` runs outside vmap
  (once per batch, with the number of tasks), so init parts are not vmap-checked;

Every kind's checker runs the part's calls through one probe (`_probe`: global RNG untouched,
inputs and the part's own state unchanged, equal inputs give equal outputs), then its typed
structure checks, the gradient check and, where the part runs inside vmap, the vmap check.
* **differentiable** — the outputs are differentiable w.r.t. the part's meta-parameters,
  checked by a float64 finite-difference gradient check (``torch.autograd.gradcheck``). An
  optimizer part is also checked w.r.t. its ``params`` and ``grads`` inputs: second-order
  meta-gradients (Finn et al., 2017) differentiate the update through both.

Example:
    >>> from metalearn.knowledge import MetaSGD, check_part
    >>> print(check_part(MetaSGD(init_lr=0.1)))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.knowledge.parts import AdaptPart, InitPart, OptimizerPart, Params, State

__all__ = ["ContractError", "ContractReport", "check_part"]

#: A user callable for a generic module part: ``call(part, inputs, generator)`` -> outputs.
PartCall = Callable[[nn.Module, tuple[Tensor, ...], torch.Generator], Any]

_DEFAULT_NAMES = ("features.0.weight", "features.0.bias", "features.1.weight", "head.weight", "head.bias")


class ContractError(Exception):
    """A part broke a rule of the part contract.

    Attributes:
        rule: the rule that failed (e.g. ``"pure"``, ``"no hidden state"``).
        part: the part's class name.
    """

    def __init__(self, part: nn.Module, rule: str, message: str) -> None:
        self.rule = rule
        self.part = type(part).__name__
        super().__init__(f"{self.part} breaks the part contract [{rule}]: {message}")


@dataclass(frozen=True)
class ContractReport:
    """What `check_part` verified; returned only when every rule held.

    Attributes:
        part: the part's class name.
        kind: ``"optimizer"``, ``"init"``, ``"adapt"`` or ``"module"``.
        rules: the rules that were checked, in order.
        meta_parameters: names of the part's meta-parameters (its ``nn.Parameter``\\ s).
        gradchecked: the inputs a float64 gradient check passed for (meta-parameters
            first, then ``params.*``/``grads.*``/``model.*``/``inputs[i]``).
    """

    part: str
    kind: str
    rules: tuple[str, ...]
    meta_parameters: tuple[str, ...]
    gradchecked: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        lines = [f"{self.part} ({self.kind} part) honours the part contract:"]
        lines += [f"  ok  {rule}" for rule in self.rules]
        if self.gradchecked:
            lines.append(f"  gradient-checked w.r.t.: {', '.join(self.gradchecked)}")
        return "\n".join(lines)


# ---------------------------------------------------------------- small helpers


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested outputs (tensors, mappings, sequences), NaN equal to NaN."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.equal(a, b)) or bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return list(a.keys()) == list(b.keys()) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _tensors(obj: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Every tensor in a nested output, with a readable path."""
    if isinstance(obj, Tensor):
        return [(prefix or "output", obj)]
    if isinstance(obj, Mapping):
        return [t for k, v in obj.items() for t in _tensors(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}[{i}]")]
    return []


def _plain_attributes(part: nn.Module) -> dict[str, Any]:
    """Plain Python attributes (numbers, strings) of the part and its submodules."""
    found = {}
    for mod_name, module in part.named_modules():
        for key, value in vars(module).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (int, float, str, bool)):
                found[f"{mod_name}.{key}" if mod_name else key] = value
    return found


def _snapshot(part: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {k: v.detach().clone() for k, v in part.state_dict(keep_vars=True).items()}
    return tensors, _plain_attributes(part)


def _check_snapshot(part: nn.Module, before: tuple[dict[str, Tensor], dict[str, Any]], what: str) -> None:
    tensors, attributes = before
    now_tensors, now_attributes = _snapshot(part)
    for name, value in tensors.items():
        if name not in now_tensors or not _same(value, now_tensors[name]):
            raise ContractError(
                part, "pure",
                f"{what} changed the part's own parameter or buffer {name!r}. Parameters change only in the "
                "outer loop; keep anything that evolves during the inner loop in the returned state instead",
            )
    for name, value in attributes.items():
        if now_attributes.get(name, value) != value:
            raise ContractError(
                part, "no hidden state",
                f"{what} changed the attribute {name!r} from {value!r} to {now_attributes[name]!r}. A part keeps "
                "no state between calls: pass it in and return it explicitly (an optimizer's `state`, the "
                "`step` index)",
            )


class _GlobalRngGuard:
    """Fails if the block draws from torch's global CPU generator."""

    def __init__(self, part: nn.Module, what: str) -> None:
        self.part, self.what = part, what

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not torch.equal(self.state, torch.random.get_rng_state()):
            torch.random.set_rng_state(self.state)
            raise ContractError(
                self.part, "explicit randomness",
                f"{self.what} drew from torch's global random generator. Sample only from the "
                "`generator` argument (e.g. torch.randn(..., generator=generator)), so that runs are reproducible",
            )


def _check_inputs_unchanged(part: nn.Module, before: Any, after: Any, what: str) -> None:
    if _same(before, after):
        return
    old, new = dict(_tensors(before)), dict(_tensors(after))
    changed = [n for n in old if n not in new or not _same(old[n], new[n])] + [n for n in new if n not in old]
    raise ContractError(
        part, "pure",
        f"{what} modified its input {', '.join(map(repr, changed)) or '(a container)'} in place. Return new "
        "tensors and dicts (p - lr * g, {**state, ...}) instead of updating inputs (p.sub_(...), p[...] = ..., "
        "p.data, state[k] = ...)",
    )


def _meta_parameters(part: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in part.named_parameters() if p.requires_grad}


def _gradcheck(
    part: nn.Module,
    fn: Callable[..., Any],
    named_inputs: list[tuple[str, Tensor]],
    atol: float,
    rtol: float,
    generator: torch.Generator,
    is_meta: Callable[[str], bool],
) -> list[str]:
    """Float64 gradient check of ``fn(*inputs)`` w.r.t. each input, one input at a time.

    ``fn`` returns a nested structure of tensors; only floating tensors are checked. For
    each input we first ask autograd whether the outputs depend on it at all (a detached
    meta-parameter has no path), then compare the analytic Jacobian with central finite
    differences.
    """
    checked = []
    values = [t.detach().clone() for _, t in named_inputs]
    probe = [v.clone().requires_grad_(True) for v in values]
    outputs = [t for _, t in _tensors(fn(*probe)) if t.is_floating_point() and t.requires_grad]
    weights = [torch.randn(t.shape, dtype=t.dtype, generator=generator).to(t.device) for t in outputs]
    weighted = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
    total = cast(Tensor, weighted) if outputs else torch.zeros(())
    connected = (
        torch.autograd.grad(total, probe, allow_unused=True) if total.requires_grad else [None] * len(probe)
    )
    for i, (name, _) in enumerate(named_inputs):
        if values[i].numel() == 0:
            continue

        def one(x: Tensor, i: int = i) -> tuple[Tensor, ...]:
            args = [x if j == i else values[j] for j in range(len(values))]
            out = [t for _, t in _tensors(fn(*args)) if t.is_floating_point()]
            return tuple(out)

        x = values[i].clone().requires_grad_(True)
        try:
            ok = torch.autograd.gradcheck(one, (x,), eps=1e-6, atol=atol, rtol=rtol, raise_exception=True)
        except Exception as err:  # gradcheck raises GradcheckError or autograd errors
            grad_i = connected[i]
            detached = grad_i is None or not bool(grad_i.abs().sum() > 0)
            if detached and not _moves(one, values[i], generator):
                continue  # the outputs do not depend on this input at all: nothing to check
            if is_meta(name) and detached:
                raise ContractError(
                    part, "differentiable",
                    f"the outputs do not depend differentiably on meta-parameter {name!r}, yet finite differences "
                    "say they depend on it. Keep it in the graph: no .detach(), .item(), .data or torch.no_grad() "
                    "on it",
                ) from err
            raise ContractError(
                part, "differentiable",
                f"float64 gradient check w.r.t. {name!r} failed: autograd disagrees with central finite "
                f"differences (or cannot differentiate). Use differentiable torch ops only ({err})",
            ) from err
        if ok:
            checked.append(name)
    return checked


def _moves(fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor, generator: torch.Generator) -> bool:
    """Whether the outputs of ``fn`` change when ``x`` is perturbed (a finite-difference probe)."""
    with torch.no_grad():
        delta = 1e-3 * torch.randn(x.shape, dtype=x.dtype, generator=generator).to(x.device)
        return not _same(fn(x), fn(x + delta))


_Part = TypeVar("_Part", bound=nn.Module)


def _prepared(part: _Part, dtype: torch.dtype) -> _Part:
    if not isinstance(part, nn.Module):
        raise TypeError(f"check_part checks an nn.Module part (InitPart, OptimizerPart, AdaptPart), got {type(part)}")
    return copy.deepcopy(part).to(dtype)


def _random_params(generator: torch.Generator, dtype: torch.dtype) -> tuple[Params, Params]:
    shapes = {"layer.weight": (3, 2), "layer.bias": (3,), "head.weight": (1, 3)}
    params = {k: torch.randn(s, dtype=dtype, generator=generator) for k, s in shapes.items()}
    grads = {k: torch.randn(s, dtype=dtype, generator=generator) for k, s in shapes.items()}
    return params, grads


class _SmallHeadedModel(nn.Module):
    """``head(features(x))``: the default model of a task-conditioned init (e.g. prototype heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(2, 3), nn.Tanh())
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _small_headed_model(dtype: torch.dtype, generator: torch.Generator) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        model = _SmallHeadedModel().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return model


def _small_train(n_tasks: int, dtype: torch.dtype, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Train halves ``([n_tasks, 4, 2], [n_tasks, 4])`` for `_small_headed_model`: 2 classes, 2 shots each."""
    x = torch.randn(n_tasks, 4, 2, generator=generator, dtype=dtype)
    return x, torch.tensor([0, 1, 0, 1]).expand(n_tasks, 4)


def _small_model(dtype: torch.dtype, generator: torch.Generator) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
        model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)
    with torch.no_grad():  # drawn from the generator: check_part never touches the global RNG
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=dtype))
    return model


# ---------------------------------------------------------------- the probe


def _probe(
    part: nn.Module, what: str, call: Callable[..., Any], args: tuple[Any, ...],
    repeat_rule: str = "no hidden state",
    repeat_hint: str = "A part keeps no state between calls (counters, caches, global randomness): pass it in "
    "`state` and return it",
) -> Any:
    """``call(*args)``, run the way the contract wants every call of a part run; returns its output.

    The one probe of every kind's checker: the call may draw only from its generator (no
    global RNG), must leave its inputs and the part's own parameters, buffers and plain
    attributes as they were, and a second call with equal inputs must give equal outputs
    (``repeat_rule`` and ``repeat_hint`` say what a difference means for this kind).
    """
    before = _snapshot(part)
    saved = _clone(args)
    with _GlobalRngGuard(part, what):
        out = call(*args)
    _check_inputs_unchanged(part, saved, args, what)
    _check_snapshot(part, before, what)
    with _GlobalRngGuard(part, what):
        again = call(*_clone(saved))
    if not _same(out, again):
        raise ContractError(
            part, repeat_rule, f"{what} gave different outputs when called twice with the same inputs. {repeat_hint}"
        )
    return out


def _gradchecked(
    part: nn.Module, call: Callable[..., Any], named_inputs: list[tuple[str, Tensor]], atol: float, rtol: float,
    gen: torch.Generator, is_meta: Callable[[str], bool],
) -> list[str]:
    """`_gradcheck` of ``call(*inputs)`` w.r.t. the part's meta-parameters (swapped in by
    ``functional_call``) and then each of ``named_inputs``."""
    meta = _meta_parameters(part)
    meta_names = list(meta)
    runner = _Runner(part, call)

    def fn(*tensors: Tensor) -> Any:
        swapped = {f"part.{k}": v for k, v in zip(meta_names, tensors[: len(meta_names)], strict=True)}
        return functional_call(runner, swapped, tuple(tensors[len(meta_names):]))

    named = [(n, meta[n]) for n in meta_names] + named_inputs
    return _gradcheck(part, fn, named, atol, rtol, gen, lambda n: n in meta or is_meta(n))


def _batched(x: Any, n: int, gen: torch.Generator) -> Any:
    """``n`` entries of ``x`` stacked on a new leading dimension: floating tensors perturbed, others repeated."""
    if isinstance(x, Mapping):
        return {k: _batched(v, n, gen) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_batched(v, n, gen) for v in x)
    if not x.is_floating_point():
        return x.expand(n, *x.shape).clone()
    return x + 0.1 * torch.randn((n, *x.shape), dtype=x.dtype, generator=gen).to(x.device)


def _entry(x: Any, i: int) -> Any:
    if isinstance(x, Mapping):
        return {k: _entry(v, i) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_entry(v, i) for v in x)
    return x[i]


def _check_vmap(part: nn.Module, run: Callable[..., Any], inputs: tuple[Any, ...], gen: torch.Generator) -> None:
    """``run`` under ``torch.func.vmap`` over a batch of 3 perturbed inputs equals ``run`` on each (float64).

    The inner loop maps the optimizer, the loss and the model's forward (with any architecture
    part inside it) over the tasks of a batch with vmap (``batching="vmap"``), so each must give
    per task what it gives alone. (An init's ``initial_params`` is called once per batch, outside
    vmap, with the number of tasks: it needs no such check.)
    """
    n = 3
    batched = tuple(_batched(x, n, gen) for x in inputs)
    try:
        mapped = [t for _, t in _tensors(torch.func.vmap(run)(*batched))]
    except Exception as err:  # vmap raises RuntimeError / NotImplementedError for what it cannot batch
        raise ContractError(
            part, "vmap-safe",
            f"it cannot run under torch.func.vmap ({type(err).__name__}: {err}). Use batched torch ops only: no "
            "data-dependent Python control flow (if t > 0, .item(), float(t)), no in-place ops on inputs, no .data, "
            "no random ops",
        ) from err
    for i in range(n):
        alone = [t for _, t in _tensors(run(*(_entry(x, i) for x in batched)))]
        if len(mapped) != len(alone) or not all(
            torch.allclose(a[i], b, rtol=1e-10, atol=1e-12, equal_nan=True) for a, b in zip(mapped, alone, strict=True)
        ):
            raise ContractError(
                part, "vmap-safe",
                f"under torch.func.vmap its outputs for batch entry {i} differ from the same call alone: it mixes "
                "entries of a batch (a reduction over a leading dimension, a shape-dependent branch) or samples "
                "at random; compute per task, with batched torch ops",
            )


class _Runner(nn.Module):
    """Lets ``functional_call`` swap a part's meta-parameters while calling any of its methods."""

    def __init__(self, part: nn.Module, call: Callable[..., Any]) -> None:
        super().__init__()
        self.part = part
        self._call = call

    def forward(self, *args: Any) -> Any:
        return self._call(*args)


# ---------------------------------------------------------------- optimizer parts


def _optimizer_inputs(inputs: Any, dtype: torch.dtype, gen: torch.Generator) -> tuple[Params, Params]:
    if inputs is None:
        return _random_params(gen, dtype)
    params, grads = inputs
    if set(params) != set(grads):
        raise ValueError(f"inputs=(params, grads) must have the same keys, got {list(params)} and {list(grads)}")
    return {k: v.detach().to(dtype) for k, v in params.items()}, {k: v.detach().to(dtype) for k, v in grads.items()}


def _check_step_result(part: nn.Module, what: str, result: Any, p: Params) -> None:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Mapping)):
        raise ContractError(part, "structure", f"{what} must return (params, state), got {type(result)}")
    new_p, new_state = result
    if list(new_p) != list(p):
        raise ContractError(
            part, "structure",
            f"{what} returned parameters {list(new_p)} but was given {list(p)}: return every given "
            "parameter, under the same name, in the same order",
        )
    for name, t in new_p.items():
        if not isinstance(t, Tensor) or t.shape != p[name].shape or t.dtype != p[name].dtype:
            got = (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t)
            raise ContractError(
                part, "structure",
                f"{what} returned {name!r} as {got}, expected shape {tuple(p[name].shape)} and dtype {p[name].dtype}",
            )
    if not isinstance(new_state, Mapping):
        raise ContractError(part, "structure", f"{what} must return the state as a dict, got {type(new_state)}")


def _check_optimizer(
    part: OptimizerPart, inputs: Any, dtype: torch.dtype, atol: float, rtol: float, gen: torch.Generator, steps: int
) -> ContractReport:
    params, grads = _optimizer_inputs(inputs, dtype, gen)
    part = _prepared(part, dtype)
    part.bind({k: v.clone() for k, v in params.items()})

    def run(p: Params, g: Params) -> tuple[Params, State]:
        state = part.init_state(p)
        for k in range(steps):
            p, state = part.step(p, g, state, k)
        return p, state

    p, state = params, _probe(part, "init_state", part.init_state, (params,))
    if not isinstance(state, Mapping):
        raise ContractError(part, "structure", f"init_state must return a dict of tensors, got {type(state)}")
    for k in range(steps):
        what = f"step(..., step={k})"
        result = _probe(part, what, lambda p, g, s, k=k: part.step(p, g, s, k), (p, grads, state))
        _check_step_result(part, what, result, p)
        p, state = result
    if not _same(run(_clone(params), _clone(grads)), run(_clone(params), _clone(grads))):
        raise ContractError(part, "no hidden state", "two identical runs of init_state + step gave different results")

    def flat(*ts: Tensor) -> Any:
        return run(dict(zip(params, ts[: len(params)], strict=True)), dict(zip(grads, ts[len(params):], strict=True)))

    named = [(f"params.{k}", v) for k, v in params.items()] + [(f"grads.{k}", v) for k, v in grads.items()]
    checked = _gradchecked(part, flat, named, atol, rtol, gen, lambda n: False)
    _check_vmap(part, run, (params, grads), gen)
    rules = ("pure", "no hidden state", "explicit randomness", "structure", "differentiable", "vmap-safe")
    return ContractReport(type(part).__name__, "optimizer", rules, tuple(_meta_parameters(part)), tuple(checked))


# ---------------------------------------------------------------- init parts


def _init_setting(
    part: InitPart, model: nn.Module | None, dtype: torch.dtype, gen: torch.Generator, n_tasks: int, inputs: Any
) -> tuple[nn.Module, tuple[Tensor, Tensor] | None]:
    """The model an init binds to (a float64 copy) and, for one that uses train data, the train halves."""
    train: tuple[Tensor, Tensor] | None = None
    if part.uses_train_data:
        if model is None:
            model = _small_headed_model(dtype, gen)
            train = _small_train(n_tasks, dtype, gen) if inputs is None else None
        if train is None:
            if inputs is None:
                raise TypeError(
                    f"{type(part).__name__} computes θ0 from each task's train half: pass inputs=(x, y) with a "
                    f"leading task dimension of n_tasks={n_tasks} (and the model it fits)"
                )
            x, y = inputs
            train = (x.to(dtype) if x.is_floating_point() else x, y)
    model = copy.deepcopy(model).to(dtype) if model is not None else _small_model(dtype, gen)
    return model, train


def _check_theta0(part: nn.Module, what: str, theta0: Any, model_params: Params, n_tasks: int) -> None:
    if not isinstance(theta0, Mapping) or list(theta0) != list(model_params):
        got = list(theta0) if isinstance(theta0, Mapping) else type(theta0)
        raise ContractError(
            part, "structure",
            f"{what} returned {got}; it must return a dict with every model parameter {list(model_params)}, "
            "in the model's order",
        )
    for name, t in theta0.items():
        want = (n_tasks, *model_params[name].shape)
        if not isinstance(t, Tensor) or tuple(t.shape) != want or t.dtype != model_params[name].dtype:
            found = (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t)
            raise ContractError(
                part, "structure",
                f"{what} returned {name!r} as {found}; expected shape {want} (a leading task dimension of "
                f"n_tasks={n_tasks}) and dtype {model_params[name].dtype}",
            )


def _check_init(
    part: InitPart, model: nn.Module | None, dtype: torch.dtype, atol: float, rtol: float, gen: torch.Generator,
    n_tasks: int, inputs: Any = None,
) -> ContractReport:
    model, train = _init_setting(part, model, dtype, gen, n_tasks, inputs)
    part = _prepared(part, dtype)
    part.bind(model)
    model_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))

    def call(mp: Mapping[str, Tensor]) -> Params:
        extra = {} if train is None else {"train": train}
        return part.initial_params(mp, n_tasks, torch.Generator().manual_seed(seed), **extra)

    what = "initial_params"
    hint = "θ0 must be the same for two generators seeded alike: draw every random number from the `generator` " \
        "argument and keep no state between calls"
    theta0 = _probe(part, what, call, (model_params,), "explicit randomness", hint)
    _check_theta0(part, what, theta0, model_params, n_tasks)

    model_names = list(model_params) if part.uses_model_parameters else []

    def flat(*ts: Tensor) -> Any:
        return call({**model_params, **dict(zip(model_names, ts, strict=True))})

    named = [(f"model.{n}", model_params[n]) for n in model_names]
    checked = _gradchecked(part, flat, named, atol, rtol, gen, lambda n: n.startswith("model."))
    # no vmap-safe rule: the inner loop calls initial_params once per batch, outside vmap
    rules = ("pure", "explicit randomness", "structure", "differentiable")
    return ContractReport(type(part).__name__, "init", rules, tuple(_meta_parameters(part)), tuple(checked))


# ---------------------------------------------------------------- adapt parts


def _check_adapt(part: AdaptPart, names: Sequence[str]) -> ContractReport:
    names = list(names)
    what = "select"
    hint = "It must be a pure function of the names, the same names each time"
    chosen = _probe(part, what, part.select, (names,), "no hidden state", hint)
    if not isinstance(chosen, list) or not all(isinstance(n, str) for n in chosen):
        raise ContractError(part, "structure", f"{what} must return a list of names, got {chosen!r}")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ContractError(part, "structure", f"{what} returned names {unknown} that are not among {names}")
    if len(set(chosen)) != len(chosen):
        raise ContractError(part, "structure", f"{what} returned a name twice: {chosen}")
    order = [names.index(n) for n in chosen]
    if order != sorted(order):
        raise ContractError(
            part, "structure", f"{what} returned {chosen}, not in the model's order {names}; keep the given order"
        )
    rules = ("pure", "no hidden state", "explicit randomness", "structure")
    return ContractReport(type(part).__name__, "adapt", rules, tuple(n for n, _ in part.named_parameters()))


# ---------------------------------------------------------------- other modules (a loss, an architecture part)


def _check_module(
    part: nn.Module, call: PartCall, inputs: Sequence[Tensor], dtype: torch.dtype, atol: float, rtol: float,
    gen: torch.Generator,
) -> ContractReport:
    part = _prepared(part, dtype)
    inputs = tuple(t.detach().to(dtype) if t.is_floating_point() else t for t in inputs)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))

    def run(*xs: Tensor) -> Any:
        return call(part, tuple(xs), torch.Generator().manual_seed(seed))

    what = "call(part, inputs, generator)"
    hint = "Keep no state between calls and draw randomness only from the generator"
    first = _probe(part, what, run, inputs, "no hidden state", hint)
    if not _tensors(first):
        raise ContractError(part, "structure", f"{what} returned no tensors ({type(first)})")
    floating = [i for i, t in enumerate(inputs) if t.is_floating_point()]

    def flat(*ts: Tensor) -> Any:
        xs = list(inputs)
        for i, t in zip(floating, ts, strict=True):
            xs[i] = t
        return run(*xs)

    named = [(f"inputs[{i}]", inputs[i]) for i in floating]
    checked = _gradchecked(part, flat, named, atol, rtol, gen, lambda n: False)
    rules: tuple[str, ...] = ("pure", "no hidden state", "explicit randomness", "structure", "differentiable")
    if inputs:  # what runs inside vmap (a loss, a forward) sees one task's inputs: vmap over a batch of them
        _check_vmap(part, run, inputs, gen)
        rules += ("vmap-safe",)
    return ContractReport(type(part).__name__, "module", rules, tuple(_meta_parameters(part)), tuple(checked))


# ---------------------------------------------------------------- entry point


def check_part(
    part: nn.Module,
    *,
    inputs: Any = None,
    dtype: torch.dtype = torch.float64,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
    model: nn.Module | None = None,
    call: PartCall | None = None,
    steps: int = 3,
    n_tasks: int = 2,
) -> ContractReport:
    """Checks a part against the part contract; raises `ContractError` naming the broken rule.

    The part is checked on a deep copy cast to ``dtype`` and bound the way `MetaKnowledge`
    binds it, so the part passed in is left as it was. What is run depends on the kind:

    * `OptimizerPart`: ``bind`` to ``params``, then ``init_state`` and ``steps`` calls of
      ``step`` with ``grads``; outputs keep the names, shapes and dtypes of ``params``;
      every call is repeated with equal inputs and must give equal outputs; the gradient
      check covers the meta-parameters, ``params`` and ``grads``; then the whole run under
      ``torch.func.vmap`` over a batch of 3 must match the run on each entry.
    * `InitPart`: ``bind`` to ``model``, then ``initial_params(model_params, n_tasks,
      generator)`` twice with generators seeded alike; θ0 must hold every model parameter
      with a leading task dimension; the gradient check covers the meta-parameters and, if
      `InitPart.uses_model_parameters`, the model's parameters. An init with
      `InitPart.uses_train_data` also gets ``train=inputs`` (the tasks' ``(x, y)`` train
      halves; by default a small ``head(features(x))`` model with 2-class train data).
    * `AdaptPart`: ``select(names)`` returns a subset of ``names``, in order, the same each time.
    * any other ``nn.Module`` (e.g. a meta-learned loss, an architecture part, a model):
      ``call(part, inputs, generator)``; with ``inputs``, also under ``torch.func.vmap`` over a
      batch of 3 (each input stacked, floating ones perturbed), as the inner loop runs it.

    Args:
        part: the part to check (as constructed; it is not modified).
        inputs: for an optimizer, ``(params, grads)`` (two dicts with the same keys; random
            by default); for an adapt part, the parameter names (default: ``model``'s, or a
            few Conv-4-like names); for a module part, a tuple of tensors; for an init with
            ``uses_train_data``, the train halves ``(x, y)`` with a leading task dimension.
        dtype: floating dtype the check runs in (float64 for a meaningful gradient check).
        atol: absolute tolerance of the gradient check.
        rtol: relative tolerance of the gradient check.
        generator: source of the random inputs and seeds (seed 0 by default).
        model: the model an init part binds to (default: a small 2-3-1 MLP); for an adapt
            part, where the default names come from.
        call: for a generic module part, how to run it: ``call(part, inputs, generator)``
            returning a tensor or a dict/tuple of tensors.
        steps: optimizer steps to run.
        n_tasks: tasks an init part is asked for.

    Returns:
        A `ContractReport` of the rules checked.

    Raises:
        ContractError: a rule failed; the message names the rule and the fix.

    Example:
        >>> report = check_part(MetaSGD(init_lr=0.1))
        >>> report.gradchecked[0]
        'lrs.layer:weight'
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if isinstance(part, OptimizerPart):
        return _check_optimizer(part, inputs, dtype, atol, rtol, gen, steps)
    if isinstance(part, InitPart):
        return _check_init(part, model, dtype, atol, rtol, gen, n_tasks, inputs)
    if isinstance(part, AdaptPart):
        if inputs is not None:
            names = list(inputs)
        elif model is not None:
            names = [n for n, _ in model.named_parameters()]
        else:
            names = list(_DEFAULT_NAMES)
        return _check_adapt(part, names)
    if call is None:
        raise TypeError(
            f"{type(part).__name__} is not an InitPart, OptimizerPart or AdaptPart: pass call=fn with "
            "fn(part, inputs, generator) -> outputs to say how to run it"
        )
    return _check_module(part, call, tuple(inputs) if inputs is not None else (), dtype, atol, rtol, gen)
