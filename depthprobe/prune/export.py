"""Remove blocks for good and save a model that loads with plain ``from_pretrained``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.model.stack import LayerStack, slice_layer_config

log = logging.getLogger(__name__)


def remove_blocks(stack: LayerStack, remove: Sequence[int]) -> LayerStack:
    """Delete blocks ``remove`` from the model in place and return the new stack.

    ``config.num_hidden_layers``, every per-layer config entry (``layer_types``, index lists)
    and every ``layer_idx`` inside the blocks follow the kept blocks by the same rule as
    :meth:`LayerStack.keep_blocks` (:func:`depthprobe.model.stack.slice_layer_config`), so
    the model saves and reloads with plain ``from_pretrained``.
    """
    config = stack.layer_config
    if config is None or not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise DepthprobeError(
            f"cannot remove blocks from {type(stack.model).__name__}: its config has no num_hidden_layers, "
            "so a pruned copy could not be reloaded"
        )
    _check_config_after(stack, config, remove)
    return stack.remove_blocks(remove)


def derived_layer_lists(config, num_blocks: int) -> list[str]:
    """Read-only config properties with one entry per block (Jamba's ``layers_block_type``)."""
    names = []
    for cls in type(config).__mro__:
        for name, attr in vars(cls).items():
            if isinstance(attr, property) and attr.fset is None and name not in names:
                try:
                    value = getattr(config, name)
                except Exception:  # noqa: BLE001 - a property may fail on a partial config
                    continue
                if isinstance(value, (list, tuple)) and len(value) == num_blocks:
                    names.append(name)
    return names


def _check_config_after(stack: LayerStack, config, remove: Sequence[int]) -> None:
    """Refuse, before touching the model, a removal that the config class itself rejects
    (a hybrid that needs at least one attention block, say)."""
    keep = [i for i in range(len(stack)) if i not in set(remove)]
    trial = copy.deepcopy(config)
    slice_layer_config(trial, keep, len(stack))
    for name in derived_layer_lists(config, len(stack)):
        want = [getattr(config, name)[i] for i in keep]
        if list(getattr(trial, name)) != want:
            raise DepthprobeError(
                f"cannot remove blocks {sorted(set(remove))}: {type(config).__name__} derives {name} from a "
                f"pattern (e.g. a period), so a reloaded copy would build {list(getattr(trial, name))} instead of "
                f"the kept {want}; choose other blocks with --remove"
            )
    validate = getattr(trial, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except Exception as exc:  # noqa: BLE001 - config validators raise their own error types
        reason = str(exc).strip().splitlines()[-1].strip()[:200] if str(exc).strip() else type(exc).__name__
        raise DepthprobeError(
            f"cannot remove blocks {sorted(set(remove))}: the pruned {type(config).__name__} would be invalid "
            f"({reason}); choose other blocks with --remove"
        ) from exc


def save_model(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
