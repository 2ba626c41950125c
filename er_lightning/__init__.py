"""er-lightning: sparse training from random Erdős–Rényi masks, as PyTorch Lightning callbacks."""

__version__ = "0.1.0"
