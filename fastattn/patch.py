"""``fastattn.patch(model)``: swap an existing model's layers for fastattn's, in place.

What is replaced (each kind can be switched off):

- ``torch.nn.LayerNorm`` -> :class:`fastattn.nn.LayerNorm`, ``torch.nn.GELU`` ->
  :class:`fastattn.nn.GELU`, ``torch.nn.MultiheadAttention`` ->
  :class:`fastattn.nn.MultiheadAttention`. The fastattn classes are subclasses that add no state,
  so the swap changes the module's class and nothing else: same parameters (not copied), same
  device, dtype, mode, hooks and ``state_dict`` keys.
- Inside ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``: their sub-modules as
  above, a functional GELU activation (``activation="gelu"``) becomes a :class:`fastattn.nn.GELU`
  module, and PyTorch's inference fast paths (which call fused ATen kernels with the raw weights
  and would bypass the patched modules) are switched off for the patched layers.
- Hugging Face transformers models: attention through transformers' attention registry
  (``model.set_attn_implementation("fastattn")``), and the GELU activation classes
  (``GELUActivation``, ``NewGELUActivation`` / ``GELUTanh`` (GPT-2's tanh GELU),
  ``FastGELUActivation``) replaced by :class:`fastattn.nn.GELU` of the matching approximation.

Anything fastattn cannot run with the same meaning (e.g. an activation with another formula, an
attention configured with ``add_bias_kv``) is left alone and listed in the report with the
reason. Applying ``patch`` twice changes nothing more; :func:`unpatch` restores plain modules
with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import nn

_SAVED = "_fastattn_saved"  # per-module record of what patch() changed, for unpatch()


@dataclass
class PatchReport:
    """What :func:`patch` / :func:`unpatch` did: ``replaced`` and ``left`` (with the reason)."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (name, from, to)
    left: list[tuple[str, str, str]] = field(default_factory=list)  # (name, type, why)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.left)}"]
        lines += [f"  {n or '<model>'}: {a} -> {b}" for n, a, b in self.replaced]
        lines += [f"  left {n or '<model>'} ({t}): {why}" for n, t, why in self.left]
        return "\n".join(lines)

    def count(self, to: str) -> int:
        return sum(1 for _, _, b in self.replaced if b == to)


def _hf_gelu_classes() -> dict[type, str]:
    """transformers' GELU activation classes -> the approximation they compute."""
    try:
        from transformers import activations as act
    except ImportError:
        return {}
    out: dict[type, str] = {}
    for name, approx in (
        ("GELUActivation", "none"),
        ("NewGELUActivation", "tanh"),
        ("GELUTanh", "tanh"),
        ("PytorchGELUTanh", "tanh"),
        ("FastGELUActivation", "tanh"),
    ):
        cls = getattr(act, name, None)
        if isinstance(cls, type):
            out[cls] = approx
    return out


def _swap_class(module: nn.Module, cls: type) -> None:
    saved = module.__dict__.setdefault(_SAVED, {})
    saved.setdefault("__class__", type(module))
    module.__class__ = cls


