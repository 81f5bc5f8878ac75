"""Tiny random models of every supported family, built from their transformers configs.

Each is saved to a folder and loaded back through ``depthprobe.load_model``, the same path
a hub model takes. Sizes are small enough that a forward pass takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

VOCAB = 128  # >= the byte-ish ids the tests feed; tokenizers are not needed for windows

_COMMON = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _configs():
    import transformers as tf

    from depthprobe.train import DepthprobeLMConfig, DepthprobeLMForCausalLM

    decoder = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=128, **_COMMON,
    )
    return {
        "llama": (tf.LlamaConfig(num_key_value_heads=2, **decoder), tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig(num_key_value_heads=2, sliding_window=8, **decoder), tf.MistralForCausalLM),
        "qwen2": (
            tf.Qwen2Config(
                num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=2, **decoder
            ),
            tf.Qwen2ForCausalLM,
        ),
        "gemma2": (
            tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=8, **decoder),
            tf.Gemma2ForCausalLM,
        ),
        "olmo2": (tf.Olmo2Config(num_key_value_heads=2, **decoder), tf.Olmo2ForCausalLM),
        "phi": (tf.PhiConfig(**decoder), tf.PhiForCausalLM),
        "gpt2": (tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **_COMMON), tf.GPT2LMHeadModel),
        "gpt_neox": (
            tf.GPTNeoXConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=128, use_parallel_residual=False, **_COMMON,
            ),
            tf.GPTNeoXForCausalLM,
        ),
        "opt": (
            tf.OPTConfig(
                hidden_size=32, ffn_dim=64, num_hidden_layers=4, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=128, do_layer_norm_before=True, **_COMMON,
            ),
            tf.OPTForCausalLM,
        ),
        "bert": (
            tf.BertConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=128, **_COMMON,
            ),
            tf.BertModel,
        ),
        # the trainer's own model; Pre-LN with LayerNorm so that it also converts
        "depthprobe_lm": (
            DepthprobeLMConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=128, norm_type="layer", norm_placement="pre",
            ),
            DepthprobeLMForCausalLM,
        ),
    }


FAMILY_NAMES = ("llama", "mistral", "qwen2", "gemma2", "olmo2", "phi", "gpt2", "gpt_neox", "opt", "bert")
DECODER_FAMILIES = tuple(f for f in FAMILY_NAMES if f != "bert")


def build_tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (norm gains/biases randomised too, so
    no test passes only because a norm is the identity)."""
    config, cls = _configs()[family]
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() or "ln" in name.split(".")[-1]:
                for p in module.parameters(recurse=False):
                    p.add_(0.1 * torch.randn_like(p))
    return model


def save_tiny(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Build, then ``save_pretrained`` the tiny model (and a byte-level GPT-2 style tokenizer)."""
    model = build_tiny(family, seed=seed, **overrides)
    folder = Path(folder)
    # no "Writing model shards" bar: a session fixture's bar lands in whichever test's captured
    # stderr first needs it, and tests count the lines of that stderr
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_tokenizer():
    """A word-level tokenizer over a 128-token vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>"] + [chr(c) for c in range(33, 33 + VOCAB - 2)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def random_ids(num_sequences: int = 6, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (num_sequences, seq_len), generator=g)
