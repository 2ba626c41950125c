"""ResNet-20 for CIFAR (He et al., arXiv:1512.03385, §4.2), upstream ER_DST's ``ResNet20``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from er_lightning.models._common import (
    ClassifierKind,
    check_bool,
    check_classifier,
    check_positive_int,
    make_classifier,
)
from er_lightning.models.resnet_cifar import BasicBlock

__all__ = ["ResNet20", "resnet20"]


class ResNet20(nn.Module):
    """ResNet-20 of He et al. (arXiv:1512.03385, the 6n+2 CIFAR family with n = 3); outputs logits.

    Layout: ``conv1`` (3×3, in_channels→16) → ``bn1`` → ReLU → ``layer1``/``layer2``/``layer3`` with 3
    :class:`BasicBlock` each (16/32/64 channels; the first block of layers 2 and 3 has stride 2 and a 1×1 stride-2
    conv + BN shortcut ``shortcut.0``/``shortcut.1``) → global average pool → ``fc`` (64 → ``num_classes``, with
    bias). With 10 classes: 22 conv/linear weight tensors, 270,896 weights.

    Init (as upstream's ``cifar_resnet.py``): Kaiming-normal with fan_in and ReLU gain, N(0, √(2/fan_in)), on every
    conv and on the ``fc`` weight; biases and BN (γ=1, β=0) keep PyTorch's defaults.

    Args:
        num_classes: number of logits.
        in_channels: input image channels.
        input_size: height/width of the square inputs the model is built for; pooling is global, so any size
            ≥ 1 runs. Kept as ``input_shape`` for code that needs an example input.
        bn_affine: learnable BN scale/shift; ``False`` gives parameter-free BN.
        bias: add a bias to every conv (``fc`` always has one, as upstream's).
        classifier: ``"linear"`` (upstream) or ``"conv1x1"``, a 1×1 conv ``64 → num_classes`` with bias; named
            ``fc`` either way, output ``(N, num_classes)``.

    Raises:
        ValueError: unknown ``classifier`` or a count below 1.
        TypeError: a count is not an ``int`` or a flag not a ``bool``.

    Example:
        >>> model = ResNet20(num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> tuple(model.fc.weight.shape)
        (10, 64)
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        input_size: int = 32,
        bn_affine: bool = True,
        bias: bool = False,
        classifier: ClassifierKind = "linear",
    ):
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        in_channels = check_positive_int(in_channels, "in_channels")
        self.input_size = check_positive_int(input_size, "input_size")
        self.input_shape = (in_channels, input_size, input_size)
        check_bool(bn_affine, "bn_affine")
        check_bool(bias, "bias")
        self.classifier_kind = check_classifier(classifier)

        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(16, affine=bn_affine)
        in_planes = 16
        stages = []
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for b in range(3):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, bn_affine=bn_affine, bias=bias))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = make_classifier(self.classifier_kind, 64, num_classes, bias=True)

        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, in_channels, H, W)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layer3(self.layer2(self.layer1(out))))
        if self.classifier_kind == "linear":
            return self.fc(torch.flatten(out, 1))
        return torch.flatten(self.fc(out), 1)


def resnet20(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    bn_affine: bool = True,
    bias: bool = False,
    classifier: ClassifierKind = "linear",
) -> ResNet20:
    """ResNet-20 for CIFAR; Kaiming-normal (fan_in) init on conv and fc weights. See :class:`ResNet20`."""
    return ResNet20(
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        bn_affine=bn_affine,
        bias=bias,
        classifier=classifier,
    )
