"""Remove blocks for good and save a model that loads with plain ``from_pretrained``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack, renumber_layer_idx
from depthprobe.safeio import atomic_save_pretrained

log = logging.getLogger(__name__)


def remove_blocks(stack: LayerStack, remove: Sequence[int]) -> LayerStack:
    """Delete blocks ``remove`` from the model in place and return the new stack.

    ``config.num_hidden_layers``, per-layer config lists (``layer_types``) and every
    ``layer_idx`` inside the blocks are made consistent, so the model saves and reloads.
    """
    config = getattr(stack.model, "config", None)
    if config is None or not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise DepthprobeError(
            f"cannot remove blocks from {type(stack.model).__name__}: its config has no num_hidden_layers, "
            "so a pruned copy could not be reloaded"
        )
    drop = set(remove)
    keep = [i for i in range(len(stack)) if i not in drop]
    if not keep:
        raise DepthprobeError("cannot remove every block; keep at least one")
    parent, attr = stack._parent_and_attr()
    new_blocks = nn.ModuleList([stack.blocks[i] for i in keep])
    setattr(parent, attr, new_blocks)
    for name in ("layer_types",) + tuple(stack.spec.extra_per_layer_config if stack.spec else ()):
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(stack):
            setattr(config, name, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    renumber_layer_idx(new_blocks)
    return LayerStack.from_model(stack.model, stack.blocks_path if stack.spec is None else None)


def save_model(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer into ``out_dir``."""
    return atomic_save_pretrained(out_dir, model, tokenizer, safe_serialization=True)  # no half-written file
