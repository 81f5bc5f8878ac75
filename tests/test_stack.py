"""LayerStack finds the parts of every family and edits the block list around the model's own forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import depthprobe
from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack
from tests import reference as ref
from tests.tiny_models import DECODER_FAMILIES, FAMILY_NAMES, build_tiny, random_ids


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_finds_parts_of_every_family(family):
    model = build_tiny(family)
    stack = LayerStack.from_model(model)
    assert stack.family == family
    assert len(stack) == model.config.num_hidden_layers
    assert stack.embed is not None
    assert stack.is_causal_lm == (family != "bert")
    for kind in ("attn", "mlp"):
        assert stack.sublayer_modules(0, kind), f"{family}: no {kind} sublayer modules"
        assert stack.sublayer_output_module(0, kind) is not None


@pytest.mark.parametrize("family", DECODER_FAMILIES)
def test_logits_from_last_block_reproduce_model(family):
    model = build_tiny(family)
    stack = LayerStack.from_model(model)
    ids = random_ids(2, 12)
    states, out = ref.block_states(model, stack.blocks, ids)
    with torch.no_grad():
        torch.testing.assert_close(stack.logits(states[-1]), out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_keep_blocks_equals_deleting_blocks(family):
    model = build_tiny(family)
    stack = LayerStack.from_model(model)
    ids = random_ids(2, 12)
    keep = [0, 2, 3]
    with torch.no_grad(), stack.keep_blocks(keep):
        got = model(input_ids=ids)
    # naive: a deep copy of the model with block 1 deleted from its ModuleList
    import copy

    naive = copy.deepcopy(model)
    naive_stack = LayerStack.from_model(naive)
    parent, attr = naive_stack._parent_and_attr()
    setattr(parent, attr, nn.ModuleList([naive_stack.blocks[i] for i in keep]))
    naive.config.num_hidden_layers = len(keep)
    if getattr(naive.config, "layer_types", None):
        naive.config.layer_types = [model.config.layer_types[i] for i in keep]
    with torch.no_grad():  # no KV cache: the naive copy's layer_idx values still have gaps
        want = naive(input_ids=ids, use_cache=False) if family != "bert" else naive(input_ids=ids)
    key = "logits" if hasattr(got, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-5, atol=1e-6)
    # and everything is restored afterwards
    assert len(stack.model.get_submodule(stack.blocks_path)) == 4
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_start_at_resumes_from_cached_input(family):
    model = build_tiny(family)
    stack = LayerStack.from_model(model)
    ids = random_ids(2, 12)
    states, out = ref.block_states(model, stack.blocks, ids)
    with torch.no_grad(), stack.start_at(2, states[2]):
        got = model(input_ids=ids)
    key = "logits" if hasattr(got, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(got, key), getattr(out, key), rtol=1e-5, atol=1e-6)


def test_sliding_window_types_follow_kept_blocks():
    """Qwen2 indexes config.layer_types by loop position: dropping a block must keep each
    remaining block's own attention type."""
    model = build_tiny("qwen2")
    stack = LayerStack.from_model(model)
    original = list(model.config.layer_types)
    seen = []
    with stack.keep_blocks([1, 3]):
        seen = list(model.config.layer_types)
    assert seen == [original[1], original[3]]
    assert model.config.layer_types == original


class _Custom(nn.Module):
    """An unknown architecture: blocks in `trunk.stages`."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.trunk = nn.Module()
        self.trunk.stages = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.trunk.extras = nn.ModuleList([nn.ReLU(), nn.Tanh()])


def test_generic_fallback_and_layers_path_override():
    model = _Custom()
    stack = LayerStack.from_model(model)
    assert stack.blocks_path == "trunk.stages" and len(stack) == 3 and stack.family == "generic"
    assert LayerStack.from_model(model, layers_path="trunk.stages").blocks is model.trunk.stages


def test_unknown_structure_suggests_layers_path():
    with pytest.raises(DepthprobeError, match="--layers-path"):
        LayerStack.from_model(nn.Sequential(nn.Linear(2, 2)))


def test_bad_layers_path_is_a_user_error():
    with pytest.raises(DepthprobeError, match="does not name"):
        LayerStack.from_model(build_tiny("llama"), layers_path="model.nope")


def test_check_index():
    stack = LayerStack.from_model(build_tiny("llama"))
    assert stack.check_index(-1) == 3
    with pytest.raises(DepthprobeError, match="out of range"):
        stack.check_index(4)


def test_analyze_with_layers_path_on_known_model(tiny_dir):
    model, _ = depthprobe.load_model(str(tiny_dir("llama")), device="cpu")
    r = depthprobe.analyze(
        model, windows=depthprobe.Windows(random_ids(2, 8), "r"), metrics="angular", layers_path="model.layers",
        progress=False,
    )
    assert len(r.layers) == 4


def test_slice_layer_config_one_rule_for_keep_and_remove():
    """Per-block lists keep the kept entries, index lists are renumbered, unrelated dicts and
    token-id lists stay, first_k_dense_replace counts the kept dense blocks; keep_blocks restores."""
    from transformers import LlamaConfig

    from depthprobe.model.stack import slice_layer_config

    config = LlamaConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         vocab_size=128)
    config.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    config.mlp_only_layers = [1, 3]
    config.moe_layers = [0, 1, 2, 3]
    config.no_rope_layers = [1, 0, 1, 1]
    config.first_k_dense_replace = 2
    config.eos_token_id = [1, 2, 3, 4]
    saved = slice_layer_config(config, [0, 2, 3], 4)
    assert config.num_hidden_layers == 3
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert config.mlp_only_layers == [2]  # old block 3 is now block 2; block 1 is gone
    assert config.moe_layers == [0, 1, 2]
    assert config.no_rope_layers == [1, 1, 1]
    assert config.first_k_dense_replace == 1  # of the first two blocks only block 0 is kept
    assert config.eos_token_id == [1, 2, 3, 4]
    assert config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert saved["mlp_only_layers"] == [1, 3] and saved["num_hidden_layers"] == 4


def test_keep_blocks_restores_config_and_layer_idx():
    model = build_tiny("qwen2")
    stack = LayerStack.from_model(model)
    before = (model.config.num_hidden_layers, list(model.config.layer_types))
    idx = [m.layer_idx for m in stack.blocks.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    with stack.keep_blocks([1, 3]):
        assert model.config.num_hidden_layers == 2
        assert model.config.layer_types == [before[1][1], before[1][3]]
        assert [b.self_attn.layer_idx for b in stack._parent_and_attr()[0].layers] == [0, 1]
    assert (model.config.num_hidden_layers, list(model.config.layer_types)) == before
    assert [m.layer_idx for m in stack.blocks.modules() if isinstance(getattr(m, "layer_idx", None), int)] == idx


def test_discovery_classifies_block_children_by_type_then_name():
    from depthprobe.model.discover import classify

    assert classify("post_attention_layernorm", nn.LayerNorm(4)) == "norm"
    assert classify("resid_attn_dropout", nn.Dropout(0.1)) is None  # a name with "attn" is not an attention
    assert classify("self_attn", nn.Linear(4, 4)) == "attn"
    assert classify("feed_forward", nn.Linear(4, 4)) == "mlp"
    assert classify("mixer", nn.Linear(4, 4)) == "mixer"
    assert classify("scale", nn.Linear(4, 4)) == "other"
