"""Why the Conv-4 does not run channels-last on CPU: faster, but its float32 meta-gradients are far off.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/channels_last.py [--tasks 32] [--rounds 3]

On the workloads of `meta_iteration.py` (Conv-4, Omniglot 5-way 1-shot 15-query, 1 and 5 inner
steps, second order; the first ``--tasks`` of its meta-batch), the same meta-gradient is computed
with every task's images in torch's default NCHW layout and in channels-last (NHWC, kept by every
convolution, batch norm and max-pool after the first), in float32 and float64. It prints, for each
layout, ms per task (medians over rounds that alternate the two) and the float32 meta-gradient's
error against float64 (max |float32 − float64| over the whole gradient's max |float64|; the conv
biases in front of batch norm are left out: their exact gradient is 0). The last line printed is
one JSON object with the figures.

Measured here (torch 2.13 CPU, 1 thread; figures in docs/results.md): channels-last is faster, but
its float32 error grows far beyond NCHW's with the inner steps (at 5 steps, 100x and more), while
float64 agrees in both layouts to 1e-13: torch's CPU batch norm and convolutions in channels-last
accumulate less accurately, and second-order meta-gradients amplify it. So `metalearn` keeps NCHW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meta_iteration import WORKLOADS, make_batch, make_model  # noqa: E402

from metalearn.knowledge.recipes import maml  # noqa: E402
from metalearn.outer import meta_gradient  # noqa: E402
from metalearn.tasks.task import TaskBatch  # noqa: E402

PRE_NORM_BIASES = tuple(f"features.{4 * i}.bias" for i in range(4))


def channels_last(x: Tensor) -> Tensor:
    """[tasks, N, C, H, W] with each task's images in NHWC strides (also for C = 1, where
    ``.contiguous(memory_format=torch.channels_last)`` keeps NCHW strides)."""
    t, n, c, h, w = x.shape
    return torch.empty_strided(x.shape, (n * h * w * c, h * w * c, 1, w * c, c), dtype=x.dtype).copy_(x)


def batch_in(batch: TaskBatch, tasks: int, dtype: torch.dtype, layout: str) -> TaskBatch:
    convert = channels_last if layout == "channels-last" else (lambda x: x)
    (xt, yt), (xv, yv) = batch.train, batch.val
    return TaskBatch(
        (convert(xt[:tasks].to(dtype)), yt[:tasks]), (convert(xv[:tasks].to(dtype)), yv[:tasks])
    )


def meta_grad(workload: str, batch: TaskBatch) -> dict[str, Tensor]:
    w = WORKLOADS[workload]
    omega = maml(make_model(workload), w.inner_lr).to(batch.train[0].dtype)
    meta_gradient(omega, batch, w.steps, batching="loop")
    return {k: p.grad.double() for k, p in omega.model.named_parameters() if not k.endswith(PRE_NORM_BIASES)}


def error(got: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in exact.values())
    return max(float((got[k] - exact[k]).abs().max()) for k in exact) / scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=32, help="tasks of the meta-batch (32: all)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    layouts = ("nchw", "channels-last")
    figures: dict = {}
    for workload in ("conv4-1step", "conv4-5steps"):
        batch = make_batch(workload)
        exact = meta_grad(workload, batch_in(batch, args.tasks, torch.float64, "nchw"))
        f64_cl = error(meta_grad(workload, batch_in(batch, args.tasks, torch.float64, "channels-last")), exact)
        f32 = {lay: batch_in(batch, args.tasks, torch.float32, lay) for lay in layouts}
        errors = {lay: error(meta_grad(workload, f32[lay]), exact) for lay in layouts}
        times: dict[str, list[float]] = {lay: [] for lay in layouts}
        for r in range(args.rounds):
            for lay in layouts if r % 2 == 0 else layouts[::-1]:
                start = time.perf_counter()
                meta_grad(workload, f32[lay])
                times[lay].append(1e3 * (time.perf_counter() - start) / args.tasks)
        ms = {lay: statistics.median(t) for lay, t in times.items()}
        print(f"{workload}: ms per task nchw {ms['nchw']:.0f}, channels-last {ms['channels-last']:.0f} "
              f"({ms['nchw'] / ms['channels-last']:.2f}x); float32 error nchw {errors['nchw']:.1e}, channels-last "
              f"{errors['channels-last']:.1e} ({errors['channels-last'] / errors['nchw']:.0f}x); float64 "
              f"channels-last vs nchw {f64_cl:.1e}", flush=True)
        figures[workload] = {"ms_per_task": ms, "float32_error": errors, "float64_channels_last_error": f64_cl}
    print(json.dumps({"benchmark": "channels_last", "tasks": args.tasks, "rounds": args.rounds, "results": figures}))


if __name__ == "__main__":
    main()
