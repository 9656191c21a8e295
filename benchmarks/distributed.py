"""Throughput of meta-training on 1 vs 2 ranks (torch.distributed, gloo, one thread each).

Usage::

    python benchmarks/distributed.py [--quick] [--steps N] [--no-tune-malloc]

Workload: `metalearn.models.Conv4` (64 filters, its batch norm with batch statistics) on
Omniglot-shaped 5-way 1-shot 15-query tasks of random tensors (train x ``[32, 5, 1, 28, 28]``,
val x ``[32, 75, 1, 28, 28]``), meta-batch 32, 1 inner SGD step (α=0.4), second-order MAML,
one outer Adam step per meta-iteration, float32.

- 1 rank: `metalearn.meta_step` on the whole meta-batch, in one process;
- 2 ranks: `metalearn.distributed.sharded_meta_step`, each rank on its 16 tasks, one all-reduce
  of the meta-gradient per step, gloo over 127.0.0.1.

Each configuration runs in fresh processes (launched here with torchrun's environment variables,
``OMP_NUM_THREADS=1``), warms up for one step, then times ``--steps`` steps. Reported per
configuration (median over the timed steps, of rank 0): seconds per step, tasks per second,
seconds in communication per step (the wall time of the step's all-reduce, waiting for the
slower rank included) and bytes reduced per step (the meta-gradient buffer plus the statistics);
then the 2-rank/1-rank throughput ratio and communication as a share of the step. Targets
(issue 12): throughput ratio >= 1.8, communication <= 5% of the step.

Both configurations run under the same allocator setting: ``GLIBC_TUNABLES`` set to
`TUNED_MALLOC` (large CPU tensors stay mapped, see FINDINGS) unless ``--no-tune-malloc``; it is
printed. On a 2-core machine the 2-rank run uses both cores, so other load on the machine hits it
harder than the 1-rank run: run it on a quiet machine. ``--quick`` (a few seconds: meta-batch 4,
16 filters, 2 steps) is a smoke run whose figures mean nothing. The last line printed is one JSON
object with all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TUNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"
THROUGHPUT_TARGET = 1.8
COMMUNICATION_TARGET = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 8; quick 2)")
    p.add_argument("--no-tune-malloc", action="store_true", help="glibc's default allocator thresholds")
    p.add_argument("--worker", nargs=2, metavar=("SETTINGS_JSON", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 2 if args.quick else 8
    return args


def settings(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"meta_batch": 4, "hidden": 16, "ways": 5, "shots": 1, "queries": 15, "steps": args.steps}
    return {"meta_batch": 32, "hidden": 64, "ways": 5, "shots": 1, "queries": 15, "steps": args.steps}


# -- one rank -----------------------------------------------------------------------------------------------


def worker(config: dict, out: Path) -> None:
    """Runs on every rank: warm-up, then the timed steps; rank 0 writes the figures to ``out``."""
    import torch

    from metalearn import Conv4, InnerSGD, MetaKnowledge, TaskBatch, meta_step
    from metalearn.distributed import open_shard, sharded_meta_step, slice_for_rank

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shard = open_shard(True, torch.device("cpu")) if world > 1 else None
    torch.manual_seed(0)
    omega = MetaKnowledge(Conv4(config["ways"], hidden=config["hidden"]), InnerSGD(0.4))
    outer = torch.optim.Adam(omega.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    b, n_way = config["meta_batch"], config["ways"]
    batch = TaskBatch(
        train=(torch.randn(b, n_way * config["shots"], 1, 28, 28, generator=g),
               torch.arange(n_way).repeat(config["shots"]).expand(b, -1).contiguous()),
        val=(torch.randn(b, n_way * config["queries"], 1, 28, 28, generator=g),
             torch.arange(n_way).repeat(config["queries"]).expand(b, -1).contiguous()),
    )
    mine = batch if shard is None else slice_for_rank(batch, shard)
    lo = 0 if shard is None else shard.bounds(b)[0]

    def step() -> dict:
        if shard is None:
            return meta_step(omega, outer, batch, 1, batching="loop")
        return sharded_meta_step(shard, omega, outer, mine, 1, lo=lo, total=b, batching="loop")

    step()  # warm-up
    rows = []
    for _ in range(config["steps"]):
        began = time.perf_counter()
        stats = step()
        rows.append({"seconds": time.perf_counter() - began, "reduce_seconds": stats.get("reduce_seconds", 0.0),
                     "reduce_bytes": stats.get("reduce_bytes", 0.0)})
    if shard is not None:
        shard.close()
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(rows))


# -- the launcher ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, config: dict, env_extra: dict, folder: Path) -> list[dict]:
    """Launches ``world`` ranks of this script's worker; returns rank 0's timed steps."""
    out = folder / f"world{world}.json"
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(config), str(out)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank of the {world}-rank run failed (exit codes {codes})")
    return json.loads(out.read_text())


def summarise(world: int, rows: list[dict], meta_batch: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in rows)
    comm = statistics.median(r["reduce_seconds"] for r in rows)
    return {
        "ranks": world,
        "seconds_per_step": seconds,
        "tasks_per_second": meta_batch / seconds,
        "communication_seconds_per_step": comm,
        "communication_share": comm / seconds,
        "bytes_reduced_per_step": int(statistics.median(r["reduce_bytes"] for r in rows)),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker[0]), Path(args.worker[1]))
        return {}
    config = settings(args)
    malloc = {} if args.no_tune_malloc else {"GLIBC_TUNABLES": TUNED_MALLOC}
    print(f"Conv-4 (hidden {config['hidden']}), {config['ways']}-way {config['shots']}-shot {config['queries']}-query, "
          f"meta-batch {config['meta_batch']}, 1 inner step, second order; {config['steps']} timed steps; allocator: "
          f"{'GLIBC_TUNABLES=' + TUNED_MALLOC if malloc else 'glibc defaults'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [summarise(w, run_ranks(w, config, malloc, Path(tmp)), config["meta_batch"]) for w in (1, 2)]
    print(f"{'ranks':>5} {'s/step':>8} {'tasks/s':>8} {'comm s/step':>12} {'comm share':>10} {'bytes/step':>11}")
    for r in results:
        print(f"{r['ranks']:>5} {r['seconds_per_step']:>8.3f} {r['tasks_per_second']:>8.2f} "
              f"{r['communication_seconds_per_step']:>12.4f} {r['communication_share']:>10.2%} "
              f"{r['bytes_reduced_per_step']:>11,}")
    ratio = results[1]["tasks_per_second"] / results[0]["tasks_per_second"]
    share = results[1]["communication_share"]
    print(f"throughput 2 ranks / 1 rank: {ratio:.2f}x (target >= {THROUGHPUT_TARGET}x); communication "
          f"{share:.1%} of the 2-rank step (target <= {COMMUNICATION_TARGET:.0%})")
    summary = {"config": config, "allocator": malloc.get("GLIBC_TUNABLES", "glibc defaults"), "results": results,
               "throughput_ratio": ratio, "communication_share": share}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
