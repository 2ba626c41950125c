"""Which ``torch.fx`` nodes pass a tensor's memory layout through: the tables both layout plans read.

The kernels compute in a batch-innermost layout, (C, H, W, B) in memory (see
:func:`~er_lightning.compute.functional.is_batch_last`). A sparse convolution can hand its result to the next one
in that layout, skipping two transposes, when what lies between them computes the same values in any layout:
activations, additions, multiplications, dropout. ``to_sparse`` (inference) converts back wherever such a value
reaches anything else; ``SparseComputeRouter`` (training) switches a layer only when its result reaches nothing
else at all.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn

__all__ = [
    "LAYOUT_FREE_FUNCTIONS",
    "LAYOUT_FREE_METHODS",
    "LAYOUT_FREE_MODULES",
    "layout_free",
    "pool_window",
]

#: modules whose result is an elementwise function of their input, in whatever memory layout that has
LAYOUT_FREE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
)
#: functions of the same kind (binary ones broadcast, and keep the layout of their full-size operands)
LAYOUT_FREE_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    torch.add,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    nn.functional.relu,
    nn.functional.relu6,
    nn.functional.silu,
    nn.functional.gelu,
    nn.functional.leaky_relu,
    nn.functional.dropout,
}
#: tensor methods of the same kind
LAYOUT_FREE_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "sigmoid", "tanh"}


def layout_free(node, modules: dict[str, nn.Module], extra_modules: tuple[type, ...] = ()) -> bool:  # noqa: ANN001
    """Whether the ``torch.fx`` ``node`` computes its result in its tensor inputs' layout (see the tables);
    ``modules`` maps the traced root's submodule names, ``extra_modules`` adds module types the caller makes so."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return type(module) in LAYOUT_FREE_MODULES or type(module) in extra_modules
    if node.op == "call_function":
        return node.target in LAYOUT_FREE_FUNCTIONS
    return node.op == "call_method" and node.target in LAYOUT_FREE_METHODS


def pool_window(pool: nn.MaxPool2d) -> tuple[int, int] | None:
    """The window of a max pooling the batch-last kernel computes (window = stride, no padding, dilation 1, no
    ``ceil_mode`` or ``return_indices``), else None."""

    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    k = pair(pool.kernel_size)
    st = pair(pool.stride if pool.stride is not None and pool.stride != () else pool.kernel_size)
    if k != st or pair(pool.padding) != (0, 0) or pair(pool.dilation) != (1, 1):
        return None
    if pool.ceil_mode or pool.return_indices:
        return None
    return k
