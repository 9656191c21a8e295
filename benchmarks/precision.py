"""The meta-gradient's error against float64 for each ``precision=`` mode, and its time.

Usage::

    python benchmarks/precision.py [--quick] [--device cpu|cuda]

For each workload (the sinusoid MLP 1-40-40-1, meta-batch 25, 1 inner step; the Conv-4 on
Omniglot-shaped 5-way 1-shot 15-query random tasks, meta-batch 8 (``--quick``: 2), 1 inner step;
second order, MAML) and each precision (``float32``, ``bf16``; ``fp16`` on CUDA only, with its
loss scale), one meta-gradient from the same initial weights is compared with the float64
meta-gradient of the same ω (the model and the batch cast to float64): relative L2 error
``|g - g64| / |g64|``, cosine similarity, and the median time of a few meta-gradients. The last
line printed is one JSON object.
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

from metalearn.knowledge.recipes import maml  # noqa: E402
from metalearn.models import MLP, Conv4  # noqa: E402
from metalearn.outer import MetaStep  # noqa: E402
from metalearn.tasks.task import TaskBatch  # noqa: E402


def make_batch(workload: str, n: int, dtype: torch.dtype, device: torch.device) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    if workload == "sinusoid":
        x = lambda: torch.rand(n, 10, 1, generator=g) * 10 - 5  # noqa: E731
        y = lambda: torch.randn(n, 10, 1, generator=g)  # noqa: E731
        batch = TaskBatch(train=(x(), y()), val=(x(), y()))
    else:
        labels = lambda k: torch.arange(5).repeat_interleave(k).expand(n, -1).clone()  # noqa: E731
        batch = TaskBatch(
            train=(torch.rand(n, 5, 1, 28, 28, generator=g), labels(1)),
            val=(torch.rand(n, 75, 1, 28, 28, generator=g), labels(15)),
        )
    (xt, yt), (xv, yv) = batch.train, batch.val
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return TaskBatch(train=(cast(xt), cast(yt)), val=(cast(xv), cast(yv)))


def meta_gradient(workload: str, precision: str, n: int, device: torch.device, reference: bool, repeats: int):
    """ω's meta-gradient (flattened) and the median seconds of ``repeats`` meta-gradients."""
    dtype = torch.float64 if reference else torch.float32
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP((1, 40, 40, 1)) if workload == "sinusoid" else Conv4(5)
    omega = maml(model.to(device, dtype), lr=0.01 if workload == "sinusoid" else 0.4)
    step = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.0), 1, precision=precision)
    batch = make_batch(workload, n, dtype, device)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    grad = torch.cat([p.grad.reshape(-1).double() for p in omega.parameters()])
    return grad, statistics.median(times)


def errors(g: Tensor, ref: Tensor) -> dict[str, float]:
    return {
        "rel_l2": float((g - ref).norm() / ref.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(g, ref, dim=0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Conv-4 meta-batch 2, one timed meta-gradient")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    precisions = ["float32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    repeats = 1 if args.quick else 5
    print(f"torch {torch.__version__}, device {device}, 1 thread; fp16: "
          f"{'measured' if 'fp16' in precisions else 'CUDA only, not measured on ' + device.type}")
    report: dict = {}
    for workload, n in (("sinusoid", 25), ("conv4", 2 if args.quick else 8)):
        ref, _ = meta_gradient(workload, "float32", n, device, reference=True, repeats=1)
        rows = {}
        print(f"\n{workload} (meta-batch {n}, 1 inner step, second order), against float64:")
        print(f"  {'precision':<9} {'rel L2 error':>13} {'cosine':>9} {'ms':>9}")
        for precision in precisions:
            g, seconds = meta_gradient(workload, precision, n, device, reference=False, repeats=repeats)
            rows[precision] = {**errors(g, ref), "ms": 1e3 * seconds}
            r = rows[precision]
            print(f"  {precision:<9} {r['rel_l2']:13.2e} {r['cosine']:9.5f} {r['ms']:9.1f}")
        report[workload] = {"meta_batch": n, "precisions": rows}
    print(json.dumps({"benchmark": "precision", "torch": torch.__version__, "device": str(device),
                      "quick": args.quick, "date": time.strftime("%Y-%m-%d", time.gmtime()), "workloads": report}))


if __name__ == "__main__":
    main()
