"""Hugging Face transformers integration: ``attn_implementation="fastattn"``.

:func:`register` adds ``"fastattn"`` to transformers' attention-function registry
(``AttentionInterface``) and its mask registry (``AttentionMaskInterface``, with the same masks as
``"sdpa"``), so a model loads with ``from_pretrained(..., attn_implementation="fastattn")`` or
switches with ``model.set_attn_implementation("fastattn")``; :func:`fastattn.patch` does the latter
(on every nested config) and reports what will run where.

transformers is optional: nothing here is imported by ``import fastattn``.

How the meaning is kept
-----------------------
:func:`fastattn_attention_forward` receives what transformers' own ``sdpa_attention_forward``
receives (the masks come from the same ``sdpa_mask``) and gives every argument the meaning it has
there, expressed through :func:`fastattn.attention`'s arguments:

- ``attention_mask=None``: causal iff ``is_causal`` (else ``module.is_causal``, default True) and
  more than one query, aligned **top-left** as SDPA's ``is_causal`` is (a prefill into a larger
  static cache). Keys no query can see are cropped first, as transformers' SDPA path does, so the
  kernel runs its ordinary bottom-right causal case.
- a 4-D bool mask (True = attend): decomposed, once per mask tensor (every layer gets the same
  one), into a diagonal band (causal, sliding window, static-cache offset) times a per-key
  padding vector, and checked to reproduce the mask exactly; it then becomes ``causal`` /
  ``window`` / ``alignment`` / ``key_padding_mask``, with trailing keys no query sees cropped.
  Any other bool mask (packed sequences, custom patterns) is passed whole as ``attn_mask``.
- a 4-D float mask is additive: ``attn_bias``. ``position_bias`` (T5) is added to it, with the
  bool or causal mask as above (SDPA's ``create_position_bias_mask`` meaning); an all-zero
  position bias that needs no gradient (T5's cross-attention) adds nothing and is left out.
- ``softcap`` -> ``softcap``; ``dropout`` -> ``dropout_p``; ``scaling`` -> ``scale``.
- ``cu_seq_lens_q`` / ``cu_seq_lens_k`` / ``seq_idx`` (packed sequences): a block-diagonal mask
  that keeps each sequence to itself, intersected with the mask (transformers' SDPA path ignores
  these kwargs and relies on the mask built from ``position_ids``; both agree when both exist).
- ``output_attentions`` (or a model whose config asks for them): the probabilities are computed in
  plain PyTorch with the same meaning and returned with the output, instead of ``None``.
- a paged cache (``cache=PagedAttentionCache``, continuous batching) goes, with every argument,
  to transformers' ``sdpa_attention_forward``.
- ``sliding_window``: the window is already in the mask transformers builds (SDPA ignores the
  kwarg too); it is only checked and reported.
- kwargs without a meaning for the attention maths are listed in :data:`HARMLESS_KWARGS` with the
  reason. Any other kwarg with a value (e.g. attention sinks ``s_aux``) raises ``ValueError``
  naming it: never dropped.

Where the result can differ from SDPA's: a query row that sees no key at all gives 0 (SDPA with a
bool mask gives 0 too; with an additive float mask of finite minima it averages the masked
values); dropout draws its mask from fastattn's Philox generator, not torch's.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections import Counter
from typing import Any

import torch

from fastattn.ops.attention import attention, diag_offset, visible_mask

NAME = "fastattn"

# kwargs transformers passes to attention functions that do not change the attention maths.
HARMLESS_KWARGS: dict[str, str] = {
    "position_ids": "positions are already applied to q/k (rotary) and packing by position_ids "
    "is already in the mask transformers builds",
    "use_cache": "the cache is updated before the attention function is called",
    "cache_position": "the cache is updated before the attention function is called",
    "past_key_values": "the cache is updated before the attention function is called",
    "output_hidden_states": "captured by transformers outside the attention function",
    "output_router_logits": "concerns MoE routers, not attention",
    "num_items_in_batch": "used by the loss only",
    "return_dict": "output formatting only",
    "max_length_q": "a kernel hint derived from cu_seq_lens_q (which is honoured)",
    "max_length_k": "a kernel hint derived from cu_seq_lens_k (which is honoured)",
    "sliding_window": "the window is already in the mask transformers builds",
    "deterministic": "asks flash-attn for a reproducible backward; not part of the result",
}

# How many calls went which way (for tests and for users who want to check a model really runs
# on fastattn): "fastattn" (fastattn.attention), "weights" (output_attentions: plain PyTorch),
# "sdpa" (routed to transformers' sdpa_attention_forward). Eager calls only: under torch.compile
# the count is skipped, since Dynamo guards on the value of a global it mutates and recompiled the
# whole model on every step (a compiled patched model ran 3-5x slower than the compiled original).
CALLS: Counter[str] = Counter()


def _count(path: str) -> None:
    if not torch.compiler.is_compiling():
        CALLS[path] += 1


# ----------------------------------------------------------------------------- mask analysis
class MaskPlan:
    """A bool mask as fastattn arguments: keys ``[:kv_len]``, band and key padding."""

    __slots__ = ("kv_len", "causal", "window", "alignment", "key_padding_mask")

    def __init__(
        self,
        kv_len: int,
        causal: bool,
        window: tuple[int, int] | None,
        alignment: str,
        key_padding_mask: torch.Tensor | None,
    ) -> None:
        self.kv_len: int = kv_len
        self.causal: bool = causal
        self.window: tuple[int, int] | None = window
        self.alignment: str = alignment
        self.key_padding_mask: torch.Tensor | None = key_padding_mask

    def kwargs(self) -> dict[str, Any]:
        return dict(
            causal=self.causal,
            window=self.window,
            alignment=self.alignment,
            key_padding_mask=self.key_padding_mask,
        )


def _band(tq: int, tk: int, right: int | None, left: int | None, device) -> torch.Tensor:
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    band = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if right is not None:
        band &= j <= i + right
    if left is not None:
        band &= j >= i - left
    return band


def decompose_mask(mask: torch.Tensor, batch: int, tq: int, tk: int) -> MaskPlan | None:
    """A :class:`MaskPlan` reproducing the bool (B|1, 1, Tq, Tk) ``mask`` exactly, or None.

    The mask must be ``band[i, j] & keep[b, j]`` where the band is ``i - L <= j <= i + R``
    (either side possibly unbounded): causal masks (any diagonal offset, e.g. a static cache),
    sliding windows, and padding of any side. The decomposition is checked element for element.
    """
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if mask.shape[-2:] != (tq, tk) or mask.shape[0] not in (1, batch) or tq == 0 or tk == 0:
        return None
    m = mask[:, 0]  # (b, Tq, Tk)
    keep = m.any(dim=1)  # (b, Tk): keys some query of that sequence sees
    seen = keep.any(dim=0)
    if not bool(seen.any()):
        return None  # nothing visible anywhere: let attn_mask say so
    rows = m.any(dim=0)  # (Tq, Tk) over the batch
    has = rows.any(dim=1)
    i = torch.arange(tq, device=m.device)
    j = torch.arange(tk, device=m.device)
    hi = torch.where(rows, j[None, :], -1).amax(dim=1)
    lo = torch.where(rows, j[None, :], tk).amin(dim=1)
    right = int((hi - i)[has].max())
    left = int((i - lo)[has].max())
    # Bounds that never bind for any (i, j) in range are dropped.
    r = None if right >= tk - 1 else right
    lft = None if left >= tq - 1 else left
    if not torch.equal(_band(tq, tk, r, lft, m.device)[None] & keep[:, None, :], m):
        return None
    n = int(torch.nonzero(seen)[-1]) + 1  # keys beyond n are seen by no query: cropped
    # Express the band relative to the kernel's diagonal (bottom-right off = n - Tq, or 0).
    if r is not None and r >= n - 1:
        r = None  # after cropping the right bound no longer binds
    if r is None:
        off = n - tq if lft is None or lft + n - tq >= 0 else 0
        wr = -1
    elif r >= n - tq:
        off, wr = n - tq, r - (n - tq)
    elif r >= 0:
        off, wr = 0, r
    else:
        return None
    wl = -1 if lft is None else lft + off
    if wl < -1 or (lft is not None and wl < 0):
        return None
    alignment = "bottom_right" if off == n - tq else "top_left"
    causal = wr == 0
    window = None
    if wl >= 0 or wr > 0:
        window = (wl, 0 if causal else wr)
    kpm = ~keep[:, :n]
    if not bool(kpm.any()):
        kpm = None
    elif kpm.shape[0] != batch:
        kpm = kpm.expand(batch, n).contiguous()
    if not causal and window is None:
        alignment = "bottom_right"
    return MaskPlan(n, causal, window, alignment, kpm)


class _MaskCache:
    """Decompositions of the last few mask tensors: every layer of a forward gets the same mask
    object (two or three objects for models mixing full and sliding layers)."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ref, int, tuple, MaskPlan | None]] = []

    def get(self, mask: torch.Tensor, batch: int, tq: int, tk: int) -> MaskPlan | None:
        key = (batch, tq, tk, tuple(mask.shape), mask.device)
        for ref, version, k, plan in self.entries:
            if ref() is mask and version == mask._version and k == key:
                return plan
        plan = decompose_mask(mask, batch, tq, tk)
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1) :]
        self.entries.append((weakref.ref(mask), mask._version, key, plan))
        return plan


