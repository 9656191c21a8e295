"""One rank of the distributed tests, launched by `tests/test_distributed.py` with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): ``python distributed_worker.py SCENARIO OUT``.

Each scenario writes what it computed to ``OUT/<scenario>-rank<r>.pt``; the test compares it with
the same computation in one process. Several checks share one launch (a launch costs seconds)."""

from __future__ import annotations

import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import distributed_cases as cases  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from metalearn import DistributedOptions, evaluate, meta_train  # noqa: E402
from metalearn.distributed import open_shard, sharded_meta_step, slice_for_rank  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="iMAML: the proximal inner problem")  # a 1-step inner loop, on purpose
RANK = int(os.environ["RANK"])


def gradients() -> dict:
    """The reduced meta-gradient of every case (uneven: 5 tasks on 2 ranks), and of one task on 2 ranks."""
    shard = open_shard(None, torch.device("cpu"))  # picks up the group the script initialised
    assert shard is not None and shard.world_size == 2
    out = {}
    for name, kind, method in [*cases.GRADIENT_CASES, ("maml-mlp-one-task", "mlp", "maml")]:
        omega = cases.omega_for(kind, method)
        batch = cases.batch_for(kind)
        if name.endswith("one-task"):
            batch = cases.TaskBatch(
                train=(batch.train[0][:1], batch.train[1][:1]), val=(batch.val[0][:1], batch.val[1][:1])
            )
        lo, _ = shard.bounds(len(batch))
        stats = sharded_meta_step(
            shard, omega, torch.optim.SGD(omega.parameters(), lr=0.0), slice_for_rank(batch, shard), 1,
            lo=lo, total=len(batch), generator=cases.generator(), mode=cases.mode_for(method),
        )
        out[name] = {"grads": cases.flat_grads(omega), "meta_loss": stats["meta_loss"]}
    out["nan-on-rank-1"] = nan_on_one_rank(shard)
    shard.close()
    return out


def nan_on_one_rank(shard) -> tuple:
    """Task 4 (rank 1's) has a NaN target: every rank must raise, naming task 4 of the meta-batch."""
    omega = cases.omega_for("mlp", "maml")
    batch = cases.batch_for("mlp")
    y_val = batch.val[1].clone()
    y_val[4] = float("nan")
    batch = cases.TaskBatch(train=batch.train, val=(batch.val[0], y_val))
    lo, _ = shard.bounds(len(batch))
    before = {k: v.clone() for k, v in omega.state_dict().items()}
    try:
        sharded_meta_step(shard, omega, torch.optim.SGD(omega.parameters(), lr=0.1), slice_for_rank(batch, shard), 1,
                          lo=lo, total=len(batch))
    except Exception as err:
        unchanged = all(torch.equal(before[k], v) for k, v in omega.state_dict().items())
        return type(err).__name__, getattr(err, "task", None), str(err), unchanged
    return None, None, "", False


def training(out_dir: Path) -> dict:
    """An uninterrupted 2-rank run of 6 steps (checkpoints every 2, ω compared every step), then evaluate."""
    omega, opt = cases.train_omega()
    run_dir = out_dir / "full"
    result = meta_train(
        omega, cases.TRAIN_TASKS, opt, steps=6, checkpoint_dir=run_dir, log_path=run_dir / "log.jsonl",
        distributed=DistributedOptions(check_every=1), **cases.train_settings(),
    )
    ev = evaluate(omega, cases.evaluation_tasks(), 2, batch_size=2)
    return {
        "omega": {k: v.clone() for k, v in omega.state_dict().items()},
        "history": [{k: v for k, v in r.items() if k != "time"} for r in result.history],
        "validations": [{k: v for k, v in r.items() if k != "time"} for r in result.validations],
        "evaluation": (ev.mean, ev.ci95, ev.per_task, ev.per_task_loss),
    }


def killed(out_dir: Path) -> None:
    """The same run, killed (both ranks) after step 3, when the checkpoint of step 2 exists."""
    omega, opt = cases.train_omega()

    def die(step, row, val_row):
        if step == 3:
            os._exit(3)

    run_dir = out_dir / "killed"
    meta_train(omega, cases.TRAIN_TASKS, opt, steps=6, checkpoint_dir=run_dir, log_path=run_dir / "log.jsonl",
               callback=die, distributed=True, **cases.train_settings())


def resumed(out_dir: Path) -> dict:
    """The killed run resumed to step 6; then a run whose rank 1 exits early."""
    omega, opt = cases.train_omega()
    run_dir = out_dir / "killed"
    result = meta_train(omega, cases.TRAIN_TASKS, opt, steps=6, checkpoint_dir=run_dir,
                        log_path=run_dir / "log.jsonl", distributed=True, **cases.train_settings())
    report = {"omega": {k: v.clone() for k, v in omega.state_dict().items()}, "resumed_from": result.resumed_from}
    torch.save(report, out_dir / f"resumed-rank{RANK}.pt")  # before rank 1 leaves below

    def leave(step, row, val_row):
        if RANK == 1 and step == 1:
            os._exit(0)  # rank 1 leaves without a word

    omega, opt = cases.train_omega()
    began = time.monotonic()
    try:
        meta_train(omega, cases.TRAIN_TASKS, opt, steps=4, callback=leave,
                   distributed=DistributedOptions(timeout=20.0), **cases.train_settings(val_tasks=None))
        return {"early_exit": None}
    except Exception as err:
        return {"early_exit": (type(err).__name__, str(err), time.monotonic() - began)}


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "main":
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        report = {"gradients": gradients(), "training": training(out_dir)}
    elif scenario == "killed":
        killed(out_dir)
        report = {}
    elif scenario == "resumed":
        report = resumed(out_dir)
        scenario = "early-exit"
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    torch.save(report, out_dir / f"{scenario}-rank{RANK}.pt")
    sys.stdout.flush()
    if scenario == "early-exit":
        os._exit(0)  # rank 1 is gone: tearing the group down would wait for it
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
