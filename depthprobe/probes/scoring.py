"""Scoring windows: the one per-window scorer of a model with some blocks removed
(:class:`WindowScorer`), a batch's scores from an output or a stream (:class:`BatchScorer`),
and the block inputs of one pass (:func:`capture_states`), which prefix caching reuses.

``scores(removed)[w]`` = the objective (:class:`~depthprobe.probes.objective.Objective`:
mean next-token NLL ``-1/(T-1) Σ_t log p(x_{t+1} | x_≤t)`` for LMs, cosine drift against the
full model for encoders) of window ``w``, from the model's own forward with blocks
``removed`` taken out by ``LayerStack.keep_blocks`` (exactly the computation an exported
pruned model does). The held-out loss (:mod:`depthprobe.evaluate.heldout`) and the pruning
evaluator (:class:`depthprobe.prune.select.Evaluator`) both score through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from depthprobe.model.stack import LayerStack
from depthprobe.probes.batch import Batch, batches_of
from depthprobe.probes.hooks import evaluating, watch_blocks
from depthprobe.probes.objective import Objective, objective_for


@dataclass
class BatchScorer:
    """Per-window objective (:class:`Objective`) of a model run on one batch."""

    objective: Objective
    batch: Batch
    reference: torch.Tensor | None = None  # encoders: the full model's final hidden state

    def from_output(self, out) -> np.ndarray:
        return self.objective.window_scores(out, self.batch, self.reference)

    def from_stream(self, hidden: torch.Tensor) -> np.ndarray:
        """Score a residual-stream state as if it were the last block's output."""
        return self.objective.stream_scores(hidden, self.batch, self.reference)

    def run(self, start: int, hidden: torch.Tensor, keep: Sequence[int] | None = None) -> np.ndarray:
        """Objective when blocks ``keep`` (default ``start..L-1``) run on ``hidden``."""
        stack = self.objective.stack
        keep = list(range(start, len(stack))) if keep is None else list(keep)
        if not keep:
            return self.from_stream(hidden)
        with stack.start_at(keep[0], hidden, keep=keep):
            return self.from_output(self.objective.forward(self.batch))


def capture_states(objective: Objective, batch: Batch, keep: Sequence[int] | None = None):
    """One forward pass; returns ``(states, out)`` with ``states[l]`` the input of block l
    (``states[L]`` the last block's output), for the blocks in ``keep`` (default: all)."""
    stack = objective.stack
    keep = list(range(len(stack))) if keep is None else list(keep)
    states: dict[int, torch.Tensor] = {}

    def record(layer, x_in, x_out):
        states[layer] = x_in.detach()
        if layer == keep[-1]:
            states[len(stack)] = x_out.detach()

    with stack.keep_blocks(keep), watch_blocks(stack, record, layers=keep):
        out = objective.forward(batch)
    return states, out


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
