"""Milliseconds per meta-iteration and peak memory: metalearn and ``higher``, side by side in one run.

Usage::

    python benchmarks/meta_iteration.py [--quick] [--only sinusoid|conv4] [--no-tune-malloc] [--no-memory]

Workloads (random tensors of the real shapes; second-order MAML; one outer Adam step per
meta-iteration, included for every contender):

- ``sinusoid``: MLP 1-40-40-1, meta-batch 25, K=10 train and 10 val points, 1 inner SGD
  step (α=0.01), MSE;
- ``conv4-1step`` and ``conv4-5steps``: `metalearn.models.Conv4` (its `BatchNorm`, batch
  statistics) on Omniglot-shaped 5-way 1-shot 15-query tasks (train x ``[32, 5, 1, 28, 28]``,
  val x ``[32, 75, 1, 28, 28]``), meta-batch 32, 1 or 5 inner SGD steps (α=0.4), cross-entropy.

Contenders, each on the same model class with the same initial weights:

- ``metalearn auto``: `metalearn.outer.meta_step` with ``batching="auto"`` (the path it
  chose is reported); the other path (``loop`` or ``vmap``) is timed too, for information
  (the Conv-4's vmap batching runs task-batched, `metalearn.task_batched`: in float32 at parity or a
  little faster than the loop with a few times its memory, so ``auto`` keeps the loop there);
  ``metalearn bf16`` is ``precision="bf16"`` with ``auto`` (the one judged; on the Conv-4 it runs the
  task-batched path, faster under bf16), ``metalearn bf16 loop`` (Conv-4, for information) with the loop;
- ``higher`` (when installed): the usual higher MAML loop, one ``higher.innerloop_ctx`` per
  task with a ``torch.optim.SGD`` inner optimizer, each task's val loss / B backpropagated
  as soon as it exists, on the very same module as metalearn (`metalearn.models.Conv4`);
- ``higher torch-conv4`` (Conv-4 workloads): the same higher loop on the Conv-4 a higher
  user writes from torch's layers, as in higher's own MAML Omniglot example: ``nn.Conv2d``,
  ``nn.BatchNorm2d`` with batch statistics (``track_running_stats=False``), ``nn.ReLU``,
  ``nn.MaxPool2d(2)``, ``nn.Linear``, with the same initial weights. It computes the same
  function; `metalearn.models.Conv4` differs in how: the fused batch norm outside vmap (its
  primitive formula inside), and the max-pool before the ReLU (bit-identical values).

Before timing, the first iteration of ``metalearn auto`` and of ``higher`` start from the
same weights and their meta-gradients are compared (they must agree to float32 rounding).

Timing: torch on one thread; after warm-up, the contenders of a workload run in turns
(round robin, so load from other processes hits all of them alike, in an order reversed every
other round, so none always runs right after the same other one); each figure is the median
over the rounds, of wall-clock time and of this process's CPU time. A sinusoid contender's turn is
``SINUSOID_BACK_TO_BACK`` meta-iterations back to back (as a training loop runs them; a ~1 ms
iteration timed alone right after another contender pays for that one's cache footprint), a Conv-4
contender's turn one meta-iteration (seconds long). The ``compile=True`` contender's cold compile
(its first call) is timed with torch's on-disk compile caches empty: the run points
``TORCHINDUCTOR_CACHE_DIR`` at a fresh temporary directory (removed at the end) unless it is set.

Peak memory: each contender runs alone in fresh subprocesses (Linux; median of
``--memory-repeats``), and a thread polls, during its meta-iterations, (a) glibc's bytes in
use (``mallinfo2``) and (b) its anonymous resident memory; each figure is the peak minus the
value just after setup (imports, model, data). The target uses (a): it is what the
computation holds, and repeats to within 0.1 MiB. (b) and the total peak RSS (``VmHWM``,
reset after setup) are printed too: with the tuned allocator, freed heap memory stays
resident, so they are about 3x (a) and move by tens of MiB between identical runs; total RSS
also counts torch's library pages. ``tracemalloc`` does not see torch's allocations.

Allocator: with glibc's default thresholds, large CPU tensors are mmap'ed and unmapped on
every step, which changes Conv-4 timings a lot. Unless ``--no-tune-malloc`` is given, the
script re-executes itself with ``GLIBC_TUNABLES`` set to `TUNED_MALLOC` (it cannot be set
from inside a running process); every contender and every memory subprocess runs under the
same setting, which is printed and recorded.

Targets (issue 13), printed with each ratio and whether it is met: sinusoid, the whole ``meta_train``
step at most 1.1x the hand-written torch.func vmap loop and at least 8x faster than the fastest peer's
bare meta-iteration, ``compile=True`` at least 2x faster than eager; Conv-4 (1 and 5 steps), float32 at
parity or better against the fastest float32 peer with no more peak heap, and ``precision="bf16"`` at
least 1.7x faster than that peer in float32. Float32 parity is judged on the paired rounds
(`paired_ratio`): met unless the 95% interval of ours / the peer's time lies wholly above 1 (the run
shows ours slower); the ratio of the medians is printed for information. The comparisons with higher
(on the identical module and on torch's own layers) are printed too. The last line printed is one JSON
object with all figures.

A full run takes about 15 minutes on 2 busy CPU cores; ``--quick`` (about a minute) is a
smoke run whose figures are rough.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.func import functional_call  # noqa: E402

from metalearn.knowledge.recipes import maml  # noqa: E402
from metalearn.mapping import choose_batching  # noqa: E402
from metalearn.models import MLP, Conv4  # noqa: E402
from metalearn.outer import MetaStep, meta_step  # noqa: E402
from metalearn.tasks import EpisodicTaskSet, Sinusoid, TensorLabelledDataset  # noqa: E402
from metalearn.tasks.task import TaskBatch  # noqa: E402
from metalearn.train import meta_train  # noqa: E402

TUNED_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=68719476736"
_REEXEC_MARK = "METALEARN_BENCH_REEXEC"
SINUSOID_TARGET = 8.0
FLOOR_TARGET = 1.1  # sinusoid: the whole meta_train step at most this many times the hand-written vmap loop
COMPILE_TARGET = 2.0  # sinusoid: compile=True at least this many times faster than eager
BF16_TARGET = 1.7  # Conv-4: precision="bf16" at least this many times faster than the fastest peer in float32
QUICK_CONV4_META_BATCH = 2
#: meta_train steps per timed run: its one-off setup (checks, the run, the step object: a few ms) is spread over
#: them, as over the thousands of steps of a real run (sinusoid MAML: 70,000)
META_TRAIN_STEPS = {"sinusoid": 100, "conv4": 1}
SINUSOID_BACK_TO_BACK = 10  # meta-iterations per timed turn of every other sinusoid contender (see run_workload)
UNAVAILABLE_PEERS = {
    "learn2learn": "learn2learn 0.2.0's sdist does not build on Python 3.11 (needs Cython re-run): not measured",
    "torchmeta": "torchmeta pins torch<1.10: not installable next to torch 2.x, not measured",
}
HIGHER_TORCH = "higher torch-conv4"
OUTER_LR = 1e-3
MEMORY_METHOD = (
    "each contender alone in fresh subprocesses (median of --memory-repeats), peak during the meta-iterations "
    "minus the value after setup, of: heap = glibc mallinfo2 bytes in use (polled every 0.2 ms; the target "
    "uses it); anon RSS = resident minus file-backed pages (/proc/self/statm, polled); RSS = total resident "
    "(VmHWM reset via /proc/self/clear_refs), which also counts torch's library pages"
)


@dataclass(frozen=True)
class Workload:
    """One benchmarked configuration."""

    name: str
    description: str
    steps: int
    inner_lr: float
    target: str


WORKLOADS = {
    "sinusoid": Workload(
        "sinusoid", "MLP 1-40-40-1, meta-batch 25, K=10 train + 10 val, 1 inner step", 1, 0.01,
        f"metalearn auto >= {SINUSOID_TARGET:g}x faster than higher",
    ),
    "conv4-1step": Workload(
        "conv4-1step", "Conv-4 (metalearn BatchNorm), Omniglot 5w1s15q, meta-batch 32, 1 inner step", 1, 0.4,
        "metalearn auto faster than higher, peak memory <= higher's",
    ),
    "conv4-5steps": Workload(
        "conv4-5steps", "Conv-4 (metalearn BatchNorm), Omniglot 5w1s15q, meta-batch 32, 5 inner steps", 5, 0.4,
        "metalearn auto faster than higher, peak memory <= higher's",
    ),
}


def has_higher() -> bool:
    try:
        import higher  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------- data and models


def make_batch(workload: str, quick: bool = False) -> TaskBatch:
    """A fixed random meta-batch of the workload's shapes (``quick``: a Conv-4 meta-batch of
    `QUICK_CONV4_META_BATCH`, so a smoke run fits in a minute)."""
    g = torch.Generator().manual_seed(0)
    if workload == "sinusoid":
        n, k = 25, 10
        return TaskBatch(
            train=(torch.rand(n, k, 1, generator=g) * 10 - 5, torch.randn(n, k, 1, generator=g)),
            val=(torch.rand(n, k, 1, generator=g) * 10 - 5, torch.randn(n, k, 1, generator=g)),
        )
    n, ways, shots, queries = (QUICK_CONV4_META_BATCH if quick else 32), 5, 1, 15
    return TaskBatch(
        train=(
            torch.rand(n, ways * shots, 1, 28, 28, generator=g),
            torch.arange(ways).repeat_interleave(shots).expand(n, -1).clone(),
        ),
        val=(
            torch.rand(n, ways * queries, 1, 28, 28, generator=g),
            torch.arange(ways).repeat_interleave(queries).expand(n, -1).clone(),
        ),
    )


def make_model(workload: str) -> nn.Module:
    """The workload's network, with the same initial weights on every call."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP((1, 40, 40, 1)) if workload == "sinusoid" else Conv4(5)


