"""Chunked vmap (`metalearn.mapping.map_chunks`, ``chunk_size=``): the same meta-gradient, less memory.

The meta-gradient over chunks equals the one-piece vmap meta-gradient (float64, 1e-12) for every
mode, every init that differs in how θ0 reaches ω (a point, a sampled Gaussian, prototypes from
the train data), an uneven last chunk, chunks of 1 and chunks larger than the batch. Modes that run
only the loop (Checkpointed, Implicit, Reptile) already hold one task's graph at a time: chunk_size
must leave them exactly as they are. Peak memory is measured with torch.profiler's allocation
events on the CPU: chunks must lower it. No timing is asserted.
"""

from __future__ import annotations

import itertools

import pytest
import reference
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from metalearn import GaussianInit, InnerSGD, MetaKnowledge, TrainConfig, maml, meta_sgd, meta_train, proto_maml
from metalearn.errors import NonFiniteError
from metalearn.mapping import Chunking, chunk_bounds, graph_bytes, map_chunks, task_in_dims, task_objective
from metalearn.models import MLP, Conv4
from metalearn.modes import Checkpointed, Implicit, Reptile, Truncated, Unrolled
from metalearn.outer import meta_gradient, meta_step
from metalearn.tasks import TaskBatch

DT = torch.float64
N_TASKS = 5  # odd, so chunks of 2 leave an uneven last chunk
CHUNKS = [1, 2, 3, N_TASKS, N_TASKS + 3]


def tiny_mlp(seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP((1, 8, 8, 1), activation=nn.Tanh).to(DT)


def regression(n_tasks: int = N_TASKS, seed: int = 1) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(n_tasks, 5, 7, 1, seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def classification(n_tasks: int = N_TASKS, ways: int = 3, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    y_tr = torch.arange(ways).repeat(n_tasks, 2)
    y_val = torch.arange(ways).repeat(n_tasks, 3)
    x_tr = torch.randn(n_tasks, y_tr.shape[1], 1, 16, 16, generator=g, dtype=DT)
    x_val = torch.randn(n_tasks, y_val.shape[1], 1, 16, 16, generator=g, dtype=DT)
    return TaskBatch((x_tr, y_tr), (x_val, y_val))


def grads(omega: MetaKnowledge, batch: TaskBatch, steps: int, seed: int | None = None, **kwargs) -> dict[str, Tensor]:
    omega.zero_grad(set_to_none=True)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    meta_gradient(omega, batch, steps, generator=generator, **kwargs)
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], tol: float = 1e-12) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        scale = max(float(want[name].abs().max()), 1.0)
        assert float((got[name] - want[name]).abs().max()) <= tol * scale, name


VMAP_MODES = [Unrolled(), Unrolled(first_order=True), Truncated(k=1), Truncated(k=3)]


@pytest.mark.parametrize("chunk", CHUNKS + ["auto"])
@pytest.mark.parametrize("mode", VMAP_MODES, ids=lambda m: f"{m.name}-{m.config()}")
@pytest.mark.parametrize("recipe", [maml, meta_sgd])
def test_chunked_vmap_meta_gradient_equals_one_piece(recipe, mode, chunk) -> None:
    omega, batch = recipe(tiny_mlp(), 0.3), regression()
    whole = grads(omega, batch, 2, batching="vmap", mode=mode)
    budget = {"memory_budget": 30_000} if chunk == "auto" else {}  # a few tasks per chunk on this MLP
    chunked = grads(omega, batch, 2, batching="vmap", mode=mode, chunk_size=chunk, **budget)
    assert_close(chunked, whole)
    assert_close(chunked, grads(omega, batch, 2, batching="loop", mode=mode), tol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, N_TASKS + 3])
def test_chunks_carry_the_gradient_through_a_sampled_init(chunk) -> None:
    """A Gaussian θ0 = μ + σε (per-task, drawn once for the batch) and a shared mean θ0: the
    chunks' gradients reach μ and σ through one backward of the init at the end."""
    for init, sampled in ((GaussianInit(init_scale=0.1), True), (GaussianInit(init_scale=0.1, mode="mean"), False)):
        omega = MetaKnowledge(tiny_mlp(), optimizer=InnerSGD(0.3), init=init).to(DT)
        batch = regression()
        whole = grads(omega, batch, 2, seed=3, batching="vmap")
        assert any(name.startswith("init.log_scale") for name in whole) == sampled  # σ learns only when sampling
        assert_close(grads(omega, batch, 2, seed=3, batching="vmap", chunk_size=chunk), whole)


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunks_with_an_init_that_reads_the_train_data(chunk) -> None:
    """Proto-MAML: the head's θ0 is computed from each task's prototypes, under vmap with a norm."""
    torch.manual_seed(0)
    omega = proto_maml(Conv4(num_classes=3, in_channels=1, hidden=4, image_size=16).double(), lr=0.1)
    batch = classification()
    whole = grads(omega, batch, 1, batching="vmap")
    assert_close(grads(omega, batch, 1, batching="vmap", chunk_size=chunk), whole)


