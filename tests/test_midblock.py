"""Mid-block states (``blocks.{l}.resid_mid``, after the attention sublayer): the ``*_mid``
columns equal a computation by hand from a hook on the attention output added to the block
input, in both execution orders; blocks without a mid state leave them empty."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import depthprobe
from depthprobe.data import Windows
from tests.tiny_models import build_tiny, random_ids

MID = ["angular_distance_mid", "block_influence_mid", "activation_variance_mid", "activation_rms_mid",
       "max_abs_activation_mid", "logit_lens_loss_mid"]


def mid_by_hand(model, ids: torch.Tensor, sandwich: bool) -> dict[str, list[float]]:
    """m_l = x_l + attn(.) (Gemma 2: + post_attention_layernorm(attn(.))), from forward hooks on
    each block's input and its self_attn output; the metrics as plain formulas."""
    blocks = model.model.layers
    seen: dict = {}
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(("x", i), (a[0] if a else k["hidden_states"]).double()),
            with_kwargs=True))
        handles.append(block.self_attn.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("a", i), out[0])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        cols = {c: [] for c in MID}
        cap = getattr(model.config, "final_logit_softcapping", None)
        for i, block in enumerate(blocks):
            a = seen[("a", i)]
            a = block.post_attention_layernorm(a) if sandwich else a
            x = seen[("x", i)]
            mid = x + a.double()
            xt, mt = x.reshape(-1, x.shape[-1]), mid.reshape(-1, x.shape[-1])
            cos = F.cosine_similarity(xt, mt, dim=-1).clamp(-1, 1)
            cols["angular_distance_mid"].append(float((torch.arccos(cos) / math.pi).mean()))
            cols["block_influence_mid"].append(float(1 - cos.mean()))
            cols["activation_variance_mid"].append(float(mt.var(-1, unbiased=False).mean()))
            cols["activation_rms_mid"].append(float(mt.pow(2).mean(-1).sqrt().mean()))
            cols["max_abs_activation_mid"].append(float(mt.abs().max()))
            logits = model.lm_head(model.model.norm(mid.float()))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            cols["logit_lens_loss_mid"].append(float(loss))
    return cols


@pytest.mark.parametrize("family,sandwich", [("llama", False), ("gemma2", True)])
def test_mid_columns_equal_hooks_by_hand_in_both_orders(family, sandwich):
    model = build_tiny(family)
    ids = random_ids(3, 12)
    want = mid_by_hand(model, ids, sandwich)
    runs = {order: depthprobe.analyze(model, windows=Windows(ids, "random ids"), metrics="angular,variance,lens",
                                      batch_size=2, progress=False, options={"execution": order}).layers
            for order in ("batch", "layer")}
    for order, layers in runs.items():
        for column in MID:
            np.testing.assert_allclose(layers[column], want[column], rtol=1e-5, atol=1e-7, err_msg=f"{order} {column}")
    assert list(runs["batch"].columns) == list(runs["layer"].columns)


def test_parallel_block_has_no_mid_state():
    """Phi's MLP reads the normed block input, not x + attn: the columns are empty and the
    run says why (not an error)."""
    model = build_tiny("phi")
    result = depthprobe.analyze(model, windows=Windows(random_ids(2, 8), "r"), metrics="angular,lens", progress=False)
    assert result.layers["angular_distance_mid"].isna().all()
    assert result.layers["angular_distance"].notna().all()
    assert not result.summary["nonfinite"]
    assert any(n.startswith("angular_distance_mid: not applicable") for n in result.summary["notes"])


@pytest.mark.slow
def test_smollm2_mid_lens_and_angular_equal_hooks(smollm2):
    model, _ = smollm2
    ids = random_ids(1, 32, seed=3) * 7 + 100  # real-vocabulary ids
    want = mid_by_hand(model, ids, sandwich=False)
    got = depthprobe.analyze(model, windows=Windows(ids, "ids"), metrics="angular,variance,lens",
                             progress=False).layers
    for column in MID:
        np.testing.assert_allclose(got[column], want[column], rtol=1e-5, err_msg=column)


def test_orders_agree_where_the_mlp_reads_flattened_tokens():
    """OPT reshapes the stream to (B*T, d) before its MLP: the mid state is still found, and
    the layer-major store takes it back in the stream's shape."""
    model = build_tiny("opt")
    windows = Windows(random_ids(3, 10), "r")
    runs = [depthprobe.analyze(model, windows=windows, metrics="angular,variance,lens", batch_size=2, progress=False,
                               options={"execution": order}).layers for order in ("batch", "layer")]
    assert runs[0]["angular_distance_mid"].notna().all()
    for column in MID:
        np.testing.assert_allclose(runs[1][column], runs[0][column], rtol=1e-9, err_msg=column)
