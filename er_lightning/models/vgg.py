"""VGG with batch norm for 32×32 inputs (CIFAR), upstream ER_DST's ``vgg16``/``vgg19``."""

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

__all__ = ["VGG", "vgg16", "vgg19"]

VGGDepth = Literal[11, 13, 16, 19]

# Conv widths and "M" for a 2×2 max-pool (Simonyan & Zisserman, arXiv:1409.1556), without the final pool.
_PLANS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512),
}


class VGG(nn.Module):
    """VGG-11/13/16/19 (Simonyan & Zisserman, arXiv:1409.1556) with BN, CIFAR layout; outputs logits.

    Layout: ``feature`` is one ``nn.Sequential`` of [3×3 conv (pad 1, no bias) → BN → ReLU] units with a 2×2
    max-pool after each group except the last (four pools), so with 32×32 inputs the map is 2×2 at the end. It is
    then average-pooled to 1×1 (upstream's 2×2 average pool at 32 px and 4×4 at 64 px; adaptive here, so any
    input size ≥ 16 works) and fed to ``classifier`` = Linear(512, ``num_classes``) with bias. For VGG-16 the conv
    weights are ``feature.{0,3,7,10,14,17,20,24,27,30,34,37,40}.weight``; with 10 classes the 14 conv/linear
    weight tensors hold 14,715,584 weights.

    Init (upstream's): conv weights Kaiming-normal with fan_out and ReLU gain, N(0, √(2/(out·3·3))), conv biases
    (if any) 0; classifier weight N(0, 0.01), bias 0; BN γ=1, β=0.

    Args:
        depth: 11, 13, 16 or 19 conv+linear layers.
        num_classes: number of logits.
        in_channels: input image channels.
        input_size: height/width of the square inputs the model is built for; must be ≥ 16 (four 2×2
            max-pools). Kept as ``input_shape`` for code that needs an example input.
        bn_affine: learnable BN scale/shift; ``False`` gives parameter-free BN.
        bias: add a bias to every conv (the classifier always has one, as upstream's).
        classifier: ``"linear"`` (upstream) or ``"conv1x1"``, a 1×1 conv ``512 → num_classes`` with bias applied
            to the pooled map; named ``classifier`` either way, output ``(N, num_classes)``.

    Raises:
        ValueError: unknown ``depth`` or ``classifier``, ``input_size`` below 16 or a count below 1.
        TypeError: a count is not an ``int`` or a flag not a ``bool``.

    Example:
        >>> model = VGG(depth=16, num_classes=10)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> tuple(model.feature[40].weight.shape)
        (512, 512, 3, 3)
    """

    def __init__(
        self,
        depth: VGGDepth = 16,
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
        plan = _PLANS[depth]
        min_size = 2 ** plan.count("M")
        self.num_classes = check_positive_int(num_classes, "num_classes")
        in_channels = check_positive_int(in_channels, "in_channels")
        self.input_size = check_positive_int(input_size, "input_size", minimum=min_size)
        self.input_shape = (in_channels, input_size, input_size)
        check_bool(bn_affine, "bn_affine")
        check_bool(bias, "bias")
        self.classifier_kind = check_classifier(classifier)
        self.depth = depth

        layers: list[nn.Module] = []
        channels = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = int(item)
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=bias),
                nn.BatchNorm2d(width, affine=bn_affine),
                nn.ReLU(inplace=True),
            ]
            channels = width
        self.feature = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = make_classifier(self.classifier_kind, channels, num_classes, bias=True)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.feature.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits of shape ``(N, num_classes)`` for images ``x`` of shape ``(N, in_channels, H, W)``."""
        out = self.pool(self.feature(x))
        if self.classifier_kind == "linear":
            return self.classifier(torch.flatten(out, 1))
        return torch.flatten(self.classifier(out), 1)


def vgg16(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    bn_affine: bool = True,
    bias: bool = False,
    classifier: ClassifierKind = "linear",
) -> VGG:
    """VGG-16 with BN (13 convs + Linear(512, C)); Kaiming-normal fan_out conv init. See :class:`VGG`."""
    return VGG(
        16,
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        bn_affine=bn_affine,
        bias=bias,
        classifier=classifier,
    )


def vgg19(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    bn_affine: bool = True,
    bias: bool = False,
    classifier: ClassifierKind = "linear",
) -> VGG:
    """VGG-19 with BN (16 convs + Linear(512, C)); Kaiming-normal fan_out conv init. See :class:`VGG`."""
    return VGG(
        19,
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        bn_affine=bn_affine,
        bias=bias,
        classifier=classifier,
    )
