"""Exact meta-gradients under vmap for every norm: native modules and functional calls (metalearn.exact_norms).

Under a raw ``torch.func.vmap``, torch's fused norms give wrong second-order meta-gradients
when their weight/bias adapt (``test_inner_outer.test_the_trap_still_exists_in_torch``);
the library routes them to primitives while it vmaps. These tests hold, in float64:

* loop and vmap meta-gradients agree to 1e-10, second order, 1 and 3 inner steps, for each
  native norm module and each functional norm call written in a model's own ``forward``;
* the interception sees each of those calls (a count), so a torch release that changes
  which function a module calls makes a test fail instead of the meta-gradient go wrong;
* the primitives give torch's own forward values, for the arguments the functions take;
* random operations and running statistics under vmap are refused with the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import reference
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn import exact_norms as E
from metalearn.evaluate import evaluate
from metalearn.knowledge import InnerSGD, MetaKnowledge, maml
from metalearn.mapping import choose_batching, needs_norm_routing
from metalearn.models import MLP, Conv4
from metalearn.modes import Unrolled
from metalearn.outer import meta_gradient, meta_step
from metalearn.tasks import Task, TaskBatch

DT = torch.float64
HAS_RMS = hasattr(F, "rms_norm")
SIZE, CH, HID = 4, 4, 6  # images 1 x SIZE x SIZE -> CH channels; MLP hidden width HID


def regression() -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(3, 5, 6, 3, seed=1)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def images() -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.image_batch(3, 3, 2, 2, 1, SIZE, seed=2)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def mlp(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, HID), norm, nn.Tanh(), nn.Linear(HID, 1))


def conv(norm: nn.Module) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, CH, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(CH * SIZE * SIZE, 3)
    )


class FunctionalNorm(nn.Module):
    """A norm written as a functional call in a user's own ``forward``, with its own affine parameters."""

    def __init__(self, call: Callable[[FunctionalNorm, Tensor], Tensor], shape: tuple[int, ...], bias: bool = True):
        super().__init__()
        self.call = call
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None
        self.register_buffer("mean", torch.linspace(-0.2, 0.3, shape[0]))  # fixed statistics, for eval-mode calls
        self.register_buffer("var", torch.linspace(0.5, 1.5, shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.call(self, x)


# kind -> (model builder, batch builder, the name the interception counts it under)
KINDS: dict[str, tuple[Callable[[], nn.Module], Callable[[], TaskBatch], str]] = {
    "nn.BatchNorm1d": (lambda: mlp(nn.BatchNorm1d(HID, track_running_stats=False)), regression, "batch_norm"),
    "nn.BatchNorm2d": (lambda: conv(nn.BatchNorm2d(CH, track_running_stats=False)), images, "batch_norm"),
    "nn.LayerNorm": (lambda: mlp(nn.LayerNorm(HID)), regression, "layer_norm"),
    "nn.GroupNorm": (lambda: conv(nn.GroupNorm(2, CH)), images, "group_norm"),
    "nn.InstanceNorm2d": (lambda: conv(nn.InstanceNorm2d(CH, affine=True)), images, "instance_norm"),
    "F.batch_norm": (
        lambda: conv(FunctionalNorm(lambda m, x: F.batch_norm(x, None, None, m.weight, m.bias, training=True), (CH,))),
        images, "batch_norm",
    ),
    "F.batch_norm eval stats": (
        lambda: mlp(FunctionalNorm(lambda m, x: F.batch_norm(x, m.mean, m.var, m.weight, m.bias, False), (HID,))),
        regression, "batch_norm",
    ),
    "F.layer_norm [C,H,W]": (
        lambda: conv(FunctionalNorm(lambda m, x: F.layer_norm(x, x.shape[1:], m.weight, m.bias, eps=1e-3),
                                    (CH, SIZE, SIZE))),
        images, "layer_norm",
    ),
    "F.instance_norm": (
        lambda: conv(FunctionalNorm(lambda m, x: F.instance_norm(x, weight=m.weight, bias=m.bias), (CH,))),
        images, "instance_norm",
    ),
    "F.group_norm": (
        lambda: conv(FunctionalNorm(lambda m, x: F.group_norm(x, 2, m.weight, m.bias), (CH,))), images, "group_norm",
    ),
    "torch.layer_norm": (
        lambda: mlp(FunctionalNorm(lambda m, x: torch.layer_norm(x, [HID], m.weight, m.bias, 1e-5), (HID,))),
        regression, "layer_norm",
    ),
    "torch.native_layer_norm": (
        lambda: mlp(FunctionalNorm(lambda m, x: torch.native_layer_norm(x, [HID], m.weight, m.bias, 1e-5)[0], (HID,))),
        regression, "layer_norm",
    ),
    "torch.native_batch_norm": (
        lambda: conv(FunctionalNorm(
            lambda m, x: torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.1, 1e-5)[0], (CH,))),
        images, "batch_norm",
    ),
}
if HAS_RMS:
    KINDS["nn.RMSNorm"] = (lambda: mlp(nn.RMSNorm(HID)), regression, "rms_norm")
    KINDS["F.rms_norm"] = (
        lambda: mlp(FunctionalNorm(lambda m, x: F.rms_norm(x, [HID], m.weight), (HID,), bias=False)),
        regression, "rms_norm",
    )


def build(kind: str, seed: int = 0) -> tuple[nn.Module, TaskBatch]:
    """The kind's model in float64, every parameter moved off its default (γ away from 1, β from 0)."""
    make_model, make_batch, _ = KINDS[kind]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = make_model().to(DT)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
    return model, make_batch()


def grads_of(omega: MetaKnowledge, batch: TaskBatch, steps: int, batching: str) -> dict[str, Tensor]:
    omega.zero_grad(set_to_none=True)
    stats = meta_gradient(omega, batch, steps, batching=batching)
    assert stats.batching == batching
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in b.values())
    return max(float((a[k] - b[k]).abs().max()) for k in b) / scale


