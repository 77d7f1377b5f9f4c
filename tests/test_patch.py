"""fastattn.patch / unpatch on torch Transformer layers and a Hugging Face GPT-2."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastattn
from fastattn import _dispatch
from tests.rule import assert_rule


def _fwd_bwd(model, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(*args, **kwargs)
    out = getattr(out, "logits", out)  # Hugging Face model outputs
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out) * 0.01 + torch.linspace(0, 1, out.numel()).view_as(out))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _compare(original, patched, make_inputs, **kwargs):
    """patched (float32) vs original (float32) vs original in float64, by tests/rule.py's rule."""
    ref64 = copy.deepcopy(original).double()
    args32 = make_inputs(torch.float32)
    out, grads = _fwd_bwd(patched, *args32, **kwargs)
    t_out, t_grads = _fwd_bwd(original, *args32, **kwargs)
    r_out, r_grads = _fwd_bwd(ref64, *make_inputs(torch.float64), **kwargs)
    assert_rule("output", out, t_out, r_out)
    assert grads.keys() == t_grads.keys()
    for name in grads:
        assert_rule(f"grad {name}", grads[name], t_grads[name], r_grads[name])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_transformer_encoder(batch_first, norm_first, training):
    layer = nn.TransformerEncoderLayer(
        d_model=32,
        nhead=4,
        dim_feedforward=64,
        dropout=0.0,
        activation="gelu",
        batch_first=batch_first,
        norm_first=norm_first,
    )
    original = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).train(training)
    patched = copy.deepcopy(original)
    report = fastattn.patch(patched)
    assert report.count("fastattn.nn.LayerNorm") == 4
    assert report.count("fastattn.nn.MultiheadAttention") == 2
    assert report.count("fastattn.nn.GELU") == 2
    B, T = 3, 11
    x = torch.randn(B, T, 32) if batch_first else torch.randn(T, B, 32)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 7:] = True  # the second sequence is 7 long
    pad[2, 4:] = True
    _dispatch._last.clear()
    _compare(original, patched, lambda dt: (x.to(dt),), src_key_padding_mask=pad)
    # The patched model really ran fastattn's attention and LayerNorm.
    assert _dispatch.last_backend("attention") is not None
    assert _dispatch.last_backend("layer_norm") is not None


def test_transformer_decoder_layer_causal():
    original = nn.TransformerDecoderLayer(
        d_model=24, nhead=3, dim_feedforward=48, dropout=0.0, batch_first=True
    )
    patched = copy.deepcopy(original)
    fastattn.patch(patched)
    T, S = 9, 13
    tgt, memory = torch.randn(2, T, 24), torch.randn(2, S, 24)
    mask = nn.Transformer.generate_square_subsequent_mask(T)
    _compare(
        original, patched, lambda dt: (tgt.to(dt), memory.to(dt)), tgt_mask=mask, tgt_is_causal=True
    )


def test_patch_is_idempotent_and_unpatch_restores():
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True), 2
    ).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x)
    first = fastattn.patch(model)
    assert first.replaced
    assert not fastattn.patch(model).replaced
    assert isinstance(model.layers[0].norm1, fastattn.nn.LayerNorm)
    undo = fastattn.unpatch(model)
    assert len(undo.replaced) >= 3
    assert type(model.layers[0].norm1) is nn.LayerNorm
    assert type(model.layers[0].self_attn) is nn.MultiheadAttention
    assert model.layers[0].activation is torch.nn.functional.gelu
    assert model.layers[0].activation_relu_or_gelu == 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_state_dict_round_trip():
    original = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4))
    patched = copy.deepcopy(original)
    fastattn.patch(patched)
    for p in patched.parameters():
        p.data.normal_()
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(patched.state_dict())
    x = torch.randn(5, 8)
    torch.testing.assert_close(fresh(x), patched(x), rtol=1e-5, atol=1e-5)
    assert patched.state_dict().keys() == original.state_dict().keys()


