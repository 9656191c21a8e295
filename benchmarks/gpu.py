"""The GPU benchmark: correctness on the device, then speed and peak memory of a meta-iteration.

One command, under 8 minutes on one GPU::

    python benchmarks/gpu.py                          # on CUDA (the default when present)
    python benchmarks/gpu.py --device cpu --quick     # tiny sizes: the CI smoke (tests/test_gpu_benchmark.py)

1. Correctness (float64, small sizes): the meta-gradient of MAML on the 1-40-40-1 MLP and on a
   Conv-4 with the library's BatchNorm adapted, second order, by the loop, vmap and chunked vmap
   on the device, each with kernels off and on where `meta_gradient` takes ``kernels=``
   (``"reference"`` / ``"triton"``), against the float64 loop on the CPU. Printed as the largest
   difference relative to the largest entry of the CPU meta-gradient.
2. Speed: median ms per meta-iteration (one `meta_step`: meta-gradient and outer Adam step, the
   device synchronised around each) and peak memory above what was allocated before, for
   sinusoid (MLP, meta-batch 25, 1 step), Conv-4 Omniglot 5w1s15q (meta-batch 32, 1 and 5 steps,
   second order, synthetic 1x28x28 data) and a mini-ImageNet-sized Conv-4 (32 filters, 3x84x84,
   5w1s15q, meta-batch 4, 5 steps). Contenders: the loop, vmap and vmap in chunks (a quarter of
   the meta-batch per chunk), each with kernels off and on (when the option exists); ``higher``
   on the same device and model (per-task loop, the same SGD inner step); and ``vmap+graph``: a
   CUDA graph of one whole sync-free meta-step (the vmapped meta-gradient + ``Adam(capturable=True)``,
   the library's pieces without its per-step checks, which synchronise) captured once for the
   fixed shapes and replayed. CUDA graphs cannot be captured on a CPU: that variant is skipped
   there. ``torch.compile`` of a meta-step is not measured here (cold compiles of 34-276 s,
   FINDINGS.md, do not fit the 8-minute budget).
3. Chunks: the vmap meta-step of Conv-4 Omniglot (1 step) with chunks of 32 (none), 16, 8, 4, 2 and
   1 tasks: median ms and peak memory against the chunk size.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU it is the peak of the bytes
allocated and not yet freed in torch.profiler's allocation events (one extra round).

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metalearn import MLP, Conv4, TaskBatch, maml, meta_gradient, meta_step
from metalearn.mapping import run_vmapped, task_in_dims, task_objective, vmap_theta0


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "sinusoid" or "conv4"
    meta_batch: int
    inner_steps: int
    inner_lr: float
    hidden: int = 64
    channels: int = 1
    image: int = 28
    ways: int = 5
    shots: int = 1
    queries: int = 15

    def model(self) -> torch.nn.Module:
        if self.kind == "sinusoid":
            return MLP((1, 40, 40, 1))
        return Conv4(self.ways, in_channels=self.channels, hidden=self.hidden, image_size=self.image)

    def batch(self, device: str, dtype: torch.dtype, seed: int, tasks: int | None = None) -> TaskBatch:
        g = torch.Generator().manual_seed(seed)
        n = self.meta_batch if tasks is None else tasks

        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=dtype).to(device)

        if self.kind == "sinusoid":
            return TaskBatch((r(n, 10, 1), r(n, 10, 1)), (r(n, 10, 1), r(n, 10, 1)))
        image = (self.channels, self.image, self.image)
        y_tr = torch.arange(self.ways).repeat_interleave(self.shots).expand(n, -1).contiguous().to(device)
        y_val = torch.arange(self.ways).repeat_interleave(self.queries).expand(n, -1).contiguous().to(device)
        return TaskBatch((r(n, y_tr.shape[1], *image), y_tr), (r(n, y_val.shape[1], *image), y_val))


def workloads(quick: bool) -> list[Workload]:
    if quick:  # same structure, tiny sizes
        return [
            Workload("sinusoid-1step", "sinusoid", 4, 1, 0.01),
            Workload("omniglot-1step", "conv4", 4, 1, 0.4, hidden=4, image=16, queries=3),
            Workload("omniglot-5step", "conv4", 4, 2, 0.4, hidden=4, image=16, queries=3),
            Workload("miniimagenet-5step", "conv4", 2, 2, 0.01, hidden=4, channels=3, image=16, queries=3),
        ]
    return [
        Workload("sinusoid-1step", "sinusoid", 25, 1, 0.01),
        Workload("omniglot-1step", "conv4", 32, 1, 0.4),
        Workload("omniglot-5step", "conv4", 32, 5, 0.4),
        Workload("miniimagenet-5step", "conv4", 4, 5, 0.01, hidden=32, channels=3, image=84),
    ]


def kernels_option() -> bool:
    """Whether this metalearn's `meta_gradient` / `meta_step` take ``kernels=``."""
    return all("kernels" in inspect.signature(f).parameters for f in (meta_gradient, meta_step))


