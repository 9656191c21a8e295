"""Standard few-shot backbones and the searchable (DARTS) network, as plain ``nn.Module``\\ s.

Any user module works with the library; these are the ones the papers use. Their batch
norm is `BatchNorm`: torch's fused batch norm outside ``torch.func.vmap`` and one written from
mean/var primitives inside it (`metalearn.exact_norms`), because the native one gives silently wrong second-order
meta-gradients under ``vmap`` when its affine weights are adapted in the inner loop (see
``docs/architecture.md``).

* `conv4` — `Conv4`, `conv4_feature_size`;
* `mlp` — `MLP`;
* `resnet12` — `ResNet12` and `DropBlock` (its block: `metalearn.models.resnet12.ResidualBlock`);
* `batchnorm` — `BatchNorm`;
* `pooling` — `MaxPool2x2` and `max_pool_2x2` (``nn.MaxPool2d(2)`` with a vectorised forward);
* `searchable` — the DARTS search space: the op library (`SEARCH_OPS`), `MixedOp`,
  `SearchableConvNet` and the plain `CellConvNet` it derives (its α, `ArchitectureWeights`,
  are ω's part and live in `metalearn.knowledge`).
"""

from metalearn.models.batchnorm import BatchNorm, inside_vmap
from metalearn.models.conv4 import Conv4, conv4_feature_size
from metalearn.models.mlp import MLP
from metalearn.models.pooling import MaxPool2x2, max_pool_2x2
from metalearn.models.resnet12 import DropBlock, ResNet12
from metalearn.models.searchable import (
    DEFAULT_CANDIDATES,
    SEARCH_OPS,
    Cell,
    CellConvNet,
    MixedOp,
    OpFactory,
    SearchableConvNet,
    Zero,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "MLP",
    "SEARCH_OPS",
    "BatchNorm",
    "Cell",
    "CellConvNet",
    "Conv4",
    "DropBlock",
    "MaxPool2x2",
    "MixedOp",
    "OpFactory",
    "ResNet12",
    "SearchableConvNet",
    "Zero",
    "conv4_feature_size",
    "inside_vmap",
    "max_pool_2x2",
]
