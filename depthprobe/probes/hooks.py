"""Temporary hooks on a :class:`LayerStack`, always removed when the ``with`` block ends.

Block callbacks receive ``(l, x_l, x_{l+1})``: block ``l``'s input and raw output, the same
``x_l`` that the metric definitions and the ``layer`` column of every table use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from depthprobe.model.stack import LayerStack, block_output

#: callback(layer, x_in, x_out) for every block, in forward order
BlockCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-state input of a block call, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def watch_blocks(stack: LayerStack, callback: BlockCallback, layers: list[int] | None = None) -> Iterator[None]:
    """Call ``callback(l, x_l, x_{l+1})`` after every block ``l`` runs (inputs not detached)."""
    handles = []

    def make(layer: int):
        def hook(module, args, kwargs, output):
            callback(layer, block_input(args, kwargs), block_output(output))

        return hook

    try:
        for layer in range(len(stack)) if layers is None else layers:
            handles.append(stack.blocks[layer].register_forward_hook(make(layer), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def zero_output(module: torch.nn.Module) -> Iterator[None]:
    """Make ``module`` contribute nothing: its (first) output is replaced by zeros."""

    def hook(mod, args, output):
        if isinstance(output, (tuple, list)):
            return type(output)([torch.zeros_like(output[0]), *output[1:]])
        return torch.zeros_like(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def only_blocks_require_grad(stack: LayerStack) -> Iterator[None]:
    """Gradients for block parameters only (embeddings and head are not needed for
    per-block gradient norms, and skipping them saves the head's large weight gradient).
    Previous ``requires_grad`` flags and ``.grad`` values are restored afterwards."""
    params = list(stack.model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    block_ids = {id(p) for p in stack.blocks.parameters()}
    try:
        for p in params:
            p.requires_grad_(id(p) in block_ids)
            p.grad = None
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
