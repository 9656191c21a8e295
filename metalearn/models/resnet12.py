r"""ResNet-12, the backbone of modern few-shot work (Oreshkin et al., 2018; Lee et al., 2019), and DropBlock.

Four residual blocks of 64/160/320/640 filters. Each block is three [conv 3x3, norm, leaky ReLU
0.1] layers (the third activation after the residual sum, as in MetaOptNet), with a 1x1 conv +
norm shortcut, then a 2x2 max-pool and optionally DropBlock (Ghiasi et al., 2018). Its norm is
`BatchNorm` (batch statistics, exact under ``torch.func.vmap``), so the vmap path gives the loop's
meta-gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.models.batchnorm import BatchNorm
from metalearn.models.pooling import MaxPool2x2

__all__ = ["DropBlock", "ResNet12", "ResidualBlock"]


class DropBlock(nn.Module):
    r"""DropBlock (Ghiasi et al., 2018): drops square ``block_size`` regions of a feature map in training.

    Block centres are drawn with probability
    :math:`\gamma = \frac{p}{b^2} \frac{(H W)}{(H - b + 1)(W - b + 1)}` (p = ``drop_rate``,
    b = ``block_size``, clipped to the map); the kept values are rescaled by
    numel / (number kept). The identity in eval mode or with ``drop_rate=0``.

    Randomness is explicit: every mask is drawn from ``generator`` (on its device, then moved to
    the input's), never from torch's global generator. A module that draws random numbers cannot
    run under ``torch.func.vmap`` over tasks: the library runs the per-task loop for a model with
    active DropBlock (``random_in_training``, read by `metalearn.mapping.random_layers`).

    Args:
        drop_rate: p, the fraction of units to drop (in [0, 1)).
        block_size: b, the side of a dropped square.
        generator: the source of the masks (a fresh one seeded with 0 if None).
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    #: read by `metalearn.mapping.random_layers`: the forward draws random numbers in training mode
    random_in_training = True

    def __init__(self, drop_rate: float, block_size: int = 5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0 <= drop_rate < 1:
            raise ValueError(f"DropBlock: drop_rate must lie in [0, 1), got {drop_rate}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"DropBlock: block_size must be an int >= 1, got {block_size!r}")
        self.drop_rate, self.block_size = float(drop_rate), block_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    @property
    def active(self) -> bool:
        """Whether the forward drops anything (training mode and a positive rate)."""
        return self.training and self.drop_rate > 0

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return x
        n, c, h, w = x.shape
        b = min(self.block_size, h, w)
        gamma = self.drop_rate / (b * b) * (h * w) / ((h - b + 1) * (w - b + 1))
        draw = torch.rand((n, c, h - b + 1, w - b + 1), generator=self.generator, device=self.generator.device)
        centres = (draw < gamma).to(device=x.device, dtype=x.dtype)
        # each centre covers the b x b square to its lower right: pad, then a max-pool spreads it
        centres = F.pad(centres, (b - 1, b - 1, b - 1, b - 1))
        dropped = F.max_pool2d(centres, kernel_size=b, stride=1)
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}"


class ResidualBlock(nn.Module):
    """One ResNet-12 block: 3 x [conv 3x3, `BatchNorm`, leaky ReLU 0.1] + a 1x1 conv shortcut, max-pool 2."""

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, in_channels: int, channels: int, dropblock: DropBlock | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.norm1 = BatchNorm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = BatchNorm(channels)
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm3 = BatchNorm(channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), BatchNorm(channels))
        self.pool = MaxPool2x2()
        self.dropblock = dropblock if dropblock is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x)), 0.1)
        h = F.leaky_relu(self.norm2(self.conv2(h)), 0.1)
        h = F.leaky_relu(self.norm3(self.conv3(h)) + self.shortcut(x), 0.1)
        return self.dropblock(self.pool(h))


class ResNet12(nn.Module):
    """ResNet-12 (Oreshkin et al., 2018; Lee et al., 2019): 4 `ResidualBlock`\\ s, then a linear ``head``.

    On 3x84x84 inputs the blocks give 640 x 5 x 5 features; ``global_pool=True`` (the default)
    averages them to 640, ``False`` flattens them (16000 features, as MetaOptNet).

    Args:
        num_classes: outputs of the head (N ways); 0 gives no head (an embedding network).
        in_channels: input channels.
        channels: filters of the four blocks.
        image_size: side of the square inputs (for the flattened feature size).
        global_pool: average the last feature map over space.
        drop_rate: DropBlock's rate in the last two blocks (0: no DropBlock, the usual choice for MAML).
        dropblock_size: DropBlock's block size (5 in the literature).
        generator: DropBlock's source of randomness (one fresh generator seeded with 0 if None).
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        global_pool: bool = True,
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"ResNet12 has 4 blocks: give 4 widths, got {tuple(channels)}")
        size = image_size
        for _ in range(4):
            size //= 2
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 max-pool blocks (at least 16)")
        if drop_rate > 0 and generator is None:
            generator = torch.Generator().manual_seed(0)
        blocks: list[nn.Module] = []
        widths = [in_channels, *channels]
        for i in range(4):
            drop = DropBlock(drop_rate, dropblock_size, generator) if drop_rate > 0 and i >= 2 else None
            blocks.append(ResidualBlock(widths[i], widths[i + 1], drop))
        blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] if global_pool else [nn.Flatten()]
        self.features = nn.Sequential(*blocks)  # head(features(x)), as prototype heads expect
        self.global_pool = global_pool
        self.feature_size = channels[-1] if global_pool else channels[-1] * size * size
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
