"""``nn.MultiheadAttention``'s forward with its two projections as callables, so that they can run sparse.

Attention reads its projection weights itself (``in_proj_weight``, ``out_proj.weight``) and hands them to
``F.multi_head_attention_forward``, so routing the ``Linear`` layers alone never reaches them. With the packed
in-projection, :func:`multihead_attention` computes what ``nn.MultiheadAttention.forward`` computes (same masks,
``need_weights`` and ``is_causal`` rules, dropout, batch-first and unbatched inputs), with ``in_proj(x)`` and
``out_proj(x)`` in place of the ``F.linear`` calls. Self-attention (``query is key is value``) projects once;
cross-attention projects each distinct input with the whole packed layer and keeps its third.

Example:
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> x = torch.randn(3, 5, 8)
    >>> out, w = multihead_attention(
    ...     mha, x, x, x,
    ...     in_proj=lambda t: F.linear(t, mha.in_proj_weight, mha.in_proj_bias),
    ...     out_proj=lambda t: F.linear(t, mha.out_proj.weight, mha.out_proj.bias),
    ... )
    >>> bool(torch.allclose(out, mha(x, x, x)[0], atol=1e-6)), tuple(w.shape)
    (True, (3, 5, 5))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["attention_unsupported", "multihead_attention"]

Projection = Callable[[Tensor], Tensor]


def attention_unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha``'s projections cannot be routed (None: they can, for self-attention calls)."""
    if not mha._qkv_same_embed_dim:
        return "kdim/vdim differ from embed_dim (separate q/k/v projection weights)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def call_unsupported(query: Tensor, key: Tensor, value: Tensor) -> str | None:
    """Why this call of a routable attention computes dense (None: it can use the projections given)."""
    if any(t.is_nested for t in (query, key, value)):
        return "nested tensor inputs"
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        return f"inputs of {query.dim()}/{key.dim()}/{value.dim()} dims (batched or unbatched sequences only)"
    return None


def _sequence_first(query: Tensor, key: Tensor, value: Tensor, batch_first: bool) -> tuple[Tensor, ...]:
    """(L, N, E) views of the inputs (batch dim 1 added when unbatched), keeping which of them are one tensor."""
    if query.dim() == 3 and not batch_first:
        return query, key, value

    def move(t: Tensor) -> Tensor:
        return t.transpose(1, 0) if t.dim() == 3 else t.unsqueeze(1)

    q = move(query)
    k = q if key is query else move(key)
    v = k if value is key else (q if value is query else move(value))
    return q, k, v


def _float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    """A bool mask (True = not allowed) as the additive float mask torch uses; float masks pass unchanged."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def multihead_attention(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    in_proj: Projection,
    out_proj: Projection,
) -> tuple[Tensor, Tensor | None]:
    """``mha(query, key, value, ...)`` with ``in_proj`` (E -> 3E) / ``out_proj`` (E -> E) as the projections.

    The caller checks :func:`attention_unsupported` and :func:`call_unsupported` first.
    """
    batched = query.dim() == 3
    q_in, k_in, v_in = _sequence_first(query, key, value, mha.batch_first)
    if not batched and key_padding_mask is not None:
        key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = q_in.shape
    src_len = k_in.shape[0]
    heads = mha.num_heads
    head_dim = embed_dim // heads
    if embed_dim != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {embed_dim}")

    key_padding_mask = _float_mask(key_padding_mask, q_in.dtype, "key_padding_mask")
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
            "`generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = _float_mask(attn_mask, q_in.dtype, "attn_mask")
        if key_padding_mask is not None:
            is_causal = False  # merged with the padding mask below, no longer causal
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * heads, tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                    f"{(bsz * heads, tgt_len, src_len)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if q_in is k_in and k_in is v_in:  # self-attention: one packed projection
        proj = in_proj(q_in)  # (L, N, 3E)
        proj = proj.unflatten(-1, (3, embed_dim)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = proj[0], proj[1], proj[2]
    else:  # each distinct input is projected once and keeps its third (the rows torch computes it with)
        projected: dict[int, Tensor] = {}
        thirds = []
        for i, t in enumerate((q_in, k_in, v_in)):
            if id(t) not in projected:
                projected[id(t)] = in_proj(t)
            thirds.append(projected[id(t)].narrow(-1, i * embed_dim, embed_dim).contiguous())
        q, k, v = thirds
    q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1)
    v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1)

    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(
                f"expecting key_padding_mask shape of {(bsz, src_len)}, but got {key_padding_mask.shape}"
            )
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, heads, -1, -1)
            .reshape(bsz * heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = mha.dropout if mha.training else 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = out_proj(out).view(tgt_len, bsz, embed_dim)
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = out_proj(out).view(tgt_len, bsz, embed_dim)
        weights = None
        if not batched:
            return out.squeeze(1), None
    if mha.batch_first:
        out = out.transpose(1, 0)
    return out, weights
