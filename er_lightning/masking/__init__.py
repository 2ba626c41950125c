"""er_lightning.masking."""
