"""Build a random-weight model of a real model's shape as sharded safetensors, one block at
a time, so that building a 13.8 GB checkpoint never holds more than one block in memory.

The folder is a normal Hugging Face checkpoint (config.json, model.safetensors.index.json,
one shard per block, a tokenizer) that ``depthprobe analyze FOLDER`` loads like any other.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch

#: Llama-2-7B's shape (meta-llama/Llama-2-7b-hf config.json), 6.74 B parameters
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def shard_of(name: str) -> str:
    """Shard file of a parameter: one per block, one for everything outside the blocks."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return f"block-{int(match.group(1)):03d}.safetensors" if match else "outside.safetensors"


def random_tensor(name: str, shape: torch.Size, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Norm weights 1, everything else N(0, 0.02²) (Llama's initializer_range), seeded per tensor."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def build_random_checkpoint(folder: str | os.PathLike, config_fields: dict, tokenizer_source: str,
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write the checkpoint into ``folder`` (skipped when a finished one is already there)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder).expanduser()
    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(**{**config_fields, "dtype": str(dtype).replace("torch.", "")})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    groups: dict[str, list[str]] = defaultdict(list)
    for name in shapes:
        groups[shard_of(name)].append(name)
    weight_map, total = {}, 0
    for i, (shard, names) in enumerate(sorted(groups.items())):
        tensors = {n: random_tensor(n, shapes[n], dtype, seed * 100003 + i * 1009 + j) for j, n in enumerate(names)}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: shard for n in names})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(folder)
    (folder / "DONE").write_text("built by benchmarks/_bigmodel.py\n")
    return folder