# ---------------------------------------------------------------- loop == vmap, second order


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_vmap_meta_gradient_equals_the_loop_for_every_norm(kind: str, steps: int) -> None:
    model, batch = build(kind)
    omega = maml(model, lr=0.3)
    loop = grads_of(omega, batch, steps, "loop")
    assert any(".weight" in n and float(g.abs().max()) > 0 for n, g in loop.items())
    assert rel_diff(grads_of(omega, batch, steps, "vmap"), loop) <= 1e-10


# ---------------------------------------------------------------- the interception sees every call


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_norm_call_is_routed_under_vmap(kind: str) -> None:
    """Fails if torch changes what a module or F.* calls so that the interception no longer sees it."""
    model, batch = build(kind)
    name = KINDS[kind][2]
    params = dict(model.named_parameters())
    x = batch.train[0]

    def loss(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(model, p, (xi,)).square().mean()

    with E.exact_norms() as mode:
        torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    assert mode.routed == {name: 1}  # the one forward call; the backward runs on the primitives' graph


def test_the_library_vmap_path_runs_under_the_interception(monkeypatch: pytest.MonkeyPatch) -> None:
    """meta_gradient's vmap path computes native norms in exact_norms' primitives, not torch's fused kernel."""
    model, batch = build("nn.LayerNorm")
    calls: list[tuple[int, ...]] = []
    primitive = E.layer_norm

    def counting(x: Tensor, *args, **kwargs) -> Tensor:
        calls.append(tuple(x.shape))
        return primitive(x, *args, **kwargs)

    monkeypatch.setitem(E.ROUTES, F.layer_norm, ("layer_norm", counting))
    meta_gradient(maml(model, lr=0.3), batch, 2, batching="vmap")
    assert calls == [(5, HID)] * 2 + [(6, HID)]  # 2 inner steps on train, then val: per task, under vmap
    calls.clear()
    meta_gradient(maml(model, lr=0.3), batch, 2, batching="loop")
    assert calls == []  # the loop path keeps torch's fused kernel


# ---------------------------------------------------------------- the primitives give torch's values

G = torch.Generator().manual_seed(3)
X4 = torch.randn(4, 6, 5, 3, generator=G, dtype=DT) * 3 + 1
W6, B6 = torch.randn(6, generator=G, dtype=DT), torch.randn(6, generator=G, dtype=DT)
RM, RV = torch.randn(6, generator=G, dtype=DT), torch.rand(6, generator=G, dtype=DT) + 0.5
W53, B53 = torch.randn(5, 3, generator=G, dtype=DT), torch.randn(5, 3, generator=G, dtype=DT)

# name -> (torch's function, exact_norms' primitive, args, kwargs)
FORWARDS = {
    "batch_norm": (F.batch_norm, E.batch_norm, (X4, None, None, W6, B6, True), {}),
    "batch_norm no affine, eps": (F.batch_norm, E.batch_norm, (X4, None, None), {"training": True, "eps": 1e-2}),
    "batch_norm weight only, 2d": (F.batch_norm, E.batch_norm, (X4[:, :, 0, 0], None, None, W6), {"training": True}),
    "batch_norm eval stats": (F.batch_norm, E.batch_norm, (X4, RM, RV, W6, B6, False), {}),
    "batch_norm eval stats bias only": (F.batch_norm, E.batch_norm, (X4, RM, RV, None, B6), {"eps": 0.0}),
    "instance_norm": (F.instance_norm, E.instance_norm, (X4,), {"weight": W6, "bias": B6}),
    "instance_norm no affine": (F.instance_norm, E.instance_norm, (X4,), {"eps": 1e-3}),
    "instance_norm fixed stats": (F.instance_norm, E.instance_norm, (X4, RM, RV, W6, B6, False), {}),
    "layer_norm 2 dims": (F.layer_norm, E.layer_norm, (X4, (5, 3), W53, B53), {}),
    "layer_norm 1 dim, no affine": (F.layer_norm, E.layer_norm, (X4, [3]), {"eps": 1e-2}),
    "layer_norm weight only": (F.layer_norm, E.layer_norm, (X4, (5, 3), W53), {}),
    "group_norm": (F.group_norm, E.group_norm, (X4, 3, W6, B6), {}),
    "group_norm 1 group, no affine": (F.group_norm, E.group_norm, (X4, 1), {"eps": 1e-3}),
    "group_norm 6 groups": (F.group_norm, E.group_norm, (X4, 6, W6), {}),
    "torch.batch_norm": (
        torch.batch_norm, E.ROUTES[torch.batch_norm][1], (X4, W6, B6, None, None, True, 0.1, 1e-5, False), {}
    ),
    "torch.instance_norm": (
        torch.instance_norm, E.ROUTES[torch.instance_norm][1], (X4, W6, B6, None, None, True, 0.1, 1e-5, False), {}
    ),
    "torch.group_norm": (torch.group_norm, E.ROUTES[torch.group_norm][1], (X4, 2, W6, B6), {}),
}
NATIVE = {
    "native_layer_norm": (torch.native_layer_norm, (X4, [5, 3], W53, B53, 1e-5)),
    "native_batch_norm": (torch.native_batch_norm, (X4, W6, B6, None, None, True, 0.1, 1e-5)),
    "native_batch_norm eval": (torch.native_batch_norm, (X4, W6, B6, RM, RV, False, 0.1, 1e-5)),
}


@pytest.mark.parametrize("case", list(NATIVE))
def test_native_entry_points_give_torchs_outputs_and_statistics(case: str) -> None:
    fused, args = NATIVE[case]
    expected, got = fused(*args), E.ROUTES[fused][1](*args)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


if HAS_RMS:
    FORWARDS["rms_norm eps=None"] = (F.rms_norm, E.rms_norm, (X4, (5, 3), W53), {})
    FORWARDS["rms_norm eps, no weight"] = (F.rms_norm, E.rms_norm, (X4 * 1e-5, [3]), {"eps": 1e-9})
    FORWARDS["rms_norm tiny input eps=None"] = (F.rms_norm, E.rms_norm, (X4 * 1e-9, [3]), {})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(FORWARDS))
