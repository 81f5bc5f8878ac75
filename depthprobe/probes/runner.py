"""Run single blocks of a model on given streams through the model's own forward (the
engine of layer-major execution): only block l kept, its input swapped in by a pre-hook,
the forward stopped right after it, so masks, rotary tables and per-layer types stay the
model's own and results equal the batch-major run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from depthprobe.model.stack import block_output
from depthprobe.probes.batch import Batch
from depthprobe.probes.hooks import block_input, hooked
from depthprobe.probes.objective import Objective
from depthprobe.probes.offload import resident


class _Stop(Exception):
    """Raised after the one block a :class:`BlockRunner` call needs: the rest is not run."""


class BlockRunner:
    """``with runner.at(l): y = runner.run(batch, x)`` gives block l's output for input ``x``
    (the prelude, masks and rotary tables computed by the model from the batch's inputs).
    Batches are already on the input device (:meth:`Objective.place`)."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.stack = objective.stack
        self._hidden: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._keep_graph = False

    def _forward(self, batch: Batch) -> None:
        try:
            self.objective.forward(batch, head=False)
        except _Stop:
            return
        raise RuntimeError("the block of a layer-major call never ran")

    def embed(self, batch: Batch) -> torch.Tensor:
        """x_0 of a batch: the first block's input, as the model's own prelude makes it."""
        def grab(module, args, kwargs):
            self._output = block_input(args, kwargs).detach()
            raise _Stop

        with hooked(self.stack.blocks[0], pre=grab):
            self._forward(batch)
        return self._output

    @contextlib.contextmanager
    def at(self, layer: int) -> Iterator[None]:
        """Keep only block ``layer``, resident, for the :meth:`run` calls inside."""
        block = self.stack.blocks[layer]

        def swap(module, args, kwargs):
            if args:
                return (self._hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self._hidden}

        def stop(module, args, kwargs, output):
            out = block_output(output)
            self._output = out if self._keep_graph else out.detach()
            raise _Stop

        with hooked(block, pre=swap, post=stop), self.stack.keep_blocks([layer]), resident([block]):
            yield

    def run(self, batch: Batch, hidden: torch.Tensor, graph: bool = False) -> torch.Tensor:
        """Output of the block chosen by :meth:`at` for input ``hidden`` (on the input's device);
        with ``graph`` the output keeps its autograd graph (call under ``torch.enable_grad``)."""
        self._hidden, self._keep_graph = hidden, graph
        try:
            self._forward(batch)
        finally:
            self._hidden, self._keep_graph = None, False
        output, self._output = self._output, None
        return output
