"""Logger objects of `meta_train` (``loggers=[...]``), labelled progress bars, `scalars_of`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metalearn import MLP, CallbackLogger, JsonlLogger, Logger, Sinusoid, TensorBoardLogger, evaluate, maml, meta_train
from metalearn.train import TrainConfig, scalars_of
from metalearn.train.loggers import check_loggers


def _omega():
    torch.manual_seed(0)
    return maml(MLP((1, 8, 1)), lr=0.01)


def _train(omega, steps, **kw):
    return meta_train(
        omega, Sinusoid(3, 3, seed=0, length=None), torch.optim.Adam(omega.parameters(), 1e-3),
        steps=steps, inner_steps=1, meta_batch_size=2, progress=False, **kw,
    )


class Recorder(Logger):
    def __init__(self):
        self.calls = []

    def open(self, start):
        self.calls.append(("open", start))

    def log(self, row):
        self.calls.append(("log", row["kind"], row["step"]))

    def close(self):
        self.calls.append(("close",))


def test_every_row_reaches_every_logger_in_order_between_open_and_close(tmp_path):
    rows, rec = [], Recorder()
    val = Sinusoid(3, 5, seed=1, length=4)
    result = _train(_omega(), 4, val_tasks=val, val_every=2, loggers=[rec, rows.append],
                    log_path=tmp_path / "log.jsonl")
    expected = [("log", "train", 0), ("log", "train", 1), ("log", "val", 1),
                ("log", "train", 2), ("log", "train", 3), ("log", "val", 3)]
    assert rec.calls == [("open", 0), *expected, ("close",)]
    # the callable got the very rows of the result and of the JSONL file
    assert [r for r in rows if r["kind"] == "train"] == result.history
    assert [r for r in rows if r["kind"] == "val"] == result.validations
    on_disk = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert on_disk == rows


def test_loggers_are_closed_when_the_run_raises():
    rec = Recorder()

    def stop(step, row, val_row):
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(_omega(), 4, loggers=[rec], callback=stop)
    assert rec.calls[0] == ("open", 0) and rec.calls[-1] == ("close",)
    assert [c for c in rec.calls if c[0] == "log"] == [("log", "train", 0), ("log", "train", 1)]


def test_a_resumed_run_opens_its_loggers_at_the_checkpoint_step(tmp_path):
    rec = Recorder()
    _train(_omega(), 2, checkpoint_dir=tmp_path / "ck", checkpoint_every=2)
    _train(_omega(), 3, checkpoint_dir=tmp_path / "ck", checkpoint_every=2, loggers=[rec])
    assert rec.calls == [("open", 2), ("log", "train", 2), ("close",)]


@pytest.mark.parametrize("bad", [Recorder(), "log.jsonl", 3, [Recorder(), 3]])
def test_bad_loggers_are_refused_before_any_file_is_written(tmp_path, bad):
    with pytest.raises(TypeError, match="Logger"):
        _train(_omega(), 2, loggers=bad, checkpoint_dir=tmp_path / "ck", log_path=tmp_path / "log.jsonl")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "log.jsonl").exists()


def test_check_loggers_wraps_callables():
    out = check_loggers([print, Recorder()])
    assert isinstance(out[0], CallbackLogger) and out[0].fn is print and isinstance(out[1], Recorder)
    assert check_loggers(None) == []
    with pytest.raises(TypeError, match="callable"):
        CallbackLogger(3)


def test_jsonl_logger_writes_what_log_path_writes(tmp_path):
    _train(_omega(), 3, log_path=tmp_path / "a.jsonl")
    _train(_omega(), 3, loggers=[JsonlLogger(tmp_path / "b.jsonl")])
    a = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "time"} for r in a] == [
        {k: v for k, v in r.items() if k != "time"} for r in b
    ]


def test_scalars_of_names_the_numbers_and_leaves_out_the_rest():
    train = {"kind": "train", "step": 4, "meta_loss": 1.5, "batching": "vmap", "grad_norm": None,
             "val_metric": float("nan"), "time": 0.25, "flag": True}
    assert scalars_of(train) == {"train/meta_loss": 1.5, "train/seconds_per_step": 0.25}
    val = {"kind": "val", "step": 4, "metric": "accuracy", "mean": 0.5, "ci95": 0.1, "n": 10, "time": 2.0}
    assert scalars_of(val) == {"val/accuracy": 0.5, "val/accuracy_ci95": 0.1, "val/seconds": 2.0}


def _events(log_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logger_writes_the_scalars_of_each_row(tmp_path):
    pytest.importorskip("tensorboard")
    val = Sinusoid(3, 5, seed=1, length=4)
    result = _train(_omega(), 4, val_tasks=val, val_every=2, loggers=[TensorBoardLogger(tmp_path / "tb")])
    events = _events(tmp_path / "tb")
    assert [s for s, _ in events["train/meta_loss"]] == [0, 1, 2, 3]
    for (step, value), row in zip(events["train/meta_loss"], result.history, strict=True):
        assert step == row["step"] and math.isclose(value, row["meta_loss"], rel_tol=1e-6)
    assert [s for s, _ in events["val/mse"]] == [1, 3]
    assert math.isclose(events["val/mse"][-1][1], result.validations[-1]["mean"], rel_tol=1e-6)
    assert {"train/grad_norm", "train/inner_loss_first", "train/seconds_per_step", "val/mse_ci95"} <= set(events)


def test_tensorboard_after_resume_holds_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    ck = tmp_path / "ck"

    def die_at_3(step, row, val_row):
        if step == 3:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # steps 0-3 logged, checkpoint after step 2
        _train(_omega(), 5, checkpoint_dir=ck, checkpoint_every=2, callback=die_at_3,
               loggers=[TensorBoardLogger(tmp_path / "tb")])
    result = _train(_omega(), 5, checkpoint_dir=ck, checkpoint_every=2, loggers=[TensorBoardLogger(tmp_path / "tb")])
    events = _events(tmp_path / "tb")["train/meta_loss"]
    assert [s for s, _ in events] == [0, 1, 2, 3, 4]  # the killed run's step 3 was purged, not doubled
    for (step, value), row in zip(events[2:], result.history, strict=True):
        assert step == row["step"] and math.isclose(value, row["meta_loss"], rel_tol=1e-6)


def test_tensorboard_logger_of_a_refused_run_writes_nothing(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(ValueError):
        _train(_omega(), 2, loggers=[TensorBoardLogger(tmp_path / "tb")], clip_grad_norm=-1.0)
    assert not (tmp_path / "tb").exists()


def test_progress_labels_the_bars(capsys):
    omega = _omega()
    _train(omega, 2)  # progress=False: no bar
    assert "meta-train" not in capsys.readouterr().err
    meta_train(omega, Sinusoid(3, 3, seed=0, length=None), torch.optim.Adam(omega.parameters(), 1e-3),
               steps=2, inner_steps=1, meta_batch_size=2, progress="maml K=3")
    assert "maml K=3" in capsys.readouterr().err
    tasks = Sinusoid(3, 5, seed=1, length=3)
    evaluate(omega, tasks, inner_steps=1, progress="meta-test maml")
    err = capsys.readouterr().err
    assert "meta-test maml" in err and "/3 " in err  # labelled, with the task count as total
    evaluate(omega, tasks, inner_steps=1)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", [1, None, 0.5])
def test_bad_progress_values_are_refused(bad):
    with pytest.raises(TypeError, match="progress"):
        TrainConfig(steps=1, inner_steps=1, meta_batch_size=1, progress=bad)
    with pytest.raises(TypeError, match="progress"):
        evaluate(_omega(), Sinusoid(3, 3, seed=1, length=2), inner_steps=1, progress=bad)