def _mha_unsupported(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn change the keys; left to torch"
    return None


def patch(
    model: nn.Module,
    *,
    layer_norm: bool = True,
    gelu: bool = True,
    attention: bool = True,
) -> PatchReport:
    """Swap ``model``'s LayerNorm, GELU and attention layers for fastattn's, in place.

    Returns a :class:`PatchReport` of what was replaced and what was left and why.
    """
    from fastattn import nn as fnn

    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.patch: expected a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    hf_gelus = _hf_gelu_classes() if gelu else {}

    for name, module in list(model.named_modules()):
        kind = type(module)
        if layer_norm and kind is nn.LayerNorm:
            _swap_class(module, fnn.LayerNorm)
            report.replaced.append((name, "torch.nn.LayerNorm", "fastattn.nn.LayerNorm"))
        elif gelu and kind is nn.GELU:
            _swap_class(module, fnn.GELU)
            report.replaced.append((name, "torch.nn.GELU", "fastattn.nn.GELU"))
        elif attention and kind is nn.MultiheadAttention:
            why = _mha_unsupported(module)
            if why:
                report.left.append((name, "torch.nn.MultiheadAttention", why))
            else:
                _swap_class(module, fnn.MultiheadAttention)
                report.replaced.append(
                    (name, "torch.nn.MultiheadAttention", "fastattn.nn.MultiheadAttention")
                )
        elif kind in hf_gelus:
            approx = hf_gelus[kind]
            parent, attr = _parent(model, name)
            new = fnn.GELU(approximate=approx)
            new.__dict__[_SAVED] = {"__module__": module}
            setattr(parent, attr, new)
            report.replaced.append((name, kind.__name__, f"fastattn.nn.GELU({approx!r})"))
        elif type(module).__name__ in ("QuickGELUActivation", "ClippedGELUActivation"):
            report.left.append((name, kind.__name__, "a different formula from GELU"))

        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            saved = module.__dict__.setdefault(_SAVED, {})
            if gelu and module.activation is F.gelu:
                saved.setdefault("activation", module.activation)
                module.activation = fnn.GELU()
                report.replaced.append((f"{name}.activation", "F.gelu", "fastattn.nn.GELU"))
            if getattr(module, "activation_relu_or_gelu", 0):
                # The inference fast path calls torch._transformer_encoder_layer_fwd with the
                # raw weights, bypassing the (patched) sub-modules: switch it off here.
                saved.setdefault("activation_relu_or_gelu", module.activation_relu_or_gelu)
                module.activation_relu_or_gelu = 0
        if isinstance(module, nn.TransformerEncoder) and getattr(
            module, "use_nested_tensor", False
        ):
            module.__dict__.setdefault(_SAVED, {}).setdefault("use_nested_tensor", True)
            module.use_nested_tensor = False

    if attention:
        _patch_hf_attention(model, report)
    return report


def _patch_hf_attention(model: nn.Module, report: PatchReport) -> None:
    config = getattr(model, "config", None)
    setter = getattr(model, "set_attn_implementation", None)
    if config is None or setter is None:
        return
    from fastattn.integrations import transformers as hf

    current = getattr(config, "_attn_implementation", None)
    if current == hf.NAME:
        return
    if not hf.register():
        return
    try:
        setter(hf.NAME)
    except Exception as e:  # the model does not use transformers' attention registry
        report.left.append(("", type(model).__name__, f"attention not switchable: {e}"))
        return
    if getattr(config, "_attn_implementation", None) != hf.NAME:
        report.left.append(("", type(model).__name__, "model does not use AttentionInterface"))
        return
    model.__dict__.setdefault(_SAVED, {}).setdefault("attn_implementation", current)
    report.replaced.append(("", f"attn_implementation={current!r}", f"{hf.NAME!r}"))


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def unpatch(model: nn.Module) -> PatchReport:
    """Undo :func:`patch`: plain torch / transformers modules with the same weights."""
    report = PatchReport()
    for name, module in list(model.named_modules()):
        saved = module.__dict__.pop(_SAVED, None)
        if not saved:
            continue
        if "__module__" in saved:  # a replaced Hugging Face activation
            parent, attr = _parent(model, name)
            setattr(parent, attr, saved["__module__"])
            report.replaced.append(
                (name, type(module).__name__, type(saved["__module__"]).__name__)
            )
            continue
        if "__class__" in saved:
            report.replaced.append((name, type(module).__name__, saved["__class__"].__name__))
            module.__class__ = saved["__class__"]
        if "activation" in saved:
            del module.activation  # the registered fastattn.nn.GELU sub-module
            module.activation = saved["activation"]
        for attr in ("activation_relu_or_gelu", "use_nested_tensor"):
            if attr in saved:
                setattr(module, attr, saved[attr])
        if "attn_implementation" in saved:
            module.set_attn_implementation(saved["attn_implementation"])
            report.replaced.append(
                ("", "fastattn", f"attn_implementation={saved['attn_implementation']!r}")
            )
    return report