def torch_conv4(workload: str) -> nn.Module:
    """The Conv-4 of torch's layers (paper order: conv, BN, ReLU, pool), with `make_model`'s weights."""
    ours = make_model(workload)
    layers: list[nn.Module] = []
    for i in range(4):
        conv, norm = ours.features[4 * i], ours.features[4 * i + 1]
        bn = nn.BatchNorm2d(norm.num_features, eps=norm.eps, track_running_stats=False)
        layers += [conv, bn, nn.ReLU(), nn.MaxPool2d(2)]
        bn.load_state_dict(norm.state_dict())
    return nn.Sequential(*layers, nn.Flatten(), ours.head)


def task_loss(workload: str) -> Callable[[Tensor, Tensor], Tensor]:
    return F.mse_loss if workload == "sinusoid" else F.cross_entropy


# ---------------------------------------------------------------- contenders


@dataclass
class Contender:
    """A ready-to-run meta-iteration and where its meta-gradient lands."""

    name: str
    run: Callable[[], str]  # runs one meta-iteration (or `per_run` of them), returns the path it took
    grads: Callable[[], dict[str, Tensor]]  # the model's gradients by parameter name
    per_run: int = 1  # meta-iterations per call of run (figures are per meta-iteration)
    repeat: int = 1  # calls of run back to back in each timed turn (set by run_workload)
    exact: bool = True  # float32 with the same meta-gradient: compared with metalearn auto's first one
    info: dict | None = None  # anything measured on the way (e.g. the cold compile time)


