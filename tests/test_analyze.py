"""analyze() against straightforward reference computations, on every family and real models."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

import depthprobe
from depthprobe.data import Windows
from tests import reference as ref
from tests.tiny_models import DECODER_FAMILIES, random_ids

ALL = "angular,variance,grad,lens"


def _check_against_reference(model, ids, result, rtol=1e-4, check_grad=True):
    stack = depthprobe.LayerStack.from_model(model)
    states, out = ref.block_states(model, stack.blocks, ids)
    L = len(stack)
    layers = result.layers
    assert list(layers["layer"]) == list(range(L))
    exp_ang = [ref.angle(states[i], states[i + 1]) for i in range(L)]
    np.testing.assert_allclose(layers["angular_distance"], exp_ang, rtol=rtol)
    np.testing.assert_allclose(
        layers["block_influence"], [ref.block_influence(states[i], states[i + 1]) for i in range(L)], rtol=rtol,
        atol=1e-9,
    )
    np.testing.assert_allclose(layers["activation_variance"], [ref.variance(states[i + 1]) for i in range(L)], rtol=rtol)
    np.testing.assert_allclose(layers["activation_rms"], [ref.rms(states[i + 1]) for i in range(L)], rtol=rtol)
    np.testing.assert_allclose(
        layers["max_abs_activation"], [float(states[i + 1].abs().max()) for i in range(L)], rtol=rtol
    )
    # the full Gromov matrix: row l, column n = angle(x_l, x_{l+n})
    matrix = result.angular_distance
    for layer in range(L):
        for n in range(1, L - layer + 1):
            assert matrix.loc[layer, n] == pytest.approx(ref.angle(states[layer], states[layer + n]), rel=rtol)
        assert all(math.isnan(matrix.loc[layer, n]) for n in range(L - layer + 1, L + 1))
    if stack.is_causal_lm:
        assert result.summary["base_loss"] == pytest.approx(ref.lm_loss(out.logits, ids), rel=rtol)
        if "logit_lens_loss" in layers:
            with torch.no_grad():
                lens = [ref.lm_loss(stack.logits(states[i + 1]), ids) for i in range(L)]
            np.testing.assert_allclose(layers["logit_lens_loss"], lens, rtol=rtol)
            # the last block's lens loss is the model's own loss
            assert layers["logit_lens_loss"].iloc[-1] == pytest.approx(result.summary["base_loss"], rel=1e-6)
        if check_grad:
            np.testing.assert_allclose(layers["grad_norm"], ref.block_grad_norms(model, stack.blocks, ids), rtol=rtol)


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_every_metric_matches_reference_on_tiny_family(family, tiny_dir):
    model, _ = depthprobe.load_model(str(tiny_dir(family)), device="cpu")
    ids = random_ids(6, 16)
    # batch_size 4 over 6 windows: two uneven batches exercise the streaming sums
    result = depthprobe.analyze(model, windows=Windows(ids, "random"), metrics=ALL, batch_size=4, progress=False)
    _check_against_reference(model, ids, result)
    layers = result.layers
    # sublayer gradient norms: where each sublayer owns disjoint parameters that cover the
    # block, total^2 = attn^2 + mlp^2
    stack = depthprobe.LayerStack.from_model(model)
    owned = {id(p) for k in ("attn", "mlp") for m in stack.sublayer_modules(0, k) for p in m.parameters()}
    if owned == {id(p) for p in stack.blocks[0].parameters()}:
        np.testing.assert_allclose(
            layers["grad_norm"] ** 2, layers["grad_norm_attn"] ** 2 + layers["grad_norm_mlp"] ** 2, rtol=1e-6
        )
    assert (layers[["grad_norm_attn", "grad_norm_mlp"]] > 0).all().all()
    # analyze leaves the model as it found it: no gradients, requires_grad restored
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_encoder_uses_cosine_drift_and_skips_grad(tiny_dir):
    model, _ = depthprobe.load_model(str(tiny_dir("bert")), device="cpu")
    ids = random_ids(4, 16)
    result = depthprobe.analyze(model, windows=Windows(ids, "random"), metrics=ALL, progress=False)
    assert result.summary["objective"] == "cosine_drift"
    assert result.summary["base_loss"] is None
    assert "grad_norm" not in result.layers.columns
    assert any(note.startswith("grad:") for note in result.summary["notes"])
    _check_against_reference(model, ids, result)
    states, out = ref.block_states(model, depthprobe.LayerStack.from_model(model).blocks, ids)
    final = out.last_hidden_state
    # mean over tokens of 1 - cos(x_{l+1}, final) is block_influence's formula on that pair
    drift = [ref.block_influence(states[i + 1], final) for i in range(len(states) - 1)]
    np.testing.assert_allclose(result.layers["logit_lens_loss"], drift, rtol=1e-4, atol=1e-12)
    assert result.layers["logit_lens_loss"].iloc[-1] == pytest.approx(0, abs=1e-9)


def _malloc_in_use():
    """Bytes the C allocator has handed out now (glibc ``mallinfo2``: small blocks + mmapped
    ones). Torch's CPU allocator takes its buffers from malloc, so this sees every tensor,
    which tracemalloc (Python objects only) does not."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    return lambda: (lambda m: m.uordblks + m.hblkhd)(libc.mallinfo2())


