"""The Conv-4 backbone of MAML and ProtoNets."""

from __future__ import annotations

from torch import Tensor, nn

from metalearn.models.batchnorm import BatchNorm
from metalearn.models.layout import channels_last, runs_channels_last
from metalearn.models.pooling import MaxPool2x2

__all__ = ["Conv4", "conv4_feature_size"]


def conv4_feature_size(image_size: int, hidden: int = 64, blocks: int = 4) -> int:
    """Number of features after ``blocks`` conv/pool blocks on a square ``image_size`` input."""
    size = image_size
    for _ in range(blocks):
        size //= 2
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {blocks} max-pool blocks")
    return hidden * size * size


class Conv4(nn.Module):
    """The Conv-4 backbone of MAML (Finn et al., 2017) and ProtoNets (Snell et al., 2017).

    Four blocks of [conv 3x3 (padding 1), `BatchNorm`, ReLU, max-pool 2], then a linear
    ``head``. Use 64 filters for Omniglot (1x28x28) and 32 for mini-ImageNet (3x84x84).
    Each block runs the max-pool before the ReLU: the same function (max commutes with the
    ReLU, values are bit-identical) with the ReLU and its backward on a quarter of the elements.
    The max-pool is `MaxPool2x2`, ``nn.MaxPool2d(2)`` with a vectorised forward (the same values
    and gradients). Under CPU bfloat16 autocast (``precision="bf16"``) the input is laid out
    channels-last, which every layer keeps (`metalearn.models.layout`: oneDNN's bf16 convolutions
    and torch's max-pool are fast in that layout; float32 stays NCHW: torch's channels-last batch
    norm is less accurate in float32).

    Args:
        num_classes: outputs of the head (the number of ways N); 0 gives no head (an
            embedding network, as ProtoNets use).
        in_channels: input channels (1 for Omniglot, 3 for mini-ImageNet).
        hidden: filters per conv layer.
        image_size: side of the square input images.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                BatchNorm(hidden),
                MaxPool2x2(),  # then ReLU: relu(maxpool(h)) == maxpool(relu(h)), 4x less ReLU work
                nn.ReLU(),
            ]
            channels = hidden
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_size = conv4_feature_size(image_size, hidden)
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if runs_channels_last(x):
            x = channels_last(x)
        return self.head(self.features(x))
