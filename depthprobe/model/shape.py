"""The sizes a memory plan needs, read before any weight: parameter counts, widths and the
stored dtype, from the config and the checkpoint's safetensors headers.

With safetensors files the counts come from the headers (8-byte length + JSON per file: the
shape of every stored tensor, no tensor data read, no module tree built). Without them (a hub
id not downloaded yet, a GGUF file) a meta-device model is built from the config instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_BLOCK_NAME = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """Sizes read from the config and the checkpoint headers (or a meta-device copy)."""

    num_parameters: int
    block_parameters: int
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    checkpoint_dtype: torch.dtype
    checkpoint_bytes: int | None  # size of the safetensors data, when the headers were read
    safetensors: bool  # weights in safetensors files (memory-mappable)


@dataclass(frozen=True)
class _Headers:
    dtype: torch.dtype | None  # the most common stored dtype
    nbytes: int
    parameters: int
    block_parameters: int


def _read_headers(folder: str | os.PathLike) -> _Headers | None:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    counts: dict[str, int] = {}
    total = params = blocks = 0
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + end - begin
            total += end - begin
            numel = math.prod(info.get("shape", []))
            params += numel
            blocks += numel if _BLOCK_NAME.search("." + name) else 0
    stored = max(counts, key=counts.get)
    return _Headers(SAFETENSORS_DTYPES.get(stored), total, params, blocks)


def safetensors_headers(folder: str | os.PathLike) -> tuple[torch.dtype | None, int] | None:
    """(most common stored dtype, bytes of tensor data) from the headers of every
    ``*.safetensors`` file in ``folder`` (no tensor data read)."""
    headers = _read_headers(folder)
    return None if headers is None else (headers.dtype, headers.nbytes)


def config_dtype(config) -> torch.dtype:
    """The checkpoint's dtype as its config states it (float32 when unstated)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def meta_parameter_counts(config) -> tuple[int, int]:
    """(all, in blocks) parameters of a meta-device model built from ``config`` (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # encoders and other configs without a causal-LM class
            model = AutoModel.from_config(config)
    model.tie_weights()  # tied embeddings count once
    total = blocks = 0
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        total += p.numel()
        blocks += p.numel() if _BLOCK_NAME.search("." + name) else 0
    return total, blocks


def model_shape(config, folder: str | os.PathLike | None = None, gguf: bool = False) -> ModelShape:
    """Sizes from ``config`` and, for a folder of safetensors, its headers (module docs)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0))
    inter = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or getattr(text, "ffn_dim", 0)
                or 4 * hidden)
    layers = int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0) or 1)
    headers = _read_headers(folder) if folder is not None and Path(folder).is_dir() and not gguf else None
    if headers is not None and headers.parameters > 0:
        total, blocks = headers.parameters, headers.block_parameters
    else:
        total, blocks = meta_parameter_counts(config)
    stored = headers.dtype if headers and headers.dtype is not None else config_dtype(config)
    if gguf:
        stored = torch.float32  # GGUF weights are de-quantized to float32 (and cached as such)
    return ModelShape(
        num_parameters=total, block_parameters=blocks, num_layers=layers, hidden=hidden, intermediate=inter,
        vocab=int(getattr(text, "vocab_size", 0) or 0), checkpoint_dtype=stored,
        checkpoint_bytes=headers.nbytes if headers else None, safetensors=headers is not None,
    )
