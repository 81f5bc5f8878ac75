"""Per-block gradient norms without holding every gradient: each parameter's gradient is
reduced to its squared norm the moment the backward has finished it, then freed.

``grad_norm[l] = sqrt(sum_{p in block l} ||g_p||^2)`` where ``g_p`` is the gradient of the
mean-token loss over *all* windows (the sum of the per-batch gradients), and likewise
``grad_norm_attn`` / ``grad_norm_mlp`` over the parameters of block l's attention / MLP
modules. A backward over several batches must keep the running sum ``g_p`` until the last
batch (the norm of a sum is not the sum of norms), so only the last backward frees each
gradient as it comes; with one batch no block holds its gradients after its backward step.

Layer-major execution (offloaded weights) runs the backward block by block instead and calls
:meth:`BlockGradNorms.reduce_layer` once a block has seen every batch: parameters are found
by their module and name, since accelerate gives an offloaded module fresh tensors each time
it loads it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from depthprobe import distributed
from depthprobe.model.stack import LayerStack
from depthprobe.probes import metrics as M
from depthprobe.probes.hooks import grad_hooks

COLUMNS = ("grad_norm", "grad_norm_attn", "grad_norm_mlp")


class BlockGradNorms:
    """Squared gradient norms summed per block and sublayer, fed by post-accumulate hooks.

    Use ``with norms.hooked(): ...`` around the backward passes and call :meth:`last_batch`
    before the last one; :meth:`columns` then gives the norms. Gradients of the last
    backward are freed (``p.grad = None``) as soon as they are reduced.
    """

    def __init__(self, stack: LayerStack):
        self.num_layers = len(stack)
        # every parameter once, with each (column, block) it counts in: a parameter shared
        # between blocks counts in each of them, as the per-block norm of ``.grad`` did
        self.params: dict[int, torch.nn.Parameter] = {}
        self.owners: dict[int, tuple[torch.nn.Module, str]] = {}  # key -> (module, parameter name)
        self.targets: dict[int, list[tuple[str, int]]] = {}
        self.missing: dict[str, list[int]] = {}
        for layer in range(self.num_layers):
            block = stack.blocks[layer]
            self.owners.update({id(p): (m, name) for m in block.modules() for name, p in m._parameters.items()
                                if p is not None})
            self._add(block.parameters(), "grad_norm", layer)
            for kind in ("attn", "mlp"):
                params = [p for m in stack.sublayer_modules(layer, kind) for p in m.parameters()]
                if not params:
                    self.missing.setdefault(kind, []).append(layer)
                self._add(params, f"grad_norm_{kind}", layer)
        self.squares: dict[int, torch.Tensor] = {}  # parameter id -> ||g_p||^2 (float64, on its device)
        self.final = False

    def _add(self, params, column: str, layer: int) -> None:
        for p in dict.fromkeys(params):  # a module listed twice counts its parameters once
            self.params[id(p)] = p
            self.targets.setdefault(id(p), []).append((column, layer))

    def last_batch(self) -> None:
        """The next backward is the last: reduce and free each gradient as it is finished."""
        self.final = True

    def _reduce(self, p: torch.Tensor, key: int | None = None) -> None:
        if self.final and p.grad is not None:
            distributed.reduce_grads([p])  # torchrun: the norm of the summed gradient, not a sum of norms
            self.squares[id(p) if key is None else key] = M.squared_l2(p.grad)
            p.grad = None

    @property
    def shared_across_blocks(self) -> bool:
        """Whether some parameter belongs to several blocks (then a block-by-block backward
        would see only one block's share of its gradient)."""
        return any(len({layer for column, layer in t if column == "grad_norm"}) > 1 for t in self.targets.values())

    def reduce_layer(self, layer: int) -> None:
        """Reduce and free the gradients of block ``layer``'s parameters as they are now
        (after a block-by-block backward over every batch)."""
        self.final = True
        for key, targets in self.targets.items():
            if ("grad_norm", layer) in targets:
                module, name = self.owners[key]
                self._reduce(module._parameters[name], key)

    @contextlib.contextmanager
    def hooked(self) -> Iterator[BlockGradNorms]:
        """Hooks on every block parameter; on exit, gradients not yet reduced (a parameter the
        last batch did not reach) are reduced and freed too."""
        try:
            with grad_hooks([p for p in self.params.values() if p.requires_grad], self._reduce):
                yield self
        finally:
            self.final = True
            for p in self.params.values():
                self._reduce(p)

    def columns(self) -> tuple[dict[str, list[float]], dict[str, str]]:
        """``{column: per-block norms}`` (NaN where the block has no such sublayer) and, for
        those columns, why (column -> reason)."""
        sums = {c: [0.0] * self.num_layers for c in COLUMNS}
        for key, square in self.squares.items():
            value = float(square)
            for column, layer in self.targets[key]:
                sums[column][layer] += value
        norms = {c: [math.sqrt(v) for v in values] for c, values in sums.items()}
        for kind, layers in self.missing.items():
            for layer in layers:
                norms[f"grad_norm_{kind}"][layer] = math.nan
        reasons = {f"grad_norm_{kind}": f"no {kind} sublayer found in block(s) {_span(layers)}"
                   for kind, layers in self.missing.items()}
        return norms, reasons


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