def test_primitives_give_torchs_forward_values(case: str, dtype: torch.dtype) -> None:
    fused, primitive, args, kwargs = FORWARDS[case]
    cast = [a.to(dtype) if isinstance(a, Tensor) else a for a in args]
    kwargs = {k: v.to(dtype) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    expected, got = fused(*cast, **kwargs), primitive(*cast, **kwargs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = max(float(expected.abs().max()), 1.0)
    assert float((got - expected).abs().max()) <= scale * (1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: E.layer_norm(X4, (3, 5)), RuntimeError, r"normalized_shape=\[3, 5\]"),
        (lambda: E.group_norm(X4, 4), RuntimeError, "divisible by num_groups"),
        (lambda: E.batch_norm(X4[:1, :, :1, :1], None, None, training=True), ValueError, "more than 1 value"),
        (lambda: E.batch_norm(X4, None, None, training=False), ValueError, "needs running_mean and running_var"),
        (lambda: E.batch_norm(X4, None, None, training=True, eps=0.0), ValueError, "eps must be positive"),
        (lambda: E.instance_norm(X4[:, :, :1, :1]), ValueError, "more than 1 spatial element"),
    ],
)
def test_primitives_refuse_what_torch_refuses(call: Callable[[], Tensor], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------- running statistics under vmap


@pytest.mark.parametrize("fn", ["batch_norm", "instance_norm"])
def test_running_statistics_updated_under_vmap_are_refused_with_the_fix(fn: str) -> None:
    norm = getattr(F, fn)
    if fn == "batch_norm":
        call = (lambda m, x: norm(x, m.mean, m.var, m.weight, m.bias, training=True))  # noqa: E731
    else:
        call = (lambda m, x: norm(x, m.mean, m.var, m.weight, m.bias, use_input_stats=True))  # noqa: E731
    model = conv(FunctionalNorm(call, (CH,))).to(DT)
    omega = maml(model, lr=0.3)
    before = model[1].mean.clone()
    with pytest.raises(ValueError, match=rf"{fn} with running_mean/running_var.*track_running_stats=False"):
        meta_gradient(omega, images(), 1, batching="vmap")
    assert all(p.grad is None for p in omega.parameters())
    assert torch.equal(model[1].mean, before)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_instance_norm_tracking_running_statistics_is_refused(dims: int) -> None:
    norm = getattr(nn, f"InstanceNorm{dims}d")(CH, affine=True, track_running_stats=True)
    model = nn.Sequential(nn.Identity(), norm)
    with pytest.raises(ValueError, match=rf"model\.1 \(InstanceNorm{dims}d\) tracks running statistics.*"
                                         "track_running_stats=False"):
        maml(model, lr=0.1)
    with pytest.raises(ValueError, match=r"model\.\(root\) \(BatchNorm1d\).*metalearn\.models\.BatchNorm"):
        maml(nn.BatchNorm1d(CH), lr=0.1)


# ---------------------------------------------------------------- which path auto picks


def test_auto_picks_vmap_for_a_native_norm_mlp_and_loop_for_a_native_norm_conv_net() -> None:
    cpu = torch.device("cpu")
    assert choose_batching(maml(build("nn.LayerNorm")[0], lr=0.1), cpu) == "vmap"
    assert choose_batching(maml(build("nn.BatchNorm1d")[0], lr=0.1), cpu) == "vmap"
    assert choose_batching(maml(build("nn.BatchNorm2d")[0], lr=0.1), cpu) == "loop"
    assert choose_batching(maml(build("nn.LayerNorm")[0], lr=0.1), torch.device("cuda")) == "vmap"


def test_evaluate_under_vmap_equals_the_loop_for_a_native_norm_model() -> None:
    model, batch = build("nn.GroupNorm")
    omega = maml(model, lr=0.3)
    tasks = [Task(train=(batch.train[0][i], batch.train[1][i]), val=(batch.val[0][i], batch.val[1][i]))
             for i in range(len(batch))]
    loop = evaluate(omega, tasks, 3, batching="loop")
    vmapped = evaluate(omega, tasks, 3, batching="vmap")
    torch.testing.assert_close(vmapped.per_task_loss, loop.per_task_loss, rtol=1e-10, atol=0)


# ---------------------------------------------------------------- random operations under vmap


def dropout_mlp() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, HID), nn.Dropout(0.5), nn.Tanh(), nn.Linear(HID, 1)).to(DT)


