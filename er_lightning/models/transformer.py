"""Small transformers for the "your own model" examples: a causal language model and a ViT-style classifier.

Both are built from standard PyTorch layers (``nn.Embedding``, ``nn.MultiheadAttention`` with its packed
``in_proj_weight``, ``nn.Linear``, ``nn.LayerNorm``), so they show what the default target rule of the sparsity
callbacks finds in a transformer. They are sized for tests and CPU demos, not for benchmarks. Not upstream models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from er_lightning.models._common import check_bool, check_positive_int

__all__ = ["TransformerBlock", "TransformerLM", "ViT", "transformer_lm"]


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + fc2(gelu(fc1(LN(x))))``.

    Args:
        dim: model width E.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        dropout: dropout on the attention weights and after both residual branches.

    Example:
        >>> block = TransformerBlock(16, 2)
        >>> block(torch.zeros(3, 5, 16)).shape
        torch.Size([3, 5, 16])
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim, got dim={dim}, heads={heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``x``: (N, T, dim); ``attn_mask``: optional bool (T, T), ``True`` where attention is not allowed."""
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)
        x = x + self.drop(a)
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


def _check_common(dim: int, depth: int, heads: int, mlp_ratio: int) -> None:
    check_positive_int(dim, "dim")
    check_positive_int(depth, "depth")
    check_positive_int(heads, "heads")
    check_positive_int(mlp_ratio, "mlp_ratio")


class TransformerLM(nn.Module):
    """Causal transformer language model: token and position embeddings, pre-norm blocks, a (tied) linear head.

    ``forward(tokens)`` maps int64 token ids (N, T), T <= ``seq_len``, to next-token logits (N, T, vocab_size).
    With ``tie_weights`` the head's weight *is* the token table (``head.weight is token.weight``, Press & Wolf
    2017): ``named_parameters()`` yields it once, as ``token.weight``, and the sparsity callbacks mask it once.
    Position embeddings are an ``nn.Embedding`` over ``0..seq_len-1``. The causal mask is a bool tensor built in
    ``forward`` (no float ``-inf`` buffer, which SynFlow's ``|·|`` would turn into ``+inf``).

    Args:
        vocab_size: number of tokens (the logits' size).
        seq_len: longest sequence (rows of the position table); ``input_shape`` is ``(seq_len,)``.
        dim: model width.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        dropout: dropout inside the blocks and on the embeddings.
        tie_weights: share the token table with the output head.

    Example:
        >>> lm = TransformerLM(vocab_size=20, seq_len=8, dim=16, depth=1, heads=2)
        >>> lm(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 20])
        >>> lm.head.weight is lm.token.weight
        True
    """

    def __init__(
        self,
        vocab_size: int = 64,
        *,
        seq_len: int = 16,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.vocab_size = check_positive_int(vocab_size, "vocab_size", minimum=2)
        self.seq_len = check_positive_int(seq_len, "seq_len")
        _check_common(dim, depth, heads, mlp_ratio)
        check_bool(tie_weights, "tie_weights")
        self.input_shape = (seq_len,)
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)
        if tie_weights:
            self.head.weight = self.token.weight

    def forward(self, tokens: Tensor) -> Tensor:
        """Next-token logits (N, T, vocab_size) for int64 ``tokens`` (N, T)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(
                f"tokens must have shape (N, T) with T <= seq_len={self.seq_len}, got {tuple(tokens.shape)}"
            )
        t = tokens.shape[1]
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.token(tokens) + self.position(positions))
        causal = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        for block in self.blocks:
            x = block(x, attn_mask=causal)
        return self.head(self.norm(x))


class ViT(nn.Module):
    """ViT-style image classifier (Dosovitskiy et al. 2021, arXiv:2010.11929), small.

    A ``Conv2d`` with kernel = stride = ``patch_size`` embeds the patches, a learned class token and learned
    position embeddings (bare ``nn.Parameter``s) are added, pre-norm blocks follow, and a linear head reads the
    class token. ``forward`` maps (N, C, H, W) with H = W = ``image_size`` to logits (N, num_classes).

    Args:
        num_classes: number of logits.
        image_size: height and width of the inputs; a multiple of ``patch_size``.
        patch_size: side of a square patch.
        in_channels: input channels.
        dim, depth, heads, mlp_ratio, dropout: as :class:`TransformerLM`.

    Example:
        >>> vit = ViT(num_classes=3, image_size=8, patch_size=4, in_channels=1, dim=16, depth=1, heads=2)
        >>> vit(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        image_size: int = 8,
        patch_size: int = 2,
        in_channels: int = 1,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = check_positive_int(num_classes, "num_classes")
        check_positive_int(image_size, "image_size")
        check_positive_int(patch_size, "patch_size")
        check_positive_int(in_channels, "in_channels")
        _check_common(dim, depth, heads, mlp_ratio)
        if image_size % patch_size:
            raise ValueError(
                f"image_size must be a multiple of patch_size, got image_size={image_size}, patch_size={patch_size}"
            )
        self.input_shape = (in_channels, image_size, image_size)
        patches = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for images (N, C, image_size, image_size)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"images must have shape (N, *{self.input_shape}), got {tuple(x.shape)}")
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, P, dim)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        h = self.drop(tokens + self.pos_embed)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def transformer_lm(
    num_classes: int = 64,
    *,
    seq_len: int = 16,
    dim: int = 32,
    depth: int = 2,
    heads: int = 4,
    mlp_ratio: int = 2,
    dropout: float = 0.0,
    tie_weights: bool = True,
) -> TransformerLM:
    """Causal LM with ``num_classes`` = vocabulary size (next-token classes). See :class:`TransformerLM`."""
    return TransformerLM(
        num_classes,
        seq_len=seq_len,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        dropout=dropout,
        tie_weights=tie_weights,
    )
