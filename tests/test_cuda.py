"""The GPU path: meta-gradients on CUDA equal the CPU's, runs written on a GPU resume on it, the
examples run with ``--device cuda``, chunks bound the device memory.

Every test here is marked ``cuda`` and skipped where no CUDA device is visible (tests/conftest.py).
Float64 compares exactly enough to catch a wrong kernel or a lost gradient term; CUDA's reductions
sum in another order than the CPU's, so the tolerance is rounding's (1e-10 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import reference
import torch
from torch import Tensor, nn

from metalearn import (
    MLP,
    Conv4,
    InnerSGD,
    MetaKnowledge,
    ResumeEnvironmentWarning,
    load_checkpoint,
    maml,
    meta_gradient,
    meta_sgd,
    meta_train,
)
from metalearn.checkpoint import latest_checkpoint
from metalearn.modes import Checkpointed, Implicit, Reptile, Truncated, Unrolled
from metalearn.tasks import Sinusoid, TaskBatch
from metalearn.train.sources import to_device

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
CUDA = "cuda"


def tiny_mlp(seed: int = 0) -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP((1, 16, 16, 1), activation=nn.Tanh).to(DT)


def small_conv4(seed: int = 0) -> Conv4:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Conv4(num_classes=3, in_channels=1, hidden=8, image_size=16).to(DT)


def regression(n_tasks: int = 5) -> TaskBatch:
    x_tr, y_tr, x_val, y_val = reference.regression_batch(n_tasks, 5, 7, 1, seed=1)
    return TaskBatch(train=(x_tr, y_tr), val=(x_val, y_val))


def classification(n_tasks: int = 4, ways: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    y_tr, y_val = torch.arange(ways).repeat(n_tasks, 2), torch.arange(ways).repeat(n_tasks, 3)
    x_tr = torch.randn(n_tasks, y_tr.shape[1], 1, 16, 16, generator=g, dtype=DT)
    x_val = torch.randn(n_tasks, y_val.shape[1], 1, 16, 16, generator=g, dtype=DT)
    return TaskBatch((x_tr, y_tr), (x_val, y_val))


def meta_grads(omega: MetaKnowledge, batch: TaskBatch, device: str, **kwargs) -> dict[str, Tensor]:
    omega.to(device).zero_grad(set_to_none=True)
    meta_gradient(omega, batch.to(device), 2, **kwargs)
    return {n: p.grad.detach().cpu().clone() for n, p in omega.named_parameters() if p.grad is not None}


def assert_close(got: dict[str, Tensor], want: dict[str, Tensor], tol: float = 1e-10) -> None:
    """Every entry within ``tol`` of the largest entry of the whole meta-gradient (a conv bias
    before a batch norm has a gradient of rounding noise only)."""
    assert got.keys() == want.keys() and want
    scale = max(float(w.abs().max()) for w in want.values())
    for name in want:
        assert float((got[name] - want[name]).abs().max()) <= tol * scale, name


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("mode", [Unrolled(), Unrolled(first_order=True), Truncated(k=1)], ids=lambda m: str(m))
@pytest.mark.parametrize("recipe", [maml, meta_sgd])
def test_mlp_meta_gradient_on_cuda_equals_cpu(recipe, mode, batching, chunk) -> None:
    omega = recipe(tiny_mlp(), 0.3)
    want = meta_grads(omega, regression(), "cpu", batching="loop", mode=mode)
    assert_close(meta_grads(omega, regression(), CUDA, batching=batching, mode=mode, chunk_size=chunk), want)


@pytest.mark.parametrize("chunk", [None, 1, "auto"])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_conv4_with_batch_norm_second_order_on_cuda_equals_cpu(batching, chunk) -> None:
    omega = maml(small_conv4(), 0.2)
    want = meta_grads(omega, classification(), "cpu", batching="loop")
    got = meta_grads(omega, classification(), CUDA, batching=batching, chunk_size=chunk)  # auto: free memory
    assert_close(got, want)


@pytest.mark.parametrize("mode", [Checkpointed(), Implicit(lam=1.0, cg_steps=3), Reptile()], ids=lambda m: m.name)
@pytest.mark.filterwarnings("ignore:iMAML. the proximal inner problem is far from solved")
def test_loop_only_modes_on_cuda_equal_cpu(mode) -> None:
    omega = maml(tiny_mlp(), 0.1)
    assert_close(meta_grads(omega, regression(), CUDA, mode=mode), meta_grads(omega, regression(), "cpu", mode=mode))


def test_chunks_lower_the_peak_cuda_memory() -> None:
    torch.manual_seed(0)
    omega = maml(Conv4(num_classes=5, in_channels=1, hidden=32, image_size=28), 0.4).to(CUDA)
    g = torch.Generator().manual_seed(0)
    y_tr, y_val = torch.arange(5).repeat(16, 1), torch.arange(5).repeat(16, 15)
    batch = TaskBatch((torch.randn(16, 5, 1, 28, 28, generator=g), y_tr),
                      (torch.randn(16, 75, 1, 28, 28, generator=g), y_val)).to(CUDA)

    def peak(chunk) -> int:
        omega.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        meta_gradient(omega, batch, 1, batching="vmap", chunk_size=chunk)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    peak(None)  # warm up cuDNN's workspaces
    whole, chunked = peak(None), peak(2)
    assert chunked < 0.5 * whole, (chunked, whole)


def test_pinned_copy_of_a_batch_to_cuda_keeps_values_and_dtypes() -> None:
    batch = classification()
    moved = to_device(batch, torch.device(CUDA))
    torch.cuda.synchronize()
    for before, after in zip((*batch.train, *batch.val), (*moved.train, *moved.val), strict=True):
        assert after.is_cuda and after.dtype == before.dtype
        assert torch.equal(after.cpu(), before)


def _train(omega: MetaKnowledge, folder: Path, steps: int):
    """Meta-trains a float32 ω (Sinusoid's tasks are float32) with checkpoints every 2 steps."""
    opt = torch.optim.Adam(omega.parameters(), 1e-2)
    tasks = Sinusoid(5, 5, seed=0, length=None)
    return meta_train(omega, tasks, opt, steps=steps, inner_steps=1, meta_batch_size=4, checkpoint_dir=folder,
                      checkpoint_every=2, progress=False)


def test_a_run_written_on_cuda_resumes_on_cuda_like_an_uninterrupted_one(tmp_path) -> None:
    whole = meta_sgd(tiny_mlp().float(), 0.1).to(CUDA)
    _train(whole, tmp_path / "whole", 6)
    first = meta_sgd(tiny_mlp().float(), 0.1).to(CUDA)
    _train(first, tmp_path / "split", 4)
    resumed = meta_sgd(tiny_mlp().float(), 0.1).to(CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeEnvironmentWarning)  # same device: no warning
        result = _train(resumed, tmp_path / "split", 6)
    assert result.resumed_from == 4
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters(), strict=True):
        assert b.is_cuda, name
        assert torch.equal(a, b), name  # same device, threads and torch: bit-identical (metalearn.checkpoint)


