"""Hugging Face models through fastattn: patched == unpatched, call by call.

Tiny random-config models built here (no downloads), CPU, float32. Logits are compared with
``rtol=1e-5, atol=1e-5 * max|logit|``: both sides compute the same float32 maths in a different
summation order (fused online softmax vs SDPA / eager), which moves the last few bits (measured
~1e-7 relative); a dropped feature (softcap, position bias, a mask alignment) moves logits by
1e-2 or more, so the tolerance separates the two by three orders of magnitude. Generated tokens
are compared exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import _dispatch
from fastattn.integrations import transformers as hf
from fastattn.patch import _hf_configs

transformers = pytest.importorskip("transformers")

V = 64  # vocabulary


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float | None = None) -> None:
    """``scale``: what the absolute floor is relative to (default: this tensor's max)."""
    scale = expected.abs().max().item() if scale is None else scale
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1e-3))


def _pair(model: torch.nn.Module):
    """(original, patched copy, report)."""
    model.eval()
    patched = copy.deepcopy(model)
    report = fastattn.patch(patched)
    return model, patched, report


def _llama(**kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=64,
        **kw,
    )
    return transformers.LlamaForCausalLM(cfg)


def _gen(model, ids, mask=None, **kw):
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids) if mask is None else mask,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits)


def _same_generation(a, b, ids, mask=None, **kw):
    seq_a, logits_a = _gen(a, ids, mask, **kw)
    seq_b, logits_b = _gen(b, ids, mask, **kw)
    assert torch.equal(seq_a, seq_b)
    _close(logits_b, logits_a)


# ----------------------------------------------------------------------------- decoder-only
@pytest.mark.parametrize("padded", [False, True])
def test_llama_gqa_static_cache_generate(padded):
    original, patched, report = _pair(_llama())
    assert len(report.layers("attention", "replaced")) == 2
    ids = torch.randint(3, V, (2, 12))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0  # left padding
    hf.CALLS.clear()
    # 12 prompt tokens into a 16-slot cache: the prefill gets no mask and is_causal (top-left).
    _same_generation(
        original,
        patched,
        ids,
        mask,
        max_new_tokens=4,
        cache_implementation="static",
        cache_config={"max_cache_len": 16},
    )
    assert hf.CALLS["fastattn"] > 0 and hf.CALLS["sdpa"] == 0
    if _dispatch.unavailable_reason("cpu", "cpu") is None:
        # Prefill and decode are plain causal / full attention after cropping the empty cache
        # slots: the fused CPU kernel serves them, not the reference fallback.
        assert fastattn.last_backend("attention") == "cpu"


def test_llama_dynamic_cache_and_training_grads():
    original, patched, _ = _pair(_llama())
    ids = torch.randint(3, V, (2, 10))
    _same_generation(original, patched, ids, max_new_tokens=5)
    for m in (original, patched):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    for p, q in zip(original.parameters(), patched.parameters(), strict=True):
        _close(q.grad, p.grad)


def _mistral():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
        max_position_embeddings=64,
    )
    return transformers.MistralForCausalLM(cfg)


def test_mistral_sliding_window_prefill_longer_than_window():
    original, patched, report = _pair(_mistral())
    ids = torch.randint(3, V, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        _close(patched(ids, attention_mask=mask).logits, original(ids, attention_mask=mask).logits)
    _same_generation(original, patched, ids, mask, max_new_tokens=4)
    # The report says which calls the sliding window sends where.
    notes = [n for e in report.layers("attention") for n in e.runtime]
    assert any("sliding window (4)" in n for n in notes)


def _gemma2(softcap=0.5):
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=softcap,
        final_logit_softcapping=None,
        max_position_embeddings=64,
    )
    model = transformers.Gemma2ForCausalLM(cfg)
    # Random init keeps scores tiny: a large scaling makes the softcap of 0.5 bend them.
    for layer in model.model.layers:
        layer.self_attn.scaling = 100.0
    return model


