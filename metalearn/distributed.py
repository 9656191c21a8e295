r"""Meta-training and evaluation on ``torch.distributed``: each rank adapts its share of the tasks.

DDP does not fit meta-learning: it reduces through hooks on ``.grad``, which the inner loop's
``torch.autograd.grad`` never fires. The design here is the one that does fit. Every outer step
the meta-batch of B tasks (the very batch one process would use at that step) is cut into
contiguous slices, one per rank (uneven when N does not divide B: the first ``B mod N`` ranks
get one task more). Rank r computes the mean meta-gradient :math:`g_r` of its :math:`n_r` tasks
locally, and one flattened, bucketed all-reduce per step sums

.. math::

    g = \sum_r \frac{n_r}{B}\, g_r = \frac{1}{B} \sum_{i=1}^{B} \nabla_\omega \mathcal{L}_i,

the mean over all B tasks, exactly the single-process meta-gradient up to the order of the
floating-point sums. The step's statistics and a "this rank failed" flag travel in the same
round, so every rank clips and steps the outer optimizer with the same gradient, and ω stays
bit-identical across ranks (checked by `omega_checksum` every ``check_every`` steps). θ0 of a
sampled init is drawn for the whole batch from the step's generator and sliced
(`drawing_window`), so a learned init distribution sees the same noise as in one process.

Launch with ``torchrun`` (gloo on CPU, NCCL on GPU; see ``docs/distributed.md``). The library
does its collectives on a process group of its own (`Shard`), created from the initialised
default group with the timeout of `DistributedOptions`, so a rank that dies or hangs makes the
others raise `DistributedError` within that timeout instead of hanging, and the library's
collectives never interleave with the user's.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metalearn.checks import check_clip_grad_norm, check_outer_optimizer
from metalearn.errors import NonFiniteError
from metalearn.knowledge.meta_knowledge import MetaKnowledge
from metalearn.knowledge.parts import Params
from metalearn.mapping import Chunking
from metalearn.modes import MetaGradientMode
from metalearn.outer import _check_grads, _explained_meta_gradient, _grad_norm, _Speed, check_batch, clip_meta_gradient
from metalearn.tasks.task import TaskBatch

__all__ = [
    "DistributedError",
    "DistributedOptions",
    "Shard",
    "drawing_window",
    "omega_checksum",
    "open_shard",
    "shard_bounds",
    "sharded_meta_step",
]

T = TypeVar("T")

#: the environment variables torchrun sets for every rank
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective of the library failed (a rank died, hangs or left early), another rank raised, or
    ω diverged across ranks. The message names the rank and the step, and says how to recover."""


@dataclass(frozen=True)
class DistributedOptions:
    """How `metalearn.meta_train` and `metalearn.evaluate` use ``torch.distributed``.

    Attributes:
        enabled: ``None`` (default): run distributed when a process group is initialised (e.g. the
            script called ``torch.distributed.init_process_group()`` under ``torchrun``), else in
            one process; ``True``: run distributed, initialising the default group from torchrun's
            environment variables if the script did not; ``False``: one process, even in a group.
        timeout: seconds a collective of the library waits for the other ranks before raising
            `DistributedError` (a rank that died is usually noticed at once; one that hangs after
            this long). Make it longer than the slowest step or validation.
        check_every: compare a checksum of ω across ranks after every this many outer steps
            (`omega_checksum`; one tiny all-gather); ``None`` never checks.
        bucket_mb: the meta-gradient is flattened and all-reduced in buckets of at most this many
            megabytes, issued together and awaited together.
    """

    enabled: bool | None = None
    timeout: float = 600.0
    check_every: int | None = 100
    bucket_mb: float = 64.0

    def __post_init__(self) -> None:
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise TypeError(f"DistributedOptions(enabled=...) must be None, True or False, got {self.enabled!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise ValueError(
                f"DistributedOptions(timeout=...) must be a positive number of seconds, got {self.timeout!r}"
            )
        if self.check_every is not None and (
            isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1
        ):
            raise ValueError(
                f"DistributedOptions(check_every=...) must be an int of at least 1 or None, got {self.check_every!r}"
            )
        if isinstance(self.bucket_mb, bool) or not isinstance(self.bucket_mb, (int, float)) or not self.bucket_mb > 0:
            raise ValueError(f"DistributedOptions(bucket_mb=...) must be a positive number, got {self.bucket_mb!r}")