def kernel_settings() -> list[dict[str, str]]:
    """Keyword sets for kernels off and on: ``{}`` alone when there is no ``kernels=`` option."""
    return [{"kernels": "reference"}, {"kernels": "triton"}] if kernels_option() else [{}]


def label(batching: str, chunk: int | None, kernels: dict[str, str]) -> str:
    name = batching if chunk is None else f"{batching}+chunk{chunk}"
    return name + (f"/{kernels['kernels']}" if kernels else "")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------- 1. correctness


def flat_grads(omega: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).cpu() for p in omega.parameters() if p.grad is not None])


def check_correctness(device: str, quick: bool) -> dict[str, dict[str, Any]]:
    """Largest |device meta-gradient − CPU float64 loop meta-gradient| over its largest entry, per path."""
    out: dict[str, dict[str, Any]] = {}
    small = {
        "sinusoid": Workload("sinusoid", "sinusoid", 4, 2, 0.01),
        "conv4": Workload("conv4", "conv4", 3, 2, 0.4, hidden=8 if quick else 32, image=16 if quick else 28,
                          queries=3 if quick else 15),
    }
    for name, w in small.items():
        batch = w.batch("cpu", torch.float64, seed=0)
        torch.manual_seed(0)
        omega = maml(w.model(), w.inner_lr).double()
        omega.zero_grad(set_to_none=True)
        meta_gradient(omega, batch, w.inner_steps, batching="loop")
        ref = flat_grads(omega)
        scale = float(ref.abs().max())
        row: dict[str, Any] = {}
        for kernels in kernel_settings():
            for batching, chunk in (("loop", None), ("vmap", None), ("vmap", 2)):
                key = label(batching, chunk, kernels)
                try:
                    omega.to(device).zero_grad(set_to_none=True)
                    meta_gradient(omega, batch.to(device), w.inner_steps, batching=batching, chunk_size=chunk,
                                  **kernels)
                    row[key] = float((flat_grads(omega) - ref).abs().max()) / scale
                except Exception as err:  # e.g. Triton on a machine without a GPU: recorded, not fatal
                    row[key] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                finally:
                    omega.to("cpu")
        out[name] = row
    return out


# ------------------------------------------------------------------------------- 2. speed


def higher_step(model: torch.nn.Module, outer: torch.optim.Optimizer, b: TaskBatch, steps: int, lr: float) -> None:
    """One MAML meta-iteration with `higher`: a loop over tasks, SGD inner steps, second order."""
    import higher

    outer.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(model.parameters(), lr=lr)
    n = len(b)
    for i in range(n):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            x, y = b.train[0][i], b.train[1][i]
            for _ in range(steps):
                out = fmodel(x)
                diffopt.step(F.mse_loss(out, y) if y.is_floating_point() else F.cross_entropy(out, y))
            out, yv = fmodel(b.val[0][i]), b.val[1][i]
            val = F.mse_loss(out, yv) if yv.is_floating_point() else F.cross_entropy(out, yv)
            (val / n).backward()
    outer.step()


