"""Standard few-shot backbones, as plain ``nn.Module``s.

Any user module works with the library; these are the ones the papers use. Their batch
norm is `BatchNorm`: torch's fused batch norm outside ``torch.func.vmap`` and one written from
mean/var primitives inside it (`metalearn.exact_norms`), because the native one gives silently wrong second-order
meta-gradients under ``vmap`` when its affine weights are adapted in the inner loop (see
``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn import exact_norms
from metalearn.exact_norms import inside_vmap

__all__ = ["BatchNorm", "Conv4", "MLP", "conv4_feature_size", "inside_vmap"]


class BatchNorm(nn.Module):
    r"""Batch normalisation with the statistics of the current batch only (MAML style).

    .. math:: y = \frac{x - \mathrm{mean}(x)}{\sqrt{\mathrm{var}(x) + \epsilon}} \, \gamma + \beta

    with mean and (biased) variance over every dimension but the channel dimension (dim 1).
    No running statistics are kept: at meta-test time a task is normalised with the
    statistics of its own examples, as in MAML (Finn et al., 2017).

    Two implementations of the same function: outside ``torch.func.vmap`` torch's fused
    ``F.batch_norm`` (one pass forward and backward; ~1.1-1.5x faster Conv-4 meta-iterations
    on CPU than the primitives), and inside ``vmap`` the formula above from mean/var
    primitives, because the fused op gives silently wrong second-order meta-gradients there
    when ``weight``/``bias`` are adapted (a relative error of ~1e-2; the tests guard both).

    Args:
        num_features: number of channels C of an input ``[N, C, ...]``.
        eps: added to the variance for stability.
        affine: learn a per-channel scale ``weight`` (γ) and shift ``bias`` (β).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm expects [N, {self.num_features}, ...], got {tuple(x.shape)}")
        # exact_norms.batch_norm, not F.batch_norm, inside any vmap: also one the library did not start
        norm = exact_norms.batch_norm if inside_vmap() else F.batch_norm
        return norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


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

    Args:
        num_classes: outputs of the head (the number of ways N); 0 gives no head (an
            embedding network, as ProtoNets use).
        in_channels: input channels (1 for Omniglot, 3 for mini-ImageNet).
        hidden: filters per conv layer.
        image_size: side of the square input images.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            layers += [
                nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
                BatchNorm(hidden),
                nn.MaxPool2d(2),  # then ReLU: relu(maxpool(h)) == maxpool(relu(h)), 4x less ReLU work
                nn.ReLU(),
            ]
            channels = hidden
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.feature_size = conv4_feature_size(image_size, hidden)
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """A fully connected network, e.g. the 1-40-40-1 ReLU net of MAML's sinusoid experiment.

    Args:
        sizes: layer widths from input to output, e.g. ``(1, 40, 40, 1)``.
        activation: module class applied between layers.
    """

    def __init__(self, sizes: Sequence[int] = (1, 40, 40, 1), activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least an input and an output size, got {sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
