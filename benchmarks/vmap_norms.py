"""Native norms under vmap: meta-gradient errors before/after `metalearn.exact_norms`, and loop vs vmap speed.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/vmap_norms.py [--only errors|speed] [--rounds 15] [--quick]

Part 1, errors (float64, second-order MAML, 3 tasks, 1 and 3 inner SGD steps): for each
norm kind, a tiny model with the norm's weight/bias adapted; the max relative error (max
abs difference over all ω gradients / max abs loop gradient) of the vmap meta-gradient
against the loop's, **before** (a raw ``torch.func.vmap`` of the library's per-task
objective, torch's fused norms) and **after** (the library's vmap path, norms routed to
primitives by `metalearn.exact_norms`).

Part 2, speed (float32, one thread, second order, 1 inner step; median ms per
meta-gradient over ``--rounds`` rounds, contenders in turns with the order reversed every
other round):

- ``mlp``: 1-40-40-1 MLP, no norm (the cost of the interception on a model without norms);
- ``mlp+LayerNorm`` / ``mlp+BatchNorm1d``: the same MLP with ``nn.LayerNorm(40)`` /
  ``nn.BatchNorm1d(40, track_running_stats=False)`` after each hidden linear layer;
  meta-batch 25, 10 train and 10 val points (the sinusoid shapes);
- ``conv4 native``: Conv-4 of ``nn.Conv2d`` + ``nn.BatchNorm2d(track_running_stats=False)``
  + ``nn.MaxPool2d(2)`` + ``nn.ReLU`` (64 filters), Omniglot-shaped 5-way 1-shot 15-query
  tasks (1x28x28), meta-batch 8 (``--quick``: 32 filters, meta-batch 4).

Contenders: ``loop`` (`meta_gradient(batching="loop")`, torch's fused kernels),
``vmap`` (`meta_gradient(batching="vmap")`, under the interception), and ``vmap raw`` (the
same `meta_gradient` call with the interception swapped for a no-op: what vmap cost before,
with wrong meta-gradients when a norm adapts). The ratios printed are loop/vmap (>1: vmap faster) and
vmap/vmap raw (the interception's overhead). The allocator setting (``GLIBC_TUNABLES``) is
printed; give every run the same one.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn import outer  # noqa: E402
from metalearn.knowledge.recipes import maml  # noqa: E402
from metalearn.outer import meta_gradient  # noqa: E402
from metalearn.tasks.task import TaskBatch  # noqa: E402

HID, CH, SIZE = 6, 4, 4


class FunctionalNorm(nn.Module):
    """A norm written as a functional call in a model's own forward, with its own affine parameters."""

    def __init__(self, call: Callable, shape: tuple[int, ...], bias: bool = True) -> None:
        super().__init__()
        self.call = call
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None
        self.register_buffer("mean", torch.linspace(-0.2, 0.3, shape[0]))
        self.register_buffer("var", torch.linspace(0.5, 1.5, shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        return self.call(self, x)


def tiny_mlp(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, HID), norm, nn.Tanh(), nn.Linear(HID, 1))


def tiny_conv(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, CH, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(CH * SIZE**2, 3))


def error_kinds() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """Norm kind -> (tiny model builder, "mlp" or "conv" data)."""
    kinds = {
        "nn.BatchNorm1d": (lambda: tiny_mlp(nn.BatchNorm1d(HID, track_running_stats=False)), "mlp"),
        "nn.BatchNorm2d": (lambda: tiny_conv(nn.BatchNorm2d(CH, track_running_stats=False)), "conv"),
        "nn.LayerNorm": (lambda: tiny_mlp(nn.LayerNorm(HID)), "mlp"),
        "nn.GroupNorm": (lambda: tiny_conv(nn.GroupNorm(2, CH)), "conv"),
        "nn.InstanceNorm2d(affine)": (lambda: tiny_conv(nn.InstanceNorm2d(CH, affine=True)), "conv"),
        "F.batch_norm": (
            lambda: tiny_conv(FunctionalNorm(lambda m, x: F.batch_norm(x, None, None, m.weight, m.bias, True), (CH,))),
            "conv",
        ),
        "F.batch_norm eval stats": (
            lambda: tiny_mlp(FunctionalNorm(lambda m, x: F.batch_norm(x, m.mean, m.var, m.weight, m.bias), (HID,))),
            "mlp",
        ),
        "F.layer_norm": (
            lambda: tiny_mlp(FunctionalNorm(lambda m, x: F.layer_norm(x, [HID], m.weight, m.bias), (HID,))), "mlp"
        ),
        "F.instance_norm": (
            lambda: tiny_conv(FunctionalNorm(lambda m, x: F.instance_norm(x, weight=m.weight, bias=m.bias), (CH,))),
            "conv",
        ),
        "F.group_norm": (
            lambda: tiny_conv(FunctionalNorm(lambda m, x: F.group_norm(x, 2, m.weight, m.bias), (CH,))), "conv"
        ),
        "torch.native_layer_norm": (
            lambda: tiny_mlp(FunctionalNorm(
                lambda m, x: torch.native_layer_norm(x, [HID], m.weight, m.bias, 1e-5)[0], (HID,))),
            "mlp",
        ),
        "torch.native_batch_norm": (
            lambda: tiny_conv(FunctionalNorm(
                lambda m, x: torch.native_batch_norm(x, m.weight, m.bias, None, None, True, 0.1, 1e-5)[0], (CH,))),
            "conv",
        ),
    }
    if hasattr(F, "rms_norm"):
        kinds["nn.RMSNorm"] = (lambda: tiny_mlp(nn.RMSNorm(HID)), "mlp")
        kinds["F.rms_norm"] = (
            lambda: tiny_mlp(FunctionalNorm(lambda m, x: F.rms_norm(x, [HID], m.weight), (HID,), bias=False)), "mlp"
        )
    return kinds


def tasks(kind: str, n: int, dtype: torch.dtype, seed: int = 1, **shape) -> TaskBatch:
    """Random tasks: ``"mlp"`` regression of ``shape["features"]`` inputs, or ``"conv"`` N-way images."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        k, f = shape.get("points", 5), shape.get("features", 3)
        x = torch.randn(n, 2 * k, f, generator=g, dtype=dtype)
        y = torch.sin(x.sum(-1, keepdim=True) + torch.randn(n, 1, 1, generator=g, dtype=dtype))
        return TaskBatch(train=(x[:, :k], y[:, :k]), val=(x[:, k:], y[:, k:]))
    ways, shots, queries = shape.get("ways", 3), shape.get("shots", 2), shape.get("queries", 2)
    size, labels = shape.get("size", SIZE), torch.arange(ways)

    def half(per_class: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, ways * per_class, 1, size, size, generator=g, dtype=dtype)
        return x, labels.repeat(per_class).expand(n, -1)

    return TaskBatch(train=half(shots), val=half(queries))


def raw_vmap_meta_gradient(omega: nn.Module, batch: TaskBatch, steps: int) -> None:
    """`meta_gradient(batching="vmap")` with `exact_norms` swapped for a no-op: the old path, same code otherwise."""
    interception = outer.exact_norms
    outer.exact_norms = contextlib.nullcontext
    try:
        meta_gradient(omega, batch, steps, batching="vmap")
    finally:
        outer.exact_norms = interception


def grads(omega: nn.Module, fn: Callable[[], object]) -> list[Tensor]:
    omega.zero_grad(set_to_none=True)
    fn()
    return [p.grad.clone() for p in omega.parameters()]


def rel_error(got: list[Tensor], expected: list[Tensor]) -> float:
    scale = max(float(e.abs().max()) for e in expected)
    return max(float((g - e).abs().max()) for g, e in zip(got, expected, strict=True)) / scale


def errors_table() -> None:
    print("loop-vs-vmap max relative error of the meta-gradient (float64, second order, 3 tasks)")
    print(f"{'norm kind':26s} {'steps':>5s} {'before (raw vmap)':>18s} {'after (exact_norms)':>20s}")
    for name, (make, data) in error_kinds().items():
        for steps in (1, 3):
            torch.manual_seed(0)
            model = make().double()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            omega, batch = maml(model, lr=0.3), tasks(data, 3, torch.float64)
            loop = grads(omega, partial(meta_gradient, omega, batch, steps, batching="loop"))
            before = grads(omega, partial(raw_vmap_meta_gradient, omega, batch, steps))
            after = grads(omega, partial(meta_gradient, omega, batch, steps, batching="vmap"))
            print(f"{name:26s} {steps:5d} {rel_error(before, loop):18.1e} {rel_error(after, loop):20.1e}")


def mlp(norm: Callable[[int], nn.Module] | None) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in ((1, 40), (40, 40)):
        layers += [nn.Linear(a, b), *([norm(b)] if norm else []), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(40, 1))


def conv4(hidden: int) -> nn.Module:
    layers: list[nn.Module] = []
    for c in (1, hidden, hidden, hidden):
        layers += [nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden, track_running_stats=False),
                   nn.MaxPool2d(2), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, 5))


def workloads(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], TaskBatch, float]]:
    sinusoid = tasks("mlp", 25, torch.float32, points=10, features=1)
    hidden, meta_batch = (32, 4) if quick else (64, 8)
    omniglot = tasks("conv", meta_batch, torch.float32, ways=5, shots=1, queries=15, size=28)
    return {
        "mlp": (lambda: mlp(None), sinusoid, 0.01),
        "mlp+LayerNorm": (lambda: mlp(nn.LayerNorm), sinusoid, 0.01),
        "mlp+BatchNorm1d": (lambda: mlp(lambda n: nn.BatchNorm1d(n, track_running_stats=False)), sinusoid, 0.01),
        f"conv4 native (h{hidden}, B{meta_batch})": (lambda: conv4(hidden), omniglot, 0.4),
    }


def speed_table(rounds: int, quick: bool) -> None:
    torch.set_num_threads(1)
    print(f"\nms per second-order meta-gradient, 1 inner step, float32, 1 thread, median of {rounds} rounds "
          f"(GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')})")
    print(f"{'workload':26s} {'loop':>9s} {'vmap':>9s} {'vmap raw':>9s} {'loop/vmap':>10s} {'vmap/raw':>9s}")
    for name, (make, batch, lr) in workloads(quick).items():
        torch.manual_seed(0)
        omega = maml(make(), lr=lr)
        contenders = {
            "loop": lambda o=omega, b=batch: meta_gradient(o, b, 1, batching="loop"),
            "vmap": lambda o=omega, b=batch: meta_gradient(o, b, 1, batching="vmap"),
            "vmap raw": lambda o=omega, b=batch: raw_vmap_meta_gradient(o, b, 1),
        }
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for fn in contenders.values():  # warm-up
            omega.zero_grad(set_to_none=True)
            fn()
        n = max(3, rounds // 3) if name.startswith("conv4") else rounds
        for r in range(n):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for key in order:
                omega.zero_grad(set_to_none=True)
                start = time.perf_counter()
                contenders[key]()
                times[key].append(1e3 * (time.perf_counter() - start))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{name:26s} {med['loop']:9.2f} {med['vmap']:9.2f} {med['vmap raw']:9.2f} "
              f"{med['loop'] / med['vmap']:10.2f} {med['vmap'] / med['vmap raw']:9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["errors", "speed"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smaller Conv-4 (rough figures)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    if args.only in (None, "errors"):
        errors_table()
    if args.only in (None, "speed"):
        speed_table(args.rounds, args.quick)


if __name__ == "__main__":
    main()
