"""The named families: where each keeps its parts, for what inspection cannot infer.

:mod:`depthprobe.model.discover` finds blocks, sublayers and norms of any model by
inspecting module names, types and data flow. This table is the tested source of truth for
the named families (``tests/test_stack.py`` asserts that discovery agrees with it) and holds
what inspection cannot see: the base-model attribute, norm placement for reports, and the
residual-stream readers/writers that ``depthprobe convert`` folds (:class:`StreamSpec`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamSpec:
    """How a Pre-LN family reads and writes its residual stream (used by ``depthprobe.convert``).

    Block-relative paths unless said otherwise. ``readers`` maps each LayerNorm in a block to
    the linears that read its output (a parallel-residual block simply has two norms that read
    the same stream, or one norm that feeds both sublayers). ``writers`` are the linears whose
    outputs are added into the stream. ``embeds`` (relative to the base model) are embeddings
    added into the stream; one narrower than the stream (OPT's ``word_embed_proj_dim``) is not
    in the stream itself and reaches it through ``base_writers`` (OPT's ``project_in``).
    ``final_reader`` (relative to the base model) is the linear the final norm feeds when it
    is not the LM head (OPT's ``project_out``). ``pre_ln`` lists ``(config attribute, value
    it must hold, why a model without it cannot convert)`` for families whose blocks are only
    Pre-LN with LayerNorm under some settings (OPT ``do_layer_norm_before=True``).
    """

    readers: tuple[tuple[str, tuple[str, ...]], ...]
    writers: tuple[str, ...]
    embeds: tuple[str, ...]
    base_writers: tuple[str, ...] = ()
    final_reader: str | None = None
    pre_ln: tuple[tuple[str, object, str], ...] = ()


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts, as paths relative to its base model.

    ``base`` is the attribute that holds the base model inside the ``*ForCausalLM`` wrapper
    (absent when the user loaded the base model itself). ``attn`` and ``mlp`` name the
    modules inside one block that make up each sublayer (its input norm included), used for
    ``grad_norm_attn`` / ``grad_norm_mlp`` and sublayer drops; ``attn_out`` / ``mlp_out``
    name the module whose output is the sublayer's contribution (zeroed to drop it).
    """

    base: str
    blocks: str
    embed: str
    final_norm: str | None
    head: str | None = "lm_head"
    attn: tuple[str, ...] = ("input_layernorm", "self_attn")
    mlp: tuple[str, ...] = ("post_attention_layernorm", "mlp")
    attn_out: str | None = "self_attn"
    mlp_out: str | None = "mlp"
    #: positional ("pre", "post", "peri", "parallel") norm placement, for reports
    norm_placement: str = "pre"
    extra_per_layer_config: tuple[str, ...] = ()
    #: for Pre-LN (LayerNorm) families: who reads and writes the residual stream
    stream: StreamSpec | None = None


_POST_LN_REFUSAL = (
    "is Post-LN: the residual stream is normalized in place, so there is no Pre-RMSNorm equivalent; "
    "only Pre-LN models convert"
)

_LLAMA_LIKE = Family(base="model", blocks="layers", embed="embed_tokens", final_norm="norm")

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": Family(
        base="model", blocks="layers", embed="embed_tokens", final_norm="norm", extra_per_layer_config=("layer_types",)
    ),
    "qwen3": Family(
        base="model", blocks="layers", embed="embed_tokens", final_norm="norm", extra_per_layer_config=("layer_types",)
    ),
    "gemma2": Family(
        base="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn=("input_layernorm", "self_attn", "post_attention_layernorm"),
        mlp=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norm_placement="peri",
        extra_per_layer_config=("layer_types",),
    ),
    "olmo2": Family(
        base="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="norm",
        attn=("self_attn", "post_attention_layernorm"),
        mlp=("mlp", "post_feedforward_layernorm"),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norm_placement="peri-out",
    ),
    "phi": Family(
        base="model",
        blocks="layers",
        embed="embed_tokens",
        final_norm="final_layernorm",
        attn=("self_attn",),
        mlp=("mlp",),
        norm_placement="parallel",
        stream=StreamSpec(
            readers=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),),
            writers=("self_attn.dense", "mlp.fc2"),
            embeds=("embed_tokens",),
        ),
    ),
    "gpt2": Family(
        base="transformer",
        blocks="h",
        embed="wte",
        final_norm="ln_f",
        attn=("ln_1", "attn"),
        mlp=("ln_2", "mlp"),
        attn_out="attn",
        stream=StreamSpec(
            readers=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
            writers=("attn.c_proj", "mlp.c_proj"),
            embeds=("wte", "wpe"),
        ),
    ),
    "gpt_neox": Family(
        base="gpt_neox",
        blocks="layers",
        embed="embed_in",
        final_norm="final_layer_norm",
        attn=("input_layernorm", "attention"),
        mlp=("post_attention_layernorm", "mlp"),
        attn_out="attention",
        stream=StreamSpec(
            readers=(
                ("input_layernorm", ("attention.query_key_value",)),
                ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
            ),
            writers=("attention.dense", "mlp.dense_4h_to_h"),
            embeds=("embed_in",),
        ),
    ),
    "opt": Family(
        base="model.decoder",
        blocks="layers",
        embed="embed_tokens",
        final_norm="final_layer_norm",
        attn=("self_attn_layer_norm", "self_attn"),
        mlp=("final_layer_norm", "fc1", "fc2"),
        mlp_out="fc2",
        stream=StreamSpec(
            readers=(
                ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                ("final_layer_norm", ("fc1",)),
            ),
            writers=("self_attn.out_proj", "fc2"),
            embeds=("embed_tokens", "embed_positions"),
            base_writers=("project_in",),
            final_reader="project_out",
            pre_ln=(("do_layer_norm_before", True, _POST_LN_REFUSAL),),
        ),
    ),
    "bert": Family(
        base="bert",
        blocks="encoder.layer",
        embed="embeddings",
        final_norm=None,
        head=None,
        attn=("attention",),
        mlp=("intermediate", "output"),
        attn_out="attention.output.dense",
        mlp_out="output.dense",
        norm_placement="post",
    ),
}
FAMILIES["roberta"] = dataclasses.replace(FAMILIES["bert"], base="roberta")
# depthprobe's own trainer model (depthprobe.train.model): norms absent from a placement
# are nn.Identity, so every name exists; the contribution of a sublayer is its norm_out.
FAMILIES["depthprobe_lm"] = Family(
    base="model",
    blocks="layers",
    embed="embed_tokens",
    final_norm="norm",
    attn=("attn_norm_in", "self_attn", "attn_norm_out", "attn_norm_post"),
    mlp=("mlp_norm_in", "mlp", "mlp_norm_out", "mlp_norm_post"),
    attn_out="attn_norm_out",
    mlp_out="mlp_norm_out",
    norm_placement="config",  # read from config.norm_placement
    stream=StreamSpec(  # convertible when trained with --norm pre and LayerNorm
        readers=(
            ("attn_norm_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("mlp_norm_in", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        writers=("self_attn.o_proj", "mlp.down_proj"),
        embeds=("embed_tokens",),
        pre_ln=(
            ("norm_type", "layer", "already uses RMSNorm; there is nothing to convert"),
            ("norm_placement", "pre", "is not Pre-LN; only Pre-LN models convert"),
        ),
    ),
)

#: model types that are encoders (no causal LM objective): drop and lens use cosine drift
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "electra", "mpnet"})


