"""torch.distributed (gloo, 2 ranks launched here on 127.0.0.1): the sharded meta-gradient, training,
resume and evaluate equal one process; failures stop every rank with the library's error.

The ranks run `tests/distributed_worker.py` under torchrun's environment; each launch runs several
checks (a launch costs seconds; the tests that need one are marked slow). The NCCL path (ω on
``cuda:LOCAL_RANK``) is not tested here: it needs GPUs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import distributed_cases as cases
import pytest
import torch

from metalearn import (
    DistributedError,
    DistributedOptions,
    ResumeEnvironmentWarning,
    evaluate,
    meta_gradient,
    meta_train,
)
from metalearn.checkpoint import list_checkpoints
from metalearn.distributed import drawing_window, shard_bounds
from metalearn.outer import _explained_meta_gradient, _Speed
from metalearn.tasks.task import TaskBatch

pytestmark = pytest.mark.filterwarnings("ignore:iMAML. the proximal inner problem:RuntimeWarning")


def _reports(out, scenario):
    return [torch.load(out / f"{scenario}-rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed-main")
    codes = cases.launch("main", out)
    assert codes == [0, 0], cases.rank_logs(out)
    return out, _reports(out, "main")


# -- without processes: the slicing and the options -------------------------------------------------------


def test_shard_bounds_are_contiguous_uneven_and_cover_the_batch():
    assert [shard_bounds(5, 2, r) for r in range(2)] == [(0, 3), (3, 5)]
    assert [shard_bounds(32, 3, r) for r in range(3)] == [(0, 11), (11, 22), (22, 32)]
    assert [shard_bounds(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]


def test_weighted_slices_of_a_sampled_init_sum_to_the_batch_meta_gradient():
    """The arithmetic of the reduction, in one process: Σ_r (n_r/B) g_r over the slices (θ0 drawn for the
    whole batch and sliced) is the batch's meta-gradient."""
    omega = cases.omega_for("mlp", "gaussian")
    batch = cases.batch_for("mlp")
    meta_gradient(omega, batch, 1, generator=cases.generator())
    expected = cases.flat_grads(omega)
    total = {k: torch.zeros_like(v) for k, v in expected.items()}
    for lo, hi in (shard_bounds(5, 2, r) for r in range(2)):
        omega.zero_grad(set_to_none=True)
        part = TaskBatch(train=tuple(t[lo:hi] for t in batch.train), val=tuple(t[lo:hi] for t in batch.val))
        with drawing_window(omega, lo, len(batch)):
            _explained_meta_gradient(omega, part, 1, False, "auto", cases.generator(), "unrolled", _Speed())
        for k, g in cases.flat_grads(omega).items():
            total[k] += g * (hi - lo) / len(batch)
    for k in expected:
        torch.testing.assert_close(total[k], expected[k], rtol=1e-12, atol=1e-12)
    assert "initial_params" not in vars(omega)  # the window is gone after the block


def test_bad_distributed_options_are_refused_when_built():
    with pytest.raises(ValueError, match="timeout"):
        DistributedOptions(timeout=0)
    with pytest.raises(ValueError, match="check_every"):
        DistributedOptions(check_every=0)
    with pytest.raises(TypeError, match="distributed must be"):
        omega, opt = cases.train_omega()
        meta_train(omega, cases.TRAIN_TASKS, opt, steps=1, inner_steps=1, meta_batch_size=2, distributed="yes",
                   progress=False)


def test_distributed_true_without_a_group_or_torchrun_names_the_fix(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    omega, opt = cases.train_omega()
    before = {k: v.clone() for k, v in omega.state_dict().items()}
    with pytest.raises(ValueError, match="torchrun"):
        meta_train(omega, cases.TRAIN_TASKS, opt, steps=1, checkpoint_dir=tmp_path / "run", distributed=True,
                   **cases.train_settings())
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(before[k], v) for k, v in omega.state_dict().items())


# -- 2 ranks -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", [*(c[0] for c in cases.GRADIENT_CASES), "maml-mlp-one-task"])
def test_two_rank_meta_gradient_equals_one_process(main_run, name):
    _, reports = main_run
    kind, method = next(((k, m) for n, k, m in cases.GRADIENT_CASES if n == name), ("mlp", "maml"))
    omega = cases.omega_for(kind, method)
    batch = cases.batch_for(kind)
    if name.endswith("one-task"):  # rank 1 has no task at all
        batch = TaskBatch(train=(batch.train[0][:1], batch.train[1][:1]), val=(batch.val[0][:1], batch.val[1][:1]))
    stats = meta_gradient(omega, batch, 1, generator=cases.generator(), mode=cases.mode_for(method))
    expected = cases.flat_grads(omega)
    rank0, rank1 = (r["gradients"][name] for r in reports)
    assert rank0["grads"].keys() == expected.keys() == rank1["grads"].keys()
    for k, g in expected.items():
        assert torch.equal(rank0["grads"][k], rank1["grads"][k]), k  # every rank steps with the same bits
        torch.testing.assert_close(rank0["grads"][k], g, rtol=1e-12, atol=1e-12)
    assert rank0["meta_loss"] == pytest.approx(stats.meta_loss, rel=1e-12)


