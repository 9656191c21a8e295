"""The Triton kernels on a device: correctness against the reference path, then speed and peak memory.

Usage::

    python benchmarks/kernels.py                       # on CUDA (the default when a GPU is present)
    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/kernels.py --device cpu --quick   # a dry run

1. Correctness (float64, on the device): second-order meta-gradients of a Conv-4 (the library's
   `BatchNorm`, adapted) for MAML, Meta-SGD and learned Adam, with vmap and both kernels (the fused
   update and the per-task batch norm) against the loop on the reference path: max relative error.
2. Speed (float32, median ms over ``--rounds``, contenders in turns): one inner update of every adapted
   tensor of a meta-batch of Conv-4s under vmap (fused vs the rule's own ops), batch norm of a meta-batch
   under vmap forward + backward (kernel vs primitives), and a whole second-order meta-iteration
   (``meta_step``, Conv-4 Omniglot 5-way 1-shot 15-query, 1 inner step) with ``kernels="triton"`` and
   ``"reference"``, with peak device memory.

Prints a table and, as its last line, one JSON object with the figures. In the interpreter (CPU) the
timings mean nothing; the run only shows the script works.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metalearn import Conv4, InnerAdam, InnerSGD, MetaKnowledge, MetaSGD, TaskBatch, meta_gradient, meta_step
from metalearn.exact_norms import batch_norm as primitive_batch_norm
from metalearn.kernels import batch_norm_train
from metalearn.knowledge.rules import fused_step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def tasks(n: int, ways: int, shots: int, queries: int, size: int, device: str, dtype: torch.dtype) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    x_tr = torch.randn(n, ways * shots, 1, size, size, generator=g, dtype=dtype)
    x_val = torch.randn(n, ways * queries, 1, size, size, generator=g, dtype=dtype)
    y_tr = torch.arange(ways).repeat_interleave(shots).expand(n, -1)
    y_val = torch.arange(ways).repeat_interleave(queries).expand(n, -1)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val)).to(device)


def omega_for(rule: str, hidden: int, size: int, device: str, dtype: torch.dtype) -> MetaKnowledge:
    torch.manual_seed(0)
    parts = {"maml": InnerSGD(lr=0.4), "meta_sgd": MetaSGD(init_lr=0.4), "adam": InnerAdam(lr=0.01)}
    omega = MetaKnowledge(Conv4(5, in_channels=1, hidden=hidden, image_size=size), parts[rule])
    return omega.to(device=device, dtype=dtype)


def correctness(device: str, quick: bool) -> dict[str, float]:
    hidden, size = (4, 16) if quick else (32, 28)
    batch = tasks(2 if quick else 4, 5, 1, 1 if quick else 5, size, device, torch.float64)
    errors = {}
    for rule in ("maml", "meta_sgd", "adam"):
        omega = omega_for(rule, hidden, size, device, torch.float64)
        grads = {}
        for batching, kernels in (("loop", "reference"), ("vmap", "triton")):
            omega.zero_grad(set_to_none=True)
            meta_gradient(omega, batch, 1, batching=batching, kernels=kernels)
            grads[batching] = [p.grad.clone() for p in omega.parameters() if p.grad is not None]
        scale = max(g.abs().max() for g in grads["loop"])
        diff = max((a - b).abs().max() for a, b in zip(grads["vmap"], grads["loop"], strict=True))
        errors[rule] = float(diff / scale)
    return errors


def median_ms(fns: dict, rounds: int, device: str) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up (compiles the kernels)
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            sync(device)
            began = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(1e3 * (time.perf_counter() - began))
    return {k: statistics.median(v) for k, v in times.items()}


def update_speed(device: str, quick: bool, rounds: int) -> dict[str, float]:
    hidden, size, n = (4, 16, 2) if quick else (64, 28, 32)
    omega = omega_for("adam", hidden, size, device, torch.float32)
    params = {k: v.detach().expand(n, *v.shape).clone() for k, v in omega.model_params().items()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = torch.func.vmap(omega.optimizer.init_state)(params)

    def step(kernels: str):
        return lambda: torch.func.vmap(lambda p, g, s: fused_step(omega.optimizer, p, g, s, 0, kernels))(
            params, grads, state
        )

    return median_ms({"triton": step("triton"), "reference": step("reference")}, rounds, device)


def norm_speed(device: str, quick: bool, rounds: int) -> dict[str, float]:
    shape = (2, 5, 4, 8, 8) if quick else (32, 80, 64, 28, 28)  # tasks, examples, channels, H, W
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.rand(shape[0], shape[2], device=device, requires_grad=True)
    b = torch.randn(shape[0], shape[2], device=device, requires_grad=True)

    def run(norm):
        def once():
            y = torch.func.vmap(norm)(x, w, b)
            torch.autograd.grad(y.square().sum(), (x, w, b))
        return once

    def prim(x, w, b):
        return primitive_batch_norm(x, None, None, w, b, training=True, kernels="reference")

    return median_ms({"triton": run(lambda x, w, b: batch_norm_train(x, w, b, 1e-5)), "reference": run(prim)},
                     rounds, device)


def meta_iteration(device: str, quick: bool, rounds: int) -> dict[str, float]:
    hidden, size, n, queries = (4, 16, 2, 1) if quick else (64, 28, 32, 15)
    batch = tasks(n, 5, 1, queries, size, device, torch.float32)
    out = {}
    for kernels in ("triton", "reference"):
        omega = omega_for("maml", hidden, size, device, torch.float32)
        opt = torch.optim.Adam(omega.parameters(), 1e-3)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms({kernels: lambda o=omega, p=opt, k=kernels: meta_step(o, p, batch, 1, batching="vmap",
                                                                            kernels=k)}, rounds, device)[kernels]
        out[f"{kernels}_ms"] = ms
        if device.startswith("cuda"):
            out[f"{kernels}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run, e.g. in the interpreter)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu (interpreter)"
    result = {"device": name, "quick": args.quick, "torch": torch.__version__}
    result["max_rel_error_vmap_kernels_vs_loop_reference"] = correctness(args.device, args.quick)
    result["update_ms"] = update_speed(args.device, args.quick, rounds)
    result["batch_norm_fwd_bwd_ms"] = norm_speed(args.device, args.quick, rounds)
    result["meta_iteration"] = meta_iteration(args.device, args.quick, rounds)
    for key, value in result.items():
        print(f"{key:48s} {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
