"""The Triton kernels against their plain-torch reference, in Triton's interpreter on CPU.

Each fused op: forward, backward (gradcheck), double backward (gradgradcheck), under vmap, float32
and float64, odd sizes (not a power of 2, one element, empty); then float64 meta-gradients of MAML,
Meta-SGD, momentum and learned Adam through the kernels against the rules' own path to 1e-10, with
the loop and with vmap; then the dispatch: what ``kernels=`` picks, and each case the kernels cannot
serve running the reference.

``TRITON_INTERPRET=1`` must be set before the kernel module is first imported; metalearn imports it
lazily, at the first launch, so setting it here (at collection) is early enough even when other test
files imported metalearn first. Interpreter launches cost ~1 ms each: the tensors stay small.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined (they are imported at first launch)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")  # the interpreter needs it

if "metalearn.kernels.triton_update" in sys.modules and not isinstance(  # pragma: no cover
    sys.modules["metalearn.kernels.triton_update"].sgd_forward,
    __import__("triton.runtime.interpreter", fromlist=["InterpretedFunction"]).InterpretedFunction,
):
    pytest.skip("the kernels were loaded compiled before this file set TRITON_INTERPRET=1", allow_module_level=True)

import reference as test_reference  # noqa: E402

from metalearn import InnerAdam, InnerSGD, MetaKnowledge, MetaSGD, MomentumSGD  # noqa: E402
from metalearn.kernels import fused_update, kernel_unsupported, reference, use_triton  # noqa: E402
from metalearn.knowledge.rules import chain, fused_plan, fused_step, learned, scale, scale_by_learning_rate  # noqa: E402
from metalearn.models import MLP  # noqa: E402
from metalearn.outer import meta_gradient  # noqa: E402
from metalearn.tasks import TaskBatch  # noqa: E402

KINDS = sorted(reference.UPDATES)


def op_inputs(kind: str, n: int, dtype: torch.dtype, scalar_hypers: tuple[int, ...] = (), seed: int = 0):
    """Random flat inputs of update ``kind``: tensors, then hyper-parameters (those in ``scalar_hypers``
    one value ``[]``, the others ``[N]``), all requiring grad; values where every formula is smooth."""
    g = torch.Generator().manual_seed(seed)
    n_tensors, n_hyper, _ = reference.UPDATES[kind]
    tensors = [torch.randn(n, generator=g, dtype=dtype) for _ in range(n_tensors)]
    if kind == "adam":
        tensors[3] = tensors[3].abs() + 0.1  # v >= 0
    hypers = []
    for i in range(n_hyper):
        shape = () if i in scalar_hypers else (n,)
        hypers.append(0.2 + 0.6 * torch.rand(shape, generator=g, dtype=dtype))
    return tuple(t.requires_grad_() for t in (*tensors, *hypers))


def close(a, b, dtype, fp32_tol=1e-5):
    tol = 1e-12 if dtype == torch.float64 else fp32_tol
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5, 37])
@pytest.mark.parametrize("kind", KINDS)
def test_update_forward_and_backward_match_reference(kind, n, dtype):
    inputs = op_inputs(kind, n, dtype, scalar_hypers=(0, 2), seed=n)
    out = fused_update(kind, inputs)
    ref = reference.update(kind, inputs)
    close(out, ref, dtype)
    weights = [torch.randn_like(o) for o in ref]
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, out, strict=True)), inputs)
    ref_grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, ref, strict=True)), inputs)
    close(grads, ref_grads, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_update_empty(kind):
    inputs = op_inputs(kind, 0, torch.float64, scalar_hypers=(0,))
    out = fused_update(kind, inputs)
    assert [o.shape for o in out] == [torch.Size([0])] * len(out)
    grads = torch.autograd.grad(sum(o.sum() for o in out), inputs, allow_unused=True)
    assert grads[0].shape == (0,) and float(grads[len(grads) - reference.UPDATES[kind][1]]) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_update_gradcheck_and_gradgradcheck(kind):
    n_tensors, n_hyper, _ = reference.UPDATES[kind]
    # small: each checked entry costs a few interpreter launches (per-entry hyper-parameters: tested above);
    # every tensor input and the first two hyper-parameters are checked, the others held fixed
    inputs = op_inputs(kind, 1 if kind == "adam" else 2, torch.float64, scalar_hypers=tuple(range(1, n_hyper)), seed=3)
    checked, fixed = inputs[: n_tensors + 2], tuple(x.detach() for x in inputs[n_tensors + 2:])

    def f(*x):
        return fused_update(kind, (*x, *fixed))

    assert torch.autograd.gradcheck(f, checked)
    assert torch.autograd.gradgradcheck(f, checked, fast_mode=kind == "adam")  # fast: random projections


def test_nesterov_momentum_matches_reference():
    inputs = op_inputs("momentum", 3, torch.float64, scalar_hypers=(1,))
    close(fused_update("momentum", inputs, nesterov=True), reference.update("momentum", inputs, nesterov=True),
          torch.float64)
    assert torch.autograd.gradgradcheck(lambda *x: fused_update("momentum", x, nesterov=True), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_update_under_vmap_first_and_second_order(kind, dtype):
    """vmap over 3 tasks: batched θ, g, state; hyper-parameters shared (unbatched), one of them one value."""
    n_tensors = reference.UPDATES[kind][0]
    base = op_inputs(kind, 7, dtype, scalar_hypers=(0,), seed=5)
    g = torch.Generator().manual_seed(6)
    batched = [(t.detach() + 0.1 * torch.randn(3, *t.shape, generator=g, dtype=dtype)).requires_grad_()
               for t in base[:n_tensors]]
    if kind == "adam":
        batched[3] = batched[3].detach().abs().requires_grad_()
    hypers = base[n_tensors:]
    in_dims = (0,) * n_tensors + (None,) * len(hypers)

    def loss(op):
        def one(*x):
            return sum((o * o).sum() for o in op(x))
        return lambda *x: torch.func.vmap(one, in_dims=in_dims)(*x).sum()

    fused, plain = loss(lambda x: fused_update(kind, x)), loss(lambda x: reference.update(kind, x))
    args = (*batched, *hypers)
    close((fused(*args),), (plain(*args),), dtype)
    grads = torch.autograd.grad(fused(*args), args, create_graph=True)
    ref_grads = torch.autograd.grad(plain(*args), args, create_graph=True)
    close(grads, ref_grads, dtype)
    # second order: the gradient of a function of the first gradients
    second = torch.autograd.grad(sum(gr.square().sum() for gr in grads), args)
    ref_second = torch.autograd.grad(sum(gr.square().sum() for gr in ref_grads), args)
    close(second, ref_second, dtype)


def test_update_vmap_of_grad():
    """torch.func.grad inside vmap (the functorch path): per-task hyper-gradients."""
    inputs = op_inputs("adam", 5, torch.float64, scalar_hypers=(0, 1, 2))
    thetas = torch.randn(2, 5, dtype=torch.float64)

    def per_task(theta, op):
        def loss(lr):
            return op((theta, *inputs[1:4], lr, *inputs[5:]))[0].square().sum()
        return torch.func.grad(loss)(inputs[4].detach())

    fused = torch.func.vmap(lambda t: per_task(t, lambda x: fused_update("adam", x)))(thetas)
    ref = torch.func.vmap(lambda t: per_task(t, lambda x: reference.update("adam", x)))(thetas)
    close((fused,), (ref,), torch.float64)


# ---------------------------------------------------------------- through the rules and the inner loop


def rules():
    return {
        "maml": InnerSGD(lr=0.1),
        "meta_sgd": MetaSGD(init_lr=0.1),
        "lr_per_tensor": learned(scale_by_learning_rate(0.1), "lr", per="tensor"),
        "momentum": MomentumSGD(lr=0.1, momentum=0.5),
        "nesterov": MomentumSGD(lr=0.1, momentum=0.5, nesterov=True),
        "adam": InnerAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-3),
        "adam_per_entry": InnerAdam(lr=0.05, betas=(0.8, 0.9), eps=1e-3, per="entry"),
    }


def omega_with(rule_name: str) -> MetaKnowledge:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MetaKnowledge(MLP((1, 6, 1), activation=nn.Tanh), rules()[rule_name]).double()


def regression(n_tasks: int = 3) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = test_reference.regression_batch(n_tasks, 5, 7, 1, 1)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def gradient(omega: MetaKnowledge, batch: TaskBatch, **kwargs) -> dict[str, torch.Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, 2, **kwargs)
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("rule_name", sorted(rules()))
def test_meta_gradient_through_kernels_matches_reference(rule_name, batching):
    omega, batch = omega_with(rule_name), regression()
    assert fused_plan(omega.optimizer) is not None
    ref = gradient(omega, batch, batching=batching, kernels="reference")
    fused = gradient(omega, batch, batching=batching, kernels="triton")
    assert sorted(fused) == sorted(ref) and len(ref) >= 4  # θ0 (and the rule's meta-parameters)
    scale_ = max(g.abs().max() for g in ref.values())
    for name in ref:
        assert (fused[name] - ref[name]).abs().max() <= 1e-10 * scale_, name


def test_fused_step_launches_the_kernel_once_per_step(monkeypatch):
    from metalearn.kernels import update

    calls = []
    real = update._forward
    monkeypatch.setattr(update, "_forward", lambda *a: calls.append(a[0]) or real(*a))
    omega = omega_with("adam")
    meta_gradient(omega, regression(2), 3, batching="vmap", kernels="triton")
    assert calls == ["adam"] * 3  # one launch per inner step for every task and tensor at once


def test_auto_on_cpu_is_the_reference(monkeypatch):
    from metalearn.kernels import update

    monkeypatch.setattr(update, "_forward", lambda *a: pytest.fail("auto launched a kernel for CPU tensors"))
    gradient(omega_with("maml"), regression(), batching="loop")
    p = {"w": torch.randn(3)}
    assert not use_triton("auto", [p["w"]])


# ---------------------------------------------------------------- what the kernels cannot serve: the reference


def step_both(part, params, grads, kernels="triton"):
    state = part.init_state(params)
    new, new_state = fused_step(part, params, grads, state, 0, kernels)
    ref, ref_state = part.step(params, grads, state, 0)
    return new, ref, new_state, ref_state


def no_launch(monkeypatch):
    from metalearn.kernels import update

    monkeypatch.setattr(update, "_forward", lambda *a: pytest.fail("a kernel ran for a case it cannot serve"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64])
def test_unsupported_dtype_falls_back(monkeypatch, dtype):
    no_launch(monkeypatch)
    params = {"w": torch.arange(5).to(dtype)}
    grads = {"w": torch.ones(5, dtype=dtype)}
    new, ref, _, _ = step_both(InnerSGD(lr=0.5), params, grads)
    assert torch.equal(new["w"], ref["w"])
    assert "dtype" in kernel_unsupported(params.values())


def test_mixed_dtypes_and_empty_sets_fall_back(monkeypatch):
    no_launch(monkeypatch)
    params = {"a": torch.randn(3), "b": torch.randn(2, dtype=torch.float64)}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    new, ref, _, _ = step_both(InnerSGD(lr=0.5), params, grads)
    assert all(torch.equal(new[n], ref[n]) for n in params)
    assert "several dtypes" in kernel_unsupported(params.values())
    assert step_both(InnerSGD(lr=0.5), {}, {})[0] == {}


def test_mixed_devices_are_named():
    assert "several devices" in kernel_unsupported([torch.zeros(1), torch.zeros(1, device="meta")])


def test_user_rules_and_other_chains_fall_back(monkeypatch):
    no_launch(monkeypatch)

    class Doubled(InnerSGD):
        def update(self, grads, state, params, step):
            return {n: -2 * self.lr * g for n, g in grads.items()}, state

    params = {"w": torch.randn(4, dtype=torch.float64)}
    grads = {"w": torch.randn(4, dtype=torch.float64)}
    for part in (Doubled(lr=0.1), chain(scale(-0.1)), chain(scale(2.0), scale_by_learning_rate(0.1))):
        assert fused_plan(part) is None
        new, ref, _, _ = step_both(part, params, grads)
        assert torch.equal(new["w"], ref["w"])


def test_non_contiguous_tensors_are_served_exactly():
    params = {"w": torch.randn(4, 3, dtype=torch.float64).t(), "b": torch.randn(5, dtype=torch.float64)[::2]}
    grads = {n: torch.randn(p.shape, dtype=torch.float64).t().contiguous().t() for n, p in params.items()}
    for part in (InnerSGD(lr=0.3), MomentumSGD(lr=0.1), InnerAdam(lr=0.1)):
        part.bind(params)
        new, ref, new_state, ref_state = step_both(part, params, grads)
        assert all(torch.equal(new[n], ref[n]) for n in params)
        assert sorted(new_state) == sorted(ref_state)
        assert all(torch.allclose(new_state[k], ref_state[k], rtol=1e-14, atol=0) for k in ref_state)


def test_bad_kernels_values_are_refused_before_work():
    omega, batch = omega_with("maml"), regression()
    with pytest.raises(ValueError, match="kernels must be one of"):
        meta_gradient(omega, batch, 1, kernels="cuda")
    assert all(p.grad is None for p in omega.parameters())


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    omega, batch = omega_with("maml"), regression()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        meta_gradient(omega, batch, 1, kernels="triton")
    assert all(p.grad is None for p in omega.parameters())


def test_a_users_mode_without_kernels_runs_auto_and_refuses_others():
    from metalearn.modes import Unrolled

    class Mine(Unrolled):
        def accumulate(self, omega, batch, inner_steps, batching, generator):
            return super().accumulate(omega, batch, inner_steps, batching, generator)

    omega, batch = omega_with("maml"), regression()
    meta_gradient(omega, batch, 1, mode=Mine(), batching="loop")
    with pytest.raises(TypeError, match="kernels="):
        meta_gradient(omega, batch, 1, mode=Mine(), batching="loop", kernels="triton")


# ---------------------------------------------------------------- batch norm with each task's batch statistics


def bn_inputs(shape, dtype, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    c = shape[1]
    w = (0.5 + torch.rand(c, generator=g, dtype=dtype)).requires_grad_() if affine else None
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_() if affine else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 2), (2, 3, 5), (3, 4, 3, 3), (1, 1, 7)])
def test_batch_norm_forward_and_backward_match_reference(shape, dtype):
    from metalearn.kernels import batch_norm_train

    x, w, b = bn_inputs(shape, dtype, seed=len(shape))
    y, ref = batch_norm_train(x, w, b, 1e-5), reference.batch_norm_train(x, w, b, 1e-5)
    close((y,), (ref,), dtype)
    gy = torch.randn_like(ref)
    close(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(ref, (x, w, b), gy), dtype)


def test_batch_norm_without_affine_and_empty():
    from metalearn.kernels import batch_norm_train

    x, _, _ = bn_inputs((4, 3, 2), torch.float64)
    close((batch_norm_train(x, None, None, 1e-3),), (reference.batch_norm_train(x, None, None, 1e-3),), torch.float64)
    empty = torch.zeros(0, 3, 2, dtype=torch.float64)
    assert batch_norm_train(empty, torch.ones(3, dtype=torch.float64), None, 1e-5).shape == empty.shape


def test_batch_norm_gradcheck_and_gradgradcheck():
    from metalearn.kernels import batch_norm_train

    inputs = bn_inputs((2, 2, 2), torch.float64, seed=4)
    assert torch.autograd.gradcheck(lambda *a: batch_norm_train(*a, 1e-5), inputs)
    # fast mode (random projections of the Jacobians): the full one costs ~100 interpreted launches
    assert torch.autograd.gradgradcheck(lambda *a: batch_norm_train(*a, 1e-5), inputs, fast_mode=True)


def test_batch_norm_reference_vjp_is_autograds():
    x, w, b = bn_inputs((4, 3, 5), torch.float64, seed=2)
    gy = torch.randn(4, 3, 5, dtype=torch.float64)
    auto = torch.autograd.grad(reference.batch_norm_train(x, w, b, 1e-5), (x, w, b), gy)
    close(reference.batch_norm_train_vjp(x, w, gy, 1e-5), auto, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_under_vmap_per_task_statistics_second_order(dtype):
    """vmap over tasks with per-task weights (adapted in the inner loop): values, gradients, and the
    gradient of a function of the gradients (second order), against the reference primitives."""
    from metalearn.kernels import batch_norm_train

    g = torch.Generator().manual_seed(7)
    xs = torch.randn(3, 4, 2, 3, generator=g, dtype=dtype).requires_grad_()
    ws = (0.5 + torch.rand(3, 2, generator=g, dtype=dtype)).requires_grad_()
    b = torch.randn(2, generator=g, dtype=dtype).requires_grad_()  # shared by the tasks

    def total(norm):
        return torch.func.vmap(lambda x, w: (norm(x, w, b, 1e-5) ** 3).sum(), in_dims=(0, 0))(xs, ws).sum()

    args = (xs, ws, b)
    first = torch.autograd.grad(total(batch_norm_train), args, create_graph=True)
    ref_first = torch.autograd.grad(total(reference.batch_norm_train), args, create_graph=True)
    close(first, ref_first, dtype)
    second = torch.autograd.grad(sum(f.square().sum() for f in first), args)
    ref_second = torch.autograd.grad(sum(f.square().sum() for f in ref_first), args)
    close(second, ref_second, dtype, fp32_tol=1e-4)  # float32: second derivatives of a cubic, values ~1e2


def conv_bn_omega(rule) -> MetaKnowledge:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
            nn.Flatten(), nn.Linear(3 * 5 * 5, 2),
        )
        with torch.no_grad():
            model[1].weight.add_(0.1 * torch.randn(3))
            model[1].bias.add_(0.1 * torch.randn(3))
        return MetaKnowledge(model, rule).double()


def images(n_tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(9)
    x_tr, x_val = (torch.randn(n_tasks, 4, 1, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.tensor([0, 1, 0, 1]).expand(n_tasks, 4)
    return TaskBatch(train=(x_tr, y), val=(x_val, y))


@pytest.mark.parametrize("rule_name", ["maml", "adam"])
def test_conv_batch_norm_meta_gradient_vmap_kernels_equals_loop(rule_name, monkeypatch):
    """Second-order MAML of a conv net with batch norm: the vmap path with both kernels (norm and
    update) against torch's own fused batch norm on the loop path, to 1e-10."""
    from metalearn.kernels import norm

    calls = []
    real = norm.BatchNormGroups.forward
    monkeypatch.setattr(norm.BatchNormGroups, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    omega, batch = conv_bn_omega(rules()[rule_name]), images()
    loop = gradient(omega, batch, batching="loop", kernels="reference")
    fused = gradient(omega, batch, batching="vmap", kernels="triton")
    assert calls  # the kernel ran
    scale_ = max(g.abs().max() for g in loop.values())
    assert sorted(fused) == sorted(loop)
    for name in loop:
        assert (fused[name] - loop[name]).abs().max() <= 1e-10 * scale_, name


def test_batch_norm_route_only_where_the_dispatch_picks_triton(monkeypatch):
    from metalearn import exact_norms
    from metalearn.kernels import norm

    monkeypatch.setattr(norm, "batch_norm_train", lambda *a: pytest.fail("the kernel ran"))
    x, w, b = bn_inputs((4, 3, 2), torch.float64)
    for kernels in ("auto", "reference"):  # CPU tensors: auto is the primitives
        y = exact_norms.batch_norm(x, None, None, w, b, training=True, kernels=kernels)
        close((y,), (reference.batch_norm_train(x, w, b, 1e-5),), torch.float64)
    mixed = exact_norms.batch_norm(x, None, None, w.float(), b, training=True, kernels="triton")  # mixed dtypes
    assert mixed.dtype == torch.float64


# ---------------------------------------------------------------- kernels= reaches every inner loop


@pytest.mark.filterwarnings("ignore:iMAML")  # 2 inner steps leave the proximal problem unsolved: same either way
@pytest.mark.parametrize("mode", ["truncated", "checkpointed", "implicit", "reptile", "first_order"])
def test_every_mode_through_the_kernels_matches_reference(mode, monkeypatch):
    from metalearn.kernels import update

    calls = []
    real = update._forward
    monkeypatch.setattr(update, "_forward", lambda *a: calls.append(a[0]) or real(*a))
    omega, batch = omega_with("maml"), regression(2)
    ref = gradient(omega, batch, batching="loop", mode=mode, kernels="reference")
    assert not calls
    fused = gradient(omega, batch, batching="loop", mode=mode, kernels="triton")
    assert calls
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-10, atol=1e-12)


