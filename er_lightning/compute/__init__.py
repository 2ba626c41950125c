"""Sparse compute: kernels over the active weights of a mask, and their autograd functions (imports torch only)."""

from er_lightning.compute.build import build_error, kernel_cache_dir, kernels_available, load_kernels
from er_lightning.compute.functional import SparseIndex, conv_padding, sparse_conv2d, sparse_linear, supports

__all__ = [
    "SparseIndex",
    "build_error",
    "conv_padding",
    "kernel_cache_dir",
    "kernels_available",
    "load_kernels",
    "sparse_conv2d",
    "sparse_linear",
    "supports",
]
