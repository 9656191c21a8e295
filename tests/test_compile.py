"""``compile=``: the compiled meta-gradient equals the eager one; fallbacks warn, naming why."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from metalearn.compile import CompileFallbackWarning, check_compile, compile_blocker
from metalearn.errors import NonFiniteError
from metalearn.knowledge.recipes import maml
from metalearn.models import MLP, Conv4
from metalearn.modes import resolve_mode
from metalearn.outer import MetaStep
from metalearn.tasks.task import TaskBatch


def _batch(n: int = 3, k: int = 4) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.rand(n, k, 1, generator=g, dtype=torch.float64) * 4 - 2  # noqa: E731
    y = lambda: torch.randn(n, k, 1, generator=g, dtype=torch.float64)  # noqa: E731
    return TaskBatch(train=(x(), y()), val=(x(), y()))


def _omega(seed: int = 0):
    torch.manual_seed(seed)
    return maml(MLP((1, 6, 1)).double(), lr=0.1)


def _steps(compile_: bool | str, first_order: bool, steps: int = 3):
    """ω after ``steps`` SGD meta-steps on the same batch, and the meta-gradient of each step."""
    omega = _omega()
    step = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.05), 2, batching="vmap",
                    first_order=first_order, compile=compile_)
    grads, rows = [], []
    for _ in range(steps):
        rows.append(step(_batch()))
        grads.append({n: p.grad.clone() for n, p in omega.named_parameters()})
    return omega, grads, rows, step


# slow: each compiles once (~5-40 s for this 1-6-1 MLP with aot_eager, depending on the load)
@pytest.mark.slow
@pytest.mark.parametrize("first_order", [False, True])
def test_compiled_meta_gradient_equals_the_eager_one_at_every_step(first_order: bool) -> None:
    eager, eager_grads, eager_rows, _ = _steps(False, first_order)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # it must really compile
        compiled, grads, rows, step = _steps("aot_eager", first_order)
    assert step.compile_seconds is not None and step.compile_seconds > 0
    assert step._speed.compiled is not None and step._speed.compiled.failed is None  # reused, never fell back
    assert not any(p.grad.requires_grad for p in compiled.parameters())  # plain gradients, no graph kept
    # run under no_grad, the compiled code is an inference graph: no autograd graph to ω at its outputs
    # (with one, AOT autograd saves every activation of the step for a backward never run)
    pairs, aux, summary = step._speed.compiled(_batch(), 2)
    assert torch.is_grad_enabled()
    assert all(g.grad_fn is None and not g.requires_grad for _, g in pairs)
    assert all(t.grad_fn is None for t in (*aux, summary))
    for g, g_eager in zip(grads, eager_grads, strict=True):
        assert g.keys() == g_eager.keys()
        for n in g_eager:
            torch.testing.assert_close(g[n], g_eager[n], rtol=1e-12, atol=1e-14)
    for row, eager_row in zip(rows, eager_rows, strict=True):  # the stats summed up in the compiled code
        for key in ("meta_loss", "val_metric", "inner_loss_first", "inner_loss_last", "grad_norm"):
            assert row[key] == pytest.approx(eager_row[key], rel=1e-12), key
    for p, q in zip(compiled.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_compiled_step_reads_the_host_once_and_refuses_a_nan_loss_before_touching_omega(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    omega = _omega()
    step = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.05), 2, batching="vmap", compile="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        step(_batch())  # compiled here; the batches below have the same shapes, so they reuse the code
    with monkeypatch.context() as patch:
        reads: list[str] = []
        tolist, item, to_bool = torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__
        patch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
        patch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or item(t))
        patch.setattr(torch.Tensor, "__bool__", lambda t: reads.append("bool") or to_bool(t))
        step(_batch())
    assert reads == ["tolist"]  # losses' finiteness, stats and grad norm: one summary computed in the compiled code
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    bad = _batch()
    bad.train[0][1, 0, 0] = float("nan")
    for p in omega.parameters():
        p.grad = None
    with pytest.raises(NonFiniteError, match="task 1"):
        step(bad)
    assert all(p.grad is None for p in omega.parameters())  # ω's .grad untouched
    assert all(torch.equal(p, before[n]) for n, p in omega.named_parameters())


@pytest.mark.slow
def test_compiled_step_without_inner_steps_reports_no_inner_loss() -> None:
    reference = _omega()
    eager = MetaStep(reference, torch.optim.SGD(reference.parameters(), lr=0.05), 0, batching="vmap")(_batch())
    omega = _omega()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        row = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.05), 0, batching="vmap",
                       compile="aot_eager")(_batch())
    assert math.isnan(row["inner_loss_first"]) and math.isnan(row["inner_loss_last"])
    assert row["meta_loss"] == pytest.approx(eager["meta_loss"], rel=1e-12)
    assert row["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-12)


@pytest.mark.slow
def test_inductor_compiled_meta_gradient_equals_the_eager_one() -> None:
    _, eager_grads, _, _ = _steps(False, False, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        _, grads, _, _ = _steps(True, False, steps=1)
    for n in eager_grads[0]:
        torch.testing.assert_close(grads[0][n], eager_grads[0][n], rtol=1e-10, atol=1e-12)


def test_loop_batching_falls_back_with_a_warning_and_the_same_gradient() -> None:
    omega = _omega()
    opt = torch.optim.SGD(omega.parameters(), lr=0.0)
    step = MetaStep(omega, opt, 1, batching="loop", compile=True)
    with pytest.warns(CompileFallbackWarning, match="batching='loop'"):
        step(_batch())
    eager = _omega()
    MetaStep(eager, torch.optim.SGD(eager.parameters(), lr=0.0), 1, batching="loop")(_batch())
    for p, q in zip(omega.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # warned once per MetaStep
        step(_batch())


@pytest.mark.parametrize(
    ("mode", "batching", "precision", "match"),
    [("implicit", "loop", "float32", "mode='implicit'"), ("unrolled", "loop", "float32", "batching='loop'"),
     ("unrolled", "vmap", "fp16", "fp16")],
)
def test_compile_blocker_names_why(mode: str, batching: str, precision: str, match: str) -> None:
    why = compile_blocker(_omega(), resolve_mode(mode), batching, precision)
    assert why is not None and match in why
    assert compile_blocker(_omega(), resolve_mode("unrolled"), "vmap", "float32") is None


def test_norm_layers_are_not_compiled() -> None:
    why = compile_blocker(maml(Conv4(5), lr=0.4), resolve_mode("unrolled"), "vmap", "float32")
    assert why is not None and "norm layers" in why


@pytest.mark.parametrize("bad", ["yes", 1, "cudagraphs"])
def test_bad_compile_value_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="compile must be True, False or a torch.compile backend"):
        check_compile(bad)
    assert check_compile(True) == "inductor" and check_compile(False) is None


def _adam_pair(lr: float = 0.01):
    """Two Adam optimizers on equal float64 parameters with equal gradients."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (3,), (1, 4)]
    made = []
    for _ in range(2):
        params = [torch.nn.Parameter(torch.ones(s, dtype=torch.float64)) for s in shapes]
        made.append((params, torch.optim.Adam(params, lr=lr)))
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(4)]
    return made, grads