@pytest.mark.filterwarnings("ignore:iMAML. the proximal inner problem is far from solved")
@pytest.mark.parametrize("chunk", [1, 2, N_TASKS + 3, "auto"])
@pytest.mark.parametrize("mode", [Checkpointed(), Implicit(lam=1.0, cg_steps=3), Reptile()], ids=lambda m: m.name)
def test_loop_only_modes_are_unchanged_by_chunk_size(mode, chunk) -> None:
    omega, batch = maml(tiny_mlp(), 0.1), regression()
    budget = {"memory_budget": 10_000} if chunk == "auto" else {}
    whole = grads(omega, batch, 2, mode=mode)
    chunked = grads(omega, batch, 2, mode=mode, chunk_size=chunk, **budget)
    assert chunked.keys() == whole.keys()
    for name in whole:
        assert torch.equal(chunked[name], whole[name]), name


def test_conv4_with_batch_norm_chunked_equals_one_piece_second_order() -> None:
    torch.manual_seed(0)
    omega = maml(Conv4(num_classes=3, in_channels=1, hidden=4, image_size=16).double(), lr=0.2)
    batch = classification()
    whole = grads(omega, batch, 2, batching="vmap")
    assert_close(grads(omega, batch, 2, batching="vmap", chunk_size=2), whole)