def distributed_options(value: Any) -> DistributedOptions:
    """``value`` of a ``distributed=`` argument as `DistributedOptions` (``None``/``True``/``False`` or itself)."""
    if isinstance(value, DistributedOptions):
        return value
    if value is None or isinstance(value, bool):
        return DistributedOptions(enabled=value)
    raise TypeError(
        f"distributed must be None (use an initialised process group), True, False or a "
        f"metalearn.DistributedOptions, got {type(value).__name__}"
    )


def check_distributed_option(value: Any) -> None:
    """Raises `TypeError` / `ValueError` for a ``distributed=`` value that is not usable (before any work)."""
    if isinstance(value, Shard):
        return
    options = distributed_options(value)
    if options.enabled and not dist.is_available():
        raise ValueError("distributed=True, but this torch build has no torch.distributed; pass distributed=None")


def shard_bounds(n_tasks: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous slice ``[lo, hi)`` of ``n_tasks`` that ``rank`` of ``world_size`` takes.

    The first ``n_tasks % world_size`` ranks take one task more, so the shares differ by at most
    one (5 tasks on 2 ranks: ``[0, 3)`` and ``[3, 5)``); a rank may get none when ``n_tasks`` is
    smaller than ``world_size``.
    """
    base, extra = divmod(n_tasks, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@dataclass
class Shard:
    """This process's place in a distributed run: its rank, the group the library reduces on, the options.

    Built by `open_shard`; `meta_train` and `evaluate` open one per call (or take the caller's).

    Attributes:
        rank: this process's rank, 0 .. ``world_size - 1``; rank 0 writes the log and checkpoints.
        world_size: the number of ranks.
        group: the library's own process group (created with ``options.timeout``).
        options: the `DistributedOptions`.
        device: where collective buffers live: ω's CUDA device for NCCL, else the CPU.
    """

    rank: int
    world_size: int
    group: Any = field(repr=False)
    options: DistributedOptions
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes files and prints)."""
        return self.rank == 0

    def bounds(self, n_tasks: int) -> tuple[int, int]:
        """This rank's slice ``[lo, hi)`` of ``n_tasks`` (`shard_bounds`)."""
        return shard_bounds(n_tasks, self.world_size, self.rank)

    # -- collectives, each turning a transport failure into DistributedError --------------------------------

    def _failed(self, what: str, err: BaseException) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.world_size}: {what} failed ({_first_line(err)}). Another rank died, left "
            f"the run early or did not answer within DistributedOptions(timeout={self.options.timeout:g}) s. Every "
            "rank stops here; the last checkpoint is intact: start all ranks again to resume from it"
        )

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except DistributedError:
            raise
        except (RuntimeError, ValueError, OSError) as err:  # gloo/NCCL report a lost peer or a timeout so
            raise self._failed(what, err) from err

    def all_reduce(self, tensors: list[Tensor], what: str) -> None:
        """Sums ``tensors`` in place over the ranks: every all-reduce issued at once, then awaited."""

        def run() -> None:
            works = [dist.all_reduce(t, group=self.group, async_op=True) for t in tensors]
            for work in works:
                work.wait()

        self._call(what, run)

    def all_gather_objects(self, value: Any, what: str) -> list[Any]:
        """``value`` of every rank, in rank order (pickled; for small things)."""
        out: list[Any] = [None] * self.world_size
        self._call(what, lambda: dist.all_gather_object(out, value, group=self.group))
        return out

    def broadcast_object(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` on every rank (pickled)."""
        box = [value if self.is_main else None]
        src = dist.get_global_rank(self.group, 0)
        self._call(what, lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def any(self, flag: bool, what: str) -> bool:
        """Whether ``flag`` is true on any rank."""
        t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        self.all_reduce([t], what)
        return bool(t.item() > 0)

    # -- one rank's failure is every rank's failure --------------------------------------------------------

    def raise_if_failed(self, error: BaseException | None, what: str) -> None:
        """Raises on every rank if ``error`` is set on any: that rank re-raises its own, the others
        a `DistributedError` (or a `NonFiniteError`) naming it. One all-gather of small objects."""
        report = None if error is None else (type(error).__name__, str(error), getattr(error, "task", None))
        reports = self.all_gather_objects(report, what)
        failed = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
        if not failed:
            return
        if error is not None:
            raise error
        rank, (kind, message, task) = failed[0]
        text = f"rank {rank} failed while {what}: {kind}: {message}"
        if kind == NonFiniteError.__name__:
            raise NonFiniteError(text, task=task)
        raise DistributedError(text + " (every rank stops here)")

    def main_only(self, fn: Callable[[], T], what: str) -> T:
        """Runs ``fn`` on rank 0 only and returns its result on every rank; if it raises, every rank
        raises (rank 0 its own error, the others a `DistributedError` naming it)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # carried to the other ranks, then re-raised here
                error = err
        report = (result, None if error is None else _first_line(error))
        result, message = self.broadcast_object(report, what)
        if error is not None:
            raise error
        if message is not None:
            raise DistributedError(f"rank 0 failed while {what}: {message} (every rank stops here)")
        return result  # type: ignore[return-value]

    def close(self) -> None:
        """Destroys the library's group (the default group stays: it is the script's, or kept for later calls)."""
        if self.group is not None and dist.is_initialized():
            with contextlib.suppress(Exception):  # a group broken by a dead rank cannot be torn down cleanly
                dist.destroy_process_group(self.group)
            self.group = None


def _init_from_environment(device: torch.device) -> None:
    """Initialises the default group from torchrun's environment (``env://``); refuses a missing one."""
    missing = [v for v in _TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(
            f"distributed=True, but no process group is initialised and the environment lacks {missing}: launch "
            "the script with torchrun (e.g. torchrun --standalone --nproc_per_node=2 script.py), or call "
            "torch.distributed.init_process_group() first, or pass distributed=None to run in one process"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def _collective_device(backend: str, device: torch.device) -> torch.device:
    """Where the library's collective buffers live: ω's GPU when the group can reduce CUDA tensors with
    NCCL, else the CPU (gloo); an NCCL-only group with ω off the GPU is refused."""
    if "nccl" in backend and device.type == "cuda":
        return device
    if "nccl" in backend and "gloo" not in backend:
        raise ValueError(
            f"the process group uses NCCL but ω is on {device}: move ω to the rank's GPU, e.g. "
            "torch.cuda.set_device(local_rank); omega.to(f'cuda:{local_rank}'), or initialise the group with gloo"
        )
    return torch.device("cpu")


def open_shard(distributed: Any, device: torch.device) -> Shard | None:
    """The `Shard` a ``distributed=`` argument asks for, or ``None`` to run in one process.

    ``None`` and `DistributedOptions(enabled=None)` pick up an initialised group (a group of one
    rank runs as one process); ``True`` also initialises the default group from torchrun's
    environment (gloo, or NCCL for ω on CUDA) and leaves it initialised for later calls (end the
    script with ``torch.distributed.destroy_process_group()``); ``False`` never runs distributed. A
    `Shard` passes through unchanged. Collective: every rank of the group must call it.

    Args:
        distributed: ``None``, a bool, `DistributedOptions` or a `Shard`.
        device: ω's device (NCCL needs ω on the rank's CUDA device, e.g. ``cuda:LOCAL_RANK``).

    Raises:
        ValueError: ``True`` without a group or torchrun's environment; NCCL with ω not on CUDA.
        TypeError: a ``distributed`` of another type.
    """
    if isinstance(distributed, Shard):
        return distributed
    options = distributed_options(distributed)
    if options.enabled is False or not dist.is_available():
        return None
    if not dist.is_initialized():
        if options.enabled is None:
            return None
        _init_from_environment(device)
    world_size = dist.get_world_size()
    if world_size == 1 and options.enabled is None:
        return None
    backend = str(dist.get_backend())
    comm_device = _collective_device(backend, device)
    try:  # collective: waits for every rank (within the default group's timeout)
        group = dist.new_group(backend=backend, timeout=timedelta(seconds=float(options.timeout)))
    except (RuntimeError, ValueError, OSError) as err:
        raise DistributedError(
            f"rank {dist.get_rank()} of {world_size}: creating the library's process group failed "
            f"({_first_line(err)}): another rank died or did not call the same metalearn function. Start all "
            "ranks again"
        ) from err
    return Shard(dist.get_rank(), world_size, group, options, comm_device)


@contextlib.contextmanager
def shard_scope(distributed: Any, device: torch.device) -> Iterator[Shard | None]:
    """`open_shard` for a ``with`` block; a shard opened here is closed at its end (a passed-in one is not)."""
    shard = open_shard(distributed, device)
    try:
        yield shard
    finally:
        if shard is not None and not isinstance(distributed, Shard):
            shard.close()


# -- θ0 of a slice: the slice of the batch's θ0 ------------------------------------------------------------


@contextlib.contextmanager
def drawing_window(omega: MetaKnowledge, lo: int, total: int) -> Iterator[None]:
    """While active, ``omega.initial_params(n, generator)`` returns tasks ``lo .. lo+n-1`` of the θ0 that
    ``initial_params(total, generator)`` draws, so a rank's slice starts where one process's would.

    Why: every mode draws θ0 through this one method, and a sampled init (`GaussianInit`,
    `ScaledInit`) draws the noise of all tasks at once from a sequential generator; a rank cannot
    skip to its tasks' numbers, so it draws the whole batch's (cheap next to the inner loop) and keeps
    its slice. An init that reads the tasks' train halves (`PrototypeInit`) is computed per task from
    the slice itself; one that also draws random numbers cannot be sharded exactly and is refused.
    """
    draw = omega.initial_params  # the bound method; shadowed on the instance only inside the block

    def windowed(n_tasks: int, generator: torch.Generator | None = None, train: Any = None) -> Params:
        if omega.init.uses_train_data:
            before = None if generator is None else generator.get_state()
            theta0 = draw(n_tasks, generator, train)
            if before is not None and generator is not None and not torch.equal(before, generator.get_state()):
                raise ValueError(
                    f"{type(omega.init).__name__} reads the tasks' train halves and draws random numbers, so its "
                    "θ0 on a rank's share of the tasks differs from one process's; run it in one process "
                    "(distributed=False)"
                )
            return theta0
        full = draw(total, generator, train=None)
        return {name: t[lo : lo + n_tasks] for name, t in full.items()}

    omega.initial_params = windowed  # type: ignore[method-assign]
    try:
        yield
    finally:
        del omega.initial_params


# -- the sharded outer step --------------------------------------------------------------------------------


def _slice_batch(batch: TaskBatch, lo: int, hi: int) -> TaskBatch:
    return TaskBatch(
        train=(batch.train[0][lo:hi], batch.train[1][lo:hi]), val=(batch.val[0][lo:hi], batch.val[1][lo:hi])
    )


def slice_for_rank(batch: TaskBatch, shard: Shard) -> TaskBatch:
    """This rank's contiguous share of ``batch`` (views, no copy)."""
    return _slice_batch(batch, *shard.bounds(len(batch)))


def _flat_buckets(grads: list[Tensor], bucket_elems: int) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients flattened per dtype into one buffer each, and those buffers cut into buckets (views)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g.reshape(-1))
    flats = [torch.cat(parts) for parts in by_dtype.values()]
    buckets = [b for flat in flats for b in flat.split(bucket_elems)]
    return flats, buckets


@dataclass(frozen=True)
class ReduceReport:
    """What the step's reduction cost: wall seconds in the collectives (waiting for slower ranks
    included) and the bytes each rank contributed."""

    seconds: float
    nbytes: int


def reduce_meta_gradient(
    shard: Shard, omega: MetaKnowledge, weight: float, summary: list[float], failed: bool, step: int | None
) -> tuple[list[float], bool, ReduceReport]:
    """Replaces every ω ``.grad`` by ``Σ_r weight_r · grad_r`` over the ranks, in one round of bucketed
    all-reduces that also sums ``weight · summary`` (the step's statistics), whether each parameter has a
    gradient anywhere (``None`` stays ``None``, as optimizers skip those) and a failure flag.

    Returns:
        (the reduced statistics, whether any rank failed, the `ReduceReport`).
    """
    params = list(omega.parameters())
    has_grad = [p.grad is not None for p in params]
    meta = torch.tensor(
        [1.0 if failed else 0.0, *(weight * v for v in summary), *map(float, has_grad)],
        dtype=torch.float64,
        device=shard.device,
    )
    grads = [
        (p.grad if p.grad is not None and not failed else torch.zeros_like(p)).detach().to(shard.device) for p in params
    ]
    bucket_bytes = int(shard.options.bucket_mb * 2**20)
    flats, buckets = (
        _flat_buckets(grads, max(1, bucket_bytes // max(g.element_size() for g in grads))) if grads else ([], [])
    )
    for flat in flats:
        flat.mul_(weight)
    began = time.perf_counter()
    where = "" if step is None else f" at outer step {step}"
    shard.all_reduce([meta, *buckets], f"the all-reduce of the meta-gradient{where}")
    seconds = time.perf_counter() - began
    values = meta.tolist()
    failed_anywhere = values[0] > 0
    reduced_summary, present = values[1 : 1 + len(summary)], values[1 + len(summary) :]
    if not failed_anywhere:
        _unflatten_into(params, flats, [flag > 0 for flag in present])
    nbytes = meta.numel() * meta.element_size() + sum(f.numel() * f.element_size() for f in flats)
    return reduced_summary, failed_anywhere, ReduceReport(seconds, nbytes)


def _unflatten_into(params: list[torch.nn.Parameter], flats: list[Tensor], present: list[bool]) -> None:
    """Sets each parameter's ``.grad`` to its slice of the reduced buffer of its dtype (``None`` where no
    rank had a gradient)."""
    offsets: dict[torch.dtype, int] = {}
    by_dtype = {f.dtype: f for f in flats}
    for p, keep in zip(params, present, strict=True):
        flat = by_dtype[p.dtype]
        start = offsets.get(p.dtype, 0)
        offsets[p.dtype] = start + p.numel()
        if not keep:
            p.grad = None
            continue
        view = flat[start : start + p.numel()].view_as(p)
        p.grad = view if view.device == p.device else view.to(p.device)


_SUMMARY = ("meta_loss", "val_metric", "inner_loss_first", "inner_loss_last")


def sharded_meta_step(
    shard: Shard,
    omega: MetaKnowledge,
    outer_optimizer: torch.optim.Optimizer,
    batch: TaskBatch,
    inner_steps: int,
    *,
    lo: int,
    total: int,
    first_order: bool = False,
    batching: str = "auto",
    clip_grad_norm: float | None = None,
    generator: torch.Generator | None = None,
    mode: str | MetaGradientMode = "unrolled",
    step: int | None = None,
    chunk_size: int | str | None = None,
    memory_budget: int | None = None,
    kernels: str = "auto",
    precision: str = "float32",
) -> dict[str, float | str]:
    """`metalearn.meta_step` on this rank's share ``batch`` (tasks ``lo .. lo+len(batch)-1`` of a
    meta-batch of ``total``): local meta-gradient, one all-reduce, then the same clipping and outer
    step on every rank. Collective: every rank calls it with its own share.

    An error on one rank (a NaN loss, a bad label) is raised on every rank in the same step (the
    others raise it as a `NonFiniteError` / `DistributedError` naming the rank), and ω and the
    outer optimizer are then untouched everywhere.

    Returns:
        `metalearn.meta_step`'s statistics of the whole meta-batch (the means over all ``total``
        tasks), with ``reduce_seconds`` and ``reduce_bytes`` of the reduction added.
    """
    n = len(batch)
    clip_grad_norm = check_clip_grad_norm(clip_grad_norm)
    if precision == "fp16":
        raise ValueError(
            "precision='fp16' is not run under torch.distributed (its loss scale would have to agree across "
            "ranks); use precision='bf16' or 'float32', or run in one process (distributed=False)"
        )
    # each rank's share runs in chunks of chunk_size, under the precision's autocast
    speed = _Speed(precision=precision, chunking=Chunking(chunk_size, memory_budget), kernels=kernels)
    check_outer_optimizer(omega, outer_optimizer)
    outer_optimizer.zero_grad(set_to_none=True)
    error: Exception | None = None
    summary = [0.0] * len(_SUMMARY)
    ran = "none"
    if n:
        try:
            check_batch("meta_step", omega, batch, inner_steps)
            with drawing_window(omega, lo, total):
                stats = _explained_meta_gradient(
                    omega, batch, inner_steps, first_order, batching, generator, mode, speed
                ).stats
            summary = [getattr(stats, k) for k in _SUMMARY]
            ran = stats.batching
        except Exception as err:  # reported to every rank through the reduction's failure flag
            error = _with_global_task(err, lo, shard, n)
    reduced, failed, report = reduce_meta_gradient(shard, omega, n / total, summary, error is not None, step)
    if failed:
        outer_optimizer.zero_grad(set_to_none=True)
        shard.raise_if_failed(error, "computing its share of the meta-gradient")
    grad_norm = _grad_norm([p.grad for p in omega.parameters() if p.grad is not None])
    _check_grads(omega, grad_norm)  # the same reduced gradient on every rank: all raise or none
    clip_meta_gradient(list(omega.parameters()), clip_grad_norm, grad_norm)  # as metalearn.meta_step clips
    outer_optimizer.step()
    return {
        **dict(zip(_SUMMARY, reduced, strict=True)),
        "batching": ran,
        "grad_norm": float(grad_norm),
        "reduce_seconds": report.seconds,
        "reduce_bytes": float(report.nbytes),
    }


def _with_global_task(err: Exception, lo: int, shard: Shard, n: int) -> Exception:
    """A `NonFiniteError` of this rank's task ``i`` renamed as task ``lo + i`` of the whole meta-batch."""
    if not isinstance(err, NonFiniteError):
        return err
    task = None if err.task is None else lo + err.task
    where = f"rank {shard.rank} (tasks {lo}..{lo + n - 1} of the meta-batch)"
    renamed = NonFiniteError(f"{where}: {err}", task=task, step=err.step)
    renamed.__cause__ = err
    return renamed


# -- ω identical on every rank -----------------------------------------------------------------------------


def omega_checksum(omega: MetaKnowledge) -> Tensor:
    """A cheap fingerprint of ω's parameters and buffers: float64 ``[Σ t, Σ t², Σ w·t]`` over every entry,
    ``w`` a fixed ramp (so a permutation shows too). Equal on ranks whose ω is bit-identical."""
    total = torch.zeros(3, dtype=torch.float64)
    for t in omega.state_dict().values():
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1).to(torch.float64)
        ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
        total += torch.stack([flat.sum(), (flat * flat).sum(), (flat * ramp).sum()]).cpu()
    return total


def check_identical(shard: Shard, omega: MetaKnowledge, step: int) -> None:
    """Raises `DistributedError` on every rank if ω's checksum differs from rank 0's on some rank."""
    sums = shard.all_gather_objects(omega_checksum(omega).tolist(), f"the ω checksum after outer step {step}")
    diverged = [r for r, s in enumerate(sums) if s != sums[0]]
    if diverged:
        raise DistributedError(
            f"ω diverged across ranks after outer step {step}: rank(s) {diverged} differ from rank 0 "
            f"(checksums {[sums[r] for r in [0, *diverged]]}). Every rank must run the same code, torch version "
            "and device type, and ω may only change through meta_train; restart from the last checkpoint"
        )


def checksum_due(shard: Shard, completed: int) -> bool:
    """Whether ω's checksum is compared after ``completed`` steps (every ``check_every``)."""
    every = shard.options.check_every
    return every is not None and completed % every == 0
