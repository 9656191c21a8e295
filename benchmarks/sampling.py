"""Task sampling speed: tasks indexed one by one against whole batches, side by side.

Usage::

    python benchmarks/sampling.py                                  # synthetic Omniglot-shaped data
    python benchmarks/sampling.py --omniglot ../shared/data/omniglot   # the real zips
    python benchmarks/sampling.py --sinusoid-tasks 2000 --episodes 640   # a quick check

One process, torch on one thread, glibc's allocator tuned as ``benchmarks/meta_iteration.py``
tunes it (``--no-tune-malloc`` keeps the defaults). For each workload it times the meta-batches of a training
run (``--batch-size`` tasks per batch; the first batch is timed apart and left out):

- **indexing**: ``stack_tasks([taskset[i] for i in batch])``, each task on its own;
- **batched**: ``taskset.batch(range(...))``, the whole batch in a few tensor operations (what
  ``meta_train`` uses), the same tasks bit for bit (checked on the first batches).
- **batched (torch draws)** (Omniglot): the batched path with its random words in torch's int64
  arithmetic (what another device runs) instead of numpy's, the same tasks: what the host arithmetic saves.
- **batched, N threads** (Omniglot, for information, on a machine of N > 1 cores): the batched path with
  torch on every core, as a training run samples by default; the gather (``index_select`` of 2560
  images, 8 MiB) is bound by memory bandwidth on one core. The targets are judged on one thread.

Workloads: MAML's sinusoid (10 + 10 points), and Omniglot 5-way 1-shot 15-query episodes
from the 1200 source characters without rotations, with the dataset read through
``Omniglot.gather`` (uint8 -> float per batch) and cached decoded (``cache="decoded"``:
float32, one ``index_select`` per batch). Without ``--omniglot`` the Omniglot data is synthetic:
random ``uint8`` images of the real shapes (1623 classes x 20 images x 1 x 28 x 28), decoded
as Omniglot decodes them, so the timing is the real one without the dataset. ``--device cuda``
adds the batched path on that device (inputs cached there as ``uint8``).

Targets (issue 13): >= 200,000 sinusoid tasks/s and >= 25,000 Omniglot 5w1s15q episodes/s,
batched, in one process on one thread. With ``--omniglot`` the dataset's cold and warm load
times are reported too (its cache in a temporary folder, never in the dataset's folder).
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn.tasks import EpisodicTaskSet, LabelledDataset, Sinusoid, TaskBatch, TaskSet, stack_tasks  # noqa: E402
from metalearn.tasks.datasets import uint8_to_unit  # noqa: E402
from metalearn.tasks.draws import TaskDraws  # noqa: E402
from metalearn.tasks.omniglot import Omniglot  # noqa: E402

#: glibc thresholds that keep large freed blocks in the heap (as `benchmarks/meta_iteration.py` runs):
#: with the defaults every episode batch (8 MiB of images) is mmap'ed and page-faulted afresh
TUNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"
_REEXEC_MARK = "METALEARN_SAMPLING_REEXEC"
TARGETS = {"sinusoid": 200_000.0, "omniglot_5w1s15q": 25_000.0}
OMNIGLOT_SHAPE = (1623, 20, 28)  # classes, images per class, side after the resize


class SyntheticOmniglot(LabelledDataset):
    """Random ``uint8`` ink of Omniglot's shapes, stored and decoded as `Omniglot` does."""

    def __init__(self, n_classes: int, per_class: int, side: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        shape = (n_classes * per_class, 1, side, side)
        self.images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        self.labels = torch.arange(n_classes).repeat_interleave(per_class)

    def get_input(self, index: int) -> torch.Tensor:
        return uint8_to_unit(self.images[index : index + 1])[0]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return uint8_to_unit(self.images.index_select(0, torch.as_tensor(indices)))

    def stored_inputs(self):
        return self.images, uint8_to_unit


def indexing(taskset: TaskSet) -> Callable[[range], TaskBatch]:
    return lambda indices: stack_tasks([taskset[i] for i in indices])


def batched(taskset: TaskSet) -> Callable[[range], TaskBatch]:
    return taskset.batch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(make: Callable[[range], TaskBatch], n_tasks: int, batch_size: int, device: str = "cpu") -> dict:
    """Tasks per second over ``n_tasks`` tasks (whole batches) after a first batch timed apart."""
    start = time.perf_counter()
    make(range(batch_size))
    sync(device)
    first_s = time.perf_counter() - start
    n_batches = max(1, n_tasks // batch_size)
    start = time.perf_counter()
    batch = None
    for b in range(1, n_batches + 1):
        # the previous batch is alive while the next is made, as in a training loop
        batch = make(range(b * batch_size, (b + 1) * batch_size))  # noqa: F841
    sync(device)
    seconds = time.perf_counter() - start
    tasks = n_batches * batch_size
    return {"tasks": tasks, "seconds": seconds, "tasks_per_s": tasks / seconds, "first_batch_s": first_s}


def torch_draws(taskset: TaskSet) -> Callable[[range], TaskBatch]:
    """The batched path with the draws in torch's int64 arithmetic (what a non-CPU device runs) instead of
    numpy's: the same tasks, to see what the host arithmetic of the CPU path saves."""
    return lambda indices: taskset.sample_batch(TaskDraws.of(taskset.seed, indices, numpy=False))


def check_same(a: TaskSet, b: TaskSet, batch_size: int) -> None:
    """Raises if the batched path's first batches differ from indexing (they must not, bit for bit)."""
    for b_index in range(3):
        indices = range(b_index * batch_size, (b_index + 1) * batch_size)
        one, other = indexing(a)(indices), batched(b)(indices)
        for x, y in zip((*one.train, *one.val), (*other.train, *other.val), strict=True):
            if not torch.equal(x, y.cpu()):
                raise AssertionError(f"batch {b_index}: the batched tasks differ from the indexed ones")


def workloads(args: argparse.Namespace, data: LabelledDataset, source: torch.Tensor) -> list[dict]:
    def episodes(**kw) -> EpisodicTaskSet:
        return EpisodicTaskSet(data, 5, 1, 15, classes=source, seed=0, length=None, **kw)

    sinusoid = Sinusoid(10, 10, seed=0, length=None)
    plain, decoded = episodes(), episodes(cache="decoded")
    check_same(sinusoid, sinusoid, args.sinusoid_batch)
    check_same(plain, decoded, args.batch_size)
    runs = [
        ("sinusoid", "indexing", indexing(sinusoid), args.sinusoid_tasks // 10, args.sinusoid_batch, "cpu"),
        ("sinusoid", "batched", batched(sinusoid), args.sinusoid_tasks, args.sinusoid_batch, "cpu"),
        ("omniglot_5w1s15q", "indexing", indexing(plain), args.episodes // 4, args.batch_size, "cpu"),
        ("omniglot_5w1s15q", "batched (gather)", batched(plain), args.episodes, args.batch_size, "cpu"),
        ("omniglot_5w1s15q", "batched", batched(decoded), args.episodes, args.batch_size, "cpu"),
        ("omniglot_5w1s15q", "batched (torch draws)", torch_draws(decoded), args.episodes, args.batch_size, "cpu"),
    ]
    if args.device != "cpu":
        on_device = episodes(device=args.device)
        check_same(plain, on_device, args.batch_size)
        runs.append(("sinusoid", f"batched {args.device}", batched(sinusoid.to(args.device)), args.sinusoid_tasks,
                     args.sinusoid_batch, args.device))  # fmt: skip
        runs.append(("omniglot_5w1s15q", f"batched {args.device}", batched(on_device), args.episodes,
                     args.batch_size, args.device))  # fmt: skip
    results = []
    for workload, path, make, n_tasks, batch_size, device in runs:
        r = rate(make, n_tasks, batch_size, device)
        results.append({"workload": workload, "path": path, "batch_size": batch_size, "threads": 1, **r})
    threads = os.cpu_count() or 1
    if threads > 1:  # for information: a training run samples with torch's default threads (every core)
        torch.set_num_threads(threads)
        try:
            r = rate(batched(decoded), args.episodes, args.batch_size)
        finally:
            torch.set_num_threads(1)
        results.append({"workload": "omniglot_5w1s15q", "path": f"batched, {threads} threads",
                        "batch_size": args.batch_size, "threads": threads, **r})  # fmt: skip
    return results


def malloc_setting(args: argparse.Namespace) -> str:
    """Re-executes this script under the tuned allocator if needed; returns the setting in use."""
    current = os.environ.get("GLIBC_TUNABLES")
    if args.no_tune_malloc or current == TUNED_MALLOC:
        return f"GLIBC_TUNABLES={current}" if current else "glibc defaults"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "allocator defaults (not glibc: nothing to tune)"
    if os.environ.get(_REEXEC_MARK):
        raise RuntimeError("re-executing with GLIBC_TUNABLES did not take effect")
    env = dict(os.environ, GLIBC_TUNABLES=TUNED_MALLOC, OMP_NUM_THREADS="1", **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise AssertionError("unreachable")


def load_omniglot(root: Path) -> tuple[Omniglot, dict]:
    with tempfile.TemporaryDirectory(prefix="omniglot_cache_") as cache_dir:
        start = time.perf_counter()
        data = Omniglot(root, split="all", cache_dir=Path(cache_dir))
        cold = time.perf_counter() - start
        warm = []
        for _ in range(3):
            start = time.perf_counter()
            Omniglot(root, split="all", cache_dir=Path(cache_dir))
            warm.append(time.perf_counter() - start)
    return data, {"cold_load_s": cold, "warm_load_s": min(warm), "warm_load_all_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--omniglot", type=Path, default=None, help="folder with the Omniglot zips (else synthetic)")
    parser.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default allocator thresholds")
    parser.add_argument("--sinusoid-tasks", type=int, default=200_000, help="sinusoid tasks timed (batched path)")
    parser.add_argument("--sinusoid-batch", type=int, default=25, help="sinusoid tasks per batch (MAML's 25)")
    parser.add_argument("--episodes", type=int, default=32_768, help="Omniglot episodes timed (batched paths)")
    parser.add_argument("--batch-size", type=int, default=32, help="Omniglot episodes per batch")
    parser.add_argument("--device", default="cpu", help="also time the batched path on this device (e.g. cuda)")
    args = parser.parse_args()
    for name in ("sinusoid_tasks", "sinusoid_batch", "episodes", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device != "cpu" and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; leave --device out")
    allocator = malloc_setting(args)
    torch.set_num_threads(1)

    loads: dict = {}
    if args.omniglot is not None:
        data, loads = load_omniglot(args.omniglot)
        source = data.few_shot_split().source
        described = f"Omniglot at {args.omniglot}: {len(data)} images"
    else:
        n_classes, per_class, side = OMNIGLOT_SHAPE
        data = SyntheticOmniglot(n_classes, per_class, side)
        source = torch.arange(1200)
        described = f"synthetic Omniglot-shaped uint8 data: {n_classes} classes x {per_class} x 1x{side}x{side}"
    results = workloads(args, data, source)

    print(described + f"; 5w1s15q episodes from 1200 source classes; torch threads: 1; allocator: {allocator}")
    if loads:
        print(f"cold load {loads['cold_load_s']:.2f} s, warm load {loads['warm_load_s']:.3f} s (best of 3)")
    print(f"{'workload':<18} {'path':<21} {'batch':>5} {'tasks':>8} {'tasks/s':>11} {'first batch s':>14}")
    for r in results:
        print(
            f"{r['workload']:<18} {r['path']:<21} {r['batch_size']:>5} {r['tasks']:>8} "
            f"{r['tasks_per_s']:>11.0f} {r['first_batch_s']:>14.4f}"
        )
    summary = {}
    for workload, target in TARGETS.items():
        index = next(r for r in results if r["workload"] == workload and r["path"] == "indexing")
        batch = next(r for r in results if r["workload"] == workload and r["path"] == "batched")
        ratio = batch["tasks_per_s"] / index["tasks_per_s"]
        met = batch["tasks_per_s"] >= target
        summary[workload] = {"indexing": index["tasks_per_s"], "batched": batch["tasks_per_s"], "ratio": ratio,
                             "target": target, "met": met}  # fmt: skip
        print(
            f"{workload}: batched {batch['tasks_per_s']:.0f}/s vs indexing {index['tasks_per_s']:.0f}/s = "
            f"{ratio:.1f}x; target >= {target:.0f}/s {'met' if met else 'NOT met'}"
        )
    print(
        json.dumps(
            {
                "benchmark": "sampling",
                "data": str(args.omniglot) if args.omniglot else "synthetic",
                **loads,
                "summary": summary,
                "results": results,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "torch_threads": torch.get_num_threads(),
                "allocator": allocator,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
