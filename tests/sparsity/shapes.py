"""Masked-weight shapes of the upstream CIFAR models, in module (``named_parameters``) order.

These tables let the density rules be checked against the upstream golden figures without building a model.
The layout follows upstream ER_DST (spec §3.8): every conv and linear weight is masked, biases and BN are not.
"""

from __future__ import annotations

Shape = tuple[int, ...]

__all__ = [
    "RESNET18_NUMEL",
    "RESNET50_NUMEL",
    "VGG16_NUMEL",
    "resnet18_shapes",
    "resnet50_shapes",
    "total_numel",
    "vgg16_shapes",
]

RESNET18_NUMEL = 11_164_352
VGG16_NUMEL = 14_715_584
RESNET50_NUMEL = 23_652_032


def total_numel(shapes: dict[str, Shape]) -> int:
    """Sum of the element counts of all shapes."""
    total = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


def _classifier(features: int, num_classes: int, conv_classifier: bool) -> Shape:
    # STR uses a 1x1 conv as classifier, ER_DST a Linear.
    return (num_classes, features, 1, 1) if conv_classifier else (num_classes, features)


def resnet18_shapes(num_classes: int = 10, *, conv_classifier: bool = False) -> dict[str, Shape]:
    """CIFAR ResNet-18 (BasicBlock [2, 2, 2, 2], 3x3 stem, no max-pool): 21 masked tensors.

    Within a block the order is ``conv1``, ``conv2``, ``shortcut.0`` (the 1x1 projection, present when the stride
    is 2 or the width changes).
    """
    shapes: dict[str, Shape] = {"conv1.weight": (64, 3, 3, 3)}
    in_planes = 64
    for stage, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for block in range(2):
            s = stride if block == 0 else 1
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, in_planes, 3, 3)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            if s != 1 or in_planes != planes:
                shapes[f"{prefix}.shortcut.0.weight"] = (planes, in_planes, 1, 1)
            in_planes = planes
    shapes["classifier.weight"] = _classifier(512, num_classes, conv_classifier)
    return shapes


def resnet50_shapes(num_classes: int = 100, *, conv_classifier: bool = False) -> dict[str, Shape]:
    """CIFAR ResNet-50 (Bottleneck [3, 4, 6, 3], expansion 4): 54 masked tensors.

    Within a block the order is ``conv1`` (1x1), ``conv2`` (3x3, carries the stride), ``conv3`` (1x1, expands by
    4), ``shortcut.0`` (1x1 projection; in the first block of every stage, stage 1 included since 64 != 256).
    """
    shapes: dict[str, Shape] = {"conv1.weight": (64, 3, 3, 3)}
    in_planes = 64
    for stage, (planes, blocks, stride) in enumerate(
        ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1
    ):
        for block in range(blocks):
            s = stride if block == 0 else 1
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (planes, in_planes, 1, 1)
            shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{prefix}.conv3.weight"] = (4 * planes, planes, 1, 1)
            if s != 1 or in_planes != 4 * planes:
                shapes[f"{prefix}.shortcut.0.weight"] = (4 * planes, in_planes, 1, 1)
            in_planes = 4 * planes
    shapes["classifier.weight"] = _classifier(2048, num_classes, conv_classifier)
    return shapes


def vgg16_shapes(num_classes: int = 10) -> dict[str, Shape]:
    """CIFAR VGG-16 with batch norm (plan 64,64,M,128,128,M,256x3,M,512x3,M,512x3): 14 masked tensors.

    Names are the indices in the ``feature`` ``nn.Sequential`` (conv, BN, ReLU per conv; one entry per pool).
    """
    plan: list[int | str] = [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
    ]
    shapes: dict[str, Shape] = {}
    index = 0
    in_channels = 3
    for item in plan:
        if item == "M":
            index += 1
            continue
        assert isinstance(item, int)
        shapes[f"feature.{index}.weight"] = (item, in_channels, 3, 3)
        in_channels = item
        index += 3
    shapes["classifier.weight"] = (num_classes, 512)
    return shapes
