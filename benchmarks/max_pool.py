"""`MaxPool2x2` against ``nn.MaxPool2d(2)`` inside a Conv-4 MAML meta-step, float32 and bf16, side by side.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/max_pool.py [--meta-batch 8] [--rounds 12]

One process, one thread. Four contenders — the library's `Conv4` (which pools with `MaxPool2x2`) and the
same network with its four pools swapped for ``nn.MaxPool2d(2)``, each in float32 and with
``precision="bf16"`` — run `meta_step` (5-way 1-shot 15-query random images, ``--meta-batch`` tasks, 1 inner
step, second order, outer Adam) in a round robin of ``--rounds`` rounds after one warm-up step each.
Reported per contender: the median and the minimum of the process CPU time and of the wall time of a step,
and the ratios. The first float32 meta-gradients of the two networks are compared (they must be equal bit
for bit). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn import Conv4, maml, meta_gradient, meta_step  # noqa: E402
from metalearn.models import MaxPool2x2  # noqa: E402
from metalearn.tasks import TaskBatch  # noqa: E402


def episodes(n: int, ways: int = 5, shots: int = 1, queries: int = 15) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return TaskBatch(
        train=(torch.rand(n, ways * shots, 1, 28, 28, generator=g), labels.repeat_interleave(shots).expand(n, -1)),
        val=(torch.rand(n, ways * queries, 1, 28, 28, generator=g), labels.repeat_interleave(queries).expand(n, -1)),
    )


def conv4(torch_pool: bool) -> nn.Module:
    torch.manual_seed(0)
    model = Conv4(5)
    if torch_pool:
        for i, layer in enumerate(model.features):
            if isinstance(layer, MaxPool2x2):
                model.features[i] = nn.MaxPool2d(2)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    batch = episodes(args.meta_batch)
    grads = []
    for torch_pool in (False, True):
        omega = maml(conv4(torch_pool), lr=0.4)
        meta_gradient(omega, batch, 1)
        grads.append([q.grad for q in omega.parameters()])
    equal = all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    print(f"first float32 meta-gradients equal bit for bit: {equal}", flush=True)
    steps = {}
    for torch_pool in (False, True):
        for precision in ("float32", "bf16"):
            omega = maml(conv4(torch_pool), lr=0.4)
            outer = torch.optim.Adam(omega.parameters(), lr=1e-3)
            name = f"{'nn.MaxPool2d' if torch_pool else 'MaxPool2x2'} {precision}"
            steps[name] = (lambda o=omega, opt=outer, pr=precision: meta_step(o, opt, batch, 1, precision=pr))
    for step in steps.values():
        step()  # warm-up
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    wall: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    figures = {
        n: {"cpu_median_s": statistics.median(cpu[n]), "cpu_min_s": min(cpu[n]),
            "wall_median_s": statistics.median(wall[n]), "wall_min_s": min(wall[n])}
        for n in steps
    }
    for n, f in figures.items():
        print(f"{n:>21}: CPU median {f['cpu_median_s']:.3f} s (min {f['cpu_min_s']:.3f}), "
              f"wall median {f['wall_median_s']:.3f} s (min {f['wall_min_s']:.3f})")
    ratios = {
        pr: figures[f"nn.MaxPool2d {pr}"]["cpu_median_s"] / figures[f"MaxPool2x2 {pr}"]["cpu_median_s"]
        for pr in ("float32", "bf16")
    }
    for precision, r in ratios.items():
        print(f"  {precision}: nn.MaxPool2d / MaxPool2x2 CPU time per step {r:.2f}x")
    print(json.dumps({"benchmark": "max_pool", "meta_batch": args.meta_batch, "rounds": args.rounds,
                      "torch": torch.__version__, "gradients_equal": equal, "figures": figures, "ratios": ratios,
                      "date": time.strftime("%Y-%m-%d", time.gmtime())}))


if __name__ == "__main__":
    main()