_mask_cache = _MaskCache()


def _segments(kwargs: dict[str, Any], batch: int, tq: int, tk: int, device) -> torch.Tensor | None:
    """A bool (1, 1, Tq, Tk) mask keeping packed sequences apart, from cu_seq_lens / seq_idx."""
    cu_q, cu_k, seq_idx = (kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"))
    if cu_q is None and cu_k is None and seq_idx is None:
        return None
    ids = []
    if cu_q is not None or cu_k is not None:
        cu_q = cu_k if cu_q is None else cu_q
        cu_k = cu_q if cu_k is None else cu_k
        if not torch.equal(cu_q.to(cu_k.device), cu_k) or batch != 1 or tq != tk:
            raise ValueError(
                "fastattn (transformers integration): packed sequences (cu_seq_lens_q/k) are "
                "supported for self-attention over one flattened batch row without a cache "
                f"(batch 1, q_len == kv_len, cu_seq_lens_q == cu_seq_lens_k); got batch {batch}, "
                f"q_len {tq}, kv_len {tk}. Use attn_implementation='flash_attention_2' or unpack."
            )
        cu = cu_q.to(device=device, dtype=torch.long)
        if int(cu[-1]) != tq:
            raise ValueError(
                f"fastattn (transformers integration): cu_seq_lens ends at {int(cu[-1])} but the "
                f"sequence has {tq} tokens"
            )
        pos = torch.arange(tq, device=device)
        ids.append(torch.searchsorted(cu[1:], pos, right=True))
    if seq_idx is not None:
        s = seq_idx.to(device).reshape(-1)
        if batch != 1 or tq != tk or s.numel() != tq:
            raise ValueError(
                "fastattn (transformers integration): seq_idx is supported for self-attention "
                f"over one flattened batch row (batch 1, {tq} tokens); got shape "
                f"{tuple(seq_idx.shape)} with batch {batch}, q_len {tq}, kv_len {tk}"
            )
        ids.append(s)
    same = torch.ones(tq, tk, dtype=torch.bool, device=device)
    for sid in ids:
        same &= sid[:, None] == sid[None, :]
    return same.view(1, 1, tq, tk)


# ----------------------------------------------------------------------------- the call
# Some attention classes (Falcon's, ...) take output_attentions as a parameter of their own
# forward, do not pass it on to the attention function, and return what it returns as the
# weights: eager attention always computes them, fastattn only when asked. A forward pre-hook
# (hook_output_attentions: installed by patch(), or at a module's first call here) records the
# flag of each call on the module under this name.
WANTS_WEIGHTS = "_fastattn_wants_weights"
# Set by patch() on such a module when no model class around it records its class's weights
# through transformers' output collector (Falcon: the flag is the only way weights are asked
# for). The collector's ContextVar is then not consulted: torch.compile cannot trace it there.
NOT_RECORDED = "_fastattn_not_recorded"


@functools.cache
def _takes_output_attentions(cls: type) -> int | None:
    """The positional index (after self) of ``output_attentions`` in ``cls.forward``, or None."""
    try:
        params = list(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("output_attentions") - 1 if "output_attentions" in params else None


def hook_output_attentions(module: torch.nn.Module):
    """Install the output_attentions recorder on ``module`` if its forward takes the flag;
    the hook's handle, or None (nothing to record, or already recording)."""
    index = _takes_output_attentions(type(module))
    if index is None or WANTS_WEIGHTS in module.__dict__:
        return None

    def record(mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        flag = kwargs.get("output_attentions", args[index] if len(args) > index else False)
        setattr(mod, WANTS_WEIGHTS, bool(flag))

    setattr(module, WANTS_WEIGHTS, False)
    return module.register_forward_pre_hook(record, with_kwargs=True)


def _caller_flag(module: torch.nn.Module) -> bool:
    """output_attentions of the module's forward now running (the call before its hook was
    installed): read from that frame's locals."""
    frame = inspect.currentframe()
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            break
        loc = frame.f_locals
        if loc.get("self") is module and "output_attentions" in loc:
            return bool(loc["output_attentions"])
    return False


def _weights_requested(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if _takes_output_attentions(type(module)) is not None:
        if WANTS_WEIGHTS in module.__dict__:
            if module.__dict__[WANTS_WEIGHTS]:
                return True
            if module.__dict__.get(NOT_RECORDED):  # no collector asks for this class's weights
                return False
        elif not torch.compiler.is_compiling():  # first call without patch(): hook it now
            hook_output_attentions(module)
            if _caller_flag(module):
                return True
    # transformers >= 5 records weights through hooks when the call or the config asks for them
    # (config.output_attentions=True reaches no attention kwarg): ask its collector.
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers pass output_attentions
        return False
    collected = _active_collector.get()
    return bool(collected) and any("attentions" in k for k in collected)


def _route_to_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _count("sdpa")
    return sdpa_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def interpret(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[int, dict[str, Any]]:
    """``(kv_len, fastattn.attention kwargs)`` with the meaning transformers gives the call:
    keys ``[:kv_len]`` are the ones any query can see (the rest are cropped)."""
    known = {"softcap", "position_bias", "output_attentions", "cu_seq_lens_q", "cu_seq_lens_k"}
    known |= {"seq_idx", "cache"}
    for name, val in kwargs.items():
        if name in known or name in HARMLESS_KWARGS:
            continue
        if val is None or val is False:
            continue  # an absent feature
        raise ValueError(
            f"fastattn (transformers integration): {type(module).__name__} passed {name}="
            f"{type(val).__name__}, which fastattn cannot honour; use another attn_implementation "
            "(model.set_attn_implementation('eager')) or fastattn.unpatch(model)"
        )
    batch, _, tq, _ = query.shape
    tk = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    args: dict[str, Any] = dict(scale=scaling, dropout_p=float(dropout or 0.0))
    softcap = kwargs.get("softcap")
    if softcap:  # transformers: None / 0 = no softcap
        args["softcap"] = float(softcap)
    n = tk
    bias = kwargs.get("position_bias")
    fixed = bias is not None and not bias.requires_grad and not torch.compiler.is_compiling()
    if fixed and not bool(bias.any()):
        bias = None  # adding zeros (T5 gives its cross-attention an all-zero position bias)
    extra = _segments(kwargs, batch, tq, tk, query.device)
    if attention_mask is None:
        if bool(causal) and tq > 1:
            # SDPA's is_causal: top-left. Keys after the last query's diagonal are seen by no
            # query (an empty static-cache tail): crop them, then it is the kernel's causal.
            n = min(tk, tq)
            args["causal"] = True
            args["alignment"] = "bottom_right" if n == tq else "top_left"
    elif attention_mask.dtype == torch.bool:
        # Under torch.compile the data-dependent analysis would break the graph: pass the mask.
        analyse = extra is None and not torch.compiler.is_compiling()
        plan = _mask_cache.get(attention_mask, batch, tq, tk) if analyse else None
        if plan is not None:
            n = plan.kv_len
            args.update(plan.kwargs())
        else:
            args["attn_mask"] = attention_mask
    elif attention_mask.dtype.is_floating_point:
        bias = attention_mask if bias is None else bias + attention_mask
    else:
        raise ValueError(
            f"fastattn (transformers integration): attention_mask of dtype {attention_mask.dtype};"
            " expected a bool mask (True = attend) or an additive float mask"
        )
    if extra is not None:
        prev = args.get("attn_mask")
        args["attn_mask"] = extra if prev is None else prev & extra
    if bias is not None:
        args["attn_bias"] = bias[..., :n] if bias.shape[-1] == tk and n < tk else bias
    if "attn_mask" in args and n < tk:
        args["attn_mask"] = args["attn_mask"][..., :n]
    return n, args


def _with_weights(q, k, v, *, scale, dropout_p, **args):
    """(output, probabilities) materialising the scores, with fastattn.attention's meaning; the
    returned weights are after dropout (what transformers' eager attention returns)."""
    tq, tk, d = q.shape[2], k.shape[2], q.shape[-1]
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.matmul(q, kr.transpose(-2, -1)) * (d**-0.5 if scale is None else scale)
    if args.get("softcap"):
        c = args["softcap"]
        s = c * torch.tanh(s / c)
    if args.get("attn_bias") is not None:
        s = s + args["attn_bias"]
    wl, wr = args.get("window") or (-1, -1)
    if args.get("causal"):
        wr = 0
    off = diag_offset(tq, tk, args.get("alignment", "bottom_right"))
    vis = visible_mask(tq, tk, wl, wr, off, args.get("key_padding_mask"), q.device)
    if args.get("attn_mask") is not None:
        vis = args["attn_mask"] if vis is None else vis & args["attn_mask"]
    vis = ~torch.isneginf(s) if vis is None else vis & ~torch.isneginf(s)
    s = torch.where(vis, s, float("-inf"))
    s = torch.where(vis.any(-1, keepdim=True), s, 0.0)  # rows that see nothing: 0, not NaN
    p = torch.softmax(s.float(), dim=-1).to(q.dtype) * vis
    p = torch.nn.functional.dropout(p, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(p, vr), p


def fastattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function signature: q (B, H, Tq, D), k/v (B, Hkv, Tk, D) ->
    (output (B, Tq, H, D), attention weights (B, H, Tq, Tk) when asked for, else None)."""
    if kwargs.get("cache") is not None:
        # A paged cache (continuous batching) is updated inside transformers' own function.
        return _route_to_sdpa(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs
        )
    tk = key.shape[2]
    n, args = interpret(module, query, key, attention_mask, dropout, scaling, is_causal, kwargs)
    if n < tk:
        key, value = key[:, :, :n], value[:, :, :n]
    weights = None
    if _weights_requested(module, kwargs):
        _count("weights")
        out, weights = _with_weights(query, key, value, **args)
        if n < tk:  # the cropped keys had probability 0
            weights = torch.nn.functional.pad(weights, (0, tk - n))
    else:
        _count("fastattn")
        out = attention(query, key, value, **args)
    return out.transpose(1, 2).contiguous(), weights


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
