"""ω and its parts: the part contract (`check_part`) on every built-in and on broken parts; MetaKnowledge."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metalearn.knowledge as knowledge
from metalearn.knowledge import (
    AdaptAll,
    AdaptOnly,
    AdaptPart,
    ContractError,
    ContractReport,
    InitPart,
    InnerSGD,
    MetaKnowledge,
    MetaSGD,
    OptimizerPart,
    Params,
    PointInit,
    State,
    anil,
    check_part,
    default_loss,
    maml,
    meta_sgd,
    native_norm_layers,
)
from metalearn.knowledge.parts import param_key
from metalearn.models import MLP, Conv4

DT = torch.float64


def _exported(name: str, *args, **kwargs) -> Callable[[], nn.Module] | None:
    """A factory for ``metalearn.knowledge.<name>(*args, **kwargs)`` if that part exists."""
    cls = getattr(knowledge, name, None)
    return (lambda: cls(*args, **kwargs)) if cls is not None else None


_MAYBE = {
    "GaussianInit": _exported("GaussianInit", init_scale=0.1),
    "ScaledInit": _exported("ScaledInit"),
    "MomentumSGD": _exported("MomentumSGD", 0.1, momentum=0.5, per="tensor"),
    "NesterovMomentumSGD": _exported("MomentumSGD", 0.1, momentum=0.5, nesterov=True),
    "InnerAdam": _exported("InnerAdam", 0.05, betas=(0.8, 0.9), eps=1e-3),
    "ElementwiseInnerAdam": _exported("InnerAdam", 0.05, betas=(0.8, 0.9), eps=1e-3, per="element"),
}
if "OptimizerMixture" in knowledge.__all__ and "MomentumSGD" in knowledge.__all__:
    _MAYBE["OptimizerMixture"] = lambda: knowledge.OptimizerMixture(
        [InnerSGD(0.1), knowledge.MomentumSGD(0.05, momentum=0.5)], temperature=0.7
    )

#: Every built-in part, with how to construct it (keys: class names, or labelled variants).
BUILTINS: dict[str, Callable[[], nn.Module]] = {
    "InnerSGD": lambda: InnerSGD(lr=0.1),
    "MetaSGD": lambda: MetaSGD(init_lr=0.1),
    "PointInit": PointInit,
    "PrototypeInit": knowledge.PrototypeInit,
    "AdaptAll": AdaptAll,
    "AdaptOnly": lambda: AdaptOnly("head"),
    **{name: factory for name, factory in _MAYBE.items() if factory is not None},
    # the composable rules (metalearn.knowledge.rules): chains, and learned hyper-parameters on any rule
    "Chain": lambda: knowledge.chain(knowledge.scale_by_adam(0.8, 0.9, 1e-3), knowledge.scale_by_learning_rate(0.05)),
    "NesterovTraceLearnedPerEntry": lambda: knowledge.chain(
        knowledge.learned(knowledge.trace(0.5, nesterov=True), "momentum", per="entry"), knowledge.scale(-0.1)
    ),
    "AdamLearnedBeta2PerTensor": lambda: knowledge.learned(
        knowledge.chain(knowledge.scale_by_adam(0.8, 0.9, 1e-3), knowledge.scale_by_learning_rate(0.05)),
        "beta2", per="tensor",
    ),
    "ScaleLearnedShared": lambda: knowledge.learned(knowledge.scale(-0.1), "factor"),
    # MAML++, BOIL, CAVIA and the neural optimizer (docs/methods.md); the default check model is
    # Linear(2, 3), Tanh, Linear(3, 1): its first bias stands in for CAVIA's context
    "AdaptExcept": lambda: knowledge.AdaptExcept("head"),
    "ContextInit": lambda: knowledge.ContextInit(("0.bias",)),
    "NeuralOptimizer": lambda: knowledge.NeuralOptimizer(0.1, hidden=(4,), output_scale=0.5),
    "PerStepLR": lambda: knowledge.PerStepLR(0.1, steps=2),
    "PerStepNormWeights": lambda: knowledge.PerStepNormWeights(knowledge.PerStepLR(0.1, 2), 2, ["layer.bias"]),
}
#: Base classes: exported for subclassing, not parts one constructs.
_BASES = {"InitPart", "OptimizerPart", "AdaptPart"}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_part_honours_the_contract(name: str) -> None:
    part = BUILTINS[name]()
    report = check_part(part)
    assert isinstance(report, ContractReport) and report.part == type(part).__name__
    assert {"pure", "explicit randomness", "structure"} <= set(report.rules)
    assert set(report.meta_parameters) <= set(report.gradchecked) or report.kind == "adapt"
    assert type(part).__name__ in str(report)


@pytest.mark.parametrize("name", ["PointInit", "MetaSGD"])
def test_builtins_honour_the_contract_on_the_shipped_models(name: str) -> None:
    model = Conv4(3, hidden=2, image_size=16)
    if name == "PointInit":
        report = check_part(PointInit(), model=model)
        assert {f"model.{n}" for n, _ in model.named_parameters()} == set(report.gradchecked)
    else:
        params = {n: p.detach() for n, p in MLP((1, 4, 1)).named_parameters()}
        grads = {n: torch.randn_like(p) for n, p in params.items()}
        report = check_part(MetaSGD(0.1), inputs=(params, grads), steps=2)
        assert report.meta_parameters == tuple(f"lrs.{param_key(n)}" for n in params)
        assert {f"grads.{n}" for n in params} <= set(report.gradchecked)
    assert check_part(AdaptOnly("head"), model=model).kind == "adapt"


def test_every_exported_part_class_is_checked() -> None:
    """A new built-in part must be added to BUILTINS above, so that the contract runs on it."""
    exported = [getattr(knowledge, n) for n in knowledge.__all__]
    parts = [c for c in exported if isinstance(c, type) and issubclass(c, InitPart | OptimizerPart | AdaptPart)]
    concrete = {c.__name__ for c in parts if not getattr(c, "__abstractmethods__", None)} - _BASES
    assert concrete, "no part classes exported from metalearn.knowledge?"
    assert concrete <= set(BUILTINS), f"add {sorted(concrete - set(BUILTINS))} to BUILTINS in this file"


def test_check_part_leaves_the_given_part_unchanged() -> None:
    omega = meta_sgd(MLP((1, 4, 1)), lr=0.1)
    before = {n: p.detach().clone() for n, p in omega.optimizer.named_parameters()}
    check_part(omega.optimizer)
    after = dict(omega.optimizer.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.float32 for n in before)


def test_a_meta_learned_loss_module_is_checked_with_a_callable() -> None:
    class WeightedMSE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_weight = nn.Parameter(torch.zeros(3))

        def forward(self, output: Tensor, target: Tensor) -> Tensor:
            return (self.log_weight.exp() * (output - target).square()).mean()

    inputs = (torch.randn(5, 3, dtype=DT), torch.randn(5, 3, dtype=DT))
    report = check_part(WeightedMSE(), inputs=inputs, call=lambda part, xs, gen: part(*xs))
    assert report.kind == "module"
    assert report.gradchecked == ("log_weight", "inputs[0]", "inputs[1]")
    with pytest.raises(TypeError, match="call="):
        check_part(WeightedMSE())


# ---------------------------------------------------------------- broken parts are caught


class InPlaceSGD(OptimizerPart):
    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        for k, p in params.items():
            p.sub_(0.1 * grads[k])
        return params, state


class CountingSGD(OptimizerPart):
    """Hidden state: decays the step size by how often it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def init_state(self, params: Params) -> State:
        self.calls = 0
        return {}

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        self.calls += 1
        return {k: p - 0.1 / self.calls * grads[k] for k, p in params.items()}, state


