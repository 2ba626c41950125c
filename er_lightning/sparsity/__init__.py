"""er_lightning.sparsity."""