def _model_grads(model: nn.Module) -> Callable[[], dict[str, Tensor]]:
    return lambda: {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def metalearn_contender(workload: str, variant: str, quick: bool = False) -> Contender:
    """``variant``: a batching (``auto``, ``loop``, ``vmap``: `meta_step`), ``bf16`` (auto batching,
    ``precision="bf16"``), ``bf16 loop`` (the same, loop batching) or ``compile`` (`MetaStep` with
    ``compile=True``, compiled in warm-up)."""
    w = WORKLOADS[workload]
    batch = make_batch(workload, quick)
    omega = maml(make_model(workload), lr=w.inner_lr)
    outer = torch.optim.Adam(omega.parameters(), lr=OUTER_LR)
    grads = _model_grads(omega.model)
    if variant == "compile":
        step = MetaStep(omega, outer, w.steps, compile=True)
        info: dict = {}

        def run_compiled() -> str:
            row = step(batch)
            if step.compile_seconds is not None:
                info["cold_compile_s"] = step.compile_seconds
            return str(row["batching"]) + (" compiled" if step.compile_seconds is not None else " eager")

        return Contender("metalearn compile", run_compiled, grads, info=info)
    precision = "bf16" if variant.startswith("bf16") else "float32"
    batching = {"bf16": "auto", "bf16 loop": "loop"}.get(variant, variant)

    def run() -> str:
        return str(meta_step(omega, outer, batch, w.steps, batching=batching, precision=precision)["batching"])

    return Contender(f"metalearn {variant}", run, grads, exact=precision == "float32")


def meta_train_contender(workload: str, quick: bool = False) -> Contender:
    """The whole `meta_train` step: sampling (sinusoid family / episodes of a synthetic image set), the
    checks, the stats row, the progress bar; ``META_TRAIN_STEPS`` steps per timed call."""
    w = WORKLOADS[workload]
    omega = maml(make_model(workload), lr=w.inner_lr)
    outer = torch.optim.Adam(omega.parameters(), lr=OUTER_LR)
    family = "sinusoid" if workload == "sinusoid" else "conv4"
    steps = META_TRAIN_STEPS[family]
    if family == "sinusoid":
        tasks = Sinusoid(10, 10, length=None)
        meta_batch = 25
    else:
        g = torch.Generator().manual_seed(0)
        classes, per_class = 200, 20  # synthetic Omniglot-shaped images: the sampling cost is the real one
        data = TensorLabelledDataset(
            torch.rand(classes * per_class, 1, 28, 28, generator=g), torch.arange(classes).repeat_interleave(per_class)
        )
        tasks = EpisodicTaskSet(data, ways=5, shots=1, queries=15, length=None)
        meta_batch = QUICK_CONV4_META_BATCH if quick else 32

    def run() -> str:
        result = meta_train(omega, tasks, outer, steps=steps, inner_steps=w.steps, meta_batch_size=meta_batch,
                            progress=False)
        return str(result.history[-1]["batching"]) + " + sampling"

    return Contender("metalearn meta_train", run, _model_grads(omega.model), per_run=steps, exact=False)


def floor_contender(workload: str, quick: bool = False) -> Contender:
    """The hand-written floor: MAML in a few lines of torch.func on the same model. Sinusoid: vmap of
    ``grad`` over the tasks, one backward of the mean; Conv-4: the per-task loop of
    ``functional_call`` + ``autograd.grad(create_graph=True)``, each task's val loss / B backpropagated
    at once (vmap is ~2x slower with ~10x the memory there)."""
    w = WORKLOADS[workload]
    batch = make_batch(workload, quick)
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    model = make_model(workload)
    params = dict(model.named_parameters())
    outer = torch.optim.Adam(params.values(), lr=OUTER_LR)
    loss_fn = task_loss(workload)

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    if workload == "sinusoid":
        def one(p: dict[str, Tensor], xt: Tensor, yt: Tensor, xv: Tensor, yv: Tensor) -> Tensor:
            p_k = p
            for _ in range(w.steps):
                g = torch.func.grad(loss)(p_k, xt, yt)
                p_k = {k: p_k[k] - w.inner_lr * g[k] for k in p_k}
            return loss(p_k, xv, yv)

        def run() -> str:
            outer.zero_grad(set_to_none=True)
            torch.func.vmap(one, in_dims=(None, 0, 0, 0, 0))(params, x_tr, y_tr, x_val, y_val).mean().backward()
            outer.step()
            return "torch.func vmap"

        return Contender("floor torch.func", run, _model_grads(model))

    def run_loop() -> str:
        outer.zero_grad(set_to_none=True)
        for i in range(n):
            p_k = params
            for _ in range(w.steps):
                g = torch.autograd.grad(loss(p_k, x_tr[i], y_tr[i]), list(p_k.values()), create_graph=True)
                p_k = {k: v - w.inner_lr * gk for (k, v), gk in zip(p_k.items(), g, strict=True)}
            (loss(p_k, x_val[i], y_val[i]) / n).backward()
        outer.step()
        return "torch.func loop"

    return Contender("floor torch.func", run_loop, _model_grads(model))


def torchopt_contender(workload: str, quick: bool = False) -> Contender:
    """TorchOpt's MAML loop (its Python path, ``torchopt.MetaSGD``), on the very same module as metalearn:
    per task, extract the state, adapt, backpropagate the val loss / B, recover the state."""
    import torchopt

    w = WORKLOADS[workload]
    batch = make_batch(workload, quick)
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    model = make_model(workload)
    outer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
    inner = torchopt.MetaSGD(model, lr=w.inner_lr)
    loss_fn = task_loss(workload)

    def run() -> str:
        outer.zero_grad(set_to_none=True)
        for i in range(n):
            state = torchopt.extract_state_dict(model, enable_visual=False, by="reference")
            opt_state = torchopt.extract_state_dict(inner, by="reference")
            for _ in range(w.steps):
                inner.step(loss_fn(model(x_tr[i]), y_tr[i]))
            (loss_fn(model(x_val[i]), y_val[i]) / n).backward()
            torchopt.recover_state_dict(model, state)
            torchopt.recover_state_dict(inner, opt_state)
        outer.step()
        return "per-task loop"

    return Contender("torchopt", run, _model_grads(model))


def has_torchopt() -> bool:
    try:
        import torchopt  # noqa: F401
    except Exception:  # noqa: BLE001 - an install whose compiled op fails to load is as good as none here
        return False
    return True


def higher_contender(workload: str, torch_layers: bool = False, quick: bool = False) -> Contender:
    import higher

    w = WORKLOADS[workload]
    batch = make_batch(workload, quick)
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    n = len(batch)
    model = torch_conv4(workload) if torch_layers else make_model(workload)
    outer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
    inner = torch.optim.SGD(model.parameters(), lr=w.inner_lr)
    loss_fn = task_loss(workload)

    def run() -> str:
        outer.zero_grad(set_to_none=True)
        for i in range(n):
            with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(w.steps):
                    diffopt.step(loss_fn(fmodel(x_tr[i]), y_tr[i]))
                (loss_fn(fmodel(x_val[i]), y_val[i]) / n).backward()
        outer.step()
        return "per-task loop"

    def grads() -> dict[str, Tensor]:
        # torch_conv4 holds the same parameter objects in the same order: report them by our names
        names = [n for n, _ in make_model(workload).named_parameters()]
        return {n: p.grad.clone() for n, p in zip(names, model.parameters(), strict=True) if p.grad is not None}

    return Contender(HIGHER_TORCH if torch_layers else "higher", run, grads)


def auto_path(workload: str) -> str:
    omega = maml(make_model(workload), lr=WORKLOADS[workload].inner_lr)
    return choose_batching(omega, torch.device("cpu"))


PEERS = ("higher", HIGHER_TORCH, "torchopt")  # the float32 peers; the fastest one sets the ratios
NO_MEMORY = ("metalearn meta_train", "metalearn compile", "floor torch.func")  # timed only


def build(workload: str, name: str, quick: bool = False) -> Contender:
    if name in ("higher", HIGHER_TORCH):
        return higher_contender(workload, torch_layers=name == HIGHER_TORCH, quick=quick)
    if name == "torchopt":
        return torchopt_contender(workload, quick)
    if name == "metalearn meta_train":
        return meta_train_contender(workload, quick)
    if name == "floor torch.func":
        return floor_contender(workload, quick)
    return metalearn_contender(workload, name.removeprefix("metalearn "), quick)


def contender_names(workload: str, quick: bool, compile_: bool = True) -> list[str]:
    other = "loop" if auto_path(workload) == "vmap" else "vmap"
    names = ["metalearn auto"]
    names.append(f"metalearn {other}")
    names += ["metalearn meta_train", "metalearn bf16", "floor torch.func"]
    if workload.startswith("conv4"):  # for information: the Conv-4's loop under bf16 (auto runs task-batched)
        names.append("metalearn bf16 loop")
    if workload == "sinusoid" and compile_:
        names.append("metalearn compile")
    if has_higher():
        names.append("higher")
        if workload.startswith("conv4"):
            names.append(HIGHER_TORCH)
    if has_torchopt():
        names.append("torchopt")
    return names


# ---------------------------------------------------------------- measurement


def grad_agreement(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """max |a - b| over every entry, relative to the largest |b| (whole-gradient scale)."""
    scale = max(float(g.abs().max()) for g in b.values())
    return max(float((a[n] - b[n]).abs().max()) for n in b) / scale


def time_round_robin(contenders: list[Contender], warmup: int, rounds: dict[str, int]) -> tuple[dict, dict]:
    """Warm-up, then the contenders in turns, in alternating order; medians of wall and CPU ms,
    the paths taken, and how far the first iteration's meta-gradients of metalearn and higher differ."""
    paths: dict[str, str] = {}
    agreement = None
    for c in contenders:
        paths[c.name] = c.run()  # first iteration: from the shared initial weights
    by_name = {c.name: c for c in contenders}
    agreement = {
        c.name: grad_agreement(by_name["metalearn auto"].grads(), c.grads())
        for c in contenders if c.exact and c.name != "metalearn auto"
    }
    for c in contenders:
        for _ in range(warmup - 1):
            c.run()
    wall: dict[str, list[float]] = {c.name: [] for c in contenders}
    cpu: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(max(rounds.values())):
        # the order alternates (A B, B A, ...): whoever runs right after another contender pays
        # for the caches and heap layout it left behind
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            if r >= rounds[c.name]:
                continue
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(c.repeat):
                c.run()
            wall[c.name].append(1e3 * (time.perf_counter() - w0) / (c.per_run * c.repeat))
            cpu[c.name].append(1e3 * (time.process_time() - c0) / (c.per_run * c.repeat))
    figures = {
        c.name: {
            "path": paths[c.name],
            "ms": statistics.median(wall[c.name]),
            "ms_min": min(wall[c.name]),
            "ms_max": max(wall[c.name]),
            "cpu_ms": statistics.median(cpu[c.name]),
            "iterations": len(wall[c.name]) * c.per_run * c.repeat,
            "rounds_ms": [round(v, 2) for v in wall[c.name]],  # in round order: pairs with the others' rounds
            **(c.info or {}),
        }
        for c in contenders
    }
    return figures, agreement


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]


def _anon_rss_bytes() -> int:
    """Resident anonymous memory: resident minus file-backed/shared pages (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


class MemoryPeaks:
    """Peaks of glibc's bytes in use and of resident anonymous memory, polled on a thread.

    * heap: ``mallinfo2`` chunks in use + mmap'ed chunks. Unlike RSS it does not count what
      the allocator keeps after a free, so it is the memory the computation itself holds,
      free of heap fragmentation. Not available off glibc (or before glibc 2.33).
    * anonymous RSS: resident minus file-backed pages. Total RSS also counts the pages of
      torch's shared libraries, which the kernel drops and faults back in at its own pace
      (here, a DAMON ``pageout`` scheme), so it moves by tens of MiB from run to run.

    A thread polls every ``interval`` seconds (torch releases the GIL in its ops and in
    backward), so a peak shorter than that can be missed.
    """

    def __init__(self, interval: float = 2e-4) -> None:
        try:
            self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo2.restype = _MallInfo2
        except (OSError, AttributeError):
            self._mallinfo2 = None
        self.heap_available = self._mallinfo2 is not None
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.heap_base = self.heap_peak = self._heap()
        self.anon_base = self.anon_peak = _anon_rss_bytes()

    def _heap(self) -> int:
        if self._mallinfo2 is None:
            return 0
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        self.heap_peak = max(self.heap_peak, self._heap())
        self.anon_peak = max(self.anon_peak, _anon_rss_bytes())

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> MemoryPeaks:
        self.heap_base = self.heap_peak = self._heap()
        self.anon_base = self.anon_peak = _anon_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def measure_memory_here(workload: str, name: str, iterations: int) -> dict:
    """Runs in the memory subprocess: what the meta-iterations add to memory, in MiB.

    ``heap_mib`` and ``anon_rss_mib``: `MemoryPeaks` minus their values after setup.
    ``rss_mib``: peak total RSS during the iterations minus RSS after setup; the kernel's
    high-water mark (``VmHWM``) is reset after setup by writing 5 to ``/proc/self/clear_refs``
    so that the import-time peak does not hide it (``ru_maxrss``, the whole process's peak,
    where that is refused).
    """
    import resource

    contender = build(workload, name)
    gc.collect()
    setup = _status_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss_method = "VmHWM after clear_refs"
    except OSError:
        rss_method = "ru_maxrss"
    with MemoryPeaks() as peaks:
        for _ in range(iterations):
            contender.run()
    if rss_method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    else:
        peak = _status_kib("VmHWM")
    return {
        "heap_mib": (peaks.heap_peak - peaks.heap_base) / 2**20 if peaks.heap_available else None,
        "anon_rss_mib": (peaks.anon_peak - peaks.anon_base) / 2**20,
        "rss_mib": (peak - setup) / 1024,
        "rss_method": rss_method,
    }


def measure_memory(workload: str, name: str, iterations: int, repeats: int) -> dict | None:
    """Peak memory of one contender: medians over ``repeats`` fresh subprocesses (same
    environment, same allocator). RSS peaks vary by tens of MiB from run to run here."""
    if not Path("/proc/self/status").exists():
        return None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", workload, name, str(iterations)]
    samples = []
    for _ in range(repeats):
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
        if done.returncode != 0:
            print(f"  memory subprocess for {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    heaps = [x["heap_mib"] for x in samples if x["heap_mib"] is not None]
    return {
        "heap_mib": statistics.median(heaps) if len(heaps) == len(samples) else None,
        "anon_rss_mib": statistics.median(x["anon_rss_mib"] for x in samples),
        "rss_mib": statistics.median(x["rss_mib"] for x in samples),
        "heap_samples_mib": [round(h, 1) for h in heaps],
        "anon_rss_samples_mib": [round(x["anon_rss_mib"], 1) for x in samples],
        "rss_samples_mib": [round(x["rss_mib"], 1) for x in samples],
        "rss_method": samples[0]["rss_method"],
        "iterations": iterations,
    }


# ---------------------------------------------------------------- report


def run_workload(workload: str, args: argparse.Namespace) -> dict:
    w = WORKLOADS[workload]
    small = workload == "sinusoid"
    if args.quick:
        warmup, rounds = (2, 3) if small else (1, 1)
    else:
        warmup, rounds = (5, args.rounds or 40) if small else (1, args.rounds or 5)
    names = contender_names(workload, args.quick, compile_=not args.no_compile)
    per = dict.fromkeys(names, rounds)
    meta_batch = QUICK_CONV4_META_BATCH if (args.quick and not small) else (25 if small else 32)
    print(f"\n{workload}: {w.description}{f' (--quick: meta-batch {meta_batch})' if not small and args.quick else ''}, "
          "second order, outer Adam step included", flush=True)
    contenders = [build(workload, n, args.quick) for n in names]
    if small:
        # a training loop runs its steps back to back; a lone ~1 ms step timed right after another
        # contender pays for what that one left in the caches (the compiled sinusoid step: ~1.0 ms so,
        # ~0.55 ms back to back). Every sinusoid contender's turn is SINUSOID_BACK_TO_BACK iterations (the
        # meta_train contender's turn already runs META_TRAIN_STEPS steps in one call)
        for c in contenders:
            c.repeat = 1 if c.per_run > 1 else (2 if args.quick else SINUSOID_BACK_TO_BACK)
    figures, agreement = time_round_robin(contenders, warmup, per)
    del contenders
    gc.collect()
    if not args.no_memory:
        for n in names:
            if n in NO_MEMORY:
                continue
            figures[n]["memory"] = measure_memory(workload, n, 2, args.memory_repeats)
    auto = figures["metalearn auto"]
    other = "loop" if auto["path"] == "vmap" else "vmap"
    result: dict = {"description": w.description, "inner_steps": w.steps, "meta_batch": meta_batch,
                    "contenders": figures, "grad_agreement_vs_auto": agreement, "not_measured": UNAVAILABLE_PEERS}
    result["auto_path"] = auto["path"]
    result[f"{auto['path']}_ms"] = auto["ms"]
    if f"metalearn {other}" in figures:
        result[f"{other}_ms"] = figures[f"metalearn {other}"]["ms"]

    print(f"  {'contender':<21} {'path':<22} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'CPU ms':>9} "
          f"{'n':>3} {'heap MiB':>9} {'anon RSS':>9} {'RSS MiB':>8}")
    for n, f in figures.items():
        mem = f.get("memory") or {}
        heap = f"{mem['heap_mib']:9.1f}" if mem.get("heap_mib") is not None else f"{'-':>9}"
        anon = f"{mem['anon_rss_mib']:9.1f}" if mem else f"{'-':>9}"
        rss = f"{mem['rss_mib']:8.1f}" if mem else f"{'-':>8}"
        print(f"  {n:<21} {f['path']:<22} {f['ms']:10.2f} {f['ms_min']:9.2f} {f['ms_max']:9.2f} "
              f"{f['cpu_ms']:9.2f} {f['iterations']:3d} {heap} {anon} {rss}")
    for name, why in UNAVAILABLE_PEERS.items():
        print(f"  {name}: {why}")
    for name, value in agreement.items():
        print(f"  first meta-gradient, {name} vs metalearn auto: max |diff| / max |grad| = {value:.1e}")
    if "metalearn compile" in figures and "cold_compile_s" in figures["metalearn compile"]:
        print(f"  compile=True: cold compile (first call) {figures['metalearn compile']['cold_compile_s']:.1f} s")
    if "higher" in figures:
        for name in ("higher", HIGHER_TORCH):
            if name in figures:
                result[name.replace(" ", "_").replace("-", "_")] = compare(auto, figures[name], name)
        # the memory target is judged against higher on its own (torch-layer) Conv-4 where there is one
        judged = result.get("higher_torch_conv4") or result["higher"]
        result.update(judged)  # speedup_vs_higher, peak_ratio_vs_higher, ... of the judged comparison
        result["judged_against"] = HIGHER_TORCH if "higher_torch_conv4" in result else "higher"
    result["targets"] = targets(workload, figures, result, args.quick)
    return result


def targets(workload: str, figures: dict, result: dict, quick: bool) -> list[dict]:
    """The issue's targets for ``workload``: each ratio, its bar, and whether it is met (printed)."""
    peers = {n: figures[n]["ms"] for n in PEERS if n in figures}
    fastest = min(peers, key=peers.__getitem__) if peers else None
    auto, out = figures["metalearn auto"]["ms"], []

    def check(what: str, ratio: float, bar: float, at_most: bool = False) -> None:
        met = ratio <= bar if at_most else ratio >= bar
        out.append({"target": what, "ratio": ratio, "bar": bar, "met": met})
        print(f"  target: {what}: {ratio:.2f}x ({'<=' if at_most else '>='} {bar:g}x): {'met' if met else 'NOT met'}"
              + (" (quick run: smoke figures only)" if quick else ""))

    if workload == "sinusoid":
        train_step = figures["metalearn meta_train"]["ms"]
        check("meta_train step / hand-written torch.func vmap loop", train_step / figures["floor torch.func"]["ms"],
              FLOOR_TARGET, at_most=True)
        if fastest is not None:
            check(f"fastest peer's bare meta-iteration ({fastest}) / metalearn meta_train step",
                  peers[fastest] / train_step, SINUSOID_TARGET)
            check(f"fastest peer ({fastest}) / metalearn auto, bare meta-iterations", peers[fastest] / auto,
                  SINUSOID_TARGET)
        if "metalearn compile" in figures:
            compiled = figures["metalearn compile"]["ms"]
            check("eager / compile=True meta-iteration", auto / compiled, COMPILE_TARGET)
            if fastest is not None:  # for orientation: the compiled step (MetaStep) against the same bar
                check(f"fastest peer ({fastest}) / metalearn compile=True, bare meta-iterations",
                      peers[fastest] / compiled, SINUSOID_TARGET)
        return out
    if fastest is not None:
        medians = auto / peers[fastest]
        result.setdefault("information", {})[f"metalearn auto float32 / fastest peer ({fastest}), medians"] = medians
        print(f"  for information: metalearn auto float32 / fastest peer ({fastest}), medians of the rounds: "
              f"{medians:.3f}x")
        paired = paired_ratio(figures["metalearn auto"]["rounds_ms"], figures[fastest]["rounds_ms"])
        if paired is not None:
            # parity or better: the paired rounds do not show ours slower (the interval reaches 1 or below)
            met = paired["low"] <= 1.0
            verdict = ("faster" if paired["high"] < 1.0 else "slower" if paired["low"] > 1.0
                       else "not told apart (parity)")
            out.append({"target": f"metalearn auto float32 / fastest peer ({fastest}), paired rounds, parity or "
                        "better", "ratio": paired["ratio"], "ci95": [paired["low"], paired["high"]],
                        "pairs": paired["pairs"], "bar": 1.0, "met": met})
            print(f"  target: metalearn auto float32 / fastest peer ({fastest}), {paired['pairs']} paired rounds: "
                  f"{paired['ratio']:.3f}x, 95% CI [{paired['low']:.3f}, {paired['high']:.3f}]: {verdict}: "
                  f"{'met' if met else 'NOT met'}" + (" (quick run: smoke figures only)" if quick else ""))
        check(f"fastest peer in float32 ({fastest}) / metalearn bf16", peers[fastest] / figures["metalearn bf16"]["ms"],
              BF16_TARGET)
        if "metalearn bf16 loop" in figures:  # for information, not a target: batching="loop" is the user's choice
            ratio = peers[fastest] / figures["metalearn bf16 loop"]["ms"]
            result.setdefault("information", {})[f"fastest peer in float32 ({fastest}) / metalearn bf16 loop"] = ratio
            print(f"  for information: fastest peer in float32 ({fastest}) / metalearn bf16 with batching='loop': "
                  f"{ratio:.2f}x")
        mem_auto = (figures["metalearn auto"].get("memory") or {}).get("heap_mib")
        mem_peer = (figures[fastest].get("memory") or {}).get("heap_mib")
        if mem_auto is not None and mem_peer is not None:
            check(f"peak heap, metalearn auto / {fastest}", mem_auto / mem_peer, 1.0, at_most=True)
    return out


#: two-sided 95% quantiles of Student's t by degrees of freedom (1-30); 1.96 beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_ratio(ours: list[float], theirs: list[float]) -> dict | None:
    """The time ratio ours / theirs from rounds run side by side: round r of each contender ran within the
    same round (in alternating order), so each pair shares the machine's state at that moment and the drift
    between rounds cancels in its ratio. Returns the geometric mean of the paired ratios with its 95%
    confidence interval (Student's t on the log ratios), or None with fewer than 2 pairs.

    Two contenders running the same kernels differ by less than a run's noise; the interval says whether a
    difference was resolved at all: an upper bound below 1 means ours is faster, a lower bound above 1
    slower, and an interval holding 1 means the run does not tell the two apart."""
    logs = [math.log(a / b) for a, b in zip(ours, theirs, strict=False)]
    if len(logs) < 2:
        return None
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = (_T95[len(logs) - 2] if len(logs) - 2 < len(_T95) else 1.96) * sd / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half), "pairs": len(logs)}


