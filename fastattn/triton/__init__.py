"""Triton kernels (``attention``, ``layernorm``, ``gelu``): the ``triton`` backend.

Importing this package does not import Triton; its modules do, when the dispatcher first needs
them. What lives here is Triton-free: the interpreter switch, the TF32 switch, and
:class:`Launch`, the record of one compiled kernel variant that each module's launch rules
produce and ``scripts/triton_aot.py`` compiles ahead of time for sm_80 and sm_90.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


def interpreting() -> bool:
    """Whether Triton kernels run through Triton's interpreter (``TRITON_INTERPRET=1``).

    The interpreter runs on CPU tensors, one program after the other, in numpy: tests pick small
    shapes and the launchers small blocks under it. Triton reads the variable when a kernel is
    defined, so it must be set before ``fastattn.triton.<op>`` is imported; ``tests/conftest.py``
    sets it where no CUDA GPU is visible, or wherever ``FASTATTN_TRITON_INTERPRET=1`` forces it.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tf32_enabled() -> bool:
    """Whether torch lets float32 matmuls use TF32 on CUDA (the Triton fp32 attention follows it).

    torch's new API (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, also set by
    ``torch.set_float32_matmul_precision("high")``) wins; otherwise the legacy
    ``torch.backends.cuda.matmul.allow_tf32``. torch's default is neither: exact fp32.
    """
    import torch

    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch refuses to read the legacy flag after a mix of the two APIs
        return False


# torch dtype name -> Triton element type, as in a kernel signature ("*fp16").
TL_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "uint8": "u8"}


@dataclass(frozen=True)
class Launch:
    """One kernel variant a launcher can start: the unit ``scripts/triton_aot.py`` compiles.

    ``pointers`` gives the element type of every pointer argument (Triton's names: ``fp16``,
    ``u8``...), ``floats`` the scalar arguments passed as Python floats; every other
    non-constexpr argument is an integer. ``constexprs`` and the two launch options are what the
    launcher (or its autotuner) passes.
    """

    module: str  # the fastattn.triton module: "attention", "layernorm", "rotary", ...
    kernel: str  # the @triton.jit function's name in fastattn.triton.<module>
    pointers: tuple[tuple[str, str], ...]
    floats: tuple[str, ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        """A short human name: kernel, element type of the first pointer, constexprs."""
        flags = []
        for k, v in self.constexprs:
            if isinstance(v, bool):
                if v:
                    flags.append(k.lower())
            else:
                flags.append(f"{k}={v}")
        dt = self.pointers[0][1] if self.pointers else "-"
        return f"{self.kernel} {dt} {' '.join(flags)} w{self.num_warps} s{self.num_stages}"


def record(
    module: str,
    kernel: str,
    pointers: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    floats: tuple[str, ...] = (),
) -> Launch:
    """The :class:`Launch` of a launcher that passes no ``num_stages`` (Triton's default on CUDA,
    3): what each module's ``aot_launches()`` lists, pointers in argument order."""
    return Launch(
        module=module,
        kernel=kernel,
        pointers=tuple(pointers.items()),
        floats=floats,
        constexprs=tuple(sorted(constexprs.items())),
        num_warps=num_warps,
        num_stages=3,
    )
