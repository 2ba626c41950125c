"""Weight initialisations for sparse layers and the orthogonality repair (pure tensor functions).

All take an explicit ``torch.Generator`` so they consume no global randomness.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["fan_in", "he_sparse_", "looks_linear_", "ortho_objective", "ortho_repair_"]


def fan_in(shape: torch.Size | tuple[int, ...]) -> int:
    """Inputs per output unit: ``in · kh · kw`` for a conv weight, ``in`` for a linear one."""
    return int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])


@torch.no_grad()
def he_sparse_(weight: Tensor, density: float, *, generator: torch.Generator) -> Tensor:
    """He-normal on the effective fan-in: N(0, √(2 / (fan_in · density))) (spec §3.4, upstream ``normal``)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    std = math.sqrt(2.0 / (fan_in(weight.shape) * density))
    values = torch.randn(weight.shape, generator=generator, dtype=torch.float32) * std
    weight.copy_(values.to(weight.dtype))
    return weight


def _orthogonal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    a = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return (q if rows >= cols else q.T)[:rows, :cols]


@torch.no_grad()
def looks_linear_(weight: Tensor, density: float, *, first: bool, generator: torch.Generator) -> Tensor:
    """Looks-linear orthogonal init (spec §3.4), scaled by 1/√density of this layer.

    First layer: an orthogonal block of ⌈out/2⌉ rows, stacked with its negation along the output axis. Later
    layers: a block of (⌈out/2⌉, ⌈in/2⌉) expanded to [[W, −W], [−W, W]]. Both cropped to the weight's shape.
    Upstream divides by the *global* density; we use the layer's own, which keeps the effective fan-in scaling of
    :func:`he_sparse_` per layer.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    out, inp, *kernel = weight.shape
    k = int(math.prod(kernel)) if kernel else 1
    half_out = math.ceil(out / 2)
    if first:
        block = _orthogonal(half_out, inp * k, generator).reshape(half_out, inp, k)
        full = torch.cat([block, -block], dim=0)[:out]
    else:
        half_in = math.ceil(inp / 2)
        block = _orthogonal(half_out, half_in * k, generator).reshape(half_out, half_in, k)
        top = torch.cat([block, -block], dim=1)
        full = torch.cat([top, -top], dim=0)[:out, :inp]
    weight.copy_((full.reshape(weight.shape) / math.sqrt(density)).to(weight.dtype))
    return weight


def _gram_distance(effective: Tensor) -> Tensor:
    eye = torch.eye(effective.shape[0], dtype=effective.dtype, device=effective.device)
    return torch.linalg.matrix_norm(effective @ effective.T - eye)


def ortho_objective(weight: Tensor, mask: Tensor) -> float:
    """‖(M⊙W)(M⊙W)ᵀ − I‖_F over the rows of the flattened weight (what :func:`ortho_repair_` minimises)."""
    m = mask.reshape(mask.shape[0], -1).float()
    return float(_gram_distance(weight.detach().reshape(weight.shape[0], -1).float() * m))


def ortho_repair_(weight: Tensor, mask: Tensor, *, steps: int = 1000, lr: float = 1e-2) -> float:
    """Make the masked weight's rows closer to orthonormal: minimise ‖(M⊙W)(M⊙W)ᵀ − I‖_F by plain SGD.

    The gradient is recomputed fresh at every step (upstream accumulates it across steps, spec Q6) and the
    parameter's ``.grad`` is left untouched. Masked entries stay exactly zero.

    Returns:
        The final value of the objective.
    """
    if steps < 1 or lr <= 0:
        raise ValueError(f"ortho repair needs steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    m = mask.reshape(mask.shape[0], -1).to(torch.float32)
    w = (weight.detach().reshape(weight.shape[0], -1).float() * m).clone().requires_grad_(True)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = _gram_distance(w * m)
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad
    with torch.no_grad():
        weight.copy_((w * m).reshape(weight.shape).to(weight.dtype))
    return float(loss.detach())
