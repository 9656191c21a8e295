"""IndexedSource draws the batches of several steps at once for small batched task sets: the same batches."""

from __future__ import annotations

import pytest
import torch

import metalearn.train.sources as sources
from metalearn import maml
from metalearn.models import MLP
from metalearn.tasks import EpisodicTaskSet, Sinusoid, Task, TaskBatch, TensorLabelledDataset
from metalearn.train import meta_train
from metalearn.train.sources import IndexedSource, batch_for_step, step_indices


def _equal(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(s, t) for s, t in zip((*a.train, *a.val), (*b.train, *b.val), strict=True))


def _episodes() -> EpisodicTaskSet:
    g = torch.Generator().manual_seed(0)
    data = TensorLabelledDataset(torch.rand(12 * 6, 1, 4, 4, generator=g), torch.arange(12).repeat_interleave(6))
    return EpisodicTaskSet(data, ways=3, shots=1, queries=2, length=None)


@pytest.mark.parametrize(
    "tasks",
    [Sinusoid(5, 5, length=None), Sinusoid(5, 5, length=37), _episodes()],
    ids=["endless", "finite", "episodes"],
)
def test_every_step_gets_the_batch_it_gets_alone(tasks) -> None:
    source = IndexedSource(tasks, 4)
    for step in range(40):
        batch, indices = source.batch(step)
        assert indices == step_indices(tasks, step, 4)
        assert _equal(batch, batch_for_step(tasks, step, 4))
    assert source._steps_per_draw == sources.PREFETCH_STEPS  # small batches: drawn many steps at a time


def test_a_resume_mid_block_and_out_of_order_steps_get_the_same_batches() -> None:
    tasks = Sinusoid(5, 5, length=None)
    source = IndexedSource(tasks, 3)
    for step in (7, 8, 30, 9, 2, 23, 22):  # a resume starts anywhere; a block is drawn from the step asked for
        assert _equal(source.batch(step)[0], batch_for_step(tasks, step, 3))


def test_large_batches_and_task_lists_are_drawn_step_by_step(monkeypatch) -> None:
    tasks = Sinusoid(5, 5, length=None)
    monkeypatch.setattr(sources, "PREFETCH_BYTES", 100)  # smaller than one batch
    source = IndexedSource(tasks, 4)
    source.batch(0)
    assert source._steps_per_draw == 1 and _equal(source.batch(1)[0], batch_for_step(tasks, 1, 4))
    listed = [tasks[i] for i in range(8)]
    assert all(isinstance(t, Task) for t in listed)
    assert IndexedSource(listed, 4)._steps_per_draw == 1


def test_meta_train_is_bit_for_bit_the_same_with_and_without_the_prefetch(monkeypatch) -> None:
    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        omega = maml(MLP((1, 8, 1)), lr=0.01)
        meta_train(omega, Sinusoid(5, 5, length=None), torch.optim.Adam(omega.parameters(), lr=1e-3), steps=20,
                   inner_steps=1, meta_batch_size=4, progress=False)
        return {k: v.detach().clone() for k, v in omega.state_dict().items()}

    drawn = run()
    monkeypatch.setattr(sources, "PREFETCH_STEPS", 1)
    alone = run()
    assert drawn.keys() == alone.keys() and all(torch.equal(drawn[k], alone[k]) for k in drawn)
