"""The one per-window scorer: each window's objective of the model with some blocks removed.

``scores(removed)[w]`` = the objective (:class:`~depthprobe.probes.objective.Objective`:
mean next-token NLL ``-1/(T-1) Σ_t log p(x_{t+1} | x_≤t)`` for LMs, cosine drift against the
full model for encoders) of window ``w``, from the model's own forward with blocks
``removed`` taken out by ``LayerStack.keep_blocks`` (exactly the computation an exported
pruned model does). The held-out loss (:mod:`depthprobe.evaluate.heldout`) and the pruning
evaluator (:class:`depthprobe.prune.select.Evaluator`) both score through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import Batch, batches_of
from depthprobe.probes.hooks import evaluating
from depthprobe.probes.objective import Objective, objective_for


class WindowScorer:
    """Per-window objective of ``stack``'s model on fixed windows (token ids or ``Windows``)."""

    def __init__(self, stack: LayerStack, windows, batch_size: int = 4):
        self.stack = stack
        self.objective: Objective = objective_for(stack)
        self.batches: list[Batch] = batches_of(windows, batch_size)
        self._reference: list[torch.Tensor] = []  # encoders: the full model's final hidden states

    def placed(self) -> list[tuple[int, Batch]]:
        """``(batch number, batch on the input device)`` for every batch, in order."""
        return [(b, self.objective.place(batch)) for b, batch in enumerate(self.batches)]

    def reference(self, b: int, batch: Batch) -> torch.Tensor | None:
        """What batch ``b`` is scored against: the full model's final state (encoders), computed once."""
        if self.objective.lm:
            return None
        if len(self._reference) <= b:
            self._reference.append(self.objective.reference(self.objective.forward(batch)))
        return self._reference[b]

    @torch.no_grad()
    def scores(self, removed: Sequence[int] = ()) -> np.ndarray:
        """Each window's objective without blocks ``removed``, ``(N,)`` float64."""
        keep = [i for i in range(len(self.stack)) if i not in set(removed)]
        values = []
        with evaluating(self.stack.model):
            for b, batch in self.placed():
                reference = self.reference(b, batch)
                with self.stack.keep_blocks(keep):
                    values.append(self.objective.window_scores(self.objective.forward(batch), batch, reference))
        return np.concatenate(values)