def test_dropout_module_under_forced_vmap_is_refused_before_any_work() -> None:
    omega = maml(dropout_mlp(), lr=0.3)
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    with pytest.raises(ValueError, match=r"layers \['1'\] draw random numbers.*batching='loop'"):
        meta_gradient(omega, regression(), 1, batching="vmap")
    optimizer = torch.optim.SGD(omega.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="batching='loop'"):
        meta_step(omega, optimizer, regression(), 1, batching="vmap")
    assert all(p.grad is None for p in omega.parameters())
    assert all(torch.equal(p, before[n]) for n, p in omega.named_parameters())


def test_dropout_module_under_auto_runs_the_loop_and_eval_mode_the_vmap() -> None:
    omega = maml(dropout_mlp(), lr=0.3)
    optimizer = torch.optim.SGD(omega.parameters(), lr=0.1)
    assert meta_step(omega, optimizer, regression(), 1, batching="auto")["batching"] == "loop"
    assert meta_gradient(omega, regression(), 1, batching="auto").batching == "loop"
    omega.eval()  # dropout off: nothing random left, vmap is allowed and picked
    assert choose_batching(omega, torch.device("cpu")) == "vmap"
    assert meta_gradient(omega, regression(), 1, batching="vmap").batching == "vmap"


@pytest.mark.parametrize("batching", ["vmap", "auto"])
def test_functional_dropout_under_vmap_is_refused_with_the_fix_not_torchs_error(batching: str) -> None:
    # auto cannot see a random call in a forward; it picks vmap for this MLP, and the call is refused there
    model = mlp(FunctionalNorm(lambda m, x: F.dropout(x * m.weight, 0.5, training=True), (HID,))).to(DT)
    omega = maml(model, lr=0.3)
    with pytest.raises(ValueError, match=r"random operation \(e\.g\. F\.dropout\).*batching='loop'") as info:
        meta_gradient(omega, regression(), 1, batching=batching)
    assert "randomness error mode" not in str(info.value)
    assert all(p.grad is None for p in omega.parameters())
    assert meta_gradient(omega, regression(), 1, batching="loop").batching == "loop"


