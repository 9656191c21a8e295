"""meta_train's training API: TrainConfig, outer LR schedulers, the resume line, wrap-around, DataLoaders."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR
from torch.utils.data import DataLoader

from metalearn.checkpoint import latest_checkpoint, load_checkpoint
from metalearn.errors import CheckpointMismatchError
from metalearn.knowledge import MetaKnowledge, MetaSGD
from metalearn.models import MLP
from metalearn.tasks import Sinusoid, stack_tasks
from metalearn.train import TaskSetWrapWarning, TrainConfig, meta_train

SETTINGS = dict(steps=6, inner_steps=1, meta_batch_size=2, seed=3, progress=False, checkpoint_every=2)


def _omega() -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    torch.manual_seed(0)
    omega = MetaKnowledge(MLP((1, 8, 1)), optimizer=MetaSGD(0.01))
    return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)


def _tasks(length: int | None = None) -> Sinusoid:
    return Sinusoid(3, 3, seed=0, length=length)


def _equal(a: MetaKnowledge, b: MetaKnowledge) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _stop_at(step: int):
    return lambda s, row, val: s == step


# -- TrainConfig ---------------------------------------------------------------------------------


def test_a_train_config_runs_the_same_as_the_keyword_settings(tmp_path):
    by_keywords, opt = _omega()
    meta_train(by_keywords, _tasks(), opt, checkpoint_dir=tmp_path / "a", **SETTINGS)
    by_config, opt = _omega()
    meta_train(by_config, _tasks(), opt, run=TrainConfig(checkpoint_dir=tmp_path / "b", **SETTINGS))
    assert _equal(by_keywords, by_config)
    a, b = (torch.load(latest_checkpoint(tmp_path / d), weights_only=True) for d in "ab")
    assert a["fingerprint"] == b["fingerprint"]  # one identity, whichever way the settings came


def test_train_config_is_frozen_and_checks_its_values_when_built():
    config = TrainConfig(steps=1, inner_steps=1, meta_batch_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 2  # type: ignore[misc]
    with pytest.raises(ValueError, match="meta_batch_size must be an int of at least 1, got 0"):
        TrainConfig(steps=1, inner_steps=1, meta_batch_size=0)
    assert dataclasses.replace(config, steps=4).steps == 4


def test_a_config_and_keyword_settings_together_or_an_unknown_setting_are_refused(tmp_path):
    omega, opt = _omega()
    run = TrainConfig(**SETTINGS)
    with pytest.raises(TypeError, match=r"run=TrainConfig\(...\) and the settings \['steps'\]"):
        meta_train(omega, _tasks(), opt, run=run, steps=3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stepz'.*fields of metalearn.train.TrainConfig"):
        meta_train(omega, _tasks(), opt, stepz=3, inner_steps=1, meta_batch_size=1)


def test_the_identity_lists_only_the_identity_fields():
    identity = TrainConfig(steps=9, inner_steps=2, meta_batch_size=3, log_path=None, val_every=7).identity()
    assert identity == {
        "inner_steps": 2,
        "meta_batch_size": 3,
        "first_order": False,
        "batching": "auto",
        "clip_grad_norm": None,
        "seed": 0,
    }
    assert TrainConfig(steps=1, inner_steps=1, meta_batch_size=1, mode="first_order").identity()["first_order"]


# -- schedulers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda o: CosineAnnealingLR(o, T_max=6, eta_min=1e-4), lambda o: StepLR(o, step_size=2, gamma=0.5)]
)
def test_a_scheduled_run_stopped_and_resumed_ends_bit_identical(tmp_path, make):
    whole, opt = _omega()
    whole_scheduler = make(opt)
    meta_train(whole, _tasks(), opt, scheduler=whole_scheduler, checkpoint_dir=tmp_path / "whole", **SETTINGS)
    first, opt = _omega()
    meta_train(
        first, _tasks(), opt, scheduler=make(opt), checkpoint_dir=tmp_path / "cut", callback=_stop_at(2), **SETTINGS
    )
    resumed, opt = _omega()  # a fresh process would build everything again
    scheduler = make(opt)
    result = meta_train(resumed, _tasks(), opt, scheduler=scheduler, checkpoint_dir=tmp_path / "cut", **SETTINGS)
    assert result.resumed_from == 3
    assert _equal(resumed, whole)
    assert scheduler.state_dict() == whole_scheduler.state_dict()
    assert opt.param_groups[0]["lr"] == whole_scheduler.get_last_lr()[0] != 1e-2  # the schedule moved the lr


def test_the_scheduler_is_stepped_once_per_outer_step_and_saved_weights_only(tmp_path):
    omega, opt = _omega()
    scheduler = StepLR(opt, step_size=1, gamma=0.5)
    meta_train(omega, _tasks(), opt, scheduler=scheduler, checkpoint_dir=tmp_path, **{**SETTINGS, "steps": 3})
    assert scheduler.last_epoch == 3 and opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    again, opt2 = _omega()
    info = load_checkpoint(latest_checkpoint(tmp_path), omega=again, outer_optimizer=opt2)  # weights_only=True
    assert info.scheduler_state == scheduler.state_dict()


def test_a_scheduler_of_another_optimizer_or_not_a_scheduler_is_refused_before_any_file(tmp_path):
    omega, opt = _omega()
    other = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="another optimizer than outer_optimizer"):
        meta_train(omega, _tasks(), opt, scheduler=StepLR(other, 1), checkpoint_dir=tmp_path / "a", **SETTINGS)
    with pytest.raises(TypeError, match="scheduler must be a torch.optim.lr_scheduler"):
        meta_train(omega, _tasks(), opt, scheduler=0.5, checkpoint_dir=tmp_path / "b", **SETTINGS)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resuming_a_scheduled_run_without_its_scheduler_is_refused(tmp_path):
    omega, opt = _omega()
    meta_train(omega, _tasks(), opt, scheduler=StepLR(opt, 2), checkpoint_dir=tmp_path, **{**SETTINGS, "steps": 2})
    omega, opt = _omega()
    with pytest.raises(CheckpointMismatchError, match="scheduler"):
        meta_train(omega, _tasks(), opt, checkpoint_dir=tmp_path, **SETTINGS)


# -- what a resumed or finished run says ---------------------------------------------------------


def test_a_resumed_run_says_where_it_resumed_and_a_finished_one_that_there_is_nothing_to_do(tmp_path, caplog, capsys):
    omega, opt = _omega()
    meta_train(omega, _tasks(), opt, checkpoint_dir=tmp_path, callback=_stop_at(1), **SETTINGS)
    assert "resumed" not in caplog.text
    with caplog.at_level(logging.INFO, logger="metalearn.train"):
        omega, opt = _omega()
        meta_train(omega, _tasks(), opt, checkpoint_dir=tmp_path, **{**SETTINGS, "progress": True})
        assert f"resumed from step 2 of 6 ({tmp_path / 'step-00000002.pt'})" in caplog.text
        assert "resumed from step 2 of 6" in capsys.readouterr().err  # above the progress bar
        caplog.clear()
        omega, opt = _omega()
        result = meta_train(omega, _tasks(), opt, checkpoint_dir=tmp_path, **SETTINGS)
    assert result.history == [] and "nothing to do" in caplog.text and "step 6 of 6" in caplog.text
    assert "nothing to do" not in capsys.readouterr().err  # progress=False: only the logger


# -- a finite source that wraps around -----------------------------------------------------------


def test_a_finite_task_set_that_wraps_around_is_warned_about_once(recwarn):
    omega, opt = _omega()
    meta_train(omega, _tasks(length=5), opt, **SETTINGS)  # 6 steps x 2 tasks > 5
    wraps = [w for w in recwarn.list if issubclass(w.category, TaskSetWrapWarning)]
    assert len(wraps) == 1
    assert "length=5" in str(wraps[0].message) and "length=None" in str(wraps[0].message)
    recwarn.clear()
    omega, opt = _omega()
    meta_train(omega, _tasks(length=12), opt, **SETTINGS)  # exactly enough tasks
    omega, opt = _omega()
    meta_train(omega, _tasks(), opt, **SETTINGS)  # endless
    assert not [w for w in recwarn.list if issubclass(w.category, TaskSetWrapWarning)]


# -- any iterable of task batches ----------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_over_a_task_set_trains_and_resumes_like_the_task_set(tmp_path, workers):
    direct, opt = _omega()
    meta_train(direct, _tasks(length=12), opt, **SETTINGS)

    def loader():
        return DataLoader(_tasks(length=12), batch_size=2, collate_fn=stack_tasks, num_workers=workers)

    first, opt = _omega()
    meta_train(first, loader(), opt, checkpoint_dir=tmp_path, callback=_stop_at(2), **SETTINGS)
    resumed, opt = _omega()
    result = meta_train(resumed, loader(), opt, checkpoint_dir=tmp_path, **SETTINGS)
    assert result.resumed_from == 3 and _equal(resumed, direct)


def test_a_shuffled_dataloader_with_its_own_generator_resumes_exactly(tmp_path):
    def loader():
        return DataLoader(
            _tasks(length=8),
            batch_size=2,
            shuffle=True,
            collate_fn=stack_tasks,
            generator=torch.Generator().manual_seed(7),
        )

    whole, opt = _omega()
    with pytest.warns(TaskSetWrapWarning, match="ran out at outer step 4 and starts again"):
        meta_train(whole, loader(), opt, **SETTINGS)  # 8 tasks / 2 = 4 steps a pass
    first, opt = _omega()
    meta_train(first, loader(), opt, checkpoint_dir=tmp_path, callback=_stop_at(4), **SETTINGS)  # past a pass
    resumed, opt = _omega()
    meta_train(resumed, loader(), opt, checkpoint_dir=tmp_path, **SETTINGS)
    assert _equal(resumed, whole)


def test_a_plain_iterator_is_consumed_in_order_and_refused_when_it_runs_out(tmp_path):
    def stream():
        return (task for task in _tasks(length=12))  # single tasks: meta_batch_size of them make a batch

    direct, opt = _omega()
    meta_train(direct, _tasks(length=12), opt, **SETTINGS)
    first, opt = _omega()
    meta_train(first, stream(), opt, checkpoint_dir=tmp_path, callback=_stop_at(1), **SETTINGS)
    resumed, opt = _omega()
    meta_train(resumed, stream(), opt, checkpoint_dir=tmp_path, **SETTINGS)  # skips the 2 steps done
    assert _equal(resumed, direct)
    omega, opt = _omega()
    with pytest.raises(ValueError, match="ran out at outer step 6: a one-shot iterator"):
        meta_train(omega, stream(), opt, **{**SETTINGS, "steps": 7})


def test_an_iterable_yielding_something_else_is_named():
    omega, opt = _omega()
    with pytest.raises(TypeError, match="the source yielded a int.*collate_fn=metalearn.stack_tasks"):
        meta_train(omega, iter([1, 2, 3]), opt, **SETTINGS)
