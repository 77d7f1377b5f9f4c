"""``fastattn.nn.RMSNorm``: a drop-in for :class:`torch.nn.RMSNorm`; and the forwards that
:func:`fastattn.patch` gives Hugging Face's RMSNorm classes."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.rms_norm import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """:class:`torch.nn.RMSNorm` with its forward served by :func:`fastattn.rms_norm`.

    A subclass, so the constructor (``normalized_shape, eps=None, elementwise_affine=True,
    device=None, dtype=None``), the parameters, the ``state_dict`` keys and
    ``isinstance(m, torch.nn.RMSNorm)`` are those of the torch module; ``load_state_dict`` works
    both ways.
    """

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


class LlamaRMSNormForward:
    """The forward :func:`fastattn.patch` puts on classes whose forward is ``LlamaRMSNorm``'s
    (Llama, Mistral, Qwen2, ...): ``weight * (x * rsqrt(mean(x^2) + eps)).to(input_dtype)``,
    statistics in float32 and the normalised value rounded to the input's dtype before the
    weight multiply (``cast_before_weight``). Mixed in before the original class, so a module
    keeps its class's attributes (``weight``, ``variance_epsilon``), hooks and ``isinstance``.

    Where the weight's dtype differs from the input's, Llama's output has the promoted dtype of
    the two: that call runs the original forward, which keeps that meaning."""

    weight: torch.nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: Tensor) -> Tensor:
        w = self.weight
        if w.dtype != hidden_states.dtype or w.dim() != 1:
            return super().forward(hidden_states)  # type: ignore[misc]
        return rms_norm(
            hidden_states, (w.shape[0],), w, self.variance_epsilon, cast_before_weight=True
        )


class GemmaRMSNormForward:
    """The forward :func:`fastattn.patch` puts on classes whose forward is ``GemmaRMSNorm``'s
    (Gemma, Gemma2, ...): ``(norm(x.float()) * (1 + weight.float())).type_as(x)``, i.e. one
    rounding at the end and the ``1 + weight`` scale (``weight_offset=1.0``)."""

    weight: torch.nn.Parameter
    eps: float

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.dim() != 1:
            return super().forward(x)  # type: ignore[misc]
        return rms_norm(x, (w.shape[0],), w, self.eps, weight_offset=1.0)