# ---------------------------------------------------------------- where the interception is skipped


class OwnMLP(MLP):
    """A user's subclass of a norm-free library model that does not re-declare it: not trusted."""


@dataclass(frozen=True)
class OwnUnrolled(Unrolled):
    """A user's mode subclass: its adapt_task runs inside the vmap, so it keeps the interception."""


@pytest.mark.parametrize(
    ("make", "loss", "runners", "routed"),
    [
        (lambda: MLP((3, HID, 1)), None, (), False),
        (lambda: MLP((3, HID, 1)), F.mse_loss, (), False),
        (lambda: MLP((3, HID, 1)), None, (Unrolled(),), False),
        (lambda: nn.Sequential(nn.Linear(3, HID), nn.Tanh(), nn.Linear(HID, 1)), None, (), False),
        (lambda: Conv4(num_classes=3), None, (), True),  # its BatchNorm reads the kernels choice from the mode
        (lambda: mlp(nn.LayerNorm(HID)), None, (), True),
        (lambda: mlp(nn.GroupNorm(2, HID)), None, (), True),
        (lambda: OwnMLP((3, HID, 1)), None, (), True),
        (lambda: KINDS["F.layer_norm [C,H,W]"][0](), None, (), True),
        (lambda: MLP((3, HID, 1)), lambda out, y: (out - y).square().mean(), (), True),
        (lambda: MLP((3, HID, 1)), F.layer_norm, (), True),
        (lambda: MLP((3, HID, 1)), None, (OwnUnrolled(),), True),
    ],
    ids=["MLP", "F.mse_loss", "Unrolled", "torch layers", "Conv4", "LayerNorm", "GroupNorm", "subclass",
         "functional norm", "own loss", "norm as loss", "own mode"],
)
def test_the_interception_is_skipped_only_where_nothing_can_call_a_fused_norm(make, loss, runners, routed) -> None:
    omega = MetaKnowledge(make(), InnerSGD(lr=0.1), loss=loss)
    assert needs_norm_routing(omega, *runners) is routed


def test_norm_free_trusts_torch_layers_and_declared_classes_only() -> None:
    assert E.norm_free(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Dropout(0.0)))
    assert not E.norm_free(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)))
    assert not E.norm_free(nn.Sequential(nn.Linear(2, 2), OwnMLP((2, 2))))
    assert E.norm_free(MLP((2, 2)))


def test_a_norm_free_model_runs_without_the_mode_and_gets_the_routed_meta_gradient(monkeypatch) -> None:
    """Skipping the interception changes nothing but speed: float64 meta-gradients equal bit for bit."""
    import metalearn.mapping as mapping
    import metalearn.modes.unrolled as unrolled

    entered: list[str] = []
    real = mapping.exact_norms

    def counting(kernels: str = "auto") -> E.ExactNorms:
        entered.append(kernels)
        return real(kernels)

    monkeypatch.setattr(mapping, "exact_norms", counting)
    # torch.func's vmap itself (an MLP's unrolled vmap path otherwise runs task-batched: test_task_batched.py)
    monkeypatch.setattr(unrolled, "runs_task_batched", lambda *args: False)
    batch = regression()
    torch.manual_seed(0)
    omega = maml(MLP((3, HID, HID, 1)).to(DT), lr=0.3)
    skipped = grads_of(omega, batch, 2, "vmap")
    evaluated = evaluate(omega, batch, 2, batching="vmap")
    assert entered == []  # neither the meta-gradient nor evaluate entered the mode
    assert evaluated.mean == pytest.approx(evaluate(omega, batch, 2, batching="loop").mean, rel=1e-12)
    monkeypatch.setattr(unrolled, "needs_norm_routing", lambda *args: True)
    routed = grads_of(omega, batch, 2, "vmap")
    assert entered == ["auto"]
    assert all(torch.equal(skipped[k], routed[k]) for k in routed)
    assert rel_diff(grads_of(omega, batch, 2, "loop"), routed) <= 1e-12