def sync_free_meta_step(omega, outer: torch.optim.Optimizer, b: TaskBatch, steps: int) -> None:
    """The vmapped meta-gradient and the outer step without the library's per-step checks (finite
    losses and gradients, statistics), which read values back on the host and so cannot run
    inside a CUDA graph capture."""
    theta0, dims = vmap_theta0(omega, len(b), None, b.train)
    val_losses, _, _ = run_vmapped(task_objective, task_in_dims(dims), omega, theta0, *b.train, *b.val, steps, False)
    val_losses.mean().backward()
    outer.step()


def graphed_meta_step(omega, b: TaskBatch, steps: int) -> Callable[[], None]:
    """A CUDA graph of `sync_free_meta_step` for ``b``'s fixed shapes (PyTorch's whole-network
    capture recipe: warm up on a side stream, capture with the gradients set to None, replay).

    The returned replay carries ``graph_vs_eager``: the largest difference between the gradient
    its first replay computes and `meta_gradient`'s at the same ω, over the largest entry.
    """
    outer = torch.optim.Adam(omega.parameters(), 1e-3, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            outer.zero_grad(set_to_none=True)
            sync_free_meta_step(omega, outer, b, steps)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    outer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        sync_free_meta_step(omega, outer, b, steps)
    eager = copy.deepcopy(omega)  # ω as the first replay will see it (capture runs no kernels)
    eager.zero_grad(set_to_none=True)
    meta_gradient(eager, b, steps, batching="vmap")
    graph.replay()
    torch.cuda.synchronize()
    want, got = flat_grads(eager), flat_grads(omega)

    def replay() -> None:
        graph.replay()

    replay.graph_vs_eager = float((got - want).abs().max() / want.abs().max())  # type: ignore[attr-defined]
    return replay


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate((n for _, n in events), initial=0))


def time_contender(fn: Callable[[], None], device: str, warmup: int, rounds: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(rounds):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - began))
    if device.startswith("cuda"):
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = cpu_peak_bytes(fn) / 2**20
    return {"ms": round(statistics.median(times), 3), "peak_mib": round(peak, 1)}


