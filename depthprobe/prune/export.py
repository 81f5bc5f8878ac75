"""Remove blocks for good and save a model that loads with plain ``from_pretrained``."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from depthprobe.errors import DepthprobeError
from depthprobe.model.slicing import INDEX_CONSTANT_FOLDS
from depthprobe.model.stack import LayerStack, slice_layer_config
from depthprobe.safeio import atomic_save_pretrained

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
    """Config entries with one value per block: lists (``layer_types``) and read-only
    properties (Jamba's ``layers_block_type``)."""
    names = [n for n, v in vars(config).items()
             if not n.startswith("_") and isinstance(v, (list, tuple)) and len(v) == num_blocks
             and not n.endswith("token_id") and n != "architectures"]
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
    try:  # what from_pretrained will rebuild from the saved config.json
        reloaded = type(trial).from_dict(trial.to_dict())
    except Exception:  # noqa: BLE001 - a config that cannot round-trip is caught by validate() below
        reloaded = trial
    for name in derived_layer_lists(config, len(stack)):
        want = [getattr(config, name)[i] for i in keep]
        got = list(getattr(reloaded, name, None) or [])
        if got != want:
            raise DepthprobeError(
                f"cannot remove blocks {sorted(set(remove))}: {type(config).__name__} rebuilds {name} on load "
                f"(from a period or a fixed rule) as {got} instead of the kept {want}; choose other blocks "
                "with --remove"
            )
    _check_blocks_after(stack, reloaded, keep)
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


def _check_blocks_after(stack: LayerStack, reloaded_config, keep: list[int]) -> None:
    """Refuse a removal after which the reloaded model would rebuild a kept block's constants
    from its new index (Beam's depth-scaled residual ``attn_residual_add_idx``): built on the
    meta device from the pruned config, every block's scalar attributes must equal the kept
    block's (``layer_idx`` aside; modules with a fold, :data:`INDEX_CONSTANT_FOLDS`, aside)."""
    try:
        with torch.device("meta"):
            fresh = LayerStack.from_model(type(stack.model)(reloaded_config))
    except Exception:  # noqa: BLE001 - a model that cannot be rebuilt this way is checked by its reload
        return
    for new, old in enumerate(keep):
        if new == old or new >= len(fresh):
            continue
        rebuilt_modules = dict(fresh.blocks[new].named_modules())
        for name, module in stack.blocks[old].named_modules():
            rebuilt = rebuilt_modules.get(name)
            # the model's own classes only: torch's layers hold shapes, which weights already carry
            if (type(module) is not type(rebuilt) or type(module).__module__.startswith("torch.")
                    or type(module).__name__ in INDEX_CONSTANT_FOLDS):
                continue
            for attr, value in vars(module).items():
                if attr.startswith("_") or attr in ("layer_idx", "training") or type(value) not in (int, float, bool):
                    continue
                if getattr(rebuilt, attr, value) != value:
                    where = f"{type(module).__name__}.{attr}" + (f" ({name})" if name else "")
                    raise DepthprobeError(
                        f"cannot remove blocks {sorted(set(range(len(stack))) - set(keep))}: the model rebuilds "
                        f"{where} from the block index on load ({value} in block {old}, {getattr(rebuilt, attr)} "
                        f"as block {new}), so the export would not compute what was measured; choose other blocks "
                        "with --remove (removing only the last blocks renumbers none)")


def save_model(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` (safetensors) of model and tokenizer into ``out_dir``."""
    return atomic_save_pretrained(out_dir, model, tokenizer, safe_serialization=True)  # no half-written file
