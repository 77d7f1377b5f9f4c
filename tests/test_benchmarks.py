"""What the benchmarks read off a run: a renamed op must not silently read as 0 ms."""

from __future__ import annotations

import pytest
import torch

from fastattn import _dispatch

pytestmark = pytest.mark.skipif(
    _dispatch.unavailable_reason("cpu", "cpu") is not None, reason="cpu backend not usable here"
)


def test_training_budget_sees_every_kernel_family():
    from benchmarks import training
    from fastattn.models.gpt import GPTConfig

    cfg = training.Config(
        "tiny", GPTConfig(block_size=16, vocab_size=65, n_layer=1, n_head=2, n_embd=32), 2
    )
    step = training.make_step(cfg, "fastattn", torch.float32, False)
    step()
    ms = training.shares(step, steps=1)
    assert set(ms) == set(training.FAMILIES)
    for family in ("GEMM", "attention", "layer_norm", "bias_gelu", "AdamW"):
        assert ms[family] > 0, f"{family}: no profiler event matched {training.FAMILIES[family]}"
