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

import torch
from torch import nn

__all__ = ["LAYOUT_FREE_FUNCTIONS", "LAYOUT_FREE_METHODS", "LAYOUT_FREE_MODULES", "layout_free"]

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