@pytest.mark.slow
def test_compiled_outer_step_equals_the_eager_one_and_falls_back_when_the_lr_changes() -> None:
    from metalearn.compile import CompiledOuterStep

    ((params, adam), (ref_params, ref_adam)), grads = _adam_pair()
    step = CompiledOuterStep(adam, backend="aot_eager")
    for i, gs in enumerate(grads):
        if i == 2:  # an LR scheduler's change: compiled code holds lr as a constant
            for opt in (adam, ref_adam):
                opt.param_groups[0]["lr"] = 0.005
        for p, q, g in zip(params, ref_params, gs, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if i == 2:
            with pytest.warns(CompileFallbackWarning, match="settings changed"):
                step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", CompileFallbackWarning)
                step()
        ref_adam.step()
        for p, q in zip(params, ref_params, strict=True):
            # compiled, torch's Adam computes its bias corrections 1 - β^t in its float32 step tensor
            # (eagerly: Python floats); 1 - 0.999 loses ~5e-5 of itself there, so the first updates
            # differ by that much relatively (here lr * 5e-5 ≈ 5e-7 at most)
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert step.eager is not None and step.compile_seconds is not None


def test_only_torch_optimizers_have_their_step_compiled() -> None:
    from metalearn.compile import CompiledOuterStep, compiles_outer_step

    class Mine(torch.optim.SGD):  # a user's optimizer: its step may break the graph anywhere
        pass

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert compiles_outer_step(torch.optim.Adam(p)) and compiles_outer_step(torch.optim.SGD(p, lr=0.1))
    assert not compiles_outer_step(Mine(p, lr=0.1)) and not compiles_outer_step(torch.optim.LBFGS(p))
    with pytest.raises(TypeError, match="eagerly"):
        CompiledOuterStep(Mine(p, lr=0.1))


@pytest.mark.slow
@pytest.mark.parametrize("scheduled", [False, True])
def test_a_compiled_run_stopped_and_resumed_ends_bit_identical(tmp_path, scheduled: bool) -> None:
    from torch.optim.lr_scheduler import StepLR

    from metalearn.tasks import Sinusoid
    from metalearn.train import meta_train

    settings = dict(steps=4, inner_steps=1, meta_batch_size=2, seed=3, progress=False, checkpoint_every=1,
                    batching="vmap", compile="aot_eager")  # fmt: skip
    # each run stands for a fresh process: torch keeps at most recompile_limit (8) compiled versions of a
    # function per process (every optimizer's step is one function to it), and runs it eagerly beyond
    # that, so the compiles of the tests before would decide which of these runs steps compiled
    torch._dynamo.reset()

    def run(folder, **extra):
        torch.manual_seed(0)
        omega = maml(MLP((1, 6, 1)), lr=0.1)
        opt = torch.optim.Adam(omega.parameters(), lr=1e-2)
        scheduler = StepLR(opt, step_size=1, gamma=0.5) if scheduled else None
        with warnings.catch_warnings():
            warnings.simplefilter("error", CompileFallbackWarning)  # no fallback: with a scheduler, eager Adam
            meta_train(omega, Sinusoid(3, 3, seed=0), opt, scheduler=scheduler, checkpoint_dir=tmp_path / folder,
                       **settings, **extra)  # fmt: skip
        return omega

    whole = run("whole")
    run("cut", callback=lambda step, row, val: step == 1)
    resumed = run("cut")
    for (n, p), q in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_a_zero_learning_rate_steps_eagerly_instead_of_making_omega_nan() -> None:
    """Traced, torch's Adam takes its capturable form, which divides by the learning rate: with lr=0 every
    parameter became NaN (torch 2.13). The compiled outer step runs such an optimizer eagerly, warned."""
    from metalearn.compile import CompiledOuterStep

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    adam = torch.optim.Adam([p], lr=0.0)
    step = CompiledOuterStep(adam, backend="aot_eager")
    p.grad = torch.full_like(p, 0.5)
    with pytest.warns(CompileFallbackWarning, match="learning rate is 0"):
        step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64)) and step.eager is not None
    assert adam.state[p]["exp_avg"].abs().sum() > 0  # it did step (eagerly): Adam's moments moved
