"""A small, fast conv net for the quickstart and tests (8×8 one-channel scikit-learn digits)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from er_lightning.models._common import check_bool, check_positive_int

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Module):
    """Two 3×3 conv-BN-ReLU layers, one 2×2 max-pool and a linear classifier; outputs logits.

    Layout: ``conv1`` (in_channels → c1, pad 1) → ``bn1`` → ReLU → ``conv2`` (c1 → c2, pad 1) → ``bn2`` → ReLU →
    2×2 max-pool → flatten → ``classifier`` Linear(c2·⌊s/2⌋², ``num_classes``) with bias, where s is
    ``input_size``. On 8×8 digits with the default widths it has 3 conv/linear weight tensors (288 + 18,432 +
    10,240 weights for 10 classes), reaches over 90 % test accuracy within a few epochs and trains an epoch of
    ~1,400 images in a fraction of a second on two CPU cores. Not an upstream model.

    Init: PyTorch's defaults.

    Args:
        num_classes: number of logits.
        in_channels: input image channels (1 for digits).
        input_size: height/width of the square inputs; fixes the classifier's input size, so inputs must have
            exactly this size. At least 2.
        channels: widths ``(c1, c2)`` of the two convs.
        bn_affine: learnable BN scale/shift.
        bias: add a bias to both convs (the classifier always has one).

    Raises:
        ValueError: a size or width below its minimum, or ``channels`` not a pair.
        TypeError: a size or width is not an ``int`` or a flag not a ``bool``.

    Example:
        >>> model = SmallCNN(num_classes=10)
        >>> model(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        input_size: int = 8,
        channels: tuple[int, int] = (32, 64),
        bn_affine: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        in_channels = check_positive_int(in_channels, "in_channels")
        self.input_size = check_positive_int(input_size, "input_size", minimum=2)
        self.input_shape = (in_channels, input_size, input_size)
        if not isinstance(channels, (tuple, list)) or len(channels) != 2:
            raise ValueError(f"channels must be a pair of widths (c1, c2), e.g. (32, 64), got {channels!r}")
        c1 = check_positive_int(channels[0], "channels[0]")
        c2 = check_positive_int(channels[1], "channels[1]")
        check_bool(bn_affine, "bn_affine")
        check_bool(bias, "bias")

        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1, affine=bn_affine)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(c2, affine=bn_affine)
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Linear(c2 * (input_size // 2) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Return logits ``(N, num_classes)`` for ``x`` of shape ``(N, in_channels, input_size, input_size)``."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(torch.relu(self.bn2(self.conv2(out))))
        return self.classifier(torch.flatten(out, 1))


def small_cnn(
    num_classes: int = 10,
    *,
    in_channels: int = 1,
    input_size: int = 8,
    channels: tuple[int, int] = (32, 64),
    bn_affine: bool = True,
    bias: bool = False,
) -> SmallCNN:
    """Small conv net for 8×8 digits (quickstart, tests); PyTorch default init. See :class:`SmallCNN`."""
    return SmallCNN(
        num_classes,
        in_channels=in_channels,
        input_size=input_size,
        channels=channels,
        bn_affine=bn_affine,
        bias=bias,
    )
