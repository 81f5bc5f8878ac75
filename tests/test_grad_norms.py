"""Gradient norms reduced as the backward produces each gradient, then freed: equal to the
norms of the gradients held to the end, with one batch and with several."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import depthprobe
from depthprobe.data import Windows
from depthprobe.probes import metrics as M
from tests.tiny_models import build_tiny, random_ids


def held_gradient_norms(model, blocks, ids: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """Straightforward: backward every batch into ``.grad`` (mean-token loss over all
    windows), keep all gradients, then per block the norm of the concatenated gradients."""
    model.zero_grad(set_to_none=True)
    total = ids.shape[0] * (ids.shape[1] - 1)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size]
        out = model(input_ids=batch, labels=batch, use_cache=False)
        (out.loss * batch.shape[0] * (batch.shape[1] - 1) / total).backward()

    def norm(params) -> float:
        return float(torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm())

    result = {
        "grad_norm": [norm(b.parameters()) for b in blocks],
        # a sublayer is its pre-norm and its module (Llama)
        "grad_norm_attn": [norm([*b.input_layernorm.parameters(), *b.self_attn.parameters()]) for b in blocks],
        "grad_norm_mlp": [norm([*b.post_attention_layernorm.parameters(), *b.mlp.parameters()]) for b in blocks],
    }
    model.zero_grad(set_to_none=True)
    return {k: np.asarray(v) for k, v in result.items()}


@contextlib.contextmanager
def live_gradient_bytes(params):
    """Record, each time a gradient is accumulated, the bytes of all gradients alive then
    (hooks registered first run first: they see the state before depthprobe's reduction)."""
    peaks: list[int] = []

    def hook(_):
        peaks.append(sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    try:
        yield peaks
    finally:
        for h in handles:
            h.remove()


@pytest.mark.slow
def test_smollm2_four_batches_equal_held_gradients(smollm2):
    model, tok = smollm2
    windows = depthprobe.make_windows(tok, num_sequences=4, seq_len=32)
    blocks = model.model.layers
    expected = held_gradient_norms(model, blocks, windows.input_ids, batch_size=1)
    result = depthprobe.analyze(model, windows=windows, metrics="grad", batch_size=1, progress=False)
    for column, values in expected.items():
        np.testing.assert_allclose(result.layers[column], values, rtol=1e-6)
    # the mean over 4 batches differs from any single batch: the sums were really kept
    one = held_gradient_norms(model, blocks, windows.input_ids[:1], batch_size=1)
    assert np.abs(one["grad_norm"] / expected["grad_norm"] - 1).max() > 1e-2
    assert all(p.grad is None for p in model.parameters())


def test_one_batch_holds_one_gradient_at_a_time():
    model = build_tiny("llama", num_hidden_layers=3)
    ids = random_ids(2, 16)
    block_params = list(model.model.layers.parameters())
    expected = held_gradient_norms(model, model.model.layers, ids, batch_size=2)
    with live_gradient_bytes(block_params) as live:
        result = depthprobe.analyze(model, windows=Windows(ids, "random"), metrics="grad", batch_size=2,
                                    progress=False)
    np.testing.assert_allclose(result.layers["grad_norm"], expected["grad_norm"], rtol=1e-6)
    largest = max(p.numel() * p.element_size() for p in block_params)
    everything = sum(p.numel() * p.element_size() for p in block_params)
    assert len(live) == len(block_params)  # every gradient seen once
    assert max(live) <= largest < everything / 4  # never more than the one just produced


def test_several_batches_keep_sums_then_free_at_the_last():
    model = build_tiny("llama", num_hidden_layers=3)
    ids = random_ids(6, 16)
    block_params = list(model.model.layers.parameters())
    expected = held_gradient_norms(model, model.model.layers, ids, batch_size=2)
    with live_gradient_bytes(block_params) as live:
        result = depthprobe.analyze(model, windows=Windows(ids, "random"), metrics="grad", batch_size=2,
                                    progress=False)
    for column, values in expected.items():
        np.testing.assert_allclose(result.layers[column], values, rtol=1e-6)
    everything = sum(p.numel() * p.element_size() for p in block_params)
    n = len(block_params)
    assert len(live) == 3 * n
    assert live[2 * n - 1] == everything  # the running sums after batch 2
    # the last backward: the sums of parameters not yet reached, plus the one just finished
    assert max(live[2 * n:]) == everything and live[-1] < everything / 4
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_squared_l2_chunks_equal_numpy(dtype):
    t = torch.randn(37, 11).to(dtype)
    expected = float((t.double().numpy() ** 2).sum())
    for chunk in (1, 5, 407, 1 << 21):  # chunks that split rows, and one chunk for everything
        assert float(M.squared_l2(t, chunk=chunk)) == pytest.approx(expected, rel=1e-13)
