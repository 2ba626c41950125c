"""er_lightning.callbacks."""
