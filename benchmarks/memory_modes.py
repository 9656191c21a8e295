"""Peak memory of one meta-iteration against the number of inner steps K, per meta-gradient mode.

Usage::

    python benchmarks/memory_modes.py [--quick] [--tasks 4] [--steps 1 5 10 20] [--device cpu|cuda]

Workload: `metalearn.models.Conv4` (its `BatchNorm`) on Omniglot-shaped 5-way 1-shot
15-query tasks (random tensors), inner SGD α=0.4, one outer Adam step per meta-iteration, the
loop over tasks. Modes (`metalearn.modes`):

- ``unrolled``: exact second order, the graph of all K steps kept (memory grows with K);
- ``checkpointed``: the same meta-gradient, one inner step per checkpointed segment;
- ``implicit``: iMAML, λ=1, 5 conjugate-gradient steps (another meta-gradient, not the same
  number; shown because its memory does not depend on K).

Each (mode, K) runs in its own fresh subprocess: one warm-up meta-iteration, then one measured.
CPU: the peak of glibc's heap bytes in use (``mallinfo2``, polled on a thread; `MemoryPeaks`
from ``benchmarks/meta_iteration.py``) minus its value just before the measured iteration,
under the same tuned allocator as that benchmark. CUDA: ``torch.cuda.max_memory_allocated``
minus the allocation before it. Time per iteration is printed for information only.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from meta_iteration import TUNED_MALLOC, MemoryPeaks  # noqa: E402

from metalearn.knowledge.recipes import maml  # noqa: E402
from metalearn.models import Conv4  # noqa: E402
from metalearn.modes import Checkpointed, Implicit, Unrolled  # noqa: E402
from metalearn.outer import meta_step  # noqa: E402
from metalearn.tasks.task import TaskBatch  # noqa: E402

MODES = {
    "unrolled": Unrolled(),
    "checkpointed": Checkpointed(segment=1),
    "implicit": Implicit(lam=1.0, cg_steps=5),
}


def make_batch(tasks: int, device: str) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    ways, shots, queries = 5, 1, 15
    x_tr = torch.randn(tasks, ways * shots, 1, 28, 28, generator=g)
    x_val = torch.randn(tasks, ways * queries, 1, 28, 28, generator=g)
    y_tr = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1).contiguous()
    y_val = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val)).to(device)


def child(mode: str, steps: int, tasks: int, device: str) -> dict:
    """One (mode, K) in this fresh process: warm-up iteration, then the measured one."""
    torch.manual_seed(0)
    omega = maml(Conv4(5, in_channels=1, hidden=64, image_size=28), 0.4).to(device)
    opt = torch.optim.Adam(omega.parameters(), lr=1e-3)
    batch = make_batch(tasks, device)

    def iteration() -> None:
        meta_step(omega, opt, batch, steps, batching="loop", mode=MODES[mode])

    iteration()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        iteration()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - began
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"peak_mib": peak, "measure": "cuda max_memory_allocated", "seconds": elapsed}
    with MemoryPeaks() as peaks:
        began = time.perf_counter()
        iteration()
        elapsed = time.perf_counter() - began
    if not peaks.heap_available:
        return {"peak_mib": (peaks.anon_peak - peaks.anon_base) / 2**20, "measure": "anon RSS", "seconds": elapsed}
    return {"peak_mib": (peaks.heap_peak - peaks.heap_base) / 2**20, "measure": "glibc heap", "seconds": elapsed}


def measure(mode: str, steps: int, tasks: int, device: str) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(steps), str(tasks), device]
    env = dict(os.environ, GLIBC_TUNABLES=TUNED_MALLOC, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        print(f"  {mode} K={steps} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="K = 1, 5, 10 and 2 tasks (about a minute on CPU)")
    parser.add_argument("--tasks", type=int, default=None, help="meta-batch size (default 4; 2 with --quick)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="inner steps K (default 1 5 10 20)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        mode, steps, tasks, device = args.child
        print(json.dumps(child(mode, int(steps), int(tasks), device)))
        return
    ks = args.steps or ([1, 5, 10] if args.quick else [1, 5, 10, 20])
    tasks = args.tasks or (2 if args.quick else 4)
    print(f"torch {torch.__version__}, device {args.device}, Conv-4 5-way 1-shot 15-query, meta-batch {tasks}")
    results: dict[str, dict[str, dict | None]] = {}
    print(f"{'mode':<14}" + "".join(f"{'K=' + str(k):>16}" for k in ks) + "   (peak MiB / s per iteration)")
    for mode in args.modes:
        results[mode] = {}
        cells = []
        for k in ks:
            r = measure(mode, k, tasks, args.device)
            results[mode][str(k)] = r
            cells.append("failed" if r is None else f"{r['peak_mib']:.1f} / {r['seconds']:.2f}")
        print(f"{mode:<14}" + "".join(f"{c:>16}" for c in cells), flush=True)
    print(
        json.dumps(
            {
                "benchmark": "memory_modes",
                "torch": torch.__version__,
                "device": args.device,
                "tasks": tasks,
                "steps": ks,
                "workload": "Conv4 hidden 64, 28x28, 5-way 1-shot 15-query, inner SGD 0.4, outer Adam, loop",
                "measure": "peak during one meta-iteration (after a warm-up one) minus before it, fresh process each",
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