class BufferCountingSGD(OptimizerPart):
    """Hidden state kept in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        self.calls += 1
        return {k: p - 0.1 / self.calls * grads[k] for k, p in params.items()}, state


class StateMutatingMomentum(OptimizerPart):
    """Updates its state dict in place instead of returning a new one."""

    def init_state(self, params: Params) -> State:
        return {f"v:{k}": torch.zeros_like(p) for k, p in params.items()}

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        for k in params:
            state[f"v:{k}"] = 0.9 * state[f"v:{k}"] + grads[k]
        return {k: p - 0.1 * state[f"v:{k}"] for k, p in params.items()}, state


class DetachedMetaSGD(MetaSGD):
    """Its step sizes never receive a meta-gradient."""

    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        return {k: p - self.lrs[param_key(k)].detach() * grads[k] for k, p in params.items()}, state


class _WrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return g  # should be 2 * g


class WrongGradientSGD(OptimizerPart):
    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        return {k: p - 0.05 * _WrongBackward.apply(grads[k]) for k, p in params.items()}, state


class ReshapingSGD(OptimizerPart):
    def step(self, params: Params, grads: Params, state: State, step: int) -> tuple[Params, State]:
        return {k: (p - 0.1 * grads[k]).reshape(-1) for k, p in params.items()}, state


class GlobalRandomInit(InitPart):
    """Perturbs θ0 with the global RNG instead of the generator it is given."""

    def initial_params(self, model_params: Mapping[str, Tensor], n_tasks: int, generator) -> Params:
        return {n: p + 0.01 * torch.randn(n_tasks, *p.shape, dtype=p.dtype) for n, p in model_params.items()}


class OwnGeneratorInit(InitPart):
    """Keeps a private generator: a different θ0 on every call (hidden state)."""

    def __init__(self) -> None:
        super().__init__()
        self.rng = torch.Generator().manual_seed(0)

    def initial_params(self, model_params: Mapping[str, Tensor], n_tasks: int, generator) -> Params:
        return {n: p + torch.randn(n_tasks, *p.shape, generator=self.rng, dtype=p.dtype)
                for n, p in model_params.items()}


class NoTaskDimInit(InitPart):
    def initial_params(self, model_params: Mapping[str, Tensor], n_tasks: int, generator) -> Params:
        return dict(model_params)


class DetachedGainInit(InitPart):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def initial_params(self, model_params: Mapping[str, Tensor], n_tasks: int, generator) -> Params:
        return {n: (float(self.gain.detach()) * p).expand(n_tasks, *p.shape) for n, p in model_params.items()}


class ReversedAdapt(AdaptPart):
    def select(self, names: list[str]) -> list[str]:
        return list(reversed(names))


class AlternatingAdapt(AdaptPart):
    def __init__(self) -> None:
        super().__init__()
        self.flip = False

    def select(self, names: list[str]) -> list[str]:
        self.flip = not self.flip
        return names[:1] if self.flip else names[1:]


class PoppingAdapt(AdaptPart):
    def select(self, names: list[str]) -> list[str]:
        names.pop()
        return names


@pytest.mark.parametrize(
    ("part", "rule", "says"),
    [
        (InPlaceSGD(), "pure", "in place"),
        (CountingSGD(), "no hidden state", "'calls'"),
        (BufferCountingSGD(), "pure", "'calls'"),
        (StateMutatingMomentum(), "pure", "in place"),
        (DetachedMetaSGD(0.1), "differentiable", "meta-parameter 'lrs."),
        (WrongGradientSGD(), "differentiable", "grads."),
        (ReshapingSGD(), "structure", "expected shape"),
        (GlobalRandomInit(), "explicit randomness", "global random generator"),
        (OwnGeneratorInit(), "explicit randomness", "seeded alike"),
        (NoTaskDimInit(), "structure", "leading task dimension"),
        (DetachedGainInit(), "differentiable", "'gain'"),
        (ReversedAdapt(), "structure", "order"),
        (AlternatingAdapt(), "no hidden state", "'flip'"),  # names the attribute select flips
        (PoppingAdapt(), "pure", "modified"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_contract_violations_are_caught_with_the_rule_and_the_fix(part: nn.Module, rule: str, says: str) -> None:
    with pytest.raises(ContractError) as info:
        check_part(part)
    assert info.value.rule == rule, str(info.value)
    assert says in str(info.value)
    assert type(part).__name__ in str(info.value)


def test_global_rng_use_is_caught_without_consuming_the_global_stream() -> None:
    state = torch.random.get_rng_state()
    with pytest.raises(ContractError):
        check_part(GlobalRandomInit())
    assert torch.equal(state, torch.random.get_rng_state())


def test_optimizer_inputs_must_pair_up() -> None:
    params = {"w": torch.zeros(2, dtype=DT)}
    with pytest.raises(ValueError, match="same keys"):
        check_part(InnerSGD(0.1), inputs=(params, {"v": torch.zeros(2, dtype=DT)}))


# ---------------------------------------------------------------- MetaKnowledge and the recipes


def test_recipes_compose_the_parts() -> None:
    model = Conv4(5, hidden=4, image_size=16)
    names = [n for n, _ in model.named_parameters()]
    omega = maml(model, lr=0.4)
    assert isinstance(omega.optimizer, InnerSGD) and omega.optimizer.lr == 0.4
    assert omega.adapted_names == names and omega.static_names == []
    assert [n for n, _ in omega.named_parameters()] == [f"model.{n}" for n in names]
    omega = anil(Conv4(5, hidden=4, image_size=16), lr=0.4)
    assert omega.adapted_names == ["head.weight", "head.bias"]
    assert omega.static_names == [n for n in names if not n.startswith("head.")]
    omega = meta_sgd(MLP((1, 4, 1)), lr=0.01)
    lrs = {n: p for n, p in omega.named_parameters() if n.startswith("optimizer.")}
    assert list(lrs) == ["optimizer.lrs.layers:0:weight", "optimizer.lrs.layers:0:bias",
                         "optimizer.lrs.layers:2:weight", "optimizer.lrs.layers:2:bias"]
    assert all(torch.all(p == 0.01) for p in lrs.values())


def test_point_init_has_a_leading_task_dimension_and_shares_omega() -> None:
    model = MLP((2, 3, 1))
    omega = maml(model, lr=0.1)
    theta0 = omega.initial_params(4)
    for n, p in model.named_parameters():
        assert theta0[n].shape == (4, *p.shape)
        assert torch.equal(theta0[n][2], p.detach())
    sum(t.sum() for t in theta0.values()).backward()
    assert all(torch.all(p.grad == 4) for p in model.parameters())


def test_omega_runs_the_model_functionally() -> None:
    model = MLP((2, 3, 1)).to(DT)
    omega = maml(model, lr=0.1)
    x = torch.randn(5, 2, dtype=DT)
    params = {n: p.detach() * 2 for n, p in model.named_parameters()}
    torch.testing.assert_close(omega(dict(model.named_parameters()), x), model(x))
    doubled = F.linear(torch.relu(F.linear(x, params["layers.0.weight"], params["layers.0.bias"])),
                       params["layers.2.weight"], params["layers.2.bias"])
    torch.testing.assert_close(omega(params, x), doubled)
    y = torch.randn(5, 1, dtype=DT)
    torch.testing.assert_close(omega.task_loss(params, x, y), F.mse_loss(doubled, y))


def test_inner_loss_can_be_replaced() -> None:
    omega = MetaKnowledge(MLP((2, 1)), InnerSGD(0.1), loss=lambda out, y: (out - y).abs().mean())
    params = dict(omega.model.named_parameters())
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    out = omega(params, x)
    torch.testing.assert_close(omega.inner_loss(params, x, y), (out - y).abs().mean())
    torch.testing.assert_close(omega.task_loss(params, x, y), F.mse_loss(out, y))


def test_default_loss_picks_cross_entropy_or_mse() -> None:
    out = torch.randn(4, 3)
    labels = torch.tensor([0, 2, 1, 0])
    torch.testing.assert_close(default_loss(out, labels), F.cross_entropy(out, labels))
    target = torch.randn(4, 3)
    torch.testing.assert_close(default_loss(out, target), F.mse_loss(out, target))


def test_part_errors_tell_the_fix() -> None:
    with pytest.raises(ValueError, match="positive"):
        InnerSGD(lr=0.0)
    with pytest.raises(ValueError, match="matches none"):
        MetaKnowledge(MLP((2, 1)), InnerSGD(0.1), adapt=AdaptOnly("head"))
    with pytest.raises(ValueError, match="at least one name pattern"):
        AdaptOnly()
    with pytest.raises(ValueError, match="track_running_stats=False"):
        maml(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), lr=0.1)


def test_adapt_only_patterns() -> None:
    names = ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]
    assert AdaptOnly("head").select(names) == ["head.weight", "head.bias"]
    assert AdaptOnly("head.*").select(names) == ["head.weight", "head.bias"]
    assert AdaptOnly("*.bias").select(names) == ["features.0.bias", "head.bias"]
    assert AdaptOnly(["head.bias", "features.0"]).select(names) == ["features.0.weight", "features.0.bias",
                                                                     "head.bias"]
    assert AdaptAll().select(names) == names


def test_native_norm_layers_are_found() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False),
                          nn.GroupNorm(1, 2), nn.BatchNorm2d(2, affine=False, track_running_stats=False))
    assert native_norm_layers(model) == ["1"]
    assert native_norm_layers(Conv4(3, hidden=2)) == []
    omega = MetaKnowledge(model, InnerSGD(0.1), adapt=AdaptOnly("0"))
    assert omega.native_norms_adapted() == []


# ---------------------------------------------------------------- no hidden modules: structure by filter


def _scaled_omega_with_dropout() -> MetaKnowledge:
    from metalearn.knowledge import ScaledInit

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
    return MetaKnowledge(model, optimizer=InnerSGD(0.1), init=ScaledInit())


def test_template_model_is_registered_but_filtered_out_of_omega():
    omega = _scaled_omega_with_dropout()
    assert dict(omega.named_children())["model"] is omega.model
    with pytest.warns(DeprecationWarning, match="omega.model"):
        assert omega.network is omega.model  # the old name still reads, with a warning
    names = [n for n, _ in omega.named_parameters()]
    assert names and not any(n.startswith("model.") for n in names)  # only the init's gains and shifts
    assert not any(k.startswith("model.") for k in omega.state_dict())
    held = {id(p) for p in torch.optim.Adam(omega.parameters(), lr=1e-3).param_groups[0]["params"]}
    assert held == {id(p) for p in omega.parameters()}
    assert not any(id(p) in held for p in omega.model.parameters())
    omega.eval()  # reaches the model's dropout now that it is a submodule
    assert not omega.model[1].training
    omega.train()
    assert omega.model[1].training
    omega.double()  # and .double()/.to() convert the template
    assert omega.model[0].weight.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in omega.parameters())


def test_template_state_dict_round_trip_keeps_keys_and_template():
    omega = _scaled_omega_with_dropout()
    state = omega.state_dict()
    other = _scaled_omega_with_dropout()
    template = other.model[0].weight.detach().clone()
    with torch.no_grad():
        for p in omega.parameters():
            p.add_(0.25)
    other.load_state_dict(omega.state_dict())  # strict: the filtered keys are not missing
    for (n, a), (_, b) in zip(omega.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert torch.equal(other.model[0].weight, template)  # the template keeps its own values
    assert list(state) == list(omega.state_dict())


def test_point_init_lists_the_model_as_before():
    omega = MetaKnowledge(MLP((1, 4, 1)), optimizer=InnerSGD(0.1))
    assert [n for n, _ in omega.named_parameters()] == [
        "model.layers.0.weight", "model.layers.0.bias", "model.layers.2.weight", "model.layers.2.bias"
    ]
    assert list(omega.state_dict()) == [n for n, _ in omega.named_parameters()]


def test_unregistered_architecture_part_is_refused_with_the_fix():
    """A part held in a list (hidden from torch) and read as ``architecture`` would never train: refused."""
    from metalearn.knowledge import ArchitecturePart

    class Gate(ArchitecturePart):
        def __init__(self) -> None:
            super().__init__()
            self.g = torch.nn.Parameter(torch.zeros(()))

    class Old(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self._parts = [Gate()]

        @property
        def architecture(self) -> Gate:
            return self._parts[0]

        def forward(self, x):
            return self.lin(x) * self.architecture.g.exp()

    with pytest.raises(ValueError, match=r"model\.\(root\)\.architecture \(Gate\) is not a registered submodule"):
        MetaKnowledge(Old(), optimizer=InnerSGD(0.1))


# ---------------------------------------------------------------- vmap-safety of module parts (a loss)


class BranchingLoss(nn.Module):
    """A learned loss that picks its form from a tensor's value: fine alone, refused under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        diff = output - target
        if float(diff.mean()) > 0:  # data-dependent Python control flow
            return self.scale * diff.pow(2).mean()
        return self.scale * diff.abs().mean()


class StdNormalisedLoss(nn.Module):
    """Normalises by a statistic of its input: under vmap that is still one task's (vmap hides the
    batch dimension), so this loss is vmap-safe."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return self.scale * ((output - target) / (target.std() + 1.0)).pow(2).mean()


def _loss_inputs() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(6, 1, generator=g, dtype=DT), torch.randn(6, 1, generator=g, dtype=DT)


def test_check_part_refuses_a_loss_that_branches_on_a_tensor_value() -> None:
    with pytest.raises(ContractError, match=r"\[vmap-safe\].*data-dependent Python control flow") as info:
        check_part(BranchingLoss(), inputs=_loss_inputs(), call=lambda part, xs, gen: part(*xs))
    assert info.value.rule == "vmap-safe" and "BranchingLoss" in str(info.value)


def test_check_part_passes_a_vmap_safe_loss_and_says_so() -> None:
    report = check_part(StdNormalisedLoss(), inputs=_loss_inputs(), call=lambda part, xs, gen: part(*xs))
    assert report.kind == "module" and report.rules[-1] == "vmap-safe"
    assert report.gradchecked[0] == "scale"
