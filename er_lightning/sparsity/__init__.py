"""Pure functions on shapes and tensors: layer-wise densities, seeded sampling, top-k, init and repairs."""

from er_lightning.sparsity.distributions import DENSITY_METHODS, expected_density, layer_densities
from er_lightning.sparsity.sampling import layer_generator, resample_like, sample_mask, sample_masks
from er_lightning.sparsity.topk import exact_count, global_topk_masks, topk_mask

__all__ = [
    "DENSITY_METHODS",
    "exact_count",
    "expected_density",
    "global_topk_masks",
    "layer_densities",
    "layer_generator",
    "resample_like",
    "sample_mask",
    "sample_masks",
    "topk_mask",
]