@pytest.mark.slow
def test_a_nan_on_one_rank_raises_on_every_rank_and_changes_nothing(main_run):
    _, reports = main_run
    for report in reports:
        kind, task, message, unchanged = report["gradients"]["nan-on-rank-1"]
        assert kind == "NonFiniteError" and task == 4, message
        assert "rank 1" in message and unchanged


@pytest.mark.slow
def test_two_rank_training_keeps_omega_identical_and_follows_one_process(main_run):
    out, reports = main_run
    rank0, rank1 = (r["training"] for r in reports)
    for k, v in rank0["omega"].items():
        assert torch.equal(v, rank1["omega"][k]), k
    untimed = [[{k: v for k, v in row.items() if k != "reduce_seconds"} for row in r["history"]]
               for r in (rank0, rank1)]
    assert untimed[0] == untimed[1] and rank0["validations"] == rank1["validations"]
    omega, opt = cases.train_omega()
    result = meta_train(omega, cases.TRAIN_TASKS, opt, steps=6, **cases.train_settings())
    for k, v in omega.state_dict().items():  # same tasks, same noise; only the order of the sums differs
        torch.testing.assert_close(rank0["omega"][k], v, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(rank0["history"], result.history, strict=True):
        assert mine["meta_loss"] == pytest.approx(theirs["meta_loss"], rel=1e-4)
    # rank 0 wrote the log (one line per step and validation) and the last two checkpoints
    lines = [json.loads(line) for line in (out / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(6))
    assert [step for step, _ in list_checkpoints(out / "full")] == [4, 6]


@pytest.mark.slow
def test_distributed_evaluate_equals_one_process_exactly(main_run):
    _, reports = main_run
    omega, _ = cases.train_omega()
    omega.load_state_dict(reports[0]["training"]["omega"])
    single = evaluate(omega, cases.evaluation_tasks(), 2, batch_size=2)
    for report in reports:
        mean, ci95, per_task, per_task_loss = report["training"]["evaluation"]
        assert torch.equal(per_task, single.per_task) and torch.equal(per_task_loss, single.per_task_loss)
        assert (mean, ci95) == (single.mean, single.ci95)


@pytest.fixture(scope="module")
def resumed_run(main_run):
    out, _ = main_run
    codes = cases.launch("killed", out)
    assert codes == [3, 3], cases.rank_logs(out)  # both ranks killed after step 3
    assert [step for step, _ in list_checkpoints(out / "killed")] == [2]
    codes = cases.launch("resumed", out)
    assert codes == [0, 0], cases.rank_logs(out)
    return _reports(out, "resumed"), torch.load(out / "early-exit-rank0.pt", weights_only=False)


@pytest.mark.slow
def test_killed_two_rank_run_resumes_to_the_uninterrupted_run(main_run, resumed_run):
    _, reports = main_run
    uninterrupted = reports[0]["training"]["omega"]
    for report in resumed_run[0]:
        assert report["resumed_from"] == 2
        for k, v in uninterrupted.items():
            assert torch.equal(report["omega"][k], v), k


@pytest.mark.slow
def test_a_rank_that_exits_early_makes_the_other_raise_distributed_error(resumed_run):
    # bounded in time: rank 0 hanging would have run the launch into its timeout and failed the fixture
    kind, message, _seconds = resumed_run[1]["early_exit"]
    assert kind == DistributedError.__name__, message
    assert "rank 0 of 2" in message and "checkpoint" in message



@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process_with_a_warning(main_run, tmp_path):
    out, reports = main_run
    run_dir = tmp_path / "run"
    shutil.copytree(out / "full", run_dir)
    omega, opt = cases.train_omega()
    with pytest.warns(ResumeEnvironmentWarning, match="world size 2 in the checkpoint, 1 now"):
        result = meta_train(omega, cases.TRAIN_TASKS, opt, steps=7, checkpoint_dir=run_dir,
                            log_path=run_dir / "log.jsonl", **cases.train_settings())
    assert result.resumed_from == 6 and result.steps == 7


@pytest.mark.slow
def test_the_omniglot_example_runs_under_torchrun(tmp_path):
    from omniglot_fixture import write_omniglot

    root, run_dir = tmp_path / "omniglot", tmp_path / "run"
    write_omniglot(root)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(cases.ROOT / "examples" / "omniglot.py"), "--root", str(root), "--run-dir", str(run_dir),
               "--smoke", "--no-progress", "--ways", "2", "--n-source", "7", "--n-val", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=cases.child_environment())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("meta-test accuracy") == 1  # rank 0 alone prints
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["iterations"] == 4 and summary["test_tasks"] == 10
    assert [step for step, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4]
