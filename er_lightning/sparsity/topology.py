"""How a mask's topology looks and moves: dead units, overlap, in-time over-parameterisation (pure functions).

For a weight of shape (out, in, *kernel) an *output unit* (neuron, output channel) is dead when its whole
(in, *kernel) slice is inactive: it gets no input and outputs a constant. An *input unit* is dead when its
(out, *kernel) slice is inactive: nothing reads it. 1-D tensors (biases) have no units.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dead_units", "itop_rate", "mask_overlap"]


def dead_units(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Bool vectors of the dead output units (length ``out``) and dead input units (length ``in``).

    Example:
        >>> m = torch.tensor([[True, False, False], [False, False, False]])
        >>> [t.tolist() for t in dead_units(m)]
        [[False, True], [False, True, True]]
    """
    if mask.dim() < 2:
        empty = torch.zeros(0, dtype=torch.bool, device=mask.device)
        return empty, empty
    out, inp = mask.shape[0], mask.shape[1]
    view = mask.reshape(out, inp, -1)
    return ~view.any(dim=(1, 2)), ~view.any(dim=(0, 2))


def mask_overlap(mask: Tensor, reference: Tensor) -> float:
    """Share of ``reference``'s active entries that are active in ``mask`` too (1 = all kept; 1 if empty)."""
    ref = int(torch.count_nonzero(reference))
    return int(torch.count_nonzero(mask & reference)) / ref if ref else 1.0


def itop_rate(ever_active: Tensor) -> float:
    """In-time over-parameterisation rate (Liu et al., arXiv:2102.02887): share of entries ever active."""
    return int(torch.count_nonzero(ever_active)) / max(ever_active.numel(), 1)
