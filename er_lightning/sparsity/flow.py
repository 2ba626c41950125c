"""Flow preservation: make sure no unit of a sparse layer is cut off (pure tensor function).

A unit with no incoming connection outputs a constant; one with no outgoing connection is wasted. After drawing a
random mask, :func:`preserve_flow_` connects each such unit once, at a random position. For a conv weight of shape
(out, in, kh, kw) an output channel is disconnected when its whole (in, kh, kw) slice is empty and an input channel
when its (out, kh, kw) slice is; both are repaired (upstream loses the conv input-side repair whenever two or more
channels are disconnected, spec Q5).
"""

from __future__ import annotations

import torch
from torch import Tensor

from er_lightning.sparsity.topology import dead_units

__all__ = ["preserve_flow_"]


@torch.no_grad()
def preserve_flow_(mask: Tensor, *, generator: torch.Generator) -> tuple[int, int]:
    """Connect every disconnected output and input unit of ``mask`` once, in place.

    Args:
        mask: bool mask of a linear (out, in) or conv (out, in, *kernel) weight; 1-D masks are left alone.
        generator: source of the random positions.

    Returns:
        (output units repaired, input units repaired).
    """
    if mask.dim() < 2:
        return 0, 0
    out, inp = mask.shape[0], mask.shape[1]
    per_out = mask.view(out, -1)  # view: (out, in·k)
    k = per_out.shape[1] // inp
    fixed_out = 0
    dead_out = torch.nonzero(dead_units(mask)[0]).reshape(-1).tolist()
    for o in dead_out:
        j = int(torch.randint(per_out.shape[1], (1,), generator=generator))
        per_out[o, j] = True
        fixed_out += 1
    view = mask.view(out, inp, k)
    dead_in = torch.nonzero(dead_units(mask)[1]).reshape(-1).tolist()
    fixed_in = 0
    for i in dead_in:
        j = int(torch.randint(out * k, (1,), generator=generator))
        view[j // k, i, j % k] = True
        fixed_in += 1
    return fixed_out, fixed_in