def test_memory_does_not_grow_with_windows():
    """Running state is per batch: the peak of the process's allocated memory during a pass,
    sampled at every block, is the same for 8 and 64 windows; a probe that kept every
    window's block outputs would add 56 windows' worth, and the same meter sees that."""
    from depthprobe.probes.hooks import watch_blocks
    from tests.tiny_models import build_tiny

    in_use = _malloc_in_use()
    model = build_tiny("llama")
    stack = depthprobe.LayerStack.from_model(model)
    seq_len, d, blocks = 64, model.config.hidden_size, len(stack)

    def growth(n: int, keep: list | None = None) -> int:
        base = in_use()
        peak = [base]
        hooks = [b.register_forward_hook(lambda *_: peak.__setitem__(0, max(peak[0], in_use()))) for b in stack.blocks]
        leak = watch_blocks(stack, lambda layer, x_in, x_out: keep.append(x_out.detach().clone()))
        try:
            with leak if keep is not None else contextlib.nullcontext():
                depthprobe.analyze(model, windows=Windows(random_ids(n, seq_len), "r"), metrics=ALL, batch_size=4,
                                   progress=False)
        finally:
            for hook in hooks:
                hook.remove()
        return peak[0] - base

    growth(8)  # first call: one-time allocations (kernels, caches)
    kept_states = (64 - 8) * seq_len * d * 4 * blocks  # bytes of 56 more windows' float32 block outputs
    assert growth(64) - growth(8) < kept_states / 4
    # the meter sees torch's allocator: a probe that keeps every block output is caught
    assert growth(64, []) - growth(8, []) > kept_states / 2


def test_save_and_load_roundtrip(tiny_dir, tmp_path):
    model, _ = depthprobe.load_model(str(tiny_dir("gpt2")), device="cpu")
    result = depthprobe.analyze(model, windows=Windows(random_ids(2, 16), "r"), metrics=ALL, progress=False)
    result.save(tmp_path)
    back = depthprobe.AnalysisResult.load(tmp_path)
    np.testing.assert_allclose(back.layers.to_numpy(), result.layers.to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(back.angular_distance.to_numpy(), result.angular_distance.to_numpy(), rtol=1e-9)
    for key in ("model", "num_layers", "num_tokens", "base_loss", "timings_s", "versions", "dtype", "device"):
        assert key in back.summary
    assert back.summary["base_perplexity"] == pytest.approx(math.exp(result.summary["base_loss"]))


@pytest.mark.slow
def test_smollm2_matches_reference(smollm2, calibration_file):
    model, tokenizer = smollm2
    result = depthprobe.analyze(
        model, tokenizer, text_file=calibration_file, num_sequences=4, seq_len=256, batch_size=2,
        metrics="angular,variance,grad", progress=False,
    )
    windows = depthprobe.make_windows(tokenizer, num_sequences=4, seq_len=256, text_file=calibration_file)
    assert result.summary["num_layers"] == 30 and result.summary["family"] == "llama"
    assert result.summary["num_tokens"] == 1024
    # real English prose: SmolLM2's perplexity is in the tens, not the vocabulary size
    assert 5 < result.summary["base_perplexity"] < 40
    _check_against_reference(model, windows.input_ids, result)


@pytest.mark.slow
def test_minilm_real_encoder(minilm, calibration_file):
    model, tokenizer = minilm
    result = depthprobe.analyze(
        model, tokenizer, text_file=calibration_file, num_sequences=2, seq_len=128, metrics=ALL, progress=False
    )
    windows = depthprobe.make_windows(tokenizer, num_sequences=2, seq_len=128, text_file=calibration_file)
    assert result.summary["num_layers"] == 6 and result.summary["objective"] == "cosine_drift"
    _check_against_reference(model, windows.input_ids, result)