def contenders(w: Workload, device: str, with_higher: bool) -> list[tuple[str, Callable[[], Callable[[], None]]]]:
    """(name, build) pairs; ``build()`` makes a fresh model, optimizer and data and returns the step to time."""
    chunk = max(1, w.meta_batch // 4)
    out: list[tuple[str, Callable[[], Callable[[], None]]]] = []

    def library(batching: str, chunk_size: int | None, kernels: dict[str, str]) -> Callable[[], None]:
        torch.manual_seed(0)
        omega = maml(w.model(), w.inner_lr).to(device)
        outer = torch.optim.Adam(omega.parameters(), 1e-3)
        b = w.batch(device, torch.float32, seed=1)

        def step() -> None:
            meta_step(omega, outer, b, w.inner_steps, batching=batching, chunk_size=chunk_size, **kernels)

        return step

    for kernels in kernel_settings():
        for batching, chunk_size in (("loop", None), ("vmap", None), ("vmap", chunk)):
            out.append((label(batching, chunk_size, kernels),
                        lambda b=batching, c=chunk_size, k=kernels: library(b, c, k)))

    def graphed() -> Callable[[], None]:
        torch.manual_seed(0)
        omega = maml(w.model(), w.inner_lr).to(device)
        return graphed_meta_step(omega, w.batch(device, torch.float32, seed=1), w.inner_steps)

    if device.startswith("cuda"):
        out.append(("vmap+graph", graphed))

    def with_higher_lib() -> Callable[[], None]:
        torch.manual_seed(0)
        model = w.model().to(device)
        outer = torch.optim.Adam(model.parameters(), 1e-3)
        b = w.batch(device, torch.float32, seed=1)
        return lambda: higher_step(model, outer, b, w.inner_steps, w.inner_lr)

    if with_higher:
        out.append(("higher", with_higher_lib))
    return out


def benchmark(device: str, quick: bool, rounds: int | None) -> dict[str, dict[str, Any]]:
    try:
        import higher  # noqa: F401

        with_higher = True
    except ImportError:
        with_higher = False
    results: dict[str, dict[str, Any]] = {}
    for w in workloads(quick):
        row: dict[str, Any] = {}
        n_rounds = rounds or (2 if quick else (30 if w.kind == "sinusoid" else 10))
        for name, build in contenders(w, device, with_higher):
            try:
                fn = build()
                row[name] = time_contender(fn, device, warmup=1 if quick else 3, rounds=n_rounds)
                if hasattr(fn, "graph_vs_eager"):
                    row[name]["graph_vs_eager"] = fn.graph_vs_eager
            except Exception as err:  # recorded (e.g. a capture that fails), the others still run
                row[name] = {"failed": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        if "ms" in row.get("higher", {}):
            for r in row.values():
                if "ms" in r and r is not row["higher"]:
                    r["x_higher"] = round(row["higher"]["ms"] / r["ms"], 2)
        results[w.name] = row
    return results


def chunk_sweep(device: str, quick: bool, rounds: int | None) -> dict[str, Any]:
    """Speed and peak memory of the vmap meta-step of Conv-4 Omniglot (1 step) against the chunk size."""
    w = workloads(quick)[1]
    sizes: list[int | None] = [None] + [c for c in (16, 8, 4, 2, 1) if c < w.meta_batch]
    rows: dict[str, Any] = {}
    for chunk in sizes:
        torch.manual_seed(0)
        omega = maml(w.model(), w.inner_lr).to(device)
        outer = torch.optim.Adam(omega.parameters(), 1e-3)
        b = w.batch(device, torch.float32, seed=1)

        def step(omega=omega, outer=outer, b=b, chunk=chunk) -> None:
            meta_step(omega, outer, b, w.inner_steps, batching="vmap", chunk_size=chunk)

        rows[str(chunk or w.meta_batch)] = time_contender(step, device, warmup=1 if quick else 3,
                                                         rounds=rounds or (2 if quick else 10))
    return {"workload": w.name, "meta_batch": w.meta_batch, "by_chunk_size": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU): the CI smoke")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per contender (default 30 / 10)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                         "pass --device cpu (with --quick for the smoke run)")
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    info = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "kernels_option": kernels_option()}
    print(f"{name}, torch {info['torch']}, kernels= option: {'yes' if info['kernels_option'] else 'absent'}")
    correctness = check_correctness(args.device, args.quick)
    for w, row in correctness.items():
        cells = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(f"float64 meta-gradient, {w}, vs the CPU loop: {cells}")
    figures = benchmark(args.device, args.quick, args.rounds)
    print(f"\n{'workload':20s} {'contender':24s} {'ms/iter':>10s} {'peak MiB':>10s} {'x higher':>9s}")
    for w, row in figures.items():
        for c, r in row.items():
            if "failed" in r:
                print(f"{w:20s} {c:24s} failed: {r['failed']}")
            else:
                print(f"{w:20s} {c:24s} {r['ms']:10.2f} {r['peak_mib']:10.1f} {r.get('x_higher', ''):>9}")
    sweep = chunk_sweep(args.device, args.quick, args.rounds)
    print(f"\n{sweep['workload']} under vmap, meta-batch {sweep['meta_batch']}, against the chunk size:")
    for chunk, r in sweep["by_chunk_size"].items():
        print(f"  chunk {chunk:>3s}: {r['ms']:10.2f} ms {r['peak_mib']:10.1f} MiB")
    summary = {**info, "correctness": correctness, "figures": figures, "chunk_sweep": sweep}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
