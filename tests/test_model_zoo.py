"""The model zoo: every Hugging Face family patch() knows, before and after patch, call by call.

Each family is a tiny random config (no downloads, float32, dropout 0) built with transformers'
*eager* attention, the implementation that applies every feature itself (softcap, sliding
window, position bias, masks). The patched model is a deep copy through ``fastattn.patch``; the
original stays eager and is the reference. For every family:

- logits (hidden states for encoders) without and with padding (left padding for decoders,
  right padding for encoders; positions that see no key are excluded: their values are
  unused and differ by design);
- a training backward: every parameter's gradient;
- greedy ``generate`` with the dynamic and the static cache (decoders and seq2seq);
- ``output_attentions=True``: the weights themselves;
- the report: how many attention / norm / MLP / GELU layers were replaced (a family whose
  layers stop being recognised fails here), every fallback said as one, and unpatch restoring
  the original outputs bitwise;
- ``torch.compile(fullgraph=True)``: where the original traces into one graph the patched
  model does too, and compiles once.

Tolerance as tests/test_hf.py: ``rtol=1e-5, atol=1e-5 * max|ref|`` (a different summation order
moves ~1e-7 relative; a dropped feature moves 1e-2 or more). Generated tokens compared exactly.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastattn

# The families tests/test_hf.py already builds (same configs), and its tolerance; importing it
# skips this module too where transformers is absent.
from tests.test_hf import V, _bart, _bert, _close, _gemma, _gemma2, _llama, _mistral, _t5

transformers = pytest.importorskip("transformers")

DEC = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    max_position_embeddings=64,
)


ENC = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
S2S = dict(
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    dropout=0.0,
)


def _cfg(name: str, **kw):
    return getattr(transformers, name)(vocab_size=V, **kw)


@dataclass(frozen=True)
class Family:
    make: Callable[[], torch.nn.Module]
    kind: str  # "decoder", "encoder", "seq2seq", "vision"
    replaced: dict[str, int]  # report kind -> layers replaced


_GATED = {"attention": 2, "rms_norm": 5, "gated_mlp": 2}
_PLAIN = {"attention": 2, "layer_norm": 5, "gelu": 2}
# The families whose attention reaches apply_rotary_pos_emb through transformers' per-module
# kernel-function hook (``module._kernel_funcs``, from ``kernels``) with the formula fastattn
# computes: patch() swaps it in each attention layer (one "rotary" entry per layer). Phi's
# partial rotary is among them. The others with a rotary embedding keep theirs and the report
# says so: ModernBERT's casts the result back to q's dtype; the rest call theirs as a
# module-level function, without the hook.
ROTARY = {
    "llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3", "gemma3", "mixtral", "qwen2_moe",
    "granite", "starcoder2", "phi",
}  # fmt: skip
ROTARY_LEFT = {"phi3", "olmo2", "cohere", "stablelm", "falcon", "gptj", "gpt_neox", "modernbert"}
FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        lambda: transformers.GPT2LMHeadModel(
            _cfg(
                "GPT2Config",
                n_layer=2,
                n_head=4,
                n_embd=32,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        ),
        "decoder",
        _PLAIN,
    ),
    "llama": Family(_llama, "decoder", _GATED),
    "mistral": Family(_mistral, "decoder", _GATED),
    "qwen2": Family(
        lambda: transformers.Qwen2ForCausalLM(_cfg("Qwen2Config", **DEC)), "decoder", _GATED
    ),
    "gemma": Family(_gemma, "decoder", _GATED),
    "gemma2": Family(_gemma2, "decoder", {"attention": 2, "rms_norm": 9, "gated_mlp": 2}),
    # Newer families beyond the list: per-head q / k RMSNorms (Qwen3, Gemma3, Olmo2),
    # Gemma3's sliding window (4 keys, shorter than the 11-token inputs) and four norms a layer,
    # Phi3's packed gate_up_proj MLP.
    "qwen3": Family(
        lambda: transformers.Qwen3ForCausalLM(_cfg("Qwen3Config", **DEC, head_dim=8)),
        "decoder",
        {"attention": 2, "rms_norm": 9, "gated_mlp": 2},
    ),
    "gemma3": Family(
        lambda: transformers.Gemma3ForCausalLM(
            _cfg("Gemma3TextConfig", **DEC, head_dim=8, sliding_window=4, query_pre_attn_scalar=8)
        ),
        "decoder",
        {"attention": 2, "rms_norm": 13, "gated_mlp": 2},
    ),
    "phi3": Family(
        lambda: transformers.Phi3ForCausalLM(
            _cfg(
                "Phi3Config",
                **DEC,
                pad_token_id=0,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attention_dropout=0.0,
            )
        ),
        "decoder",
        _GATED,  # its packed gate_up_proj MLP too
    ),
    "olmo2": Family(
        lambda: transformers.Olmo2ForCausalLM(_cfg("Olmo2Config", **DEC)),
        "decoder",
        {"attention": 2, "gated_mlp": 2},  # its RMSNorms weight before the cast: left
    ),
    # More families people run: the checks above find no difference from eager attention in
    # any of them (MoE routers, Falcon's fused QKV, GPT-J's partial rotary, OPT's ReLU MLP,
    # Cohere's own LayerNorm: left, and said).
    "mixtral": Family(
        lambda: transformers.MixtralForCausalLM(
            _cfg("MixtralConfig", **DEC, num_local_experts=4, num_experts_per_tok=2)
        ),
        "decoder",
        {"attention": 2, "rms_norm": 5},
    ),
    "qwen2_moe": Family(
        lambda: transformers.Qwen2MoeForCausalLM(
            _cfg(
                "Qwen2MoeConfig",
                **DEC,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                shared_expert_intermediate_size=16,
            )
        ),
        "decoder",
        _GATED,  # the shared expert's MLP
    ),
    "granite": Family(
        lambda: transformers.GraniteForCausalLM(_cfg("GraniteConfig", **DEC)), "decoder", _GATED
    ),
    "cohere": Family(
        lambda: transformers.CohereForCausalLM(_cfg("CohereConfig", **DEC)),
        "decoder",
        {"attention": 2, "gated_mlp": 2},
    ),
    "stablelm": Family(
        lambda: transformers.StableLmForCausalLM(_cfg("StableLmConfig", **DEC)),
        "decoder",
        {"attention": 2, "layer_norm": 5, "gated_mlp": 2},
    ),
    "starcoder2": Family(
        lambda: transformers.Starcoder2ForCausalLM(
            _cfg("Starcoder2Config", **DEC, residual_dropout=0.0, embedding_dropout=0.0)
        ),
        "decoder",
        _PLAIN,
    ),
    "falcon": Family(
        lambda: transformers.FalconForCausalLM(
            _cfg("FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
        ),
        "decoder",
        {"attention": 2, "layer_norm": 3, "gelu": 2},
    ),
    "gptj": Family(
        lambda: transformers.GPTJForCausalLM(
            _cfg(
                "GPTJConfig",
                n_embd=32,
                n_layer=2,
                n_head=4,
                rotary_dim=4,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        ),
        "decoder",
        {"attention": 2, "layer_norm": 3, "gelu": 2},
    ),
    "opt": Family(
        lambda: transformers.OPTForCausalLM(
            _cfg(
                "OPTConfig",
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=64,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
                dropout=0.0,
            )
        ),
        "decoder",
        {"attention": 2, "layer_norm": 5},
    ),
    # Encoders and seq2seq models beyond BERT / T5 / Bart: ALBERT's shared layer, DistilBERT's
    # own attention class, ModernBERT's local attention (8 keys: shorter than the inputs),
    # CLIP's causal text encoder (QuickGELU: left, and said), Marian's and mBART's stacks.
    "roberta": Family(
        lambda: transformers.RobertaModel(_cfg("RobertaConfig", **ENC, pad_token_id=1)),
        "encoder",
        _PLAIN,
    ),
    "distilbert": Family(
        lambda: transformers.DistilBertModel(
            _cfg(
                "DistilBertConfig",
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                dropout=0.0,
                attention_dropout=0.0,
                max_position_embeddings=64,
            )
        ),
        "encoder",
        _PLAIN,
    ),
    "albert": Family(
        lambda: transformers.AlbertModel(_cfg("AlbertConfig", **ENC, embedding_size=16)),
        "encoder",
        {"attention": 1, "layer_norm": 3, "gelu": 1},  # one layer, shared by both
    ),
    "electra": Family(
        lambda: transformers.ElectraModel(_cfg("ElectraConfig", **ENC, embedding_size=32)),
        "encoder",
        _PLAIN,
    ),
    "modernbert": Family(
        lambda: transformers.ModernBertModel(
            _cfg(
                "ModernBertConfig",
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                local_attention=8,
                global_attn_every_n_layers=2,
                pad_token_id=0,
            )
        ),
        "encoder",
        _PLAIN,
    ),
    "clip_text": Family(
        lambda: transformers.CLIPTextModel(
            _cfg(
                "CLIPTextConfig",
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
            )
        ),
        "encoder",
        {"attention": 2, "layer_norm": 5},
    ),
    "marian": Family(
        lambda: transformers.MarianMTModel(
            _cfg("MarianConfig", **S2S, pad_token_id=0, decoder_start_token_id=0)
        ),
        "seq2seq",
        {"attention": 6, "layer_norm": 10, "gelu": 4},
    ),
    "mbart": Family(
        lambda: transformers.MBartForConditionalGeneration(_cfg("MBartConfig", **S2S)),
        "seq2seq",
        {"attention": 6, "layer_norm": 14, "gelu": 4},
    ),
    "phi": Family(
        lambda: transformers.PhiForCausalLM(
            _cfg(
                "PhiConfig",
                **{k: v for k, v in DEC.items() if k != "num_key_value_heads"},
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attention_dropout=0.0,
            )
        ),
        "decoder",
        {"attention": 2, "layer_norm": 3, "gelu": 2},
    ),
    "gpt_neox": Family(
        lambda: transformers.GPTNeoXForCausalLM(
            _cfg(
                "GPTNeoXConfig",
                **{k: v for k, v in DEC.items() if k != "num_key_value_heads"},
                hidden_dropout=0.0,
                attention_dropout=0.0,
            )
        ),
        "decoder",
        _PLAIN,
    ),
    "bert": Family(_bert, "encoder", _PLAIN),
    "t5": Family(
        # T5 v1.1's gated GELU: smooth, so bf16 rounding does not flip ReLU kinks (which makes
        # the max gradient error of a ReLU model a coin toss at any tolerance).
        lambda: _t5(dropout_rate=0.0, feed_forward_proj="gated-gelu"),
        "seq2seq",
        # encoder self, decoder self, decoder cross; the gated MLP's GELUs (T5's norms and its
        # gated MLP as a whole are not swapped)
        {"attention": 6, "gelu": 4},
    ),
    "bart": Family(_bart, "seq2seq", {"attention": 6, "layer_norm": 12, "gelu": 4}),
    "vit": Family(
        lambda: transformers.ViTModel(
            transformers.ViTConfig(
                image_size=16,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        ),
        "vision",
        _PLAIN,
    ),
}
GENERATORS = [n for n, f in FAMILIES.items() if f.kind in ("decoder", "seq2seq")]
PADDED = [n for n, f in FAMILIES.items() if f.kind != "vision"]


def _build(name: str):
    """(eager original, patched copy, report); both in eval mode."""
    torch.manual_seed(0)
    original = FAMILIES[name].make().eval()
    original.set_attn_implementation("eager")
    patched = copy.deepcopy(original)
    report = fastattn.patch(patched)
    return original, patched, report


def _inputs(name: str, padded: bool) -> tuple[dict, torch.Tensor | None]:
    """(model kwargs, bool mask of the output positions to compare or None for all)."""
    g = torch.Generator().manual_seed(1)
    kind = FAMILIES[name].kind
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}, None
    ids = torch.randint(3, V, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        if kind == "decoder":
            mask[1, :3] = 0  # left padding, as for generation
            mask[2, :1] = 0
        else:
            mask[1, 7:] = 0  # right padding
            mask[2, 2:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.randint(3, V, (3, 6), generator=g)
        return kw, None  # decoder positions all see keys
    return kw, mask.bool()


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_outputs_match_eager(name, padded):
    if padded and name not in PADDED:
        pytest.skip("ViT takes no attention mask")
    original, patched, _ = _build(name)
    kw, valid = _inputs(name, padded)
    with torch.no_grad():
        ref, out = _output(original(**kw)), _output(patched(**kw))
    if valid is not None:
        ref, out = ref[valid], out[valid]
    _close(out, ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_gradients_match_eager(name):
    original, patched, _ = _build(name)
    kw, valid = _inputs(name, padded=name in PADDED)
    g = torch.Generator().manual_seed(2)
    grads = []
    for model in (original, patched):
        model.train().zero_grad(set_to_none=True)
        out = _output(model(**kw))
        dout = torch.randn(out.shape, generator=g.manual_seed(2))
        if valid is not None:  # rows that see no key carry no gradient on either side
            dout = dout * valid[..., None]
        out.backward(dout)
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    # The floor is relative to the largest gradient of the model: some gradients are zero in
    # exact maths (the key bias: softmax ignores a shift shared by every key) and are 1e-9 noise.
    scale = max(g.abs().max().item() for g in grads[0].values())
    for n, ref in grads[0].items():
        _close(grads[1][n], ref, scale)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_bf16_autocast_within_the_rule(name):
    """Under bf16 autocast (how users run bf16), the patched model's outputs and gradients are
    within the error rule against a float64 copy. PyTorch's own error is the larger of its two
    attention paths' (eager and SDPA, where the family has SDPA) under the same autocast: one
    path's max error over a few dozen elements is sometimes lucky (a key bias's gradient, a sum
    that cancels, is 3x more exact on eager than on SDPA for the seed drawn here)."""
    from tests.rule import assert_rule, max_err

    original, patched, _ = _build(name)
    ref64 = copy.deepcopy(original).double()
    if name in ("mixtral", "qwen2_moe"):  # their grouped-mm experts take no float64
        ref64.set_experts_implementation("eager")
    torch_paths = [original]
    try:
        sdpa = copy.deepcopy(original)
        sdpa.set_attn_implementation("sdpa")
        torch_paths.append(sdpa)
    except (ValueError, ImportError):
        pass  # the family has no SDPA path
    # Decoders unpadded: transformers' float64 eager turns left-padded rows into NaN (a row that
    # sees no key), and the fp32 tests above already cover left padding.
    # ModernBERT unpadded too: its float64 eager gives NaN gradients under padding (the
    # embeddings and the first Wqkv) while fp32 and bf16 eager stay finite.
    padded = FAMILIES[name].kind in ("encoder", "seq2seq") and name != "modernbert"
    kw, valid = _inputs(name, padded=padded)
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}

    def run(model, autocast):
        model.train().zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _output(model(**(kw if autocast else kw64)))
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        if valid is not None:
            dout = dout * valid[..., None]
        out.backward(dout.to(out.dtype))
        out = out[valid] if valid is not None else out
        return {"output": out} | {
            n: p.grad for n, p in model.named_parameters() if p.grad is not None
        }

    ours, ref = run(patched, True), run(ref64, False)
    theirs = [run(m, True) for m in torch_paths]
    assert ours.keys() == ref.keys() and all(t.keys() == ref.keys() for t in theirs)
    for n in ref:
        worst = max((t[n] for t in theirs), key=lambda t: max_err(t, ref[n]))
        assert_rule(f"{name} {n}", ours[n], worst, ref[n])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", GENERATORS)
def test_greedy_generate_matches_eager(name, cache):
    original, patched, _ = _build(name)
    kw, _ = _inputs(name, padded=True)
    kw.pop("decoder_input_ids", None)
    extra = {}
    if cache == "static":
        extra = {"cache_implementation": "static", "cache_config": {"max_cache_len": 24}}

    def gen(model):
        out = model.generate(
            **kw,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **extra,
        )
        return out.sequences, torch.stack(out.logits)

    try:
        seq_ref, logits_ref = gen(original)
    except (ValueError, NotImplementedError, TypeError) as e:  # transformers' own limits
        pytest.skip(f"{name} eager does not generate with the {cache} cache: {e}")
    seq, logits = gen(patched)
    assert torch.equal(seq, seq_ref)
    _close(logits, logits_ref)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_output_attentions_match_eager(name):
    original, patched, _ = _build(name)
    kw, valid = _inputs(name, padded=name in PADDED)
    with torch.no_grad():
        ref = original(**kw, output_attentions=True)
        out = patched(**kw, output_attentions=True)
    keys = [k for k in ("attentions", "encoder_attentions", "decoder_attentions") if k in ref]
    keys += ["cross_attentions"] if ref.get("cross_attentions") else []
    assert keys
    for key in keys:
        assert len(out[key]) == len(ref[key]) > 0, key
        for a, b in zip(out[key], ref[key], strict=True):
            if valid is not None:  # query rows that see no key: excluded as above
                a, b = a.transpose(1, 2)[valid], b.transpose(1, 2)[valid]
            _close(a, b)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_report_and_unpatch(name):
    original, patched, report = _build(name)
    replaced = Counter(e.kind for e in report.layers(action="replaced"))
    linears = sum(type(m) is torch.nn.Linear for m in original.modules())
    assert linears > 0 and replaced.pop("linear") == linears  # every plain Linear
    rotary = replaced.pop("rotary", 0)
    assert dict(replaced) == FAMILIES[name].replaced
    hooked = any("_kernel_funcs" in m.__dict__ for m in original.modules())
    layers = FAMILIES[name].replaced["attention"]
    rotary_left = report.layers("rotary", "left")
    assert rotary == (layers if name in ROTARY and hooked else 0)
    if name in ROTARY_LEFT or (name in ROTARY and not hooked):
        assert len(rotary_left) == layers and all(e.reason for e in rotary_left)
    else:
        assert not rotary_left
    if name == "modernbert" and hooked:  # its rotary returns q's dtype, not promote(q, cos)
        assert all("bfloat16 q with float32 cos" in e.reason for e in rotary_left)
    left = [e for e in report.layers(action="left") if e.kind != "rotary"]
    if name == "t5":  # T5LayerNorm (an RMSNorm with its own rounding): left, and said
        assert left and {e.before for e in left} == {"T5LayerNorm"}
    elif name == "olmo2":  # Olmo2RMSNorm: weight * x, then the cast (neither known form)
        assert len(left) == 9 and {e.before for e in left} == {"Olmo2RMSNorm"}
    elif name == "cohere":  # CohereLayerNorm: mean-centred, no bias, its own rounding
        assert len(left) == 3 and {e.before for e in left} == {"CohereLayerNorm"}
    elif name == "clip_text":  # x * sigmoid(1.702 x): not GELU
        assert len(left) == 2 and {e.before for e in left} == {"QuickGELUActivation"}
    else:
        assert not left, [str(e) for e in left]
    assert all(e.runtime for e in report.layers("attention", "replaced"))
    assert report.fallbacks, "the output_attentions path materialises weights: a fallback"
    assert all("output_attentions" in p or "falls back" in p for _, p in report.fallbacks)
    kw, _ = _inputs(name, padded=False)
    with torch.no_grad():
        before = _output(original(**kw))
        fastattn.unpatch(patched)
        after = _output(patched(**kw))
    assert torch.equal(after, before)
    assert not any("fastattn" in type(m).__module__ for m in patched.modules())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_compile_adds_no_graph_break_or_recompile(name):
    """Where the original model traces into one graph, the patched one does too, and three
    training steps compile it once."""
    import torch._dynamo

    original, patched, _ = _build(name)
    kw, _ = _inputs(name, padded=False)

    def steps(model):
        torch._dynamo.reset()
        compiled = torch.compile(model.train(), backend="eager", fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                _output(compiled(**kw)).square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    try:
        ref = steps(original)
    except Exception as e:  # noqa: BLE001 - transformers' own graph breaks: nothing to compare
        torch._dynamo.reset()
        pytest.skip(f"the original {name} does not compile fullgraph: {type(e).__name__}")
    grads = steps(patched)
    torch._dynamo.reset()
    scale = max(g.abs().max().item() for g in ref.values())
    for n, g in ref.items():
        _close(grads[n], g, scale)


def test_output_attentions_taken_by_the_attention_module_itself():
    """Falcon's attention takes output_attentions itself and does not pass it to the attention
    function (eager computes the weights always): fastattn learns the flag per call from a
    forward hook, through patch() or, with only register(), from the first call on."""
    from fastattn.integrations import transformers as hf

    hf.register()
    original = FAMILIES["falcon"].make().eval()
    original.set_attn_implementation("eager")
    direct = copy.deepcopy(original)
    direct.set_attn_implementation(hf.NAME)  # no patch(): register() only
    kw, _ = _inputs("falcon", padded=False)
    with torch.no_grad():
        ref = original(**kw, output_attentions=True).attentions
        for _ in range(2):  # the first call (hook installed during it) and the next
            got = direct(**kw, output_attentions=True).attentions
            assert len(got) == len(ref) and all(g is not None for g in got)
            for a, b in zip(got, ref, strict=True):
                _close(a, b)
        assert direct(**kw).attentions is None
    _, patched, _ = _build("falcon")
    attn = patched.transformer.h[0].self_attention
    assert attn._forward_pre_hooks
    fastattn.unpatch(patched)
    assert not attn._forward_pre_hooks and hf.WANTS_WEIGHTS not in attn.__dict__
