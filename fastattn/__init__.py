"""fastattn: fused attention, LayerNorm and GELU feed-forward kernels for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from fastattn._dispatch import (  # noqa: E402
    BackendError,
    available_backends,
    get_backend,
    last_backend,
    set_backend,
    use_backend,
)

__all__ = [
    "BackendError",
    "available_backends",
    "get_backend",
    "last_backend",
    "set_backend",
    "use_backend",
]
