"""The demo GPT: kernels="fastattn" vs "torch" (float64 reference), state_dict, training, KV cache.

Run: PYTHONPATH=. python -m pytest tests/test_gpt.py -q
"""

from __future__ import annotations

import pytest
import torch

from fastattn.models.gpt import (
    GPT,
    CausalSelfAttention,
    GPTConfig,
    TorchCausalSelfAttention,
)

TINY = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)


def make(kernels: str, seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **over}), kernels=kernels)


def fresh_seed() -> int:
    """A new seed per run (fresh inputs), printed by pytest on failure via the assert message."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.filterwarnings("ignore:fastattn.nn")
def test_same_init_and_state_dict_loads_both_ways():
    a, b = make("torch", seed=3), make("fastattn", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = make("torch", seed=4)
    c.load_state_dict(sb)  # fastattn -> torch
    b.load_state_dict(make("torch", seed=5).state_dict())  # torch -> fastattn
    assert torch.equal(c.lm_head.weight, a.lm_head.weight)
    assert c.lm_head.weight is c.transformer.wte.weight  # tying survives loading
    # nanoGPT's scaled init of the projections into the residual stream
    std = a.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * TINY["n_layer"]) ** 0.5) < 0.003


def _errors(model: GPT, idx, targets, ref_sd):
    model.load_state_dict(ref_sd)
    logits, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    return logits.double(), loss.double(), grads


@pytest.mark.filterwarnings("ignore:fastattn.nn")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("T", [16, 7, 1])
def test_fastattn_matches_float64_reference_like_torch(bias, T):
    """tests/rule.py: |fastattn32 - ref64| <= 2 |torch32 - ref64| + floor, logits, loss, every grad."""
    seed = fresh_seed()
    ref = make("torch", seed=seed, bias=bias).double()
    sd = ref.state_dict()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 65, (3, T), generator=g)
    targets = torch.randint(0, 65, (3, T), generator=g)
    l64, loss64, g64 = _errors(ref, idx, targets, sd)
    t32 = _errors(make("torch", bias=bias), idx, targets, sd)
    f32 = _errors(make("fastattn", bias=bias), idx, targets, sd)
    pairs = [("logits", l64, t32[0], f32[0]), ("loss", loss64, t32[1], f32[1])]
    pairs += [(f"grad {n}", g64[n], t32[2][n], f32[2][n]) for n in g64]
    for name, r, t, f in pairs:
        err_t = (t - r).abs().max().item()
        err_f = (f - r).abs().max().item()
        floor = 1e-6 * max(1.0, r.abs().max().item())
        assert err_f <= 2 * err_t + floor, (
            f"{name}: fastattn err {err_f:.3g}, torch {err_t:.3g} (seed {seed})"
        )


@pytest.mark.filterwarnings("ignore:fastattn.nn")
def test_twenty_adamw_steps_match():
    models = {k: make(k, seed=1, dropout=0.0) for k in ("torch", "fastattn")}
    opts = {k: m.configure_optimizers(0.1, 3e-3, (0.9, 0.99)) for k, m in models.items()}
    g = torch.Generator().manual_seed(7)
    losses = {k: [] for k in models}
    for _ in range(20):
        x = torch.randint(0, 65, (4, 16), generator=g)
        y = (7 * x + 3) % 65  # a learnable bigram rule
        for k, m in models.items():
            _, loss = m(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            losses[k].append(loss.item())
    lt, lf = torch.tensor(losses["torch"]), torch.tensor(losses["fastattn"])
    assert lt[-1] < lt[0] - 0.5  # it learns
    torch.testing.assert_close(lf, lt, rtol=1e-4, atol=0)


@pytest.mark.filterwarnings("ignore:fastattn.nn")
def test_forward_without_targets_gives_last_position():
    m = make("fastattn")
    idx = torch.randint(0, 65, (2, 9))
    logits, loss = m(idx)
    full, _ = m(idx, idx)
    assert loss is None and logits.shape == (2, 1, 65)
    torch.testing.assert_close(logits[:, 0], full[:, -1])
    with pytest.raises(ValueError, match="longer than block_size"):
        m(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("attn_cls", [TorchCausalSelfAttention, CausalSelfAttention])
@pytest.mark.parametrize("t_new", [1, 3])
def test_cached_attention_is_bottom_right_aligned(attn_cls, t_new):
    """Queries appended to a cache see the cache and themselves causally: equal to the last
    rows of the full causal attention."""
    torch.manual_seed(0)
    attn = attn_cls(32, 4).eval()
    x = torch.randn(2, 11, 32)
    full = attn(x)
    _, past = attn(x[:, :-t_new], use_cache=True)
    y, (k, v) = attn(x[:, -t_new:], past_kv=past, use_cache=True)
    torch.testing.assert_close(y, full[:, -t_new:], rtol=1e-5, atol=1e-6)
    if attn_cls is TorchCausalSelfAttention:  # the cache layout is the module's own business
        assert k.shape == v.shape == (2, 4, 11, 8)


@pytest.mark.filterwarnings("ignore:fastattn.nn")
@pytest.mark.parametrize("kernels", ["torch", "fastattn"])
def test_generate_with_cache_equals_without(kernels):
    m = make(kernels, seed=2)
    prompt = torch.randint(0, 65, (2, 3), generator=torch.Generator().manual_seed(0))
    # 3 + 25 tokens: crosses block_size 16, so the window slides and the cache is rebuilt
    a = m.generate(prompt, 25, top_k=1, use_cache=True)
    b = m.generate(prompt, 25, top_k=1, use_cache=False)
    assert a.shape == (2, 28) and torch.equal(a[:, :3], prompt)
    assert torch.equal(a, b)
    # sampling with a seeded generator is reproducible; the model is left in training mode
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    s1 = m.generate(prompt, 10, temperature=0.8, top_k=5, generator=g1)
    s2 = m.generate(prompt, 10, temperature=0.8, top_k=5, generator=g2, use_cache=False)
    assert torch.equal(s1, s2) and m.training


def test_configure_optimizers_decays_2d_params_only():
    m = make("torch")
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))
    assert m.num_params() == m.num_params(non_embedding=False) - 16 * 32


def test_configure_optimizers_fused_where_supported(monkeypatch):
    """Fused AdamW on the CPU too (torch >= 2.4), the same for both kernel kinds; the default
    AdamW where the fused kernel is missing for the parameters' device/dtype."""
    from fastattn.models import gpt

    idx = torch.randint(0, 65, (2, 16))
    for kernels in ("torch", "fastattn"):
        m = make(kernels)
        opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
        assert opt.defaults["fused"] is True
        m(idx, idx)[1].backward()
        opt.step()  # torch checks fused support here, at the first step with gradients
    monkeypatch.setattr(gpt, "_fused_adamw_works", lambda device, dtype: False)
    assert not make("torch").configure_optimizers(0.1, 1e-3, (0.9, 0.95)).defaults["fused"]


@pytest.mark.filterwarnings("ignore:fastattn.nn")
def test_checkpoint_round_trip(tmp_path):
    m = make("fastattn", seed=9)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    n = make("torch", seed=10)
    n.load_state_dict(torch.load(tmp_path / "m.pt"))
    idx = torch.randint(0, 65, (2, 16))
    torch.testing.assert_close(n(idx, idx)[0], m(idx, idx)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:fastattn.nn")
def test_bfloat16_autocast_runs_and_stays_close():
    m = make("fastattn", seed=4)
    idx = torch.randint(0, 65, (2, 16))
    _, loss32 = m(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = m(idx, idx)
    loss16.backward()
    assert loss16.dtype == torch.float32 and abs(loss16.item() - loss32.item()) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer must be >= 1"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match='kernels must be "fastattn" or "torch"'):
        GPT(GPTConfig(**TINY), kernels="cuda")
