"""fastattn: fused attention, LayerNorm, RMSNorm, rotary embedding, GELU and gated (SwiGLU /
GeGLU) feed-forward kernels for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from fastattn import nn  # noqa: E402
from fastattn._dispatch import (  # noqa: E402
    BackendError,
    available_backends,
    get_backend,
    last_backend,
    set_backend,
    use_backend,
)
from fastattn.ops.attention import attention  # noqa: E402
from fastattn.ops.gated_act import gated_feed_forward, geglu, swiglu  # noqa: E402
from fastattn.ops.gelu import bias_gelu, feed_forward  # noqa: E402
from fastattn.ops.layernorm import add_layer_norm, layer_norm  # noqa: E402
from fastattn.ops.rms_norm import add_rms_norm, rms_norm  # noqa: E402
from fastattn.ops.rotary import apply_rotary_pos_emb, rotary  # noqa: E402
from fastattn.patch import PatchReport, patch, unpatch  # noqa: E402

__all__ = [
    "attention",
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary_pos_emb",
    "bias_gelu",
    "feed_forward",
    "gated_feed_forward",
    "geglu",
    "layer_norm",
    "rms_norm",
    "rotary",
    "nn",
    "patch",
    "swiglu",
    "unpatch",
    "PatchReport",
    "BackendError",
    "available_backends",
    "get_backend",
    "last_backend",
    "set_backend",
    "use_backend",
]
