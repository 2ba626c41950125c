"""Synthetic data modules, generated in memory from a seed: token sequences for a language model, class images.

They need no download and train in seconds, for the transformer and ViT examples and for tests. The data have
structure a model can learn (a noisy Markov chain, noisy class templates), so accuracy above chance shows learning.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["SyntheticImagesDataModule", "SyntheticTokensDataModule"]


def _positive(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _probability(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


class _InMemoryDataModule(pl.LightningDataModule):
    """Train/val/test ``TensorDataset``s built once by :meth:`_make` (the three splits use disjoint draws)."""

    def __init__(self, num_train: int, num_val: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.num_train = _positive(num_train, "num_train")
        self.num_val = _positive(num_val, "num_val")
        self.batch_size = _positive(batch_size, "batch_size")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._splits: dict[str, TensorDataset] | None = None

    def _make(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _datasets(self) -> dict[str, TensorDataset]:
        if self._splits is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._splits = {
                split: TensorDataset(*self._make(n, gen))
                for split, n in (("train", self.num_train), ("val", self.num_val), ("test", self.num_val))
            }
        return self._splits

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (order from a generator seeded with ``seed``)."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        return DataLoader(self._datasets()["train"], batch_size=self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        return DataLoader(self._datasets()["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """Test batches in order (a third independent draw)."""
        return DataLoader(self._datasets()["test"], batch_size=self.batch_size)


class SyntheticTokensDataModule(_InMemoryDataModule):
    """Next-token prediction on sequences of a noisy Markov chain over ``vocab_size`` tokens.

    A fixed random permutation π (from ``seed``) gives each token its successor: token t+1 is π(token t) with
    probability ``1 - noise``, else uniform. A batch is ``(inputs, targets)``, int64 (B, seq_len) each, with
    ``targets`` the inputs shifted by one. A model that learns π reaches next-token accuracy about
    ``1 - noise + noise / vocab_size``; chance is ``1 / vocab_size``.

    Args:
        vocab_size: number of tokens, >= 2.
        seq_len: tokens per input sequence.
        noise: probability that a successor is drawn uniformly instead of from π.
        num_train: training sequences; ``num_val``: validation (and test) sequences.
        batch_size: sequences per batch.
        seed: seeds π, the sequences and the shuffling.

    Example:
        >>> dm = SyntheticTokensDataModule(vocab_size=8, seq_len=5, num_train=4, num_val=2, batch_size=2)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype
        (torch.Size([2, 5]), torch.int64)
    """

    def __init__(
        self,
        vocab_size: int = 64,
        seq_len: int = 16,
        noise: float = 0.1,
        num_train: int = 512,
        num_val: int = 128,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(num_train, num_val, batch_size, seed)
        self.vocab_size = _positive(vocab_size, "vocab_size", minimum=2)
        self.seq_len = _positive(seq_len, "seq_len")
        self.noise = _probability(noise, "noise")
        self.successor = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))

    def _make(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        seq = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(self.vocab_size, (n,), generator=generator)
        for t in range(self.seq_len):
            follow = self.successor[seq[:, t]]
            jump = torch.randint(self.vocab_size, (n,), generator=generator)
            noisy = torch.rand(n, generator=generator) < self.noise
            seq[:, t + 1] = torch.where(noisy, jump, follow)
        return seq[:, :-1].clone(), seq[:, 1:].clone()


class SyntheticImagesDataModule(_InMemoryDataModule):
    """Classify noisy copies of ``num_classes`` random ±1 templates (float32 images, int64 labels).

    Each class has one template drawn from ``seed``; an image is its class template plus Gaussian noise of standard
    deviation ``noise``. Batches are ``(images (B, channels, image_size, image_size), labels (B,))``.

    Args:
        num_classes: number of classes.
        image_size: height and width.
        channels: image channels.
        noise: standard deviation of the added noise (templates have entries ±1).
        num_train, num_val, batch_size, seed: as :class:`SyntheticTokensDataModule`.

    Example:
        >>> dm = SyntheticImagesDataModule(num_classes=3, image_size=4, num_train=6, num_val=3, batch_size=3)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape
        torch.Size([3, 1, 4, 4])
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 8,
        channels: int = 1,
        noise: float = 1.0,
        num_train: int = 512,
        num_val: int = 128,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        super().__init__(num_train, num_val, batch_size, seed)
        self.num_classes = _positive(num_classes, "num_classes", minimum=2)
        self.image_size = _positive(image_size, "image_size")
        self.channels = _positive(channels, "channels")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"noise must be a standard deviation >= 0, got {noise!r}")
        self.noise = float(noise)
        shape = (num_classes, channels, image_size, image_size)
        signs = torch.randint(2, shape, generator=torch.Generator().manual_seed(seed))
        self.templates = signs.float() * 2 - 1

    def _make(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.randint(self.num_classes, (n,), generator=generator)
        noise = torch.randn((n, *self.templates.shape[1:]), generator=generator) * self.noise
        return self.templates[labels] + noise, labels
