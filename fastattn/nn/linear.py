"""``fastattn.nn.Linear``: :class:`torch.nn.Linear` on the faster of torch's two CPU GEMM paths."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops import _gemm


class Linear(torch.nn.Linear):
    """:class:`torch.nn.Linear` whose forward (and backward) runs on oneDNN or MKL, whichever
    :mod:`fastattn.ops._gemm` measured faster on this machine for the dtype and shape.

    The same maths (``x @ weight.T + bias``, float32 or bfloat16 accumulation as torch's GEMMs);
    only the GEMM library, and so the summation order, can differ. A subclass: constructor,
    parameters, ``state_dict`` keys and ``isinstance(m, torch.nn.Linear)`` are torch's. Under
    ``torch.compile``, on other devices and in dtypes oneDNN does not take it is ``F.linear``.
    """

    def forward(self, input: Tensor) -> Tensor:
        return _gemm.linear(input, self.weight, self.bias)
