"""fxcomp's own multi-head attention, with its projections as ordinary ``nn.Linear`` layers.

``nn.MultiheadAttention`` keeps the query, key and value projections in one packed tensor
(``in_proj_weight``) that it reads inside its forward, so a traced graph sees one opaque
call and no pass can quantize, smooth or prune the projections. ``Attention`` computes the
same function from four separate layers::

    out_proj(SDPA(q_proj(query), k_proj(key), v_proj(value)))

with ``torch.nn.functional.scaled_dot_product_attention``, and its forward traces with
torch.fx, so each projection is a ``call_module`` node of its own. The per-head widths
``qk_dim`` (queries and keys) and ``v_dim`` (values) may differ from each other and from
``embed_dim / num_heads``; the softmax scale is a stored float, ``1 / sqrt(head_dim)`` of
the layer it was made for, so that removing dimensions later does not change it.

The forward takes what ``nn.MultiheadAttention.forward`` takes (batched inputs, either
layout) and returns ``(output, None)``, as it does with ``need_weights=False``; it does not
compute the attention weights, and ``need_weights=True`` is an ``InputError``. Masks mean
what they mean there: a boolean ``key_padding_mask`` (N, S) or ``attn_mask`` (L, S) or
(N * num_heads, L, S) is True where a position may *not* be attended; float masks are
added to the scores. Dropout on the attention weights applies in training mode only.

Example::

    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    attention = Attention.from_multihead(mha)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(attention(x, x, x)[0], mha(x, x, x)[0])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxcomp.ir.errors import InputError

__all__ = ["Attention", "conversion_refusal", "merge_masks"]


def conversion_refusal(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` has no ``Attention`` equivalent, or None when it has one.

    Example::

        conversion_refusal(nn.MultiheadAttention(8, 2, add_bias_kv=True))  # "add_bias_kv ..."
    """
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True appends learned key/value rows, which Attention does not have"
    if mha.add_zero_attn:
        return "add_zero_attn=True appends a zero key/value row, which Attention does not have"
    return None


@torch.fx.wrap
def merge_masks(
    attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, query: torch.Tensor
) -> torch.Tensor:
    """One additive float mask for ``scaled_dot_product_attention`` from
    ``nn.MultiheadAttention``'s two (boolean masks are True where attention is not allowed),
    broadcastable to ``query``'s (N, heads, L, S) scores; one node in a traced graph.

    Example::

        merge_masks(None, torch.tensor([[False, True]]), torch.randn(1, 2, 3, 4)).shape
        # torch.Size([1, 1, 1, 2])
    """
    batch, heads = query.shape[0], query.shape[1]

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            zeros = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device)
            return zeros.masked_fill(mask, float("-inf"))
        return mask.to(query.dtype)

    merged = None
    if attn_mask is not None:
        merged = additive(attn_mask)
        if merged.dim() == 3:
            merged = merged.view(batch, heads, *merged.shape[1:])
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(batch, 1, 1, -1)
        merged = padding if merged is None else merged + padding
    if merged is None:
        raise InputError("merge_masks needs at least one mask")
    return merged


class Attention(nn.Module):
    """Multi-head attention from separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``
    Linear layers (module docstring).

    ``embed_dim`` is the query's and the output's width, ``kdim``/``vdim`` the key's and
    value's (default ``embed_dim``); queries and keys are projected to
    ``num_heads * qk_dim``, values to ``num_heads * v_dim`` (both default
    ``embed_dim // num_heads``); ``scale`` defaults to ``1 / sqrt(qk_dim)``.

    Example::

        attention = Attention(64, 4, batch_first=True)
        x = torch.randn(2, 10, 64)
        out, weights = attention(x, x, x)  # out: (2, 10, 64); weights: None
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        qk_dim: int | None = None,
        v_dim: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        scale: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim < 1:
            raise InputError(
                f"Attention needs embed_dim, num_heads >= 1, got {embed_dim}, {num_heads}"
            )
        if (qk_dim is None or v_dim is None) and embed_dim % num_heads:
            raise InputError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}",
                hint="give qk_dim and v_dim, the per-head widths, explicitly",
            )
        head_dim = embed_dim // num_heads
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim or head_dim
        self.v_dim = v_dim or head_dim
        self.kdim = kdim or embed_dim
        self.vdim = vdim or embed_dim
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = dropout
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(self.qk_dim)
        where = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.qk_dim, bias=bias, **where)
        self.k_proj = nn.Linear(self.kdim, num_heads * self.qk_dim, bias=bias, **where)
        self.v_proj = nn.Linear(self.vdim, num_heads * self.v_dim, bias=bias, **where)
        self.out_proj = nn.Linear(num_heads * self.v_dim, embed_dim, bias=bias, **where)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> Attention:
        """An ``Attention`` computing what ``mha`` computes, with copies of its weights;
        ``InputError`` where ``conversion_refusal`` gives a reason.

        Example::

            Attention.from_multihead(nn.MultiheadAttention(64, 4))
        """
        reason = conversion_refusal(mha)
        if reason is not None:
            raise InputError(f"cannot convert this MultiheadAttention: {reason}")
        weight = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        attention = cls(
            mha.embed_dim,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            batch_first=mha.batch_first,
            dropout=mha.dropout,
            device=weight.device,
            dtype=weight.dtype,
        )
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        layers = (attention.q_proj, attention.k_proj, attention.v_proj)
        with torch.no_grad():
            for layer, w, b in zip(layers, weights, biases, strict=True):
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            attention.out_proj.weight.copy_(mha.out_proj.weight)
            if attention.out_proj.bias is not None:
                attention.out_proj.bias.copy_(mha.out_proj.bias)
        return attention.train(mha.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """``(output, None)`` for batched ``query`` (N, L, E) and ``key``/``value`` (N, S, ...)
        with ``batch_first``, else (L, N, E) and (S, N, ...); ``is_causal`` is the hint it
        is for ``nn.MultiheadAttention``: without a ``key_padding_mask`` the causal mask is
        applied and ``attn_mask`` is not read."""
        if need_weights:
            raise InputError(
                "Attention does not compute attention weights (need_weights=True)",
                hint="call it with need_weights=False, or keep nn.MultiheadAttention here",
            )
        if is_causal and attn_mask is None and key_padding_mask is not None:
            raise InputError("is_causal=True with a key_padding_mask needs attn_mask")
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if not self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        q = q.unflatten(-1, (self.num_heads, self.qk_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.num_heads, self.qk_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_heads, self.v_dim)).transpose(1, 2)
        causal = is_causal and key_padding_mask is None
        mask = None
        if not causal and (attn_mask is not None or key_padding_mask is not None):
            mask = merge_masks(attn_mask, key_padding_mask, q)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.scale,
        )
        out = out.transpose(1, 2).flatten(2)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.out_proj(out), None

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
            f"batch_first={self.batch_first}, scale={self.scale:.6g}"
        )
