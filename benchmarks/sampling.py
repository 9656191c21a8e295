"""Episode sampling speed on the real Omniglot, and the dataset's cold and warm load times.

Usage::

    python benchmarks/sampling.py ../shared/data/omniglot [--tasks 4096] [--batch-size 32]

Measures:

- cold load: `Omniglot(root, split="all")` with an empty cache folder (decodes 32,460 PNGs
  and writes the cache), and warm load: the same call again (reads the cache; best of 3);
- tasks per second for 5-way 1-shot 15-query and 20-way 5-shot 5-query episodes from the
  1200 source characters (`Omniglot.few_shot_split`), no rotation augmentation, through a
  map-style `DataLoader` (``batch_size`` tasks per batch, ``collate_fn=stack_tasks``) with 0
  worker processes and with 2. The first batch (worker start-up included) is timed apart
  and left out of the rate.

The cache goes to a temporary folder, never into ``root``. Torch runs on one thread (as do
DataLoader workers). The last line printed is one JSON object with all the figures.
Target: at least 2000 tasks/s for 5w1s15q in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn.tasks import EpisodicTaskSet, stack_tasks  # noqa: E402
from metalearn.tasks.omniglot import Omniglot  # noqa: E402

CONFIGS = (("5w1s15q", 5, 1, 15), ("20w5s5q", 20, 5, 5))
TARGET_5W1S15Q = 2000.0


def time_load(root: Path, cache_dir: Path) -> tuple[Omniglot, float]:
    start = time.perf_counter()
    data = Omniglot(root, split="all", cache_dir=cache_dir)
    return data, time.perf_counter() - start


def tasks_per_second(taskset: EpisodicTaskSet, batch_size: int, workers: int) -> dict:
    loader = DataLoader(
        taskset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=stack_tasks,
        persistent_workers=False,
    )
    start = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    first_batch_s = time.perf_counter() - start
    tasks = 0
    steady = time.perf_counter()
    for batch in iterator:
        tasks += len(batch)
    elapsed = time.perf_counter() - steady
    del iterator
    return {
        "tasks": tasks,
        "seconds": elapsed,
        "tasks_per_s": tasks / elapsed,
        "first_batch_s": first_batch_s,
        "batch_shape_train": list(first.train[0].shape),
        "batch_shape_val": list(first.val[0].shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder with images_background.zip and images_evaluation.zip")
    parser.add_argument("--tasks", type=int, default=4096, help="tasks per measurement, after the first batch")
    parser.add_argument("--batch-size", type=int, default=32, help="tasks per DataLoader batch")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the multi-process run")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="omniglot_cache_") as cache_dir:
        data, cold_s = time_load(args.root, Path(cache_dir))
        warm = [time_load(args.root, Path(cache_dir))[1] for _ in range(3)]
    warm_s = min(warm)
    source = data.few_shot_split().source

    results = []
    for name, ways, shots, queries in CONFIGS:
        length = args.tasks + args.batch_size  # the first batch is timed apart
        taskset = EpisodicTaskSet(data, ways, shots, queries, classes=source, seed=0, length=length)
        for workers in (0, args.workers):
            r = tasks_per_second(taskset, args.batch_size, workers)
            results.append({"config": name, "ways": ways, "shots": shots, "queries": queries, "workers": workers, **r})

    print(f"Omniglot at {args.root}: {len(data)} images, {data.num_classes} classes, image size {data.image_size}")
    print(f"cold load (decode + write cache): {cold_s:8.2f} s")
    print(f"warm load (from cache, best of 3): {warm_s:7.3f} s   (all: {', '.join(f'{w:.3f}' for w in warm)})")
    print()
    print(f"{'episodes':<10} {'workers':>7} {'tasks':>7} {'tasks/s':>10} {'first batch s':>14}")
    for r in results:
        rate, first = r["tasks_per_s"], r["first_batch_s"]
        print(f"{r['config']:<10} {r['workers']:>7} {r['tasks']:>7} {rate:>10.0f} {first:>14.3f}")
    single = next(r for r in results if r["config"] == "5w1s15q" and r["workers"] == 0)
    met = single["tasks_per_s"] >= TARGET_5W1S15Q
    print(f"target >= {TARGET_5W1S15Q:.0f} tasks/s for 5w1s15q in one process: {'met' if met else 'NOT met'}")
    print(
        json.dumps(
            {
                "benchmark": "sampling",
                "root": str(args.root),
                "images": len(data),
                "classes": data.num_classes,
                "source_classes": int(source.numel()),
                "cold_load_s": cold_s,
                "warm_load_s": warm_s,
                "warm_load_all_s": warm,
                "batch_size": args.batch_size,
                "results": results,
                "target_5w1s15q_tasks_per_s": TARGET_5W1S15Q,
                "target_met": met,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "torch_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
