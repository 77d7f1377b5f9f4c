"""Drop-in ``torch.nn`` modules backed by fastattn's kernels."""

from fastattn.nn.attention import CausalSelfAttention, MultiheadAttention
from fastattn.nn.gated_act import GatedFeedForward
from fastattn.nn.gelu import GELU, FeedForward
from fastattn.nn.layernorm import LayerNorm
from fastattn.nn.linear import Linear
from fastattn.nn.rms_norm import RMSNorm

__all__ = [
    "CausalSelfAttention",
    "FeedForward",
    "GatedFeedForward",
    "GELU",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "RMSNorm",
]
