"""er_lightning.models."""