def test_gemma2_softcap_and_sliding_window():
    original, patched, report = _pair(_gemma2())
    ids = torch.randint(3, V, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = original(ids, attention_mask=mask).logits
        # Left-padded positions see no key: their (unused) logits differ by design.
        valid = mask.bool()
        _close(patched(ids, attention_mask=mask).logits[valid], ref[valid])
        # The softcap matters here: without it the logits move far beyond the tolerance.
        no_cap = copy.deepcopy(patched)
        for layer in no_cap.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        moved = (no_cap(ids, attention_mask=mask).logits - ref)[valid].abs().max()
        assert moved > 1e-2 * ref.abs().max()
    _same_generation(original, patched, ids, mask, max_new_tokens=4)
    text = str(report)
    assert "softcap 0.5" in text and "sliding window (4)" in text


@pytest.mark.parametrize("make", [_mistral, _gemma2])
def test_sliding_window_static_cache_generate(make):
    original, patched, _ = _pair(make())
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    _same_generation(
        original,
        patched,
        ids,
        mask,
        max_new_tokens=4,
        cache_implementation="static",
        cache_config={"max_cache_len": 16},
    )


# ----------------------------------------------------------------------------- T5
def _t5(**kw):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=V,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        **kw,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def test_t5_position_bias_logits_generation_and_report():
    original, patched, report = _pair(_t5())
    # The stacks keep deep copies of the config: all of them are switched.
    assert patched.encoder.config._attn_implementation == "fastattn"
    assert patched.decoder.config._attn_implementation == "fastattn"
    layers = report.layers("attention", "replaced")
    assert len(layers) == 6  # 2 encoder self, 2 decoder self, 2 decoder cross
    assert all("position bias" in e.runtime[0] for e in layers)
    ids = torch.randint(3, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.randint(3, V, (2, 5))
    hf.CALLS.clear()
    with torch.no_grad():
        out = patched(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ref = original(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert hf.CALLS["fastattn"] == 6  # every attention call reached fastattn
    _close(out, ref)
    _same_generation(original, patched, ids, mask, max_new_tokens=5)


def test_t5_training_grads_through_position_bias():
    original, patched, _ = _pair(_t5(dropout_rate=0.0))
    ids = torch.randint(3, V, (2, 8))
    labels = torch.randint(3, V, (2, 5))
    for m in (original, patched):
        m.train().zero_grad()
        m(input_ids=ids, labels=labels).loss.backward()
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert patched.get_parameter(bias).grad.abs().max() > 0
    for p, q in zip(original.parameters(), patched.parameters(), strict=True):
        _close(q.grad, p.grad)


def test_t5_from_config_attn_implementation():
    assert hf.register()
    original = _t5().eval()
    torch.manual_seed(0)
    cfg = copy.deepcopy(original.config)
    cfg._attn_implementation = "fastattn"
    loaded = transformers.T5ForConditionalGeneration(cfg).eval()
    loaded.load_state_dict(original.state_dict())
    assert loaded.encoder.config._attn_implementation == "fastattn"
    ids = torch.randint(3, V, (1, 7))
    dec = torch.randint(3, V, (1, 4))
    hf.CALLS.clear()
    with torch.no_grad():
        _close(
            loaded(input_ids=ids, decoder_input_ids=dec).logits,
            original(input_ids=ids, decoder_input_ids=dec).logits,
        )
    assert hf.CALLS["fastattn"] == 6


# ----------------------------------------------------------------------------- encoders / seq2seq
def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg)


def test_bert_padding():
    original, patched, _ = _pair(_bert())
    ids = torch.randint(3, V, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        _close(
            patched(ids, attention_mask=mask).last_hidden_state,
            original(ids, attention_mask=mask).last_hidden_state,
        )


def _bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return transformers.BartForConditionalGeneration(cfg)


def test_bart_cross_attention():
    original, patched, report = _pair(_bart())
    assert len(report.layers("attention", "replaced")) == 6
    ids = torch.randint(3, V, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    dec = torch.randint(3, V, (2, 6))
    with torch.no_grad():
        _close(
            patched(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
            original(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
        )
    _same_generation(original, patched, ids, mask, max_new_tokens=4)


def test_gpt2_padding():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=V, n_positions=64)
    original, patched, _ = _pair(transformers.GPT2LMHeadModel(cfg))
    ids = torch.randint(3, V, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        out = patched(ids, attention_mask=mask).logits
        ref = original(ids, attention_mask=mask).logits
    _close(out[mask.bool()], ref[mask.bool()])


def test_vit_and_qwen2():
    torch.manual_seed(0)
    vcfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    original, patched, report = _pair(transformers.ViTModel(vcfg))
    assert len(report.layers("attention", "replaced")) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _close(patched(x).last_hidden_state, original(x).last_hidden_state)
    qcfg = transformers.Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    original, patched, _ = _pair(transformers.Qwen2ForCausalLM(qcfg))
    ids = torch.randint(3, V, (2, 11))
    _same_generation(original, patched, ids, max_new_tokens=4)


# ----------------------------------------------------------------------------- RMSNorm
def _gemma():
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    return transformers.GemmaForCausalLM(cfg)


def _logits_and_grads(model, ids, dlogits):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    logits.backward(dlogits.to(logits.dtype))
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [_llama, _gemma])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norms_replaced_logits_and_grads_within_the_rule(make, dtype):
    from tests.rule import assert_rule

    model = make().eval()
    with torch.no_grad():  # non-trivial norm weights (they start at 1 / 0), so each term shows
        for m in model.modules():
            if "RMSNorm" in type(m).__name__:
                m.weight.normal_(0.0 if make is _gemma else 1.0, 0.5)
    ref64 = copy.deepcopy(model).double()
    original = copy.deepcopy(model).to(dtype)
    patched = copy.deepcopy(original)
    report = fastattn.patch(patched)
    norms = report.layers("rms_norm", "replaced")
    cls = "LlamaRMSNorm" if make is _llama else "GemmaRMSNorm"
    assert len(norms) == 5 and {e.before for e in norms} == {cls}  # 2 per layer + the final one
    assert not report.layers("rms_norm", "left")
    assert f"{cls} -> Fastattn{cls}" in str(report)
    assert isinstance(patched.model.norm, type(original.model.norm))
    assert patched.model.norm.weight is not original.model.norm.weight  # a deep copy's
    assert dict(patched.named_parameters()).keys() == dict(original.named_parameters()).keys()

    ids = torch.randint(3, V, (2, 10))
    dlogits = torch.randn(2, 10, V)
    _dispatch._last.clear()
    out, grads = _logits_and_grads(patched, ids, dlogits)
    assert fastattn.last_backend("rms_norm") is not None  # the patched norms ran fastattn's op
    t_out, t_grads = _logits_and_grads(original, ids, dlogits)
    r_out, r_grads = _logits_and_grads(ref64, ids, dlogits.double())
    assert_rule("logits", out, t_out, r_out)
    assert grads.keys() == t_grads.keys() == r_grads.keys()
    for name in grads:
        assert_rule(f"grad {name}", grads[name], t_grads[name], r_grads[name])
    fastattn.unpatch(patched)
    assert type(patched.model.norm) is type(original.model.norm)


def test_rms_norm_parameters_are_shared_not_copied():
    model = _llama().eval()
    weights = [m.weight for m in model.modules() if "RMSNorm" in type(m).__name__]
    fastattn.patch(model)
    after = [m.weight for m in model.modules() if "RMSNorm" in type(m).__name__]
    assert all(a is b for a, b in zip(weights, after, strict=True))
    ids = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # the patched module reads the same parameter
        a = model(ids).logits
        fastattn.unpatch(model)
        b = model(ids).logits
    _close(a, b)


def test_patched_rms_norms_pickle_and_deepcopy():
    import io

    model = _llama().eval()
    fastattn.patch(model)
    ids = torch.randint(3, V, (1, 6))
    buf = io.BytesIO()
    torch.save(model, buf)  # the made class pickles as (original class, fastattn forward)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for m in (loaded, copy.deepcopy(model)):
        assert type(m.model.norm) is type(model.model.norm)
        assert m.model.norm.weight is not model.model.norm.weight
        with torch.no_grad():
            torch.testing.assert_close(m(ids).logits, model(ids).logits, rtol=0, atol=0)
        fastattn.unpatch(m)
        assert type(m.model.norm) is transformers.models.llama.modeling_llama.LlamaRMSNorm


def test_unknown_rms_norm_variant_is_left_with_a_reason():
    class OddRMSNorm(torch.nn.Module):  # another formula: the mean of |x|, not of x^2
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            h = hidden_states.abs().mean(-1, keepdim=True)
            return self.weight * hidden_states / (h + self.variance_epsilon)

    model = _llama().eval()
    model.model.norm = OddRMSNorm(32)
    report = fastattn.patch(model)
    left = report.layers("rms_norm", "left")
    assert [(e.name, e.before) for e in left] == [("model.norm", "OddRMSNorm")]
    assert "neither LlamaRMSNorm's nor GemmaRMSNorm's" in left[0].reason
    assert type(model.model.norm) is OddRMSNorm
    assert len(report.layers("rms_norm", "replaced")) == 4


# ----------------------------------------------------------------------------- output_attentions
@pytest.mark.parametrize("how", ["kwarg", "config"])
def test_output_attentions_returns_eager_weights(how):
    eager = _llama().eval()
    eager.set_attn_implementation("eager")
    kw = {"output_attentions": True}
    if how == "config":
        # Asked for through the config (set while eager: transformers refuses it otherwise): no
        # kwarg reaches the attention function, transformers' output recorder wants the weights.
        eager.config.output_attentions = True
        kw = {}
    patched = copy.deepcopy(eager)
    fastattn.patch(patched)
    ids = torch.randint(3, V, (2, 9))
    hf.CALLS.clear()
    with torch.no_grad():
        ref = eager(ids, **kw)
        out = patched(ids, **kw)
    assert hf.CALLS["weights"] == 2
    assert len(out.attentions) == 2
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        _close(a, b)
    _close(out.logits, ref.logits)


def test_output_attentions_bert_padding_and_t5_bias():
    eager = _bert().eval()
    eager.set_attn_implementation("eager")
    _, patched, _ = _pair(_bert())
    ids = torch.randint(3, V, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask, output_attentions=True).attentions
        out = patched(ids, attention_mask=mask, output_attentions=True).attentions
    for a, b in zip(out, ref, strict=True):
        _close(a, b)
    t5_eager = _t5().eval()
    t5_eager.set_attn_implementation("eager")
    _, t5, _ = _pair(_t5())
    dec = torch.randint(3, V, (2, 4))
    with torch.no_grad():
        ref = t5_eager(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
        out = t5(input_ids=ids, decoder_input_ids=dec, output_attentions=True)
    for key in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(out[key]) == 2
        for a, b in zip(out[key], ref[key], strict=True):
            _close(a, b)


# ----------------------------------------------------------------------------- patch / unpatch
@pytest.mark.parametrize("make", [_t5, _llama, _gemma2])
def test_patch_unpatch_restores_everything(make):
    model = make().eval()
    configs = {id(c): c._attn_implementation for c in _hf_configs(model)}
    ids = torch.randint(3, V, (1, 8))
    kw = {"decoder_input_ids": ids[:, :4]} if make is _t5 else {}
    with torch.no_grad():
        before = model(ids, **kw).logits
    first = fastattn.patch(model)
    again = fastattn.patch(model)
    assert first.layers("attention", "replaced") and not again.layers("attention", "replaced")
    fastattn.unpatch(model)
    assert {id(c): c._attn_implementation for c in _hf_configs(model)} == configs
    assert "fastattn" not in configs.values()
    with torch.no_grad():
        assert torch.equal(model(ids, **kw).logits, before)


def test_report_is_readable_and_lists_fallbacks():
    _, _, report = _pair(_gemma2())
    text = str(report)
    assert "model.layers.0.self_attn: Gemma2Attention[eager] -> Gemma2Attention[fastattn]" in text
    assert "output_attentions=True" in text
    # Every call path that leaves the fused kernels says so (on this machine at least the
    # output_attentions path and the bool-mask path do).
    assert report.fallbacks and all("falls back" in note for _, note in report.fallbacks)


# ----------------------------------------------------------------------------- the function itself
class _Mod(torch.nn.Module):
    is_causal = True


def _qkv(b=2, hq=4, hkv=2, tq=6, tk=9, d=8):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(b, hq, tq, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
        torch.randn(b, hkv, tk, d, generator=g),
    )


def _sdpa(q, k, v, mask, causal=False):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).transpose(1, 2)


def _masks(b, tq, tk):
    i = torch.arange(tq)[:, None]
    j = torch.arange(tk)[None, :]
    pad = torch.ones(b, tk, dtype=torch.bool)
    pad[1, :2] = False
    out = {}
    for off in (0, 2, tk - tq):
        out[f"causal+{off}"] = (j <= i + off)[None, None] & pad[:, None, None]
        out[f"window3+{off}"] = ((j <= i + off) & (j > i + off - 3))[None, None]
    out["padding"] = pad[:, None, None].expand(b, 1, tq, tk)
    out["bidir-window"] = ((j - i).abs() <= 2)[None, None]
    out["static-tail"] = (j <= i + 1)[None, None] & (j < tq + 1)
    rnd = torch.rand(b, 1, tq, tk, generator=torch.Generator().manual_seed(3)) > 0.4
    out["random"] = rnd | (j == 0)
    return out


@pytest.mark.parametrize("name", sorted(_masks(2, 6, 9)))
def test_bool_masks_mean_what_sdpa_means(name):
    q, k, v = _qkv()
    mask = _masks(2, 6, 9)[name]
    out, w = hf.fastattn_attention_forward(_Mod(), q, k, v, mask)
    assert w is None
    _close(out, _sdpa(q, k, v, mask))
    plan = hf.decompose_mask(mask, 2, 6, 9)
    assert (plan is None) == (name == "random")
    # The weights path gives the same output.
    out_w, w = hf.fastattn_attention_forward(_Mod(), q, k, v, mask, output_attentions=True)
    _close(out_w, out)
    assert w.shape == (2, 4, 6, 9)


def test_mask_none_is_sdpa_is_causal_top_left():
    q, k, v = _qkv(tq=5, tk=8)
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, None)
    _close(out, _sdpa(q, k, v, None, causal=True))
    # one query: no causal mask at all (SDPA's integration does the same)
    q1 = q[:, :, :1]
    out, _ = hf.fastattn_attention_forward(_Mod(), q1, k, v, None)
    _close(out, _sdpa(q1, k, v, None))
    # is_causal=False wins over module.is_causal
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, None, is_causal=False)
    _close(out, _sdpa(q, k, v, None))


def test_float_mask_position_bias_and_softcap():
    q, k, v = _qkv(tq=5, tk=5)
    bias = torch.randn(1, 4, 5, 5)
    fmask = torch.zeros(2, 1, 5, 5)
    fmask[1, ..., :2] = torch.finfo(torch.float32).min
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, fmask, position_bias=bias)
    _close(out, _sdpa(q, k, v, bias + fmask))
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, None, position_bias=bias)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    _close(out, _sdpa(q, k, v, bias.masked_fill(~causal, float("-inf"))))
    # An all-zero position bias (T5's cross-attention) adds nothing: the fused kernel serves it.
    zero = torch.zeros(1, 4, 5, 5)
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, fmask, position_bias=zero)
    _close(out, _sdpa(q, k, v, fmask))
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, None, position_bias=zero)
    _close(out, _sdpa(q, k, v, None, causal=True))
    if _dispatch.unavailable_reason("cpu", "cpu") is None:
        assert fastattn.last_backend("attention") == "cpu"
    out, _ = hf.fastattn_attention_forward(_Mod(), q, k, v, None, softcap=2.0, is_causal=False)
    ref = fastattn.ops.attention.attention_reference(
        q.double(), k.double(), v.double(), softcap=2.0
    )
    _close(out, ref.transpose(1, 2).float())


