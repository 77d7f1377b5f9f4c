"""A small GPT (nanoGPT's model) built from fastattn modules, or from plain torch ones.

``GPT(config, kernels="fastattn")`` uses :class:`fastattn.nn.LayerNorm`,
:class:`fastattn.nn.CausalSelfAttention` and :class:`fastattn.nn.FeedForward`, and fuses each
residual add with the LayerNorm that follows it (:func:`fastattn.add_layer_norm`).
``GPT(config, kernels="torch")`` uses :class:`torch.nn.LayerNorm` and the plain-torch twins
below (:class:`TorchCausalSelfAttention`, :class:`TorchFeedForward`). Both variants have the
same parameter names and shapes, so one ``state_dict`` loads into either, and the same seed
gives the same initial weights.

Shapes: B batch, T time (sequence), C = n_embd, nh = n_head, hs = C // nh, V = vocab_size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn
from fastattn.nn import CausalSelfAttention, FeedForward


# ----------------------------------------------------------------------------- torch twins
class TorchCausalSelfAttention(nn.Module):
    """Multi-head causal self-attention in plain PyTorch (``F.scaled_dot_product_attention``).

    ``forward(x, past_kv=None, use_cache=False)``: x (B, T, C) -> y (B, T, C), or
    ``(y, (k, v))`` with k, v (B, nh, Tk, hs) when ``use_cache``. With a cache the T new
    queries sit at the end of the Tk keys (bottom-right causal alignment): query i sees key j
    iff ``j <= i + Tk - T``.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_embd, self.n_head, self.dropout = n_embd, n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # fused q, k, v projections
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, past_kv: tuple[Tensor, Tensor] | None = None, use_cache: bool = False
    ):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if past_kv is not None:  # (B, nh, Tpast, hs) each
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, Tk, hs)
            v = torch.cat([past_kv[1], v], dim=2)
        Tk = k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if Tk == T:  # no cache: SDPA's top-left causal mask is the right one
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # SDPA's is_causal is top-left aligned when T != Tk: build the bottom-right mask
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(diagonal=Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return (y, (k, v)) if use_cache else y


class TorchFeedForward(nn.Module):
    """``dropout(fc2(gelu(fc1(x))))`` in plain PyTorch; d_hidden defaults to 4 * d_model."""

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None = None,
        bias: bool = True,
        approximate: str = "none",
        dropout: float = 0.0,
    ):
        super().__init__()
        d_hidden = 4 * d_model if d_hidden is None else d_hidden
        self.fc1 = nn.Linear(d_model, d_hidden, bias=bias)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(d_hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, C)
        return self.dropout(self.fc2(self.act(self.fc1(x))))


# ----------------------------------------------------------------------------- the model
@dataclass
class GPTConfig:
    block_size: int = 256  # longest context (position embeddings)
    vocab_size: int = 65  # tinyshakespeare has 65 characters
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


