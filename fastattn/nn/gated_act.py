"""``fastattn.nn.GatedFeedForward``: the gated MLP of Llama / Mistral / Qwen2 / Gemma."""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.ops.gated_act import ACTIVATIONS, gated_feed_forward


def activation_of(module: torch.nn.Module) -> tuple[str | None, str]:
    """The :func:`fastattn.ops.gated_act.gated_act` activation a module computes:
    ``(name, "")``, or ``(None, why not)``.

    Exact classes only (a subclass may compute something else): ``torch.nn.SiLU``,
    ``torch.nn.GELU`` / ``fastattn.nn.GELU`` (either approximation), and transformers'
    ``SiLUActivation``, ``GELUActivation`` (erf) and the tanh GELUs ``GELUTanh`` /
    ``PytorchGELUTanh`` / ``NewGELUActivation`` / ``FastGELUActivation`` (what
    ``ACT2FN["silu" | "gelu" | "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast"]`` builds).
    """
    from fastattn.nn.gelu import GELU

    cls = type(module)
    if cls is torch.nn.SiLU:
        return "silu", ""
    if cls in (torch.nn.GELU, GELU):
        return ("gelu" if module.approximate == "none" else "gelu_tanh"), ""
    try:
        from transformers import activations as act
    except ImportError:
        act = None
    if act is not None:
        known = {
            "SiLUActivation": "silu",
            "GELUActivation": "gelu",
            "GELUTanh": "gelu_tanh",
            "PytorchGELUTanh": "gelu_tanh",
            "NewGELUActivation": "gelu_tanh",
            "FastGELUActivation": "gelu_tanh",
        }
        for name, value in known.items():
            if getattr(act, name, None) is cls:
                return value, ""
    return None, (
        f"activation {cls.__name__} is not SiLU or GELU (erf / tanh); the gated kernel "
        "computes only those"
    )


def _activation_arg(name: str, activation: str | torch.nn.Module) -> str:
    """The activation name of a from_* argument: a name, or a module :func:`activation_of`
    recognises."""
    if isinstance(activation, torch.nn.Module):
        act, why = activation_of(activation)
        if act is None:
            raise TypeError(f"{name}: {why}")
        return act
    if activation in ACTIVATIONS:
        return activation
    raise ValueError(
        f"{name}: activation must be one of {', '.join(map(repr, ACTIVATIONS))} or an "
        f"activation module, got {activation!r}"
    )