def test_packed_sequences_kept_apart():
    q, k, v = _qkv(b=1, tq=7, tk=7)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out, _ = hf.fastattn_attention_forward(
        _Mod(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4
    )
    seg = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    mask = (seg[:, None] == seg[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    _close(out, _sdpa(q, k, v, mask[None, None]))
    with pytest.raises(ValueError, match="cu_seq_lens"):
        hf.fastattn_attention_forward(_Mod(), *_qkv(b=2, tq=7, tk=7), None, cu_seq_lens_q=cu)


@pytest.mark.parametrize("kwarg", ["s_aux", "sinks", "some_future_kwarg"])
def test_unknown_kwargs_are_refused_not_dropped(kwarg):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=kwarg):
        hf.fastattn_attention_forward(_Mod(), q, k, v, None, **{kwarg: torch.zeros(4)})
    # harmless or absent ones pass
    hf.fastattn_attention_forward(_Mod(), q, k, v, None, position_ids=torch.arange(6), s_aux=None)


def test_mask_decomposition_is_cached_per_tensor(monkeypatch):
    q, k, v = _qkv()
    mask = _masks(2, 6, 9)["causal+3"]
    calls = []
    real = hf.decompose_mask
    monkeypatch.setattr(hf, "decompose_mask", lambda *a: calls.append(1) or real(*a))
    for _ in range(3):
        hf.fastattn_attention_forward(_Mod(), q, k, v, mask)
    assert len(calls) == 1
    mask.logical_not_().logical_not_()  # modified in place: analysed again
    hf.fastattn_attention_forward(_Mod(), q, k, v, mask)
    assert len(calls) == 2


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("make", [_llama, _mistral, _gemma2])
def test_compiled_patched_model_one_graph_no_recompiles(make):
    """torch.compile of a patched model traces into one graph and compiles once: a global the
    integration mutated per call (its call counter) made Dynamo recompile the model on every
    step, and the compiled patched model ran 3-5x slower than the compiled original."""
    import torch._dynamo

    torch._dynamo.reset()
    original, patched, _ = _pair(make())
    patched.train()
    compiled = torch.compile(patched, backend="eager", fullgraph=True)
    ids = torch.randint(3, V, (2, 12))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            patched.zero_grad(set_to_none=True)
            compiled(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in patched.named_parameters() if p.grad is not None}
    original.train()
    original(ids, labels=ids).loss.backward()
    for n, p in original.named_parameters():
        if p.grad is not None:
            _close(grads[n], p.grad)
    torch._dynamo.reset()
