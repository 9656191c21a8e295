"""meta_train: learning, bit-identical stop-and-resume, JSONL log, refusals and NaN handling."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from torch import nn

from metalearn.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from metalearn.errors import CheckpointMismatchError, NonFiniteError
from metalearn.evaluate import evaluate
from metalearn.knowledge import InitPart, MetaKnowledge, MetaSGD, maml
from metalearn.models import MLP
from metalearn.tasks import Sinusoid, Task, TaskSet, stack_tasks
from metalearn.train import batch_for_step, meta_train

TASKS = Sinusoid(4, 4, seed=0, length=None)
VAL = Sinusoid(4, 4, seed=1, length=6)
CONFIG = {"experiment": "resume-test"}


class NoisyInit(InitPart):
    """A stochastic init: the model's weights plus noise drawn from the step's generator."""

    def initial_params(self, model_params, n_tasks, generator):
        return {
            n: p.expand(n_tasks, *p.shape) + 0.05 * torch.randn((n_tasks, *p.shape), generator=generator)
            for n, p in model_params.items()
        }


def _omega(
    model_seed: int = 0, dropout: bool = False, noisy: bool = False
) -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    torch.manual_seed(model_seed)
    if dropout:
        model = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))
    else:
        model = MLP((1, 8, 8, 1))
    omega = MetaKnowledge(model, optimizer=MetaSGD(0.01), init=NoisyInit() if noisy else None)
    return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)


def _kwargs(**overrides):
    kw = dict(
        inner_steps=1,
        meta_batch_size=3,
        clip_grad_norm=1.0,
        val_tasks=VAL,
        val_every=2,
        checkpoint_every=2,
        seed=5,
        progress=False,
        config=CONFIG,
    )
    kw.update(overrides)
    return kw


def _rows(path, kind):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == kind]


def _assert_same_run(omega_a, opt_a, omega_b, opt_b):
    for (name, p), (_, q) in zip(omega_a.named_parameters(), omega_b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for k in sa["state"]:
        for key, value in sa["state"][k].items():
            assert torch.equal(value, sb["state"][k][key]), (k, key)


def test_meta_train_reduces_the_meta_loss():
    torch.manual_seed(0)
    omega = maml(MLP((1, 40, 40, 1)), lr=0.01)
    opt = torch.optim.Adam(omega.parameters(), lr=2e-3)
    held_out = Sinusoid(5, 10, seed=1, length=50)
    before = evaluate(omega, held_out, 1).mean
    result = meta_train(
        omega, Sinusoid(5, 10, seed=0, length=None), opt, steps=200, inner_steps=1, meta_batch_size=10, progress=False
    )
    after = evaluate(omega, held_out, 1).mean
    losses = [row["meta_loss"] for row in result.history]
    assert result.steps == 200 and len(losses) == 200
    assert statistics.mean(losses[-20:]) < 0.8 * statistics.mean(losses[:20])
    assert after < 0.8 * before


@pytest.mark.parametrize("variant", ["vmap", "loop-dropout", "vmap-stochastic-init"])
def test_stop_and_resume_is_bit_identical(tmp_path, variant):
    batching, dropout, noisy = variant.split("-")[0], "dropout" in variant, "stochastic" in variant
    omega_a, opt_a = _omega(dropout=dropout, noisy=noisy)
    initial = [p.detach().clone() for p in omega_a.parameters()]
    run_a = meta_train(
        omega_a, TASKS, opt_a, steps=6, batching=batching, checkpoint_dir=tmp_path / "a",
        log_path=tmp_path / "a.jsonl", **_kwargs(),
    )  # fmt: skip
    assert run_a.resumed_from is None and run_a.steps == 6
    assert not all(torch.equal(p, q) for p, q in zip(omega_a.parameters(), initial, strict=True))

    omega_b, opt_b = _omega(dropout=dropout, noisy=noisy)
    first = meta_train(
        omega_b, TASKS, opt_b, steps=3, batching=batching, checkpoint_dir=tmp_path / "b",
        log_path=tmp_path / "b.jsonl", **_kwargs(),
    )  # fmt: skip
    assert first.steps == 3 and [s for s, _ in list_checkpoints(tmp_path / "b")] == [2, 3]
    torch.manual_seed(1234)  # the global RNG (dropout) must come back from the checkpoint
    # another init: the checkpoint must overwrite it
    omega_c, opt_c = _omega(model_seed=7, dropout=dropout, noisy=noisy)
    second = meta_train(
        omega_c, TASKS, opt_c, steps=6, batching=batching, checkpoint_dir=tmp_path / "b",
        log_path=tmp_path / "b.jsonl", **_kwargs(),
    )  # fmt: skip
    assert second.resumed_from == 3 and second.steps == 6 and [r["step"] for r in second.history] == [3, 4, 5]

    _assert_same_run(omega_a, opt_a, omega_c, opt_c)
    assert _rows(tmp_path / "a.jsonl", "train") == _rows(tmp_path / "b.jsonl", "train")
    # the stopped run also validated after its own last step (2)
    b_val = _rows(tmp_path / "b.jsonl", "val")
    assert [r["step"] for r in b_val] == [1, 2, 3, 5]
    assert [r for r in b_val if r["step"] != 2] == _rows(tmp_path / "a.jsonl", "val")


def test_resume_after_a_crash_between_checkpoints_drops_the_orphan_log_lines(tmp_path):
    omega_a, opt_a = _omega()
    meta_train(omega_a, TASKS, opt_a, steps=6, log_path=tmp_path / "a.jsonl", **_kwargs())

    omega_b, opt_b = _omega()
    log = tmp_path / "b.jsonl"
    meta_train(omega_b, TASKS, opt_b, steps=4, checkpoint_dir=tmp_path / "b", keep_last=None, log_path=log, **_kwargs())
    checkpoint_path(tmp_path / "b", 4).unlink()  # the run "died" after logging steps 2-3, before checkpoint 4
    with open(log, "a") as f:
        f.write('{"kind": "train", "st')  # and in the middle of a line
    omega_c, opt_c = _omega(model_seed=3)
    result = meta_train(omega_c, TASKS, opt_c, steps=6, checkpoint_dir=tmp_path / "b", log_path=log, **_kwargs())
    assert result.resumed_from == 2
    _assert_same_run(omega_a, opt_a, omega_c, opt_c)
    assert [r["step"] for r in _rows(log, "train")] == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in _rows(log, "val")] == [1, 3, 5]
    assert _rows(log, "train") == _rows(tmp_path / "a.jsonl", "train")


def test_jsonl_lines_are_valid_json(tmp_path):
    omega, opt = _omega()
    log = tmp_path / "log.jsonl"
    meta_train(omega, TASKS, opt, steps=5, inner_steps=0, meta_batch_size=2, val_tasks=VAL, val_every=2,
               log_path=log, progress=False)  # fmt: skip

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    rows = [json.loads(line, parse_constant=reject) for line in log.read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in train] == [0, 1, 2, 3, 4] and [r["step"] for r in val] == [1, 3, 4]
    for r in train:
        assert {"step", "meta_loss", "val_metric", "grad_norm", "time"} <= r.keys()
        assert math.isfinite(r["meta_loss"]) and r["grad_norm"] >= 0 and r["time"] >= 0
        assert r["inner_loss_first"] is None  # 0 inner steps: no inner loss, written as null, not NaN
    for r in val:
        assert r["metric"] == "mse" and r["n"] == len(VAL) and r["ci95"] > 0


def test_another_configuration_is_refused_and_nothing_written_is_lost(tmp_path):
    omega, opt = _omega()
    log = tmp_path / "log.jsonl"
    meta_train(omega, TASKS, opt, steps=3, checkpoint_dir=tmp_path / "ck", log_path=log, **_kwargs())
    files = {p: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    logged = log.read_bytes()
    for change in ({"inner_steps": 2}, {"config": {"experiment": "other"}}, {"seed": 6}):
        other, other_opt = _omega()
        with pytest.raises(CheckpointMismatchError, match=next(iter(change))):
            meta_train(other, TASKS, other_opt, steps=6, checkpoint_dir=tmp_path / "ck", log_path=log,
                       **_kwargs(**change))  # fmt: skip
    assert {p: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == files
    assert log.read_bytes() == logged


def test_refuses_to_overwrite_checkpoints_or_a_log_of_another_run(tmp_path):
    omega, opt = _omega()
    meta_train(omega, TASKS, opt, steps=2, checkpoint_dir=tmp_path / "ck", log_path=tmp_path / "l.jsonl", **_kwargs())
    logged = (tmp_path / "l.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        meta_train(omega, TASKS, opt, steps=4, checkpoint_dir=tmp_path / "ck", resume=False, **_kwargs())
    with pytest.raises(FileExistsError, match="already holds a log"):
        meta_train(omega, TASKS, opt, steps=4, checkpoint_dir=tmp_path / "new", log_path=tmp_path / "l.jsonl",
                   **_kwargs())  # fmt: skip
    assert (tmp_path / "l.jsonl").read_bytes() == logged
    assert not (tmp_path / "new").exists()


class Poisoned(TaskSet):
    """An endless task set whose task ``bad`` has a NaN train target."""

    def __init__(self, base: TaskSet, bad: int) -> None:
        super().__init__(seed=base.seed, length=None)
        self.base, self.bad = base, bad

    def sample(self, generator):
        return self.base.sample(generator)

    def __getitem__(self, index):
        task = self.base[index]
        if index != self.bad:
            return task
        x, y = task.train
        y = y.clone()
        y[1] = float("nan")
        return Task((x, y), task.val)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_nan_names_step_and_task_and_no_poisoned_checkpoint_is_written(tmp_path, batching):
    omega, opt = _omega()
    tasks = Poisoned(TASKS, bad=2 * 3 + 1)  # step 2, second task of the meta-batch
    with pytest.raises(NonFiniteError, match="outer step 2") as info:
        meta_train(omega, tasks, opt, steps=6, batching=batching, checkpoint_dir=tmp_path, keep_last=None,
                   log_path=tmp_path / "log.jsonl", **_kwargs(checkpoint_every=1))  # fmt: skip
    err = info.value
    assert err.step == 2 and err.task == 7 and err.inner_step == 0
    assert "task-set index 7" in str(err)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    assert [r["step"] for r in _rows(tmp_path / "log.jsonl", "train")] == [0, 1]
    saved, _ = _omega(model_seed=9)
    load_checkpoint(checkpoint_path(tmp_path, 2), omega=saved)
    assert all(torch.equal(p, q) for p, q in zip(saved.parameters(), omega.parameters(), strict=True))


def test_an_outer_step_that_makes_omega_infinite_is_caught(tmp_path):
    omega, _ = _omega()
    opt = torch.optim.SGD(omega.parameters(), lr=float("inf"))
    with pytest.raises(NonFiniteError, match="outer step 0.*NaN/Inf") as info:
        meta_train(omega, TASKS, opt, steps=3, checkpoint_dir=tmp_path, **_kwargs(checkpoint_every=1))
    assert info.value.step == 0
    assert list_checkpoints(tmp_path) == []


def test_keep_last_and_callback_stop(tmp_path):
    omega, opt = _omega()
    seen = []

    def stop_after_step_4(step, row, val_row):
        seen.append((step, val_row is not None))
        return step == 4

    result = meta_train(omega, TASKS, opt, steps=10, checkpoint_dir=tmp_path, keep_last=2, callback=stop_after_step_4,
                        **_kwargs(checkpoint_every=3))  # fmt: skip
    assert result.steps == 5 and seen == [(0, False), (1, True), (2, False), (3, True), (4, False)]
    # the stopped run's last state is validated too (step 4 was not a validation step)
    assert [v["step"] for v in result.validations] == [1, 3, 4]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 5]
    assert result.last_checkpoint == checkpoint_path(tmp_path, 5)


def test_step_batches_are_fixed_by_the_step_index():
    finite = list(Sinusoid(3, 3, seed=2, length=5))
    batch = batch_for_step(finite, 1, 3)  # tasks 3, 4 and (wrapping) 0
    expected = stack_tasks([finite[3], finite[4], finite[0]])
    assert torch.equal(batch.train[0], expected.train[0]) and torch.equal(batch.val[1], expected.val[1])
    endless = batch_for_step(TASKS, 4, 3)
    assert torch.equal(endless.train[1], TASKS.batch(range(12, 15)).train[1])


def test_resuming_a_finished_run_does_nothing(tmp_path):
    omega, opt = _omega()
    meta_train(omega, TASKS, opt, steps=2, checkpoint_dir=tmp_path, **_kwargs())
    other, other_opt = _omega(model_seed=4)
    result = meta_train(other, TASKS, other_opt, steps=2, checkpoint_dir=tmp_path, **_kwargs())
    assert result.resumed_from == 2 and result.history == []
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), omega.parameters(), strict=True))


def test_meta_train_drives_the_schedules_of_parts_by_outer_step():
    from metalearn.knowledge import InnerSGD, MomentumSGD, OptimizerMixture
    from metalearn.knowledge.optimizers import geometric_anneal

    torch.manual_seed(0)
    schedule = geometric_anneal(2.0, 0.5, 4)
    mixture = OptimizerMixture({"sgd": InnerSGD(0.01), "momentum": MomentumSGD(0.01, 0.5)}, anneal=schedule)
    omega = MetaKnowledge(MLP((1, 8, 1)), optimizer=mixture)
    seen = []
    meta_train(
        omega, TASKS, torch.optim.Adam(omega.parameters(), 1e-3), steps=6, inner_steps=1,
        meta_batch_size=2, progress=False, callback=lambda step, row, val: seen.append(mixture.temperature),
    )
    assert seen == [schedule(s) for s in range(6)]
    assert seen[0] == 2.0 and seen[-1] == 0.5


def test_an_annealed_mixture_resumes_bit_identically(tmp_path):
    from metalearn.knowledge import InnerSGD, MomentumSGD, OptimizerMixture
    from metalearn.knowledge.optimizers import geometric_anneal

    def build():
        torch.manual_seed(0)
        mixture = OptimizerMixture(
            {"sgd": InnerSGD(0.01), "momentum": MomentumSGD(0.01, 0.5)}, anneal=geometric_anneal(2.0, 0.5, 4)
        )
        omega = MetaKnowledge(MLP((1, 8, 1)), optimizer=mixture)
        return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)

    kw = _kwargs(val_tasks=None)
    omega_a, opt_a = build()
    meta_train(omega_a, TASKS, opt_a, steps=6, checkpoint_dir=tmp_path / "a", **kw)
    omega_b, opt_b = build()
    meta_train(omega_b, TASKS, opt_b, steps=3, checkpoint_dir=tmp_path / "b", **kw)
    omega_c, opt_c = build()  # temperature back at 2.0: the checkpoint (T after step 2) must be accepted
    meta_train(omega_c, TASKS, opt_c, steps=6, checkpoint_dir=tmp_path / "b", **kw)
    _assert_same_run(omega_a, opt_a, omega_c, opt_c)
    assert omega_c.optimizer.temperature == omega_a.optimizer.temperature == 0.5


def test_implicit_mode_validates_on_the_proximal_objective(tmp_path):
    """iMAML meta-trains for the proximal inner problem, so its validation fine-tunes on it too."""
    from metalearn.modes import Implicit

    torch.manual_seed(0)
    omega = maml(MLP((1, 8, 8, 1)), lr=0.05)
    outer = torch.optim.Adam(omega.parameters(), lr=1e-2)
    log = tmp_path / "log.jsonl"
    kw = _kwargs(inner_steps=4, checkpoint_every=100, log_path=log)
    meta_train(omega, TASKS, outer, steps=2, mode=Implicit(lam=3.0), **kw)
    (val,) = _rows(log, "val")
    proximal = evaluate(omega, VAL, 4, seed=5, mode=Implicit(lam=3.0))
    plain = evaluate(omega, VAL, 4, seed=5)
    assert val["mean"] == pytest.approx(proximal.mean, rel=1e-9)
    assert val["mean"] != pytest.approx(plain.mean, rel=1e-6)
