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
- ``torch.nn.RMSNorm`` -> :class:`fastattn.nn.RMSNorm`, and Hugging Face RMSNorm classes whose
  ``forward`` is (as code) ``LlamaRMSNorm``'s (Llama, Mistral, Qwen2, ...: the normalised value
  rounded to the input dtype before the weight) or ``GemmaRMSNorm``'s (Gemma, Gemma2, ...: the
  ``1 + weight`` scale, one rounding) get a subclass with fastattn's forward of the same
  rounding (:mod:`fastattn.nn.rms_norm`); other RMSNorm variants are left and reported.
- Hugging Face transformers models: attention through transformers' attention registry: the
  ``"fastattn"`` implementation (:mod:`fastattn.integrations.transformers`) is set on every
  config the model's modules read (``model.config``, its sub-configs, and the deep copies that
  encoder / decoder stacks such as T5's keep), then every module that looks its attention
  function up in the registry is checked to read ``"fastattn"`` and listed. The GELU activation
  classes (``GELUActivation``, ``NewGELUActivation`` / ``GELUTanh`` (GPT-2's tanh GELU),
  ``FastGELUActivation``) are replaced by :class:`fastattn.nn.GELU` of the matching
  approximation.
- Gated MLPs (Hugging Face's ``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ``GemmaMLP``,
  ``Gemma2MLP``, ... : any module with ``gate_proj`` / ``up_proj`` / ``down_proj`` Linears and an
  ``act_fn``) -> :class:`fastattn.nn.GatedFeedForward` sharing the three Linear modules, when the
  forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` and ``act_fn`` is SiLU or
  GELU (erf / tanh); Phi-3's packed form (``gate_up_proj`` / ``down_proj`` / ``activation_fn``,
  ``down_proj(up * act(gate))`` over ``gate_up_proj(x).chunk(2, -1)``) -> a GatedFeedForward
  sharing those two (one GEMM for both halves); otherwise left, with the reason. See
  ``_patch_gated_mlps``.
- Rotary embeddings (``rotary=True``): transformers' ``apply_rotary_pos_emb`` ->
  :func:`fastattn.apply_rotary_pos_emb`, per attention module, through transformers' own
  per-module kernel-function hook, where the model's function computes the same on probe
  inputs; otherwise left, with the reason. See ``_patch_rotary``.

The meaning never changes: a swapped module computes what the original computed (the fastattn
classes send every argument they cannot run fused to torch's own implementation), and the
transformers attention function gives each argument transformers passes the meaning SDPA / eager
gives it, routing it to a :func:`fastattn.attention` argument, or refusing it with a
``ValueError`` (see :mod:`fastattn.integrations.transformers`). What is fused is a matter of
speed, and the report says it: each attention layer's entry lists its call paths (plain forward,
sliding-window prefill, position-bias training, other masks, ``output_attentions``) with the
backend :func:`fastattn._dispatch.plan` picks on the model's device and why faster ones were
skipped. Anything fastattn cannot run with the same meaning (e.g. an activation with another
formula, an attention configured with ``add_bias_kv``, a model without an attention registry) is
left alone and listed in the report with the reason. The report is a list of
:class:`PatchEntry` (layer, kind, action, before, after, reason, runtime notes), so more kinds
of layers can be added. Applying ``patch`` twice changes nothing more; :func:`unpatch` restores
plain modules with the same weights and every config's former attention implementation.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
import types
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastattn.ops.rotary import apply_rotary_pos_emb as fused_rotary

_SAVED = "_fastattn_saved"  # per-module record of what patch() changed, for unpatch()


@dataclass
class PatchEntry:
    """One line of a :class:`PatchReport`: what happened to one layer (or config) and why.

    ``runtime`` lists, for a replaced attention layer, the call paths and the backend that will
    serve each (from :func:`fastattn._dispatch.plan`), e.g. "sliding-window prefill: reference
    (sliding window (not served by the cpu kernel))".
    """

    name: str  # module path in the model ("" = the model itself)
    kind: str  # "layer_norm", "gelu", "multihead_attention", "attention", "config", ...
    action: str  # "replaced", "left", "unchanged" (already patched), "restored" (unpatch)
    before: str  # what it was (class, or attn_implementation)
    after: str = ""  # what it is now
    reason: str = ""  # why it was left, or what was done
    runtime: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        name = self.name or "<model>"
        if self.action == "left":
            text = f"  left {name} ({self.before}): {self.reason}"
        elif self.action == "unchanged":
            text = f"  unchanged {name}: already {self.after}"
        else:
            text = f"  {name}: {self.before} -> {self.after}"
            if self.reason:
                text += f" ({self.reason})"
        return "\n".join([text] + [f"      {note}" for note in self.runtime])


@dataclass
class PatchReport:
    """What :func:`patch` / :func:`unpatch` did: one :class:`PatchEntry` per layer or config.

    ``replaced`` / ``left`` are the (name, from, to) / (name, type, why) views of the entries;
    ``fallbacks`` lists the call paths that will not run on a fastattn kernel.
    """

    entries: list[PatchEntry] = field(default_factory=list)

    def add(
        self, name: str, kind: str, action: str, before: str, after: str = "", **kw: Any
    ) -> PatchEntry:
        entry = PatchEntry(name, kind, action, before, after, **kw)
        self.entries.append(entry)
        return entry

    @property
    def replaced(self) -> list[tuple[str, str, str]]:
        return [
            (e.name, e.before, e.after)
            for e in self.entries
            if e.action in ("replaced", "restored")
        ]

    @property
    def left(self) -> list[tuple[str, str, str]]:
        return [(e.name, e.before, e.reason) for e in self.entries if e.action == "left"]

    @property
    def fallbacks(self) -> list[tuple[str, str]]:
        """(layer, call path) for every call path that runs off the fused kernels."""
        return [(e.name, n) for e in self.entries for n in e.runtime if _FALLS_BACK in n]

    def layers(self, kind: str | None = None, action: str | None = None) -> list[PatchEntry]:
        return [
            e
            for e in self.entries
            if (kind is None or e.kind == kind) and (action is None or e.action == action)
        ]

    def count(self, to: str) -> int:
        return sum(1 for _, _, b in self.replaced if b == to)

    def __str__(self) -> str:
        done = [e for e in self.entries if e.action in ("replaced", "restored")]
        left = [e for e in self.entries if e.action == "left"]
        lines = [f"replaced {len(done)} module(s), left {len(left)}"]
        fb = self.fallbacks
        if fb:
            lines[0] += f"; {len(fb)} call path(s) fall back to a slower implementation"
        lines += [str(e) for e in self.entries if e.action != "left"]
        lines += [str(e) for e in left]
        return "\n".join(lines)


_FALLS_BACK = "falls back"


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
    rms_norm: bool = True,
    gated_mlp: bool = True,
    linear: bool = True,
    rotary: bool = True,
) -> PatchReport:
    """Swap ``model``'s LayerNorm, RMSNorm, GELU, gated MLP, attention and rotary layers for
    fastattn's, in place; and (``linear=True``) its plain ``torch.nn.Linear`` layers for
    :class:`fastattn.nn.Linear` (the same GEMM on torch's faster CPU library for each shape).

    Returns a :class:`PatchReport` of what was replaced and what was left and why.
    """
    from fastattn import nn as fnn

    if not isinstance(model, nn.Module):
        raise TypeError(f"fastattn.patch: expected a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport()
    hf_gelus = _hf_gelu_classes() if gelu else {}
    if gated_mlp:  # first: a swapped MLP's act_fn leaves the model with it
        _patch_gated_mlps(model, report)

    for name, module in list(model.named_modules()):
        kind = type(module)
        if layer_norm and kind is nn.LayerNorm:
            _swap_class(module, fnn.LayerNorm)
            report.add(
                name, "layer_norm", "replaced", "torch.nn.LayerNorm", "fastattn.nn.LayerNorm"
            )
        elif linear and kind is nn.Linear:
            _swap_class(module, fnn.Linear)
            report.add(name, "linear", "replaced", "torch.nn.Linear", "fastattn.nn.Linear")
        elif gelu and kind is nn.GELU:
            _swap_class(module, fnn.GELU)
            report.add(name, "gelu", "replaced", "torch.nn.GELU", "fastattn.nn.GELU")
        elif attention and kind is nn.MultiheadAttention:
            why = _mha_unsupported(module)
            if why:
                report.add(
                    name, "multihead_attention", "left", "torch.nn.MultiheadAttention", reason=why
                )
            else:
                _swap_class(module, fnn.MultiheadAttention)
                report.add(
                    name,
                    "multihead_attention",
                    "replaced",
                    "torch.nn.MultiheadAttention",
                    "fastattn.nn.MultiheadAttention",
                )
        elif kind in hf_gelus:
            approx = hf_gelus[kind]
            parent, attr = _parent(model, name)
            new = fnn.GELU(approximate=approx)
            new.__dict__[_SAVED] = {"__module__": module}
            setattr(parent, attr, new)
            report.add(name, "gelu", "replaced", kind.__name__, f"fastattn.nn.GELU({approx!r})")
        elif type(module).__name__ in ("QuickGELUActivation", "ClippedGELUActivation"):
            report.add(name, "gelu", "left", kind.__name__, reason="a different formula from GELU")

        if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            saved = module.__dict__.setdefault(_SAVED, {})
            if gelu and module.activation is F.gelu:
                saved.setdefault("activation", module.activation)
                module.activation = fnn.GELU()
                report.add(f"{name}.activation", "gelu", "replaced", "F.gelu", "fastattn.nn.GELU")
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

    if rms_norm:
        _patch_rms_norms(model, report)
    if attention:
        _patch_hf_attention(model, report)
    if rotary:
        _patch_rotary(model, report)
    return report


# ----------------------------------------------------------------------------- RMSNorm
# torch.nn.RMSNorm by exact class; Hugging Face RMSNorm classes by their code: a class is served
# when its forward (and the helpers that forward calls) is, as an AST without docstrings and
# annotations, that of transformers' LlamaRMSNorm or GemmaRMSNorm. Class names are read only to
# report RMSNorm-like classes with other code as left.


def _method_ast(cls: type, name: str) -> str | None:
    fn = getattr(cls, name, None)
    if fn is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        return None
    node.decorator_list, node.returns, node.name = [], None, "_"
    for a in ast.walk(node.args):
        if isinstance(a, ast.arg):
            a.annotation = None
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:] or [ast.Pass()]  # the docstring
    return ast.dump(node, annotate_fields=False, include_attributes=False)


@dataclass(frozen=True)
class _RMSStyle:
    name: str  # "llama" / "gemma"
    mixin: type  # the fastattn forward (fastattn.nn.rms_norm)
    eps_attr: str  # the attribute the forward reads eps from
    norm_ast: str | None  # the helper the forward calls (GemmaRMSNorm._norm), if any
    how: str  # for the report


@functools.cache
def _hf_rms_styles() -> dict[str, _RMSStyle]:
    """forward's AST -> the style of transformers' LlamaRMSNorm / GemmaRMSNorm ({} without
    transformers)."""
    from fastattn.nn import rms_norm as frms

    out: dict[str, _RMSStyle] = {}
    for mod_name, cls_name, mixin, eps_attr, how in (
        ("llama", "LlamaRMSNorm", frms.LlamaRMSNormForward, "variance_epsilon",
         "cast to the input dtype before the weight"),
        ("gemma", "GemmaRMSNorm", frms.GemmaRMSNormForward, "eps", "scale 1 + weight"),
    ):  # fmt: skip
        try:
            mod = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
        except ImportError:
            continue
        cls = getattr(mod, cls_name, None)
        fwd = _method_ast(cls, "forward") if isinstance(cls, type) else None
        if fwd is not None:
            norm = _method_ast(cls, "_norm") if mod_name == "gemma" else None
            out[fwd] = _RMSStyle(mod_name, mixin, eps_attr, norm, how)
    return out


@functools.cache
def _rms_style_of(cls: type) -> _RMSStyle | None:
    fwd = _method_ast(cls, "forward")
    style = _hf_rms_styles().get(fwd) if fwd is not None else None
    if (
        style is not None
        and style.norm_ast is not None
        and _method_ast(cls, "_norm") != style.norm_ast
    ):
        return None
    return style


def _patch_rms_norms(model: nn.Module, report: PatchReport) -> None:
    from fastattn import nn as fnn
    from fastattn.nn import rms_norm as frms

    styles = None
    for name, module in list(model.named_modules()):
        cls = type(module)
        if cls is nn.RMSNorm:
            _swap_class(module, fnn.RMSNorm)
            report.add(name, "rms_norm", "replaced", "torch.nn.RMSNorm", "fastattn.nn.RMSNorm")
            continue
        if cls.__module__.startswith(("torch.", "fastattn.")):
            continue  # torch's own modules, and those patched before
        if styles is None:
            styles = _hf_rms_styles()
        style = _rms_style_of(cls) if styles else None
        rms_like = "rmsnorm" in cls.__name__.lower()
        why = None
        if not styles:
            why = "transformers is not importable: no LlamaRMSNorm / GemmaRMSNorm to compare with"
        elif style is None:
            why = "its forward is neither LlamaRMSNorm's nor GemmaRMSNorm's code"
        elif not isinstance(getattr(module, "weight", None), nn.Parameter):
            why = "no weight parameter"
        elif not isinstance(getattr(module, style.eps_attr, None), (int, float)):
            why = f"no numeric {style.eps_attr} attribute"
        if why is not None:
            if rms_like:
                report.add(name, "rms_norm", "left", cls.__name__, reason=why + "; left as it is")
            elif "layernorm" in cls.__name__.lower():  # a model's own norm class (T5LayerNorm)
                reason = "a model-specific norm class, not torch.nn.LayerNorm, and " + why
                report.add(name, "layer_norm", "left", cls.__name__, reason=reason + "; left")
            continue
        new = frms.patched_class(cls, style.mixin)
        _swap_class(module, new)
        report.add(
            name,
            "rms_norm",
            "replaced",
            cls.__name__,
            f"{new.__name__} (fastattn.rms_norm)",
            reason=style.how,
        )


# ----------------------------------------------------------------------------- transformers
@functools.cache
def _calls_attention_registry(cls: type) -> bool:
    """Whether ``cls.forward`` looks its attention function up in transformers' registry."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src


@functools.cache
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _hf_configs(model: nn.Module) -> list[Any]:
    """Every distinct transformers config the model's modules read (module.config, the nested
    copies of encoder/decoder stacks, and their sub-configs)."""
    from transformers import PretrainedConfig

    found: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in model.modules()]
    while todo:
        cfg = todo.pop()
        if not isinstance(cfg, PretrainedConfig) or id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        todo += [getattr(cfg, key, None) for key in getattr(cfg, "sub_configs", {})]
    return list(found.values())


def _set_impl(config: Any, value: str | None) -> None:
    # The internal attribute, not the property: the property also rewrites the sub-configs,
    # and unpatch must restore each config to exactly its own former value.
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = value
    else:  # pragma: no cover - other transformers versions
        config._attn_implementation = value


def _patch_hf_attention(model: nn.Module, report: PatchReport) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return
    if not any(isinstance(m, PreTrainedModel) for m in model.modules()):
        return
    from fastattn.integrations import transformers as hf

    hf.register()
    layers = [(n, m) for n, m in model.named_modules() if _calls_attention_registry(type(m))]
    if not layers:
        report.add(
            "",
            "attention",
            "left",
            type(model).__name__,
            reason="no module calls transformers' AttentionInterface; attention left as it is",
        )
        return
    configs = _hf_configs(model)
    old = {id(c): c._attn_implementation for c in configs}
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None and model.config._attn_implementation != hf.NAME:
        try:  # transformers' own checks (and whatever a model does on a switch)
            setter(hf.NAME)
        except Exception as e:
            for c in configs:  # undo a partial switch
                _set_impl(c, old[id(c)])
            report.add("", "attention", "left", type(model).__name__, reason=f"not switchable: {e}")
            return
    # Every config any module reads: T5's encoder/decoder stacks keep their own deep copies.
    saved = model.__dict__.setdefault(_SAVED, {}).setdefault("attn_configs", [])
    for c in configs:
        if c._attn_implementation != hf.NAME:
            _set_impl(c, hf.NAME)
        if old[id(c)] != hf.NAME:
            saved.append((c, old[id(c)]))
    recorded = _recorded_attention_classes(model)
    for name, module in layers:
        cfg = getattr(module, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl != hf.NAME:
            report.add(
                name,
                "attention",
                "left",
                type(module).__name__,
                reason=f"reads attn_implementation {impl!r} from a place patch() cannot reach",
            )
            continue
        before = old.get(id(cfg), hf.NAME)
        _hook_output_attentions(module, recorded)
        entry = report.add(
            name,
            "attention",
            "replaced" if before != hf.NAME else "unchanged",
            f"{type(module).__name__}[{before}]",
            f"{type(module).__name__}[{hf.NAME}]",
        )
        entry.runtime = _attention_runtime(model, module, cfg)


def _recorded_attention_classes(model: nn.Module) -> set[type]:
    """The attention classes whose weights transformers' output collector records in this
    model (``_can_record_outputs["attentions"]`` of any module class in it)."""
    out: set[type] = set()
    for m in model.modules():
        spec = (getattr(type(m), "_can_record_outputs", None) or {}).get("attentions")
        for s in spec if isinstance(spec, list | tuple) else [spec]:
            target = s if isinstance(s, type) else getattr(s, "target_class", None)
            if isinstance(target, type):
                out.add(target)
    return out


def _hook_output_attentions(module: nn.Module, recorded: set[type]) -> None:
    """Record output_attentions for attention classes whose forward takes it itself (see
    ``fastattn.integrations.transformers.hook_output_attentions``); unpatch() removes the hook."""
    from fastattn.integrations import transformers as hf

    if _SAVED in module.__dict__:
        return
    handle = hf.hook_output_attentions(module)
    if handle is not None:
        module.__dict__[_SAVED] = {"hook": handle}
        if not any(issubclass(type(module), c) for c in recorded):
            module.__dict__[hf.NOT_RECORDED] = True


def _attention_runtime(model: nn.Module, module: nn.Module, cfg: Any) -> list[str]:
    """Which backend serves each call path of this attention layer, and why not a kernel."""
    from fastattn import _dispatch
    from fastattn.ops.attention import AttentionCase

    param = next(module.parameters(), None)
    if param is None:
        param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    dtype = param.dtype if param is not None else None
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None)
    head_dim = getattr(module, "head_dim", None) or getattr(module, "key_value_proj_dim", None)
    if head_dim is None and heads:
        head_dim = getattr(cfg, "hidden_size", 0) // heads or None
    src = _forward_source(type(module))
    window = getattr(module, "sliding_window", None)
    if window is None and "sliding_window" in src and "self.sliding_window" not in src:
        window = getattr(cfg, "sliding_window", None)
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap is None and "softcap" in src:
        softcap = getattr(cfg, "attn_logit_softcapping", None)
    bias = "position_bias" in src
    causal = bool(getattr(module, "is_causal", False))
    t = 64 if not window else int(window) * 2
    base = AttentionCase(
        device_type=device_type,
        dtype=dtype,
        head_dim=int(head_dim or 64),
        q_len=t,
        kv_len=t,
        causal=causal,
        window=False,
        top_left=False,
        softcap=bool(softcap),
        bias=bias,
        bias_grad=False,
        dropout=False,
        key_padding_mask=True,
    )

    def plan(case: AttentionCase) -> str:
        try:
            backend, skipped = _dispatch.plan("attention", device_type, case)
        except _dispatch.BackendError as e:
            return f"raises: {e}"
        if backend == "reference" and skipped:
            why = "; ".join(f"{b} skipped: {w}" for b, w in skipped)
            return f"reference ({_FALLS_BACK}; {why})"
        return backend

    what = ("causal" if causal else "full") + " attention, padding"
    if softcap:
        what += f", softcap {softcap}"
    if bias:
        what += ", position bias (none if all zero, e.g. T5's cross-attention)"
    notes = [f"{what}: {plan(base)}"]
    if window:
        notes.append(
            f"mask cutting the sliding window ({window}): {plan(replace(base, window=True))}"
        )
    if bias:
        notes.append(f"training (position-bias gradient): {plan(replace(base, bias_grad=True))}")
    notes.append(f"packed sequences / other bool masks: {plan(replace(base, bias=True))}")
    notes.append(
        f"output_attentions=True: plain PyTorch ({_FALLS_BACK}; the weights are materialised)"
    )
    return notes


# ----------------------------------------------------------------------------- rotary
_ROTARY = "apply_rotary_pos_emb"


def _rotary_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward a module's private ``apply_rotary_pos_emb`` wrapper gets: fastattn's."""
    return fused_rotary(*args, **kwargs)


@functools.cache
def _rotary_unsupported(fn: Any) -> str | None:
    """None where ``fn`` (a model's ``apply_rotary_pos_emb``) computes what
    :func:`fastattn.apply_rotary_pos_emb` computes, else why not (cached per function).
    Checked by behaviour, on random inputs: float64 (every value to 1e-6, so a function that
    computes in float32 passes here and is judged by its dtypes below; ``cos`` / ``sin`` of
    unequal halves, so the index of each ``sin`` term matters), the rotary dim below the head dim
    (partial rotary: either the same or refused by ``fn``), ``unsqueeze_dim=2`` where ``fn``
    takes it, and the dtypes of autocast (bfloat16 q with float32 cos: the output dtype as well
    as the values)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "its signature cannot be read"
    if params[:4] != ["q", "k", "cos", "sin"] or not set(params[4:]) <= {
        "position_ids",
        "unsqueeze_dim",
    }:
        return f"another signature than (q, k, cos, sin[, position_ids][, unsqueeze_dim]): {params}"
    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def differs(args, kwargs, tol) -> str | None:
        try:
            theirs = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the model's own function
            return f"raised {type(e).__name__}"
        mine = fused_rotary(*args, **kwargs)
        if not isinstance(theirs, tuple) or len(theirs) != 2:
            return "does not return (q_embed, k_embed)"
        for a, b in zip(theirs, mine, strict=True):
            if a.dtype != b.dtype or a.shape != b.shape:
                return f"returns {a.dtype} {tuple(a.shape)} where the formula gives {b.dtype}"
            if not torch.allclose(a.double(), b.double(), rtol=tol, atol=tol):
                return "computes other values (another rotation: interleaved pairs, a scale, ...)"
        return None

    q, k, cos, sin = rand(2, 3, 5, 8), rand(2, 1, 5, 8), rand(2, 5, 8), rand(2, 5, 8)
    why = differs((q, k, cos, sin), {}, 1e-6)
    if why:
        return f"differs from x * cos + rotate_half(x) * sin: {why}"
    partial = (q, k, cos[..., :4], sin[..., :4])
    try:
        fn(*partial)
    except Exception:  # noqa: BLE001 - it refuses partial rotary: the model cannot ask for it
        pass
    else:
        why = differs(partial, {}, 1e-6)
        if why:
            return f"partial rotary (R < head dim) differs: {why}"
    if "unsqueeze_dim" in params:
        why = differs((q.transpose(1, 2), k.transpose(1, 2), cos, sin), {"unsqueeze_dim": 2}, 1e-6)
        if why:
            return f"unsqueeze_dim=2 differs: {why}"
    bf = torch.bfloat16
    why = differs((q.to(bf), k.to(bf), cos.float(), sin.float()), {}, 1e-5)
    if why:
        return f"bfloat16 q with float32 cos (autocast) differs: {why}"
    return None


def _kernel_func_of(wrapper: nn.Module) -> Any:
    """The ``apply_rotary_pos_emb`` a transformers kernel-function wrapper (``kernels``'
    ``use_kernel_forward_from_hub`` on a function) calls when nothing replaced it, or None
    (a wrapper of another function)."""
    forward = type(wrapper).forward
    for cell in forward.__closure__ or ():
        fn = cell.cell_contents
        if callable(fn) and getattr(fn, "__name__", "") == _ROTARY:
            return fn
    return None


def _patch_rotary(model: nn.Module, report: PatchReport) -> None:
    """transformers 5 (with ``kernels``) gives each attention module of Llama, Mistral, Qwen2,
    Gemma, ... a private wrapper of ``apply_rotary_pos_emb`` (``module._kernel_funcs``): the
    per-module hook through which ``kernels.kernelize`` swaps a hub kernel in. fastattn uses the
    same hook: the wrapper's forward becomes :func:`fastattn.apply_rotary_pos_emb` (one fused
    pass each for q and k, forward and backward), where the model's function computes the same
    (:func:`_rotary_unsupported`); other modules and other models are untouched. Without the
    hook (older transformers: the attention calls the module-level function), rotary is left."""
    for name, module in model.named_modules():
        funcs = module.__dict__.get("_kernel_funcs")
        # (wrapper, the function it wraps): one apply_rotary_pos_emb per attention class
        hooked = [
            (w, fn)
            for w in (funcs.values() if isinstance(funcs, dict) else ())
            if isinstance(w, nn.Module) and (fn := _kernel_func_of(w)) is not None
        ]
        before = f"{_ROTARY}[{type(module).__module__}]"
        if not hooked:
            if _ROTARY + "(" in _forward_source(type(module)):
                report.add(
                    name,
                    "rotary",
                    "left",
                    before,
                    reason="called as a module-level function, without transformers' per-module "
                    "kernel-function hook (module._kernel_funcs: transformers 5 with kernels): "
                    "patch() does not rebind a module's globals, which every model would share",
                )
            continue
        wrapper, fn = hooked[0]
        current = wrapper.__dict__.get("forward")
        if getattr(current, "__func__", None) is _rotary_forward:
            report.add(name, "rotary", "unchanged", before, "fastattn.apply_rotary_pos_emb")
            continue
        why = _rotary_unsupported(current if current is not None else fn)
        if why:
            report.add(name, "rotary", "left", before, reason=why)
            continue
        saved = module.__dict__.setdefault(_SAVED, {})
        saved["rotary"] = (wrapper, current)
        wrapper.forward = types.MethodType(_rotary_forward, wrapper)
        report.add(name, "rotary", "replaced", before, "fastattn.apply_rotary_pos_emb")


# ----------------------------------------------------------------------------- gated MLPs
# Swapping gated MLPs (SwiGLU / GeGLU) for fastattn.nn.GatedFeedForward. Kept apart from the
# other swaps: a module is replaced (not re-classed: its class is the model's own), its three
# Linear modules are shared, and unpatch() puts the original module back.
_GATED_NAMES = ("gate_proj", "up_proj", "down_proj", "act_fn")
_PACKED_GATED_NAMES = ("gate_up_proj", "down_proj")
_GATED_FORWARDS = tuple(
    ast.dump(ast.parse(src, mode="eval").body)
    for src in (
        "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
        "self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))",
    )
)


class _Rename(ast.NodeTransformer):
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.copy_location(ast.Name(self.names.get(node.id, node.id), node.ctx), node)


def _forward_body(cls: type) -> tuple[list[ast.stmt] | None, str]:
    """The statements of ``cls.forward(self, x)`` (docstrings dropped, the two arguments renamed
    ``self`` and ``x``), or None and why it cannot be read as such."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None, f"the source of {cls.__name__}.forward is not readable"
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef) or fn.decorator_list:
        return None, f"{cls.__name__}.forward is not a plain (undecorated) function"
    a = fn.args
    if len(a.args) != 2 or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults:
        return None, f"{cls.__name__}.forward takes other arguments than (self, x)"
    rename = _Rename({a.args[0].arg: "self", a.args[1].arg: "x"})
    body = [
        rename.visit(st)
        for st in fn.body
        if not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))
    ]
    return body, ""


@functools.cache
def _standard_gated_forward(cls: type) -> str | None:
    """None if ``cls.forward`` is exactly ``return down_proj(act_fn(gate_proj(x)) * up_proj(x))``
    (directly or through one local), else why not."""
    body, why = _forward_body(cls)
    if body is None:
        return why
    single = len(body) == 1 and isinstance(body[0], ast.Return)
    via_local = (
        len(body) == 2
        and isinstance(body[0], ast.Assign)
        and len(body[0].targets) == 1
        and isinstance(body[0].targets[0], ast.Name)
        and isinstance(body[1], ast.Return)
        and isinstance(body[1].value, ast.Name)
        and body[1].value.id == body[0].targets[0].id
    )
    expr = body[0].value if single or via_local else None
    if expr is not None and ast.dump(expr) in _GATED_FORWARDS:
        return None
    return (
        f"{cls.__name__}.forward is not the standard down_proj(act_fn(gate_proj(x)) * up_proj(x))"
    )


# Phi-3's packed gated MLP, statement for statement (arguments renamed self, x).
_PACKED_GATED_FORWARD = ast.dump(
    ast.Module(
        body=ast.parse(
            "up_states = self.gate_up_proj(x)\n"
            "gate, up_states = up_states.chunk(2, dim=-1)\n"
            "up_states = up_states * self.activation_fn(gate)\n"
            "return self.down_proj(up_states)\n"
        ).body,
        type_ignores=[],
    )
)


@functools.cache
def _packed_gated_forward(cls: type) -> str | None:
    """None if ``cls.forward`` is Phi-3's ``h = gate_up_proj(x); gate, up = h.chunk(2, -1);
    return down_proj(up * activation_fn(gate))``, else why not."""
    body, why = _forward_body(cls)
    if body is None:
        return why
    if ast.dump(ast.Module(body=body, type_ignores=[])) == _PACKED_GATED_FORWARD:
        return None
    return (
        f"{cls.__name__}.forward is not Phi-3's packed form "
        "down_proj(up * activation_fn(gate)) over gate_up_proj(x).chunk(2, dim=-1)"
    )


def _packed_mlp_unsupported(module: nn.Module) -> str | None:
    """None if ``module`` (with ``gate_up_proj`` / ``down_proj``) can become a packed
    GatedFeedForward with the same meaning, else why not."""
    from fastattn.nn.gated_act import activation_of

    gu, d = module.gate_up_proj, module.down_proj
    for n, m in (("gate_up_proj", gu), ("down_proj", d)):
        if type(m) is not nn.Linear:
            return f"{n} is a {type(m).__name__}, not a torch.nn.Linear (quantised or adapted?)"
    act_fn = getattr(module, "activation_fn", None)
    if not isinstance(act_fn, nn.Module):
        return "no activation_fn module"
    act, why = activation_of(act_fn)
    if act is None:
        return why
    why = _packed_gated_forward(type(module))
    if why:
        return why
    for n, m in (("the MLP", module), ("gate_up_proj", gu), ("down_proj", d)):
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return f"{n} has forward hooks or an overridden forward, which the fused MLP would skip"
    if gu.out_features != 2 * d.in_features:
        return "gate_up_proj.out_features is not twice down_proj.in_features"
    if gu.weight.dtype != d.weight.dtype or gu.weight.device != d.weight.device:
        return "the two projections differ in dtype or device"
    return None


def _gated_mlp_unsupported(module: nn.Module) -> str | None:
    """None if ``module`` can become a GatedFeedForward with the same meaning, else why not."""
    from fastattn.nn.gated_act import activation_of

    linears = [getattr(module, n) for n in _GATED_NAMES[:3]]
    for n, m in zip(_GATED_NAMES, linears, strict=False):
        if type(m) is not nn.Linear:
            return f"{n} is a {type(m).__name__}, not a torch.nn.Linear (quantised or adapted?)"
    act, why = activation_of(module.act_fn)
    if act is None:
        return why
    why = _standard_gated_forward(type(module))
    if why:
        return why
    for n, m in [("the MLP", module), *zip(_GATED_NAMES, linears, strict=False)]:
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return f"{n} has forward hooks or an overridden forward, which the fused MLP would skip"
    g, u, d = linears
    if (g.in_features, g.out_features) != (u.in_features, u.out_features) or (
        d.in_features != g.out_features
    ):
        return "gate_proj, up_proj and down_proj do not have the shapes of a gated MLP"
    if len({m.weight.dtype for m in linears}) > 1 or len({m.weight.device for m in linears}) > 1:
        return "the three projections differ in dtype or device"
    return None


def _patch_gated_mlps(model: nn.Module, report: PatchReport) -> None:
    """Replace every standard gated MLP by a :class:`fastattn.nn.GatedFeedForward` sharing its
    Linear modules (and every Phi-3 style MLP, ``gate_up_proj`` / ``down_proj`` /
    ``activation_fn``, by a packed one); list the others (modules with those projections that
    cannot be swapped with the same meaning) with the reason."""
    from fastattn.nn.gated_act import GatedFeedForward

    for name, module in list(model.named_modules()):
        if isinstance(module, GatedFeedForward):
            if _SAVED in module.__dict__:
                after = f"fastattn.nn.GatedFeedForward({module.activation!r})"
                report.add(name, "gated_mlp", "unchanged", "GatedFeedForward", after)
            continue
        if not name:  # the model itself: nothing to put it into
            continue
        kind = type(module).__name__
        if all(isinstance(getattr(module, n, None), nn.Module) for n in _PACKED_GATED_NAMES):
            why = _packed_mlp_unsupported(module)
            if why:
                report.add(name, "gated_mlp", "left", kind, reason=why)
                continue
            new = GatedFeedForward.from_packed(
                module.gate_up_proj, module.down_proj, module.activation_fn
            )
            _put(model, name, module, new, report, kind)
            continue
        if not all(isinstance(getattr(module, n, None), nn.Module) for n in _GATED_NAMES):
            continue
        why = _gated_mlp_unsupported(module)
        if why:
            report.add(name, "gated_mlp", "left", kind, reason=why)
            continue
        new = GatedFeedForward.from_modules(
            module.gate_proj, module.up_proj, module.down_proj, module.act_fn
        )
        _put(model, name, module, new, report, kind)


def _put(model: nn.Module, name: str, old: nn.Module, new: nn.Module, report, kind: str) -> None:
    """Put the GatedFeedForward ``new`` where ``old`` was (unpatch() puts ``old`` back)."""
    new.train(old.training)
    new.__dict__[_SAVED] = {"__module__": old, "kind": "gated_mlp"}
    parent, attr = _parent(model, name)
    setattr(parent, attr, new)
    report.add(
        name, "gated_mlp", "replaced", kind, f"fastattn.nn.GatedFeedForward({new.activation!r})"
    )


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def unpatch(model: nn.Module) -> PatchReport:
    """Undo :func:`patch`: plain torch / transformers modules with the same weights, and every
    transformers config's attention implementation as it was."""
    report = PatchReport()
    for name, module in list(model.named_modules()):
        saved = module.__dict__.pop(_SAVED, None)
        if not saved:
            continue
        if "__module__" in saved:  # a replaced module (HF activation, gated MLP)
            parent, attr = _parent(model, name)
            setattr(parent, attr, saved["__module__"])
            report.add(
                name,
                saved.get("kind", "gelu"),
                "restored",
                type(module).__name__,
                type(saved["__module__"]).__name__,
            )
            continue
        if "rotary" in saved:  # the attention module's private apply_rotary_pos_emb wrapper
            wrapper, former = saved["rotary"]
            del wrapper.forward
            if former is not None:  # a kernel kernelize() had put there
                wrapper.forward = former
            report.add(name, "rotary", "restored", "fastattn.apply_rotary_pos_emb", _ROTARY)
        if "hook" in saved:  # the output_attentions recorder of an attention module
            from fastattn.integrations.transformers import NOT_RECORDED, WANTS_WEIGHTS

            saved["hook"].remove()
            module.__dict__.pop(WANTS_WEIGHTS, None)
            module.__dict__.pop(NOT_RECORDED, None)
            report.add(name, "attention", "restored", "output_attentions hook", "none")
        if "rotary" in saved or "hook" in saved:
            continue
        if "__class__" in saved:
            report.add(
                name, "module", "restored", type(module).__name__, saved["__class__"].__name__
            )
            module.__class__ = saved["__class__"]
        if "activation" in saved:
            del module.activation  # the registered fastattn.nn.GELU sub-module
            module.activation = saved["activation"]
        for attr in ("activation_relu_or_gelu", "use_nested_tensor"):
            if attr in saved:
                setattr(module, attr, saved[attr])
        for config, impl in saved.get("attn_configs", ()):
            before = config._attn_implementation
            _set_impl(config, impl)
            report.add(
                name,
                "config",
                "restored",
                f"{type(config).__name__}.attn_implementation={before!r}",
                repr(impl),
            )
    return report
