"""``precision=``: bf16 autocast with ω in float32, fp16 refused off CUDA, the loss scale exact and its skips."""

from __future__ import annotations

import pytest
import torch

from metalearn.knowledge.recipes import maml
from metalearn.models import MLP
from metalearn.outer import MetaStep, meta_step
from metalearn.precision import LossScaler, check_precision
from metalearn.tasks.regression import Sinusoid
from metalearn.tasks.task import TaskBatch
from metalearn.train import TrainConfig, meta_train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _batch(dtype: torch.dtype = torch.float32, n: int = 4, k: int = 6) -> TaskBatch:
    g = torch.Generator().manual_seed(1)
    x = lambda: (torch.rand(n, k, 1, generator=g) * 4 - 2).to(dtype)  # noqa: E731
    y = lambda: torch.randn(n, k, 1, generator=g).to(dtype)  # noqa: E731
    return TaskBatch(train=(x(), y()), val=(x(), y()))


def _omega(dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return maml(MLP((1, 32, 32, 1)).to(dtype), lr=0.1)


def _grads(omega) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in omega.parameters()])


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_bf16_meta_gradient_is_close_to_float32_and_omega_stays_float32(batching: str) -> None:
    ref, low = _omega(), _omega()
    meta_step(ref, torch.optim.SGD(ref.parameters(), lr=0.0), _batch(), 1, batching=batching)
    row = meta_step(low, torch.optim.SGD(low.parameters(), lr=0.0), _batch(), 1, batching=batching, precision="bf16")
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in low.parameters())
    g, g_ref = _grads(low), _grads(ref)
    assert not torch.equal(g, g_ref)  # autocast did run in bf16
    cosine = float(torch.nn.functional.cosine_similarity(g, g_ref, dim=0))
    assert cosine > 0.95
    assert isinstance(row["meta_loss"], float)


def test_outer_step_and_optimizer_state_stay_float32_under_bf16() -> None:
    omega = _omega()
    opt = torch.optim.Adam(omega.parameters(), lr=1e-3)
    step = MetaStep(omega, opt, 1, precision="bf16")
    step(_batch())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())


def test_fp16_is_refused_on_cpu_with_the_fix() -> None:
    omega = _omega()
    opt = torch.optim.SGD(omega.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device.*use precision='bf16'"):
        MetaStep(omega, opt, 1, precision="fp16")
    with pytest.raises(ValueError, match="precision='fp16' needs a CUDA device"):
        meta_train(omega, Sinusoid(5, 5, length=8), opt, steps=1, inner_steps=1, meta_batch_size=2, precision="fp16",
                   progress=False)
    with pytest.raises(ValueError, match="MetaStep"):
        meta_step(omega, opt, _batch(), 1, precision="fp16")
    assert all(p.grad is None for p in omega.parameters())


@pytest.mark.parametrize("bad", ["fp32", "half", None, 16])
def test_unknown_precision_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision(bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(steps=1, inner_steps=1, meta_batch_size=1, precision=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_loss_scaled_meta_gradient_equals_the_unscaled_one(batching: str) -> None:
    # a power-of-two scale multiplies and divides exactly: float64, bit for bit
    ref, scaled = _omega(torch.float64), _omega(torch.float64)
    MetaStep(ref, torch.optim.SGD(ref.parameters(), lr=0.0), 2, batching=batching)(_batch(torch.float64))
    scaler = LossScaler(init_scale=2.0**10)
    row = MetaStep(scaled, torch.optim.SGD(scaled.parameters(), lr=0.0), 2, batching=batching, loss_scaler=scaler)(
        _batch(torch.float64)
    )
    assert scaler.applied
    assert torch.equal(_grads(scaled), _grads(ref))
    assert row["loss_scale"] == 2.0**10 and row["skipped_steps"] == 0


def test_overflowing_scaled_gradient_skips_the_step_and_backs_off() -> None:
    omega = _omega(torch.float64)
    before = [p.detach().clone() for p in omega.parameters()]
    scaler = LossScaler(init_scale=1e308)  # the scaled backward overflows to Inf; the losses stay finite
    step = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.1), 1, loss_scaler=scaler)
    batch = _batch(torch.float64)
    far = TaskBatch(train=batch.train, val=(batch.val[0], batch.val[1] + 1000.0))  # dL/d output ~ 300
    row = step(far)
    assert row["meta_loss"] < float("inf")
    assert row["skipped_steps"] == 1 and scaler.skipped == 1
    assert scaler.scale == pytest.approx(0.5e308)
    assert all(torch.equal(p, b) for p, b in zip(omega.parameters(), before, strict=True))  # ω unchanged
    assert all(p.grad is None for p in omega.parameters())


def test_loss_scale_grows_after_growth_interval_finite_steps() -> None:
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    for _ in range(2):
        scaler.update(True)
    assert scaler.scale == 8.0
    scaler.update(True)
    assert scaler.scale == 16.0
    scaler.update(False)
    assert scaler.scale == 8.0 and scaler.skipped == 1
    restored = LossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_meta_train_in_bf16_records_the_precision_in_its_identity() -> None:
    omega = _omega()
    opt = torch.optim.Adam(omega.parameters(), lr=1e-3)
    result = meta_train(omega, Sinusoid(5, 5, length=16), opt, steps=2, inner_steps=1, meta_batch_size=4,
                        precision="bf16", progress=False)
    assert result.steps == 2
    assert all(p.dtype == torch.float32 for p in omega.parameters())
    assert TrainConfig(steps=1, inner_steps=1, meta_batch_size=1, precision="bf16").identity()["precision"] == "bf16"
    assert "precision" not in TrainConfig(steps=1, inner_steps=1, meta_batch_size=1).identity()


@cuda
def test_fp16_on_cuda_is_close_to_float32() -> None:
    device = torch.device("cuda")
    ref, low = _omega().to(device), _omega().to(device)
    batch = _batch().to(device)
    MetaStep(ref, torch.optim.SGD(ref.parameters(), lr=0.0), 1)(batch)
    step = MetaStep(low, torch.optim.SGD(low.parameters(), lr=0.0), 1, precision="fp16")
    row = step(batch)
    assert row["skipped_steps"] == 0 and step.loss_scaler is not None
    cosine = float(torch.nn.functional.cosine_similarity(_grads(low), _grads(ref), dim=0))
    assert cosine > 0.95
    assert all(p.dtype == torch.float32 for p in low.parameters())
