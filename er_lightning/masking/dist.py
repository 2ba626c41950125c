"""Keeping masks identical on every rank.

Masks come from seeded generators and so agree by construction; broadcasting them from rank 0 after every change
also covers non-random decisions (top-k ties resolved by floating-point noise, for instance) at a cost paid only on
mask changes. The checksum check is for debugging and tests.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "broadcast_masks_", "mask_checksums", "verify_masks_agree"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_masks_(masks: MutableMapping[str, Tensor], device: torch.device, src: int = 0) -> None:
    """Overwrite every mask with rank ``src``'s (in place), in one collective.

    Args:
        masks: FQN → bool mask, on any device; values are replaced in place, tensors are kept.
        device: where the collective runs: ``trainer.strategy.root_device`` (NCCL needs CUDA tensors).
        src: the rank whose masks win.
    """
    if not is_distributed() or not masks:
        return
    flat = torch.cat([m.reshape(-1).to(device=device, dtype=torch.uint8) for m in masks.values()])
    dist.broadcast(flat, src=src)
    start = 0
    for m in masks.values():
        n = m.numel()
        m.copy_(flat[start : start + n].view(m.shape).to(m.device, torch.bool))
        start += n


def mask_checksums(masks: MutableMapping[str, Tensor]) -> Tensor:
    """One int64 per mask: kept count and a position-weighted sum, packed; equal masks give equal values."""
    out = []
    for m in masks.values():
        idx = torch.nonzero(m.reshape(-1)).reshape(-1).to(torch.int64)
        weighted = ((idx * 2654435761) % 2147483647).sum()
        out.append(weighted * 1_000_003 + idx.numel())
    return torch.stack(out).cpu() if out else torch.zeros(0, dtype=torch.int64)


def verify_masks_agree(masks: MutableMapping[str, Tensor], device: torch.device) -> None:
    """All-gather mask checksums and raise if any rank disagrees with rank 0.

    Raises:
        RuntimeError: naming the first mask that differs and the ranks involved.
    """
    if not is_distributed():
        return
    local = mask_checksums(masks).to(device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    names = list(masks)
    for rank, other in enumerate(gathered[1:], start=1):
        diff = (other != gathered[0]).nonzero()
        if diff.numel():
            raise RuntimeError(
                f"masks differ between rank 0 and rank {rank} for {names[int(diff[0])]!r} "
                f"(on this rank, {dist.get_rank()}); masks must be identical on every rank"
            )