class GatedFeedForward(torch.nn.Module):
    """The gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))`` (SwiGLU with
    ``activation="silu"``, GeGLU with ``"gelu"`` / ``"gelu_tanh"``).

    Parameters live in three :class:`torch.nn.Linear` submodules named as in Hugging Face's
    ``LlamaMLP`` / ``GemmaMLP``, so the ``state_dict`` keys are the same: ``gate_proj.weight``
    ``(d_hidden, d_model)``, ``up_proj.weight`` ``(d_hidden, d_model)``, ``down_proj.weight``
    ``(d_model, d_hidden)`` (and ``.bias`` with ``bias=True``, as Llama's ``mlp_bias``). The
    forward is :func:`fastattn.gated_feed_forward`: torch's matmuls around one fused activation
    pass (and one fused pass backward).

    Args:
        d_model: input and output features.
        d_hidden: hidden features (Llama: ``intermediate_size``).
        bias: whether the three projections have biases.
        activation: ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        bias: bool = False,
        activation: str = "silu",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                "fastattn.nn.GatedFeedForward: activation must be one of "
                f"{', '.join(map(repr, ACTIVATIONS))}, got {activation!r}"
            )
        kw = {"device": device, "dtype": dtype}
        self.gate_proj = torch.nn.Linear(d_model, d_hidden, bias=bias, **kw)
        self.up_proj = torch.nn.Linear(d_model, d_hidden, bias=bias, **kw)
        self.down_proj = torch.nn.Linear(d_hidden, d_model, bias=bias, **kw)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if "gate_up_proj" in self._modules:  # from_packed: one [gate; up] projection
            return gated_feed_forward(
                x,
                self.gate_up_proj.weight,
                None,
                self.down_proj.weight,
                self.gate_up_proj.bias,
                None,
                self.down_proj.bias,
                self.activation,
            )
        return gated_feed_forward(
            x,
            self.gate_proj.weight,
            self.up_proj.weight,
            self.down_proj.weight,
            self.gate_proj.bias,
            self.up_proj.bias,
            self.down_proj.bias,
            self.activation,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    @classmethod
    def from_packed(
        cls,
        gate_up_proj: torch.nn.Linear,
        down_proj: torch.nn.Linear,
        activation: str | torch.nn.Module,
    ) -> GatedFeedForward:
        """A GatedFeedForward over a packed projection (Phi-3's ``Phi3MLP``): ``h =
        gate_up_proj(x)``, gate = its first half, up = its second, ``down_proj(act(gate) * up)``.
        The Linear modules are shared (submodules ``gate_up_proj`` and ``down_proj``: the
        ``state_dict`` keys stay the model's); one GEMM for both halves."""
        name = "fastattn.nn.GatedFeedForward.from_packed"
        for what, m in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
            if type(m) is not torch.nn.Linear:
                raise TypeError(f"{name}: {what} must be a torch.nn.Linear, got {type(m).__name__}")
        act = _activation_arg(name, activation)
        if gate_up_proj.out_features % 2 or down_proj.in_features * 2 != gate_up_proj.out_features:
            raise ValueError(
                f"{name}: gate_up_proj.out_features ({gate_up_proj.out_features}) must be twice "
                f"down_proj.in_features ({down_proj.in_features})"
            )
        if gate_up_proj.weight.dtype != down_proj.weight.dtype:
            raise TypeError(
                f"{name}: the two weights must share a dtype, got {gate_up_proj.weight.dtype} and "
                f"{down_proj.weight.dtype}"
            )
        return cls._sharing(act, gate_up_proj=gate_up_proj, down_proj=down_proj)

    @classmethod
    def from_modules(
        cls,
        gate_proj: torch.nn.Linear,
        up_proj: torch.nn.Linear,
        down_proj: torch.nn.Linear,
        activation: str | torch.nn.Module,
    ) -> GatedFeedForward:
        """A GatedFeedForward computing ``down_proj(act(gate_proj(x)) * up_proj(x))`` with the
        same parameters (the Linear modules themselves are shared, not copied: training one
        trains the other). ``activation``: a name, or the activation module (see
        :func:`activation_of`)."""
        name = "fastattn.nn.GatedFeedForward.from_modules"
        for what, m in (("gate_proj", gate_proj), ("up_proj", up_proj), ("down_proj", down_proj)):
            if type(m) is not torch.nn.Linear:
                raise TypeError(f"{name}: {what} must be a torch.nn.Linear, got {type(m).__name__}")
        act = _activation_arg(name, activation)
        if (up_proj.in_features, up_proj.out_features) != (
            gate_proj.in_features,
            gate_proj.out_features,
        ):
            raise ValueError(
                f"{name}: gate_proj ({gate_proj.in_features} -> {gate_proj.out_features}) and "
                f"up_proj ({up_proj.in_features} -> {up_proj.out_features}) must have the same shape"
            )
        if down_proj.in_features != gate_proj.out_features:
            raise ValueError(
                f"{name}: down_proj.in_features ({down_proj.in_features}) must equal "
                f"gate_proj.out_features ({gate_proj.out_features})"
            )
        dtypes = {m.weight.dtype for m in (gate_proj, up_proj, down_proj)}
        if len(dtypes) > 1:
            raise TypeError(
                f"{name}: the three weights must share a dtype, got {sorted(map(str, dtypes))}"
            )
        return cls._sharing(act, gate_proj=gate_proj, up_proj=up_proj, down_proj=down_proj)

    @classmethod
    def _sharing(cls, activation: str, **linears: torch.nn.Linear) -> GatedFeedForward:
        """An instance holding the given Linear modules themselves (no copies, no init)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        for name, m in linears.items():
            setattr(new, name, m)
        new.activation = activation
        return new