def compare(auto: dict, h: dict, name: str) -> dict:
    """Prints and returns metalearn auto against one higher contender: speed and peak memory."""
    speedup = h["ms"] / auto["ms"]
    cpu_speedup = h["cpu_ms"] / auto["cpu_ms"]
    out = {"speedup_vs_higher": speedup, "cpu_speedup_vs_higher": cpu_speedup}
    line = f"  metalearn auto ({auto['path']}) vs {name}: {speedup:.2f}x faster (CPU time {cpu_speedup:.2f}x)"
    mem_a, mem_h = auto.get("memory"), h.get("memory")
    if mem_a and mem_h:
        key = "heap_mib" if mem_a["heap_mib"] is not None and mem_h["heap_mib"] is not None else "rss_mib"
        out["peak_ratio_vs_higher"] = mem_a[key] / mem_h[key]
        out["anon_rss_ratio_vs_higher"] = mem_a["anon_rss_mib"] / mem_h["anon_rss_mib"]
        out["rss_ratio_vs_higher"] = mem_a["rss_mib"] / mem_h["rss_mib"]
        out["peak_measure"] = key
        line += f"; peak {'heap in use' if key == 'heap_mib' else 'RSS'} {mem_a[key]:.1f} vs " \
                f"{mem_h[key]:.1f} MiB ({out['peak_ratio_vs_higher']:.2f}x; anonymous RSS " \
                f"{out['anon_rss_ratio_vs_higher']:.2f}x, total RSS {out['rss_ratio_vs_higher']:.2f}x)"
    print(line)
    return out


