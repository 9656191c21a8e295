"""Why the Conv-4 runs channels-last on CPU under bf16 only: faster, but its float32 meta-gradients are far off.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/channels_last.py [--tasks 32] [--rounds 3]

On the workloads of `meta_iteration.py` (Conv-4, Omniglot 5-way 1-shot 15-query, 1 and 5 inner
steps, second order; the first ``--tasks`` of its meta-batch), the same meta-gradient is computed
with every task's images in torch's default NCHW layout and in channels-last (NHWC, kept by every
convolution, batch norm and max-pool after the first), in float32, in bf16 (autocast, as
``precision="bf16"`` runs it) and in float64. It prints, for each layout and precision, ms per task
(medians over rounds that alternate the layouts) and the meta-gradient's error against float64:
max |error| over the whole gradient's max |float64|, the relative L2 error and the cosine (the conv
biases in front of batch norm are left out: their exact gradient is 0). The NCHW runs use a Conv-4
that never converts its input (the library's `Conv4` itself runs channels-last under CPU bf16:
`metalearn.models.layout`). The last line printed is one JSON object with the figures.

Measured here (torch 2.13 CPU, 1 thread; figures in docs/results.md): channels-last is faster, but
its float32 error grows far beyond NCHW's with the inner steps (at 5 steps, 100x and more), while
float64 agrees in both layouts to 1e-13: torch's CPU batch norm and convolutions in channels-last
accumulate less accurately, and second-order meta-gradients amplify it. So float32 stays NCHW. In
bf16 the error is bf16's own, about the same in both layouts, and channels-last is the faster one.
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
from metalearn.models import Conv4  # noqa: E402
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


class NCHWConv4(Conv4):
    """The library's Conv-4 without its bf16 layout switch: it convolves whatever layout it is given."""

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def meta_grad(workload: str, batch: TaskBatch, layout: str = "nchw", precision: str = "float32") -> dict[str, Tensor]:
    w = WORKLOADS[workload]
    model = make_model(workload)
    if layout == "nchw":
        nchw = NCHWConv4(5)
        nchw.load_state_dict(model.state_dict())
        model = nchw
    omega = maml(model, w.inner_lr).to(batch.train[0].dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        meta_gradient(omega, batch, w.steps, batching="loop")
    return {k: p.grad.double() for k, p in omega.model.named_parameters() if not k.endswith(PRE_NORM_BIASES)}


def error(got: dict[str, Tensor], exact: dict[str, Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in exact.values())
    return max(float((got[k] - exact[k]).abs().max()) for k in exact) / scale


def distances(got: dict[str, Tensor], exact: dict[str, Tensor]) -> dict[str, float]:
    """max-error (`error`), relative L2 error and cosine of ``got`` against ``exact``."""
    a, b = torch.cat([got[k].flatten() for k in exact]), torch.cat([v.flatten() for v in exact.values()])
    return {"max_error": error(got, exact), "rel_l2": float((a - b).norm() / b.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=32, help="tasks of the meta-batch (32: all)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    layouts, precisions = ("nchw", "channels-last"), ("float32", "bf16")
    figures: dict = {}
    for workload in ("conv4-1step", "conv4-5steps"):
        batch = make_batch(workload)
        exact = meta_grad(workload, batch_in(batch, args.tasks, torch.float64, "nchw"))
        f64_cl = error(meta_grad(workload, batch_in(batch, args.tasks, torch.float64, "channels-last"), "cl"), exact)
        f32 = {lay: batch_in(batch, args.tasks, torch.float32, lay) for lay in layouts}
        errors = {f"{prec} {lay}": distances(meta_grad(workload, f32[lay], lay, prec), exact)
                  for prec in precisions for lay in layouts}  # fmt: skip
        times: dict[str, list[float]] = {key: [] for key in errors}
        for r in range(args.rounds):
            for prec in precisions:
                for lay in layouts if r % 2 == 0 else layouts[::-1]:
                    start = time.perf_counter()
                    meta_grad(workload, f32[lay], lay, prec)
                    times[f"{prec} {lay}"].append(1e3 * (time.perf_counter() - start) / args.tasks)
        ms = {key: statistics.median(t) for key, t in times.items()}
        print(f"{workload} (float64 channels-last vs nchw {f64_cl:.1e}):")
        for key in errors:
            e = errors[key]
            print(f"  {key:<22} {ms[key]:6.0f} ms per task ({ms['float32 nchw'] / ms[key]:.2f}x float32 nchw); error "
                  f"vs float64: max {e['max_error']:.1e}, relative L2 {e['rel_l2']:.1e}, cosine {e['cosine']:.4f}",
                  flush=True)  # fmt: skip
        figures[workload] = {"ms_per_task": ms, "errors": errors, "float64_channels_last_error": f64_cl}
    print(json.dumps({"benchmark": "channels_last", "tasks": args.tasks, "rounds": args.rounds, "results": figures}))


if __name__ == "__main__":
    main()
