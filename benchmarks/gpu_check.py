"""Checks and times the meta-learning core on a CUDA device, side by side with `higher` if installed.

1. Correctness on the device (float64): the loop and vmap meta-gradients agree, and both equal the
   CPU meta-gradient, for MAML on the 1-40-40-1 MLP and on the Conv-4 (library BatchNorm adapted).
2. Speed and peak device memory of one second-order meta-iteration (outer Adam step included):
   sinusoid (MLP, meta-batch 25, 1 step) and Conv-4 Omniglot 5w1s15q (meta-batch 32, 1 and 5 steps),
   for our loop and vmap paths and `higher` (same model, same data).

    python benchmarks/gpu_check.py            # needs a CUDA device
    python benchmarks/gpu_check.py --quick

Prints a table and, as its last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from metalearn import MLP, Conv4, TaskBatch, maml, meta_gradient, meta_step


def batch(workload: str, device: str, dtype: torch.dtype, generator: torch.Generator) -> TaskBatch:
    def r(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device)

    if workload == "sinusoid":
        return TaskBatch((r(25, 10, 1), r(25, 10, 1)), (r(25, 10, 1), r(25, 10, 1)))
    labels = torch.arange(5).repeat_interleave
    y_tr = labels(1).expand(32, 5).to(device)
    y_val = labels(15).expand(32, 75).to(device)
    return TaskBatch((r(32, 5, 1, 28, 28), y_tr), (r(32, 75, 1, 28, 28), y_val))


def model(workload: str) -> torch.nn.Module:
    return MLP((1, 40, 40, 1)) if workload == "sinusoid" else Conv4(5, hidden=64)


def inner_lr(workload: str) -> float:
    return 0.01 if workload == "sinusoid" else 0.4


def check_correctness(device: str) -> dict:
    out = {}
    for workload, tasks in (("sinusoid", 4), ("conv4", 3)):
        g = torch.Generator().manual_seed(0)
        full = batch(workload, "cpu", torch.float64, g)
        small = TaskBatch(tuple(t[:tasks] for t in full.train), tuple(t[:tasks] for t in full.val))
        torch.manual_seed(0)
        omega = maml(model(workload), inner_lr(workload)).double()
        grads = {}
        for where, mode in (("cpu", "loop"), (device, "loop"), (device, "vmap")):
            omega.to(where)
            omega.zero_grad(set_to_none=True)
            meta_gradient(omega, small.to(where), 2, batching=mode)
            grads[(where, mode)] = torch.cat([p.grad.reshape(-1).cpu() for p in omega.parameters()])
        ref = grads[("cpu", "loop")]
        scale = ref.abs().max()
        out[workload] = {
            "loop_vs_cpu": float((grads[(device, "loop")] - ref).abs().max() / scale),
            "vmap_vs_cpu": float((grads[(device, "vmap")] - ref).abs().max() / scale),
        }
    return out


def higher_step(omega_model, outer, b: TaskBatch, steps: int, lr: float) -> None:
    import higher

    outer.zero_grad(set_to_none=True)
    inner_opt = torch.optim.SGD(omega_model.parameters(), lr=lr)
    n = len(b)
    for i in range(n):
        with higher.innerloop_ctx(omega_model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            x, y = b.train[0][i], b.train[1][i]
            for _ in range(steps):
                out = fmodel(x)
                loss = F.mse_loss(out, y) if y.is_floating_point() else F.cross_entropy(out, y)
                diffopt.step(loss)
            out = fmodel(b.val[0][i])
            yv = b.val[1][i]
            val = F.mse_loss(out, yv) if yv.is_floating_point() else F.cross_entropy(out, yv)
            (val / n).backward()
    outer.step()


def time_contender(fn, warmup: int, rounds: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak


def benchmark(device: str, quick: bool) -> dict:
    try:
        import higher  # noqa: F401

        with_higher = True
    except ImportError:
        with_higher = False
    results = {}
    for workload, steps in (("sinusoid", 1), ("conv4", 1), ("conv4", 5)):
        name = f"{workload}-{steps}step"
        b = batch(workload, device, torch.float32, torch.Generator().manual_seed(1))
        rounds = 5 if quick else (50 if workload == "sinusoid" else 10)
        row = {}
        lr = inner_lr(workload)
        contenders = ["loop", "vmap"] + (["higher"] if with_higher else [])
        for name_c in contenders:
            torch.manual_seed(0)
            m = model(workload).to(device)
            if name_c == "higher":
                outer = torch.optim.Adam(m.parameters(), 1e-3)

                def fn(m=m, outer=outer, b=b, steps=steps, lr=lr):
                    higher_step(m, outer, b, steps, lr)
            else:
                omega = maml(m, inner_lr(workload))
                outer = torch.optim.Adam(omega.parameters(), 1e-3)

                def fn(omega=omega, outer=outer, mode=name_c, b=b, steps=steps):
                    meta_step(omega, outer, b, steps, batching=mode)
            ms, mib = time_contender(fn, warmup=2 if quick else 5, rounds=rounds)
            row[name_c] = {"ms": round(ms, 2), "peak_mib": round(mib, 1)}
        if with_higher:
            for c in ("loop", "vmap"):
                row[c]["speedup_vs_higher"] = round(row["higher"]["ms"] / row[c]["ms"], 2)
        results[name] = row
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script checks and times the GPU path")
    device = "cuda"
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(f"{info['device']}, torch {info['torch']}")
    correctness = check_correctness(device)
    for w, r in correctness.items():
        print(f"float64 meta-gradient {w}: loop vs CPU {r['loop_vs_cpu']:.1e}, vmap vs CPU {r['vmap_vs_cpu']:.1e}")
    figures = benchmark(device, args.quick)
    print(f"\n{'workload':16s} {'contender':8s} {'ms/iter':>9s} {'peak MiB':>9s} {'x higher':>9s}")
    for w, row in figures.items():
        for c, r in row.items():
            print(f"{w:16s} {c:8s} {r['ms']:9.2f} {r['peak_mib']:9.1f} {r.get('speedup_vs_higher', ''):>9}")
    print(json.dumps({**info, "correctness": correctness, "figures": figures}))


if __name__ == "__main__":
    main()
