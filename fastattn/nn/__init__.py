"""Drop-in ``torch.nn`` modules backed by fastattn's kernels."""

from fastattn.nn.gelu import GELU, FeedForward
from fastattn.nn.layernorm import LayerNorm

__all__ = ["FeedForward", "GELU", "LayerNorm"]