def test_fine_tune_evaluate_and_meta_train_take_kernels(monkeypatch):
    from metalearn import TrainConfig, evaluate, fine_tune, meta_train
    from metalearn.kernels import update
    from metalearn.tasks import Sinusoid

    calls = []
    real = update._forward
    monkeypatch.setattr(update, "_forward", lambda *a: calls.append(a[0]) or real(*a))
    omega, batch = omega_with("meta_sgd"), regression(2)
    train = (batch.train[0][0], batch.train[1][0])
    fused = fine_tune(omega, train, inner_steps=2, kernels="triton")
    assert len(calls) == 2
    ref = fine_tune(omega, train, inner_steps=2, kernels="reference")
    for name in ref.params:
        torch.testing.assert_close(fused.params[name], ref.params[name], rtol=1e-12, atol=1e-14)
    tasks = list(batch)
    a = evaluate(omega, tasks, 2, batching="vmap", kernels="triton")
    b = evaluate(omega, tasks, 2, batching="vmap", kernels="reference")
    assert abs(a.mean - b.mean) <= 1e-10 * max(1.0, abs(b.mean))
    with pytest.raises(ValueError, match="kernels must be one of"):
        TrainConfig(steps=1, inner_steps=1, meta_batch_size=2, kernels="gpu")
    assert "kernels" not in TrainConfig(steps=1, inner_steps=1, meta_batch_size=2, kernels="triton").identity()
    calls.clear()
    omega = MetaKnowledge(MLP((1, 8, 1)), InnerSGD(lr=0.1))
    opt = torch.optim.Adam(omega.parameters(), 1e-3)
    meta_train(omega, Sinusoid(5, 5, seed=0, length=None), opt, steps=1, inner_steps=1, meta_batch_size=2,
               progress=False, kernels="triton", batching="loop")
    assert calls == ["sgd", "sgd"]  # one launch per task's inner step


