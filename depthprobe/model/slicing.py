"""Slicing a model's config to the blocks kept: the one rule for temporary
(:meth:`LayerStack.keep_blocks <depthprobe.model.stack.LayerStack.keep_blocks>`) and permanent
(:meth:`~depthprobe.model.stack.LayerStack.remove_blocks`) block edits.

``num_hidden_layers``, every per-layer config entry, every ``layer_idx`` and every dict keyed
by block index follow the kept blocks, so sliding-window / full attention, dense / MoE and
per-segment counts stay with their blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from depthprobe.errors import DepthprobeError


def renumber_layer_idx(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` attribute inside block i to i (what a KV cache indexes by)."""
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i


def fold_index_constants(blocks: nn.ModuleList, keep: Sequence[int]) -> None:
    """Blocks whose computation depends on their own index through a constant the module
    recomputes from ``layer_idx`` at init (not a saved weight) get that dependence folded into
    their weights, so a pruned export, rebuilt with new indices, computes what the kept blocks
    computed in place. ``blocks[i]`` was block ``keep[i]``."""
    for new, (old, block) in enumerate(zip(keep, blocks, strict=True)):
        if old == new:
            continue
        for module in block.modules():
            fold = INDEX_CONSTANT_FOLDS.get(type(module).__name__)
            if fold is not None:
                fold(module, new)


def _fold_diff_attention(attn: nn.Module, new_index: int) -> None:
    """DiffLlama: ``λ_init(l) = 0.8 − 0.6·exp(−0.3·l)`` enters as
    ``λ = exp(q1·k1) − exp(q2·k2) + λ_init`` and as the output scale ``(1 − λ_init)``.
    At index l' the same outputs need ``exp(q1'·k1) = exp(q1·k1) + λ_init(l) − λ_init(l')``
    (``q1`` rescaled along ``k1``) and ``o_proj`` scaled by ``(1 − λ_init(l)) / (1 − λ_init(l'))``."""
    old = float(attn.lambda_init)
    new = float(sys.modules[type(attn).__module__].lambda_init_fn(new_index))
    with torch.no_grad():
        q1, k1 = attn.lambda_q1.double(), attn.lambda_k1.double()
        target = math.exp(float((q1 * k1).sum())) + old - new
        norm = float((k1 * k1).sum())
        if target <= 0 or norm == 0:
            raise DepthprobeError(f"{type(attn).__name__}'s lambda cannot be carried to block index {new_index}; "
                                  "remove other blocks")
        # q1' = q1 + c·k1 with q1'·k1 = log(target)
        c = (math.log(target) - float((q1 * k1).sum())) / norm
        attn.lambda_q1.copy_((q1 + c * k1).to(attn.lambda_q1.dtype))
        attn.o_proj.weight.mul_((1 - old) / (1 - new))
    attn.lambda_init = new


#: module class name -> fold of its index-derived constants (:func:`fold_index_constants`)
INDEX_CONSTANT_FOLDS: dict[str, Callable[[nn.Module, int], None]] = {"DiffLlamaAttention": _fold_diff_attention}