@functools.cache
def _fused_adamw_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``AdamW(fused=True)`` can step a parameter of this device and dtype. Tried on a
    one-element parameter: torch checks support only at the first ``step()`` (a RuntimeError),
    and which devices and dtypes have the kernel changes between torch versions."""
    p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
    p.grad = torch.zeros_like(p)
    try:
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    return True


def _next_matmul_dtype(t: Tensor) -> torch.dtype | None:
    """The dtype the next matmul reads: autocast's where it is on (so the LayerNorm writes it
    directly, no cast pass), else None (the input's)."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def _add_norm(
    ln: nn.LayerNorm, delta: Tensor, x: Tensor | None, fused: bool, p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``s = x + dropout_p(delta); return ln(s), s`` (the new residual stream s and its
    normalised form). fastattn: one kernel (:func:`fastattn.add_layer_norm`: dropout, the add
    of a bfloat16 sublayer output to the float32 stream, the norm written in the next matmul's
    dtype); ``x=None`` means s = dropout(delta) (the embeddings). torch: the sublayer applied
    its own dropout (p is 0 here)."""
    if fused:
        return fastattn.add_layer_norm(
            delta, x, ln.normalized_shape, ln.weight, ln.bias, ln.eps,
            dropout_p=p, out_dtype=_next_matmul_dtype(delta),
        )  # fmt: skip
    s = x + delta.to(x.dtype)  # under autocast the sublayer output is bf16, the stream float32
    return ln(s), s


class Block(nn.Module):
    """Pre-LN transformer block: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig, kernels: str):
        super().__init__()
        fa = kernels == "fastattn"
        LN = fastattn.nn.LayerNorm if fa else nn.LayerNorm
        Attn = CausalSelfAttention if fa else TorchCausalSelfAttention
        MLP = FeedForward if fa else TorchFeedForward
        C = config.n_embd
        self.fused = fa
        self.ln_1 = LN(C, bias=config.bias)
        self.attn = Attn(C, config.n_head, dropout=config.dropout, bias=config.bias)
        self.ln_2 = LN(C, bias=config.bias)
        self.mlp = MLP(C, 4 * C, bias=config.bias, dropout=config.dropout)

    def forward(
        self, x: Tensor | None, pending: Tensor | None = None, past_kv=None, use_cache=False,
        pending_p: float = 0.0,
    ):  # fmt: skip
        """x: the residual stream (B, T, C); pending: the previous block's MLP output (or, for
        the first fastattn block, the embeddings with x None), not yet added to x, so that the
        add (and, with fastattn, its dropout ``pending_p``) fuses with ln_1. Returns
        (x, mlp_out, kv): the caller adds mlp_out to x (fused with the next LayerNorm)."""
        fa = self.fused
        if pending is None:
            h = self.ln_1(x)
        else:
            h, x = _add_norm(self.ln_1, pending, x, fa, pending_p)
        kv = None
        attn_kw = {"resid_dropout": False} if fa else {}  # fused into ln_2's add below
        if use_cache:
            a, kv = self.attn(h, past_kv=past_kv, use_cache=True, **attn_kw)
        else:
            a = self.attn(h, **attn_kw)
        p = self.attn.resid_dropout.p if (fa and self.training) else 0.0
        h, x = _add_norm(self.ln_2, a, x, fa, p)  # x = x + attn(...), h = ln_2(x)
        return x, (self.mlp(h, dropout=False) if fa else self.mlp(h)), kv

    def mlp_dropout_p(self) -> float:
        """The MLP output dropout the caller fuses into the next add (fastattn, training)."""
        return self.mlp.dropout.p if (self.fused and self.training) else 0.0


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, kernels: str = "fastattn"):
        super().__init__()
        if kernels not in ("fastattn", "torch"):
            raise ValueError(f'GPT: kernels must be "fastattn" or "torch", got {kernels!r}')
        self.config, self.kernels = config, kernels
        LN = fastattn.nn.LayerNorm if kernels == "fastattn" else nn.LayerNorm
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, kernels) for _ in range(config.n_layer)]),
                ln_f=LN(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """nanoGPT's init, by parameter name (sorted), so both kernel variants draw the same
        numbers: N(0, 0.02) for weights and embeddings, N(0, 0.02 / sqrt(2 n_layer)) for the
        projections into the residual stream (c_proj, fc2), zeros for biases, ones for LN."""
        std_proj = 0.02 / math.sqrt(2 * self.config.n_layer)
        norms = {n for n, m in self.named_modules() if isinstance(m, nn.LayerNorm)}
        for name, p in sorted(self.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            if owner in norms:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            elif name.endswith(("c_proj.weight", "fc2.weight")):
                p.normal_(0.0, std_proj)
            else:
                p.normal_(0.0, 0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; position embeddings are left out by default (token embeddings are
        tied to lm_head, so they count as the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def _run(self, idx: Tensor, pos0: int = 0, past=None, use_cache: bool = False):
        B, T = idx.shape
        if pos0 + T > self.config.block_size:
            raise ValueError(
                f"GPT: sequence of length {pos0 + T} is longer than block_size "
                f"{self.config.block_size}"
            )
        pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)  # (T,)
        emb = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        fa = self.kernels == "fastattn"
        if fa:  # the embedding dropout fuses with block 0's ln_1 (x None: s = dropout(emb))
            x, pending = None, emb
            p = self.transformer.drop.p if self.training else 0.0
        else:
            x, pending, p = self.transformer.drop(emb), None, 0.0
        present = []
        for i, block in enumerate(self.transformer.h):
            x, pending, kv = block(x, pending, past[i] if past else None, use_cache, p)
            p = block.mlp_dropout_p()
            present.append(kv)
        x = _add_norm(self.transformer.ln_f, pending, x, fa, p)[0]
        return x, present  # x: ln_f(residual stream), (B, T, C)

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        """idx, targets: (B, T) token ids. Returns (logits, loss): logits (B, T, V) and the mean
        cross-entropy with targets; without targets, logits (B, 1, V) for the last position
        and loss None."""
        x, _ = self._run(idx)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1
        )
        return logits, loss

    def configure_optimizers(
        self,
        weight_decay: float,
        lr: float,
        betas: tuple[float, float],
        device_type: str | None = None,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the 2-D parameters (matmul weights, embeddings) only.

        The fused AdamW kernel (one kernel for all parameters) is used wherever this torch has
        it for the parameters' device and dtype -- CUDA, and the CPU since torch 2.4 -- else
        the default implementation. The choice depends on the parameters only, so both
        ``kernels`` settings get the same optimizer. ``device_type`` is accepted for nanoGPT's
        signature and ignored: the parameters say where they are.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = bool(params) and all(_fused_adamw_works(p.device, p.dtype) for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to idx (B, T); returns (B, T + max_new_tokens).

        Each new token is one query row against the cached keys/values. The model sees at most
        the last block_size tokens, as in nanoGPT; once the context is longer, the positions of
        the window shift every step, so the cache is rebuilt from the cropped window (the
        tokens are the same as with ``use_cache=False``). Runs in eval mode (no dropout).
        """
        if temperature <= 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        bs = self.config.block_size
        past, n_past = None, 0  # cache of the first n_past tokens of idx
        for _ in range(max_new_tokens):
            if use_cache and past is not None and idx.size(1) <= bs:
                x, past = self._run(idx[:, n_past:], pos0=n_past, past=past, use_cache=True)
            else:  # first step, no cache, or the window slid: run the whole (cropped) context
                x, past = self._run(idx[:, -bs:], use_cache=use_cache)
            n_past = idx.size(1)
            logits = self.lm_head(x[:, -1, :]).float() / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits[logits < kth] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        self.train(was_training)
        return idx
