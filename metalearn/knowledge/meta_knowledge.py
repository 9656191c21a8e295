"""`MetaKnowledge`: ω, the model (architecture) with the parts that say how θ starts and adapts."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metalearn.knowledge.builtins import AdaptAll, PointInit
from metalearn.knowledge.parts import AdaptPart, ArchitecturePart, InitPart, OptimizerPart, Params

__all__ = [
    "LossFn",
    "MetaKnowledge",
    "architecture_paths",
    "check_target_shape",
    "default_loss",
    "native_norm_layers",
    "theta_parameters",
]

LossFn = Callable[[Tensor, Tensor], Tensor]

_NATIVE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm)
_RUNNING_STATS_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def check_target_shape(output: Tensor, target: Tensor) -> None:
    """Raises if ``target`` does not fit ``output`` for `default_loss` (shapes and dtypes only).

    Only static facts are read (no sync, safe under ``torch.func.vmap``, where the shapes are
    those of one task): a floating (regression) target must have the output's shape, since
    a ``[K]`` target against a ``[K, 1]`` output broadcasts to a ``[K, K]`` squared error;
    an integer (class) target needs an output with more than one class, since integer
    regression targets would otherwise be taken for class labels.
    """
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"targets of dtype {target.dtype} are neither class labels nor regression values; use int64 class "
            "labels or float regression targets"
        )
    if target.is_floating_point():
        if output.shape != target.shape:
            raise ValueError(
                f"regression targets of shape {tuple(target.shape)} do not match the model's output of shape "
                f"{tuple(output.shape)}: the squared error would broadcast them (e.g. [K] against [K, 1] gives a "
                "[K, K] error) and train on the wrong objective. Give targets the output's shape (y[:, None] for a "
                "[K, 1] output)"
            )
        return
    class_dim = 1 if output.ndim >= 2 else 0
    if output.ndim == 0 or output.shape[class_dim] == 1:
        raise ValueError(
            f"integer targets (dtype {target.dtype}) are taken for class labels, but the model has "
            f"{1 if output.ndim == 0 else output.shape[class_dim]} output per example (output shape "
            f"{tuple(output.shape)}), so there is only one class. For regression, cast the targets to float "
            "(y.float()); for classification, give the model one output per class"
        )
    expected = output.shape[:class_dim] + output.shape[class_dim + 1 :]
    if target.shape != expected:
        raise ValueError(
            f"class labels of shape {tuple(target.shape)} do not match the model's output of shape "
            f"{tuple(output.shape)} (one label per example: expected {tuple(expected)}); flatten the labels "
            "(y.reshape(-1)) or check the model's output"
        )


def default_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for integer class targets, mean squared error otherwise.

    Raises:
        ValueError: targets whose shape does not fit the output (`check_target_shape`).
    """
    check_target_shape(output, target)
    if target.is_floating_point():
        return F.mse_loss(output, target)
    return F.cross_entropy(output, target)


def native_norm_layers(model: nn.Module) -> list[str]:
    """Names of torch's native batch/instance/layer norm modules with affine parameters.

    Under a raw ``torch.func.vmap`` their second-order meta-gradients are silently wrong when
    the affine parameters adapt (measured on torch 2.13, relative error up to 6e-2 in
    float64). The library's vmap path is exact for them all the same: it routes every norm
    call to primitives (`metalearn.exact_norms`); this list is for information.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, _NATIVE_NORMS) and getattr(module, "weight", None) is not None:
            names.append(name)
    return names


def _refuse_running_statistics(model: nn.Module) -> None:
    """Raises ValueError for a batch or instance norm of ``model`` that tracks running statistics.

    The functional inner loop cannot update them in place (and under vmap not once per
    task); with ``track_running_stats=False`` each batch is normalised with its own
    statistics, as MAML does.
    """
    for name, module in model.named_modules():
        if isinstance(module, _RUNNING_STATS_NORMS) and module.track_running_stats:
            fix = (
                "metalearn.models.BatchNorm" if isinstance(module, nn.modules.batchnorm._BatchNorm)
                else "the default track_running_stats=False of instance norm"
            )
            raise ValueError(
                f"model.{name or '(root)'} ({type(module).__name__}) tracks running statistics, which the "
                "functional inner loop cannot update; build it with track_running_stats=False (MAML-style "
                f"batch statistics) or use {fix}"
            )


def architecture_paths(model: nn.Module) -> list[str]:
    """Names (in ``model.named_modules()``) of the `ArchitecturePart`\\ s registered in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, ArchitecturePart) and name]


