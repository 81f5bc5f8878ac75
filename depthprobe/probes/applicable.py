"""Which per-layer columns apply to which blocks: "not applicable" is not "non-finite".

A column about a sublayer (``grad_norm_attn``, ``drop_delta_loss_mlp``), the MoE router
(``router_load_entropy``) or the mid state (``*_mid``) has no value for a block without that part (the Mamba blocks of a
hybrid, a model with no MLP). Those cells stay empty (NaN in the CSV) and the run says why
in one line per column kind; only a computed value that is not finite is an error.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from depthprobe.model.mid import mid_modules
from depthprobe.model.offload import offloaded_modules
from depthprobe.model.stack import LayerStack


def column_part(column: str) -> tuple[str, bool] | None:
    """``(part, droppable)`` a column is about, or None for whole-block columns."""
    if column == "router_load_entropy":
        return "router", False
    if column.endswith("_mid"):
        return "mid", False
    for kind in ("attn", "mlp"):
        if column.endswith(f"_{kind}"):
            return kind, column.startswith("drop")
    return None


def not_applicable_mask(stack: LayerStack, column: str) -> np.ndarray:
    """Boolean per block: True where ``column`` applies (has a value to check)."""
    part = column_part(column)
    if part is None:
        return np.ones(len(stack), dtype=bool)
    kind, droppable = part
    if kind == "router":
        return np.array([stack.router(i) is not None for i in range(len(stack))], dtype=bool)
    if kind == "mid":
        return np.array([i in mid_modules(stack) for i in range(len(stack))], dtype=bool)
    have = set(stack.sublayer_layers(kind, droppable))
    return np.array([i in have for i in range(len(stack))], dtype=bool)


def not_applicable_notes(stack: LayerStack, columns: Iterable[str]) -> list[str]:
    """One line per column that does not apply to every block, naming the blocks and why."""
    notes = []
    for column in columns:
        part = column_part(column)
        if part is None:
            continue
        kind, droppable = part
        if kind == "mid":
            mask = not_applicable_mask(stack, column)
            if not mask.all():
                layers = [int(i) for i in np.flatnonzero(~mask)]
                why = ("not computed on offloaded weights: finding the mid state needs one more read of every block"
                       if offloaded_modules(stack.model) else "no mid state: the MLP does not read the block input "
                       "plus the attention output, as in parallel, Post-LN or attention-free blocks")
                notes.append(f"{column}: not applicable to blocks {layers} ({why})")
            continue
        if kind == "router":
            mask = not_applicable_mask(stack, column)
            if not mask.all():
                layers = [int(i) for i in np.flatnonzero(~mask)]
                notes.append(f"{column}: not applicable to blocks {layers} (no MoE router there)")
            continue
        line = stack.not_applicable_note(kind, droppable)
        if line is not None:
            notes.append(f"{column}: not applicable: {line}")
    return notes
