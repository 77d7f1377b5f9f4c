"""``fastattn.nn.LayerNorm``: a drop-in for :class:`torch.nn.LayerNorm`."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.layernorm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` with its forward served by :func:`fastattn.layer_norm`.

    A subclass, so the constructor (``normalized_shape, eps=1e-5, elementwise_affine=True,
    bias=True, device=None, dtype=None``), the parameters, the ``state_dict`` keys and
    ``isinstance(m, torch.nn.LayerNorm)`` are those of the torch module; ``load_state_dict``
    works both ways.
    """

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
