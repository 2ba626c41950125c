"""Attaching masks to a model: which parameters, in-place application, distribution across ranks, files."""

from er_lightning.masking.dist import broadcast_masks_, verify_masks_agree
from er_lightning.masking.flops import FlopsCount, LayerFlops, count_flops, flops_table
from er_lightning.masking.io import check_masks_match, load_masks, mask_file_densities, save_masks
from er_lightning.masking.masked import MaskedParams, zero_optimizer_state_
from er_lightning.masking.targets import default_targets, select_targets

__all__ = [
    "FlopsCount",
    "LayerFlops",
    "count_flops",
    "flops_table",
    "MaskedParams",
    "broadcast_masks_",
    "check_masks_match",
    "default_targets",
    "load_masks",
    "mask_file_densities",
    "save_masks",
    "select_targets",
    "verify_masks_agree",
    "zero_optimizer_state_",
]
