"""Expert load of every MoE router during the main pass (``router_load_entropy``).

A forward hook on each block's router (:meth:`LayerStack.router`) counts, over all tokens,
how often each expert is among a token's top-k router logits. The column is the entropy of
that load (:func:`depthprobe.probes.metrics.load_entropy`): ``log(E)`` when every expert
gets the same share, 0 when one expert takes every token.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from depthprobe import distributed
from depthprobe.model.stack import LayerStack, experts_per_token, num_experts
from depthprobe.probes import metrics as M
from depthprobe.probes.hooks import hooked_all


class watch_routers:  # noqa: N801 - used as a context manager, like the other watch_* helpers
    """``with watch_routers(stack) as r: ...`` then ``r.columns()`` (empty without routers)."""

    def __init__(self, stack: LayerStack):
        config = getattr(stack.model, "config", None)
        self.num_experts = num_experts(config)
        self.top_k = experts_per_token(config) or 1
        self.routers = {i: r for i in range(len(stack)) if (r := stack.router(i)) is not None}
        self.counts = {i: np.zeros(self.num_experts or 0) for i in self.routers}
        self._hooks: contextlib.AbstractContextManager | None = None
        self.num_layers = len(stack)

    def __enter__(self) -> watch_routers:
        self._hooks = hooked_all((router, self._hook(layer)) for layer, router in self.routers.items())
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self._hooks.__exit__(*exc)
        self._hooks = None
        return False

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits = _expert_logits(output, self.num_experts)
            if logits is not None:
                self.counts[layer] += M.expert_counts(logits, self.top_k)

        return hook

    def reduce(self) -> None:
        """Sum the expert loads over torchrun processes."""
        self.counts = {layer: distributed.reduce_sum(counts) for layer, counts in self.counts.items()}

    def columns(self) -> dict[str, list[float]]:
        if not self.routers:
            return {}
        values = [np.nan] * self.num_layers
        for layer, counts in self.counts.items():
            values[layer] = M.load_entropy(counts) if counts.sum() > 0 else np.nan
        return {"router_load_entropy": values}


def _expert_logits(output, num_experts: int | None) -> torch.Tensor | None:
    """The ``(tokens, E)`` router scores in a router's output (a tensor or a tuple)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2:
            if num_experts is None or item.shape[-1] == num_experts:
                return item.detach().reshape(-1, item.shape[-1])
    return None
