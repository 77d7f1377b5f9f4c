"""Hugging Face transformers integration: ``attn_implementation="fastattn"``.

:func:`register` adds ``"fastattn"`` to transformers' attention-function registry
(``AttentionInterface``) and its mask registry (``AttentionMaskInterface``, with the same masks as
``"sdpa"``), so a model loads with ``from_pretrained(..., attn_implementation="fastattn")`` or
switches with ``model.set_attn_implementation("fastattn")``; :func:`fastattn.patch` does the latter.

transformers is optional: nothing here is imported by ``import fastattn``.

The fused kernel covers causal or full attention with a key padding mask. A 4-D boolean mask from
transformers is decomposed into exactly that (causal bottom-right + padded keys) when it is of
that form; any other mask (sliding windows, packed sequences, float biases) or a request for the
attention weights goes to PyTorch's SDPA with the mask unchanged, so the meaning never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastattn.ops.attention import attention

NAME = "fastattn"


def _causal(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    # Bottom-right aligned, like the kernel: query i sees key j iff j <= i + tk - tq.
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def split_mask(mask: torch.Tensor, tq: int, tk: int) -> tuple[bool, torch.Tensor] | None:
    """``(causal, key_padding_mask)`` equal to a boolean (B, 1|H, Tq, Tk) mask, or None."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    m = mask[:, 0]
    if m.shape[-2:] != (tq, tk):
        return None
    keep = m.any(dim=1)  # (B, Tk): keys some query attends to
    full = keep[:, None, :].expand_as(m)
    if torch.equal(full, m):
        return False, ~keep
    causal = _causal(tq, tk, m.device)
    if torch.equal(full & causal, m):
        return True, ~keep
    return None


def fastattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) ->
    (output (B, Tq, H, D), None)."""
    tq, tk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and tq > 1
    unsupported = kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    split = (causal, None) if attention_mask is None else split_mask(attention_mask, tq, tk)
    if split is None or unsupported:
        # Not a (causal +) padding mask: SDPA with the mask as given (GQA expanded for it).
        rep = query.shape[1] // key.shape[1]
        if rep > 1:
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal and attention_mask is None,
        )
    else:
        causal, kpm = split
        if kpm is not None and not kpm.any():
            kpm = None
        out = attention(
            query, key, value, causal=causal, scale=scaling, key_padding_mask=kpm, dropout_p=dropout
        )
    return out.transpose(1, 2).contiguous(), None


def register() -> bool:
    """Register ``"fastattn"`` with transformers; False if transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, fastattn_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return True