def theta_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The filter that says which of ``model``'s parameters θ holds: all but those of its
    `ArchitecturePart`\\ s (e.g. DARTS's α), which are meta-parameters of ω and never adapted
    or drawn by an init. The names are ``model.named_parameters()``'s, in its order."""
    # one walk (it runs at every step): `named_parameters()`'s names and order, those under a part left out
    hidden: tuple[str, ...] = ()
    seen: set[int] = set()
    theta: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if path and isinstance(module, ArchitecturePart):
            hidden += (path + ".",)
        for key, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{path}.{key}" if path else key
            if not name.startswith(hidden):
                theta[name] = p
    return theta


def _architecture_parts(model: nn.Module) -> list[ArchitecturePart]:
    """The distinct `ArchitecturePart`\\ s registered in the model.

    Raises:
        ValueError: a module reads an `ArchitecturePart` as its ``architecture`` attribute that
            is not registered in the model (e.g. held in a plain list): its meta-parameters would
            never be trained.
    """
    found: list[ArchitecturePart] = []
    for module in model.modules():
        if isinstance(module, ArchitecturePart) and module is not model and all(p is not module for p in found):
            found.append(module)
    for name, module in model.named_modules():
        part = getattr(module, "architecture", None)
        if isinstance(part, ArchitecturePart) and all(p is not part for p in found):
            raise ValueError(
                f"model.{name or '(root)'}.architecture ({type(part).__name__}) is not a registered submodule "
                "(e.g. it is held in a plain list), so its meta-parameters would never be trained; assign it "
                "as a submodule (self.architecture = part) or hold it in an nn.ModuleList"
            )
    return found


class MetaKnowledge(nn.Module):
    """ω: everything learned across tasks. Its ``parameters()`` are exactly the meta-parameters.

    ω owns the model (the architecture), four parts and an optional inner loss:

    * ``init`` (`InitPart`) — where θ starts; `PointInit` (MAML) by default;
    * ``optimizer`` (`OptimizerPart`) — the inner update rule (`InnerSGD`, `MetaSGD`, ...);
    * ``adapt`` (`AdaptPart`) — which parameters adapt; `AdaptAll` by default,
      ``AdaptOnly("head.*")`` for ANIL;
    * ``architecture`` (`ArchitecturePart`, found in the model) — meta-parameters of the
      model's structure, e.g. the mixing logits of a searchable model;
    * ``loss`` — the inner loss (see Args).

    θ is a ``dict[str, Tensor]`` keyed by the model's parameter names (`theta_parameters`:
    all but an `ArchitecturePart`'s) and is run through ``torch.func.functional_call``; the
    model itself is never modified.

    **Every module is registered; a filter says what ω's own tensors are.** The model is
    always the submodule ``model``, so ``omega.to()``, ``.double()``, ``.eval()`` and
    ``.train()`` reach it (its dropout too). ``parameters()`` / ``named_parameters()`` /
    ``named_buffers()`` / ``state_dict()`` leave out (the equinox way: structure by filter):

    * the whole model when the init does not use its weights (``init.uses_model_parameters``
      ``False``, e.g. `ScaledInit`): they are a template (names, shapes, dtype, device) and
      their ``requires_grad`` is turned off;
    * the model's `ArchitecturePart`\\ s, listed once as ``architecture.*`` instead.

    ``load_state_dict`` fills what the filter left out from ω itself (the template keeps its
    values, α are loaded through ``architecture.*``), so checkpoints keep the keys they had.
    A module that holds ω as a submodule lists all of ω's tensors (torch walks its children
    itself): pass ``omega.parameters()``, not the holder's, to the outer optimizer.

    Args:
        model: any ``nn.Module``. Batch norm must not track running statistics (MAML-style
            batch norm normalises each batch with its own statistics).
        optimizer: the inner update rule.
        init: where θ starts.
        adapt: which parameters adapt.
        loss: the inner-loop loss ``loss(output, target)``; defaults to `default_loss`
            (cross-entropy for integer targets, MSE otherwise). A module with parameters
            here makes the inner loss itself meta-learned. The val loss that θ is scored
            with (the meta-objective, and `evaluate`'s) is always `default_loss`.

    Example:
        >>> omega = MetaKnowledge(Conv4(num_classes=5), optimizer=InnerSGD(lr=0.4))  # MAML
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerPart,
        init: InitPart | None = None,
        adapt: AdaptPart | None = None,
        loss: LossFn | None = None,
    ) -> None:
        super().__init__()
        _refuse_running_statistics(model)
        architectures = _architecture_parts(model)  # checked before anything is changed
        init = init if init is not None else PointInit()
        adapt = adapt if adapt is not None else AdaptAll()
        self.model = model
        template = theta_parameters(model)
        if not init.uses_model_parameters:
            for p in template.values():  # a template: names and shapes only, never a meta-parameter
                p.requires_grad_(False)
        self.init = init
        self.optimizer = optimizer
        self.adapt = adapt
        self.loss = loss
        self.adapted_names: list[str] = adapt.select(list(template))
        self.static_names: list[str] = [n for n in template if n not in set(self.adapted_names)]
        init.bind(model)
        optimizer.bind({n: template[n] for n in self.adapted_names})
        if architectures:
            self.architecture = architectures[0] if len(architectures) == 1 else nn.ModuleList(architectures)
        self._register_state_dict_hook(MetaKnowledge._drop_filtered_state)
        self.register_load_state_dict_pre_hook(MetaKnowledge._fill_filtered_state)

    @property
    def network(self) -> nn.Module:
        """Deprecated alias of `model` (the one name for ω's model); warns."""
        warnings.warn("omega.network is deprecated: use omega.model", DeprecationWarning, stacklevel=2)
        return self.model

    def _filtered_prefixes(self) -> tuple[str, ...]:
        """Prefixes (relative to ω) of registered tensors that are not ω's own entries (see the class docs)."""
        if not self.init.uses_model_parameters:
            return ("model.",)
        return tuple(f"model.{path}." for path in architecture_paths(self.model))

    def _filtered(self, names: Iterator[tuple[str, Any]], prefix: str, remove_duplicate: bool) -> Iterator[Any]:
        hidden = tuple(prefix + (prefix and ".") + p for p in self._filtered_prefixes())
        seen: set[int] = set()
        for name, t in names:
            if name.startswith(hidden) or (remove_duplicate and id(t) in seen):
                continue
            seen.add(id(t))
            yield name, t

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """ω's meta-parameters by name: every registered parameter but the filtered ones (class docs)."""
        names = super().named_parameters(prefix, recurse, remove_duplicate=False)
        yield from self._filtered(names, prefix, remove_duplicate)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """ω's buffers by name, with the same filter as `named_parameters`."""
        names = super().named_buffers(prefix, recurse, remove_duplicate=False)
        yield from self._filtered(names, prefix, remove_duplicate)

    @staticmethod
    def _drop_filtered_state(module: MetaKnowledge, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        hidden = tuple(prefix + p for p in module._filtered_prefixes())
        for key in [k for k in state if k.startswith(hidden)]:
            del state[key]

    @staticmethod
    def _fill_filtered_state(
        module: MetaKnowledge, state: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """Gives the filtered entries a value before loading: α's from ``architecture.*``, the
        template's its own (a checkpoint never holds them)."""
        listed = {id(t): k for k, t in module.state_dict(keep_vars=True).items()}
        for key, t in module.model.state_dict(prefix=prefix + "model.", keep_vars=True).items():
            if key in state or not key.startswith(tuple(prefix + p for p in module._filtered_prefixes())):
                continue
            alias = listed.get(id(t))
            state[key] = state[prefix + alias] if alias is not None and prefix + alias in state else t.detach()

    def model_params(self) -> dict[str, Tensor]:
        """The model's parameters that θ holds, by name (`theta_parameters`)."""
        return dict(theta_parameters(self.model))

    def initial_params(
        self,
        n_tasks: int,
        generator: torch.Generator | None = None,
        train: tuple[Tensor, Tensor] | None = None,
    ) -> Params:
        """θ0 for ``n_tasks`` tasks, each tensor with a leading task dimension.

        Args:
            n_tasks: number of tasks.
            generator: randomness for a stochastic init.
            train: the tasks' train halves ``(x, y)`` with a leading task dimension of size
                ``n_tasks``; required by an init with ``uses_train_data`` (e.g.
                `metalearn.knowledge.PrototypeInit`), ignored by the others.
        """
        if not self.init.uses_train_data:
            return self.init.initial_params(self.model_params(), n_tasks, generator)
        if train is None:
            raise ValueError(
                f"{type(self.init).__name__} computes θ0 from each task's train half: pass "
                "train=(x, y) with a leading task dimension to initial_params"
            )
        x, y = train
        if x.shape[0] != n_tasks or y.shape[0] != n_tasks:
            raise ValueError(
                f"train has {x.shape[0]} input and {y.shape[0]} target tasks, but n_tasks={n_tasks}; "
                "pass the batch's train half with a leading task dimension"
            )
        # an init with uses_train_data takes train= besides InitPart's arguments
        initial_params: Callable[..., Params] = self.init.initial_params
        return initial_params(self.model_params(), n_tasks, generator, train=(x, y))

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Runs the model with parameters ``params`` (θ) on ``x``: ``torch.func.functional_call``, or the
        model's own ``forward_with(params, x)`` where its class defines one in its own body (a subclass
        that does not define it again is not trusted with its parent's: its ``forward`` may differ).
        ``forward_with`` must compute what functional_call computes; `metalearn.models.MLP` and
        `metalearn.models.Conv4` have one.
        While ``torch.compile`` traces, functional_call: the compiled code has no Python to save."""
        if not torch.compiler.is_compiling():
            forward_with = type(self.model).__dict__.get("forward_with")
            if forward_with is not None:
                return forward_with(self.model, params, x)
        return functional_call(self.model, dict(params), (x,))

    def inner_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """The loss the inner loop descends (ω's ``loss`` if given)."""
        loss = self.loss if self.loss is not None else default_loss
        return loss(self(params, x), y)

    def task_loss(self, params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """`default_loss` of the model's output: the loss θ is scored with on a task's val half.

        A convenience for scripts and tests. The library's meta-objective (`metalearn.outer`,
        `metalearn.modes`) and `metalearn.evaluate` compute this same expression in place,
        whatever ω's inner ``loss``.
        """
        return default_loss(self(params, x), y)

    def native_norms_adapted(self) -> list[str]:
        """Native norm layers whose affine parameters adapt (unsafe under a raw vmap, second order;
        the library's vmap path computes them exactly, see `metalearn.exact_norms`)."""
        adapted = set(self.adapted_names)
        return [
            n for n in native_norm_layers(self.model)
            if f"{n}.weight" in adapted or f"{n}.bias" in adapted or (n == "" and "weight" in adapted)
        ]