def test_meta_step_with_chunks_gives_the_same_omega() -> None:
    batch = regression()
    omegas = [meta_sgd(tiny_mlp(), 0.3) for _ in range(2)]
    for omega, chunk in zip(omegas, (None, 2), strict=True):
        opt = torch.optim.Adam(omega.parameters(), 1e-2)
        for _ in range(3):
            meta_step(omega, opt, batch, 2, batching="vmap", chunk_size=chunk)
    for (name, a), (_, b) in zip(omegas[0].named_parameters(), omegas[1].named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name


def test_chunk_bounds_cover_the_batch_in_order() -> None:
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(5, 1) == [(i, i + 1) for i in range(5)]
    assert chunk_bounds(5, 9) == [(0, 5)]
    assert chunk_bounds(0, 3) == []


def test_graph_bytes_counts_saved_tensors_once_and_leaves_inputs_out() -> None:
    x = torch.randn(100, dtype=DT, requires_grad=True)
    y = x.exp()  # saves its result: 800 bytes
    z = (y * y).sum()  # saves y twice (one storage)
    assert graph_bytes([z]) == 800
    w = x.sin()  # saves its input x
    assert graph_bytes([w.sum()]) == 800
    assert graph_bytes([w.sum()], exclude={x.untyped_storage().data_ptr()}) == 0
    assert graph_bytes([x.detach() * 2]) == 0  # no graph

    class Square(torch.autograd.Function):  # a custom op (e.g. a fused kernel) saves through ctx
        @staticmethod
        def forward(ctx, t):
            ctx.save_for_backward(t)
            return t * t

        @staticmethod
        def backward(ctx, g):
            (t,) = ctx.saved_tensors
            return 2 * t * g

    inputs = {x.untyped_storage().data_ptr()}
    assert graph_bytes([Square.apply(x.sin()).sum()], exclude=inputs) == 800  # sin's output, saved by Square only
    assert graph_bytes([Square.apply(x.exp()).sum()]) == 800  # exp's output, saved by both nodes: counted once


def test_auto_sizes_chunks_from_the_probe_task() -> None:
    """"auto": the first task runs alone, its graph's bytes B set the rest to budget // B tasks."""
    omega, batch = maml(tiny_mlp(), 0.3), regression(n_tasks=11)
    theta0 = omega.model_params()
    args = (omega, theta0, *batch.train, *batch.val, 2, False)
    dims = task_in_dims(dict.fromkeys(theta0))
    starts: list[int] = []
    sizes: list[int] = []

    def record(outputs, start):
        starts.append(start)
        sizes.append(len(outputs[0]))
        if start == 0:
            inputs = [*omega.parameters(), *batch.train, *batch.val]  # outlive the graph: not counted
            record.per_task = graph_bytes(outputs, exclude={t.untyped_storage().data_ptr() for t in inputs})
        return tuple(o.detach() for o in outputs)

    probe_bytes = None
    for tasks_per_chunk in (1, 3, 4):
        starts.clear()
        sizes.clear()
        if probe_bytes is None:  # measure once, then ask for budgets of whole multiples of it
            map_chunks(task_objective, dims, *args, chunking=Chunking("auto", 10**12), after_chunk=record)
            probe_bytes = record.per_task
            assert sizes == [1, 10] and probe_bytes > 0
            starts.clear()
            sizes.clear()
        budget = tasks_per_chunk * probe_bytes
        out = map_chunks(task_objective, dims, *args, chunking=Chunking("auto", budget), after_chunk=record)
        expected = [1] + [b - a for a, b in chunk_bounds(10, tasks_per_chunk)]
        assert sizes == expected
        assert starts == list(itertools.accumulate([0] + expected[:-1]))
        assert out[0].shape == (11,)


def test_auto_without_a_budget_on_the_cpu_runs_the_batch_in_one_piece() -> None:
    omega, batch = maml(tiny_mlp(), 0.3), regression()
    theta0 = omega.model_params()
    sizes: list[int] = []

    def record(outputs, start):
        sizes.append(len(outputs[0]))
        return tuple(o.detach() for o in outputs)

    map_chunks(task_objective, task_in_dims(dict.fromkeys(theta0)), omega, theta0, *batch.train, *batch.val, 1,
               False, chunking=Chunking("auto"), after_chunk=record)
    assert sizes == [N_TASKS]
    assert Chunking("auto").budget(torch.device("cpu")) is None


def _peak_bytes(fn) -> int:
    """Peak of the CPU bytes allocated (and not yet freed) while ``fn`` runs, from torch.profiler's
    allocation events in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    return max(itertools.accumulate(n for _, n in events))


def test_chunks_lower_the_peak_memory_of_the_vmap_meta_gradient() -> None:
    torch.manual_seed(0)
    omega = maml(MLP((1, 64, 64, 1)).to(DT), 0.01)
    batch = TaskBatch(*(tuple(t.repeat(1, 8, 1) for t in pair) for pair in (regression(16).train, regression(16).val)))

    def run(chunk):
        return lambda: grads(omega, batch, 2, batching="vmap", chunk_size=chunk)

    run(None)()  # warm up (first-call allocations)
    whole, chunked = _peak_bytes(run(None)), _peak_bytes(run(2))
    assert chunked < 0.4 * whole, (chunked, whole)  # 2 of 16 tasks' graphs at a time


def test_a_non_finite_loss_in_a_later_chunk_names_its_task() -> None:
    omega, batch = maml(tiny_mlp(), 0.3), regression()
    x_tr = batch.train[0].clone()
    x_tr[3, 0, 0] = float("nan")
    bad = TaskBatch((x_tr, batch.train[1]), batch.val)
    with pytest.raises(NonFiniteError, match="task 3") as info:
        meta_gradient(omega, bad, 2, batching="vmap", chunk_size=2)
    assert info.value.task == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"chunk_size": -2}, "chunk_size must be a positive int"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive int"),
        ({"chunk_size": True}, "chunk_size must be a positive int"),
        ({"chunk_size": "big"}, "chunk_size must be a positive int"),
        ({"chunk_size": "auto", "memory_budget": 0}, "memory_budget must be a positive int"),
        ({"chunk_size": 4, "memory_budget": 10**6}, "memory_budget=1000000 is read only with chunk_size='auto'"),
        ({"memory_budget": 10**6}, "read only with chunk_size='auto'"),
    ],
)
def test_bad_chunk_settings_are_refused_before_any_work(kwargs, match) -> None:
    omega, batch = maml(tiny_mlp(), 0.3), regression()
    opt = torch.optim.SGD(omega.parameters(), 0.1)
    before = [p.detach().clone() for p in omega.parameters()]
    with pytest.raises(ValueError, match=match):
        meta_gradient(omega, batch, 1, batching="vmap", **kwargs)
    with pytest.raises(ValueError, match=match):
        meta_step(omega, opt, batch, 1, batching="vmap", **kwargs)
    with pytest.raises(ValueError, match=match):
        TrainConfig(steps=1, inner_steps=1, meta_batch_size=2, **kwargs)
    assert all(p.grad is None for p in omega.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, omega.parameters(), strict=True))


def test_a_vmap_mode_of_ones_own_without_chunks_is_refused_by_name() -> None:
    class OnePiece(Unrolled):
        name = "one_piece"
        chunked_vmap = False

    omega, batch = maml(tiny_mlp(), 0.3), regression()
    with pytest.raises(ValueError, match="mode='one_piece' runs its vmap path in one piece"):
        meta_gradient(omega, batch, 1, batching="vmap", mode=OnePiece(), chunk_size=2)
    assert all(p.grad is None for p in omega.parameters())
    meta_gradient(omega, batch, 1, batching="loop", mode=OnePiece(), chunk_size=2)  # the loop needs no chunks


def test_meta_train_with_chunks_matches_and_resumes_with_other_chunks(tmp_path) -> None:
    """chunk_size is not part of the run identity: a run may resume with another one (e.g. after
    running out of memory), and its ω matches the unchunked run's to rounding."""
    tasks = [regression(1, seed=s)[0] for s in range(8)]

    def train(steps, chunk, folder):
        omega = maml(tiny_mlp(), 0.3)
        opt = torch.optim.SGD(omega.parameters(), 0.05)
        meta_train(omega, tasks, opt, steps=steps, inner_steps=1, meta_batch_size=4, batching="vmap",
                   chunk_size=chunk, checkpoint_dir=folder, checkpoint_every=1, progress=False)
        return omega

    plain = train(4, None, tmp_path / "plain")
    train(2, 3, tmp_path / "chunked")
    resumed = train(4, 1, tmp_path / "chunked")
    assert "chunk_size" not in TrainConfig(steps=1, inner_steps=1, meta_batch_size=2, chunk_size=2).identity()
    for (name, a), (_, b) in zip(plain.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
