"""Attention modules backed by :func:`fastattn.attention`.

- :class:`MultiheadAttention`: a drop-in for :class:`torch.nn.MultiheadAttention`.
- :class:`CausalSelfAttention`: the nanoGPT block (fused QKV projection ``c_attn``, output
  projection ``c_proj``), with grouped-query heads and a KV cache for generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.ops import _gemm
from fastattn.ops.attention import attention


def _causal_mask_kind(mask: Tensor, L: int, S: int) -> bool:
    """True if ``mask`` is exactly the (L, S) causal mask torch uses: a bool mask True above the
    diagonal, or a float mask -inf above the diagonal and 0 elsewhere."""
    if mask.dim() != 2 or tuple(mask.shape) != (L, S) or L != S:
        return False
    upper = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    if mask.dtype.is_floating_point:
        want = torch.zeros(L, S, dtype=mask.dtype, device=mask.device)
        return bool(torch.equal(mask, want.masked_fill(upper, float("-inf"))))
    return False


def _bool_padding_mask(mask: Tensor | None) -> tuple[bool, Tensor | None]:
    """(usable, bool mask True = padding). Float masks qualify only when all 0 / -inf."""
    if mask is None or mask.dtype == torch.bool:
        return True, mask
    if mask.dtype.is_floating_point:
        is_pad = torch.isneginf(mask)
        if bool(((mask == 0) | is_pad).all()):
            return True, is_pad
    return False, None


class MultiheadAttention(nn.MultiheadAttention):
    """:class:`torch.nn.MultiheadAttention` with the attention itself served by
    :func:`fastattn.attention` where it can be.

    A subclass: the constructor, parameters, ``state_dict`` keys, forward signature and return
    value ``(output, weights or None)`` are torch's, and ``load_state_dict`` works both ways.

    The fused path serves calls with ``need_weights=False``; no ``attn_mask``, or a causal one
    (``is_causal=True`` with ``attn_mask=None``, or ``attn_mask`` equal to the square causal
    mask, bool or 0/-inf float); ``key_padding_mask`` None, bool, or float with only 0 / -inf;
    ``batch_first`` either way; batched or unbatched inputs; dropout in training. Everything
    else goes to torch's own forward unchanged: ``need_weights=True`` (the default, as in
    torch: pass ``need_weights=False`` to get the fused kernel), any other ``attn_mask``,
    ``add_bias_kv``, ``add_zero_attn``, and ``kdim`` / ``vdim`` differing from ``embed_dim``.
    (Unlike torch, ``is_causal=True`` without an ``attn_mask`` is accepted on the fused path.)
    """

    def _fused_case(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal):
        """None if the fused path cannot serve the call, else (causal, bool padding mask)."""
        if need_weights or not self._qkv_same_embed_dim or self.bias_k is not None:
            return None
        if self.add_zero_attn or query.dim() not in (2, 3):
            return None
        if not (query.dim() == key.dim() == value.dim()):
            return None
        if not (query.dtype == key.dtype == value.dtype == self.in_proj_weight.dtype):
            return None
        seq = 1 if (query.dim() == 3 and self.batch_first) else 0
        L, S = query.shape[seq], key.shape[seq]
        if attn_mask is not None:
            if not _causal_mask_kind(attn_mask, L, S):
                return None
            causal = True
        else:
            causal = bool(is_causal)
            if causal and L != S:
                return None
        ok, kpm = _bool_padding_mask(key_padding_mask)
        if not ok:
            return None
        return causal, kpm

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        case = self._fused_case(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        )
        if case is None:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        causal, kpm = case
        same_qkv, same_kv = query is key and key is value, key is value  # before reshaping
        batched = query.dim() == 3
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            kpm = kpm.unsqueeze(0) if kpm is not None else None
        elif not self.batch_first:  # (L, N, E) -> (N, L, E) views
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        N, L, E = query.shape
        S = key.shape[1]
        H, Dh = self.num_heads, self.head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if same_qkv:  # self-attention: one fused in-projection
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            wq, wk, wv = w.chunk(3)
            bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
            q = F.linear(query, wq, bq)
            if same_kv:
                k, v = F.linear(
                    key, torch.cat([wk, wv]), None if b is None else torch.cat([bk, bv])
                ).chunk(2, dim=-1)
            else:
                k, v = F.linear(key, wk, bk), F.linear(value, wv, bv)
        # (N, T, E) -> (N, H, T, Dh) strided views
        q = q.reshape(N, L, H, Dh).transpose(1, 2)
        k = k.reshape(N, S, H, Dh).transpose(1, 2)
        v = v.reshape(N, S, H, Dh).transpose(1, 2)
        y = attention(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=kpm,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).reshape(N, L, E)
        y = F.linear(y, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            y = y.squeeze(0)
        elif not self.batch_first:
            y = y.transpose(0, 1)
        return y, None


class CausalSelfAttention(nn.Module):
    """nanoGPT's causal self-attention block on :func:`fastattn.attention`.

    ``c_attn``: one Linear producing q (n_head heads) and k, v (n_kv_head heads each; grouped-
    query attention when n_kv_head < n_head); ``c_proj``: the output Linear. Attention dropout
    runs inside the kernel (``dropout_p`` in training), residual dropout after ``c_proj``.

    ``forward(x)`` with x (B, T, C) returns y (B, T, C). For generation,
    ``forward(x, past_kv=(k, v), use_cache=True)`` returns ``(y, (k, v))`` with the cache
    extended by x's positions (k, v: (B, n_kv_head, T_total, head_dim)); a new token costs one
    query row, and bottom-right causal alignment makes it see every cached key.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float = 0.0,
        bias: bool = True,
        n_kv_head: int | None = None,
    ) -> None:
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if n_kv_head < 1 or n_head % n_kv_head != 0:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.dropout = dropout
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
        use_cache: bool = False,
        *,
        resid_dropout: bool = True,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        """``resid_dropout=False`` leaves out the dropout after ``c_proj``, for a caller that
        fuses it into the residual add (``fastattn.add_layer_norm(..., dropout_p=
        self.resid_dropout.p)``, as :class:`fastattn.models.gpt.GPT` does)."""
        B, T, C = x.shape
        hd, nh, nkv = self.head_dim, self.n_head, self.n_kv_head
        qkv = _gemm.linear(x, self.c_attn.weight, self.c_attn.bias)
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=2)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd), a strided view
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, nkv, hd).transpose(1, 2)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nkv, T_past + T, hd)
            v = torch.cat([past_kv[1], v], dim=2)
        y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        y = _gemm.linear(y, self.c_proj.weight, self.c_proj.bias)
        if resid_dropout:
            y = self.resid_dropout(y)
        if use_cache:
            return y, (k, v)
        return y