def test_a_cuda_checkpoint_loads_on_the_cpu_and_warns_on_resume(tmp_path) -> None:
    omega = maml(tiny_mlp().float(), 0.1).to(CUDA)
    _train(omega, tmp_path / "run", 2)
    on_cpu = maml(tiny_mlp(seed=5).float(), 0.1)
    info = load_checkpoint(latest_checkpoint(tmp_path / "run"), omega=on_cpu)
    assert info.device.startswith("cuda")
    for (name, a), (_, b) in zip(omega.named_parameters(), on_cpu.named_parameters(), strict=True):
        assert not b.is_cuda and torch.equal(a.cpu(), b), name
    with pytest.warns(ResumeEnvironmentWarning, match=r"omega.to\('cuda:0'\) before meta_train"):
        _train(maml(tiny_mlp().float(), 0.1), tmp_path / "run", 4)


def test_an_optimizer_state_resumed_on_cuda_lives_on_cuda(tmp_path) -> None:
    omega = MetaKnowledge(tiny_mlp().float(), optimizer=InnerSGD(0.1)).to(CUDA)
    _train(omega, tmp_path / "run", 2)
    again = MetaKnowledge(tiny_mlp().float(), optimizer=InnerSGD(0.1)).to(CUDA)
    opt = torch.optim.Adam(again.parameters(), 1e-2)
    load_checkpoint(latest_checkpoint(tmp_path / "run"), omega=again, outer_optimizer=opt)
    states = [s for s in opt.state.values()]
    assert states and all(s["exp_avg"].is_cuda and s["exp_avg_sq"].is_cuda for s in states)


def _example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_sinusoid_example_on_cuda(tmp_path) -> None:
    _example("sinusoid.py", "--smoke", "--no-progress", "--device", "cuda", "--out", str(tmp_path))
    assert all(row["mse"] > 0 for row in json.loads((tmp_path / "results.json").read_text()))


def test_custom_knowledge_example_on_cuda(tmp_path) -> None:
    out = _example("custom_knowledge.py", "--smoke", "--device", "cuda", "--out", str(tmp_path))
    assert "batching='auto' picks 'vmap' for this MLP on cuda" in out


@pytest.mark.parametrize("method, chunk", [("maml", []), ("maml", ["--chunk-size", "2"]), ("imaml", []),
                                          ("darts", [])])
def test_omniglot_example_on_cuda(tmp_path, method, chunk) -> None:
    from omniglot_fixture import write_omniglot

    root = tmp_path / "omniglot"
    write_omniglot(root)
    run_dir = tmp_path / "run"
    args = ["--root", str(root), "--run-dir", str(run_dir), "--smoke", "--no-progress", "--ways", "2",
            "--n-source", "7", "--n-val", "2", "--method", method, "--device", "cuda", *chunk]
    _example("omniglot.py", *args)
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["iterations"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0
    checkpoint = torch.load(latest_checkpoint(run_dir / "checkpoints"), weights_only=True)
    assert checkpoint["device"].startswith("cuda")
    _example("omniglot.py", *args)  # resumes on the GPU from its checkpoint
