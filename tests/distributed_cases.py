"""What the distributed tests compute, shared by the test (one process) and the ranks it launches
(`tests/distributed_worker.py`), so both build the very same ω, tasks and runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from reference import image_batch, regression_batch
from torch import nn

from metalearn import GaussianInit, Implicit, InnerSGD, MetaKnowledge, MetaSGD, TaskBatch
from metalearn.models import MLP, Conv4
from metalearn.tasks import Sinusoid

#: tasks per meta-batch: uneven on 2 ranks (3 + 2)
META_BATCH = 5
WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def child_environment(**extra: str) -> dict[str, str]:
    """The environment of a launched rank: this checkout first on the path, one thread."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **extra}

#: (name, model kind, method)
GRADIENT_CASES = [
    (f"{method}-{model}", model, method)
    for model in ("mlp", "conv4")
    for method in ("maml", "meta_sgd", "gaussian", "imaml")
]


def model_for(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLP((2, 16, 16, 1))
    return Conv4(num_classes=3, hidden=4, image_size=16)


def omega_for(kind: str, method: str) -> MetaKnowledge:
    """ω in float64 for a gradient case (deterministic: the same on every process)."""
    model = model_for(kind)
    if method == "meta_sgd":
        omega = MetaKnowledge(model, optimizer=MetaSGD(0.1))
    elif method == "gaussian":
        omega = MetaKnowledge(model, optimizer=InnerSGD(0.1), init=GaussianInit(init_scale=0.05))
    else:
        omega = MetaKnowledge(model, optimizer=InnerSGD(0.1))
    return omega.double()


def mode_for(method: str):
    return Implicit(lam=1.0, cg_steps=3) if method == "imaml" else "unrolled"


def batch_for(kind: str, seed: int = 3) -> TaskBatch:
    if kind == "mlp":
        x_tr, y_tr, x_val, y_val = regression_batch(META_BATCH, 6, 6, 2, seed=seed)
    else:
        x_tr, y_tr, x_val, y_val = image_batch(META_BATCH, 3, 1, 2, 1, 16, seed=seed)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(11)


def flat_grads(omega: MetaKnowledge) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in omega.named_parameters() if p.grad is not None}


# -- a short training run -------------------------------------------------------------------------------

TRAIN_TASKS = Sinusoid(4, 4, seed=0, length=None)
VAL_TASKS = Sinusoid(4, 4, seed=1, length=7)


def train_omega() -> tuple[MetaKnowledge, torch.optim.Optimizer]:
    """A learned init distribution with Meta-SGD step sizes (float64), and Adam on it."""
    torch.manual_seed(0)
    omega = MetaKnowledge(MLP((1, 8, 8, 1)), optimizer=MetaSGD(0.01), init=GaussianInit(init_scale=0.05))
    return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)


def train_settings(**overrides):
    settings = dict(
        inner_steps=1, meta_batch_size=META_BATCH, clip_grad_norm=1.0, seed=5, progress=False,
        val_tasks=VAL_TASKS, val_every=2, checkpoint_every=2,
    )
    settings.update(overrides)
    return settings


def evaluation_tasks():
    return [VAL_TASKS[i] for i in range(len(VAL_TASKS))]


# -- launching ranks ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out: Path, world_size: int = 2, timeout: float = 240.0) -> list[int]:
    """Runs ``scenario`` of the worker on ``world_size`` ranks (torchrun's environment, 127.0.0.1, a free
    port); returns each rank's exit code. Output goes to ``out/rank<r>.log``."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(world_size):
        env = child_environment(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return codes


def rank_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("rank*.log")))
