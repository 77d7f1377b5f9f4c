"""``fastattn.nn.GELU`` (drop-in for :class:`torch.nn.GELU`) and ``fastattn.nn.FeedForward``."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.gelu import APPROXIMATIONS, bias_gelu, feed_forward


class GELU(torch.nn.GELU):
    """:class:`torch.nn.GELU` with its forward served by :func:`fastattn.bias_gelu`.

    A subclass: same constructor (``approximate="none"``), no parameters, and
    ``isinstance(m, torch.nn.GELU)`` holds.
    """

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in APPROXIMATIONS:
            raise ValueError(
                f"fastattn.nn.GELU: approximate must be 'none' or 'tanh', got {approximate!r}"
            )
        super().__init__(approximate)

    def forward(self, input: Tensor) -> Tensor:
        return bias_gelu(input, None, self.approximate)


class FeedForward(torch.nn.Module):
    """The GELU MLP of a transformer block: ``dropout(fc2(gelu(fc1(x))))``.

    Parameters live in two :class:`torch.nn.Linear` submodules, so the ``state_dict`` keys are
    ``fc1.weight`` ``(d_hidden, d_model)``, ``fc1.bias`` ``(d_hidden,)``, ``fc2.weight``
    ``(d_model, d_hidden)`` and ``fc2.bias`` ``(d_model,)`` (no biases with ``bias=False``), and
    initialisation is ``nn.Linear``'s. The forward is :func:`fastattn.feed_forward`: torch
    matmuls around one fused ``+ fc1.bias``/GELU pass (and one fused pass backward).

    Args:
        d_model: input and output features.
        d_hidden: hidden features; ``4 * d_model`` when ``None``.
        bias: whether ``fc1`` and ``fc2`` have biases.
        approximate: ``"none"`` (erf GELU) or ``"tanh"``, as in :class:`torch.nn.GELU`.
        dropout: dropout probability applied to the output (training mode only).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None = None,
        bias: bool = True,
        approximate: str = "none",
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if approximate not in APPROXIMATIONS:
            raise ValueError(
                f"fastattn.nn.FeedForward: approximate must be 'none' or 'tanh', got {approximate!r}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"fastattn.nn.FeedForward: dropout must be in [0, 1], got {dropout}")
        d_hidden = 4 * d_model if d_hidden is None else d_hidden
        kw = {"device": device, "dtype": dtype}
        self.fc1 = torch.nn.Linear(d_model, d_hidden, bias=bias, **kw)
        self.fc2 = torch.nn.Linear(d_hidden, d_model, bias=bias, **kw)
        self.approximate = approximate
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: Tensor, *, dropout: bool = True) -> Tensor:
        """``dropout=False`` leaves out the output dropout, for a caller that fuses it into the
        residual add (``fastattn.add_layer_norm(..., dropout_p=self.dropout.p)``)."""
        y = feed_forward(
            x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.approximate
        )
        return self.dropout(y) if dropout else y

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"

    @classmethod
    def from_modules(
        cls,
        linear1: torch.nn.Linear,
        gelu: torch.nn.GELU,
        linear2: torch.nn.Linear,
        dropout: float = 0.0,
    ) -> FeedForward:
        """A FeedForward computing ``linear2(gelu(linear1(x)))`` with the same parameters
        (shared, not copied: training one trains the other)."""
        name = "fastattn.nn.FeedForward.from_modules"
        for what, m in (("linear1", linear1), ("linear2", linear2)):
            if not isinstance(m, torch.nn.Linear):
                raise TypeError(f"{name}: {what} must be a torch.nn.Linear, got {type(m).__name__}")
        if not isinstance(gelu, torch.nn.GELU):
            raise TypeError(f"{name}: gelu must be a torch.nn.GELU, got {type(gelu).__name__}")
        if linear2.in_features != linear1.out_features:
            raise ValueError(
                f"{name}: linear2.in_features ({linear2.in_features}) must equal "
                f"linear1.out_features ({linear1.out_features})"
            )
        if linear2.out_features != linear1.in_features:
            raise ValueError(
                f"{name}: linear2.out_features ({linear2.out_features}) must equal "
                f"linear1.in_features ({linear1.in_features}) (d_model in and out)"
            )
        if (linear1.bias is None) != (linear2.bias is None):
            raise ValueError(f"{name}: linear1 and linear2 must both have a bias or both not")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.fc1 = linear1
        new.fc2 = linear2
        new.approximate = gelu.approximate
        new.dropout = torch.nn.Dropout(dropout)
        return new
