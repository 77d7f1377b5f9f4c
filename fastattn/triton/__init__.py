"""Triton kernels (``attention``, ``layernorm``, ``gelu``): the ``triton`` backend.

Importing this package does not import Triton; its modules do, when the dispatcher first needs
them.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """Whether Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``).

    The interpreter runs on CPU tensors, one program after the other, in numpy: tests pick small
    shapes and the launchers small blocks under it. Triton reads the variable when a kernel is
    defined, so it must be set before ``fastattn.triton.<op>`` is imported; ``tests/conftest.py``
    sets it where no CUDA GPU is visible.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
