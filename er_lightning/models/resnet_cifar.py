"""ResNet-18/34/50 for 32×32 inputs (CIFAR), as used by upstream's ER_DST, ER_SLT and STR experiments.

The CIFAR variant of He et al. (arXiv:1512.03385) popular in the sparse-training literature: a 3×3 stride-1 stem
without max-pool, four stages of 64/128/256/512 planes, stride 2 in the first block of stages 2–4, 1×1 projection
shortcuts, global average pooling and a bias-free classifier. Parameter names follow upstream
(``conv1``, ``bn1``, ``layer{1..4}.{b}.conv{1,2,3}``, ``layer{S}.{b}.shortcut.0``, ``classifier``), so per-layer
density tables can be compared by name.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from er_lightning.models._common import (
    ClassifierKind,
    check_bool,
    check_classifier,
    check_positive_int,
    make_classifier,
)

__all__ = ["BasicBlock", "Bottleneck", "ResNetCIFAR", "resnet18", "resnet34", "resnet50"]

ResNetDepth = Literal[18, 34, 50]

# depth -> (block kind, blocks per stage)
_PLANS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or 1×1 conv-BN projection shortcut.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``. The shortcut is a projection (``shortcut.0``
    conv, ``shortcut.1`` BN) when ``stride != 1`` or the channel count changes, otherwise the identity (an empty
    ``nn.Sequential``, which has no parameters).

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of ``conv1`` and of the projection.
        bn_affine: learnable BN scale/shift; ``False`` gives parameter-free BN (supermask runs).
        bias: add a bias to every conv.

    Example:
        >>> block = BasicBlock(64, 128, stride=2)
        >>> block(torch.zeros(2, 64, 8, 8)).shape
        torch.Size([2, 128, 4, 4])
    """

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, bn_affine: bool = True, bias: bool = False
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, bn_affine, bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``(N, in_planes, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride), 1×1 expand by 4, each with BN, plus a shortcut.

    The projection shortcut (``shortcut.0`` 1×1 conv, ``shortcut.1`` BN) is used when ``stride != 1`` or
    ``in_planes != 4 * planes``, so the first block of ResNet-50 has one although its stride is 1.

    Args:
        in_planes: input channels.
        planes: width of the inner 3×3 conv; the block outputs ``4 * planes`` channels.
        stride: stride of ``conv2`` and of the projection.
        bn_affine: learnable BN scale/shift.
        bias: add a bias to every conv.

    Example:
        >>> block = Bottleneck(64, 64)
        >>> block(torch.zeros(2, 64, 8, 8)).shape
        torch.Size([2, 256, 8, 8])
    """

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, bn_affine: bool = True, bias: bool = False
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes, affine=bn_affine)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=bias)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, affine=bn_affine)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride, bn_affine, bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape ``(N, in_planes, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int, bn_affine: bool, bias: bool) -> nn.Sequential:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias),
        nn.BatchNorm2d(out_planes, affine=bn_affine),
    )


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet-18/34/50 (He et al., arXiv:1512.03385) with a 3×3 stem and no max-pool; outputs logits.

    Layout: ``conv1`` (3×3, stride 1, pad 1, in_channels→64) → ``bn1`` → ReLU → ``layer1``…``layer4`` (64, 128,
    256, 512 planes; stride 2 in the first block of layers 2–4) → adaptive average pool to 1×1 → ``classifier``
    (512·expansion → ``num_classes``). With 32×32 inputs the pool is upstream's 4×4 average pool; because it is
    adaptive, 64×64 Tiny-ImageNet inputs (upstream's classifier would have received 2048 features there) and other
    sizes give the same weight shapes.

    Masked by default in upstream's ER_DST: every conv (stem, blocks, 1×1 shortcuts) and the classifier: ResNet-18
    with 10 classes has 21 such tensors, 11,164,352 weights; ResNet-50 with 100 classes 54 tensors, 23,652,032.

    Init: PyTorch's defaults (Kaiming-uniform with a=√5 on conv/linear weights, i.e. U(±1/√fan_in); BN γ=1, β=0),
    as upstream's ``resnet_cifar100.py``; no re-initialisation is done here.

    Args:
        depth: 18 or 34 (BasicBlock, [2,2,2,2] / [3,4,6,3]) or 50 (Bottleneck, [3,4,6,3], expansion 4).
        num_classes: number of logits.
        in_channels: input image channels.
        input_size: height/width of the square inputs the model is built for (32 for CIFAR, 64 for
            Tiny-ImageNet). Pooling is adaptive, so any size ≥ 1 runs; the value is kept as ``input_shape`` for
            code that needs an example input (SynFlow probes, FLOP counts).
        bn_affine: learnable BN scale/shift. ``False`` gives parameter-free BN, as in ER_SLT's supermask ResNet.
        bias: add a bias to every conv **and** to the classifier (ER_SLT's supermask ResNet-18 has both).
            Upstream's ER_DST and STR ResNets have none (the default).
        classifier: ``"linear"`` (ER_DST/ER_SLT) or ``"conv1x1"``: a 1×1 conv ``512·expansion → num_classes`` as
            in STR's ResNets, whose weight has shape ``(C, 512·expansion, 1, 1)`` and is masked like any conv.
            Either way the parameter is named ``classifier`` and the output is ``(N, num_classes)``, also for
            ``N = 1`` (upstream STR squeezed the output and broke batch size 1).

    Raises:
        ValueError: unknown ``depth`` or ``classifier``, or a count below 1.
        TypeError: a count is not an ``int`` or a flag not a ``bool``.

    Example:
        >>> model = ResNetCIFAR(depth=18, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> tuple(model.layer2[0].shortcut[0].weight.shape)
        (128, 64, 1, 1)
    """

    def __init__(
        self,
        depth: ResNetDepth = 18,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        input_size: int = 32,
        bn_affine: bool = True,
        bias: bool = False,
        classifier: ClassifierKind = "linear",
    ):
        super().__init__()
        if isinstance(depth, bool) or depth not in _PLANS:
            raise ValueError(f"depth must be one of {sorted(_PLANS)}, got {depth!r}")
        self.num_classes = check_positive_int(num_classes, "num_classes")
        in_channels = check_positive_int(in_channels, "in_channels")
        self.input_size = check_positive_int(input_size, "input_size")
        self.input_shape = (in_channels, input_size, input_size)
        check_bool(bn_affine, "bn_affine")
        check_bool(bias, "bias")
        self.classifier_kind = check_classifier(classifier)
        self.depth = depth

        kind, num_blocks = _PLANS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(64, affine=bn_affine)
        in_planes = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(block(in_planes, planes, stride, bn_affine=bn_affine, bias=bias))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_classifier(self.classifier_kind, in_planes, num_classes, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, in_channels, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.pool(out)
        if self.classifier_kind == "linear":
            return self.classifier(torch.flatten(out, 1))
        return torch.flatten(self.classifier(out), 1)


def resnet18(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    bn_affine: bool = True,
    bias: bool = False,
    classifier: ClassifierKind = "linear",
) -> ResNetCIFAR:
    """CIFAR ResNet-18 (BasicBlock, [2, 2, 2, 2]); PyTorch default init. See :class:`ResNetCIFAR` for the options.

    Upstream's settings: ER_DST ``ResNet18`` is the default; ER_SLT's supermask model is
    ``resnet18(bn_affine=False, bias=True)``; STR's ``--resnet-type large`` is ``resnet18(classifier="conv1x1")``.
    """
    return ResNetCIFAR(
        18,
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        bn_affine=bn_affine,
        bias=bias,
        classifier=classifier,
    )


def resnet34(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    bn_affine: bool = True,
    bias: bool = False,
    classifier: ClassifierKind = "linear",
) -> ResNetCIFAR:
    """CIFAR ResNet-34 (BasicBlock, [3, 4, 6, 3]); PyTorch default init. See :class:`ResNetCIFAR` for the options.

    Upstream lists ``ResNet34`` but cannot build it; this is the standard topology.
    """
    return ResNetCIFAR(
        34,
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        bn_affine=bn_affine,
        bias=bias,
        classifier=classifier,
    )


def resnet50(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    bn_affine: bool = True,
    bias: bool = False,
    classifier: ClassifierKind = "linear",
) -> ResNetCIFAR:
    """CIFAR ResNet-50 (Bottleneck, [3, 4, 6, 3]); PyTorch default init. See :class:`ResNetCIFAR` for the options.

    STR's ``--resnet-type res50`` is ``resnet50(100, classifier="conv1x1")``.
    """
    return ResNetCIFAR(
        50,
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        bn_affine=bn_affine,
        bias=bias,
        classifier=classifier,
    )