@pytest.mark.slow  # a Conv-4: ~40 interpreted norm launches
def test_library_batch_norm_follows_the_callers_kernels(monkeypatch):
    """`models.BatchNorm` calls exact_norms.batch_norm itself under vmap: it takes the choice of the
    library's vmap (ExactNorms), so kernels='reference' launches nothing and 'triton' the norm kernel."""
    from metalearn.kernels import norm
    from metalearn.models import Conv4

    calls = []
    real = norm.BatchNormGroups.forward
    monkeypatch.setattr(norm.BatchNormGroups, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        omega = MetaKnowledge(Conv4(2, in_channels=1, hidden=2, image_size=16), InnerSGD(lr=0.1)).double()
    g = torch.Generator().manual_seed(1)
    x_tr, x_val = (torch.randn(2, 2, 1, 16, 16, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.tensor([0, 1]).expand(2, 2)
    batch = TaskBatch(train=(x_tr, y), val=(x_val, y))
    ref = gradient(omega, batch, batching="vmap", kernels="reference")
    assert not calls
    loop = gradient(omega, batch, batching="loop", kernels="reference")
    fused = gradient(omega, batch, batching="vmap", kernels="triton")
    assert calls
    scale_ = max(v.abs().max() for v in loop.values())
    for name in loop:
        assert (fused[name] - loop[name]).abs().max() <= 1e-10 * scale_, name
        assert (ref[name] - loop[name]).abs().max() <= 1e-10 * scale_, name


def test_kernels_import_nothing_above_them_and_triton_only_lazily():
    """The kernels layer knows nothing above it; Triton is imported at module level only by the kernel
    files themselves, which are imported at the first launch (so TRITON_INTERPRET can still be set)."""
    import ast
    from pathlib import Path

    import metalearn.kernels

    folder = Path(metalearn.kernels.__file__).parent
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("metalearn") or name.startswith("metalearn.kernels"), (path.name, name)
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        top_names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        top_names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        if not path.name.startswith("triton_"):
            assert not any(n.split(".")[0] == "triton" for n in top_names), path.name


def test_a_vmapped_batch_past_32_bit_offsets_runs_the_reference(monkeypatch):
    """Each task fits, all tasks folded together would not: the vmap rules compute plain torch instead."""
    from metalearn.kernels import norm, update

    monkeypatch.setattr(update, "MAX_ENTRIES", 10)
    monkeypatch.setattr(norm, "MAX_ENTRIES", 10)
    monkeypatch.setattr(update, "_forward", lambda *a: pytest.fail("a kernel ran past the offset limit"))
    monkeypatch.setattr(norm.BatchNormGroups, "forward", staticmethod(lambda *a: pytest.fail("the norm kernel ran")))
    inputs = op_inputs("adam", 4, torch.float64, scalar_hypers=(0,))
    thetas = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def total(op):
        return torch.func.vmap(lambda t: op((t, *inputs[1:]))[0].sum())(thetas).sum()

    fused = torch.autograd.grad(total(lambda x: fused_update("adam", x)), (thetas, inputs[4]))
    close(fused, torch.autograd.grad(total(lambda x: reference.update("adam", x)), (thetas, inputs[4])),
          torch.float64)
    x, w, b = bn_inputs((3, 2, 2), torch.float64)
    xs = x.detach().expand(3, 3, 2, 2)
    y = torch.func.vmap(lambda x: norm.batch_norm_train(x, w, b, 1e-5))(xs)
    close((y,), (torch.func.vmap(lambda x: reference.batch_norm_train(x, w, b, 1e-5))(xs),), torch.float64)


@pytest.mark.parametrize("kind", KINDS)
def test_update_float16_is_computed_in_float32(kind):
    """fp16 entries are updated in float32 and rounded once: within an fp16 rounding of the float32 reference."""
    inputs = op_inputs(kind, 33, torch.float32, scalar_hypers=(0,), seed=11)
    half = tuple(x.detach().half() for x in inputs)
    out = fused_update(kind, half)
    ref = reference.update(kind, tuple(x.float() for x in half))
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == torch.float16
        torch.testing.assert_close(o.float(), r, rtol=1e-3, atol=1e-3)