class PassThrough(nn.Module):
    """A skipped block where the list keeps its length: returns its hidden-state input (the
    families that need it, :func:`~depthprobe.model.families.positional_block_inputs`, have
    blocks that return a tensor)."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def passed_through(parent: nn.Module, attr: str, blocks: nn.ModuleList, keep: Sequence[int]) -> Iterator[None]:
    """``parent.attr`` holds ``blocks`` with every block not in ``keep`` a :class:`PassThrough`
    (same length, same indices, config untouched), then ``blocks`` again."""
    kept = set(keep)
    swapped = nn.ModuleList([block if i in kept else PassThrough() for i, block in enumerate(blocks)])
    swapped.training = blocks.training
    setattr(parent, attr, swapped)
    try:
        yield
    finally:
        setattr(parent, attr, blocks)


def slice_per_layer_inputs(base: nn.Module, keep: Sequence[int], num_blocks: int, per_layer: int) -> None:
    """Keep the slices of blocks ``keep`` in the packed per-layer input weights of ``base``
    (:data:`~depthprobe.model.families.PER_LAYER_INPUT_WEIGHTS`: ``num_blocks`` slices of
    ``per_layer`` along one axis), so block ``i`` of the result reads what block ``keep[i]`` read."""
    from depthprobe.model.families import PER_LAYER_INPUT_WEIGHTS

    for attr, axis in PER_LAYER_INPUT_WEIGHTS:
        module = getattr(base, attr, None)
        weight = getattr(module, "weight", None)
        if weight is None or weight.shape[axis] != num_blocks * per_layer:
            raise DepthprobeError(f"cannot slice {type(base).__name__}.{attr} to the kept blocks: expected "
                                  f"{num_blocks} x {per_layer} along axis {axis}, found shape {tuple(weight.shape) if weight is not None else None}")
        shape = list(weight.shape)
        packed = weight.detach().unflatten(axis, (num_blocks, per_layer))
        kept = packed.index_select(axis, torch.tensor(list(keep), device=weight.device))
        shape[axis] = len(keep) * per_layer
        module.weight = nn.Parameter(kept.reshape(shape).contiguous(), requires_grad=weight.requires_grad)
        for name in ("num_embeddings", "out_features"):
            if hasattr(module, name) and getattr(module, name) == num_blocks * per_layer:
                setattr(module, name, len(keep) * per_layer)
        if isinstance(module, nn.Embedding):
            module.embedding_dim = len(keep) * per_layer


def remap_layer_maps(blocks: nn.ModuleList, keep: Sequence[int]) -> list[tuple[nn.Module, str, dict]]:
    """Modules that look things up by block index in a dict built at init (Zamba 2's shared
    blocks: ``layer_dic``) get the keys of kept blocks renumbered; returns the old dicts."""
    new_index = {old: new for new, old in enumerate(keep)}
    saved, seen = [], set()
    for module in blocks.modules():
        if id(module) in seen:
            continue
        seen.add(id(module))
        for name, value in list(vars(module).items()):
            if "layer" in name and layer_keyed(value, len(blocks)):
                saved.append((module, name, value))
                setattr(module, name, {new_index[k]: v for k, v in value.items() if k in new_index})
    return saved


#: config counts of leading dense (non-MoE) blocks (DeepSeek-likes, AFMoE)
_DENSE_PREFIX_COUNTS = ("first_k_dense_replace", "num_dense_layers")
_NOT_PER_LAYER = ("architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens")


def slice_layer_config(config, keep: list[int], num_blocks: int) -> dict:
    """Make ``config`` describe only blocks ``keep`` of ``num_blocks``; return the old values.

    The one rule for temporary (:meth:`LayerStack.keep_blocks`) and permanent
    (:meth:`LayerStack.remove_blocks`) edits: ``num_hidden_layers`` becomes ``len(keep)``;
    every list as long as the block count (``layer_types``, ``layers_block_type``, ...) keeps
    the kept entries; every list of layer indices (``mlp_only_layers``, names ending in
    ``_layers``) keeps the kept ones, renumbered; dicts keyed by layer index likewise;
    ``first_k_dense_replace`` / ``num_dense_layers`` (the first k blocks are dense) count the
    kept dense blocks.
    """
    saved: dict = {}
    new_index = {old: new for new, old in enumerate(keep)}

    def update(name, value):
        saved.setdefault(name, getattr(config, name))
        setattr(config, name, value)

    for name, value in list(vars(config).items()):
        if name.startswith("_") or name in _NOT_PER_LAYER or name.endswith("token_id") or not _settable(config, name):
            continue
        if _is_index_list(name, value, num_blocks):  # before the length test: [0, 1, 2] may name all 3
            update(name, type(value)(new_index[i] for i in value if i in new_index))
        elif isinstance(value, (list, tuple)) and len(value) == num_blocks:
            update(name, type(value)(value[i] for i in keep))
        elif "layer" in name and isinstance(value, dict) and layer_keyed(value, num_blocks):
            update(name, {new_index[k]: v for k, v in value.items() if k in new_index})
    spec = vars(config).get("_heterogeneity_spec")  # transformers' per-layer overrides {layer: {...}}
    if spec is not None and layer_keyed(getattr(spec, "per_layer_overrides", None), num_blocks):
        overrides = {new_index[k]: v for k, v in spec.per_layer_overrides.items() if k in new_index}
        update("_heterogeneity_spec", dataclasses.replace(spec, per_layer_overrides=overrides))
    if isinstance(getattr(config, "scale_depth", None), (int, float)) and _settable(config, "scale_depth"):
        # MiniCPM scales each residual branch by scale_depth / sqrt(num_hidden_layers): keep the scale
        update("scale_depth", config.scale_depth * math.sqrt(len(keep) / num_blocks))
    for name in _DENSE_PREFIX_COUNTS:  # the first k blocks are dense: kept dense blocks stay a prefix
        k = getattr(config, name, None)
        if isinstance(k, int) and _settable(config, name):
            update(name, sum(1 for i in keep if i < k))
    for name in _LAYER_COUNTS:  # some configs repeat the block count under another name (xLSTM)
        if vars(config).get(name) == num_blocks and _settable(config, name):
            update(name, len(keep))
    _slice_segments(config, keep, num_blocks, update)
    if isinstance(getattr(config, "num_hidden_layers", None), int):
        update("num_hidden_layers", len(keep))
    return saved


_LAYER_COUNTS = ("num_blocks", "num_layers", "n_layers", "n_layer", "num_decoder_layers")
_SEGMENT = re.compile(r"^(n|num)_(?!hidden_)\w+_layers$")


def _slice_segments(config, keep: list[int], num_blocks: int, update) -> None:
    """Counts of consecutive block segments (``n_input_layers``, ``n_recurrent_layers``,
    ``n_output_layers`` summing to the block count, in config order): kept blocks per segment."""
    names = [n for n, v in vars(config).items()
             if _SEGMENT.match(n) and isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    counts = [vars(config)[n] for n in names]
    if len(names) < 2 or sum(counts) != num_blocks or not all(_settable(config, n) for n in names):
        return
    start = 0
    for name, count in zip(names, counts, strict=True):
        update(name, sum(1 for i in keep if start <= i < start + count))
        start += count


def _is_index_list(name: str, value, num_blocks: int) -> bool:
    """A list of block indices (``mlp_only_layers=[1, 3]``), not one entry per block: named
    like one, strictly increasing, and (when as long as the block count) exactly all blocks."""
    if not isinstance(value, (list, tuple)) or not name.endswith(
        ("_layers", "_layer_ids", "_layers_idx", "layer_indices", "_layer_idx")
    ):
        return False
    ints = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_blocks for i in value)
    increasing = all(a < b for a, b in zip(value, value[1:], strict=False))
    return ints and increasing and (len(value) != num_blocks or list(value) == list(range(num_blocks)))


def layer_keyed(value, num_blocks: int) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, int) and 0 <= k < num_blocks for k in value
    )


def _settable(config, name: str) -> bool:
    prop = getattr(type(config), name, None)
    return not isinstance(prop, property) or prop.fset is not None
