"""Bool masks bound to parameters, applied in place.

The mask of a parameter is a ``bool`` tensor of its shape, one byte per weight, owned by a callback. Masked weights
are exact zeros in the parameter itself (no forward hook, no parametrization), so the model's ``state_dict`` stays
plain and evaluation needs no callback.

Hot path: :meth:`MaskedParams.mask_grads_` runs once per optimizer step as one fused ``torch._foreach_mul_`` over
every masked gradient. The bool masks are multiplied through a ``uint8`` *view* of the same storage: no extra
memory, and about twice as fast as multiplying by a ``bool`` tensor on CPU (measured on 23.6M weights, 2 threads:
7.2 ms against 13.5 ms; a float copy takes 5.2 ms but costs four bytes per weight).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["MaskedParams", "count_zeros", "zero_optimizer_state_"]


class MaskedParams:
    """Parameters and their bool masks, keyed by fully qualified name (FQN).

    Args:
        params: FQN → parameter (as ``named_parameters()`` yields it).
        masks: FQN → bool mask of the parameter's shape (any device; moved next to the parameter).

    Example:
        >>> lin = nn.Linear(4, 3)
        >>> mp = MaskedParams({"weight": lin.weight}, {"weight": torch.rand(3, 4) < 0.5})
        >>> mp.apply_()
        >>> bool((lin.weight[~mp.masks["weight"]] == 0).all())
        True
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
        if list(params) != list(masks):
            raise ValueError(
                f"params and masks must have the same names in the same order, got {list(params)} and {list(masks)}"
            )
        self.names: list[str] = list(params)
        self.params: list[nn.Parameter] = [params[n] for n in self.names]
        self.masks: dict[str, Tensor] = {}
        for name, p in zip(self.names, self.params):
            m = masks[name]
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(m.shape)}, parameter has {tuple(p.shape)}"
                )
            self.masks[name] = m.detach().to(device=p.device, dtype=torch.bool).clone()
        self._refresh_views()

    def _refresh_views(self) -> None:
        self._mask_list = [self.masks[n] for n in self.names]
        self._mul_views = [m.view(torch.uint8) for m in self._mask_list]

    # ----------------------------------------------------------------- placement
    def to_(self, device: torch.device | None = None) -> None:
        """Move every mask next to its parameter (or to ``device``); masks are rebound, parameters untouched."""
        for name, p in zip(self.names, self.params):
            target = device if device is not None else p.device
            if self.masks[name].device != target:
                self.masks[name] = self.masks[name].to(target)
        self._refresh_views()

    def rebind_(self, params: Mapping[str, nn.Parameter]) -> list[str]:
        """Point at the parameter objects now named ``self.names`` (e.g. after a layer was rebuilt).

        Returns:
            The names whose parameter object changed (empty when the model still holds the same tensors).

        Raises:
            ValueError: a parameter is missing, or a new one has another shape than its mask (names and shapes).
        """
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"cannot rebind masks: parameters {missing} are missing from the model")
        wrong = [
            f"{n}: mask {tuple(self.masks[n].shape)}, parameter now {tuple(params[n].shape)}"
            for n in self.names
            if tuple(params[n].shape) != tuple(self.masks[n].shape)
        ]
        if wrong:
            raise ValueError(
                f"parameters were replaced by tensors of another shape after their masks were drawn ({'; '.join(wrong)}); "
                "build or replace layers before the sparsity callback's setup (in the module's __init__), not in "
                "its setup/configure_model/on_fit_start"
            )
        replaced = [n for n, old in zip(self.names, self.params) if params[n] is not old]
        self.params = [params[n] for n in self.names]
        self.to_()
        return replaced

    # ----------------------------------------------------------------- in-place ops
    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight in place (one fused multiply)."""
        torch._foreach_mul_([p.data for p in self.params], self._mul_views)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of masked weights in place; parameters without a gradient are skipped."""
        grads, views = [], []
        for p, v in zip(self.params, self._mul_views):
            if p.grad is not None:
                grads.append(p.grad)
                views.append(v)
        if grads:
            torch._foreach_mul_(grads, views)

    @torch.no_grad()
    def set_mask_(self, name: str, mask: Tensor) -> None:
        """Replace one mask's values in place (the tensor object is kept, so views stay valid)."""
        self.masks[name].copy_(mask.to(device=self.masks[name].device, dtype=torch.bool))

    def zero_optimizer_state_(
        self, optimizers: Iterable[torch.optim.Optimizer], extra: Mapping[str, Tensor] | None = None
    ) -> None:
        """Zero every optimizer state tensor shaped like a masked parameter wherever the mask is off.

        Args:
            optimizers: optimizers whose ``state`` is edited (any optimizer: SGD momentum, Adam moments, ...).
            extra: FQN → bool tensor of further positions to zero (e.g. weights regrown in this update).
        """
        positions = {}
        for name in self.names:
            off = ~self.masks[name]
            if extra is not None and name in extra:
                off = off | extra[name].to(off.device, torch.bool)
            positions[name] = off
        zero_optimizer_state_(optimizers, dict(zip(self.names, self.params)), positions)

    # ----------------------------------------------------------------- statistics
    def counts(self) -> dict[str, tuple[int, int]]:
        """FQN → (kept, numel). Synchronises with the device: call on logging steps only."""
        kept = torch.stack([m.sum() for m in self._mask_list]).tolist() if self.names else []
        return {n: (int(k), m.numel()) for n, k, m in zip(self.names, kept, self._mask_list)}

    def densities(self) -> dict[str, float]:
        """FQN → kept fraction of the mask."""
        return {n: k / total for n, (k, total) in self.counts().items()}

    def global_density(self) -> float:
        """Kept fraction over every masked parameter together."""
        c = self.counts().values()
        return sum(k for k, _ in c) / max(sum(t for _, t in c), 1)

    def state_masks(self) -> dict[str, Tensor]:
        """Copies of the masks on CPU, for checkpoints."""
        return {n: m.detach().to("cpu", copy=True) for n, m in self.masks.items()}


@torch.no_grad()
def count_zeros(model: nn.Module) -> tuple[int, int]:
    """``(zero entries, all entries)`` over the parameters of ``model``, each shared tensor counted once.

    This is what a count over ``model.state_dict()`` gives when its parameter entries are deduplicated by tensor
    (a tied embedding and head are one tensor under two keys); buffers (BN statistics) are not parameters and are
    not counted. Synchronises with the device.

    Example:
        >>> lin = nn.Linear(3, 2)
        >>> with torch.no_grad():
        ...     _ = lin.weight[0].zero_()
        >>> count_zeros(lin)[0] >= 3
        True
    """
    params = list(model.parameters())  # parameters() yields each tensor once
    if not params:
        return 0, 0
    zeros = torch.stack([(p == 0).sum() for p in params]).sum()
    return int(zeros), sum(p.numel() for p in params)


@torch.no_grad()
def zero_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer],
    params: Mapping[str, Tensor],
    positions: Mapping[str, Tensor],
) -> int:
    """Set optimizer state to zero at ``positions`` for the given parameters.

    Every state tensor with the parameter's shape is edited (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, ...); scalars such as ``step`` are left alone.

    Returns:
        The number of state tensors edited.
    """
    by_id = {id(p): name for name, p in params.items()}
    edited = 0
    for opt in optimizers:
        for p, state in opt.state.items():
            name = by_id.get(id(p))
            if name is None:
                continue
            where = positions[name]
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(where.to(value.device), 0)
                    edited += 1
    return edited
