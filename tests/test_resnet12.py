"""ResNet-12 and DropBlock: structure, exactness under vmap (float64, second order), explicit randomness;
and the Conv-4 at 32 filters for 84x84 inputs."""

from __future__ import annotations

import pytest
import torch
from fd_check import fd_check

from metalearn.knowledge import InnerSGD, MetaKnowledge, maml
from metalearn.mapping import choose_batching, random_layers
from metalearn.models import BatchNorm, Conv4, DropBlock, ResNet12
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks.task import TaskBatch

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tiny(seed: int = 0, **kwargs) -> ResNet12:
    """A ResNet-12 of widths 2/3/3/4 on 16x16 inputs, weights from an explicit generator (float64)."""
    model = ResNet12(3, in_channels=1, channels=(2, 3, 3, 4), image_size=16, **kwargs).to(F64)
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") or name.endswith("shortcut.1.weight") else 0.0
            p.copy_(base + 0.4 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


def _batch(n_tasks: int = 2, ways: int = 3, shots: int = 2, size: int = 16, seed: int = 1) -> TaskBatch:
    g = _gen(seed)

    def half():
        x = torch.randn(n_tasks, ways * shots, 1, size, size, generator=g, dtype=F64)
        return x, torch.arange(ways).repeat_interleave(shots).expand(n_tasks, -1).clone()

    return TaskBatch(train=half(), val=half())


def _grads(omega: MetaKnowledge, batch: TaskBatch, batching: str, steps: int = 2) -> dict[str, torch.Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, batching=batching)
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def _conv_params(c_in: int, c: int) -> int:
    return 9 * c_in * c + 2 * 9 * c * c + c_in * c + 4 * 2 * c  # three 3x3 convs, the 1x1 shortcut, four norms


def test_resnet12_has_the_standard_widths_and_parameter_count() -> None:
    model = ResNet12(5)
    widths = [3, 64, 160, 320, 640]
    expected = sum(_conv_params(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)) + 640 * 5 + 5
    assert sum(p.numel() for p in model.parameters()) == expected  # 12.4M, as the literature's ResNet-12
    assert model.feature_size == 640
    assert ResNet12(5, global_pool=False).feature_size == 640 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    norms = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert len(norms) == 16  # 3 per block + the shortcut's
    assert not any(isinstance(m, DropBlock) for m in model.modules())


def test_resnet12_forward_shapes_and_embedding() -> None:
    x = torch.randn(2, 1, 16, 16, dtype=F64)
    model = _tiny()
    assert model(x).shape == (2, 3)
    assert model.features(x).shape == (2, 4)
    flat = ResNet12(0, in_channels=1, channels=(2, 3, 3, 4), image_size=32, global_pool=False).to(F64)
    assert flat(torch.randn(2, 1, 32, 32, dtype=F64)).shape == (2, 4 * 2 * 2)
    with pytest.raises(ValueError, match="4 widths"):
        ResNet12(5, channels=(64, 160))
    with pytest.raises(ValueError, match="too small"):
        ResNet12(5, image_size=8)


def test_resnet12_block_applies_leaky_relu_with_slope_0_1() -> None:
    block = _tiny().features[0]
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    h = block.conv1(x)
    manual = torch.nn.functional.leaky_relu(block.norm1(h), 0.1)
    pre = block.norm1(h)
    assert torch.allclose(manual, torch.where(pre > 0, pre, 0.1 * pre))
    h2 = torch.nn.functional.leaky_relu(block.norm2(block.conv2(manual)), 0.1)
    out = torch.nn.functional.leaky_relu(block.norm3(block.conv3(h2)) + block.shortcut(x), 0.1)
    assert torch.equal(block(x), torch.nn.functional.max_pool2d(out, 2))


@pytest.mark.parametrize("steps", [1, 2])
def test_resnet12_meta_gradient_loop_equals_vmap_second_order(steps: int) -> None:
    omega = maml(_tiny(), lr=0.3)
    batch = _batch()
    loop, vm = _grads(omega, batch, "loop", steps), _grads(omega, batch, "vmap", steps)
    assert set(loop) == set(vm) == {n for n, _ in omega.named_parameters()}
    scale = max(g.abs().max().item() for g in loop.values())
    for name in loop:
        err = (loop[name] - vm[name]).abs().max().item()
        assert err <= 1e-10 * max(scale, 1.0), f"{name}: loop vs vmap differ by {err:.3g}"


def test_resnet12_meta_gradient_matches_finite_differences() -> None:
    omega = maml(_tiny(seed=2), lr=0.3)
    batch = _batch(n_tasks=1, seed=3)
    names = ["model.features.0.conv1.weight", "model.features.2.norm3.weight", "model.head.bias"]
    fd_check(omega, lambda: meta_loss(omega, batch, 1, batching="loop"), names)


def test_dropblock_is_identity_in_eval_and_at_rate_zero() -> None:
    x = torch.randn(2, 3, 8, 8)
    block = DropBlock(0.3, 3, _gen(0)).eval()
    assert torch.equal(block(x), x)
    assert torch.equal(DropBlock(0.0, 3)(x), x)


def test_dropblock_drops_whole_squares_from_its_own_generator() -> None:
    x = torch.ones(4, 2, 12, 12)
    block = DropBlock(0.2, 3, _gen(5))
    rng = torch.random.get_rng_state()
    out = block(x)
    assert torch.equal(torch.random.get_rng_state(), rng)  # torch's global generator is untouched
    kept = out > 0
    assert 0 < (~kept).sum() < kept.numel()
    assert torch.allclose(out[kept], torch.full_like(out[kept], kept.numel() / kept.sum().item()))
    # every dropped unit lies in a dropped 3x3 square (a mask from max-pooled centres)
    dropped = (~kept).to(torch.float32)
    covered = torch.nn.functional.max_pool2d(
        -torch.nn.functional.max_pool2d(-dropped, 3, stride=1, padding=1), 3, stride=1, padding=1
    )
    assert torch.equal((covered > 0) | kept, torch.ones_like(kept))
    again = DropBlock(0.2, 3, _gen(5))(x)
    assert torch.equal(again, out)  # the same generator seed, the same mask
    assert not torch.equal(block(x), out)  # the generator moved on


def test_dropblock_forces_the_loop_and_is_refused_under_vmap() -> None:
    omega = maml(_tiny(drop_rate=0.1, dropblock_size=2, generator=_gen(0)), lr=0.3)
    assert random_layers(omega.model) == ["features.2.dropblock", "features.3.dropblock"]
    assert choose_batching(omega, torch.device("cuda")) == "loop"
    with pytest.raises(ValueError, match="batching='loop'"):
        meta_gradient(omega, _batch(), 1, batching="vmap")
    omega.eval()
    assert random_layers(omega.model) == []
    meta_gradient(omega, _batch(), 1, batching="vmap")  # eval mode: no DropBlock, vmap allowed


def test_dropblock_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="drop_rate"):
        DropBlock(1.0)
    with pytest.raises(ValueError, match="block_size"):
        DropBlock(0.1, 0)


def test_conv4_at_32_filters_for_84x84_images() -> None:
    model = Conv4(5, in_channels=3, hidden=32, image_size=84)
    assert model.feature_size == 32 * 5 * 5
    assert model(torch.randn(2, 3, 84, 84)).shape == (2, 5)
    assert {m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)} == {32}
    MetaKnowledge(model, optimizer=InnerSGD(0.01))  # a valid ω
