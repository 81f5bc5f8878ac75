"""The engine's unit of work: one batch of windows, as the model takes them.

Every pass and sweep (main pass, drop sweep, pruning scores, held-out loss) walks a list of
:class:`Batch` objects. A batch carries the model's input dict (``{"input_ids": ...}`` for a
text model; ``{"pixel_values": ...}`` for an image model) and the targets its objective
scores against (the input ids themselves for next-token loss; class labels for an image
classifier), so only :class:`~depthprobe.probes.objective.Objective` looks inside: a new
kind of model is a new objective, not a change to the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Windows ``rows`` of a run: the model's keyword inputs and the objective's targets."""

    rows: slice  # which windows of the run (for per-window tables and journals)
    inputs: Mapping[str, torch.Tensor]  # keyword arguments of the model's forward, batch dim first
    targets: torch.Tensor | None = None  # what the objective scores against (LM: the input ids)

    @property
    def size(self) -> int:
        """Windows in this batch."""
        return self.rows.stop - self.rows.start

    @property
    def index(self) -> int:
        """The first window's index (the journal key of a batch)."""
        return self.rows.start

    @property
    def input_ids(self) -> torch.Tensor:
        """The token ids (text models only)."""
        return self.inputs["input_ids"]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device`` (where the model reads its inputs)."""
        inputs = {k: v.to(device) for k, v in self.inputs.items()}
        if self.targets is None:
            return Batch(self.rows, inputs)
        # LMs score against their own inputs: keep them one tensor, moved once
        same = next((k for k, v in self.inputs.items() if v is self.targets), None)
        return Batch(self.rows, inputs, inputs[same] if same is not None else self.targets.to(device))


def split_batches(inputs: Mapping[str, torch.Tensor], targets: torch.Tensor | None, batch_size: int) -> list[Batch]:
    """Cut ``N`` windows (every tensor's first dimension) into batches of ``batch_size``."""
    n = next(iter(inputs.values())).shape[0]
    batches = []
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        part = {k: v[rows] for k, v in inputs.items()}
        same = next((k for k, v in inputs.items() if v is targets), None)
        batches.append(Batch(rows, part, part[same] if same is not None else
                             (targets[rows] if targets is not None else None)))
    return batches


def token_batches(input_ids: torch.Tensor, batch_size: int) -> list[Batch]:
    """Batches of token windows ``(N, T)``: input ids that are also the next-token targets."""
    return split_batches({"input_ids": input_ids}, input_ids, batch_size)


def batches_of(windows, batch_size: int) -> list[Batch]:
    """The batches of a run's windows: ``windows.engine_batches(batch_size)`` when the data
    type makes its own (non-text models), else token batches of ``windows.input_ids``."""
    make = getattr(windows, "engine_batches", None)
    if make is not None:
        return make(batch_size)
    ids = windows.input_ids if hasattr(windows, "input_ids") else windows
    return token_batches(ids, batch_size)


def num_windows(batches: list[Batch]) -> int:
    return sum(b.size for b in batches)
