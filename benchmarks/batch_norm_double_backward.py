"""Batch norm's double backward: torch's composite against `closed_form_batch_norm`, side by side.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/batch_norm_double_backward.py [--rounds 3]

Second-order MAML differentiates every batch norm's backward once per inner step. For the Conv-4's
shapes (5 train images of a task, 64 channels, 28x28 down to 3x3; a stack of 8 tasks as 512 channels,
what the task-batched path normalises) in float32 NCHW, and in bf16 as the ``[N·H·W, C]`` rows of a
channels-last input (what ``precision="bf16"`` runs, float32 weights as under autocast), it times one
forward, one backward with ``create_graph=True`` and the backward of all three first derivatives, with
torch's ``F.batch_norm`` and with `metalearn.models.batchnorm_closed.closed_form_batch_norm`
(interleaved, the best of ``--rounds`` repetitions of many calls each), and prints the ratio.
`metalearn.models.BatchNorm` takes the closed form from `CLOSED_FORM_MIN_NUMEL` elements on; the
table marks which one it takes for each shape. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn.models.batchnorm_closed import CLOSED_FORM_MIN_NUMEL, closed_form_batch_norm  # noqa: E402

EPS = 1e-5
#: (label, layout, shape): NCHW shapes as the float32 loop runs them; rows as the bf16 path runs them
CASES = [
    ("layer 1, one task", "nchw", (5, 64, 28, 28)),
    ("layer 2, one task", "nchw", (5, 64, 14, 14)),
    ("layer 3, one task", "nchw", (5, 64, 7, 7)),
    ("layer 4, one task", "nchw", (5, 64, 3, 3)),
    ("layer 1, stack of 8", "nchw", (5, 512, 28, 28)),
    ("layer 1, one task", "rows", (5 * 28 * 28, 64)),
    ("layer 2, one task", "rows", (5 * 14 * 14, 64)),
    ("layer 3, one task", "rows", (5 * 7 * 7, 64)),
    ("layer 1, stack of 8", "rows", (5 * 28 * 28, 512)),
    ("layer 2, stack of 8", "rows", (5 * 14 * 14, 512)),
]


def torch_norm(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.batch_norm(x, None, None, w, b, training=True, eps=eps)


def one_call(norm: Callable, x: Tensor, w: Tensor, b: Tensor, grad_out: Tensor, cotangent: Tensor) -> None:
    y = norm(x, w, b, EPS)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), grad_out, create_graph=True)
    torch.autograd.backward((gx, gw, gb), (cotangent, torch.ones_like(gw), torch.ones_like(gb)))


def time_case(layout: str, shape: tuple[int, ...], rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if layout == "nchw" else torch.bfloat16
    channels = shape[1]
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = torch.rand(channels, generator=g).add_(0.5).requires_grad_()
    b = torch.randn(channels, generator=g).requires_grad_()
    grad_out = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    cotangent = torch.randn(shape, generator=g).to(dtype)
    calls = max(3, int(4e6 // x.numel()))
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, norm in (("torch", torch_norm), ("closed form", closed_form_batch_norm)):
            one_call(norm, x, w, b, grad_out, cotangent)
            start = time.perf_counter()
            for _ in range(calls):
                one_call(norm, x, w, b, grad_out, cotangent)
            ms = 1e3 * (time.perf_counter() - start) / calls
            best[name] = min(best.get(name, float("inf")), ms)
    return {"torch_ms": best["torch"], "closed_ms": best["closed form"], "ratio": best["torch"] / best["closed form"],
            "batch_norm_takes": "closed form" if x.numel() >= CLOSED_FORM_MIN_NUMEL else "torch"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} thread; BatchNorm's threshold: {CLOSED_FORM_MIN_NUMEL} elements")
    header = f"{'case':22s} {'layout':18s} {'shape':18s} {'torch ms':>9s} {'closed ms':>9s} {'ratio':>6s}"
    print(header + "  BatchNorm takes")
    results = []
    for label, layout, shape in CASES:
        r = time_case(layout, shape, args.rounds)
        kind = "float32 NCHW" if layout == "nchw" else "bf16 rows"
        print(f"{label:22s} {kind:18s} {str(shape):18s} {r['torch_ms']:9.3f} {r['closed_ms']:9.3f} {r['ratio']:6.2f}"
              f"  {r['batch_norm_takes']}")  # fmt: skip
        results.append({"case": label, "layout": kind, "shape": list(shape), **r})
    print(json.dumps({"benchmark": "batch_norm_double_backward", "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