def test_patch_keeps_device_dtype_mode():
    model = nn.Sequential(nn.LayerNorm(8), nn.GELU()).to(torch.bfloat16).eval()
    fastattn.patch(model)
    assert not model.training and model[0].weight.dtype == torch.bfloat16
    y = model(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_unsupported_mha_is_left_alone():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    report = fastattn.patch(model)
    assert type(model.attn) is nn.MultiheadAttention
    assert report.left and "add_bias_kv" in report.left[0][2]


def test_report_entries():
    model = nn.Sequential(nn.LayerNorm(8), nn.GELU())
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    report = fastattn.patch(model)
    kinds = [(e.name, e.kind, e.action) for e in report.entries]
    assert kinds == [
        ("0", "layer_norm", "replaced"),
        ("1", "gelu", "replaced"),
        ("attn", "multihead_attention", "left"),
    ]
    assert report.layers(action="left")[0].reason.startswith("add_bias_kv")
    text = str(report)
    assert text.splitlines()[0] == "replaced 2 module(s), left 1"
    assert "0: torch.nn.LayerNorm -> fastattn.nn.LayerNorm" in text
    undo = fastattn.unpatch(model)
    assert {e.action for e in undo.entries} == {"restored"}


def _rms_model():
    model = nn.Sequential(
        nn.Linear(8, 24),
        nn.RMSNorm(24, eps=1e-6),
        nn.GELU(),
        nn.Unflatten(-1, (3, 8)),
        nn.RMSNorm((3, 8)),
    )
    with torch.no_grad():  # non-trivial weights (they start at 1)
        for i in (1, 4):
            model[i].weight.normal_(1.0, 0.5)
    return model


def test_torch_rms_norm_swapped_within_the_rule():
    original = _rms_model()
    patched = copy.deepcopy(original)
    report = fastattn.patch(patched)
    assert [(e.name, e.kind, e.action) for e in report.layers("rms_norm")] == [
        ("1", "rms_norm", "replaced"),
        ("4", "rms_norm", "replaced"),
    ]
    assert report.count("fastattn.nn.RMSNorm") == 2
    assert type(patched[1]) is fastattn.nn.RMSNorm and patched[4].normalized_shape == (3, 8)
    x = torch.randn(5, 7, 8)
    _dispatch._last.clear()
    _compare(original, patched, lambda dt: (x.to(dt),))
    assert _dispatch.last_backend("rms_norm") is not None


def test_torch_rms_norm_patch_twice_state_dict_and_unpatch():
    model = _rms_model()
    weight = model[1].weight
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model(x)
    assert fastattn.patch(model).count("fastattn.nn.RMSNorm") == 2
    assert not fastattn.patch(model).layers("rms_norm")  # already patched: nothing more
    assert model[1].weight is weight  # the same parameter, not a copy
    fresh = _rms_model()
    fresh.load_state_dict(model.state_dict())
    assert fresh.state_dict().keys() == model.state_dict().keys()
    undo = fastattn.unpatch(model)
    assert ("1", "RMSNorm", "RMSNorm") in undo.replaced
    assert type(model[1]) is nn.RMSNorm and type(model[4]) is nn.RMSNorm
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    assert fastattn.patch(model, rms_norm=False).count("fastattn.nn.RMSNorm") == 0


def test_import_does_not_need_transformers():
    code = "import sys, fastattn; fastattn.patch; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_argument():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastattn.patch("not a model")


# ----------------------------------------------------------------------------- Hugging Face
transformers = pytest.importorskip("transformers")


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        vocab_size=97,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_hf_gpt2_logits_and_grads():
    original = _gpt2()
    patched = copy.deepcopy(original)
    report = fastattn.patch(patched)
    assert patched.config._attn_implementation == "fastattn"
    assert report.count("fastattn.nn.LayerNorm") == 5
    assert any("GELU" in to for _, _, to in report.replaced)
    ids = torch.randint(0, 97, (2, 19))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :5] = 0  # left padding on the second sequence
    _dispatch._last.clear()
    _compare(original, patched, lambda dt: (), input_ids=ids, attention_mask=mask)
    assert _dispatch.last_backend("attention") is not None


def test_hf_gpt2_training_and_generation():
    original = _gpt2()
    patched = copy.deepcopy(original)
    fastattn.patch(patched)
    ids = torch.randint(0, 97, (4, 24))
    losses = []
    for model in (original, patched):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        run = []
        for _ in range(4):
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    torch.testing.assert_close(
        torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5
    )
    prompt = torch.randint(0, 97, (1, 5))
    outs = []
    for model in (original, patched):
        model.eval()
        outs.append(
            model.generate(
                prompt,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                attention_mask=torch.ones_like(prompt),
            )
        )
    assert torch.equal(outs[0], outs[1])


def test_hf_unpatch_restores_attention():
    model = _gpt2()
    before = model.config._attn_implementation
    report = fastattn.patch(model)
    layers = report.layers("attention", "replaced")
    assert [e.name for e in layers] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(e.after == "GPT2Attention[fastattn]" for e in layers)
    # each layer says which backend serves its plain forward (causal + padding) here
    assert all(e.runtime[0].startswith("causal attention, padding: ") for e in layers)
    assert not fastattn.patch(model).layers("attention", "replaced")  # idempotent
    undo = fastattn.unpatch(model)
    assert model.config._attn_implementation == before
    assert any(e.kind == "config" and e.after == repr(before) for e in undo.entries)
    assert type(model.transformer.h[0].mlp.act).__name__ != "GELU"


def test_hf_t5_nested_configs_switched_and_restored():
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4
    )
    model = transformers.T5Model(cfg)
    configs = [model.config, model.encoder.config, model.decoder.config]
    assert len({id(c) for c in configs}) == 3  # the stacks keep their own copies
    before = [c._attn_implementation for c in configs]
    fastattn.patch(model)
    assert [c._attn_implementation for c in configs] == ["fastattn"] * 3
    fastattn.unpatch(model)
    assert [c._attn_implementation for c in configs] == before


def test_hf_model_without_attention_registry_is_reported_left():
    class Tiny(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    model = Tiny(transformers.PretrainedConfig())
    report = fastattn.patch(model)
    assert report.left and "AttentionInterface" in report.left[0][2]
    assert model.config._attn_implementation != "fastattn"