# ---------------------------------------------------------------- state blocks share
# Config settings (of families found by discovery) under which a block reads more than the
# hidden state its predecessor hands on. The engine asks these two questions only.

def earlier_state_reader(config) -> str | None:
    """Why some block of ``config`` reads state an earlier block left besides the hidden state
    (then a drop cannot start from a cached block input: the prefix must run), or None."""
    if "shared" in (getattr(config, "indexer_types", None) or ()):
        return "its 'shared' sparse-attention layers reuse the top-k indices of the previous full indexer layer"
    if "reuse" in (getattr(config, "kv_sharing_modes", None) or ()):
        return "its KV-shared layers reuse the keys and values an earlier layer stored"
    return None


#: per-layer input modules (Gemma 3n / 4 "PLE") whose weights pack one slice per block along
#: one axis: (attribute of the base model, weight axis); sliced with the blocks on removal
PER_LAYER_INPUT_WEIGHTS = (("embed_tokens_per_layer", 1), ("per_layer_model_projection", 0))


def positional_block_inputs(config) -> str | None:
    """Why the model's own forward feeds each block an input picked by the block's position in
    the list (so a block list cannot be shortened without re-slicing it), or None."""
    if getattr(config, "hidden_size_per_layer_input", None):
        return "per-layer input embeddings (hidden_size_per_layer_input) are indexed by block position"
    return None