def malloc_setting(args: argparse.Namespace) -> str:
    """Re-executes this script under the tuned allocator if needed; returns the setting in use."""
    current = os.environ.get("GLIBC_TUNABLES")
    if args.no_tune_malloc or args.memory_child:
        return f"GLIBC_TUNABLES={current}" if current else "glibc defaults"
    if current == TUNED_MALLOC:
        return f"GLIBC_TUNABLES={current}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "allocator defaults (not glibc: nothing to tune)"
    if os.environ.get(_REEXEC_MARK):
        raise RuntimeError("re-executing with GLIBC_TUNABLES did not take effect")
    env = dict(os.environ, GLIBC_TUNABLES=TUNED_MALLOC, OMP_NUM_THREADS="1", **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (CI smoke run; figures are rough)")
    parser.add_argument("--only", choices=["sinusoid", "conv4"], help="run one workload family")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per contender (default 40 / 5)")
    parser.add_argument("--no-tune-malloc", action="store_true", help="keep the inherited glibc allocator settings")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses (--quick does)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compile=True contender (--quick does: "
                        "its cold compile alone takes ~1 min)")
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh subprocesses per contender (median)")
    parser.add_argument("--memory-child", nargs=3, metavar=("WORKLOAD", "CONTENDER", "ITERATIONS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # a smoke run in under a minute: no memory subprocesses, no cold compile
        args.no_memory = args.no_compile = True
    malloc = malloc_setting(args)
    torch.set_num_threads(1)
    if args.memory_child:
        workload, name, iterations = args.memory_child
        print(json.dumps(measure_memory_here(workload, name, int(iterations))))
        return

    workloads = [w for w in WORKLOADS if args.only is None or w.startswith(args.only)]
    # the cold compile is cold only with torch's on-disk compile caches empty: an inductor cache directory of
    # this run's own (unless the user names one), removed at the end
    own_cache = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    if own_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="metalearn-bench-inductor-")
    compile_cache = "a fresh temporary directory" if own_cache else os.environ["TORCHINDUCTOR_CACHE_DIR"]
    load_start = os.getloadavg()
    print(f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs, load average {load_start[0]:.2f}; "
          f"allocator: {malloc}; torch compile cache: {compile_cache}")
    print(f"memory: {MEMORY_METHOD}" if not args.no_memory else "memory: not measured (--no-memory)")
    try:
        report = {w: run_workload(w, args) for w in workloads}
    finally:
        if own_cache:
            shutil.rmtree(os.environ.pop("TORCHINDUCTOR_CACHE_DIR"), ignore_errors=True)
    load_end = os.getloadavg()
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("higher", "torchopt"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    higher_version = versions["higher"]
    print(json.dumps({
        "benchmark": "meta_iteration",
        "torch": torch.__version__,
        "higher": higher_version,
        "torchopt": versions["torchopt"],
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "allocator": malloc,
        "compile_cache": compile_cache,
        "quick": args.quick,
        "memory_method": None if args.no_memory else MEMORY_METHOD,
        "timing_method": "median over round-robin turns after warm-up (wall and process CPU time), ms per "
                         f"meta-iteration; a sinusoid turn is {SINUSOID_BACK_TO_BACK} meta-iterations back to back, "
                         "a Conv-4 turn one",
        "load_average_start": load_start[0],
        "load_average_end": load_end[0],
        "workloads": report,
    }))


if __name__ == "__main__":
    main()
